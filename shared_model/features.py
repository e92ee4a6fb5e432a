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


# --- Richer generalising features (issue 9, unseen floor; measured in simulations.adapter_study)

RICH_FEATURE_NAMES = (
    "cosine", "title_cosine", "category_cosine", "bm25",
    "class_cosine", "leaf_cosine", "bm25_title", "bm25_class", "coverage", "prf_cosine",
)
"""Per-field signals that mean the same for every query:

``class_cosine`` (query vs product class), ``leaf_cosine`` (vs the category path's last
level), ``bm25_title`` / ``bm25_class`` (BM25 over the title / class + category path, global
IDF), ``coverage`` (share of the query's tokens found in the product text), ``prf_cosine``
(pseudo-relevance feedback: cosine of the product with the centroid of the pool's top
``PRF_TOP_K`` zero-shot products; uses no clicks and no labels)."""

PRF_TOP_K = 5


class PairTable:
    """Every judged (query, product) pair's features, standardised per query over its pool.

    Parameters
    ----------
    builder
        The catalog's feature builder (its encoder cache is reused).
    prf_top_k
        Pool products whose centroid defines ``prf_cosine``.

    Attributes
    ----------
    index
        ``(query_id, product_id) -> row``.
    z
        ``name -> [P]`` float32 standardised feature.
    query_vec, product_centred
        ``[P, 384]``: the query's embedding and the product's minus its pool's mean (the
        adapter's inputs; centring removes the query-level offset a pointwise click loss
        would otherwise learn).
    """

    def __init__(self, builder: FeatureBuilder, *, prf_top_k: int = PRF_TOP_K) -> None:
        from rank_bm25 import BM25Okapi

        from shared_model.bm25 import tokenize

        data = builder.data
        self.data = data
        products = [data.products[p] for p in builder.product_ids]
        classes = builder.encoder.encode([p.product_class or p.title for p in products])
        leaves = builder.encoder.encode(
            [(p.category_path.split(" / ")[-1].strip() or p.title) for p in products])
        bm_title = BM25Okapi([tokenize(p.title) for p in products])
        bm_class = BM25Okapi([tokenize(f"{p.product_class} {p.category_path}")
                              or tokenize(p.title) for p in products])
        text_tokens = [set(tokenize(p.text())) for p in products]
        self.index: dict[tuple[str, str], int] = {}
        raw: dict[str, list[np.ndarray]] = {n: [] for n in RICH_FEATURE_NAMES}
        qv: list[np.ndarray] = []
        pc: list[np.ndarray] = []
        for qid in data.query_ids:
            text = data.queries[qid].text
            pool = [j.product_id for j in data.judged(qid)]
            rows = builder.rows(pool)
            for pid in pool:
                self.index[(qid, pid)] = len(self.index)
            q = builder.query_vector(text)
            base = builder.raw_features(text, pool)
            for k, name in enumerate(FEATURE_NAMES):
                raw[name].append(base[:, k])
            raw["class_cosine"].append(classes[rows] @ q)
            raw["leaf_cosine"].append(leaves[rows] @ q)
            qt = tokenize(text)
            raw["bm25_title"].append(np.asarray(bm_title.get_batch_scores(qt, list(rows))))
            raw["bm25_class"].append(np.asarray(bm_class.get_batch_scores(qt, list(rows))))
            qs = set(qt)
            raw["coverage"].append(np.array(
                [len(qs & text_tokens[r]) / max(1, len(qs)) for r in rows]))
            full = builder.full[rows]
            top = np.argsort(-(full @ q), kind="stable")[:prf_top_k]
            centroid = full[top].mean(0)
            raw["prf_cosine"].append(full @ (centroid / max(1e-9, np.linalg.norm(centroid))))
            qv.append(np.repeat(q[None], len(rows), 0))
            pc.append(full - full.mean(0, keepdims=True))
        self.z = {n: np.concatenate([_standardise(v) for v in vals]).astype(np.float32)
                  for n, vals in raw.items()}
        self.query_vec = np.concatenate(qv).astype(np.float32)
        self.product_centred = np.concatenate(pc).astype(np.float32)
        self._mats: dict[tuple[tuple[str, ...], bool], np.ndarray] = {}

    def matrix(self, names: Sequence[str], *, adapter: bool = False) -> np.ndarray:
        """``[P, len(names)]`` (``+ 768`` with the adapter's query and centred product
        vectors) float32, memoised."""
        key = (tuple(names), adapter)
        mat = self._mats.get(key)
        if mat is None:
            cols = [self.z[n][:, None] for n in names]
            if adapter:
                cols += [self.query_vec, self.product_centred]
            mat = np.ascontiguousarray(np.concatenate(cols, 1), dtype=np.float32)
            self._mats[key] = mat
        return mat


def _standardise(x: np.ndarray) -> np.ndarray:
    std = float(x.std())
    return (x - x.mean()) / (std if std > 1e-6 else 1.0)


def build_pair_table(builder: FeatureBuilder) -> PairTable:
    """The catalog's :class:`PairTable` (a few seconds; embeddings come from the cache)."""
    return PairTable(builder)
