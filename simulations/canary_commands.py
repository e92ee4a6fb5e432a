"""``fedrank audit canaries``: the canary audit, which trains, so it lives with ``simulations``.

It attaches itself to the ``audit`` group that ``privacy.commands`` registers
(:func:`privacy.commands.audit_app_of`); ``privacy`` never imports ``simulations``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

__all__ = ["register"]


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Attach ``fedrank audit canaries`` (call after ``privacy.commands.register``)."""
    from privacy.commands import audit_app_of

    del bench_app  # no benchmarks here
    audit_app = audit_app_of(app)

    @audit_app.command("canaries")
    def audit_canaries(
        scenario: str = typer.Argument(..., help="Scenario name (regional-5, ...)."),
        epsilon: str = typer.Option(..., "--epsilon", help="Claimed per-node ε, or 'inf'."),
        runs: int = typer.Option(
            4, "--runs", min=1, help="Independent training runs (2 x rounds canaries each)."
        ),
        rounds: int | None = typer.Option(
            None, "--rounds", min=1, help="Rounds per run (default: the scenario's)."
        ),
        node: int = typer.Option(0, "--node", min=0, help="Which regional node to audit."),
        seed: int = typer.Option(0, "--seed", help="Seeds the canaries' coins (not DP noise)."),
        as_json: Path | None = typer.Option(None, "--json", help="Write the result as JSON."),
        data: Path | None = typer.Option(
            None, "--data", help="Judged-search directory (fedrank data import); default WANDS."
        ),
        mechanism: str = typer.Option(
            "dp-sgd", "--mechanism",
            help="dp-sgd (the head's training) or evidence (the node's click-count release).",
        ),
        canaries: int = typer.Option(
            1000, "--canaries", min=1,
            help="evidence only: canary users, one per pair the node's users never touch.",
        ),
    ) -> None:
        """One-run canary audit (Steinke et al. 2023) with a σ = 0 positive control."""
        # Result: "pass" (bound <= claim < control's bound), "inconclusive" (control's bound
        # <= claim) or "fail" (bound > claim: exit 1).
        from shared_model.data import catalog_run_config
        from simulations.canaries import node_groups, run_canary_audit
        from simulations.scenarios import get_scenario

        try:
            catalog = catalog_run_config(data).get("catalog-dir", "")
            chosen = get_scenario(scenario)
            eps = float(epsilon)
            if not eps > 0:
                raise ValueError(f"--epsilon must be > 0 or 'inf', got {epsilon!r}")
        except (KeyError, ValueError) as exc:
            typer.echo(f"error: {exc.args[0]}", err=True)
            raise typer.Exit(2) from None
        if chosen.partition != "regional":
            typer.echo(f"error: {scenario} is not a regional scenario", err=True)
            raise typer.Exit(2)
        if node >= chosen.world.num_regions:
            typer.echo(f"error: --node must be < {chosen.world.num_regions}", err=True)
            raise typer.Exit(2)
        if mechanism not in ("dp-sgd", "evidence"):
            typer.echo(f"error: --mechanism must be dp-sgd or evidence, got {mechanism!r}",
                       err=True)
            raise typer.Exit(2)
        if mechanism == "evidence":
            _audit_evidence(scenario, chosen, eps=eps, node=node, seed=seed, catalog=catalog,
                            canaries=canaries, as_json=as_json)
            return
        from fedrank.progress import progress

        cfg = chosen.run_config
        # Audited runs, then as many σ = 0 positive-control runs.
        bar = progress(2 * runs, "canary audit runs")
        with bar:
            result = run_canary_audit(
                real=node_groups(scenario, node=node, catalog_dir=catalog),
                epsilon=eps,
                delta=float(cfg.get("delta", 1e-5)),
                rounds=rounds or chosen.rounds,
                runs=runs,
                learning_rate=float(cfg.get("learning-rate", 0.5)),
                batch_size=int(cfg.get("batch-size", 256)),
                local_epochs=int(cfg.get("local-epochs", 1)),
                clip_norm=float(cfg.get("clip-norm", 1.0)),
                seed=seed,
                scenario=scenario,
                on_run=lambda: bar.update(advance=1),
            )
        sigma = result.noise_multiplier
        claimed = "inf" if math.isinf(eps) else f"{eps:g}"
        typer.echo(
            f"{scenario} node {node}: claimed ε {claimed}, "
            f"empirical lower bound {result.epsilon_lower_bound:.3f} ({result.correct}/"
            f"{result.guesses} correct); positive control (σ=0) "
            f"{result.positive_control_epsilon_lower_bound:.3f} "
            f"({result.positive_control_correct}/{result.positive_control_guesses}); "
            f"result {result.result}"
        )
        typer.echo(
            f"  {result.canaries} canaries ({result.canaries_in} in) over {result.runs} runs of "
            f"{result.rounds} rounds; σ {'none' if sigma is None else f'{sigma:.3f}'}, "
            f"q {result.sample_rate:.4f}, {result.steps_per_round} steps/round, "
            f"{result.wall_seconds:.0f}s"
        )
        if as_json is not None:
            out = {**result.to_dict(), "mechanism": "dp-sgd"}
            as_json.write_text(json.dumps(out, indent=1, allow_nan=False))
            typer.echo(f"wrote {as_json}")
        if result.result == "fail":
            raise typer.Exit(code=1)


def _audit_evidence(
    scenario: str, chosen: Any, *, eps: float, node: int, seed: int, catalog: str,
    canaries: int, as_json: Path | None,
) -> None:
    """``--mechanism evidence``: canary users on untouched pairs of the node's release."""
    from simulations.evidence_canaries import node_click_log, run_evidence_canary_audit

    cfg = chosen.run_config
    data, log = node_click_log(scenario, node=node, catalog_dir=catalog)
    try:
        result = run_evidence_canary_audit(
            data=data, log=log, epsilon=eps, delta=float(cfg.get("delta", 1e-5)),
            evidence_share=float(cfg.get("evidence-share", 0.75)),
            clip_norm=float(cfg.get("evidence-clip", 3.0)),
            max_sessions_per_user=int(cfg.get("max-sessions-per-user", 2)),
            canaries=canaries, seed=seed, scenario=scenario,
        )
    except ValueError as exc:
        typer.echo(f"error: {exc.args[0]}", err=True)
        raise typer.Exit(2) from None
    claimed = "inf" if math.isinf(result.claimed_epsilon) else f"{result.claimed_epsilon:g}"
    typer.echo(
        f"{scenario} node {node} evidence release: claimed ε {claimed} "
        f"(evidence-share {result.evidence_share:g} of ε), empirical lower bound "
        f"{result.epsilon_lower_bound:.3f} ({result.correct}/{result.guesses} correct); "
        f"positive control (σ=0) {result.positive_control_epsilon_lower_bound:.3f} "
        f"({result.positive_control_correct}/{result.positive_control_guesses}); "
        f"result {result.result}"
    )
    typer.echo(
        f"  {result.canaries} canaries ({result.canaries_in} in) on {result.untouched_pairs} "
        f"untouched of {result.index_pairs} pairs; σ {result.noise_multiplier:.3f}, "
        f"C {result.clip_norm:g}, {result.wall_seconds:.1f}s"
    )
    if as_json is not None:
        as_json.write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False))
        typer.echo(f"wrote {as_json}")
    if result.result == "fail":
        raise typer.Exit(code=1)
