"""Re-score a finished run's final global model at several head-shrink values.

Shrinking is post-processing of the global weights (``shared_model.state.shrink_state``), so
one federated run gives the whole α curve; the memorised evidence is kept as sent.

    python -m simulations.shrink_rescore RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from server.checkpoint import RunDirectory
from server.evaluator import CentralEvaluator
from shared_model.ranker import HeadConfig
from shared_model.settings import RunSettings
from shared_model.state import shrink_state

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def rescore(run_dir: Path) -> dict[str, object]:
    rd = RunDirectory(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    settings = RunSettings.from_config(config)
    checkpoint = rd.load_latest()
    if checkpoint is None:
        raise SystemExit(f"{run_dir}: no checkpoint")
    evaluator = CentralEvaluator(settings)
    out: dict[str, object] = {"fold": settings.eval_fold, "round": checkpoint.round,
                              "zero_shot": {v: evaluator.baselines["zero_shot"][v]["ndcg@10"]
                                            for v in ("seen", "unseen")}}
    for a in ALPHAS:
        served = shrink_state(checkpoint.arrays, a, HeadConfig(hidden_dim=settings.hidden_dim))
        m = evaluator(served)
        out[str(a)] = {"seen": m["seen-ndcg@10"], "unseen": m["ndcg@10"]}
    return out


if __name__ == "__main__":
    for d in sys.argv[1:]:
        print(json.dumps(rescore(Path(d))), flush=True)
