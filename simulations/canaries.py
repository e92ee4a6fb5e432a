"""Experiment driver for ``fedrank audit canaries``: one-run canary audit of one node's DP-SGD.

What is audited: the mechanism that carries the user-level guarantee, i.e. one regional
node's DP-SGD over its users for the whole planned run (the federation's aggregation is
post-processing of node outputs). Steinke, Nasr, Jagielski (NeurIPS 2023) one-run audit:

* the node's real users: region 0 of the scenario's world (``simulate_click_log`` over every
  judged query, ``partition_regional``, ``build_user_groups`` with the scenario's
  ``max_sessions_per_user``); for regional-5 that is 1,576 users (exploration sessions);
* ``m`` canary users, each included with probability 1/2 (seeded coin). A canary's group is one
  clicked impression at rank 1 whose feature vector is ``scale · x_i`` with ``x_i`` a random unit
  vector (first coordinate negative, so the zero-shot head does not already saturate it);
* training: ``rounds`` rounds of the node's real ``train_head`` (Opacus DP-SGD, Poisson rate
  ``batch / users``, clip, σ) chained on the node's own output; σ comes from
  ``plan_noise_multiplier`` for the claimed ε over ``rounds`` rounds with the real sample rate
  and steps (so ``--rounds`` < the scenario's rounds is calibrated for the shorter run at the
  same ε; the default is the scenario's full 30);
* the adversary sees the node's reply every round. Score of canary i =
  Σ_t ⟨−(w_{t+1} − w_t), clip_C(∇ℓ_i(w_t))⟩ restricted to the relevance weights (bias and
  position logits are shared by every canary and only add the real users' drift);
* guesses: "in" for the top ``k``, "out" for the bottom ``k``; bound from
  :func:`privacy.canaries.epsilon_lower_bound` at 95 % confidence and the scenario's δ.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from privacy.canaries import DEFAULT_CONFIDENCE, epsilon_lower_bound, guess_from_scores
from shared_model.ranker import RankerHead
from shared_model.training import (
    ClickLoss,
    TrainConfig,
    UserGroups,
    sample_rate_for,
    steps_per_round,
    train_head,
)

__all__ = ["CanaryAuditResult", "make_canaries", "node_groups", "run_canary_audit"]

RELEVANCE_WEIGHTS = 4  # the first 4 flattened parameters: relevance_tower.linear.weight


@dataclass(frozen=True)
class CanaryAuditResult:
    """One canary audit: the claimed ε beside the empirical 95 % lower bound."""

    scenario: str
    claimed_epsilon: float
    epsilon_lower_bound: float
    confidence: float
    delta: float
    noise_multiplier: float
    rounds: int
    real_users: int
    canaries: int
    canaries_in: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    wall_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["claimed_epsilon"] = "inf" if math.isinf(self.claimed_epsilon) else self.claimed_epsilon
        return out


def node_groups(scenario_name: str, *, node: int = 0, seed: int = 0) -> UserGroups:
    """The click groups of one regional node of the scenario (what the node trains on)."""
    from shared_model.catalog import cached_feature_builder
    from shared_model.data import DEFAULT_WANDS_DIR
    from shared_model.encoder import default_cache_dir
    from shared_model.partition import partition_regional
    from shared_model.training import build_user_groups
    from shared_model.world import simulate_click_log
    from simulations.scenarios import get_scenario

    scenario = get_scenario(scenario_name)
    builder = cached_feature_builder(
        str(DEFAULT_WANDS_DIR.resolve()), str(default_cache_dir().resolve())
    )
    parts = partition_regional(simulate_click_log(builder.data, scenario.world))
    key = sorted(parts)[node]
    max_sessions = int(scenario.run_config.get("max-sessions-per-user", 2))
    return build_user_groups(
        parts[key], builder, max_sessions_per_user=max_sessions, rng=np.random.default_rng(seed)
    )


def make_canaries(*, m: int, width: int, scale: float, rng: np.random.Generator) -> UserGroups:
    """``m`` canary users: one clicked rank-1 impression at features ``scale · x_i``."""
    x = rng.standard_normal((m, 4))
    x[:, 0] = -np.abs(x[:, 0])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    feats = np.zeros((m, width, 4), np.float32)
    rank = np.zeros((m, width), np.int64)
    clicked = np.zeros((m, width), np.float32)
    mask = np.zeros((m, width), np.float32)
    feats[:, 0] = scale * x
    rank[:, 0], clicked[:, 0], mask[:, 0] = 1, 1.0, 1.0
    return UserGroups(feats, rank, clicked, mask)


def _concat(a: UserGroups, b: UserGroups) -> UserGroups:
    w = max(a.rank.shape[1], b.rank.shape[1])

    def pad(arr: np.ndarray) -> np.ndarray:
        extra = [(0, 0), (0, w - arr.shape[1])] + [(0, 0)] * (arr.ndim - 2)
        return np.pad(arr, extra)

    return UserGroups(
        *(np.concatenate([pad(x), pad(y)]) for x, y in (
            (a.features, b.features), (a.rank, b.rank), (a.clicked, b.clicked), (a.mask, b.mask)
        ))
    )


def _flat(head: RankerHead) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in head.parameters()]).numpy().copy()


def _clipped_grads(head: RankerHead, canaries: UserGroups, clip: float) -> np.ndarray:
    crit = ClickLoss("none")
    rows = []
    for i in range(canaries.num_users):
        head.zero_grad()
        target = torch.from_numpy(np.where(canaries.mask[i : i + 1] > 0,
                                           canaries.clicked[i : i + 1], -1.0))
        out = head(torch.from_numpy(canaries.features[i : i + 1]),
                   torch.from_numpy(canaries.rank[i : i + 1]))
        crit(out, target).sum().backward()
        grads = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in head.parameters()
        ]
        rows.append(torch.cat(grads).numpy().copy())
    head.zero_grad()
    g = np.asarray(rows)
    norms = np.linalg.norm(g, axis=1, keepdims=True)
    return g * np.minimum(1.0, clip / np.maximum(norms, 1e-12))


def run_canary_audit(
    *,
    real: UserGroups,
    epsilon: float,
    delta: float,
    rounds: int,
    canaries: int = 200,
    k: int | None = None,
    scale: float = 30.0,
    learning_rate: float = 0.5,
    batch_size: int = 256,
    clip_norm: float = 1.0,
    seed: int = 0,
    scenario: str = "",
    confidence: float = DEFAULT_CONFIDENCE,
) -> CanaryAuditResult:
    """Train one run with canaries inserted into ``real`` and bound ε from below."""
    from privacy.accountant_store import plan_noise_multiplier

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    can = make_canaries(m=canaries, width=real.rank.shape[1], scale=scale, rng=rng)
    included = rng.random(canaries) < 0.5
    data = _concat(real, UserGroups(*(a[included] for a in (
        can.features, can.rank, can.clicked, can.mask))))
    base = TrainConfig(learning_rate=learning_rate, batch_size=batch_size, clip_norm=clip_norm)
    sigma = plan_noise_multiplier(
        budget_epsilon=epsilon, delta=delta,
        sample_rate=sample_rate_for(base, data.num_users),
        steps_per_round=steps_per_round(base, data.num_users), rounds=rounds,
    ) if math.isfinite(epsilon) else None
    torch.manual_seed(seed)
    head = RankerHead()
    scores = np.zeros(canaries)
    for t in range(rounds):
        before = _flat(head)
        grads = _clipped_grads(head, can, clip_norm)
        config = TrainConfig(
            learning_rate=learning_rate, batch_size=batch_size, clip_norm=clip_norm,
            noise_multiplier=sigma, seed=(seed * 1_000_003 + t) % (2**31),
        )
        train_head(head, data, config)
        update = _flat(head) - before
        scores -= grads[:, :RELEVANCE_WEIGHTS] @ update[:RELEVANCE_WEIGHTS]
    k = k if k is not None else max(1, canaries // 10)
    guesses = guess_from_scores(scores=scores, included=included, k_plus=k, k_minus=k)
    bound = epsilon_lower_bound(
        m=canaries, r=guesses.guesses, v=guesses.correct, delta=delta, confidence=confidence
    )
    return CanaryAuditResult(
        scenario=scenario, claimed_epsilon=epsilon, epsilon_lower_bound=bound,
        confidence=confidence, delta=delta, noise_multiplier=sigma or 0.0, rounds=rounds,
        real_users=real.num_users, canaries=canaries, canaries_in=int(included.sum()),
        guesses=guesses.guesses, correct=guesses.correct, k_plus=k, k_minus=k,
        wall_seconds=time.perf_counter() - start,
    )
