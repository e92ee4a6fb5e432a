"""Process helpers for the Deployment Engine, shared by the server and node sides.

Flower-free, role-neutral: ``fedrank server start`` (``server.deploy``) and ``fedrank node
start`` (``client.deploy``) both start Flower's own command-line programs as subprocesses
with :func:`deploy_env` and stop them with :func:`kill_tree` / :func:`stop_tagged`.

Every process started through :func:`deploy_env` gets ``FEDRANK_DEPLOY_TAG`` in its
environment; Flower's own children (SuperExec, ServerApp/ClientApp processes) inherit it, so
:func:`stop_tagged` finds and stops exactly the processes one deployment started, even those
Flower detaches into their own sessions.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TAG_ENV = "FEDRANK_DEPLOY_TAG"


def flower_bin(name: str) -> str:
    """A Flower console script next to this interpreter (the venv's)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def deploy_env(*, flwr_home: Path | None, tag: str, poll_interval: float = 0.1) -> dict[str, str]:
    """Environment for every Flower process one deployment starts."""
    env = dict(os.environ)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env[TAG_ENV] = tag
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(poll_interval)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Flower's child processes import the app from the project; keep it importable.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


def new_tag() -> str:
    return uuid.uuid4().hex[:16]


def tagged_pids(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``FEDRANK_DEPLOY_TAG=tag``."""
    needle = f"{TAG_ENV}={tag}".encode()
    me = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and _alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (via /proc parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def kill_pids(pids: Iterable[int], *, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Signal ``pids``; SIGKILL whatever is still alive after ``grace`` seconds."""
    pids = [p for p in set(pids) if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def kill_tree(proc: subprocess.Popen[Any] | int, *, sig: int = signal.SIGTERM,
              grace: float = 5.0) -> None:
    """Stop a process and every descendant (collected before signalling)."""
    pid = proc if isinstance(proc, int) else proc.pid
    kill_pids([pid, *descendants(pid)], sig=sig, grace=grace)
    if not isinstance(proc, int):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)


def stop_tagged(tag: str, *, grace: float = 5.0) -> list[int]:
    """Stop every process carrying this deployment's tag; returns the PIDs signalled."""
    pids = tagged_pids(tag)
    kill_pids(pids, grace=grace)
    return pids


def wait_for_port(host: str, port: int, *, timeout: float = 60.0,
                  proc: subprocess.Popen[Any] | None = None) -> None:
    """Block until ``host:port`` accepts TCP connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {port} opened")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{host}:{port} did not open within {timeout:.0f}s")


