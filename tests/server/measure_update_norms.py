"""How far an honest DP-SGD round moves the head: the basis of the server's clip bound.

Runs the node code (``client.node.train_round``, no Flower) for a few FedAvg rounds on a
prepared scenario and prints, per (scenario, ε, hidden-dim), the L2 norm of every node's
update (reply minus the weights it was sent). Prints JSON lines.
Run: ``.venv/bin/python tests/server/measure_update_norms.py [ROUNDS]``.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from client.node import NodeSettings, head_config, train_round  # noqa: E402
from shared_model.ranker import RankerHead  # noqa: E402
from shared_model.state import head_state  # noqa: E402
from simulations.runner import prepare_run  # noqa: E402
from simulations.scenarios import get_scenario  # noqa: E402


def measure(scenario_name: str, epsilon: float, hidden_dim: int, rounds: int) -> dict:
    scenario = get_scenario(scenario_name)
    with tempfile.TemporaryDirectory() as tmp:
        settings = prepare_run(
            scenario, run_dir=Path(tmp) / "run", rounds=rounds, epsilon=epsilon,
            overrides={"hidden-dim": hidden_dim},
        )
        state = head_state(RankerHead(head_config(settings)))
        norms: list[list[float]] = []
        for rnd in range(1, rounds + 1):
            replies, row = [], []
            for pid in range(scenario.num_nodes):
                node = NodeSettings.from_node_config({"partition-id": pid}, settings)
                out = train_round(run=settings, node=node, global_state=state, server_round=rnd)
                delta = [out.state[k].astype(np.float64) - state[k] for k in state]
                row.append(math.sqrt(sum(float(np.sum(d * d)) for d in delta)))
                replies.append(out.state)
            norms.append([round(n, 4) for n in row])
            state = {k: np.mean([r[k] for r in replies], axis=0).astype(np.float32)
                     for k in state}
        params = sum(int(v.size) for v in state.values())
    flat = [n for row in norms for n in row]
    return {"scenario": scenario_name, "epsilon": epsilon, "hidden_dim": hidden_dim,
            "params": params, "max": max(flat), "median": float(np.median(flat)),
            "per_round": norms}


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    for name, eps, hidden in [("regional-3", 1.0, 0), ("regional-3", 8.0, 0),
                              ("regional-3", math.inf, 0), ("regional-3", 1.0, 32),
                              ("regional-3", 0.1, 0), ("regional-5", 1.0, 0),
                              ("regional-5", math.inf, 0)]:
        print(json.dumps(measure(name, eps, hidden, rounds)), flush=True)
