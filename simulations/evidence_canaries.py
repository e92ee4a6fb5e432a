"""One-run canary audit of a node's evidence release (``--mechanism evidence``; Flower-free).

What is audited: the node's one-shot Gaussian release of per-(query, product) click and exam
sums, through the node's own code path: :func:`client.evidence_release.evidence_reply`
(``shared_model.evidence.user_pair_rows`` -> ``privacy.count_release.clip_and_sum`` at the
evidence clip ``C`` -> ``gaussian_release`` with std ``σ C`` from the OS-CSPRNG generator), at
the σ the node plans for its ε (:func:`client.evidence_release.release_noise_multiplier`, the
release's share of ``plan_split``). The claim being audited is the release's own ε:
``evidence-share · ε`` (one event ``(σ, q=1, 1 step)``), not the node's whole ε.

**Canaries.** ``m`` canary users, each owning one distinct coordinate of the public pair index
(the catalog's own pairs, no synthetic extras): a (query, product) pair that none of the
node's real users touches. Canary ``i`` has one session on its query in which its product is
shown at rank 1 and clicked, so, when included, it adds exactly ``(click 1, exam 1)`` to its
pair (norm √2 < C: never clipped) and nothing elsewhere; real users add nothing there. Each
canary is included in the node's log by a fair coin: seeded by ``seed`` (the CLI's
``--seed``, as for the DP-SGD audit: public coins are fine, the mechanism never sees them),
from ``secrets`` when ``seed`` is None. The release's noise is never seeded here.

**Score and guesses.** The auditor reads the released click and exam sums at each canary
pair; score = click + exam (the log-likelihood ratio direction of the (1, 1) shift). It
guesses "in" for the ``k`` highest scores and "out" for the ``k`` lowest and abstains on the
middle (``k = guess_fraction · m``; neither depends on the coins:
:func:`privacy.canaries.guess_from_scores`). The bound is
:func:`privacy.canaries.epsilon_lower_bound` at 95 % and the scenario's δ.

**Positive control.** The same canaries, same coins, released at σ = 0 (the node's code path
with no noise, what a non-private node sends). Every guess is then right.

**Power.** The release is one event: all the audit's evidence is ``m`` canaries in one
release, and ``m`` is bounded by the pairs the node's users leave untouched (1,619 of 6,890 on
regional-5 node 0). With ``r = 2k`` guesses all correct the bound is about
``ln(r / 3)`` (``r = 200``: ≈ 4.2); a DP release's bound is far lower (Steinke et al.: one-run
auditing is loose for Gaussian noise), so a "pass" here means "the implementation is not
grossly broken" (σ = 0 would be caught), not that the ε is tight.
"""

from __future__ import annotations

import math
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from privacy.canaries import (
    DEFAULT_CONFIDENCE,
    audit_result,
    epsilon_lower_bound,
    guess_from_scores,
)
from shared_model.evidence import EVIDENCE_CLICKS, EVIDENCE_EXAM, EvidenceIndex, empty_evidence

__all__ = [
    "EvidenceCanaryResult",
    "canary_log",
    "node_click_log",
    "release_canaries",
    "run_evidence_canary_audit",
    "untouched_pairs",
]

DEFAULT_CANARIES = 1000
DEFAULT_GUESS_FRACTION = 0.1  # k = 10 % of m guessed "in", 10 % "out"


@dataclass(frozen=True)
class EvidenceCanaryResult:
    """One evidence canary audit (same leading keys as the DP-SGD audit's result)."""

    scenario: str
    claimed_epsilon: float  # the release's ε: evidence-share · node ε
    epsilon_lower_bound: float
    positive_control_epsilon_lower_bound: float
    result: str
    node_epsilon: float
    evidence_share: float
    confidence: float
    delta: float
    noise_multiplier: float
    clip_norm: float
    canaries: int
    canaries_in: int
    guesses: int
    correct: int
    positive_control_guesses: int
    positive_control_correct: int
    untouched_pairs: int
    index_pairs: int
    real_users: int
    wall_seconds: float
    mechanism: str = "evidence"
    design: str = (
        "one canary user per untouched (query, product) pair of the public index: one session, "
        "product at rank 1, clicked; score = released click + exam"
    )
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (ε ``"inf"`` for a non-private claim)."""
        out = asdict(self)
        for key in ("claimed_epsilon", "node_epsilon"):
            if math.isinf(out[key]):
                out[key] = "inf"
        return out


def node_click_log(scenario_name: str, *, node: int = 0, catalog_dir: str = "") -> tuple[
    Any, pa.Table
]:
    """(catalog data, the node's simulated click log) for one regional node of the scenario."""
    from shared_model.data import DEFAULT_WANDS_DIR, load_judged_dir
    from shared_model.partition import partition_regional
    from shared_model.world import simulate_click_log
    from simulations.scenarios import get_scenario

    scenario = get_scenario(scenario_name)
    data = load_judged_dir(Path(catalog_dir or DEFAULT_WANDS_DIR).resolve())
    parts = partition_regional(simulate_click_log(data, scenario.world))
    return data, parts[sorted(parts)[node]]


def untouched_pairs(log: pa.Table, index: EvidenceIndex, *, max_sessions_per_user: int
                    ) -> np.ndarray:
    """Pair indices of the index that no row of ``log`` maps to (sorted)."""
    from shared_model.evidence import user_pair_rows

    rows = user_pair_rows(log, index, max_sessions_per_user=max_sessions_per_user,
                          max_clicks_per_pair=None)
    touched = np.zeros(index.num_pairs, dtype=bool)
    touched[rows.pair] = True
    return np.flatnonzero(~touched)


def canary_log(
    index: EvidenceIndex, pairs: np.ndarray, included: np.ndarray, *, like: pa.Table,
    first_user: int, first_session: int,
) -> pa.Table:
    """One session per included canary: its pair's product at rank 1 on its query, clicked.

    Columns and types follow ``like`` (the node's log); user and session ids start above
    ``first_user``/``first_session`` so they never collide with real ones.
    """
    pair_query: dict[int, str] = {}
    pair_product: dict[int, str] = {}
    for q in index.query_ids:
        start = index.offsets[q]
        for i, p in enumerate(index.products[q]):
            pair_query[start + i] = q
            pair_product[start + i] = p
    chosen = np.asarray(pairs)[np.asarray(included, dtype=bool)]
    n = len(chosen)
    ts = int(np.max(like.column("timestamp").to_numpy())) if like.num_rows else 0
    columns = {
        "session_id": np.arange(first_session, first_session + n, dtype=np.int64),
        "user_id": np.arange(first_user, first_user + n, dtype=np.int64),
        "region_id": np.zeros(n, np.int32),
        "timestamp": np.full(n, ts, np.int64),
        "query_id": [pair_query[int(k)] for k in chosen],
        "product_id": [pair_product[int(k)] for k in chosen],
        "rank": np.ones(n, np.int16),
        "clicked": np.ones(n, bool),
        "exploration": np.zeros(n, bool),
    }
    names = like.schema.names
    return pa.table({k: columns[k] for k in names}, schema=like.schema)


def release_canaries(
    *, log: pa.Table, index: EvidenceIndex, noise_multiplier: float, clip_norm: float,
    max_sessions_per_user: int, delta: float, node_epsilon: float,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The node's release of ``log`` through :func:`client.evidence_release.evidence_reply`.

    A private release (σ > 0) is recorded in a throw-away accountant with the node's budget;
    σ = 0 is the node's non-private path (no accountant). ``rng`` None: OS-CSPRNG noise, as
    in production. Returns the released (clicks, exam) as float64.
    """
    from client.evidence_release import EvidencePlan, evidence_reply
    from privacy.accountant_store import PersistentAccountant

    plan = EvidencePlan(noise_multiplier, clip_norm, max_sessions_per_user, delta)
    with tempfile.TemporaryDirectory(prefix="fedrank-evcanary-") as tmp:
        accountant = (
            PersistentAccountant(Path(tmp) / "accountant.json", delta=delta,
                                 budget_epsilon=node_epsilon)
            if noise_multiplier > 0 else None
        )
        out = evidence_reply(
            sent=empty_evidence(index), clicks_log=log, index=index, plan=plan,
            state_dir=Path(tmp) / "state", accountant=accountant, ledger=None,
            node_name="canary-audit", server_round=1, rng=rng,
        )
    return (np.asarray(out[EVIDENCE_CLICKS], np.float64),
            np.asarray(out[EVIDENCE_EXAM], np.float64))


def _bound(
    clicks: np.ndarray, exam: np.ndarray, pairs: np.ndarray, included: np.ndarray, *,
    guess_fraction: float, delta: float, confidence: float,
) -> tuple[float, int, int]:
    scores = clicks[pairs] + exam[pairs]
    m = len(pairs)
    k = int(round(guess_fraction * m))
    g = guess_from_scores(scores=scores, included=included, k_plus=k, k_minus=k)
    eps = epsilon_lower_bound(m=m, r=g.guesses, v=g.correct, delta=delta, confidence=confidence)
    return eps, g.guesses, g.correct


def run_evidence_canary_audit(
    *,
    data: Any,
    log: pa.Table,
    epsilon: float,
    delta: float,
    evidence_share: float,
    clip_norm: float,
    max_sessions_per_user: int,
    canaries: int = DEFAULT_CANARIES,
    guess_fraction: float = DEFAULT_GUESS_FRACTION,
    seed: int | None = None,
    scenario: str = "",
    confidence: float = DEFAULT_CONFIDENCE,
    noise_rng: np.random.Generator | None = None,
) -> EvidenceCanaryResult:
    """Audit the node's evidence release of ``log`` with ``canaries`` canary users.

    ``seed`` seeds the canaries' coins and which untouched pairs they take (None: from
    ``secrets``); ``noise_rng`` None draws the release's noise from the OS CSPRNG (tests
    inject one).
    """
    from client.evidence_release import catalog_index, release_noise_multiplier

    if not 0 < guess_fraction <= 0.5:
        raise ValueError(f"guess_fraction must be in (0, 0.5], got {guess_fraction!r}")
    start = time.perf_counter()
    index = catalog_index(data)
    free = untouched_pairs(log, index, max_sessions_per_user=max_sessions_per_user)
    if canaries < 1 or canaries > len(free):
        raise ValueError(
            f"need 1 <= canaries <= {len(free)} (pairs the node's users never touch), "
            f"got {canaries}"
        )
    coins = np.random.default_rng(seed if seed is not None else secrets.randbits(128))
    pairs = np.sort(coins.choice(free, size=canaries, replace=False))
    included = coins.random(canaries) < 0.5
    users = log.column("user_id").to_numpy()
    sessions = log.column("session_id").to_numpy()
    first_user = int(users.max()) + 1 if len(users) else 0
    first_session = int(sessions.max()) + 1 if len(sessions) else 0
    audited_log = pa.concat_tables([log, canary_log(
        index, pairs, included, like=log, first_user=first_user, first_session=first_session,
    )])
    sigma = release_noise_multiplier(epsilon, delta, evidence_share)
    claimed = math.inf if math.isinf(epsilon) else evidence_share * epsilon
    common = dict(log=audited_log, index=index, clip_norm=clip_norm,
                  max_sessions_per_user=max_sessions_per_user, delta=delta,
                  node_epsilon=epsilon)
    kw = dict(guess_fraction=guess_fraction, delta=delta, confidence=confidence)
    c, e = release_canaries(noise_multiplier=sigma, rng=noise_rng, **common)  # type: ignore[arg-type]
    eps, guesses, correct = _bound(c, e, pairs, included, **kw)  # type: ignore[arg-type]
    c0, e0 = release_canaries(noise_multiplier=0.0, **common)  # type: ignore[arg-type]
    eps0, guesses0, correct0 = _bound(c0, e0, pairs, included, **kw)  # type: ignore[arg-type]
    return EvidenceCanaryResult(
        scenario=scenario,
        claimed_epsilon=claimed,
        epsilon_lower_bound=eps,
        positive_control_epsilon_lower_bound=eps0,
        result=audit_result(claimed_epsilon=claimed, epsilon_lower_bound=eps,
                            positive_control_epsilon_lower_bound=eps0),
        node_epsilon=epsilon,
        evidence_share=evidence_share,
        confidence=confidence,
        delta=delta,
        noise_multiplier=sigma,
        clip_norm=clip_norm,
        canaries=canaries,
        canaries_in=int(included.sum()),
        guesses=guesses,
        correct=correct,
        positive_control_guesses=guesses0,
        positive_control_correct=correct0,
        untouched_pairs=len(free),
        index_pairs=index.num_pairs,
        real_users=int(len(np.unique(log.column("user_id").to_numpy()))),
        wall_seconds=time.perf_counter() - start,
        extra={"guess_fraction": guess_fraction},
    )
