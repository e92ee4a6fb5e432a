"""Drift in an online federation: how many rounds the model needs to catch up with new taste.

World
    Online run (``online = true``): every node reads its data folder as an inbox
    (``client.inbox``). Round 1 trains on ``node-K/clicks.parquet`` (written by
    ``simulations.runner.prepare_run``); every later round r gets one new day of traffic,
    ``node-K/inbox/round-NNNN-traffic.parquet`` (the same users, fresh sessions; seed offset
    r), which the node consumes in round r. **Simulation clock:** the files are all written
    before the run (Flower gives the runner no hook between rounds); a ``round-NNNN-`` file
    is only listed by the inbox from round NNNN on.

Drift (what changes at ``drift_round`` R)
    From round R on, the traffic is simulated with a *perturbed relevance* (the click model's
    ``rel``), not the human judgments: shoppers start to shop by department. For each
    (drifted) query, products whose category path matches the query strongly (the
    ``category_cosine`` feature, standardised over the query's pool, >= ``threshold``) gain
    ``boost`` relevance (capped at 1); all others keep ``damp`` of theirs. Human judgments
    cannot drift in WANDS, so the perturbed relevance is the ground truth after R: "NDCG@10
    on the new traffic" is NDCG@10 on the held-out fold's queries against it.
    The drift is expressed through one of the head's features on purpose: the head ranks by
    four query-product features, and a taste it cannot express (say, "category X is now
    relevant for every query") could never be recovered from, by any amount of training.

Measure
    ``pre`` = NDCG@10 of the round R-1 model on the old ground truth. Each later round's
    model is scored on the new ground truth; the model frozen at round R-1 is the
    reference. Recovery = the first round r >= R whose model is within ``tolerance`` (2%) of
    ``pre``; reported as r - R + 1 rounds of drifted traffic (``None`` = not within the run).

Training runs on Flower's Simulation Engine (``simulations.runner``), as every scenario does.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.inbox import available_from_round, round_file_name

TRAFFIC_TAG = "traffic"
DRIFT_MARKER = "drift.json"


@dataclass(frozen=True)
class DriftConfig:
    """When and how the taste drifts (see the module docstring)."""

    rounds: int = 12
    drift_round: int = 6
    feature: str = "category_cosine"
    threshold: float = 1.0
    boost: float = 0.5
    damp: float = 0.5
    tolerance: float = 0.02

    def __post_init__(self) -> None:
        if not 2 <= self.drift_round <= self.rounds:
            raise ValueError(
                f"drift round must be in [2, rounds={self.rounds}], got {self.drift_round!r}"
            )
        if not (0 <= self.damp <= 1 and 0 <= self.boost <= 1):
            raise ValueError("damp and boost must be in [0, 1]")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance!r}")


def traffic_file(node_dir: Path, round: int) -> Path:
    """Where round ``round``'s new traffic lands in a node's inbox."""
    return node_dir / "inbox" / round_file_name(round, TRAFFIC_TAG)


def traffic_schedule(config: DriftConfig) -> list[tuple[int, bool]]:
    """``(round, drifted)`` of every inbox file (round 1 reads the initial clicks)."""
    return [(r, r >= config.drift_round) for r in range(2, config.rounds + 1)]


def visible_rounds(files: list[Path], current_round: int) -> list[int]:
    """The clock applied: rounds of the files an inbox lists at ``current_round``."""
    return sorted(
        available_from_round(f) for f in files if available_from_round(f) <= current_round
    )


def drifted_data(data: Any, builder: Any, config: DriftConfig) -> Any:
    """The judged data with the drifted relevance (a new ``JudgedSearchData``)."""
    from shared_model.features import FEATURE_NAMES
    from shared_model.schema import JudgedSearchData, Judgment

    col = FEATURE_NAMES.index(config.feature)
    judgments = []
    for q in data.query_ids:
        pool = data.judged(q)
        z = builder.features_for_query_id(q, [j.product_id for j in pool])[:, col]
        for j, zj in zip(pool, z, strict=True):
            rel = min(1.0, j.relevance + config.boost) if zj >= config.threshold else (
                j.relevance * config.damp
            )
            judgments.append(Judgment(q, j.product_id, float(rel)))
    return JudgedSearchData(data.queries, data.products, tuple(judgments), source="drifted")


def write_drift_traffic(
    scenario: Any, settings: Any, config: DriftConfig, *, builder: Any = None
) -> dict[str, Any]:
    """Write every node's ``inbox/round-NNNN-traffic.parquet`` (idempotent via a marker)."""
    from shared_model.catalog import cached_feature_builder
    from shared_model.clicklog import write_click_log
    from shared_model.evaluation import query_folds
    from shared_model.partition import partition_regional
    from shared_model.world import simulate_click_log

    data_dir = Path(settings.data_dir)
    marker = data_dir / DRIFT_MARKER
    if marker.exists():
        return json.loads(marker.read_text())
    builder = builder or cached_feature_builder(settings.catalog_dir, settings.cache_dir)
    data = builder.data
    drifted = drifted_data(data, builder, config)
    test = set(query_folds(data.query_ids, num_folds=settings.num_folds, seed=settings.seed)[
        settings.eval_fold
    ])
    train_queries = [q for q in data.query_ids if q not in test]
    rows = {}
    for rnd, is_drifted in traffic_schedule(config):
        log = simulate_click_log(
            drifted if is_drifted else data, scenario.world, query_ids=train_queries,
            seed_offset=rnd,
        )
        parts = partition_regional(log)
        for i, k in enumerate(sorted(parts)):
            write_click_log(parts[k], traffic_file(data_dir / f"node-{i}", rnd))
        rows[rnd] = log.num_rows
    info = {"config": asdict(config), "rows_per_round": rows}
    marker.write_text(json.dumps(info, indent=2))
    return info


def evaluate_drift(run_dir: Path, config: DriftConfig, *, builder: Any = None) -> dict[str, Any]:
    """NDCG@10 per round on the old and the drifted ground truth; recovery vs frozen."""
    from server.checkpoint import STRATEGY_PREFIX
    from shared_model.catalog import cached_feature_builder
    from shared_model.data import DEFAULT_WANDS_DIR
    from shared_model.evaluation import evaluate, head_scorer, query_folds
    from shared_model.ranker import HeadConfig, RankerHead
    from shared_model.state import load_head_state

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    builder = builder or cached_feature_builder(
        cfg.get("catalog-dir") or str(DEFAULT_WANDS_DIR), cfg.get("cache-dir", "")
    )
    data = builder.data
    new_truth = drifted_data(data, builder, config)
    test = query_folds(data.query_ids, num_folds=int(cfg["num-folds"]), seed=int(cfg["seed"]))[
        int(cfg["eval-fold"])
    ]

    def head_of(rnd: int) -> RankerHead:
        head = RankerHead(HeadConfig(hidden_dim=int(cfg.get("hidden-dim", 0))))
        if rnd > 0:
            with np.load(run_dir / "checkpoints" / f"round-{rnd:04d}.npz") as npz:
                load_head_state(
                    head, {k: npz[k] for k in npz.files if not k.startswith(STRATEGY_PREFIX)}
                )
        return head

    def ndcg(head: RankerHead, truth: Any) -> float:
        return float(evaluate(truth, test, head_scorer(head, builder))["ndcg@10"])

    available = sorted(
        int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("round-*.npz")
    )
    r = config.drift_round
    frozen = head_of(r - 1)
    pre = ndcg(frozen, data)
    frozen_new = ndcg(frozen, new_truth)
    target = (1.0 - config.tolerance) * pre
    per_round = []
    recovered_at = None
    for rnd in available:
        head = head_of(rnd)
        row = {"round": rnd, "ndcg_old_truth": ndcg(head, data)}
        if rnd >= r:
            row["ndcg_new_truth"] = ndcg(head, new_truth)
            if recovered_at is None and row["ndcg_new_truth"] >= target:
                recovered_at = rnd
        per_round.append(row)
    last = per_round[-1] if per_round else {}
    return {
        "drift_round": r,
        "held_out_queries": test,
        "pre_drift_ndcg@10": pre,
        "target_ndcg@10": target,
        "frozen_ndcg@10_new_truth": frozen_new,
        "frozen_recovers": frozen_new >= target,
        "recovered_at_round": recovered_at,
        "recovery_rounds": None if recovered_at is None else recovered_at - r + 1,
        "final_ndcg@10_new_truth": last.get("ndcg_new_truth"),
        "final_lift_over_frozen": (
            None if "ndcg_new_truth" not in last else last["ndcg_new_truth"] - frozen_new
        ),
        "rounds": per_round,
    }


def run_drift(
    *,
    run_dir: Path,
    config: DriftConfig,
    epsilon: float,
    scenario_name: str = "regional-3-drift",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Prepare, write the traffic, train on Flower's Simulation Engine, evaluate."""
    from simulations.runner import prepare_run, run_simulation
    from simulations.scenarios import get_scenario

    scenario = get_scenario(scenario_name)
    started = time.perf_counter()
    settings = prepare_run(
        scenario, run_dir=run_dir, rounds=config.rounds, epsilon=epsilon,
        overrides={"online": True},
    )
    write_drift_traffic(scenario, settings, config)
    echo(f"[fedrank] drift traffic written; training {config.rounds} rounds on Flower")
    result = run_simulation(scenario, settings, echo=echo)
    if not result.metrics.get("final"):
        raise RuntimeError(
            f"no metrics (flwr exit {result.returncode}); see {run_dir / 'flower.log'}"
        )
    report = evaluate_drift(run_dir, config)
    report.update(
        {
            "scenario": scenario_name,
            "epsilon": "inf" if math.isinf(epsilon) else epsilon,
            "config": asdict(config),
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
    )
    (Path(run_dir) / "drift.json").write_text(json.dumps(report, indent=2))
    _plot(report, Path(run_dir) / "drift.png")
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rounds"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["round"] for r in rows], [r["ndcg_old_truth"] for r in rows], label="old truth")
    post = [r for r in rows if "ndcg_new_truth" in r]
    ax.plot([r["round"] for r in post], [r["ndcg_new_truth"] for r in post], marker="o",
            label="federated, new truth")
    ax.axhline(report["frozen_ndcg@10_new_truth"], color="grey", linestyle=":",
               label=f"frozen at round {report['drift_round'] - 1}, new truth")
    ax.axhline(report["target_ndcg@10"], color="black", linestyle="--", label="recovery target")
    ax.axvline(report["drift_round"] - 0.5, color="red", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("NDCG@10 (held-out queries)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
