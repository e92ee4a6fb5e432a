"""Strategy choice for the regional shape: Flower's FedAvg or FedAdam, uniform weights.

Replies reach the strategy through ``server.validation.ValidatingStrategy``: clipped, with
``num-examples`` rewritten to 1 (uniform weights: no node's claim sets its influence).

Aggregated train metrics carry only public or DP-protected values: ``epsilon`` (the max over
nodes: the run is only as private as its least private node), ``steps`` (max) and
``release-round`` (min). No count and no loss: Flower logs this record every round.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, Strategy

from shared_model.settings import RunSettings

# Aggregated train metric -> how it combines over replies.
TRAIN_METRICS: dict[str, Callable[[list[float]], float]] = {
    "epsilon": max, "steps": max, "release-round": min,
}


def aggregate_train_metrics(
    records: list[RecordDict],
    weighting_key: str,
    on_epsilon: Callable[[float], None] | None = None,
) -> MetricRecord:
    """Only :data:`TRAIN_METRICS` (ε max, steps max, release round min); no weights used."""
    del weighting_key  # uniform: nothing is weighted by a node's claim
    values: dict[str, list[float]] = {key: [] for key in TRAIN_METRICS}
    for record in records:
        for metrics in record.metric_records.values():
            for key, bucket in values.items():
                value = metrics.get(key)
                if type(value) in (int, float) and math.isfinite(float(value)):  # type: ignore[arg-type]
                    bucket.append(float(value))  # type: ignore[arg-type]
    out = MetricRecord({key: TRAIN_METRICS[key](v) for key, v in values.items() if v})
    if "epsilon" in out and on_epsilon is not None:
        on_epsilon(float(out["epsilon"]))  # type: ignore[arg-type]
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
