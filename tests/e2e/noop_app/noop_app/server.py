"""FedAvg over a 16-float array; prints each round's wall time."""

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    n = int(context.run_config["min-nodes"])
    stamps = [time.perf_counter()]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        now = time.perf_counter()
        if server_round > 0:
            print(f"[noop] round {server_round}/{rounds}: {now - stamps[-1]:.2f}s", flush=True)
        stamps.append(now)
        return MetricRecord({})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                      min_available_nodes=n)
    strategy.start(grid=grid, initial_arrays=ArrayRecord({"w": Array(np.zeros(16, np.float32))}),
                   num_rounds=rounds, evaluate_fn=evaluate_fn)
    per_round = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)] or [0.0]
    print(f"[noop] mean round {sum(per_round) / len(per_round):.2f}s", flush=True)
