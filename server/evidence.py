"""Server side of the memorised evidence: it is summed over nodes, not averaged.

Each node replies "the evidence it was sent + its own noisy counts" once, and exactly what it
was sent afterwards (``client.evidence_release``). The new global evidence is therefore the
evidence sent plus the sum of the replies' deltas. Flower's FedAvg (uniform weights, as the
validating strategy enforces) hands back the mean of the replies; with ``n`` replies,
``sent + n * (mean - sent)`` is that sum (:func:`evidence_from_mean`); the
:class:`EvidenceSumming` wrapper sums the replies directly, whatever the weights. Head
weights stay averaged.

The evidence arrays are excluded from the update-norm clip/reject of reply validation: their
deltas are DP counts (a node's noise alone has norm ~ noise_std * sqrt(2 * pairs)), bounded
per user by the node's clip, not a training update.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from shared_model.evidence import EVIDENCE_KEYS, EvidenceIndex, empty_evidence


def initial_evidence(index: EvidenceIndex) -> dict[str, np.ndarray]:
    """The evidence arrays the first round sends (zeros over the catalog index)."""
    return empty_evidence(index)


def head_only(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays reply validation measures an update over (evidence left out)."""
    return {k: v for k, v in arrays.items() if k not in EVIDENCE_KEYS}


def sum_evidence(
    sent: Mapping[str, np.ndarray], replies: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Evidence sent plus every reply's delta (float32)."""
    out = {}
    for key in EVIDENCE_KEYS:
        base = np.asarray(sent[key], dtype=np.float64)
        total = base + sum(
            (np.asarray(r[key], dtype=np.float64) - base for r in replies),
            np.zeros_like(base),
        )
        out[key] = total.astype(np.float32)
    return out


def evidence_from_mean(
    sent: Mapping[str, np.ndarray], aggregated: Mapping[str, np.ndarray], num_replies: int
) -> dict[str, np.ndarray]:
    """Replace the averaged evidence in FedAvg's result by the sum (``sent + n·(mean-sent)``)."""
    out = dict(aggregated)
    for key in EVIDENCE_KEYS:
        if key in aggregated:
            base = np.asarray(sent[key], dtype=np.float64)
            mean = np.asarray(aggregated[key], dtype=np.float64)
            out[key] = (base + num_replies * (mean - base)).astype(np.float32)
    return out


class EvidenceSumming(Strategy):
    """Wraps the aggregation strategy: head weights as it aggregates them, evidence summed.

    Sits between reply validation and FedAvg/FedAdam; every reply it sees was accepted.
    The evidence sum is computed from the replies themselves (``sum_evidence``), so it does
    not depend on how the inner strategy weighs nodes.
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self._sent: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = {k: v.numpy() for k, v in arrays.items() if k in EVIDENCE_KEYS}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [m for m in replies if not m.has_error()]
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None or not self._sent:
            return arrays, metrics
        received = []
        for msg in replies:
            record = next(iter(msg.content.array_records.values()))
            received.append({k: record[k].numpy() for k in EVIDENCE_KEYS})
        total = sum_evidence(self._sent, received)
        out = {k: v.numpy() for k, v in arrays.items()}
        out.update(total)
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in out.items()}), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
