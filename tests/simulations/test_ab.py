"""simulations.ab: CTR lift math (intervals cover a known difference; identical arms) and users."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.ab import ArmCounts, ab_test, arm_counts, ctr_lift, make_users


def _arm(p: float, users: int, rng: np.random.Generator) -> ArmCounts:
    imps = rng.integers(10, 60, size=users).astype(np.float64)
    return ArmCounts(rng.binomial(imps.astype(np.int64), p).astype(np.float64), imps)


@pytest.mark.parametrize("resamples", [0, 400])
def test_interval_covers_known_difference(resamples: int) -> None:
    # 40 independent experiments: the 95% interval should cover the true lift nearly always.
    covered_abs = covered_rel = 0
    trials = 40 if resamples == 0 else 10
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        a, b = _arm(0.25, 1500, rng), _arm(0.20, 1500, rng)
        out = ctr_lift(a, b, resamples=resamples, seed=seed)
        covered_abs += out["lift_ci"][0] <= 0.05 <= out["lift_ci"][1]
        covered_rel += out["relative_lift_ci"][0] <= 0.25 <= out["relative_lift_ci"][1]
        assert out["lift_ci"][0] > 0  # the difference is detectable at this size
    assert covered_abs >= trials * 0.85
    assert covered_rel >= trials * 0.85


def test_delta_method_agrees_with_bootstrap() -> None:
    rng = np.random.default_rng(7)
    a, b = _arm(0.3, 2000, rng), _arm(0.28, 2000, rng)
    normal = ctr_lift(a, b)
    boot = ctr_lift(a, b, resamples=1000, seed=1)
    width_n = normal["lift_ci"][1] - normal["lift_ci"][0]
    width_b = boot["lift_ci"][1] - boot["lift_ci"][0]
    assert width_b == pytest.approx(width_n, rel=0.15)
    assert normal["lift"] == boot["lift"]


def test_identical_arms_zero_lift() -> None:
    rng = np.random.default_rng(1)
    a = _arm(0.2, 500, rng)
    for resamples in (0, 200):
        out = ctr_lift(a, a, resamples=resamples)
        assert out["lift"] == 0.0 and out["relative_lift"] == 0.0
        assert out["lift_ci"][0] <= 0.0 <= out["lift_ci"][1]
    # Same ranking in both arms of a simulated A/B: the interval covers 0.
    users = make_users(["q1", "q2", "q3"], users=4000, seed=3)
    shown = np.tile(np.linspace(1.0, 0.0, 10), (3, 1))
    out = ab_test(users, shown, shown)
    assert out["lift_ci"][0] <= 0.0 <= out["lift_ci"][1]
    assert out["users_a"] + out["users_b"] == 4000
    assert abs(out["users_a"] - out["users_b"]) <= 1


def test_better_ranking_wins_and_users_split() -> None:
    users = make_users(["q1", "q2"], users=6000, seed=0)
    good = np.tile(np.array([1.0] * 3 + [0.0] * 7), (2, 1))
    bad = good[:, ::-1].copy()
    out = ab_test(users, good, bad)
    assert out["lift_ci"][0] > 0
    short = good.copy()
    short[:, 5:] = -1  # pool of 5: nothing shown in slots 6-10
    counts = arm_counts(users, short, 0)
    assert counts.impressions.sum() == 5 * (users.arm[users.session_user] == 0).sum()
    with pytest.raises(ValueError):
        make_users(["q"], users=1, seed=0)
