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
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from privacy.accountant_store import BudgetExhaustedError, PersistentAccountant
from privacy.accounting import calibrate_noise_multiplier
from privacy.count_release import (
    clip_and_sum,
    csprng_generator,
    gaussian_release,
    plan_split,
)
from privacy.ledger import Ledger, LedgerEvent
from shared_model.evidence import (
    EVIDENCE_CLICKS,
    EVIDENCE_EXAM,
    EVIDENCE_KEYS,
    EVIDENCE_NOISE_VAR,
    EvidenceIndex,
    user_pair_rows,
)
from shared_model.schema import JudgedSearchData

log = logging.getLogger("fedrank.node")
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
    accountant: PersistentAccountant | None,
    ledger: Ledger | None,
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
    if accountant is not None:
        _account(accountant, ledger, plan, index, node_name, server_round)
    elif plan.noise_multiplier > 0:
        raise ValueError("a noisy release needs the node's accountant")
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


def release_noise_multiplier(epsilon: float, delta: float, share: float) -> float:
    """σ of the release: the release alone spends ``share * epsilon`` (0 when non-private)."""
    if math.isinf(epsilon):
        return 0.0
    return calibrate_noise_multiplier(
        target_epsilon=share * epsilon, delta=delta, sample_rate=1.0, steps=1
    )


def dp_sgd_noise_multiplier(
    *, epsilon: float, delta: float, share: float, sample_rate: float, steps: int
) -> float:
    """DP-SGD's σ for the whole planned run when the release takes ``share`` of ε first."""
    return plan_split(
        epsilon=epsilon, delta=delta, release_share=share, sgd_sample_rate=sample_rate,
        sgd_steps=steps,
    )[1]


_INDEXES: dict[int, tuple[JudgedSearchData, EvidenceIndex]] = {}


def catalog_index(data: JudgedSearchData) -> EvidenceIndex:
    """The catalog's evidence index, built once per catalog object (it is public)."""
    cached = _INDEXES.get(id(data))
    if cached is None or cached[0] is not data:
        cached = (data, EvidenceIndex(data))
        _INDEXES[id(data)] = cached
    return cached[1]


def attach_evidence(
    state: dict[str, np.ndarray],
    *,
    global_state: Mapping[str, np.ndarray],
    clicks_log: pa.Table,
    data: JudgedSearchData,
    epsilon: float,
    delta: float,
    share: float,
    clip_norm: float,
    max_sessions_per_user: int,
    state_dir: Path,
    ledger: Ledger | None,
    accountant: PersistentAccountant | None,
    node_name: str,
    server_round: int,
) -> dict[str, np.ndarray]:
    """The node's reply arrays: its head weights plus, when the server sent evidence
    arrays, :func:`evidence_reply`'s (unchanged when the server sent none).

    ``accountant``/``ledger`` None: a non-private node (its counts go out without noise,
    as its head weights do). A release the budget cannot take is skipped (logged), never
    sent unaccounted.
    """
    if not any(k in global_state for k in EVIDENCE_KEYS):
        return state
    if accountant is not None and not 0 < share < 1:
        # The run planned no budget for a release: answer the keys sent, add nothing.
        log.warning("node %s: evidence sent but evidence-share is %r; no release", node_name,
                    share)
        return {**state, **{k: np.asarray(global_state[k], np.float32) for k in EVIDENCE_KEYS}}
    sigma = release_noise_multiplier(epsilon, delta, share) if accountant is not None else 0.0
    plan = EvidencePlan(sigma, clip_norm, max_sessions_per_user, delta)
    try:
        evidence = evidence_reply(
            sent=global_state, clicks_log=clicks_log, index=catalog_index(data), plan=plan,
            state_dir=state_dir, accountant=accountant, ledger=ledger, node_name=node_name,
            server_round=server_round,
        )
    except BudgetExhaustedError as exc:
        log.warning("node %s skips its evidence release: %s", node_name, exc)
        evidence = {k: np.asarray(global_state[k], np.float32).copy() for k in EVIDENCE_KEYS}
    return {**state, **evidence}


def _account(
    accountant: PersistentAccountant,
    ledger: Ledger | None,
    plan: EvidencePlan,
    index: EvidenceIndex,
    node_name: str,
    server_round: int,
) -> None:
    epsilon = accountant.epsilon()
    if plan.noise_multiplier > 0:
        epsilon = accountant.record(
            noise_multiplier=plan.noise_multiplier, sample_rate=1.0, steps=1
        )
    if ledger is None:
        return
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
