"""Flower-free study: shrink the ranker head toward its zero-shot start (issue 9, unseen floor).

For each of the 5 query folds: train the head on the fold's training (seen) queries' simulated
clicks (central/non-private, and DP-SGD with the node's noise), then score
``α·head + (1−α)·zero-shot`` (for the linear head this is the head with its weights moved
``α`` of the way from the zero-shot init) on seen and unseen queries. ``α`` is chosen on the
seen queries' judgments only (never the held-out fold).

    python -m simulations.shrink_study [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from shared_model.baseline import CentralConfig, restrict_to_queries
from shared_model.catalog import cached_feature_builder
from shared_model.data import DEFAULT_WANDS_DIR
from shared_model.evaluation import cosine_scorer, evaluate, head_scorer, query_folds
from shared_model.ranker import HeadConfig, RankerHead, shrink_toward_init
from shared_model.training import TrainConfig, build_user_groups, train_head
from shared_model.world import simulate_click_log
from simulations.scenarios import get_scenario

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def select_alpha(builder: Any, clicks: Any, seen: list[str], *, seed: int,
                 inner_folds: int = 4) -> dict[str, Any]:
    """Choose α using the seen queries only: inner k-fold by query over them (the head is
    trained on the inner training queries' clicks, α scored on the inner held-out queries'
    judgments); the outer fold's held-out queries are never touched."""
    data = builder.data
    inner = query_folds(seen, num_folds=inner_folds, seed=seed)
    per_alpha: dict[str, list[float]] = {str(a): [] for a in ALPHAS}
    for j, inner_test in enumerate(inner):
        inner_train = [q for q in seen if q not in set(inner_test)]
        groups = build_user_groups(restrict_to_queries(clicks, inner_train), builder,
                                   max_sessions_per_user=2,
                                   rng=np.random.default_rng(100 * seed + j))
        head = RankerHead(HeadConfig())
        train_head(head, groups, CentralConfig().train)
        for a in ALPHAS:
            sc = head_scorer(shrink_toward_init(head, a), builder)
            per_alpha[str(a)].append(evaluate(data, inner_test, sc)["ndcg@10"])
    means = {a: float(np.mean(v)) for a, v in per_alpha.items()}
    return {"inner_ndcg@10": means, "alpha": float(max(means, key=lambda a: means[a]))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="")
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--select", action="store_true",
                   help="also choose α by inner 4-fold CV over the seen queries only")
    p.add_argument("--select-only", action="store_true")
    args = p.parse_args(argv)
    scenario = get_scenario("regional-5")
    builder = cached_feature_builder(str(DEFAULT_WANDS_DIR), "")
    data = builder.data
    clicks = simulate_click_log(data, scenario.world)
    folds = query_folds(data.query_ids, num_folds=5, seed=0)
    rows: list[dict[str, Any]] = []
    for i in [int(f) for f in args.folds.split(",")]:
        test = folds[i]
        train_q = [q for q in data.query_ids if q not in set(test)]
        zs = cosine_scorer(builder)
        row: dict[str, Any] = {
            "fold": i,
            "zero_shot": {"seen": evaluate(data, train_q, zs)["ndcg@10"],
                          "unseen": evaluate(data, test, zs)["ndcg@10"]},
        }
        groups = build_user_groups(restrict_to_queries(clicks, train_q), builder,
                                   max_sessions_per_user=2, rng=np.random.default_rng(i))
        for kind in () if args.select_only else ("central", "dp"):
            t0 = time.perf_counter()
            head = RankerHead(HeadConfig())
            cfg = CentralConfig().train
            if kind == "dp":
                cfg = TrainConfig(learning_rate=0.5, batch_size=256, local_epochs=args.epochs,
                                  clip_norm=1.0, noise_multiplier=args.sigma)
            train_head(head, groups, replace(cfg), generator=torch.Generator().manual_seed(i))
            per_alpha = {}
            for a in ALPHAS:
                h = shrink_toward_init(head, a)
                sc = head_scorer(h, builder)
                per_alpha[str(a)] = {"seen": evaluate(data, train_q, sc)["ndcg@10"],
                                     "unseen": evaluate(data, test, sc)["ndcg@10"]}
            row[kind] = per_alpha
            row[kind + "_weights"] = [round(float(w), 4) for w in
                                      head.relevance_tower.linear.weight.detach().ravel()]
            row[kind + "_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps({"fold": i, kind: per_alpha, "zs": row["zero_shot"],
                              "w": row[kind + "_weights"]}), flush=True)
        if args.select or args.select_only:
            row["selection"] = select_alpha(builder, clicks, train_q, seed=i)
            print(json.dumps({"fold": i, "selection": row["selection"]}), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
