"""One in-process training round through a server strategy, with real Flower Messages."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy


class FixedGrid:
    """The part of Flower's Grid a strategy's ``configure_train`` uses: the node ids."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self._ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


def one_round(
    strategy: Strategy, sent: Mapping[str, np.ndarray], node_ids: Iterable[int],
    reply_for: Callable[[int], Mapping[str, Any]], metrics: Mapping[str, float],
) -> dict[str, np.ndarray]:
    """Round 1: ``sent`` goes to ``node_ids``; node ``n`` replies ``reply_for(n)`` with
    ``metrics``; the strategy's aggregate comes back as numpy arrays."""
    messages = list(strategy.configure_train(
        1, ArrayRecord({k: Array(np.asarray(v)) for k, v in sent.items()}), ConfigRecord(),
        FixedGrid(node_ids)))  # type: ignore[arg-type]
    replies = []
    for msg in messages:
        arrays = reply_for(msg.metadata.dst_node_id)
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord(dict(metrics)),
        })
        replies.append(Message(content, reply_to=msg))
    out, _ = strategy.aggregate_train(1, replies)
    if out is None:
        raise AssertionError("the strategy aggregated nothing")
    return {k: v.numpy() for k, v in out.items()}
