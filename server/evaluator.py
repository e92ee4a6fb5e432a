"""Central evaluation of the global model on two views of the queries.

Unseen: the held-out fold's queries (no node ever trains on their clicks). Seen: the fold's
training queries, whose clicks the nodes learn from. Both are judged against the human
grades, beside zero-shot MiniLM and BM25 on the same queries (``baselines``).

The global state may carry memorised click evidence (``shared_model.evidence``): then the
model scores with it, shrunk toward the head's score by the evidence's noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared_model.catalog import cached_feature_builder
from shared_model.evaluation import (
    Scorer,
    bm25_scorer,
    cosine_scorer,
    evaluate_views,
    head_scorer,
    nest_views,
    seen_unseen_queries,
)
from shared_model.evidence import EvidenceIndex, EvidenceModel, split_evidence
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.release_evidence import ReleaseEvidence
from shared_model.settings import RunSettings
from shared_model.state import load_head_state


class CentralEvaluator:
    """NDCG@10 / MRR / AUC of weights on unseen and seen queries.

    Returns flat metrics (``shared_model.evaluation.evaluate_views``); ``baselines`` holds
    ``{"zero_shot": {"seen": ..., "unseen": ...}, "bm25": {...}}`` for the same queries.
    """

    def __init__(self, settings: RunSettings) -> None:
        self.builder = cached_feature_builder(str(settings.catalog_path()), settings.cache_dir)
        data = self.builder.data
        self.seen_queries, self.test_queries = seen_unseen_queries(
            data.query_ids,
            num_folds=settings.num_folds,
            seed=settings.seed,
            eval_fold=settings.eval_fold,
        )
        self.head_config = HeadConfig(hidden_dim=settings.hidden_dim)
        self._index: EvidenceIndex | None = None
        self.baselines: dict[str, Any] = {
            name: nest_views(self._views(scorer))
            for name, scorer in (
                ("zero_shot", cosine_scorer(self.builder)),
                ("bm25", bm25_scorer(self.builder)),
            )
        }

    def _views(self, scorer: Scorer) -> dict[str, float]:
        return evaluate_views(self.builder.data, self.seen_queries, self.test_queries, scorer)

    def evidence_index(self) -> EvidenceIndex:
        """The catalog's (query, product) index the evidence arrays are laid out on."""
        if self._index is None:
            self._index = EvidenceIndex(self.builder.data)
        return self._index

    def scorer(self, arrays: dict[str, np.ndarray]) -> Scorer:
        """The global model's scorer: the head, with memorised evidence when present."""
        head_arrays, evidence = split_evidence(arrays)
        head = RankerHead(self.head_config)
        load_head_state(head, head_arrays)
        base = head_scorer(head, self.builder)
        if evidence is None:
            return base
        return EvidenceModel(self.evidence_index(), evidence, base)

    def release_evidence(self, arrays: dict[str, np.ndarray]) -> ReleaseEvidence | None:
        """What a release of ``arrays`` carries of the memorised evidence (``None`` when the
        state has none): the scorer's evidence model packed per seen query."""
        model = self.scorer(arrays)
        if not isinstance(model, EvidenceModel):
            return None
        return ReleaseEvidence.from_model(model, self.builder.data, self.builder.product_ids)

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        return self._views(self.scorer(arrays))
