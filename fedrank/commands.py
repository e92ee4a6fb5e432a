"""CLI commands of the `fedrank` package itself: ``fedrank dashboard``."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Attach ``fedrank dashboard``."""
    del bench_app

    @app.command("dashboard")
    def dashboard(
        run_dir: Path = typer.Argument(..., help="Run directory to watch (may still be running)."),
        host: str = typer.Option(
            "127.0.0.1", "--host",
            help="Address to bind. Anything but loopback requires a token on every request."),
        port: int = typer.Option(8050, "--port", help="Port (0 = any free port)."),
        token: str | None = typer.Option(
            None, "--token", envvar="FEDRANK_DASHBOARD_TOKEN",
            help="Access token (required on every request when given; one is generated when "
                 "--host is not loopback)."),
        refresh: float = typer.Option(2.0, "--refresh", help="Seconds between page updates."),
        release_key: Path | None = typer.Option(
            None, "--release-key",
            help="Server public key to check release signatures with (default: the run's "
                 "RUN_DIR.keys/server-signing.pub or $FEDRANK_KEY_DIR)."),
    ) -> None:
        """A read-only live page over a run directory: rounds, quality, ε per node, releases."""
        from fedrank.dashboard import dashboard_url, is_loopback, make_server

        if not run_dir.is_dir():
            typer.echo(f"error: run directory not found: {run_dir}", err=True)
            raise typer.Exit(2)
        try:
            server, sock, used_token = make_server(
                run_dir, host=host, port=port, token=token, refresh_seconds=refresh,
                release_key=release_key,
            )
        except OSError as exc:
            typer.echo(f"error: cannot listen on {host}:{port}: {exc}", err=True)
            raise typer.Exit(2) from None
        bound_port = sock.getsockname()[1]
        url = dashboard_url(host, bound_port, used_token)
        typer.echo(f"[fedrank] dashboard for {run_dir}: {url}")
        if not is_loopback(host):
            typer.echo("[fedrank] bound beyond loopback: every request needs the token above "
                       "(plain HTTP: put TLS in front of it on an untrusted network)")
        typer.echo("[fedrank] Ctrl-C to stop")
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
