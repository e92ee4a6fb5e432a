"""A node's one-shot DP release of its click evidence (Flower-free; called from the round).

When the global state the server sends carries the evidence arrays
(``shared_model.evidence.EVIDENCE_KEYS``), the node answers them with "what it was sent plus
its own noisy counts" in the first round it takes part in, and with exactly what it was sent
afterwards (its delta is zero): the server adds the nodes' deltas (``server.evidence``). The
reply holds only keys the server sent, as the regional reply contract requires.

Privacy: each of the node's users contributes at most ``max_sessions_per_user`` sessions
(their first, by time), clipped to L2 norm ``clip_norm`` over the whole [clicks, exam] vector;
Gaussian noise of std ``noise_multiplier * clip_norm`` on every coordinate, from an
OS-CSPRNG-seeded generator. The event ``(noise_multiplier, 1, 1)`` goes into the node's
persisted accountant (the same one as its DP-SGD) and a ``count-release`` ledger line, before
the noisy counts leave the node. A marker in the node's state directory makes it once-only
across restarts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from privacy.accountant_store import PersistentAccountant
from privacy.count_release import clip_and_sum, csprng_generator, gaussian_release
from privacy.ledger import Ledger, LedgerEvent
from shared_model.evidence import (
    EVIDENCE_CLICKS,
    EVIDENCE_EXAM,
    EVIDENCE_KEYS,
    EVIDENCE_NOISE_VAR,
    EvidenceIndex,
    user_pair_rows,
)

MARKER = "evidence_released.json"


@dataclass(frozen=True)
class EvidencePlan:
    """The node's release parameters (σ from ``privacy.count_release.plan_split``)."""

    noise_multiplier: float
    clip_norm: float
    max_sessions_per_user: int
    delta: float


def released_round(state_dir: Path) -> int | None:
    """The round in which this node released its evidence, or None."""
    path = state_dir / MARKER
    return int(json.loads(path.read_text())["round"]) if path.exists() else None


def evidence_reply(
    *,
    sent: Mapping[str, np.ndarray],
    clicks_log: pa.Table,
    index: EvidenceIndex,
    plan: EvidencePlan,
    state_dir: Path,
    accountant: PersistentAccountant,
    ledger: Ledger,
    node_name: str,
    server_round: int,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """The evidence arrays of the node's reply (float32, the shapes the server sent).

    Raises ``privacy.accountant_store.BudgetExhaustedError`` (nothing released) when the
    release would pass the node's budget.
    """
    for key in EVIDENCE_KEYS:
        if key not in sent:
            raise ValueError(f"global state lacks {key!r}")
    out = {k: np.asarray(sent[k], dtype=np.float32).copy() for k in EVIDENCE_KEYS}
    if out[EVIDENCE_CLICKS].shape != (index.num_pairs,):
        raise ValueError(
            f"{EVIDENCE_CLICKS} has shape {out[EVIDENCE_CLICKS].shape}, the catalog index "
            f"has {index.num_pairs} pairs"
        )
    if released_round(state_dir) is not None:
        return out
    rows = user_pair_rows(clicks_log, index, max_sessions_per_user=plan.max_sessions_per_user)
    clicks, exam, _ = clip_and_sum(
        rows.user, rows.pair, rows.clicks, rows.exam, num_pairs=index.num_pairs,
        clip_norm=plan.clip_norm,
    )
    noise_std = plan.noise_multiplier * plan.clip_norm
    # Account first: the counts leave the node only once the event is on record.
    epsilon = accountant.epsilon()
    if plan.noise_multiplier > 0:
        epsilon = accountant.record(
            noise_multiplier=plan.noise_multiplier, sample_rate=1.0, steps=1
        )
    ledger.append(
        LedgerEvent(
            node=node_name, round=server_round, mechanism="count-release",
            unit_of_privacy="user", noise_multiplier=plan.noise_multiplier, sample_rate=1.0,
            steps=1, clip_norm=plan.clip_norm, delta=plan.delta,
            accountant=accountant.accountant, epsilon_after=epsilon,
            detail=(
                f"clicks and exam counts over {index.num_pairs} (query, product) pairs, "
                f"<= {plan.max_sessions_per_user} sessions per user, L2 clip "
                f"{plan.clip_norm:g}"
            ),
            sampling="poisson", neighbouring="add-remove",
        )
    )
    generator = rng if rng is not None else csprng_generator()
    out[EVIDENCE_CLICKS] += gaussian_release(clicks, noise_std=noise_std, rng=generator).astype(
        np.float32
    )
    out[EVIDENCE_EXAM] += gaussian_release(exam, noise_std=noise_std, rng=generator).astype(
        np.float32
    )
    out[EVIDENCE_NOISE_VAR] += np.float32(noise_std**2)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"round": server_round, "users": rows.num_users}))
    os.replace(tmp, state_dir / MARKER)
    return out
