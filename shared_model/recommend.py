"""Recommendation without a query: "for you" lists computed on the device from its release.

Next-click prediction over the catalog from the user's private state
(:class:`~shared_model.personal.UserState`, learned from the user's time-ordered sessions)::

    P(next click = p) ≈ Σ_q P_user(q) · P(p | q)  +  explore_weight · P_taste(p)

* ``P_user(q)``: the user's next-query distribution, their recency-decayed query counts
  (session order matters: a query issued k sessions ago weighs 0.8**k);
* ``P(p | q)``: softmax (temperature ``temperature``) over the query's candidates (the
  catalog's BM25 top ``candidates``) of the *personalized* release scores
  (:func:`~shared_model.personal.personal_scores`: the signed global head, re-weighted by the
  user's category affinity);
* ``P_taste(p)``: softmax over the whole catalog of the cosine of the user vector with the
  product embeddings, scaled by ``taste_sharpness``: products like the ones the user clicked,
  for needs not seen in their history yet.

Everything runs on the device: the release's head, the catalog embeddings and BM25 index, the
user state. No Flower, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared_model.personal import GlobalScorer, PersonalConfig, UserState, personal_scores


@dataclass(frozen=True)
class RecommendConfig:
    """Knobs of the recommender (defaults measured once, docs/results.md)."""

    candidates: int = 100
    temperature: float = 0.5
    explore_weight: float = 0.1
    taste_sharpness: float = 20.0
    query_prior_weight: float = 3.0
    taste_power: float = 1.0
    exposure_weight: float = 1.0
    relevance: str = "softmax"
    personal: PersonalConfig = PersonalConfig()

    def __post_init__(self) -> None:
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.relevance not in ("softmax", "sigmoid"):
            raise ValueError(f"relevance must be 'softmax' or 'sigmoid', got {self.relevance!r}")
        if not (self.explore_weight >= 0 and math.isfinite(self.explore_weight)):
            raise ValueError(f"explore_weight must be >= 0, got {self.explore_weight!r}")


def _softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


class Recommender:
    """"For you" lists from a user state, the release's scorer and the catalog.

    ``global_scores(query_text, product_ids) -> logits`` is the release's scorer (e.g.
    ``DeviceRanker.scores``); its per-query results are memoised (bounded by the number of
    distinct query texts a state holds, at most 64 per user).
    """

    def __init__(
        self,
        builder: Any,
        global_scores: GlobalScorer,
        config: RecommendConfig | None = None,
        *,
        catalog_queries: Sequence[str] | None = None,
    ) -> None:
        from shared_model.scoring import top_by_bm25

        self.builder = builder
        self.global_scores = global_scores
        self.config = config or RecommendConfig()
        self._top_by_bm25 = top_by_bm25
        self._memo: dict[str, tuple[list[str], np.ndarray]] = {}
        if catalog_queries is None:
            data = getattr(builder, "data", None)
            queries = getattr(data, "queries", {}) or {}
            catalog_queries = [queries[k].text for k in sorted(queries)]
        self.catalog_queries = list(dict.fromkeys(catalog_queries))
        self._query_category: dict[str, str] = {}

    def query_category(self, text: str) -> str:
        """The top-level category most common among the release's top 10 for ``text``."""
        cat = self._query_category.get(text)
        if cat is None:
            ids, glob = self._candidates(text)
            top = [ids[i] for i in np.lexsort((np.arange(len(ids)), -glob))[:10]]
            products = self.builder.data.products  # type: ignore[attr-defined]
            counts: dict[str, int] = {}
            for p in top:
                c = products[p].top_category
                counts[c] = counts.get(c, 0) + 1
            cat = min(counts, key=lambda c: (-counts[c], c)) if counts else ""
            self._query_category[text] = cat
        return cat

    def next_queries(self, state: UserState) -> dict[str, float]:
        """P(next query): the user's own decayed query counts, mixed with the catalog's known
        queries weighted by the user's category affinity (``query_prior_weight``)."""
        own = state.query_weights()
        cfg = self.config
        if cfg.query_prior_weight <= 0 or not self.catalog_queries or state.clicks == 0:
            return own
        texts = self.catalog_queries
        aff = state.affinity([self.query_category(t) for t in texts]) ** cfg.taste_power
        prior = aff / aff.sum()
        out = {t: cfg.query_prior_weight * float(p) for t, p in zip(texts, prior, strict=True)}
        for t, w in own.items():
            out[t] = out.get(t, 0.0) + w
        total = sum(out.values())
        return {t: w / total for t, w in out.items()}

    def _candidates(self, text: str) -> tuple[list[str], np.ndarray]:
        hit = self._memo.get(text)
        if hit is None:
            ids = self._top_by_bm25(self.builder, text, self.config.candidates)
            hit = (ids, np.asarray(self.global_scores(text, ids), dtype=np.float32))
            if len(self._memo) >= 256:
                self._memo.clear()
            self._memo[text] = hit
        return hit

    def scores(self, state: UserState) -> dict[str, float]:
        """P(next click) estimate per product with non-zero mass."""
        cfg = self.config
        mass: dict[str, float] = {}
        for text, weight in sorted(self.next_queries(state).items()):
            ids, glob = self._candidates(text)
            if not ids:
                continue
            logits = personal_scores(
                glob, ids, state, self.builder, cfg.personal, query_text=text
            )
            if cfg.exposure_weight:
                # The serving ranker (BM25) shows its top first: log P(examined) = -log(rank).
                logits = logits - cfg.exposure_weight * cfg.temperature * np.log(
                    np.arange(1, len(ids) + 1, dtype=np.float32)
                )
            if cfg.relevance == "sigmoid":
                # P(click | q, p) = P(examined | BM25 rank) * P(relevant): the release's head
                # is a PAL relevance logit; the state's terms shift it.
                shift = logits - personal_scores(glob, ids, None, self.builder)
                exam = np.arange(1, len(ids) + 1, dtype=np.float64) ** -cfg.exposure_weight
                probs = exam / (1.0 + np.exp(-(glob + shift)))
                probs = probs / probs.sum()
            else:
                probs = _softmax(logits, cfg.temperature)
            for pid, p in zip(ids, probs, strict=True):
                mass[pid] = mass.get(pid, 0.0) + weight * float(p)
        v = state.unit_vector()
        if v is not None and cfg.explore_weight > 0:
            full = self.builder.full  # type: ignore[attr-defined]
            taste = _softmax(full @ v, 1.0 / cfg.taste_sharpness)
            top = np.argpartition(-taste, min(len(taste) - 1, 200))[:200]
            ids_all = self.builder.product_ids  # type: ignore[attr-defined]
            for i in top.tolist():
                pid = ids_all[i]
                mass[pid] = mass.get(pid, 0.0) + cfg.explore_weight * float(taste[i])
        return mass

    def recommend(self, state: UserState, top: int = 10) -> list[tuple[str, float]]:
        """The ``top`` products for this user, best first, as (product id, score); ties by id.

        A user with no history gets an empty list (nothing on the device to go on).
        """
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top!r}")
        mass = self.scores(state)
        ranked = sorted(mass.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(p, float(s)) for p, s in ranked[:top]]


def recommend_ids(
    recommender: Recommender, state: UserState, top: int = 10
) -> Sequence[str]:
    """Just the product ids of :meth:`Recommender.recommend`."""
    return [p for p, _ in recommender.recommend(state, top)]
