"""Real Flower (Deployment Engine, TLS + node auth on loopback): faulty nodes cannot stop the
run or move the model beyond the server's clip, and the server names nodes itself.

Run it under the global Flower lock: ``flock /tmp/fedrank-flower.lock pytest ...``.
Ports 9415-9429 (this module only).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from deploy_helpers import Cluster  # noqa: E402

from server.deploy import tagged_pids  # noqa: E402
from server.validation import CLIP_UPDATE_NORM  # noqa: E402
from shared_model.ranker import HeadConfig, RankerHead  # noqa: E402
from shared_model.state import head_state  # noqa: E402
from simulations.runner import prepare_run  # noqa: E402
from simulations.scenarios import get_scenario  # noqa: E402

pytestmark = [pytest.mark.deployment, pytest.mark.e2e]

NODES = ["node-0", "node-1", "node-2"]
REGIONS = {"node-0": "eu-west", "node-1": "us-east", "node-2": "ap-south"}
USERS_PER_NODE = 100
PORT = 9415


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, port=PORT)
    try:
        yield c
    finally:
        c.close()
        assert tagged_pids(c.tag) == [], "a deployment process outlived the test"


def _weights(run_dir: Path, rnd: int) -> np.ndarray:
    with np.load(run_dir / "checkpoints" / f"round-{rnd:04d}.npz") as npz:
        keys = sorted(k for k in npz.files if not k.startswith("strategy/"))
        return np.concatenate([npz[k].reshape(-1).astype(np.float64) for k in keys])


@pytest.mark.timeout(420)
def test_faulty_nodes_neither_stop_the_run_nor_move_the_model_beyond_the_clip(
    cluster: Cluster,
) -> None:
    # Prepare: node-0 honest; node-1 adds a metric key (Flower's FedAvg would raise
    # InconsistentMessageReplies); node-2 claims num-examples=1e300 and pushes an update of
    # norm 50. The server names nodes by their registered ids (node-regions), not by claims.
    settings = prepare_run(get_scenario("regional-3"), run_dir=cluster.run_dir, rounds=2,
                           epsilon=1.0, overrides={"batch-size": 64, "min-train-nodes": 3})
    for name in NODES:
        path = cluster.run_dir / "data" / name / "clicks.parquet"
        table = pq.read_table(path)
        users = sorted(set(table.column("user_id").to_pylist()))[:USERS_PER_NODE]
        pq.write_table(table.filter(pc.is_in(table.column("user_id"), pa.array(users))), path)
    cluster.deployment.start_superlink()
    ids = {}
    for name in NODES:
        text = cluster.deployment.register(cluster.certs.node_keys[name][1], name=name)
        ids[name] = int(re.findall(r"SuperNode (\d+) registered", text)[0])
    config = settings.to_config()
    config["node-regions"] = ",".join(f"{ids[n]}={REGIONS[n]}" for n in NODES)
    faults = {"node-1": "extra-metric", "node-2": "huge-weight"}
    for name in NODES:
        extra = {"fault": faults[name]} if name in faults else {}
        cluster.start_node(name, data=cluster.run_dir / "data" / name, extra=extra)
    # Execute
    cluster.submit(config)
    rc = cluster.wait_run(360)
    # Assert: both rounds completed
    assert rc == 0, cluster.tail()
    assert cluster.has_line("[fedrank] round 2/2"), cluster.tail()
    rows = json.loads((cluster.run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        replies = row["replies"]
        assert [(r["node_id"], r["node"]) for r in replies["rejected"]] == [
            (ids["node-1"], "us-east")], replies
        assert "unexpected metric(s) ['injected']" in replies["rejected"][0]["reason"]
        assert [(r["node_id"], r["node"]) for r in replies["clipped"]] == [
            (ids["node-2"], "ap-south")], replies
        assert replies["clipped"][0]["norm"] > 45
    # the model moved by at most the clip in each round, whatever node-2 claimed
    start = np.concatenate([v.reshape(-1).astype(np.float64) for _, v in sorted(
        head_state(RankerHead(HeadConfig(hidden_dim=settings.hidden_dim))).items())])
    w1, w2 = _weights(cluster.run_dir, 1), _weights(cluster.run_dir, 2)
    assert 0 < np.linalg.norm(w1 - start) <= CLIP_UPDATE_NORM
    assert 0 < np.linalg.norm(w2 - w1) <= CLIP_UPDATE_NORM
    # identity from the server's config; the nodes' own names are claims, logged once
    assert cluster.has_line(
        f"node {ids['node-2']} is ap-south to this server; it calls itself 'node-2'"
    ), cluster.tail()
    # Flower's aggregated train metrics: no count, no loss
    # (one line per round; Flower's streamed log may carry each line twice, colour and file)
    aggregated = [ln for ln in cluster.lines if "Aggregated MetricRecord" in ln]
    assert len(aggregated) >= 2, cluster.tail()
    for line in aggregated:
        assert "epsilon" in line and "steps" in line
        for leaked in ("num-examples", "num-impressions", "train-loss"):
            assert leaked not in line, line
