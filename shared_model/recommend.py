"""Recommendation without a query: "for you" lists computed on the device from its release.

Next-click prediction over the catalog: the list maximises the chance that the user's *next*
session clicks at least one listed product::

    P(next click in S) = Σ_q P_user(q) · (1 − Π_{p ∈ S} (1 − P(click p | q)))

built greedily, one product at a time, each with the largest marginal gain (a diversified
list: the second product of a likely query competes with the first product of the next one).

* ``P(click p | q)``: the public click rate of the query's products, from the release's
  memorised DP click evidence (:class:`PublicClicks`: the noisy click sums over the query's
  sessions, ``sessions(q) = Σ_p exam(q, p) / Σ_{r ≤ shown} 1/r``); post-processing of already
  differentially private sums, no other user's raw data. A query the evidence does not cover
  falls back to the release's head on the catalog's BM25 top ``candidates``:
  ``P(click p | q) = (1/rank_BM25) · sigmoid(logit)`` for the ``shown`` first ranks (the
  serving ranker's exposure under the position-based model).
* ``P_user(q) = Σ_c w_user(c) · P(q | c)``: the user's category weights, estimated from the
  user's own time-ordered history with empirical-Bayes shrinkage toward the public prior,
  ``w_user(c) = (n_c + prior_strength · π_c) / (Σ n + prior_strength)``, where ``n_c`` is the
  user's recency-decayed count of queries of category ``c`` (a query issued k sessions ago
  weighs 0.8**k: the order of the sessions matters), ``π_c`` the public share of sessions of
  category ``c`` and ``P(q | c)`` the public share of ``q`` among its category's sessions (both
  from the evidence; uniform without it). A query's category is the top-level category with
  the most public click mass among its products (without evidence: the most common among the
  release's top 10). ``own_query_weight`` adds the user's own decayed query frequencies.

Everything runs on the device: the release (head and evidence), the catalog and its BM25
index, the user state (:class:`~shared_model.personal.UserState`). No Flower, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared_model.personal import GlobalScorer, UserState


@dataclass(frozen=True)
class RecommendConfig:
    """Knobs of the recommender (defaults chosen once on a validation world, docs/results.md).

    Parameters
    ----------
    prior_strength
        Pseudo-sessions of the public category prior in the user's category estimate.
    own_query_weight
        Weight of the user's own decayed query frequencies added to ``P_user(q)``.
    click_category_weight
        Weight of the user's decayed clicks per product category, counted with their queries'
        categories in ``n_c``.
    shown
        Results a search session shows (the examination normaliser ``Σ_{r ≤ shown} 1/r``).
    candidates
        BM25 candidates per query when a query has no public click evidence.
    diversify
        Greedy coverage of the next session (True) or plain expected clicks (False).
    """

    prior_strength: float = 4.0
    own_query_weight: float = 0.0
    click_category_weight: float = 0.0
    shown: int = 10
    candidates: int = 100
    diversify: bool = True

    def __post_init__(self) -> None:
        if not (self.prior_strength > 0 and math.isfinite(self.prior_strength)):
            raise ValueError(f"prior_strength must be > 0, got {self.prior_strength!r}")
        for name in ("own_query_weight", "click_category_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.shown < 1:
            raise ValueError(f"shown must be >= 1, got {self.shown!r}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates!r}")


@dataclass(frozen=True)
class PublicClicks:
    """Public (DP-noised) click and examination sums per (query text, product).

    Parameters
    ----------
    queries : mapping
        ``query text -> (product_ids, clicks, exam)``: the released sums of the query's
        memorised products (any noise included; negative sums are read as 0).
    noise_var : float
        The public variance of the DP noise on each sum: a query whose summed exam is within
        4 noise sd of zero (``shared_model.evidence.query_has_traffic``) is treated as
        having no evidence.
    """

    queries: Mapping[str, tuple[Sequence[str], np.ndarray, np.ndarray]]
    noise_var: float = 0.0

    def has_traffic(self, text: str) -> bool:
        """Whether the query's released sums show traffic beyond the noise."""
        from shared_model.evidence import query_has_traffic

        hit = self.queries.get(text)
        return hit is not None and query_has_traffic(np.asarray(hit[2]), self.noise_var)

    @classmethod
    def from_evidence_arrays(
        cls, data: Any, index: Any, clicks: np.ndarray, exam: np.ndarray,
        noise_var: float = 0.0,
    ) -> PublicClicks:
        """From the server's evidence arrays (``shared_model.evidence``: an
        ``EvidenceIndex`` numbering, its ``clicks``/``exam`` sums and their noise
        variance), keyed by query text."""
        out: dict[str, tuple[Sequence[str], np.ndarray, np.ndarray]] = {}
        for q in index.query_ids:
            pids = index.products[q]
            lo = index.offsets[q]
            c = np.asarray(clicks[lo : lo + len(pids)], dtype=np.float64)
            e = np.asarray(exam[lo : lo + len(pids)], dtype=np.float64)
            query = data.queries.get(q)
            out[query.text if query is not None else q] = (list(pids), c, e)
        return cls(out, float(noise_var))


class Recommender:
    """"For you" lists from a user state, the release and the catalog (module docstring).

    Parameters
    ----------
    builder : FeatureBuilder
        The catalog (product ids, categories, BM25 index).
    global_scores : callable
        The release's scorer ``(query_text, product_ids) -> logits`` (e.g.
        ``DeviceRanker.scores``), used for queries without public clicks.
    config : RecommendConfig, optional
        Knobs (default :class:`RecommendConfig`).
    catalog_queries : sequence of str, optional
        Query texts the device knows (default: the catalog's judged queries).
    public_clicks : PublicClicks, optional
        The release's click evidence (default: none; every query uses the head).
    """

    def __init__(
        self,
        builder: Any,
        global_scores: GlobalScorer,
        config: RecommendConfig | None = None,
        *,
        catalog_queries: Sequence[str] | None = None,
        public_clicks: PublicClicks | None = None,
    ) -> None:
        self.builder = builder
        self.global_scores = global_scores
        self.config = config or RecommendConfig()
        self.public_clicks = public_clicks
        if catalog_queries is None:
            queries = getattr(getattr(builder, "data", None), "queries", {}) or {}
            catalog_queries = [queries[k].text for k in sorted(queries)]
        self.catalog_queries = list(dict.fromkeys(catalog_queries))
        self._row: dict[str, tuple[np.ndarray, np.ndarray, str, float]] = {}
        self._prior: tuple[list[str], np.ndarray, dict[str, int]] | None = None

    # -- public click model per query ------------------------------------------------------

    def _query_clicks(self, text: str) -> tuple[np.ndarray, np.ndarray, str, float]:
        """(catalog rows, P(click | q), category, public sessions) of one query, memoised."""
        hit = self._row.get(text)
        if hit is not None:
            return hit
        builder, cfg = self.builder, self.config
        products = builder.data.products
        norm = float(np.sum(1.0 / np.arange(1, cfg.shown + 1)))
        evidence = self.public_clicks
        public = evidence.queries.get(text) if evidence else None
        # The public session count (noisy; unbiased) weighs the query in the prior even when
        # its click sums are too noisy to read (no traffic beyond 4 noise sd): then the head
        # estimates its click rates.
        sessions = max(float(np.sum(public[2])), 0.0) / norm if public is not None else 0.0
        if public is not None and not evidence.has_traffic(text):  # type: ignore[union-attr]
            public = None
        if public is not None:
            pids, clicks, exam = public
            known = [i for i, p in enumerate(pids) if p in builder.product_row]
            ids = [pids[i] for i in known]
            c = np.maximum(np.asarray(clicks, np.float64)[known], 0.0)
            prob = np.minimum(c / sessions, 1.0)
            mass: dict[str, float] = {}
            for p, m in zip(ids, c.tolist(), strict=True):
                cat = products[p].top_category
                mass[cat] = mass.get(cat, 0.0) + m
        else:
            from shared_model.scoring import top_by_bm25

            ids = top_by_bm25(builder, text, cfg.candidates)
            logits = np.asarray(self.global_scores(text, ids), dtype=np.float64)
            exposure = np.zeros(len(ids))
            k = min(cfg.shown, len(ids))
            exposure[:k] = 1.0 / np.arange(1, k + 1)
            prob = exposure / (1.0 + np.exp(-logits))
            order = np.lexsort((np.arange(len(ids)), -logits))[:10]
            mass = {}
            for i in order.tolist():
                cat = products[ids[i]].top_category
                mass[cat] = mass.get(cat, 0.0) + 1.0
        category = min(mass, key=lambda c: (-mass[c], c)) if mass else ""
        hit = (builder.rows(ids), prob, category, sessions)
        self._row[text] = hit
        return hit

    def query_category(self, text: str) -> str:
        """The query's top-level category (most public click mass, else the release's top 10)."""
        return self._query_clicks(text)[2]

    def _catalog_prior(self) -> tuple[list[str], np.ndarray, dict[str, int]]:
        """Catalog queries, their public session shares and category index (memoised)."""
        if self._prior is None:
            texts = self.catalog_queries
            sessions = np.array([self._query_clicks(t)[3] for t in texts], dtype=np.float64)
            if sessions.sum() <= 0:
                sessions = np.ones(len(texts))
            cats = sorted({self._query_clicks(t)[2] for t in texts})
            self._prior = (texts, sessions / sessions.sum(), {c: i for i, c in enumerate(cats)})
        return self._prior

    # -- the user's next query -------------------------------------------------------------

    def next_queries(self, state: UserState) -> dict[str, float]:
        """P(next query) for the user (module docstring); sums to 1, empty without history."""
        if state.sessions == 0 or not state.queries:
            return {}
        cfg = self.config
        texts, share, cat_index = self._catalog_prior()
        out: dict[str, float] = {}
        if texts:
            qcat = np.array([cat_index[self.query_category(t)] for t in texts])
            pi = np.bincount(qcat, weights=share, minlength=len(cat_index))
            own = np.zeros(len(cat_index))
            for text, weight in state.queries.items():
                c = cat_index.get(self.query_category(text))
                if c is not None:
                    own[c] += weight
            if cfg.click_category_weight:
                for cat, weight in state.categories.items():
                    c = cat_index.get(cat)
                    if c is not None:
                        own[c] += cfg.click_category_weight * weight
            w = (own + cfg.prior_strength * pi) / (own.sum() + cfg.prior_strength)
            within = share / np.where(pi[qcat] > 0, pi[qcat], 1.0)
            for t, p in zip(texts, (w[qcat] * within).tolist(), strict=True):
                out[t] = p
        if cfg.own_query_weight > 0 or not out:
            own_w = state.query_weights()
            scale = cfg.own_query_weight if out else 1.0
            for t, p in own_w.items():
                out[t] = out.get(t, 0.0) + scale * p
        total = sum(out.values())
        return {t: p / total for t, p in out.items() if p > 0} if total > 0 else {}

    # -- the list ------------------------------------------------------------------------------

    def recommend(self, state: UserState, top: int = 10) -> list[tuple[str, float]]:
        """The ``top`` products for this user, best first, as (product id, score).

        The score is the product's marginal gain in P(next session clicks the list) when it
        was added (``diversify``), else its expected clicks in the next session; ties by id.
        A user with no history gets an empty list (nothing on the device to go on).
        """
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top!r}")
        queries = self.next_queries(state)
        if not queries:
            return []
        texts = sorted(queries)
        parts = [self._query_clicks(t) for t in texts]
        cols = np.unique(np.concatenate([rows for rows, *_ in parts]))
        where = {int(r): i for i, r in enumerate(cols.tolist())}
        clicks = np.zeros((len(texts), len(cols)))
        for i, (rows, prob, _, _) in enumerate(parts):
            idx = np.fromiter((where[int(r)] for r in rows), np.int64, count=len(rows))
            np.maximum.at(clicks[i], idx, prob)
        pq = np.array([queries[t] for t in texts])
        # Ties by product id: catalog rows are in sorted id order, so the lowest column wins.
        if not self.config.diversify:
            expected = pq @ clicks
            order = np.lexsort((cols, -expected))[:top]
            ids = self.builder.product_ids
            return [(ids[int(cols[j])], float(expected[j])) for j in order.tolist()
                    if expected[j] > 0]
        miss = np.ones(len(texts))
        taken = np.zeros(len(cols), dtype=bool)
        out: list[tuple[str, float]] = []
        for _ in range(min(top, len(cols))):
            gain = (pq * miss) @ clicks
            gain[taken] = -1.0
            j = int(np.argmax(gain))
            if gain[j] <= 0:
                break
            taken[j] = True
            out.append((self.builder.product_ids[int(cols[j])], float(gain[j])))
            miss = miss * (1.0 - clicks[:, j])
        return out


def recommend_ids(
    recommender: Recommender, state: UserState, top: int = 10
) -> Sequence[str]:
    """Just the product ids of :meth:`Recommender.recommend`."""
    return [p for p, _ in recommender.recommend(state, top)]
