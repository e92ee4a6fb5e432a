"""Ranking metrics against graded human judgments (numpy only).

Gains are the judged relevance in [0, 1]; NDCG uses exponential gain ``2**(2*rel) - 1`` (so
WANDS Exact=3, Partial=1, Irrelevant=0, the usual 2^grade - 1 on grades 0/1/2).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _order(scores: np.ndarray) -> np.ndarray:
    # Stable sort on -score: ties keep input order, so results are reproducible.
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def dcg_at_k(gains: np.ndarray, k: int) -> float:
    """DCG of gains already in ranked order, ``sum gain_i / log2(i + 1)`` over i = 1..k."""
    g = np.asarray(gains, dtype=np.float64)[:k]
    return float(np.sum(g / np.log2(np.arange(2, g.size + 2))))


def ndcg_at_k(scores: np.ndarray, relevance: np.ndarray, k: int = 10) -> float:
    """NDCG@k of one ranking; 0.0 when no item has positive gain."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    rel = np.asarray(relevance, dtype=np.float64)
    gains = 2.0 ** (2.0 * rel) - 1.0
    ideal = dcg_at_k(np.sort(gains)[::-1], k)
    if ideal == 0.0:
        return 0.0
    return dcg_at_k(gains[_order(scores)], k) / ideal


def mrr(scores: np.ndarray, relevance: np.ndarray, *, threshold: float = 1.0) -> float:
    """Reciprocal rank of the first item with relevance >= threshold (WANDS: Exact)."""
    rel = np.asarray(relevance, dtype=np.float64)[_order(scores)]
    hits = np.nonzero(rel >= threshold)[0]
    return 0.0 if hits.size == 0 else 1.0 / float(hits[0] + 1)


def auc(scores: np.ndarray, relevance: np.ndarray, *, threshold: float = 1.0) -> float:
    """ROC AUC of scores separating relevance >= threshold from the rest (ties count 1/2).

    Returns NaN when one class is empty.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(relevance, dtype=np.float64) >= threshold
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U via average ranks (handles ties).
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def mean_metrics(
    per_query: Sequence[tuple[np.ndarray, np.ndarray]], *, k: int = 10
) -> dict[str, float]:
    """Mean NDCG@k, MRR and AUC over queries given ``(scores, relevance)`` pairs.

    AUC averages over queries where it is defined.
    """
    if not per_query:
        raise ValueError("no queries to evaluate")
    ndcgs = [ndcg_at_k(s, r, k) for s, r in per_query]
    mrrs = [mrr(s, r) for s, r in per_query]
    aucs = [a for a in (auc(s, r) for s, r in per_query) if not np.isnan(a)]
    return {
        f"ndcg@{k}": float(np.mean(ndcgs)),
        "mrr": float(np.mean(mrrs)),
        "auc": float(np.mean(aucs)) if aucs else float("nan"),
    }
