"""CLI commands of the privacy package: ``fedrank audit``.

``fedrank audit RUN_DIR``
    Write ``RUN_DIR/audit.html`` and ``RUN_DIR/audit.json`` (same as ``fedrank audit report``).
``fedrank audit verify RUN_DIR [--trusted-keys DIR] [--allow-unsigned] [--plans DIR]``
    Re-walk the ledgers' hash chains, check every line's signature (against the writers' keys
    pinned in DIR, ``<writer>.pub``, else the keys published in ``RUN_DIR/ledger/keys``),
    cross-check every line against ``config.json`` and the node's privacy plan, and recompute
    every claimed ε; print each problem as ``file:line: problem`` and a summary; exit 1 on any
    problem. Unsigned lines fail unless ``--allow-unsigned``.

``audit`` is a group whose first token is either a subcommand name or a run directory. Click
cannot express that with a group callback taking an optional RUN_DIR argument (the group binds
the first token, so ``audit verify RUN_DIR`` would treat ``verify`` as the run directory and fail
with "No such command 'RUN_DIR'"), so :class:`AuditGroup` resolves a first token that is not a
subcommand to the ``report`` subcommand instead. Subcommand names win: a run directory literally
named like a subcommand is reported with ``fedrank audit report DIR``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperGroup

__all__ = ["AuditGroup", "audit_app_of", "register"]

DEFAULT_SUBCOMMAND = "report"


class AuditGroup(TyperGroup):
    """A typer group where ``audit RUN_DIR`` means ``audit report RUN_DIR``."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            default = self.commands.get(DEFAULT_SUBCOMMAND)
            if default is not None:
                return DEFAULT_SUBCOMMAND, default, list(args)
        return super().resolve_command(ctx, args)


def _run_dir_or_exit(run_dir: Path) -> Path:
    if not run_dir.is_dir():
        typer.echo(
            f"error: run directory not found: {run_dir} "
            "(usage: fedrank audit RUN_DIR | fedrank audit verify RUN_DIR)",
            err=True,
        )
        raise typer.Exit(code=2)
    return run_dir


def _fmt_eps(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def audit_app_of(app: typer.Typer) -> typer.Typer:
    """The ``audit`` group :func:`register` attached to ``app``.

    Other packages add their audit subcommands to it (``fedrank audit canaries`` lives in
    ``simulations``: it trains, and ``privacy`` never imports ``simulations``).
    """
    for group in app.registered_groups:
        if group.name == "audit" and group.typer_instance is not None:
            return group.typer_instance
    raise LookupError("the `audit` group is not registered yet (call privacy.commands.register)")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Attach ``fedrank audit`` (``audit RUN_DIR``, ``audit report``, ``audit verify``)."""
    del bench_app  # no benchmarks here
    audit_app = typer.Typer(
        cls=AuditGroup,
        no_args_is_help=True,
        help=(
            "Privacy audit of a run. `fedrank audit RUN_DIR` writes RUN_DIR/audit.html and "
            "RUN_DIR/audit.json; `fedrank audit verify RUN_DIR` checks the ledgers."
        ),
    )
    app.add_typer(audit_app, name="audit")

    trusted_keys_option = typer.Option(
        None,
        "--trusted-keys",
        help="Folder of pinned writer keys (<writer>.pub, PEM) to check signatures against "
        "(default: the keys published in RUN_DIR/ledger/keys, which are not pinned).",
    )
    allow_unsigned_option = typer.Option(
        False, "--allow-unsigned", help="Do not fail unsigned ledger lines (legacy runs)."
    )
    plans_option = typer.Option(
        None,
        "--plans",
        help="Folder holding each node's <node>/privacy_plan.json (default: RUN_DIR/nodes; "
        "deployment: a copy of the nodes' state folders).",
    )

    @audit_app.command(DEFAULT_SUBCOMMAND)
    def audit_report(
        run_dir: Path = typer.Argument(..., help="Run directory (config.json, ledger/, ...)."),
        strict: bool = typer.Option(
            False, "--strict", help="Exit 1 if the verification fails (files are still written)."
        ),
        trusted_keys: Path | None = trusted_keys_option,
        allow_unsigned: bool = allow_unsigned_option,
        plans: Path | None = plans_option,
    ) -> None:
        """Write RUN_DIR/audit.html and RUN_DIR/audit.json (also: `fedrank audit RUN_DIR`)."""
        from privacy.audit import write_audit
        from privacy.verify import verify_run

        run_dir = _run_dir_or_exit(run_dir)
        report = verify_run(
            run_dir,
            trusted_keys=trusted_keys,
            require_signatures=not allow_unsigned,
            plans_dir=plans,
        )
        html_path, json_path = write_audit(run_dir, report=report)
        typer.echo(f"wrote {html_path}")
        typer.echo(f"wrote {json_path}")
        typer.echo(f"verify: {report.summary()}")
        for problem in report.problems:
            typer.echo(f"  {problem}")
        if strict and not report.ok:
            raise typer.Exit(code=1)

    @audit_app.command("verify")
    def audit_verify(
        run_dir: Path = typer.Argument(..., help="Run directory (config.json, ledger/, ...)."),
        as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
        pld: bool = typer.Option(
            True, "--pld/--no-pld", help="Also compute each node's PLD ε (reference only)."
        ),
        trusted_keys: Path | None = trusted_keys_option,
        allow_unsigned: bool = allow_unsigned_option,
        plans: Path | None = plans_option,
    ) -> None:
        """Check chains, signatures, config/plan consistency and every ε; exit 1 on failure."""
        from privacy.verify import verify_run

        run_dir = _run_dir_or_exit(run_dir)
        if trusted_keys is not None and not trusted_keys.is_dir():
            typer.echo(f"error: --trusted-keys folder not found: {trusted_keys}", err=True)
            raise typer.Exit(code=2)
        report = verify_run(
            run_dir,
            pld_reference=pld,
            trusted_keys=trusted_keys,
            require_signatures=not allow_unsigned,
            plans_dir=plans,
        )
        if as_json:
            typer.echo(json.dumps(report.to_dict(), indent=1, allow_nan=False))
        else:
            finals: dict[str, Any] = {}
            for row in report.rows:
                if row.recomputed_epsilon is not None:
                    finals[row.node] = row
            for node, row in sorted(finals.items()):
                reference = report.reference_epsilon.get(node)
                typer.echo(
                    f"{node}: ε claimed {_fmt_eps(row.claimed_epsilon)}, recomputed "
                    f"{_fmt_eps(row.recomputed_epsilon)} ({row.method})"
                    + (f", PLD reference {_fmt_eps(reference)}" if reference is not None else "")
                )
            for problem in report.problems:
                typer.echo(str(problem))
            for note in report.notes:
                typer.echo(f"note: {note}")
            typer.echo(report.summary())
        if not report.ok:
            raise typer.Exit(code=1)
