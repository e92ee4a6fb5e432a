"""Server side of the memorised evidence: it is summed over nodes, not averaged.

Each node replies "the evidence it was sent + its own noisy counts" once, and exactly what it
was sent afterwards (``client.evidence_release``). The new global evidence is therefore the
evidence sent plus the sum of the replies' deltas. Flower's FedAvg (uniform weights, as the
validating strategy enforces) hands back the mean of the replies; with ``n`` replies,
``sent + n * (mean - sent)`` is that sum (:func:`evidence_from_mean`); the
:class:`EvidenceSumming` wrapper sums the replies directly, whatever the weights. Head
weights stay averaged.

The evidence arrays are excluded from the *head's* update-norm clip/reject of reply
validation (their deltas are DP counts, not a training update), but each node's evidence
delta is bounded on its own (:class:`EvidenceBound`, applied by ``server.validation``): a node
with ``n`` users adds at most ``n * C`` in L2 (each user's [clicks, exam] vector is clipped to
``C`` = ``evidence-clip``) plus its Gaussian noise; the server does not know ``n``, so it uses
the public cap :data:`MAX_USERS_PER_NODE`. Entries are clamped to
``[-tail*s, n_max*C + tail*s]`` (counts are non-negative; ``s`` the node's noise std), the
[clicks, exam] delta is then scaled to L2 ``<= n_max*C + s*(sqrt(2P) + tail)``, and the
noise-variance delta to ``[0, (NOISE_STD_FACTOR * s_run)^2]``. A node's evidence is accepted
once (the design releases once): later non-zero evidence deltas from the same node id are
dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privacy.accounting import calibrate_noise_multiplier
from server.wrapping import DelegatingStrategy
from shared_model.evidence import (
    EVIDENCE_CLICKS,
    EVIDENCE_EXAM,
    EVIDENCE_KEYS,
    EVIDENCE_NOISE_VAR,
    EvidenceIndex,
    empty_evidence,
)

# Public cap on the users one node's evidence can stand for (the largest simulated world,
# ``simulations.scenarios`` "large", has 100 000 users in all). An operator with bigger
# regions raises it; it bounds how far one node can move any (query, product) entry.
MAX_USERS_PER_NODE = 100_000
# Per-entry noise slack, in noise standard deviations (P(|N(0,1)| > 8) ~ 1e-15 per entry).
NOISE_TAIL = 8.0
# A node may add more noise than the run config's σ (a smaller pinned budget): up to this
# factor on the std (and at least NOISE_STD_FLOOR * C, for runs whose config is non-private).
NOISE_STD_FACTOR = 4.0
NOISE_STD_FLOOR = 10.0


@dataclass(frozen=True)
class EvidenceBound:
    """The most one node's evidence reply may add (all public: run config + a user cap)."""

    clip: float  # C: each user's [clicks, exam] L2 clip (run config ``evidence-clip``)
    noise_std: float  # σ·C the run config plans for a node's release (0 when non-private)
    max_users: int = MAX_USERS_PER_NODE

    @property
    def max_noise_std(self) -> float:
        return max(NOISE_STD_FACTOR * self.noise_std, NOISE_STD_FLOOR * self.clip)

    @classmethod
    def from_settings(cls, settings: object, *, max_users: int = MAX_USERS_PER_NODE
                      ) -> EvidenceBound:
        """From RunSettings: σ of a release spending ``evidence-share * epsilon``."""
        epsilon = float(settings.epsilon)  # type: ignore[attr-defined]
        share = float(settings.evidence_share)  # type: ignore[attr-defined]
        clip = float(settings.evidence_clip)  # type: ignore[attr-defined]
        sigma = 0.0
        if math.isfinite(epsilon) and share > 0:
            sigma = calibrate_noise_multiplier(
                target_epsilon=share * epsilon,
                delta=float(settings.delta),  # type: ignore[attr-defined]
                sample_rate=1.0, steps=1,
            )
        return cls(clip=clip, noise_std=sigma * clip, max_users=max_users)

    def apply(
        self, delta: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, float] | None]:
        """Bound one node's evidence delta (float64 arrays keyed by EVIDENCE_KEYS).

        Returns the bounded delta and, when anything was cut, what was sent (for the log and
        metrics.json), else None.
        """
        nv = float(np.asarray(delta[EVIDENCE_NOISE_VAR], np.float64).reshape(-1).sum())
        nv_cap = self.max_noise_std**2
        nv_new = min(max(nv, 0.0), nv_cap)
        s = math.sqrt(nv_new)
        clicks = np.asarray(delta[EVIDENCE_CLICKS], np.float64)
        exam = np.asarray(delta[EVIDENCE_EXAM], np.float64)
        signal = self.max_users * self.clip
        lo, hi = -NOISE_TAIL * s, signal + NOISE_TAIL * s
        c2, e2 = np.clip(clicks, lo, hi), np.clip(exam, lo, hi)
        from server.validation import update_norm  # local: validation imports this module

        sent_norm = update_norm([clicks, exam])
        norm = update_norm([c2, e2])
        l2_cap = signal + s * (math.sqrt(clicks.size + exam.size) + NOISE_TAIL)
        if norm > l2_cap:
            c2, e2 = c2 * (l2_cap / norm), e2 * (l2_cap / norm)
        out = {
            EVIDENCE_CLICKS: c2,
            EVIDENCE_EXAM: e2,
            EVIDENCE_NOISE_VAR: np.full_like(
                np.asarray(delta[EVIDENCE_NOISE_VAR], np.float64), nv_new / max(
                    np.asarray(delta[EVIDENCE_NOISE_VAR]).size, 1)),
        }
        cut = (nv_new != nv or norm > l2_cap or not np.array_equal(c2, clicks)
               or not np.array_equal(e2, exam))
        if not cut:
            return {k: np.asarray(v, np.float64) for k, v in delta.items()}, None
        return out, {"evidence_norm": sent_norm, "noise_var": nv, "l2_cap": l2_cap,
                     "entry_cap": hi}


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


class EvidenceSumming(DelegatingStrategy):
    """Wraps the aggregation strategy: head weights as it aggregates them, evidence summed.

    Sits between reply validation and FedAvg/FedAdam; every reply it sees was accepted.
    The evidence sum is computed from the replies themselves (``sum_evidence``), so it does
    not depend on how the inner strategy weighs nodes.
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self._sent: dict[str, np.ndarray] = {}

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
