"""Reply validation: reject a node's malformed update before it reaches aggregation.

Pure numpy checks (``reply_problems``) plus a strategy wrapper that drops bad replies with
one log line naming the node and the reason, so one broken node never poisons a round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from shared_model.evidence import EVIDENCE_KEYS

log = logging.getLogger("fedrank.server")

REQUIRED_METRICS = ("num-examples", "epsilon")


def reply_problems(
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, float],
    *,
    reference: Mapping[str, np.ndarray],
    max_update_norm: float,
) -> list[str]:
    """Why a reply cannot be aggregated (empty list = fine).

    Checks keys, shapes, dtypes, finiteness, and the L2 norm of the update (reply minus the
    weights the node was sent) against ``max_update_norm``.
    """
    problems = []
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing:
        problems.append(f"missing array(s) {missing}")
    if extra:
        problems.append(f"unexpected array(s) {extra}")
    sq = 0.0
    for key in sorted(set(reference) & set(arrays)):
        arr, ref = np.asarray(arrays[key]), np.asarray(reference[key])
        if arr.shape != ref.shape:
            problems.append(f"{key}: shape {arr.shape}, expected {ref.shape}")
        elif arr.dtype != ref.dtype:
            problems.append(f"{key}: dtype {arr.dtype}, expected {ref.dtype}")
        elif not np.all(np.isfinite(arr)):
            problems.append(f"{key}: NaN or Inf values")
        elif key not in EVIDENCE_KEYS:  # DP counts, not an update (server.evidence)
            sq += float(np.sum((arr.astype(np.float64) - ref) ** 2))
    if not problems and math.sqrt(sq) > max_update_norm:
        problems.append(f"update norm {math.sqrt(sq):.3g} exceeds the bound {max_update_norm:g}")
    for key in REQUIRED_METRICS:
        value = metrics.get(key)
        if value is None:
            problems.append(f"metric {key!r} missing")
        elif not isinstance(value, int | float) or not math.isfinite(float(value)):
            problems.append(f"metric {key!r} is not a finite number: {value!r}")
    if not problems and float(metrics["num-examples"]) <= 0:
        problems.append(f"num-examples must be > 0, got {metrics['num-examples']!r}")
    return problems


class ValidatingStrategy(Strategy):
    """Wraps a Flower strategy; replies that fail :func:`reply_problems` are dropped.

    Error replies (a node that refused, e.g. on budget) are logged with their reason.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        max_update_norm: float,
        region_caps: Mapping[str, float] | None = None,
        on_cap_refusal: Callable[[int, str, float, float], None] | None = None,
    ) -> None:
        if not max_update_norm > 0:
            raise ValueError(f"max_update_norm must be > 0, got {max_update_norm!r}")
        self.inner = inner
        self.max_update_norm = max_update_norm
        self.region_caps = dict(region_caps or {})
        self.on_cap_refusal = on_cap_refusal
        self.node_names: dict[int, str] = {}  # Flower node id -> the node's own name
        self._eps_history: dict[str, list[float]] = {}
        self._sent: dict[str, np.ndarray] = {}
        self.rejected: list[tuple[int, int, str]] = []  # (round, node id, reason)
        self.node_epsilon: dict[str, float] = {}  # latest ε each node reported

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = {k: v.numpy() for k, v in arrays.items()}
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if not self.region_caps:
            return messages
        scheduled = []
        for msg in messages:
            name = self.node_names.get(msg.metadata.dst_node_id)
            predicted = self.predicted_epsilon(name) if name else None
            cap = self.region_caps.get(name or "")
            if cap is not None and predicted is not None and predicted > cap:
                log.warning(
                    "round %s: not scheduling %s: its ε would reach about %.4f, past its "
                    "region cap %g", server_round, name, predicted, cap,
                )
                if self.on_cap_refusal is not None:
                    self.on_cap_refusal(server_round, str(name), predicted, cap)
                continue
            scheduled.append(msg)
        return scheduled

    def predicted_epsilon(self, name: str) -> float | None:
        """ε a node would report after one more round: last ε plus its last increment.

        ε composes sub-additively over rounds, so the last increment over-estimates the
        next one: the prediction errs on the side of not scheduling.
        """
        history = self._eps_history.get(name, [])
        if not history:
            return None
        step = history[-1] - history[-2] if len(history) > 1 else history[-1]
        return history[-1] + step

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("round %s: node %s sent no update: %s", server_round, node,
                            msg.error.reason)
                continue
            problems = self._problems(msg)
            if problems:
                reason = "; ".join(problems)
                log.warning("round %s: rejected reply from node %s: %s", server_round, node,
                            reason)
                self.rejected.append((server_round, node, reason))
                continue
            good.append(msg)
            metrics = next(iter(msg.content.metric_records.values()))
            name = self._name_of(msg)
            epsilon = metrics["epsilon"]
            if isinstance(epsilon, int | float):  # validated above; narrows the type
                self.node_epsilon[name] = float(epsilon)
                self._eps_history.setdefault(name, []).append(float(epsilon))
        if not good:
            log.warning("round %s: no valid replies; global model unchanged", server_round)
            return None, None
        return self.inner.aggregate_train(server_round, good)

    def _name_of(self, msg: Message) -> str:
        node = msg.metadata.src_node_id
        record = msg.content.config_records.get("node")
        if record is not None and isinstance(record.get("name"), str):
            self.node_names[node] = str(record["name"])
        return self.node_names.get(node, f"node-{node}")

    def _problems(self, msg: Message) -> list[str]:
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return [
                f"expected one ArrayRecord and one MetricRecord, got "
                f"{len(content.array_records)} and {len(content.metric_records)}"
            ]
        record = next(iter(content.array_records.values()))
        metrics = next(iter(content.metric_records.values()))
        try:
            arrays = {k: v.numpy() for k, v in record.items()}
        except Exception as exc:  # a malformed array must not crash the round
            return [f"arrays could not be decoded: {exc}"]
        values = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        return reply_problems(
            arrays, values, reference=self._sent, max_update_norm=self.max_update_norm
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
