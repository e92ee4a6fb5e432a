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

**Pre-warmed ClientApp processes.** Flower 1.42 runs one ``flwr-clientapp`` process per
message (there is no long-lived ClientApp runner: each process serves one task token), and a
fresh interpreter spends seconds importing torch and Opacus before fedrank's code runs. The
guard therefore keeps one *warm* runner waiting: a process that has already imported the
heavy third-party libraries from the node's own environment (torch, Opacus, NumPy, PyArrow,
Flower's runner) but **no fedrank code**, and blocks on its stdin. When a task arrives the
guard writes the task's token to it, and it becomes that task's ``flwr-clientapp`` (FAB hash
checked, FAB installed, the FAB's own fedrank code imported and run, then it exits, as
before); when it has exited the guard starts the next warm runner (so its imports use the
idle time between messages rather than compete with the running task). Isolation is unchanged (one
process per message, nothing carried from one message to the next), and the code that runs
is still only the pinned FAB's. ``FEDRANK_CLIENTAPP_PREWARM=0`` turns it off (a cold
process per message, Flower's behaviour).

Run as ``python -m client.app_guard --trusted-app-hash H [...] -- <flower-superexec args>``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("fedrank.node")
_HASH = re.compile(r"[0-9a-f]{64}")
PREWARM_ENV = "FEDRANK_CLIENTAPP_PREWARM"
# Third-party modules a fedrank ClientApp needs, imported by a warm runner ahead of its task.
WARM_MODULES = ("numpy", "torch", "torch._dynamo", "torch.optim", "opacus", "pyarrow.parquet",
                "pyarrow.dataset", "scipy.stats", "flwr.supernode.runtime.run_clientapp",
                "flwr.supernode.cli", "flwr.client.mod", "flwr.clientapp")


def prewarm_enabled() -> bool:
    return os.environ.get(PREWARM_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


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
        warm: subprocess.Popen[bytes] | None = None

        def _command(self, mode: str, token: str | None) -> list[str]:
            cmd = [sys.executable, "-m", "client.app_guard", mode]
            for digest in sorted(self.trusted_hashes):
                cmd += ["--trusted-app-hash", digest]
            cmd += ["--", TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[TaskType.CLIENT_APP],
                    self.runtime_api_address]
            if token is not None:
                cmd += ["--token", token]
            if self.insecure:
                cmd.append("--insecure")
            elif self.root_certificates_path is not None:
                cmd += ["--root-certificates", self.root_certificates_path]
            return [*cmd, "--parent-pid", str(os.getpid())]

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.warm = None
            if prewarm_enabled():
                self._start_warm()  # ready before the first task arrives

        def _start_warm(self) -> None:
            self.warm = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                self._command("warm", None), stdin=subprocess.PIPE
            )

        def launch_task(self, token: str, task: Any) -> Any:
            if task.type != TaskType.CLIENT_APP:
                return LaunchResult.failed(f"a fedrank node runs ClientApps only, not {task.type}")
            if not prewarm_enabled():
                subprocess.Popen(self._command("clientapp", token))  # noqa: S603
                return LaunchResult.accepted()
            warm, self.warm = self.warm, None
            handed = False
            if warm is not None and warm.poll() is None and warm.stdin is not None:
                try:
                    warm.stdin.write(token.encode() + b"\n")
                    warm.stdin.close()
                    handed = True
                except OSError:
                    handed = False
            running = warm if handed else subprocess.Popen(  # noqa: S603
                self._command("clientapp", token))
            # The next message's runner starts once this one has finished, so its imports
            # use the idle time between messages instead of competing with this task.
            threading.Thread(target=self._warm_after, args=(running,), daemon=True).start()
            return LaunchResult.accepted()

        def _warm_after(self, running: subprocess.Popen[bytes]) -> None:
            running.wait()
            if self.warm is None:
                self._start_warm()

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
    if argv and argv[0] in ("superexec", "clientapp", "warm"):
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
    if mode == "warm":
        # Import the heavy third-party libraries, then wait for a task token on stdin (EOF:
        # the guard went away or no task came; exit quietly).
        import importlib

        for name in WARM_MODULES:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        token = sys.stdin.readline().strip()
        if not token:
            return
        rest = [*rest, "--token", token]
        mode = "clientapp"
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
