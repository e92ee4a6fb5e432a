"""BM25 baseline ranker over judged pools (rank_bm25's ``BM25Okapi``; no home-made BM25).

The corpus is every product of the data set, so IDF is global; each query ranks only its own
judged pool. No Flower, no torch here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from rank_bm25 import BM25Okapi

from shared_model.schema import JudgedSearchData

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercase ``text`` and split it into runs of ASCII letters and digits."""
    return _TOKEN.findall(text.lower())


class Bm25Ranker:
    """Rank each query's judged pool by BM25 over ``Product.text()``.

    Parameters
    ----------
    data
        The judged data; every product is a BM25 document (IDF over the whole product set).
    k1, b, epsilon
        ``BM25Okapi`` parameters (its defaults: 1.5, 0.75, 0.25).
    """

    def __init__(
        self, data: JudgedSearchData, *, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25
    ) -> None:
        if not data.products:
            raise ValueError("BM25 needs at least one product; the data set has none")
        self._data = data
        self._product_ids: list[str] = sorted(data.products)
        self._row = {pid: i for i, pid in enumerate(self._product_ids)}
        corpus = [tokenize(data.products[pid].text()) for pid in self._product_ids]
        self._bm25 = BM25Okapi(corpus, k1=k1, b=b, epsilon=epsilon)
        self._ranked: dict[str, list[str]] = {}

    def score(self, query_text: str, product_ids: Sequence[str]) -> np.ndarray:
        """BM25 scores (float64) of ``product_ids`` for ``query_text``, in the order given."""
        rows: list[int] = []
        for pid in product_ids:
            if pid not in self._row:
                raise KeyError(f"unknown product_id {pid!r}")
            rows.append(self._row[pid])
        if not rows:
            return np.zeros(0, dtype=np.float64)
        scores = self._bm25.get_batch_scores(tokenize(query_text), rows)
        return np.asarray(scores, dtype=np.float64)

    def rank(self, query_id: str) -> list[str]:
        """The query's judged pool, best BM25 score first; ties broken by product id."""
        cached = self._ranked.get(query_id)
        if cached is not None:
            return list(cached)
        if query_id not in self._data.queries:
            raise KeyError(f"unknown query_id {query_id!r}")
        pool = sorted({j.product_id for j in self._data.judged(query_id)})
        scores = self.score(self._data.queries[query_id].text, pool)
        order = sorted(range(len(pool)), key=lambda i: (-scores[i], pool[i]))
        ranked = [pool[i] for i in order]
        self._ranked[query_id] = ranked
        return list(ranked)
