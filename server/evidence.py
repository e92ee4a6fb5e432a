"""Server side of the memorised evidence: it is summed over nodes, not averaged.

Each node replies "the evidence it was sent + its own noisy counts" once, and exactly what it
was sent afterwards (``client.evidence_release``). The new global evidence is therefore the
evidence sent plus the sum of the replies' deltas. Flower's FedAvg (uniform weights, as the
validating strategy enforces) hands back the mean of the replies; with ``n`` replies,
``sent + n * (mean - sent)`` is that sum. Head weights stay averaged.

The evidence arrays are excluded from the update-norm clip/reject of reply validation: their
deltas are DP counts (a node's noise alone has norm ~ noise_std * sqrt(2 * pairs)), bounded
per user by the node's clip, not a training update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

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
