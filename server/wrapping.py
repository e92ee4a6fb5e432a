"""The one place a wrapping strategy hands evaluation and summaries to the strategy it wraps.

``ValidatingStrategy``, ``EvidenceSumming`` and ``ReleaseCarrier`` each change how training
is configured or aggregated; everything else goes to ``inner`` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class DelegatingStrategy(Strategy):
    """A Flower strategy around ``inner``: evaluation and ``summary`` go to ``inner``."""

    inner: Strategy

    def summary(self) -> None:
        self.inner.summary()

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
