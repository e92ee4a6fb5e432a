"""Query-product features the ranker head sees: a few dense, query-independent signals.

Why features instead of raw embeddings: with 40 judged queries, a head over the 384-d
embeddings overfits the training queries (measured: held-out NDCG@10 fell below zero-shot),
and DP noise grows with the number of trained parameters. A handful of features that mean
the same thing for every query generalise to new queries and keep the head tiny.

Features (``FEATURE_NAMES``), each for one (query, product) pair:
  0. ``cosine``: MiniLM cosine of the query and the product's full text (zero-shot score);
  1. ``title_cosine``: cosine with the product title alone;
  2. ``category_cosine``: cosine with the category path (title when the path is empty);
  3. ``bm25``: BM25 of the query over the product text (global IDF);
  4-9. issue 9's per-field signals (``RICH_FEATURE_NAMES``' notes): class and leaf-category
  cosines, BM25 over title and over class + category, query-token coverage, and a
  pseudo-relevance-feedback cosine. With only the first 4, the head ranked the held-out
  queries of 2 of 5 folds below zero-shot; with all 10 it does not (docs/results.md,
  "Semantic adapter / generalising features").

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
from rank_bm25 import BM25Okapi

from shared_model.bm25 import Bm25Ranker, tokenize
from shared_model.encoder import CachedEncoder
from shared_model.schema import JudgedSearchData

BASE_FEATURE_NAMES = ("cosine", "title_cosine", "category_cosine", "bm25")
"""The first head's 4 features (before issue 9's per-field features)."""

RICH_FEATURE_NAMES = (
    *BASE_FEATURE_NAMES,
    "class_cosine", "leaf_cosine", "bm25_title", "bm25_class", "coverage", "prf_cosine",
)
"""Adds per-field signals that mean the same for every query (measured in
``simulations.adapter_study``): ``class_cosine`` (query vs product class), ``leaf_cosine``
(vs the category path's last level), ``bm25_title`` / ``bm25_class`` (BM25 over the title /
class + category path, global IDF), ``coverage`` (share of the query's tokens found in the
product text), ``prf_cosine`` (pseudo-relevance feedback: cosine of the product with the
centroid of the candidate pool's top ``PRF_TOP_K`` products by zero-shot cosine; uses no
clicks and no labels)."""

FEATURE_NAMES = RICH_FEATURE_NAMES
NUM_FEATURES = len(FEATURE_NAMES)
PRF_TOP_K = 5


class FeatureBuilder:
    """Computes ``[N, num_features]`` float32 features for a query and candidate products.

    Product-side embeddings are encoded once through the on-disk cache; a query is encoded on
    first use and memoised.

    Parameters
    ----------
    data
        The catalog (queries, products, judgments).
    encoder
        The cached MiniLM encoder.
    feature_names
        Which of ``RICH_FEATURE_NAMES`` to compute, in order; the first must be
        ``"cosine"`` (the head's zero-shot start puts its weight there). Default: the
        production set ``FEATURE_NAMES``.
    prf_top_k
        Pool products whose centroid defines ``prf_cosine``.
    """

    def __init__(
        self,
        data: JudgedSearchData,
        encoder: CachedEncoder,
        *,
        feature_names: Sequence[str] = FEATURE_NAMES,
        prf_top_k: int = PRF_TOP_K,
    ) -> None:
        unknown = [n for n in feature_names if n not in RICH_FEATURE_NAMES]
        if unknown or not feature_names or feature_names[0] != "cosine":
            raise ValueError(
                f"feature_names must start with 'cosine' and come from {RICH_FEATURE_NAMES}, "
                f"got {tuple(feature_names)!r}"
            )
        if prf_top_k < 1:
            raise ValueError(f"prf_top_k must be >= 1, got {prf_top_k!r}")
        self.data = data
        self.encoder = encoder
        self.feature_names = tuple(feature_names)
        self.num_features = len(self.feature_names)
        self.prf_top_k = prf_top_k
        self.product_ids = sorted(data.products)
        self.product_row = {pid: i for i, pid in enumerate(self.product_ids)}
        products = [data.products[p] for p in self.product_ids]
        self.full = encoder.encode([p.text() for p in products])
        self.title = encoder.encode([p.title for p in products])
        self.category = encoder.encode([p.category_path or p.title for p in products])
        self.bm25 = Bm25Ranker(data)
        wanted = set(self.feature_names)
        self.product_class = (
            encoder.encode([p.product_class or p.title for p in products])
            if "class_cosine" in wanted else None
        )
        self.leaf = (
            encoder.encode([_leaf(p.category_path) or p.title for p in products])
            if "leaf_cosine" in wanted else None
        )
        self._bm25_title = (
            BM25Okapi([tokenize(p.title) for p in products]) if "bm25_title" in wanted else None
        )
        self._bm25_class = (
            BM25Okapi([tokenize(f"{p.product_class} {p.category_path}") or tokenize(p.title)
                       for p in products])
            if "bm25_class" in wanted else None
        )
        self._tokens = (
            [frozenset(tokenize(p.text())) for p in products] if "coverage" in wanted else None
        )
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

    def raw_features(
        self,
        query_text: str,
        product_ids: Sequence[str],
        *,
        pool_ids: Sequence[str] | None = None,
        query_vector: np.ndarray | None = None,
    ) -> np.ndarray:
        """Unstandardised ``[len(product_ids), num_features]`` float32.

        ``pool_ids`` (default: the products given) is the candidate pool ``prf_cosine``'s
        centroid comes from; ``query_vector`` (default: the memoised encoding of
        ``query_text``) lets on-device scoring pass its own without recording the query.
        """
        rows = self.rows(product_ids)
        q = self.query_vector(query_text) if query_vector is None else query_vector
        out = np.empty((len(rows), self.num_features), dtype=np.float32)
        tokens = tokenize(query_text)
        for k, name in enumerate(self.feature_names):
            out[:, k] = self._column(name, query_text, tokens, q, rows, product_ids, pool_ids)
        return out

    def _column(self, name: str, query_text: str, tokens: list[str], q: np.ndarray,
                rows: np.ndarray, product_ids: Sequence[str],
                pool_ids: Sequence[str] | None) -> np.ndarray:
        if name == "cosine":
            return self.full[rows] @ q
        if name == "title_cosine":
            return self.title[rows] @ q
        if name == "category_cosine":
            return self.category[rows] @ q
        if name == "bm25":
            return self.bm25.score(query_text, product_ids)
        if name == "class_cosine" and self.product_class is not None:
            return self.product_class[rows] @ q
        if name == "leaf_cosine" and self.leaf is not None:
            return self.leaf[rows] @ q
        if name == "bm25_title" and self._bm25_title is not None:
            return np.asarray(self._bm25_title.get_batch_scores(tokens, rows.tolist()))
        if name == "bm25_class" and self._bm25_class is not None:
            return np.asarray(self._bm25_class.get_batch_scores(tokens, rows.tolist()))
        if name == "coverage" and self._tokens is not None:
            wanted = set(tokens)
            return np.array([len(wanted & self._tokens[r]) / max(1, len(wanted)) for r in rows])
        if name == "prf_cosine":
            pool = self.rows(pool_ids) if pool_ids else rows
            pool_vecs = self.full[pool]
            top = np.argsort(-(pool_vecs @ q), kind="stable")[: self.prf_top_k]
            centroid = pool_vecs[top].mean(0)
            return self.full[rows] @ (centroid / max(1e-9, float(np.linalg.norm(centroid))))
        raise ValueError(f"feature {name!r} was not prepared by this builder")

    def pool_stats(self, query_text: str, pool_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and std ``[num_features]`` over a query's candidate pool."""
        key = (query_text, len(pool_ids), hash(tuple(pool_ids)))
        stats = self._stats.get(key)
        if stats is None:
            stats = _mean_std(self.raw_features(query_text, pool_ids, pool_ids=pool_ids))
            self._stats[key] = stats
        return stats

    def features(
        self,
        query_text: str,
        product_ids: Sequence[str],
        *,
        pool_ids: Sequence[str] | None = None,
    ) -> np.ndarray:
        """``[len(product_ids), num_features]`` float32, standardised over ``pool_ids``
        (default: the products given)."""
        if not product_ids:
            return np.zeros((0, self.num_features), dtype=np.float32)
        pool = pool_ids if pool_ids else product_ids
        mean, std = self.pool_stats(query_text, pool)
        raw = self.raw_features(query_text, product_ids, pool_ids=pool)
        return ((raw - mean) / std).astype(np.float32)

    def candidate_features(
        self, query_text: str, query_vector: np.ndarray, candidate_ids: Sequence[str]
    ) -> np.ndarray:
        """:meth:`features` with the candidates as the pool, for a given query vector and
        memo-free (on-device scoring: the query is not recorded in the builder)."""
        if not candidate_ids:
            return np.zeros((0, self.num_features), dtype=np.float32)
        raw = self.raw_features(query_text, candidate_ids, pool_ids=candidate_ids,
                                query_vector=query_vector)
        mean, std = _mean_std(raw)
        return ((raw - mean) / std).astype(np.float32)

    def features_for_query_id(self, query_id: str, product_ids: Sequence[str]) -> np.ndarray:
        """As :meth:`features`, with the query's text and judged pool from the catalog."""
        query = self.data.queries.get(query_id)
        if query is None:
            raise KeyError(f"unknown query_id {query_id!r}")
        pool = [j.product_id for j in self.data.judged(query_id)]
        return self.features(query.text, product_ids, pool_ids=pool)


def _leaf(category_path: str) -> str:
    return category_path.split(" / ")[-1].strip() if category_path else ""


def _mean_std(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    std = raw.std(0)
    return raw.mean(0), np.where(std > 1e-6, std, 1.0).astype(np.float32)


class PairTable:
    """Every judged (query, product) pair's features, standardised per query over its pool
    (the study's precomputed view of :class:`FeatureBuilder` with ``RICH_FEATURE_NAMES``).

    Attributes
    ----------
    index
        ``(query_id, product_id) -> row``.
    z
        ``name -> [P]`` float32 standardised feature.
    query_vec, product_centred
        ``[P, 384]``: the query's embedding and the product's minus its pool's mean (the
        adapter's inputs).
    """

    def __init__(self, builder: FeatureBuilder) -> None:
        if builder.feature_names != RICH_FEATURE_NAMES:
            builder = FeatureBuilder(builder.data, builder.encoder,
                                     feature_names=RICH_FEATURE_NAMES,
                                     prf_top_k=builder.prf_top_k)
        data = builder.data
        self.data = data
        self.index: dict[tuple[str, str], int] = {}
        feats, qv, pc = [], [], []
        for qid in data.query_ids:
            pool = [j.product_id for j in data.judged(qid)]
            for pid in pool:
                self.index[(qid, pid)] = len(self.index)
            feats.append(builder.features_for_query_id(qid, pool))
            full = builder.full[builder.rows(pool)]
            qv.append(np.repeat(builder.query_vector(data.queries[qid].text)[None], len(pool), 0))
            pc.append(full - full.mean(0, keepdims=True))
        z = np.concatenate(feats)
        self.z = {n: z[:, k].astype(np.float32) for k, n in enumerate(RICH_FEATURE_NAMES)}
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


def build_pair_table(builder: FeatureBuilder) -> PairTable:
    """The catalog's :class:`PairTable` (seconds; embeddings come from the cache)."""
    return PairTable(builder)
