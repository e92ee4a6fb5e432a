"""CLI for measuring recommendation: `fedrank recommend-eval RUN_DIR`."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Attach `recommend-eval` to ``app``."""

    @app.command("recommend-eval")
    def recommend_eval_cmd(
        run_dir: Path = typer.Argument(..., help="Run directory (config.json, the final model)."),
        users: int | None = typer.Option(
            None, "--users", help="Evaluate a seeded sample of this many users (default: all)."
        ),
        holdout: float = typer.Option(0.2, "--holdout", help="Share of later sessions held out."),
        as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
    ) -> None:
        """hit@10/ndcg@10 of "for you" lists on each user's held-out later sessions."""
        from simulations.personal import load_run_world, recommend_eval

        try:
            result = recommend_eval(load_run_world(run_dir), users=users, holdout=holdout)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        for name, value in result.items():
            typer.echo(f"{name:>28}  {value:.4f}" if isinstance(value, float)
                       else f"{name:>28}  {value}")
