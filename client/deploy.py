"""Deployment Engine, node side: start ``flower-supernode`` for one regional node.

The node connects to the SuperLink over TLS (``--root-certificates``: the CA that signed
the server certificate) and authenticates with its ECDSA key
(``--auth-supernode-private-key``). Its node config names where its click log, state
(privacy accountant, plan) and ledger live; the ClientApp reads them via
``client.node.NodeSettings.from_node_config``. Nothing in this module imports Flower.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.deploy import (
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
    insecure: bool = False
    extra: Mapping[str, str] = field(default_factory=dict)
    max_retries: int | None = None
    max_wait_time: float | None = None

    def node_config(self) -> dict[str, str]:
        cfg = {
            "node-name": self.region,
            "data-path": str(Path(self.data).resolve()),
            "state-dir": str(Path(self.state_dir).resolve()),
        }
        if self.catalog_dir is not None:
            cfg["catalog-dir"] = str(Path(self.catalog_dir).resolve())
        if self.ledger_dir is not None:
            cfg["ledger-dir"] = str(Path(self.ledger_dir).resolve())
        cfg.update({k: str(v) for k, v in self.extra.items()})
        return cfg


def node_config_arg(config: Mapping[str, str]) -> str:
    """``--node-config`` text: ``key="value"`` pairs (values quoted as TOML strings)."""
    return " ".join(f"{k}={json.dumps(str(v))}" for k, v in config.items())


def supernode_command(launch: NodeLaunch) -> list[str]:
    cmd = [flower_bin("flower-supernode"), "--superlink", launch.superlink]
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
    return subprocess.Popen(
        supernode_command(launch), env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
        start_new_session=True, cwd=PROJECT_ROOT,
    )


def run_node(launch: NodeLaunch, *, echo: Callable[[str], None] = print) -> int:
    """``fedrank node start``: run the SuperNode in the foreground; SIGTERM/SIGINT stop it
    and every ClientApp process it started."""
    proc = start_node(launch)
    echo(f"{PROGRESS} node {launch.region}: SuperNode pid {proc.pid} -> {launch.superlink} "
         f"({'insecure' if launch.insecure else 'TLS'}"
         f"{', authenticated' if launch.key else ''}); state {launch.state_dir}")
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
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
