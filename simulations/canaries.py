"""Experiment driver for ``fedrank audit canaries``: one-run canary audit of one node's DP-SGD.

What is audited: the mechanism that carries the user-level guarantee, i.e. one regional node's
DP-SGD (:func:`shared_model.training.train_head`, Opacus: Poisson sampling, per-user clipping,
Gaussian noise) over its users for the whole planned run; the federation's aggregation is
post-processing of node outputs. Steinke, Nasr and Jagielski (NeurIPS 2023), one training run
(or ``runs`` independent ones: a canary lives in exactly one run, so the combined mechanism is
as private towards each canary as one run is, and the one-run bound applies to all ``m``).

**Positive control.** The same audit is repeated with σ = 0 (clipping and Poisson sampling
kept, noise removed: what a broken implementation claiming the same ε would do). The audit is
conclusive only if that control's lower bound exceeds the claimed ε: only then would the audit
have caught an implementation that does not add the noise it claims.

**Canaries: white-box Dirac gradient canaries on a parameter no real user touches.** The head
has 16 parameters; real users' clipped gradients span 15 of them with per-step Poisson
fluctuations of 1.5-7 clipped norms (measured on regional-5 node 0), which drown a canary's
single clipped gradient. The one exception is row 0 of the position tower (``logit[0]``, the
padding position): a real impression never has rank 0 (padding rows are masked out of the
loss), so only canaries and DP noise move it. A canary user therefore has impressions at
rank 0 whose relevance logit is saturated (features ``x = (30 - b) w / |w|^2`` for the current
head ``(w, b)``: log σ(relevance) ≈ 0, no relevance gradient), so its clipped gradient is
``∓C e_0``, exactly one clipped norm on the audited coordinate:

* an **up** canary: 6 clicked impressions (gradient ``-6 (1 - σ(logit[0]))``, clipped to C);
* a **down** canary: 3 unclicked impressions (gradient ``3 σ(logit[0])``, clipped to C).

One coordinate carries few canaries, so they are **multiplexed in time**: canary slot
``(run, round, up|down)`` has its impressions only in that round of that run (an empty group in
every other round: a user that contributes nothing then, as the accountant allows: it composes
every round adaptively). Each run holds ``2 · rounds`` canaries, each included by a fair coin;
included canaries are users in every round of their run, so the sample rate, step count and σ
are those the node plans for its real user count (plus the included canaries).

**Score and guesses.** After each round the auditor reads ``logit[0]`` (the node's reply);
the change over round ``t``, in units of one clipped gradient's step ``lr · C / B`` (``B``
Opacus' expected batch size), is ``N_up - N_down + noise``: ``N`` the steps a canary was
sampled in. Score of the up canary = that change, of the down canary = minus it. The auditor
guesses "in" for every canary with score > 0.5 and abstains otherwise (the rule does not
depend on σ or on the coins, so the control and the audited run are scored alike). At σ = 0 a
score above 0.5 can only come from that canary having been sampled, so every guess is right;
with the planned noise (σ ≈ 8.6 at ε = 1: 23 units per round) the guesses are coin flips.
The bound is :func:`privacy.canaries.epsilon_lower_bound` at 95 % confidence, the scenario's δ.

**Randomness.** Coins and the canary layout come from ``seed``; DP sampling and noise are
fresh every round (the training path draws them; this driver never seeds them).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from privacy.canaries import (
    DEFAULT_CONFIDENCE,
    AuditGuesses,
    audit_result,
    epsilon_lower_bound,
    guess_above_threshold,
)
from shared_model.ranker import RankerHead
from shared_model.training import (
    TrainConfig,
    UserGroups,
    sample_rate_for,
    steps_per_round,
    train_head,
)

__all__ = [
    "CanaryAuditResult",
    "CanarySlots",
    "VariantOutcome",
    "canary_groups",
    "node_groups",
    "run_canary_audit",
]

UP_IMPRESSIONS = 6
"""Clicked rank-0 impressions of an up canary (raw gradient ≈ 3 at logit[0] = 0: clipped)."""
DOWN_IMPRESSIONS = 3
"""Unclicked rank-0 impressions of a down canary (raw gradient ≈ 1.5: clipped)."""
RELEVANCE_LOGIT = 30.0
"""Relevance logit a canary impression is given (log σ(30) ≈ -1e-13: no relevance gradient)."""
GUESS_THRESHOLD = 0.5
"""Guess "in" for a score above half a clipped gradient's step."""
_MAX_FEATURE_NORM = 1e4


@dataclass(frozen=True)
class CanarySlots:
    """The canary layout: ``m = runs · rounds · 2`` slots, each one user of one run.

    ``run[i]``, ``round[i]``: where canary ``i`` has its impressions; ``sign[i]``: +1 up
    (clicked), -1 down (not clicked).
    """

    run: np.ndarray
    round: np.ndarray
    sign: np.ndarray

    @classmethod
    def layout(cls, *, runs: int, rounds: int) -> CanarySlots:
        """Slots in (run, round, up/down) order."""
        if runs < 1 or rounds < 1:
            raise ValueError(f"need runs >= 1 and rounds >= 1, got runs={runs}, rounds={rounds}")
        run, rnd, sign = np.meshgrid(
            np.arange(runs), np.arange(rounds), np.array([1, -1]), indexing="ij"
        )
        return cls(run.reshape(-1), rnd.reshape(-1), sign.reshape(-1))

    @property
    def m(self) -> int:
        """Number of canaries."""
        return int(self.run.shape[0])


@dataclass(frozen=True)
class VariantOutcome:
    """One variant of the audit (the audited run, or the σ = 0 control)."""

    noise_multiplier: float | None
    epsilon_lower_bound: float
    guesses: AuditGuesses
    scores: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (no per-canary arrays)."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "epsilon_lower_bound": self.epsilon_lower_bound,
            **self.guesses.to_dict(),
        }


@dataclass(frozen=True)
class CanaryAuditResult:
    """One canary audit: the claimed ε, the empirical 95 % lower bound and the control's."""

    scenario: str
    claimed_epsilon: float
    epsilon_lower_bound: float
    positive_control_epsilon_lower_bound: float
    result: str
    confidence: float
    delta: float
    noise_multiplier: float | None
    rounds: int
    runs: int
    real_users: int
    canaries: int
    canaries_in: int
    guesses: int
    correct: int
    positive_control_guesses: int
    positive_control_correct: int
    sample_rate: float
    steps_per_round: int
    wall_seconds: float
    design: str = "dirac-gradient canaries on the padding position logit, time-multiplexed"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``claimed_epsilon`` ``"inf"`` for a non-private claim)."""
        out = asdict(self)
        out["claimed_epsilon"] = "inf" if math.isinf(self.claimed_epsilon) else self.claimed_epsilon
        return out


def node_groups(
    scenario_name: str, *, node: int = 0, seed: int = 0, catalog_dir: str = ""
) -> UserGroups:
    """The click groups of one regional node of the scenario (what the node trains on);
    ``catalog_dir``: a judged-search directory ("" = the bundled WANDS subset)."""
    from shared_model.catalog import cached_feature_builder
    from shared_model.data import DEFAULT_WANDS_DIR
    from shared_model.encoder import default_cache_dir
    from shared_model.partition import partition_regional
    from shared_model.training import build_user_groups
    from shared_model.world import simulate_click_log
    from simulations.scenarios import get_scenario

    scenario = get_scenario(scenario_name)
    builder = cached_feature_builder(
        catalog_dir or str(DEFAULT_WANDS_DIR.resolve()), str(default_cache_dir().resolve())
    )
    parts = partition_regional(simulate_click_log(builder.data, scenario.world))
    key = sorted(parts)[node]
    max_sessions = int(scenario.run_config.get("max-sessions-per-user", 2))
    return build_user_groups(
        parts[key], builder, max_sessions_per_user=max_sessions, rng=np.random.default_rng(seed)
    )


def _saturating_features(head: RankerHead) -> np.ndarray:
    """Features whose relevance logit under ``head`` is :data:`RELEVANCE_LOGIT`."""
    linear = head.relevance_tower.linear
    w = linear.weight.detach().reshape(-1).double().numpy()
    b = float(linear.bias.detach().reshape(-1)[0])
    norm2 = float(w @ w)
    if norm2 < 1e-12:  # a zero weight vector: relevance is the bias alone
        return np.zeros_like(w, dtype=np.float32)
    x = (RELEVANCE_LOGIT - b) * w / norm2
    scale = min(1.0, _MAX_FEATURE_NORM / max(float(np.linalg.norm(x)), 1e-12))
    return (scale * x).astype(np.float32)


def canary_groups(
    *, signs: np.ndarray, active: np.ndarray, width: int, features: np.ndarray
) -> UserGroups:
    """Groups of canary users for one round: rank-0 impressions for the ``active`` ones.

    Parameters
    ----------
    signs : int array [k]
        +1 up canary (6 clicked impressions), -1 down canary (3 unclicked impressions).
    active : bool array [k]
        Whether the canary has its impressions this round (an empty group otherwise).
    width : int
        Group width (at least :data:`UP_IMPRESSIONS`).
    features : float array [F]
        Feature vector of every canary impression this round.
    """
    if width < UP_IMPRESSIONS:
        raise ValueError(f"width must be >= {UP_IMPRESSIONS}, got {width}")
    k = int(signs.shape[0])
    feats = np.zeros((k, width, features.shape[0]), np.float32)
    rank = np.zeros((k, width), np.int64)  # rank 0: the position no real impression has
    clicked = np.zeros((k, width), np.float32)
    mask = np.zeros((k, width), np.float32)
    for i in np.flatnonzero(active):
        n = UP_IMPRESSIONS if signs[i] > 0 else DOWN_IMPRESSIONS
        feats[i, :n] = features
        clicked[i, :n] = 1.0 if signs[i] > 0 else 0.0
        mask[i, :n] = 1.0
    return UserGroups(feats, rank, clicked, mask)


def _concat(a: UserGroups, b: UserGroups) -> UserGroups:
    w = max(a.rank.shape[1], b.rank.shape[1])

    def pad(arr: np.ndarray) -> np.ndarray:
        extra = [(0, 0), (0, w - arr.shape[1])] + [(0, 0)] * (arr.ndim - 2)
        return np.pad(arr, extra)

    return UserGroups(
        *(
            np.concatenate([pad(x), pad(y)])
            for x, y in (
                (a.features, b.features),
                (a.rank, b.rank),
                (a.clicked, b.clicked),
                (a.mask, b.mask),
            )
        )
    )


def _probe(head: RankerHead) -> float:
    """The audited coordinate: the padding position's examination logit."""
    return float(head.position_tower.logit.weight.detach()[0, 0])


def _fresh_seed_kwargs() -> dict[str, int]:
    # TrainConfig.seed seeds DP noise on older builds; give it fresh OS entropy so the audit
    # always runs on unpredictable noise (on builds where the training path draws its own
    # CSPRNG-seeded generator it seeds only non-private shuffling).
    names = {f.name for f in fields(TrainConfig)}
    return {"seed": secrets.randbits(31)} if "seed" in names else {}


def _train_run(
    *,
    real: UserGroups,
    signs: np.ndarray,
    rounds_of: np.ndarray,
    rounds: int,
    base: TrainConfig,
    head_factory: Callable[[], RankerHead],
) -> np.ndarray:
    """Train one run (``rounds`` rounds); return the audited coordinate's change per round."""
    head: RankerHead = head_factory()
    width = max(real.rank.shape[1], UP_IMPRESSIONS)
    deltas = np.zeros(rounds)
    for t in range(rounds):
        can = canary_groups(
            signs=signs, active=rounds_of == t, width=width, features=_saturating_features(head)
        )
        data = _concat(real, can)
        config = TrainConfig(**{**asdict(base), **_fresh_seed_kwargs()})
        before = _probe(head)
        train_head(head, data, config)
        deltas[t] = _probe(head) - before
    return deltas


def _variant(
    *,
    real: UserGroups,
    slots: CanarySlots,
    included: np.ndarray,
    rounds: int,
    base: TrainConfig,
    sigma_for: Callable[[int], float | None],
    delta: float,
    confidence: float,
    head_factory: Callable[[], RankerHead],
    on_run: Callable[[], None] | None = None,
) -> VariantOutcome:
    """Train every run with σ = ``sigma_for(users)`` and score and guess all canaries.

    ``on_run`` is called after each run's training (progress reporting).
    """
    scores = np.zeros(slots.m)
    sigmas: list[float | None] = []
    for k in range(int(slots.run.max()) + 1):
        members = np.flatnonzero((slots.run == k) & included)
        n = real.num_users + len(members)
        config = _with_sigma(base, sigma_for(n))
        sigmas.append(config.noise_multiplier)
        # One clipped gradient moves a parameter by lr · C / B (B: Opacus' expected batch
        # size, int(n · q)); without DP a gradient g moves it by lr · g / batch_size.
        batch = int(n * sample_rate_for(base, n)) if config.private else base.batch_size
        unit = base.learning_rate * base.clip_norm / max(1, batch)
        deltas = _train_run(
            real=real,
            signs=slots.sign[members],
            rounds_of=slots.round[members],
            rounds=rounds,
            base=config,
            head_factory=head_factory,
        )
        in_run = np.flatnonzero(slots.run == k)
        scores[in_run] = slots.sign[in_run] * deltas[slots.round[in_run]] / unit
        if on_run is not None:
            on_run()
    guesses = guess_above_threshold(scores=scores, included=included, threshold=GUESS_THRESHOLD)
    bound = epsilon_lower_bound(
        m=slots.m, r=guesses.guesses, v=guesses.correct, delta=delta, confidence=confidence
    )
    sigma = max((s for s in sigmas if s is not None), default=None)
    return VariantOutcome(sigma, bound, guesses, scores)


def run_canary_audit(
    *,
    real: UserGroups,
    epsilon: float,
    delta: float,
    rounds: int,
    runs: int = 4,
    learning_rate: float = 0.5,
    batch_size: int = 256,
    local_epochs: int = 1,
    clip_norm: float = 1.0,
    seed: int = 0,
    scenario: str = "",
    confidence: float = DEFAULT_CONFIDENCE,
    head_factory: Callable[[], RankerHead] = RankerHead,
    on_run: Callable[[], None] | None = None,
) -> CanaryAuditResult:
    """Audit one node's DP-SGD at the claimed ``epsilon``, with its σ = 0 positive control.

    Parameters
    ----------
    real : UserGroups
        The node's real users (every run trains on them plus its included canaries).
    epsilon : float
        Claimed ε of the whole ``rounds``-round run (``math.inf``: non-private training).
    delta : float
        δ of the claim (and of the bound).
    rounds, runs : int
        Rounds per run; independent runs (``2 · rounds`` canaries each).
    learning_rate, batch_size, local_epochs, clip_norm : training settings of the node.
    seed : int
        Seeds the coins only; DP sampling and noise are always fresh.
    head_factory : callable
        Builds the initial head of each run (default: the zero-shot ``RankerHead``).

    Returns
    -------
    CanaryAuditResult
        ``result`` is ``"fail"`` if the audited run's bound exceeds the claim, else ``"pass"``
        if the control's bound exceeds it, else ``"inconclusive"``.
    """
    from privacy.accountant_store import plan_noise_multiplier

    start = time.perf_counter()
    slots = CanarySlots.layout(runs=runs, rounds=rounds)
    included = np.random.default_rng(seed).random(slots.m) < 0.5
    base = TrainConfig(
        learning_rate=learning_rate,
        batch_size=batch_size,
        local_epochs=local_epochs,
        clip_norm=clip_norm,
    )

    def planned_sigma(users: int) -> float | None:
        # σ the node plans for the claimed ε over this run (its real q and step count).
        if not math.isfinite(epsilon):
            return None
        return plan_noise_multiplier(
            budget_epsilon=epsilon,
            delta=delta,
            sample_rate=sample_rate_for(base, users),
            steps_per_round=steps_per_round(base, users),
            rounds=rounds,
        )

    n = real.num_users + int(included.sum()) // runs

    def variant(sigma_for: Callable[[int], float | None]) -> VariantOutcome:
        return _variant(
            real=real,
            slots=slots,
            included=included,
            rounds=rounds,
            base=base,
            sigma_for=sigma_for,
            delta=delta,
            confidence=confidence,
            head_factory=head_factory,
            on_run=on_run,
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 16-parameter head: threads only add contention (4x measured)
    try:
        audited = variant(planned_sigma)
        control = variant(lambda users: 0.0)  # the positive control: no noise
    finally:
        torch.set_num_threads(threads)
    return CanaryAuditResult(
        scenario=scenario,
        claimed_epsilon=epsilon,
        epsilon_lower_bound=audited.epsilon_lower_bound,
        positive_control_epsilon_lower_bound=control.epsilon_lower_bound,
        result=audit_result(
            claimed_epsilon=epsilon,
            epsilon_lower_bound=audited.epsilon_lower_bound,
            positive_control_epsilon_lower_bound=control.epsilon_lower_bound,
        ),
        confidence=confidence,
        delta=delta,
        noise_multiplier=audited.noise_multiplier,
        rounds=rounds,
        runs=runs,
        real_users=real.num_users,
        canaries=slots.m,
        canaries_in=int(included.sum()),
        guesses=audited.guesses.guesses,
        correct=audited.guesses.correct,
        positive_control_guesses=control.guesses.guesses,
        positive_control_correct=control.guesses.correct,
        sample_rate=sample_rate_for(base, n),
        steps_per_round=steps_per_round(base, n),
        wall_seconds=time.perf_counter() - start,
        extra={
            "audited": audited.summary(),
            "positive_control": control.summary(),
            "audited_coordinate": "position_tower.logit.weight[0] (padding position)",
            "guess_rule": f"in if score > {GUESS_THRESHOLD} clipped steps, else abstain",
            "canary_impressions": {"up": UP_IMPRESSIONS, "down": DOWN_IMPRESSIONS},
        },
    )


def _with_sigma(base: TrainConfig, sigma: float | None) -> TrainConfig:
    return TrainConfig(**{**asdict(base), "noise_multiplier": sigma})
