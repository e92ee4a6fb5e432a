"""Strategy choice for the regional shape: Flower's FedAvg or FedAdam, weighted by examples.

Aggregated train metrics: example-weighted means, except ``epsilon`` (the max over nodes:
the run is only as private as its least private node).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from shared_model.settings import RunSettings


def aggregate_train_metrics(
    records: list[RecordDict],
    weighting_key: str,
    on_epsilon: Callable[[float], None] | None = None,
) -> MetricRecord:
    """Weighted means (Flower's) with ``epsilon`` replaced by the max over replies."""
    out = aggregate_metricrecords(records, weighting_key)
    eps = [
        float(value)
        for r in records
        for m in r.metric_records.values()
        if isinstance(value := m.get("epsilon"), int | float)
    ]
    if eps:
        out["epsilon"] = max(eps)
        if on_epsilon is not None:
            on_epsilon(max(eps))
    return out


def build_strategy(
    settings: RunSettings, *, on_epsilon: Callable[[float], None] | None = None
) -> Strategy:
    """FedAvg or FedAdam per ``settings.strategy``; no federated evaluation (central only).

    ``on_epsilon`` receives the max ε the nodes reported in each aggregated round.
    """
    common: dict[str, Any] = dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=settings.min_train_nodes,
        min_available_nodes=settings.min_train_nodes,
        train_metrics_aggr_fn=functools.partial(aggregate_train_metrics, on_epsilon=on_epsilon),
    )
    if settings.strategy == "fedadam":
        return FedAdam(**common, eta=settings.server_learning_rate, eta_l=settings.learning_rate)
    return FedAvg(**common)


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Arrays a resumed run needs to continue the strategy (FedAdam's moments)."""
    state: dict[str, np.ndarray] = {}
    for name in ("m_t", "v_t"):
        moments = getattr(strategy, name, None)
        if moments:
            state.update({f"{name}/{k}": np.asarray(v) for k, v in moments.items()})
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Inverse of :func:`strategy_state`."""
    for name in ("m_t", "v_t"):
        moments = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(name + "/")}
        if moments and hasattr(strategy, name):
            setattr(strategy, name, moments)
