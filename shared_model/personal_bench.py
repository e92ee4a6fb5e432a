"""Latency of on-device scoring with personalization on (`fedrank bench personal`).

Same path as `fedrank bench score` (MiniLM query encode in onnxruntime, features of the BM25
top-100, the release's ONNX head, one thread), timed with and without the user state's
re-weighting, interleaved per repeat so both see the same machine load; plus the "for you"
recommender (warm: the per-query candidate scores of the user's queries memoised, as on a
device between two openings of the app) and the state's size.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def bench_personal(
    *, repeats: int = 300, query: str = "modern blue velvet accent chair",
    num_candidates: int = 100, history_sessions: float = 30.0,
) -> dict[str, Any]:
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared_model.data import load_wands
    from shared_model.encoder import CachedEncoder
    from shared_model.features import FeatureBuilder
    from shared_model.personal import Session, learn_state, personal_scores, sessions_from_log
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
    with tempfile.TemporaryDirectory(prefix="fedrank-bench-") as tmp:
        release_dir = write_release(
            Path(tmp) / "release", head=RankerHead(HeadConfig()), version="bench", round=0,
            epsilon_per_node={}, metrics={}, signing_key=Ed25519PrivateKey.generate(),
        )
        scorer = OnnxScorer(release_dir)

        def run(text: str, personal: bool) -> float:
            t0 = time.perf_counter()
            q = encode_query(builder, text, query_encoder)
            out = scorer.scores(candidate_features(builder, text, q, ids))
            if personal:
                out = personal_scores(out, ids, state, builder, query_text=query)
            np.argsort(-out)
            return time.perf_counter() - t0

        def global_scores(text: str, cands: Sequence[str]) -> np.ndarray:
            q = encode_query(builder, text, query_encoder)
            return scorer.scores(candidate_features(builder, text, q, cands))

        for i in range(5):
            run(f"{query} warmup {i}", False)
            run(f"{query} warmup {i}", True)
        off, on = [], []
        for i in range(repeats):
            text = f"{query} {i}"  # a fresh text each time: nothing cached
            off.append(run(text, False))
            on.append(run(text, True))
        recommender = Recommender(builder, global_scores)
        t0 = time.perf_counter()
        recommender.recommend(state, 10)
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(max(5, repeats // 20)):
            t0 = time.perf_counter()
            recommender.recommend(state, 10)
            warm.append(time.perf_counter() - t0)

    def pct(values: list[float], q: float) -> float:
        return round(float(np.percentile(np.asarray(values) * 1000.0, q)), 4)

    return {
        "encode_and_score_p50_ms": pct(off, 50),
        "encode_and_score_p99_ms": pct(off, 99),
        "personalized_encode_and_score_p50_ms": pct(on, 50),
        "personalized_encode_and_score_p99_ms": pct(on, 99),
        "recommend_cold_ms": round(cold * 1000.0, 2),
        "recommend_warm_p50_ms": pct(warm, 50),
        "state_bytes": len(state.to_bytes()),
        "state_sessions": state.sessions,
        "state_queries": len(state.queries),
        "repeats": repeats,
        "candidates": len(ids),
        "threads": 1,
        "query_encoder": "torch" if query_encoder is None else "onnx",
    }
