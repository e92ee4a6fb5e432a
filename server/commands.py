"""CLI commands for the Deployment Engine, server side: ``certs init``, ``server start``."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:  # noqa: ARG001
    """Attach the ``certs`` and ``server`` groups to the `fedrank` app."""
    certs_app = typer.Typer(
        no_args_is_help=True, help="Development TLS certificates and node keys."
    )
    server_app = typer.Typer(no_args_is_help=True, help="Run a SuperLink (Deployment Engine).")
    app.add_typer(certs_app, name="certs")
    app.add_typer(server_app, name="server")

    @certs_app.command("init")
    def certs_init(
        directory: Path = typer.Argument(..., help="Folder to write the certificates into."),
        san: list[str] = typer.Option(
            ["127.0.0.1", "localhost"], "--san", help="Server name/IP (repeat)."
        ),
        nodes: int = typer.Option(3, "--nodes", help="Node key pairs to create."),
        ca_key: Path | None = typer.Option(
            None, "--ca-key",
            help="Where the CA private key is written/read (default DIR/ca.key). Point it at "
                 "offline media: it is only needed to issue a new server certificate."),
    ) -> None:
        """A development CA, a server certificate and per-node ECDSA P-384 keys."""
        from server.deploy import init_certs
        from shared_model.release import KeyPermissionError

        try:
            bundle = init_certs(directory, sans=san, nodes=nodes, ca_key_path=ca_key)
        except (KeyPermissionError, FileNotFoundError, FileExistsError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"CA certificate      {bundle.ca_cert}   (give to every node: --ca)")
        if bundle.ca_key is not None:
            typer.echo(f"CA key              {bundle.ca_key}   (keep offline; only needed to "
                       "issue a new server certificate)")
        kept = " (kept: existing certificate)" if bundle.kept_server_cert else ""
        typer.echo(f"server certificate  {bundle.server_cert}  SANs: {', '.join(bundle.sans)}"
                   f"{kept}")
        if bundle.missing_sans:
            typer.echo(f"warning: the existing server certificate does not carry "
                       f"{', '.join(bundle.missing_sans)}; delete {bundle.server_cert} and "
                       f"{bundle.server_key} and re-run to issue one that does", err=True)
        typer.echo(f"server key          {bundle.server_key}")
        for name, (private, public) in bundle.node_keys.items():
            typer.echo(f"{name:<19} {private} (node: --key)  {public} (register on the server)")
        typer.echo("")
        typer.echo("Register these public keys on the SuperLink ([nodes] public_keys in the "
                   "server config, or `flwr supernode register KEY.pub CONNECTION`):")
        for name in bundle.node_keys:
            typer.echo(f"  {bundle.public_key_line(name)}")

    @server_app.command("start")
    def server_start(
        config: Path = typer.Option(..., "--config", help="Server TOML (see docs/operators.md)."),
        timeout: float | None = typer.Option(None, "--timeout", help="Give up after N seconds."),
    ) -> None:
        """Start the SuperLink (TLS + node auth), register node keys, run the ServerApp."""
        from server.deploy import ServerConfig, serve

        try:
            cfg = ServerConfig.load(config)
            cfg.check()
        except (OSError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        from fedrank.dashboard import url_hint

        hint = [url_hint(cfg.run_dir)]

        def echo(line: str) -> None:
            # `nodes connect to HOST:PORT` stays the first line; the dashboard hint follows it.
            typer.echo(line)
            while hint:
                typer.echo(hint.pop())

        rc = serve(cfg, echo=echo, timeout=timeout)
        raise typer.Exit(rc)
