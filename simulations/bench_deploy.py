"""`fedrank bench deploy`: fedrank's round time on the Deployment Engine vs Flower's floor.

One loopback cluster, as an operator deploys it: development certificates, a SuperLink with
TLS and SuperNode authentication behind the Fleet-only node gateway (``server.deploy``), and
3 SuperNodes with their keys, each next to its app guard (``client.app_guard``: the node
runs only the apps it pinned, here fedrank's checkout and the no-op app). On it, back to back:
fedrank's ServerApp/ClientApp on ``regional-3`` data, then ``tests/e2e/noop_app`` (a ClientApp
that echoes its input: Flower's own per-round floor), ``rounds`` rounds each.

A round's time is measured the same way for both apps: from the end of the previous round's
central evaluation to the end of this round's (fedrank: ``metrics.json`` ``seconds``; the
no-op app prints it). Reported: the medians and their ratio.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NOOP_APP = PROJECT_ROOT / "tests" / "e2e" / "noop_app"
NODES = ("node-0", "node-1", "node-2")


def _follow(proc: Any, lines: list[str], log_path: Path) -> threading.Thread:
    def run() -> None:
        with log_path.open("a") as fh:
            for line in proc.stdout:
                fh.write(line)
                lines.append(line.rstrip("\n"))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def bench_deploy(*, rounds: int = 3, port: int = 9600, root: Path | None = None,
                 timeout: float = 900.0, echo: Callable[[str], None] = lambda _s: None,
                 ) -> dict[str, Any]:
    """Run both apps on one cluster; ``{"fedrank_round_s", "floor_round_s", "ratio", ...}``."""
    from client.app_guard import app_hash
    from client.deploy import NodeLaunch, own_app_hash, start_node, stop_guard
    from server.certs import CA_CERT, init_certs
    from server.deploy import Deployment, ServerConfig
    from shared_model.data import DEFAULT_WANDS_DIR
    from shared_model.processes import kill_tree, new_tag, stop_tagged
    from simulations.runner import prepare_run
    from simulations.scenarios import get_scenario

    with tempfile.TemporaryDirectory(prefix="fedrank-bench-deploy-") as tmp:
        base = Path(root) if root is not None else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        tag = new_tag()
        certs = init_certs(base / "certs", nodes=len(NODES))
        run_dir = base / "run"
        cfg = ServerConfig(host="127.0.0.1", port=port, database=base / "superlink.db",
                           certs_dir=certs.root, run_dir=run_dir, flwr_home=base / "flwr_home",
                           task_poll_interval=0.1)
        deployment = Deployment(cfg, tag=tag, echo=echo)
        nodes: list[Any] = []
        started = time.monotonic()
        try:
            settings = prepare_run(get_scenario("regional-3"), run_dir=run_dir, rounds=rounds,
                                   epsilon=1.0)
            deployment.start_superlink()
            pinned = (own_app_hash(), app_hash(NOOP_APP))
            for i, name in enumerate(NODES):
                deployment.register(certs.node_keys[name][1], name=name)
                launch = NodeLaunch(
                    region=name, data=run_dir / "data" / name, superlink=cfg.address,
                    key=certs.node_keys[name][0], ca=certs.root / CA_CERT,
                    state_dir=base / "nodes" / name, port=port + 10 + i,
                    catalog_dir=DEFAULT_WANDS_DIR, extra={"delta": "1e-4"}, app_hashes=pinned,
                    # the embedding cache prepare_run warmed: the bench measures rounds, not
                    # each node's first encode of the catalog
                    cache_dir=settings.cache_path(),
                )
                nodes.append(start_node(launch, tag=tag, log_path=base / "logs" / f"{name}.log"))
            # fedrank
            lines: list[str] = []
            proc = deployment.submit(settings.to_config())
            _follow(proc, lines, base / "fedrank-run.log").join(timeout)
            rc_fedrank = proc.wait(timeout=30)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            fedrank = [float(r["seconds"]) for r in metrics["rounds"]]
            echo(f"[fedrank] bench: fedrank rounds {fedrank} (exit {rc_fedrank})")
            # Flower's floor: the no-op app on the same cluster
            lines = []
            proc = deployment.submit({"num-server-rounds": rounds, "min-nodes": len(NODES)},
                                     app=NOOP_APP)
            _follow(proc, lines, base / "noop-run.log").join(timeout)
            rc_noop = proc.wait(timeout=30)
            floor = [float(ln.split(": ")[1].rstrip("s")) for ln in lines
                     if "[noop] round " in ln and ": " in ln]
            echo(f"[fedrank] bench: no-op rounds {floor} (exit {rc_noop})")
        finally:
            for proc_node in nodes:
                if proc_node.poll() is None:
                    kill_tree(proc_node, grace=3)
                stop_guard(proc_node)
            deployment.stop(grace=5)
            stop_tagged(tag, grace=3)
    if not fedrank or not floor:
        raise RuntimeError(f"bench deploy: no round times (fedrank {fedrank}, no-op {floor})")
    fed_med, floor_med = statistics.median(fedrank), statistics.median(floor)
    return {
        "fedrank_round_s": round(fed_med, 2),
        "floor_round_s": round(floor_med, 2),
        "ratio": round(fed_med / floor_med, 2),
        "fedrank_rounds_s": fedrank,
        "floor_rounds_s": floor,
        "rounds": rounds,
        "nodes": len(NODES),
        "wall_s": round(time.monotonic() - started, 1),
    }
