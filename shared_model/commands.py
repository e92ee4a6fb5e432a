"""CLI commands that drive `shared_model`: data import, baselines, scoring."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Attach this package's commands to the `fedrank` app."""
    data_app = typer.Typer(no_args_is_help=True, help="Import and inspect judged-search data.")
    app.add_typer(data_app, name="data")
