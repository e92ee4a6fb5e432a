"""Offline evaluation on held-out queries against human judgments.

With 40 queries, evaluation is k-fold *by query*: a fold's queries are never seen in training
(no clicks on them reach any node), so a score measures generalisation to new queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from shared_model.features import FeatureBuilder
from shared_model.metrics import mean_metrics
from shared_model.ranker import RankerHead
from shared_model.schema import JudgedSearchData

# (query_id, candidate product ids) -> scores, higher is better.
Scorer = Callable[[str, Sequence[str]], np.ndarray]


def query_folds(query_ids: Sequence[str], *, num_folds: int, seed: int) -> list[list[str]]:
    """Split queries into ``num_folds`` disjoint folds of near-equal size (seeded shuffle)."""
    if not 2 <= num_folds <= len(query_ids):
        raise ValueError(
            f"num_folds must be in [2, {len(query_ids)}] for {len(query_ids)} queries, "
            f"got {num_folds!r}"
        )
    order = np.random.default_rng(seed).permutation(sorted(query_ids))
    return [sorted(str(q) for q in order[i::num_folds]) for i in range(num_folds)]


def evaluate(
    data: JudgedSearchData, query_ids: Sequence[str], scorer: Scorer, *, k: int = 10
) -> dict[str, float]:
    """Mean NDCG@k, MRR and AUC of ``scorer`` over ``query_ids``' judged pools."""
    per_query = []
    for qid in query_ids:
        judged = data.judged(qid)
        pids = [j.product_id for j in judged]
        rel = np.array([j.relevance for j in judged])
        per_query.append((np.asarray(scorer(qid, pids), dtype=np.float64), rel))
    return mean_metrics(per_query, k=k)


def cosine_scorer(builder: FeatureBuilder) -> Scorer:
    """Zero-shot MiniLM: cosine of query and product full-text embeddings."""

    def scorer(query_id: str, product_ids: Sequence[str]) -> np.ndarray:
        return builder.features_for_query_id(query_id, product_ids)[:, 0]

    return scorer


def bm25_scorer(builder: FeatureBuilder) -> Scorer:
    """BM25 over product text (the logging ranker)."""

    def scorer(query_id: str, product_ids: Sequence[str]) -> np.ndarray:
        return builder.bm25.score(builder.data.queries[query_id].text, product_ids)

    return scorer


def head_scorer(head: RankerHead, builder: FeatureBuilder) -> Scorer:
    """The ranker head's relevance logits (the position tower is not used at scoring)."""
    head.eval()

    def scorer(query_id: str, product_ids: Sequence[str]) -> np.ndarray:
        feats = torch.from_numpy(builder.features_for_query_id(query_id, product_ids))
        with torch.no_grad():
            return head.relevance(feats).numpy()

    return scorer


# Two views of quality: the fold's training queries (seen: their clicks reach the nodes) and
# the held-out fold (unseen). Flat metric keys (Flower's MetricRecord holds flat numbers):
# "ndcg@10", "mrr", "auc" stay the unseen view (as before); "seen-<metric>" is the seen view.
VIEWS = ("seen", "unseen")
VIEW_METRICS = ("ndcg@10", "mrr", "auc")


def seen_unseen_queries(
    query_ids: Sequence[str], *, num_folds: int, seed: int, eval_fold: int
) -> tuple[list[str], list[str]]:
    """(seen, unseen): every query outside the held-out fold, and the fold's queries."""
    unseen = query_folds(query_ids, num_folds=num_folds, seed=seed)[eval_fold]
    held = set(unseen)
    return sorted(q for q in query_ids if q not in held), list(unseen)


def evaluate_views(
    data: JudgedSearchData,
    seen: Sequence[str],
    unseen: Sequence[str],
    scorer: Scorer,
    *,
    k: int = 10,
) -> dict[str, float]:
    """Flat metrics of both views: unseen as ``ndcg@10``..., seen as ``seen-ndcg@10``..."""
    out = dict(evaluate(data, unseen, scorer, k=k))
    out.update({f"seen-{m}": v for m, v in evaluate(data, seen, scorer, k=k).items()})
    return out


def nest_views(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"seen": {...}, "unseen": {...}}`` from :func:`evaluate_views`' flat keys (the seen
    view only when present)."""
    out = {"unseen": {m: float(flat[m]) for m in VIEW_METRICS if m in flat}}
    seen = {m: float(flat[f"seen-{m}"]) for m in VIEW_METRICS if f"seen-{m}" in flat}
    if seen:
        out = {"seen": seen, **out}
    return out
