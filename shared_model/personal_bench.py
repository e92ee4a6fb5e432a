"""Latency of on-device scoring with personalization on (`fedrank bench personal`).

Same path as `fedrank bench score` (MiniLM query encode in onnxruntime, features of the BM25
top-100, the release's ONNX head, one thread), timed with and without the user state's
re-weighting, interleaved per repeat so both see the same machine load. The state's terms are
precomputed once per state (:class:`~shared_model.personal.PersonalScorer`, rebuilt after each
session, timed as ``precompute_ms``), so a request adds a few gathers over the candidates.

Reported per ``rounds`` round of ``repeats`` requests, and the median over rounds: p50/p99 of
both paths, the p99 ratio personalized / global of the same round (machine load cancels), and
the personalization step alone (``personal_only``). Plus the "for you" recommender (cold: the
first list, which estimates every catalog query's click rates once; warm: later lists) and
the state's size.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def bench_personal(
    *, repeats: int = 300, rounds: int = 3, query: str = "modern blue velvet accent chair",
    num_candidates: int = 100, history_sessions: float = 30.0,
) -> dict[str, Any]:
    """Time scoring with and without personalization (module docstring).

    Parameters
    ----------
    repeats : int
        Timed requests per round and path.
    rounds : int
        Rounds; every figure is the median over rounds.
    query : str
        The query text (a fresh suffix per request, so nothing is cached).
    num_candidates : int
        BM25 candidates per request.
    history_sessions : float
        Mean sessions of the simulated heavy user whose state is used.

    Returns
    -------
    dict
        Milliseconds (``*_ms``), the p99 ratio, the state's size and the setup.
    """
    if repeats < 1 or rounds < 1:
        raise ValueError("repeats and rounds must be >= 1")
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared_model.data import load_wands
    from shared_model.encoder import CachedEncoder
    from shared_model.features import FeatureBuilder
    from shared_model.personal import PersonalScorer, Session, learn_state, sessions_from_log
    from shared_model.ranker import HeadConfig, RankerHead
    from shared_model.recommend import Recommender
    from shared_model.release import write_release
    from shared_model.scoring import (
        OnnxScorer,
        candidate_features,
        encode_query,
        query_encoder_for,
        top_by_bm25,
    )
    from shared_model.world import WorldConfig, simulate_click_log

    torch.set_num_threads(1)
    builder = FeatureBuilder(load_wands(), CachedEncoder())
    ids = top_by_bm25(builder, query, num_candidates)
    query_encoder = query_encoder_for(builder)
    # A heavy user: one simulated user with ~30 sessions over every catalog query.
    log = simulate_click_log(
        builder.data, WorldConfig(num_users=1, num_regions=1, sessions_per_user=history_sessions,
                                  seed=7)
    )
    state = learn_state(sessions_from_log(log, builder.data), builder)
    state.observe(  # the bench query is one the user issued before (click memory is used)
        Session(
            timestamp=0, query_id="", query_text=query, shown=tuple(ids[:10]),
            clicked=tuple(ids[2:4]),
        ),
        builder,
    )
    t0 = time.perf_counter()
    personal = PersonalScorer(state, builder)
    personal.scores(np.zeros(len(ids), np.float32), ids, query_text=query)  # per-query terms
    precompute = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="fedrank-bench-") as tmp:
        release_dir = write_release(
            Path(tmp) / "release", head=RankerHead(HeadConfig()), version="bench", round=0,
            epsilon_per_node={}, metrics={}, signing_key=Ed25519PrivateKey.generate(),
        )
        scorer = OnnxScorer(release_dir)

        def run(text: str, on: bool, step: list[float]) -> float:
            t0 = time.perf_counter()
            q = encode_query(builder, text, query_encoder)
            out = scorer.scores(candidate_features(builder, text, q, ids))
            if on:
                t1 = time.perf_counter()
                out = personal.scores(out, ids, query_text=query)
                step.append(time.perf_counter() - t1)
            np.argsort(-out)
            return time.perf_counter() - t0

        def global_scores(text: str, cands: Sequence[str]) -> np.ndarray:
            q = encode_query(builder, text, query_encoder)
            return scorer.scores(candidate_features(builder, text, q, cands))

        unused: list[float] = []
        for i in range(5):
            run(f"{query} warmup {i}", False, unused)
            run(f"{query} warmup {i}", True, unused)
        per_round: list[dict[str, float]] = []
        for r in range(rounds):
            off: list[float] = []
            on: list[float] = []
            step: list[float] = []
            for i in range(repeats):
                text = f"{query} {r} {i}"  # a fresh text each time: nothing cached
                off.append(run(text, False, unused))
                on.append(run(text, True, step))
            per_round.append({
                "encode_and_score_p50_ms": _pct(off, 50),
                "encode_and_score_p99_ms": _pct(off, 99),
                "personalized_encode_and_score_p50_ms": _pct(on, 50),
                "personalized_encode_and_score_p99_ms": _pct(on, 99),
                "p99_ratio_personalized_vs_global": _pct(on, 99) / _pct(off, 99),
                "personal_only_p50_ms": _pct(step, 50),
                "personal_only_p99_ms": _pct(step, 99),
            })
        recommender = Recommender(builder, global_scores)
        t0 = time.perf_counter()
        recommender.recommend(state, 10)
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(max(5, repeats // 20)):
            t0 = time.perf_counter()
            recommender.recommend(state, 10)
            warm.append(time.perf_counter() - t0)

    result: dict[str, Any] = {
        k: round(float(np.median([row[k] for row in per_round])), 4) for k in per_round[0]
    }
    result.update({
        "rounds_p99_ratio": [round(row["p99_ratio_personalized_vs_global"], 4)
                             for row in per_round],
        "precompute_ms": round(precompute * 1000.0, 3),
        "recommend_cold_ms": round(cold * 1000.0, 2),
        "recommend_warm_p50_ms": round(_pct(warm, 50), 4),
        "state_bytes": len(state.to_bytes()),
        "state_sessions": state.sessions,
        "state_queries": len(state.queries),
        "repeats": repeats,
        "rounds": rounds,
        "candidates": len(ids),
        "threads": 1,
        "query_encoder": "torch" if query_encoder is None else "onnx",
    })
    return result
