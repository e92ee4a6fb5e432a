"""A node's SuperExec that launches only the Flower app (FAB) the node pinned.

flwr 1.42's ``--trusted-entities`` only accepts FABs signed by Flower Hub (a local ``flwr
run .`` FAB has no verification record, so a node with trusted entities refuses it), and
the SuperNode otherwise runs whatever app the SuperLink hands it. ``fedrank node start``
therefore runs ``flower-supernode --isolation process`` and, next to it, this SuperExec:
Flower's own (``flwr.supercore.superexec``) with one change, its plugin refuses to launch a
task whose app hash (the sha256 of the FAB, computed by the SuperLink when the run was
submitted) is not one the node pinned. A refused task is logged and left to Flower's task
expiry; no code from that FAB runs on the node.

The hash of a fedrank checkout is what :func:`app_hash` computes (Flower's deterministic
FAB build of the project folder): the node operator pins the hash of the fedrank release
they reviewed (``fedrank node start --app-hash``; default: the node's own checkout).

Run as ``python -m client.app_guard --trusted-app-hash H [...] -- <flower-superexec args>``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import sys
from collections.abc import Iterable
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
    """Flower's SuperExec plugin, refusing tasks whose FAB hash is not in ``trusted``."""
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.plugin import AutoExecPlugin

    class PinnedAppExecPlugin(AutoExecPlugin):  # type: ignore[misc]
        trusted_hashes = trusted

        def launch_task(self, token: str, task: Any) -> Any:
            fab_hash = str(getattr(task, "fab_hash", "") or "")
            if fab_hash not in self.trusted_hashes:
                message = (f"[fedrank] refused app {fab_hash[:16] or '?'}: not the app this "
                           f"node pinned (run {task.run_id}, task {task.task_id})")
                print(message, file=sys.stderr, flush=True)
                return LaunchResult.failed(message)
            return super().launch_task(token, task)

    return PinnedAppExecPlugin


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, rest = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m client.app_guard")
    parser.add_argument("--trusted-app-hash", action="append", default=[], required=True)
    args = parser.parse_args(own)
    try:
        trusted = check_hashes(args.trusted_app_hash)
    except ValueError as exc:
        parser.error(str(exc))
    import flwr.supercore.superexec.run_superexec as run_superexec
    from flwr.supercore.cli.flower_superexec import flower_superexec

    # The one hook: run_superexec() instantiates this name for its plugin (flwr 1.42).
    if not hasattr(run_superexec, "AutoExecPlugin"):
        raise SystemExit("flwr's SuperExec changed: cannot pin the app; refusing to start")
    setattr(run_superexec, "AutoExecPlugin", pinned_plugin(trusted))  # noqa: B010
    print(f"[fedrank] app guard: launching only app(s) {', '.join(sorted(trusted))}",
          file=sys.stderr, flush=True)
    sys.argv = ["flower-superexec", *rest]
    flower_superexec()


if __name__ == "__main__":
    main()
