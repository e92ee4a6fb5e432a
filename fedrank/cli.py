"""The one `fedrank` entry point: it only gathers the subcommands each package defines.

Each package keeps its commands in its own ``commands.py``; this file wires them together.
"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="fedrank: federated, private ranking for e-commerce.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (JSON on stdout).")
app.add_typer(bench_app, name="bench")


def _register() -> None:
    # Imported here so `fedrank --help` shows every command while each module stays separate.
    from privacy import commands as privacy_commands
    from shared_model import commands as shared_model_commands
    from shared_model import personal_commands, release_commands
    from simulations import canary_commands
    from simulations import commands as simulations_commands

    shared_model_commands.register(app, bench_app)
    release_commands.register(app, bench_app)
    personal_commands.register(app, bench_app)  # issue 14: recommend, bench personal
    privacy_commands.register(app, bench_app)
    canary_commands.register(app, bench_app)  # `audit canaries`: needs the audit group
    simulations_commands.register(app, bench_app)
    from simulations import personal_commands as simulations_personal

    simulations_personal.register(app, bench_app)  # issue 14: recommend-eval
    # Deployment Engine: `certs`, `server` (server/commands.py), `node` (client/commands.py).
    from client import commands as client_commands
    from server import commands as server_commands

    server_commands.register(app, bench_app)
    client_commands.register(app, bench_app)
    from fedrank import commands as fedrank_commands  # `dashboard`

    fedrank_commands.register(app, bench_app)


def main() -> None:
    """Console-script entry point."""
    _register()
    app()


if __name__ == "__main__":
    main()
