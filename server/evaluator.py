"""Central evaluation of the global head on the held-out fold's queries."""

from __future__ import annotations

import numpy as np

from shared_model.catalog import cached_feature_builder
from shared_model.evaluation import evaluate, head_scorer, query_folds
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.settings import RunSettings
from shared_model.state import load_head_state


class CentralEvaluator:
    """NDCG@10 / MRR / AUC of weights on queries no node ever trains on."""

    def __init__(self, settings: RunSettings) -> None:
        self.builder = cached_feature_builder(str(settings.catalog_path()), settings.cache_dir)
        data = self.builder.data
        folds = query_folds(data.query_ids, num_folds=settings.num_folds, seed=settings.seed)
        self.test_queries = folds[settings.eval_fold]
        self.head_config = HeadConfig(hidden_dim=settings.hidden_dim)

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        head = RankerHead(self.head_config)
        load_head_state(head, arrays)
        return evaluate(self.builder.data, self.test_queries, head_scorer(head, self.builder))
