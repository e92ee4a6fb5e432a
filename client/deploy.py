"""Deployment Engine, node side: start ``flower-supernode`` for one regional node.

The node connects to the SuperLink's node address over TLS (``--root-certificates``: the
CA that signed the server certificate) and authenticates with its ECDSA key
(``--auth-supernode-private-key``). Its node config (``--node-config``) pins everything on
the node's machine and its privacy floor, so no run config from the server can choose them:
paths (click log, state, ledger, catalog, embedding cache, release folder), the release
public key, and ``epsilon-budget``/``delta``/``clip-norm``/``max-sessions-per-user``/
``privacy-shape`` (``client.node.NodeSettings.from_node_config`` reads them).

The SuperNode runs with ``--isolation process`` next to ``client.app_guard``, a SuperExec
that launches only the app (FAB hash) the node pinned (``app_hashes``; default: the hash of
the node's own fedrank checkout). Nothing in this module imports Flower.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared_model.processes import (
    PROJECT_ROOT,
    deploy_env,
    flower_bin,
    kill_tree,
    new_tag,
)

PROGRESS = "[fedrank]"


@dataclass(frozen=True)
class NodeLaunch:
    """Everything ``fedrank node start`` needs."""

    region: str
    data: Path
    superlink: str
    key: Path | None
    ca: Path | None
    state_dir: Path
    port: int = 9410
    catalog_dir: Path | None = None
    ledger_dir: Path | None = None
    cache_dir: Path | None = None
    release_dir: Path | None = None
    release_key: Path | None = None
    epsilon_budget: float | None = None
    delta: float | None = None
    clip_norm: float | None = None
    max_sessions_per_user: int | None = None
    privacy_shape: str | None = None
    app_hashes: tuple[str, ...] | None = None  # None: the node's own checkout
    pin_app: bool = True
    insecure: bool = False
    extra: Mapping[str, str] = field(default_factory=dict)
    max_retries: int | None = None
    max_wait_time: float | None = None

    def node_config(self) -> dict[str, str | int | float]:
        """The node-pinned settings (contract: node_config keys)."""
        cfg: dict[str, str | int | float] = {
            "node-name": self.region,
            "data-path": str(Path(self.data).resolve()),
            "state-dir": str(Path(self.state_dir).resolve()),
        }
        paths = {
            "catalog-dir": self.catalog_dir, "ledger-dir": self.ledger_dir,
            "cache-dir": self.cache_dir, "release-dir": self.release_dir,
            "release-key": self.release_key,
        }
        for key, value in paths.items():
            if value is not None:
                cfg[key] = str(Path(value).resolve())
        numbers: dict[str, float | int | None] = {
            "epsilon-budget": self.epsilon_budget, "delta": self.delta,
            "clip-norm": self.clip_norm, "max-sessions-per-user": self.max_sessions_per_user,
        }
        for key, number in numbers.items():
            if number is not None:
                cfg[key] = number
        if self.privacy_shape is not None:
            cfg["privacy-shape"] = self.privacy_shape
        cfg.update({k: str(v) for k, v in self.extra.items()})
        return cfg

    def trusted_app_hashes(self) -> tuple[str, ...]:
        return self.app_hashes or (own_app_hash(),)


@functools.lru_cache(maxsize=1)
def own_app_hash() -> str:
    """The FAB hash of this fedrank checkout (what ``flwr run`` of it submits)."""
    from client.app_guard import app_hash

    return app_hash(PROJECT_ROOT)


def node_config_arg(config: Mapping[str, str | int | float]) -> str:
    """``--node-config`` text: ``key=value`` pairs (TOML values: strings quoted)."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            parts.append(f"{key}={json.dumps(str(value))}")
        else:
            parts.append(f"{key}={value!r}")
    return " ".join(parts)


def guard_command(launch: NodeLaunch, supernode_pid: int) -> list[str]:
    """``client.app_guard`` (the node's SuperExec) for a SuperNode's local runtime API."""
    cmd = [sys.executable, "-m", "client.app_guard"]
    for digest in launch.trusted_app_hashes():
        cmd += ["--trusted-app-hash", digest]
    return [*cmd, "--", "--insecure", "--runtime-api-address", f"127.0.0.1:{launch.port}",
            "--parent-pid", str(supernode_pid)]


def supernode_command(launch: NodeLaunch) -> list[str]:
    cmd = [flower_bin("flower-supernode"), "--superlink", launch.superlink]
    if launch.pin_app:
        cmd += ["--isolation", "process"]
    if launch.insecure:
        cmd.append("--insecure")
    if launch.ca is not None:
        cmd += ["--root-certificates", str(Path(launch.ca).resolve())]
    if launch.key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(launch.key).resolve())]
    if launch.max_retries is not None:
        cmd += ["--max-retries", str(launch.max_retries)]
    if launch.max_wait_time is not None:
        cmd += ["--max-wait-time", str(launch.max_wait_time)]
    cmd += [
        "--host", "127.0.0.1",
        "--port", str(launch.port),
        "--node-config", node_config_arg(launch.node_config()),
    ]
    return cmd


def start_node(launch: NodeLaunch, *, tag: str | None = None, log_path: Path | None = None,
               env_extra: Mapping[str, str] | None = None) -> subprocess.Popen[Any]:
    """Start the SuperNode in its own session (stdout/stderr to ``log_path`` if given)."""
    env = deploy_env(flwr_home=None, tag=tag or new_tag())
    env.update(env_extra or {})
    Path(launch.state_dir).mkdir(parents=True, exist_ok=True)
    out: Any = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("ab")
    hashes = launch.trusted_app_hashes() if launch.pin_app else ()
    proc = subprocess.Popen(
        supernode_command(launch), env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
        start_new_session=True, cwd=PROJECT_ROOT,
    )
    if launch.pin_app:
        pinned = dataclasses.replace(launch, app_hashes=hashes)
        guard = subprocess.Popen(
            guard_command(pinned, proc.pid), env=env, stdout=out,
            stderr=subprocess.STDOUT if out else None, start_new_session=True, cwd=PROJECT_ROOT,
        )
        GUARDS[proc.pid] = guard
    return proc


# SuperNode pid -> its app guard (it also exits on its own when the SuperNode does).
GUARDS: dict[int, subprocess.Popen[Any]] = {}


def stop_guard(proc: subprocess.Popen[Any]) -> None:
    guard = GUARDS.pop(proc.pid, None)
    if guard is not None and guard.poll() is None:
        kill_tree(guard, grace=5)


def run_node(launch: NodeLaunch, *, echo: Callable[[str], None] = print) -> int:
    """``fedrank node start``: run the SuperNode in the foreground; SIGTERM/SIGINT stop it
    and every ClientApp process it started."""
    proc = start_node(launch)
    echo(f"{PROGRESS} node {launch.region}: SuperNode pid {proc.pid} -> {launch.superlink} "
         f"({'insecure' if launch.insecure else 'TLS'}"
         f"{', authenticated' if launch.key else ''}); state {launch.state_dir}")
    if launch.pin_app:
        echo(f"{PROGRESS} node {launch.region}: runs only app "
             f"{', '.join(launch.trusted_app_hashes())}")
    else:
        echo(f"{PROGRESS} node {launch.region}: WARNING: runs any app the SuperLink sends "
             "(--no-pin-app)")
    stopping = {"signal": 0}

    def _forward(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum

    old_term = signal.signal(signal.SIGTERM, _forward)
    old_int = signal.signal(signal.SIGINT, _forward)
    try:
        while proc.poll() is None and not stopping["signal"]:
            time.sleep(0.2)
        if stopping["signal"]:
            echo(f"{PROGRESS} node {launch.region}: stopping SuperNode")
            kill_tree(proc, sig=signal.SIGTERM, grace=10)
            return 0
        echo(f"{PROGRESS} node {launch.region}: SuperNode exited with {proc.returncode}")
        return int(proc.returncode or 0)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        stop_guard(proc)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
