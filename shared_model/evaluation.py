"""Offline evaluation on held-out queries against human judgments.

With 40 queries, evaluation is k-fold *by query*: a fold's queries are never seen in training
(no clicks on them reach any node), so a score measures generalisation to new queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from shared_model.encoder import CachedEncoder
from shared_model.metrics import mean_metrics
from shared_model.ranker import RankerHead
from shared_model.schema import JudgedSearchData
from shared_model.training import EmbeddingTables

# (query_id, candidate product ids) -> scores, higher is better.
Scorer = Callable[[str, Sequence[str]], np.ndarray]


def embed_dataset(data: JudgedSearchData, encoder: CachedEncoder) -> EmbeddingTables:
    """Encode every query and product once (cached on disk) into lookup tables."""
    query_ids = sorted(data.queries)
    product_ids = sorted(data.products)
    queries = encoder.encode([data.queries[q].text for q in query_ids])
    products = encoder.encode([data.products[p].text() for p in product_ids])
    return EmbeddingTables(
        queries=queries,
        products=products,
        query_row={q: i for i, q in enumerate(query_ids)},
        product_row={p: i for i, p in enumerate(product_ids)},
    )


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


def cosine_scorer(tables: EmbeddingTables) -> Scorer:
    """Zero-shot MiniLM: cosine of query and product embeddings."""

    def scorer(query_id: str, product_ids: Sequence[str]) -> np.ndarray:
        q = tables.queries[tables.query_row[query_id]]
        p = tables.products[[tables.product_row[pid] for pid in product_ids]]
        return p @ q

    return scorer


def head_scorer(head: RankerHead, tables: EmbeddingTables) -> Scorer:
    """The ranker head's relevance logits (the position tower is not used at scoring)."""
    head.eval()

    def scorer(query_id: str, product_ids: Sequence[str]) -> np.ndarray:
        q = torch.from_numpy(tables.queries[tables.query_row[query_id]])
        p = torch.from_numpy(tables.products[[tables.product_row[pid] for pid in product_ids]])
        with torch.no_grad():
            return head.relevance(q.unsqueeze(0).expand_as(p), p).numpy()

    return scorer
