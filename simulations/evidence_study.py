"""Flower-free measurement of DP memorised evidence: seen/unseen NDCG@10 per ε and population.

Reproduces, without the federation around it, exactly what the regional federation computes
for the evidence: the world's click log over the fold's training queries, partitioned by
region; each region bounds its users to K sessions, clips each user's contribution to C,
adds Gaussian noise calibrated for its share of the node's ε (one event (σ, 1, 1)); the server
sums the regions; the scorer shrinks toward the base score by the summed noise variance.

Run: ``python -m simulations.evidence_study --json out.json`` (a few minutes on 2 cores).
The numbers land in docs/results.md; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from privacy.accounting import calibrate_noise_multiplier
from privacy.count_release import clip_and_sum, worst_case_sensitivity
from shared_model.catalog import cached_feature_builder
from shared_model.data import DEFAULT_WANDS_DIR
from shared_model.encoder import default_cache_dir
from shared_model.evaluation import bm25_scorer, cosine_scorer, evaluate, query_folds
from shared_model.evidence import (
    EVIDENCE_CLICKS,
    EVIDENCE_EXAM,
    EVIDENCE_NOISE_VAR,
    EvidenceIndex,
    EvidenceModel,
    user_pair_rows,
)
from shared_model.partition import partition_regional
from shared_model.world import WorldConfig, simulate_click_log


def _fixed_m_scorer(
    index: EvidenceIndex, clicks: np.ndarray, exam: np.ndarray, base: Any, m: float
) -> Any:
    """The stack notes' reference: (clicks + m prior) / (exam + m), prior 0.3 + 0.1 z."""

    def scorer(qid: str, pids: Sequence[str]) -> np.ndarray:
        s = np.asarray(base(qid, pids), np.float64)
        z = (s - s.mean()) / (s.std() or 1.0)
        prior = 0.3 + 0.1 * z
        pairs = index.query_pairs(qid, pids)
        c, e = clicks[pairs], np.maximum(exam[pairs], 0.0)
        return (c + m * prior) / (e + m)

    return scorer


def study(
    *,
    populations: Sequence[int],
    epsilons: Sequence[float],
    clips: Sequence[float | None],
    release_share: float,
    delta: float,
    max_sessions: int,
    repeats: int,
    eval_fold: int,
    seed: int = 0,
) -> dict[str, Any]:
    builder = cached_feature_builder(str(DEFAULT_WANDS_DIR), str(default_cache_dir()))
    data = builder.data
    index = EvidenceIndex(data)
    folds = query_folds(data.query_ids, num_folds=5, seed=seed)
    unseen = folds[eval_fold]
    seen = [q for q in data.query_ids if q not in set(unseen)]
    base = cosine_scorer(builder)
    out: dict[str, Any] = {
        "eval_fold": eval_fold,
        "release_share": release_share,
        "delta": delta,
        "max_sessions_per_user": max_sessions,
        "repeats": repeats,
        "baselines": {
            "zero_shot": {
                "seen": evaluate(data, seen, base), "unseen": evaluate(data, unseen, base)
            },
            "bm25": {
                "seen": evaluate(data, seen, bm25_scorer(builder)),
                "unseen": evaluate(data, unseen, bm25_scorer(builder)),
            },
        },
        "rows": [],
    }
    rng = np.random.default_rng(12345)
    for users in populations:
        started = time.perf_counter()
        log = simulate_click_log(
            data, WorldConfig(num_users=users, num_regions=5, seed=seed), query_ids=seen
        )
        parts = partition_regional(log)
        node_rows = [
            user_pair_rows(p, index, max_sessions_per_user=max_sessions) for p in parts.values()
        ]
        sim_s = time.perf_counter() - started
        for clip in clips:
            sens = clip if clip is not None else worst_case_sensitivity(
                max_sessions=max_sessions, top_k=10
            )
            sums = [
                clip_and_sum(r.user, r.pair, r.clicks, r.exam, num_pairs=index.num_pairs,
                             clip_norm=clip)
                for r in node_rows
            ]
            clipped = sum(s[2] for s in sums)
            for eps in epsilons:
                sigma = 0.0 if math.isinf(eps) else calibrate_noise_multiplier(
                    target_epsilon=release_share * eps, delta=delta, sample_rate=1.0, steps=1
                )
                noise_var = len(sums) * (sigma * sens) ** 2
                res: dict[str, list[float]] = {}
                for _ in range(repeats if sigma > 0 else 1):
                    clicks = np.sum(
                        [s[0] + rng.normal(0, sigma * sens, index.num_pairs) for s in sums], axis=0
                    )
                    exam = np.sum(
                        [s[1] + rng.normal(0, sigma * sens, index.num_pairs) for s in sums], axis=0
                    )
                    ev = {
                        EVIDENCE_CLICKS: clicks, EVIDENCE_EXAM: exam,
                        EVIDENCE_NOISE_VAR: np.array([noise_var]),
                    }
                    model = EvidenceModel(index, ev, base)
                    scorers = {
                        "credibility": model,
                        "fixed-m5": _fixed_m_scorer(index, clicks, exam, base, 5.0),
                        "fixed-m80": _fixed_m_scorer(index, clicks, exam, base, 80.0),
                    }
                    for name, sc in scorers.items():
                        res.setdefault(f"{name}/seen", []).append(
                            evaluate(data, seen, sc)["ndcg@10"]
                        )
                        res.setdefault(f"{name}/unseen", []).append(
                            evaluate(data, unseen, sc)["ndcg@10"]
                        )
                row = {
                    "users": users, "epsilon": "inf" if math.isinf(eps) else eps,
                    "release_epsilon": "inf" if math.isinf(eps) else release_share * eps,
                    "clip": clip, "sensitivity": sens, "noise_multiplier": sigma,
                    "noise_sd_total": math.sqrt(noise_var), "users_clipped": clipped,
                    "prior": vars(model.prior),
                    **{k: float(np.mean(v)) for k, v in res.items()},
                    **{f"{k}_min": float(np.min(v)) for k, v in res.items()},
                    "simulate_seconds": round(sim_s, 1),
                }
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
    return out


def scale_test(*, queries: int = 100_000, pool: int = 200, rows: int = 10_000_000) -> dict:
    """Synthetic size/time of the memorised part for a real shop (10^5 queries x ``pool``
    candidates out of 10^6 products; ``rows`` logged impressions at one node)."""
    from shared_model.evidence import PriorFit, shrunk_scores

    pairs = queries * pool
    rng = np.random.default_rng(0)
    user = np.sort(rng.integers(0, rows // 10, rows))
    pair = rng.integers(0, pairs, rows)
    clicks = (rng.random(rows) < 0.1).astype(float)
    exam = 1.0 / rng.integers(1, 11, rows)
    t = time.perf_counter()
    c, e, _ = clip_and_sum(user, pair, clicks, exam, num_pairs=pairs, clip_norm=3.0)
    aggregate_s = time.perf_counter() - t
    t = time.perf_counter()
    nc = (c + rng.normal(0, 15.0, pairs)).astype(np.float32)
    ne = (e + rng.normal(0, 15.0, pairs)).astype(np.float32)
    noise_s = time.perf_counter() - t
    z = rng.standard_normal(pool)
    prior = PriorFit(0.5, 0.1, 0.05)
    lat = []
    for q in range(2000):
        s = q * pool
        t = time.perf_counter()
        shrunk_scores(nc[s : s + pool].astype(float), ne[s : s + pool].astype(float), z, prior,
                      225.0)
        lat.append(time.perf_counter() - t)
    return {
        "pairs": pairs, "rows": rows, "node_aggregate_seconds": round(aggregate_s, 2),
        "noise_seconds": round(noise_s, 2), "evidence_mib_float32": round(2 * pairs * 4 / 2**20),
        "score_query_p50_us": round(float(np.percentile(lat, 50)) * 1e6),
        "score_query_p99_us": round(float(np.percentile(lat, 99)) * 1e6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", default="10000,100000")
    parser.add_argument("--epsilons", default="inf,8,4,1")
    parser.add_argument("--clips", default="3,none")
    parser.add_argument("--release-share", type=float, default=0.75)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-sessions", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-fold", type=int, default=0)
    parser.add_argument("--json", default="")
    parser.add_argument("--scale", action="store_true", help="only the synthetic scale test")
    args = parser.parse_args()
    if args.scale:
        print(json.dumps(scale_test(), indent=2))
        return
    result = study(
        populations=[int(u) for u in args.users.split(",")],
        epsilons=[float(e) for e in args.epsilons.split(",")],
        clips=[None if c == "none" else float(c) for c in args.clips.split(",")],
        release_share=args.release_share,
        delta=args.delta,
        max_sessions=args.max_sessions,
        repeats=args.repeats,
        eval_fold=args.eval_fold,
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
