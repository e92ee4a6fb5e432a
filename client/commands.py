"""CLI commands for the Deployment Engine, node side: ``node start``."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:  # noqa: ARG001
    """Attach the ``node`` group to the `fedrank` app."""
    node_app = typer.Typer(no_args_is_help=True, help="Run a regional node (SuperNode).")
    app.add_typer(node_app, name="node")

    @node_app.command("start")
    def node_start(
        region: str = typer.Option(..., "--region", help="Node name (its ledger file name)."),
        data: Path = typer.Option(..., "--data", help="Click log: a .parquet file or folder."),
        superlink: str = typer.Option(..., "--superlink", help="SuperLink HOST:PORT."),
        key: Path | None = typer.Option(None, "--key", help="Node auth private key (OpenSSH)."),
        ca: Path | None = typer.Option(None, "--ca", help="CA certificate (TLS root)."),
        state_dir: Path | None = typer.Option(
            None, "--state-dir", help="Accountant, plan, ledger (default node-state/REGION)."
        ),
        port: int = typer.Option(9410, "--port", help="SuperNode's local runtime API port."),
        catalog_dir: Path | None = typer.Option(None, "--catalog-dir", help="Judged catalog."),
        insecure: bool = typer.Option(False, "--insecure", help="No TLS (refused by a TLS "
                                      "SuperLink; for tests)."),
    ) -> None:
        """Start a SuperNode for REGION; Ctrl-C / SIGTERM stops it and its ClientApps."""
        from client.deploy import NodeLaunch, run_node

        if not insecure and ca is None:
            typer.echo("error: --ca is required (or --insecure)", err=True)
            raise typer.Exit(2)
        launch = NodeLaunch(
            region=region, data=data, superlink=superlink, key=key, ca=ca,
            state_dir=state_dir or Path("node-state") / region, port=port,
            catalog_dir=catalog_dir, insecure=insecure,
        )
        raise typer.Exit(run_node(launch, echo=typer.echo))
