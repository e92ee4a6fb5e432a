"""Real Flower (Deployment Engine, TLS + node auth on loopback): faulty nodes cannot stop the
run or move the model beyond the server's clip, and the server names nodes itself.

The cluster is the shared faulty-node run (``tests/e2e/shared_runs.py::faulty_run``, session
fixture ``faulty_deployment``): node-0 honest; node-3 adds a metric key (Flower's FedAvg would
raise InconsistentMessageReplies); node-4 claims num-examples=1e300 and pushes an update of
norm 50; beside them nodes sending NaN arrays or a wrong shape and one pinned to another app.
The server names nodes by their registered ids (run config ``node-regions``), not by claims.

Run it under the global Flower lock: ``flock /tmp/fedrank-flower.lock pytest ...``.
Ports: those of ``faulty_run``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.validation import CLIP_UPDATE_NORM
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.state import head_state

pytestmark = [pytest.mark.deployment, pytest.mark.e2e]


def _weights(run_dir: Path, rnd: int) -> np.ndarray:
    with np.load(run_dir / "checkpoints" / f"round-{rnd:04d}.npz") as npz:
        keys = sorted(k for k in npz.files if not k.startswith("strategy/"))
        return np.concatenate([npz[k].reshape(-1).astype(np.float64) for k in keys])


@pytest.mark.timeout(600)  # the first test to ask runs the shared cluster
def test_faulty_nodes_neither_stop_the_run_nor_move_the_model_beyond_the_clip(
    faulty_deployment: Any,
) -> None:
    run = faulty_deployment
    assert run.error is None, run.error
    assert run.leftover == [], "a deployment process outlived the run"
    cluster, ids, regions = run.cluster, run.ids, run.regions
    # Assert: both rounds completed
    assert run.rc == 0, cluster.tail()
    assert cluster.has_line("[fedrank] round 2/2"), cluster.tail()
    rows = json.loads((cluster.run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1, 2]
    bad = ("node-1", "node-2", "node-3")  # NaN, shape, extra metric: rejected every round
    for row in rows:
        replies = row["replies"]
        assert sorted((r["node_id"], r["node"]) for r in replies["rejected"]) == sorted(
            (ids[n], regions[n]) for n in bad), replies
        reasons = {r["node_id"]: r["reason"] for r in replies["rejected"]}
        assert "unexpected metric(s) ['injected']" in reasons[ids["node-3"]], replies
        assert [(r["node_id"], r["node"]) for r in replies["clipped"]] == [
            (ids["node-4"], "ap-south")], replies
        assert replies["clipped"][0]["norm"] > 45
    # the model moved by at most the clip in each round, whatever node-4 claimed
    start = np.concatenate([v.reshape(-1).astype(np.float64) for _, v in sorted(
        head_state(RankerHead(HeadConfig(hidden_dim=run.hidden_dim))).items())])
    w1, w2 = _weights(cluster.run_dir, 1), _weights(cluster.run_dir, 2)
    assert 0 < np.linalg.norm(w1 - start) <= CLIP_UPDATE_NORM
    assert 0 < np.linalg.norm(w2 - w1) <= CLIP_UPDATE_NORM
    # identity from the server's config; the nodes' own names are claims, logged once
    assert cluster.has_line(
        f"node {ids['node-4']} is ap-south to this server; it calls itself 'node-4'"
    ), cluster.tail()
    # Flower's aggregated train metrics: no count, no loss
    # (one line per round; Flower's streamed log may carry each line twice, colour and file)
    aggregated = [ln for ln in cluster.lines if "Aggregated MetricRecord" in ln]
    assert len(aggregated) >= 2, cluster.tail()
    for line in aggregated:
        assert "epsilon" in line and "steps" in line
        for leaked in ("num-examples", "num-impressions", "train-loss"):
            assert leaked not in line, line
