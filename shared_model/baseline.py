"""Baselines on held-out queries: BM25, zero-shot MiniLM, and the centrally trained head.

The central head is trained without privacy on the simulated clicks of the training folds'
queries (all users pooled in one place): the ceiling a federated, private run aims at.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared_model.evaluation import (
    bm25_scorer,
    cosine_scorer,
    evaluate,
    head_scorer,
    query_folds,
)
from shared_model.features import FeatureBuilder
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.training import TrainConfig, build_user_groups, train_head

METRICS = ("ndcg@10", "mrr", "auc")


@dataclass(frozen=True)
class CentralConfig:
    """How the central (non-private, pooled) head is trained."""

    train: TrainConfig = TrainConfig(learning_rate=0.1, batch_size=64, local_epochs=4)
    head: HeadConfig = HeadConfig()
    # No per-user bound centrally: every session of every user is used.
    max_sessions_per_user: int = 1_000


def restrict_to_queries(table: pa.Table, query_ids: list[str]) -> pa.Table:
    """Rows of a click log whose query is in ``query_ids``."""
    return table.filter(pc.is_in(table.column("query_id"), pa.array(query_ids, pa.string())))


def train_central_head(
    builder: FeatureBuilder, clicks: pa.Table, config: CentralConfig, *, seed: int = 0
) -> RankerHead:
    """Train a head on pooled clicks, without DP."""
    groups = build_user_groups(
        clicks,
        builder,
        max_sessions_per_user=config.max_sessions_per_user,
        rng=np.random.default_rng(seed),
    )
    head = RankerHead(config.head)
    train_head(head, groups, replace(config.train, seed=seed))
    return head


def _summary(per_fold: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in METRICS:
        values = np.array([f[m] for f in per_fold], dtype=np.float64)
        out[m] = float(values.mean())
        out[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[f"{m}_per_fold"] = [round(float(v), 6) for v in values]
    return out


def run_baselines(
    builder: FeatureBuilder,
    clicks: pa.Table,
    *,
    num_folds: int = 5,
    seed: int = 0,
    central: CentralConfig | None = None,
    include_naive: bool = True,
    on_fold: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """k-fold-by-query evaluation of every baseline; mean, spread and per-fold values
    (``on_fold(i)`` after fold ``i``: progress)."""
    central = central or CentralConfig()
    data = builder.data
    folds = query_folds(data.query_ids, num_folds=num_folds, seed=seed)
    results: dict[str, list[dict[str, float]]] = {
        "bm25": [],
        "minilm_zero_shot": [],
        "central_head": [],
    }
    if include_naive:
        results["central_head_naive"] = []
    # The same models on each fold's training queries (seen: their clicks trained the head).
    seen: dict[str, list[dict[str, float]]] = {name: [] for name in results}
    started = time.perf_counter()
    for i, test in enumerate(folds):
        train_q = [q for q in data.query_ids if q not in set(test)]
        fold_clicks = restrict_to_queries(clicks, train_q)
        results["bm25"].append(evaluate(data, test, bm25_scorer(builder)))
        results["minilm_zero_shot"].append(evaluate(data, test, cosine_scorer(builder)))
        head = train_central_head(builder, fold_clicks, central, seed=seed + i)
        results["central_head"].append(evaluate(data, test, head_scorer(head, builder)))
        seen["bm25"].append(evaluate(data, train_q, bm25_scorer(builder)))
        seen["minilm_zero_shot"].append(evaluate(data, train_q, cosine_scorer(builder)))
        seen["central_head"].append(evaluate(data, train_q, head_scorer(head, builder)))
        if include_naive:
            naive_cfg = replace(central, head=replace(central.head, position_aware=False))
            naive = train_central_head(builder, fold_clicks, naive_cfg, seed=seed + i)
            results["central_head_naive"].append(evaluate(data, test, head_scorer(naive, builder)))
            seen["central_head_naive"].append(
                evaluate(data, train_q, head_scorer(naive, builder))
            )
        if on_fold is not None:
            on_fold(i)
    out: dict[str, Any] = {
        name: {**_summary(per_fold), "seen": _summary(seen[name])}
        for name, per_fold in results.items()
    }
    out["split"] = {
        "kind": "k-fold by query",
        "num_folds": num_folds,
        "seed": seed,
        "fold_sizes": [len(f) for f in folds],
        "test_queries": folds,
        "clicks_rows": clicks.num_rows,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return out
