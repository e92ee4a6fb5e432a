"""CLI commands that drive `simulations`: simulate, compare, drift, ab, bench train."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4f}"
    return str(value)


def _pct(value: float, ci: list[float]) -> str:
    return f"{value * 100:+.2f}% [{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]"


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Attach this package's commands to the `fedrank` app."""

    @app.command("attack")
    def attack(
        scenario: str = typer.Argument(..., help="Scenario name (regional or device shape)."),
        attack: str = typer.Option(..., "--attack", help="scale|signflip|lie|clickfraud"),
        strength: float = typer.Option(..., "--strength",
                                       help="x factor, lie's z, or the bots' user fraction"),
        defence: str = typer.Option("on", "--defence", help="on|off"),
        epsilon: str = typer.Option("1", "--epsilon", help="Per-node ε, or 'inf'."),
        rounds: int | None = typer.Option(None, "--rounds",
                                          help="Server rounds (default: the scenario's)."),
        root: Path = typer.Option(Path("runs/attack"), "--runs",
                                  help="Folder for the runs (finished runs are reused)."),
        as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
        attacker: str | None = typer.Option(
            None, "--attacker",
            help="Device scenarios: compliant (poisons before the stock clip) or bypass "
                 "(scales its clipped update; default)."),
        fraction: float = typer.Option(
            0.1, "--fraction", help="Device scenarios: share of devices that attack (seeded)."),
    ) -> None:
        """Measure an attack (issue 11). scale|signflip|lie: two Simulation Engine runs (no
        attack, and node 0 of the scenario poisoning every train reply), the same defence
        (on: the default robust rule `robust-aggregation` + the server's update clip; off:
        the plain mean + the clip). clickfraud: bots among one region's users, Flower-free
        evidence pipeline (simulations.clickfraud); defence on = the evidence fraud bounds (the
        node's per-pair click cap and the server's rate clamp).
        Device scenarios (scale|signflip): a seeded 10% of devices poison their update
        (--attacker); defence on = the server's aggregate clip (server.device.AggregateClip),
        off = the devices' clip and the noise only."""
        import json as _json

        from simulations.runner import parse_epsilon
        from simulations.scenarios import get_scenario

        try:
            chosen = get_scenario(scenario)
            eps = parse_epsilon(epsilon)
            if defence not in ("on", "off"):
                raise ValueError("--defence is on or off")
            if attack not in ("scale", "signflip", "lie", "clickfraud"):
                raise ValueError(f"unknown attack {attack!r}")
            if attack == "clickfraud" and not 0 < strength < 1:
                raise ValueError("clickfraud --strength is the bots' fraction, in (0, 1)")
            if attack != "clickfraud" and not (math.isfinite(strength) and strength > 0):
                raise ValueError(f"--strength must be finite and > 0, got {strength!r}")
            device = chosen.partition == "device"
            if device and attack not in ("scale", "signflip"):
                raise ValueError(f"--attack {attack} needs a regional scenario; a device "
                                 "scenario takes scale or signflip")
            if not device and attacker is not None:
                raise ValueError(f"--attacker is for device scenarios; {scenario!r} is "
                                 "regional")
            if attacker not in (None, "compliant", "bypass"):
                raise ValueError(f"--attacker must be compliant or bypass, got {attacker!r}")
            if device and not 0 < fraction <= 1:
                raise ValueError(f"--fraction must be in (0, 1], got {fraction!r}")
        except (KeyError, ValueError) as exc:
            typer.echo(f"error: {exc.args[0]}", err=True)
            raise typer.Exit(2) from None
        if attack == "clickfraud":
            from shared_model.settings import RunSettings
            from simulations.clickfraud import run as clickfraud_run

            on = defence == "on"  # the node's per-pair click cap + the server's rate clamp
            result = clickfraud_run(fraction=strength, epsilon=eps,
                                    users=chosen.world.num_users, evaluate_seen=True,
                                    defence=on, clamp_mode="median",
                                    clamp=RunSettings.evidence_rate_clamp if on else None)
            out = {"attack": attack, "defence": defence, "no_attack": result["no_attack"],
                   "attacked": result["attacked"],
                   "target_rank_before": result["target_rank_before"],
                   "target_rank_after": result["target_rank_after"]}
        elif device:
            from simulations.attacks import federated_device

            try:
                out = federated_device(
                    scenario, attack=attack, strength=strength, attacker=attacker or "bypass",
                    defence=defence == "on", epsilon=eps, rounds=rounds, root=root,
                    fraction=fraction, echo=(lambda line: typer.echo(line, err=True)))
            except RuntimeError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from None
        else:
            from simulations.attacks import federated

            try:
                out = federated(scenario, attack=attack, strength=strength,
                                defence=defence == "on", epsilon=eps, rounds=rounds, root=root,
                                echo=(lambda line: typer.echo(line, err=True)))
            except RuntimeError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from None
        if as_json:
            typer.echo(_json.dumps(out))
            return
        typer.echo(f"{attack} {strength:g} at ε {epsilon}, defence {out['defence']}: seen "
                   f"{out['no_attack']['seen']:.4f} -> {out['attacked']['seen']:.4f}, unseen "
                   f"{out['no_attack']['unseen']:.4f} -> {out['attacked']['unseen']:.4f}"
                   + (f"; target rank {out['target_rank_before']} -> "
                      f"{out['target_rank_after']}" if out["target_rank_before"] else ""))

    @app.command("simulate")
    def simulate(
        scenario: str | None = typer.Argument(
            None, help="Scenario name (regional-5, device-500, ...); or --scenario-file."
        ),
        rounds: int | None = typer.Option(None, "--rounds", help="Server rounds."),
        epsilon: str = typer.Option("1", "--epsilon", help="Per-node ε budget, or 'inf'."),
        run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory."),
        eval_fold: str = typer.Option(
            "0", "--eval-fold", help="Held-out query fold, or 'all' (one run per fold)."
        ),
        strategy: str | None = typer.Option(None, "--strategy", help="fedavg or fedadam."),
        dropout: float = typer.Option(
            0.0, "--dropout", min=0.0, max=0.99,
            help="Device shape: each sampled device vanishes mid-round (after receiving the "
                 "model) with this probability; SecAgg+ recovers."),
        data: Path | None = typer.Option(
            None, "--data", help="Judged-search directory (fedrank data import); default WANDS."
        ),
        scenario_file: Path | None = typer.Option(
            None, "--scenario-file", help="Scenario TOML (simulations/scenario_file.py)."
        ),
    ) -> None:
        """Run a scenario on Flower's Simulation Engine and print the final table."""
        from shared_model.data import catalog_run_config
        from simulations.runner import parse_epsilon, run_folds
        from simulations.scenario_file import load_scenario_file
        from simulations.scenarios import get_scenario

        try:
            if (scenario is None) == (scenario_file is None):
                raise ValueError("give a scenario name or --scenario-file FILE (not both)")
            if scenario_file is not None:
                chosen, file_data = load_scenario_file(scenario_file)
            else:
                chosen, file_data = get_scenario(str(scenario)), None
            eps = parse_epsilon(epsilon)
            folds = None if eval_fold == "all" else [int(eval_fold)]
            overrides: dict[str, Any] = catalog_run_config(data or file_data)
        except (KeyError, ValueError) as exc:
            typer.echo(f"error: {exc.args[0]}", err=True)
            raise typer.Exit(2) from None
        target = run_dir or Path("runs") / f"{chosen.name}-eps{epsilon}"
        if strategy:
            overrides["strategy"] = strategy
        from fedrank.dashboard import url_hint

        typer.echo(url_hint(target))
        from fedrank.progress import progress, round_echo

        per_fold = rounds or chosen.rounds
        fold_count = len(folds) if folds is not None else int(
            chosen.run_config.get("num-folds", 5))
        try:
            with progress(per_fold * fold_count, "rounds") as bar:
                summary = run_folds(
                    chosen, run_dir=target, rounds=rounds or chosen.rounds, epsilon=eps,
                    folds=folds, overrides=overrides, echo=round_echo(bar, per_fold),
                    dropout=dropout,
                )
        except KeyboardInterrupt:
            typer.echo("[fedrank] interrupted; Flower processes stopped", err=True)
            raise typer.Exit(130) from None
        except RuntimeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo("")
        typer.echo(
            f"{'run':<30} {'rounds':>6} {'seen':>7} {'zs-seen':>7} {'unseen':>7} "
            f"{'zs-unseen':>9} {'mrr':>7} {'auc':>7} {'eps':>8}"
        )
        for name, final in summary["rows"]:
            seen = final.get("seen", {}).get("ndcg@10")
            zs = final.get("zero_shot", {})
            typer.echo(
                f"{name:<30} {final['round']:>6} {_fmt(seen if seen is not None else '-'):>7} "
                f"{_fmt(zs.get('seen', '-')):>7} {final['ndcg@10']:>7.4f} "
                f"{_fmt(zs.get('unseen', '-')):>9} "
                f"{final['mrr']:>7.4f} {final['auc']:>7.4f} {_fmt(final['epsilon_max']):>8}"
            )
        typer.echo("NDCG@10 on seen (the fold's training queries) and unseen (held-out) "
                   "queries; zs = zero-shot MiniLM on the same queries")
        typer.echo(f"wall time {summary['wall_seconds']:.0f}s; run directory {target}")

    @app.command("compare")
    def compare(
        run_dirs: list[Path] = typer.Argument(..., help="Run directories."),
        as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
        baseline: Path | None = typer.Option(
            None, "--baseline", help="JSON from `fedrank baseline --json` (else computed)."
        ),
        plot: Path = typer.Option(Path("runs/compare.png"), "--plot", help="PNG to write."),
        privacy_plot: Path | None = typer.Option(
            None, "--privacy-plot",
            help="PNG of NDCG@10 against ε, seen and unseen (default: PLOT-privacy.png).",
        ),
    ) -> None:
        """NDCG@10/MRR/AUC/ε per run beside the baselines, a plot of NDCG@10 per round, and
        the privacy–utility table (seen and unseen NDCG@10 by scenario and ε) with its plot."""
        from simulations.compare import compare_runs

        try:
            table = compare_runs(run_dirs, baseline_json=baseline, plot_path=plot,
                                 privacy_plot_path=privacy_plot)
        except (FileNotFoundError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        if as_json:
            typer.echo(json.dumps(table, indent=2))
            return
        typer.echo(
            f"{'model':<32} {'seen':>7} {'unseen':>7} {'mrr':>7} {'auc':>7} {'eps':>8} {'rel':>6}"
        )
        for row in table["rows"]:
            seen = row.get("seen", {}).get("ndcg@10", "-")
            typer.echo(
                f"{row['name']:<32} {_fmt(seen):>7} {row['ndcg@10']:>7.4f} {row['mrr']:>7.4f} "
                f"{row['auc']:>7.4f} {_fmt(row.get('epsilon', '-')):>8} "
                f"{_fmt(row.get('fraction_of_central', '-')):>6}"
            )
        typer.echo("NDCG@10 on seen (training) and unseen (held-out) queries; mrr/auc: unseen")
        typer.echo(f"plot: {table['plot']}")
        pu = table["privacy_utility"]
        typer.echo("privacy-utility (final NDCG@10; zero-shot MiniLM on the same queries):")
        typer.echo(f"{'scenario':<20} {'eps':>5} {'spent':>8} {'seen':>7} {'0-shot':>7} "
                   f"{'unseen':>7} {'0-shot':>7}")
        for r in pu["rows"]:
            typer.echo(
                f"{r['scenario']:<20} {_fmt(r['epsilon_budget']).replace('.0000', ''):>5} "
                f"{_fmt(r['epsilon']):>8} "
                f"{_fmt(r['seen'] if r['seen'] is not None else '-'):>7} "
                f"{_fmt(r['zero_shot_seen'] if r['zero_shot_seen'] is not None else '-'):>7} "
                f"{_fmt(r['unseen']):>7} "
                f"{_fmt(r['zero_shot_unseen'] if r['zero_shot_unseen'] is not None else '-'):>7}"
            )
        typer.echo(f"privacy plot: {pu['plot']}")

    @app.command("drift")
    def drift(
        run_dir: Path = typer.Option(..., "--run-dir", help="Run directory (new or resumed)."),
        rounds: int = typer.Option(12, "--rounds", help="Server rounds."),
        drift_round: int = typer.Option(6, "--drift-round", help="First round of new taste."),
        epsilon: str = typer.Option("1", "--epsilon", help="Per-node ε budget, or 'inf'."),
        as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
    ) -> None:
        """Online federation whose taste drifts at --drift-round: rounds to recover vs frozen."""
        from simulations.drift import DriftConfig, run_drift
        from simulations.runner import parse_epsilon

        try:
            config = DriftConfig(rounds=rounds, drift_round=drift_round)
            eps = parse_epsilon(epsilon)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        echo = (lambda line: typer.echo(line, err=True)) if as_json else typer.echo
        try:
            report = run_drift(
                run_dir=run_dir, config=config, epsilon=eps, echo=echo
            )
        except KeyboardInterrupt:
            typer.echo("[fedrank] interrupted; Flower processes stopped", err=True)
            raise typer.Exit(130) from None
        except (RuntimeError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        if as_json:
            typer.echo(json.dumps(report, indent=2))
            return
        rec = report["recovery_rounds"]
        typer.echo(
            f"pre-drift NDCG@10 {report['pre_drift_ndcg@10']:.4f} (target "
            f"{report['target_ndcg@10']:.4f}); frozen at round {drift_round - 1} on the new "
            f"taste {report['frozen_ndcg@10_new_truth']:.4f}; federated final "
            f"{report['final_ndcg@10_new_truth']:.4f}"
        )
        typer.echo(
            "recovery: " + (f"{rec} round(s) after the drift" if rec is not None
                            else f"not within {rounds} rounds")
            + f"; frozen model {'recovers' if report['frozen_recovers'] else 'never recovers'}"
        )
        typer.echo(f"report {run_dir / 'drift.json'}; plot {run_dir / 'drift.png'}")

    @app.command("ab")
    def ab(
        run_dir: Path = typer.Argument(..., help="Run directory with checkpoints/ or releases/."),
        users: int = typer.Option(20_000, "--users", help="Simulated users per experiment."),
        bootstrap: int = typer.Option(
            0, "--bootstrap", help="Bootstrap resamples for the intervals (0 = delta method)."
        ),
        out: Path | None = typer.Option(None, "--out", help="Folder for ab.json/ab.png."),
        as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
        personalized: bool = typer.Option(
            False, "--personalized", help="Also: personalized vs global, by user, seen queries."
        ),
    ) -> None:
        """Simulated online A/B (CTR): each round's model vs BM25, vs zero-shot MiniLM and vs
        the previous round, on unseen (held-out) and seen (training) queries."""
        from simulations.ab import run_ab

        try:
            result = run_ab(run_dir, users=users, resamples=bootstrap, out_dir=out)
            if personalized:  # issue 14 (simulations/personal.py)
                from simulations.personal import load_run_world, personalized_ab

                result.update(personalized_ab(load_run_world(run_dir)))
        except (FileNotFoundError, ValueError, KeyError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        for view in ("unseen", "seen"):
            if view not in result["final"]:
                continue
            typer.echo(f"{view} queries:")
            typer.echo(f"{'round':>5} {'ctr':>7} {'bm25':>7} {'0-shot':>7} "
                       f"{'lift vs bm25 (95% CI)':>28} {'lift vs zero-shot (95% CI)':>28} "
                       f"{'lift vs prev (95% CI)':>28}")
            for r in result["rounds"]:
                b, z, p = (r[view][c] for c in ("vs_bm25", "vs_zero_shot", "vs_previous"))
                typer.echo(
                    f"{r['round']:>5} {b['ctr_a']:>7.4f} {b['ctr_b']:>7.4f} {z['ctr_b']:>7.4f} "
                    f"{_pct(b['relative_lift'], b['relative_lift_ci']):>28} "
                    f"{_pct(z['relative_lift'], z['relative_lift_ci']):>28} "
                    f"{_pct(p['relative_lift'], p['relative_lift_ci']):>28}"
                )
        if personalized:
            typer.echo(f"personalized {result['ctr_personalized']:.4f} vs global "
                       f"{result['ctr_global']:.4f}: "
                       f"{_pct(result['personalized_lift'], result['personalized_lift_ci95'])}")
        typer.echo(f"json: {result['json']}; plot: {result['plot']}")

    @bench_app.command("deploy")
    def bench_deploy_cmd(
        as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
        rounds: int = typer.Option(3, "--rounds", help="Rounds per app."),
        port: int = typer.Option(9600, "--port", help="Gateway port (SuperLink +1, nodes +10..)."),
        keep: Path | None = typer.Option(None, "--keep", help="Keep the cluster's files here."),
    ) -> None:
        """Loopback cluster (TLS, node auth, 3 SuperNodes): fedrank's round vs a no-op app's."""
        import json as _json

        from simulations.bench_deploy import bench_deploy

        result = bench_deploy(rounds=rounds, port=port, root=keep,
                              echo=(lambda s: typer.echo(s, err=True)) if as_json else typer.echo)
        if as_json:
            typer.echo(_json.dumps(result))
        else:
            typer.echo(f"fedrank {result['fedrank_round_s']}s/round, floor "
                       f"{result['floor_round_s']}s/round: ratio {result['ratio']}")

    @bench_app.command("train")
    def bench_train_cmd(
        as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
        repeats: int = typer.Option(5, "--repeats"),
        users: int = typer.Option(2000, "--users"),
        data: Path | None = typer.Option(
            None, "--data", help="Judged-search directory (fedrank data import); default WANDS."
        ),
    ) -> None:
        """Examples/s of the node's DP step vs non-private vs Opacus' hooks mode."""
        from shared_model.data import catalog_run_config
        from simulations.bench import bench_train

        try:
            catalog = catalog_run_config(data).get("catalog-dir", "")
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        result = bench_train(users=users, repeats=repeats, catalog_dir=catalog)
        typer.echo(json.dumps(result, indent=None if as_json else 2))
