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
        ledger_dir: Path | None = typer.Option(
            None, "--ledger-dir", help="Privacy ledger folder (default STATE/ledger)."),
        cache_dir: Path | None = typer.Option(
            None, "--cache-dir", help="Embedding cache folder (node's own)."),
        release_dir: Path | None = typer.Option(
            None, "--release-dir",
            help="Optional: a folder the node also installs signed releases from (a copy of "
                 "the server's RUN_DIR/releases); releases arrive over Flower without it."),
        release_key: Path | None = typer.Option(
            None, "--release-key",
            help="The server's release public key (server-signing.pub), pinned at set-up: "
                 "the node installs only releases it verifies (none without it)."),
        epsilon_budget: float | None = typer.Option(
            None, "--epsilon-budget", help="Node's own ε budget (the run's is capped to it)."),
        delta: float | None = typer.Option(None, "--delta", help="Largest δ the node accepts."),
        clip_norm: float | None = typer.Option(
            None, "--clip-norm", help="Largest DP-SGD clip norm the node accepts."),
        max_sessions_per_user: int | None = typer.Option(
            None, "--max-sessions-per-user", help="Most sessions per user the node accepts."),
        privacy_shape: str | None = typer.Option(
            None, "--privacy-shape", help="The only privacy shape the node accepts "
                                          "(regional|device)."),
        app_hash: list[str] = typer.Option(
            [], "--app-hash",
            help="sha256 of the fedrank app (FAB) this node runs (repeat; default: this "
                 "checkout's, as `fedrank server start` prints it)."),
        no_pin_app: bool = typer.Option(
            False, "--no-pin-app", help="Run any app the SuperLink sends (unsafe; tests)."),
        insecure: bool = typer.Option(False, "--insecure", help="No TLS (refused by a TLS "
                                      "SuperLink; for tests)."),
    ) -> None:
        """Start a SuperNode for REGION; Ctrl-C / SIGTERM stops it and its ClientApps."""
        from client.app_guard import check_hashes
        from client.deploy import NodeLaunch, run_node

        if not insecure and ca is None:
            typer.echo("error: --ca is required (or --insecure)", err=True)
            raise typer.Exit(2)
        if release_dir is not None and release_key is None:
            typer.echo("error: --release-dir needs --release-key", err=True)
            raise typer.Exit(2)
        if privacy_shape is not None and privacy_shape not in ("regional", "device"):
            typer.echo("error: --privacy-shape must be regional or device", err=True)
            raise typer.Exit(2)
        try:
            hashes = tuple(sorted(check_hashes(app_hash))) if app_hash else None
        except ValueError as exc:
            typer.echo(f"error: --app-hash: {exc}", err=True)
            raise typer.Exit(2) from None
        launch = NodeLaunch(
            region=region, data=data, superlink=superlink, key=key, ca=ca,
            state_dir=state_dir or Path("node-state") / region, port=port,
            catalog_dir=catalog_dir, ledger_dir=ledger_dir, cache_dir=cache_dir,
            release_dir=release_dir, release_key=release_key, epsilon_budget=epsilon_budget,
            delta=delta, clip_norm=clip_norm, max_sessions_per_user=max_sessions_per_user,
            privacy_shape=privacy_shape, app_hashes=hashes, pin_app=not no_pin_app,
            insecure=insecure,
        )
        raise typer.Exit(run_node(launch, echo=typer.echo))
