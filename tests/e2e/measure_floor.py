"""Per-round wall time on loopback: fedrank's ServerApp/ClientApp vs Flower's floor.

One cluster (SuperLink with TLS + node auth, 3 SuperNodes on 127.0.0.1:9480-9499), two
runs on it back to back: fedrank (``regional-3`` data) and ``noop_app`` (a ClientApp that
echoes its input). Prints JSON. Run: ``.venv/bin/python tests/e2e/measure_floor.py [ROUNDS]``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deploy_helpers import Cluster  # noqa: E402

from simulations.runner import prepare_run  # noqa: E402
from simulations.scenarios import get_scenario  # noqa: E402

NOOP_APP = Path(__file__).resolve().parent / "noop_app"


def _round_times(stamps: list[tuple[float, str]], marker: str) -> list[float]:
    times = [t for t, line in stamps if marker in line]
    return [round(b - a, 2) for a, b in zip(times, times[1:], strict=False)]


def main(rounds: int = 3) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="fedrank-floor-") as tmp:
        c = Cluster(Path(tmp), port=9480)
        try:
            settings = prepare_run(get_scenario("regional-3"), run_dir=c.run_dir,
                                   rounds=rounds, epsilon=1.0)
            names = ["node-0", "node-1", "node-2"]
            c.start_server(register=names)
            for name in names:
                c.start_node(name, data=c.run_dir / "data" / name)
            # fedrank: time between "[ROUND k" starts and the round-end progress lines
            c.submit(settings.to_config())
            t0 = time.monotonic()
            c.wait_run(1200)
            fed_wall = time.monotonic() - t0
            fed = _round_times(c.stamps, "[ROUND ")
            fed_last = [t for t, ln in c.stamps if f"[fedrank] round {rounds}/{rounds}" in ln]
            starts = [t for t, ln in c.stamps if "[ROUND " in ln]
            if fed_last and starts:
                fed.append(round(fed_last[0] - starts[-1], 2))
            c.stamps.clear()
            c.submit({"num-server-rounds": rounds, "min-nodes": 3}, app=NOOP_APP)
            t0 = time.monotonic()
            c.wait_run(600)
            noop_wall = time.monotonic() - t0
            noop = [float(ln.split(": ")[1].rstrip("s")) for _, ln in c.stamps
                    if "[noop] round" in ln]
        finally:
            c.close()
    mean = lambda xs: round(sum(xs) / len(xs), 2) if xs else None  # noqa: E731
    out = {
        "rounds": rounds,
        "fedrank_round_seconds": fed, "fedrank_mean": mean(fed),
        "fedrank_run_wall": round(fed_wall, 1),
        "noop_round_seconds": noop, "noop_mean": mean(noop), "noop_run_wall": round(noop_wall, 1),
    }
    if out["fedrank_mean"] and out["noop_mean"]:
        out["ratio"] = round(out["fedrank_mean"] / out["noop_mean"], 2)  # type: ignore[operator]
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3), indent=2))
