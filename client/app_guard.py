"""A node's SuperExec that launches only the Flower app (FAB) the node pinned.

flwr 1.42's ``--trusted-entities`` only accepts FABs signed by Flower Hub (a local ``flwr
run .`` FAB has no verification record, so a node with trusted entities refuses it), and
the SuperNode otherwise runs whatever app the SuperLink hands it. ``fedrank node start``
therefore runs ``flower-supernode --isolation process`` and, next to it, this SuperExec:
Flower's own (``flwr.supercore.superexec``) with one change: it launches ClientApps through
Flower's own ClientApp runner (``flwr-clientapp``) with ``install_from_fab`` wrapped, so the
sha256 of the FAB's *content* is checked against the node's pinned hashes before the FAB is
unpacked or any of its code imported. A FAB that is not pinned is refused: the runner answers
the server with an error reply (``PermissionError: node runs only its pinned fedrank app``)
and no code from that FAB runs on the node. Other task types are not launched at all.

The hash of a fedrank checkout is what :func:`app_hash` computes (Flower's deterministic
FAB build of the project folder): the node operator pins the hash of the fedrank release
they reviewed (``fedrank node start --app-hash``; default: the node's own checkout).

Run as ``python -m client.app_guard --trusted-app-hash H [...] -- <flower-superexec args>``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("fedrank.node")
_HASH = re.compile(r"[0-9a-f]{64}")


def app_hash(project_root: Path) -> str:
    """sha256 of the FAB that ``flwr run PROJECT_ROOT`` submits (Flower's build is
    deterministic: fixed timestamps, sorted files)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(project_root))).hexdigest()


def check_hashes(hashes: Iterable[str]) -> frozenset[str]:
    out = frozenset(h.strip().lower() for h in hashes)
    bad = sorted(h for h in out if not _HASH.fullmatch(h))
    if bad or not out:
        raise ValueError(f"app hashes must be sha256 hex digests, got {bad or 'none'}")
    return out


def pinned_plugin(trusted: frozenset[str]) -> type[Any]:
    """Flower's SuperExec plugin, launching ClientApps through the guarded runner only."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.plugin import AutoExecPlugin

    class PinnedAppExecPlugin(AutoExecPlugin):  # type: ignore[misc]
        trusted_hashes = trusted

        def launch_task(self, token: str, task: Any) -> Any:
            if task.type != TaskType.CLIENT_APP:
                return LaunchResult.failed(f"a fedrank node runs ClientApps only, not {task.type}")
            cmd = [sys.executable, "-m", "client.app_guard", "clientapp"]
            for digest in sorted(self.trusted_hashes):
                cmd += ["--trusted-app-hash", digest]
            cmd += ["--", TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[TaskType.CLIENT_APP],
                    self.runtime_api_address, "--token", token]
            if self.insecure:
                cmd.append("--insecure")
            elif self.root_certificates_path is not None:
                cmd += ["--root-certificates", self.root_certificates_path]
            cmd += ["--parent-pid", str(os.getpid())]
            subprocess.Popen(cmd)  # noqa: S603 - our own interpreter and module
            return LaunchResult.accepted()

    return PinnedAppExecPlugin


def guarded_install(trusted: frozenset[str], install: Callable[..., Any]) -> Callable[..., Any]:
    """``install_from_fab`` that first checks the FAB's content hash against ``trusted``."""

    def install_pinned(fab_content: bytes, *args: Any, **kwargs: Any) -> Any:
        digest = hashlib.sha256(fab_content).hexdigest()
        if digest not in trusted:
            print(f"[fedrank] refused app {digest}: not the app this node pinned",
                  file=sys.stderr, flush=True)
            raise PermissionError(
                f"node runs only its pinned fedrank app; refused app {digest[:16]}"
            )
        return install(fab_content, *args, **kwargs)

    return install_pinned


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = "superexec"
    if argv and argv[0] in ("superexec", "clientapp"):
        mode, argv = argv[0], argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    own, rest = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m client.app_guard")
    parser.add_argument("--trusted-app-hash", action="append", default=[], required=True)
    args = parser.parse_args(own)
    try:
        trusted = check_hashes(args.trusted_app_hash)
    except ValueError as exc:
        parser.error(str(exc))
    if mode == "clientapp":
        # Flower's ClientApp runner, with the FAB's content hash checked before the FAB is
        # installed or any of its code imported; a refusal becomes an error reply.
        import flwr.supernode.runtime.run_clientapp as run_clientapp
        from flwr.supernode.cli import flwr_clientapp

        if not hasattr(run_clientapp, "install_from_fab"):
            raise SystemExit("flwr's ClientApp runner changed: cannot pin the app; refusing")
        setattr(run_clientapp, "install_from_fab",  # noqa: B010
                guarded_install(trusted, run_clientapp.install_from_fab))
        sys.argv = ["flwr-clientapp", *rest]
        flwr_clientapp()
        return
    import flwr.supercore.superexec.run_superexec as run_superexec
    from flwr.supercore.cli.flower_superexec import flower_superexec

    # The one hook: run_superexec() instantiates this name for its plugin (flwr 1.42).
    if not hasattr(run_superexec, "AutoExecPlugin"):
        raise SystemExit("flwr's SuperExec changed: cannot pin the app; refusing to start")
    setattr(run_superexec, "AutoExecPlugin", pinned_plugin(trusted))  # noqa: B010
    print(f"[fedrank] app guard: runs only app(s) {', '.join(sorted(trusted))}",
          file=sys.stderr, flush=True)
    sys.argv = ["flower-superexec", *rest]
    flower_superexec()


if __name__ == "__main__":
    main()
