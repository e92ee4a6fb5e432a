"""Helpers for the Deployment Engine tests: one loopback cluster whose processes all die.

A :class:`Cluster` owns a run directory, development certificates, one SuperLink (TLS +
SuperNode auth) and any number of SuperNodes. Every process it starts carries one
``FEDRANK_DEPLOY_TAG``; :meth:`Cluster.close` stops exactly those (process trees first,
then anything else still carrying the tag, e.g. Flower's detached SuperExec).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client.deploy import GUARDS, NodeLaunch, start_node
from server.deploy import (
    CA_CERT,
    Deployment,
    ServerConfig,
    descendants,
    init_certs,
    kill_pids,
    kill_tree,
    new_tag,
    stop_tagged,
    tagged_pids,
)
from shared_model.data import DEFAULT_WANDS_DIR

PORT_BASE = 9400  # the tests use 9400-9499 only


class Cluster:
    """SuperLink + SuperNodes on 127.0.0.1 for one test."""

    def __init__(self, root: Path, *, port: int, nodes: int = 3) -> None:
        self.root = root
        self.port = port
        self.tag = new_tag()
        self.certs = init_certs(root / "certs", nodes=nodes + 1)  # one spare, unregistered
        self.run_dir = root / "run"
        self.cfg = ServerConfig(
            host="127.0.0.1", port=port, database=root / "superlink.db",
            certs_dir=self.certs.root, run_dir=self.run_dir, flwr_home=root / "flwr_home",
            task_poll_interval=0.1,
        )
        self.lines: list[str] = []
        self.stamps: list[tuple[float, str]] = []  # (monotonic time, run-stream line)
        self.deployment = Deployment(self.cfg, tag=self.tag, echo=self.lines.append)
        self.nodes: dict[str, subprocess.Popen[Any]] = {}
        self.node_ports: dict[str, int] = {}
        self._run_thread: threading.Thread | None = None
        self.run_rc: int | None = None

    # -- server -------------------------------------------------------------------------
    def start_server(self, register: list[str]) -> None:
        self.deployment.start_superlink()
        for name in register:
            self.deployment.register(self.certs.node_keys[name][1], name=name)

    def kill_server(self) -> None:
        """SIGKILL the SuperLink and `flwr run` with their process trees (a crash)."""
        if self.deployment.run_proc is not None:
            kill_tree(self.deployment.run_proc, sig=signal.SIGKILL)
        if self.deployment.superlink is not None:
            kill_tree(self.deployment.superlink, sig=signal.SIGKILL)
        if self._run_thread is not None:
            self._run_thread.join(timeout=10)
        # Flower's detached SuperExec / ServerApp processes of the *server* side.
        for pid in tagged_pids(self.tag):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            if "serverapp" in cmd or "--runtime-api-address" in cmd and f":{self.port}" in cmd:
                kill_tree(pid, sig=signal.SIGKILL, grace=2)

    def submit(self, run_config: dict[str, Any], *, app: Path | None = None) -> None:
        proc = (self.deployment.submit(run_config, app=app) if app is not None
                else self.deployment.submit(run_config))
        log_path = self.root / "run.log"

        def follow() -> None:
            assert proc.stdout is not None
            with log_path.open("a") as fh:
                for line in proc.stdout:
                    fh.write(line)
                    fh.flush()
                    self.lines.append(line.rstrip("\n"))
                    self.stamps.append((time.monotonic(), line.rstrip("\n")))
            self.run_rc = proc.wait()

        self.run_rc = None
        self._run_thread = threading.Thread(target=follow, daemon=True)
        self._run_thread.start()

    def wait_run(self, timeout: float) -> int:
        assert self._run_thread is not None
        self._run_thread.join(timeout=timeout)
        if self._run_thread.is_alive():
            raise TimeoutError(f"run did not finish in {timeout:.0f}s:\n" + self.tail())
        assert self.run_rc is not None
        return self.run_rc

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}:\n" + self.tail())

    def has_line(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def tail(self, n: int = 60) -> str:
        return "\n".join(list(self.lines)[-n:])

    # -- nodes --------------------------------------------------------------------------
    def start_node(self, name: str, *, data: Path, key: str | None = None,
                   insecure: bool = False, extra: dict[str, str] | None = None,
                   max_wait_time: float | None = None,
                   app_hashes: tuple[str, ...] | None = None) -> subprocess.Popen[Any]:
        port = self.node_ports.setdefault(name, self.port + 10 + len(self.node_ports))
        launch = NodeLaunch(
            region=name, data=data, superlink=f"127.0.0.1:{self.port}",
            key=self.certs.node_keys[key or name][0] if not insecure or key else None,
            ca=None if insecure else self.certs.root / CA_CERT,
            state_dir=self.root / "nodes" / name, port=port, catalog_dir=DEFAULT_WANDS_DIR,
            # The nodes pin regional-3's δ (a node's privacy is its own node_config).
            insecure=insecure, extra={"delta": "1e-4", **(extra or {})},
            max_wait_time=max_wait_time, app_hashes=app_hashes,
        )
        proc = start_node(launch, tag=self.tag, log_path=self.root / "logs" / f"{name}.log")
        self.nodes[name] = proc
        return proc

    def kill_node(self, name: str) -> None:
        kill_tree(self.nodes[name], sig=signal.SIGKILL, grace=2)

    def node_log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ledger(self, name: str) -> list[dict[str, Any]]:
        path = self.root / "nodes" / name / "ledger" / f"{name}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        try:
            # All nodes at once (each tree and its app guard): one grace period, not one
            # per node.
            pids: list[int] = []
            for proc in self.nodes.values():
                guard = GUARDS.pop(proc.pid, None)
                for p in (proc, guard):
                    if p is not None and p.poll() is None:
                        pids += [p.pid, *descendants(p.pid)]
            kill_pids(pids, grace=3)
            for proc in self.nodes.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1)
            self.deployment.stop(grace=5)
        finally:
            stop_tagged(self.tag, grace=3)
