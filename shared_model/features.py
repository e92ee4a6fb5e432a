"""Query-product features the ranker head sees: a few dense, query-independent signals.

Why features instead of raw embeddings: with 40 judged queries, a head over the 384-d
embeddings overfits the training queries (measured: held-out NDCG@10 fell below zero-shot),
and DP noise grows with the number of trained parameters. A handful of features that mean
the same thing for every query generalise to new queries and keep the head tiny.

Features (``FEATURE_NAMES``), each for one (query, product) pair:
  0. ``cosine``: MiniLM cosine of the query and the product's full text (zero-shot score);
  1. ``title_cosine``: cosine with the product title alone;
  2. ``category_cosine``: cosine with the category path (title when the path is empty);
  3. ``bm25``: BM25 of the query over the product text (global IDF).

Each feature is standardised per query over the query's candidate pool (LETOR's
"QueryLevelNorm"): ranking happens within a query, and without it a pointwise click model
learns what separates *queries* (some have many relevant products, so more clicks) instead
of what separates products (measured: held-out NDCG@10 fell below zero-shot). The candidate
pool is what retrieval returns for the query: the judged pool for catalog queries, the
given candidates otherwise. Standardising is monotone, so feature 0 alone ranks exactly as
zero-shot cosine does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared_model.bm25 import Bm25Ranker
from shared_model.encoder import CachedEncoder
from shared_model.schema import JudgedSearchData

FEATURE_NAMES = ("cosine", "title_cosine", "category_cosine", "bm25")
NUM_FEATURES = len(FEATURE_NAMES)


class FeatureBuilder:
    """Computes ``[N, NUM_FEATURES]`` float32 features for a query and candidate products.

    Product-side embeddings are encoded once through the on-disk cache; a query is encoded on
    first use and memoised.
    """

    def __init__(self, data: JudgedSearchData, encoder: CachedEncoder) -> None:
        self.data = data
        self.encoder = encoder
        self.product_ids = sorted(data.products)
        self.product_row = {pid: i for i, pid in enumerate(self.product_ids)}
        products = [data.products[p] for p in self.product_ids]
        self.full = encoder.encode([p.text() for p in products])
        self.title = encoder.encode([p.title for p in products])
        self.category = encoder.encode([p.category_path or p.title for p in products])
        self.bm25 = Bm25Ranker(data)
        self._queries: dict[str, np.ndarray] = {}
        self._stats: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = {}

    def query_vector(self, text: str) -> np.ndarray:
        """``[384]`` embedding of a query text (memoised)."""
        vec = self._queries.get(text)
        if vec is None:
            vec = self.encoder.encode([text])[0]
            self._queries[text] = vec
        return vec

    def rows(self, product_ids: Sequence[str]) -> np.ndarray:
        """Row indices of products; ``KeyError`` naming the first unknown id."""
        try:
            return np.fromiter((self.product_row[p] for p in product_ids), np.int64)
        except KeyError as err:
            raise KeyError(f"unknown product_id {err.args[0]!r}") from None

    def raw_features(self, query_text: str, product_ids: Sequence[str]) -> np.ndarray:
        """Unstandardised ``[len(product_ids), NUM_FEATURES]`` float32."""
        rows = self.rows(product_ids)
        q = self.query_vector(query_text)
        out = np.empty((len(rows), NUM_FEATURES), dtype=np.float32)
        out[:, 0] = self.full[rows] @ q
        out[:, 1] = self.title[rows] @ q
        out[:, 2] = self.category[rows] @ q
        out[:, 3] = self.bm25.score(query_text, product_ids)
        return out

    def pool_stats(self, query_text: str, pool_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and std ``[NUM_FEATURES]`` over a query's candidate pool."""
        key = (query_text, len(pool_ids), hash(tuple(pool_ids)))
        stats = self._stats.get(key)
        if stats is None:
            raw = self.raw_features(query_text, pool_ids)
            std = raw.std(0)
            stats = (raw.mean(0), np.where(std > 1e-6, std, 1.0).astype(np.float32))
            self._stats[key] = stats
        return stats

    def features(
        self,
        query_text: str,
        product_ids: Sequence[str],
        *,
        pool_ids: Sequence[str] | None = None,
    ) -> np.ndarray:
        """``[len(product_ids), NUM_FEATURES]`` float32, standardised over ``pool_ids``
        (default: the products given)."""
        if not product_ids:
            return np.zeros((0, NUM_FEATURES), dtype=np.float32)
        mean, std = self.pool_stats(query_text, pool_ids if pool_ids else product_ids)
        return ((self.raw_features(query_text, product_ids) - mean) / std).astype(np.float32)

    def features_for_query_id(self, query_id: str, product_ids: Sequence[str]) -> np.ndarray:
        """As :meth:`features`, with the query's text and judged pool from the catalog."""
        query = self.data.queries.get(query_id)
        if query is None:
            raise KeyError(f"unknown query_id {query_id!r}")
        pool = [j.product_id for j in self.data.judged(query_id)]
        return self.features(query.text, product_ids, pool_ids=pool)
