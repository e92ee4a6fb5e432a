"""privacy.count_release: sensitivity, per-user clipping, the Gaussian release, budget split."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from privacy.accounting import epsilon_from_history
from privacy.count_release import (
    clip_and_sum,
    csprng_generator,
    gaussian_release,
    plan_split,
    user_norms,
    worst_case_sensitivity,
)


def test_worst_case_sensitivity_golden():
    # K * sqrt(top_k + sum 1/r^2): 2 * sqrt(10 + 1.5497677...) = 6.7969898...
    assert worst_case_sensitivity(max_sessions=2, top_k=10) == pytest.approx(6.796989843, 1e-9)
    assert worst_case_sensitivity(max_sessions=1, top_k=1) == pytest.approx(math.sqrt(2))


def test_worst_case_sensitivity_is_attained_and_not_exceeded():
    # Brute force over every way 2 sessions can show 3 of 4 products (ranks 1..3), all clicked.
    k, top, products = 2, 3, range(4)
    best = 0.0
    shows = list(itertools.permutations(products, top))
    for sessions in itertools.product(shows, repeat=k):
        clicks, exam = np.zeros(4), np.zeros(4)
        for shown in sessions:
            for rank, p in enumerate(shown, start=1):
                clicks[p] += 1
                exam[p] += 1 / rank
        best = max(best, float(np.sqrt(np.sum(clicks**2) + np.sum(exam**2))))
    assert best == pytest.approx(worst_case_sensitivity(max_sessions=k, top_k=top))


def _random_rows(rng, users=30, pairs=12, rows=200):
    return (
        rng.integers(0, users, rows),
        rng.integers(0, pairs, rows),
        rng.integers(0, 2, rows).astype(float),
        1.0 / rng.integers(1, 11, rows),
    )


def test_clip_and_sum_bounds_each_user_by_c():
    rng = np.random.default_rng(0)
    user, pair, clicks, exam = _random_rows(rng)
    full_c, full_e, clipped = clip_and_sum(user, pair, clicks, exam, num_pairs=12, clip_norm=1.5)
    assert clipped > 0
    for u in np.unique(user):
        keep = user != u
        c, e, _ = clip_and_sum(
            user[keep], pair[keep], clicks[keep], exam[keep], num_pairs=12, clip_norm=1.5
        )
        # Removing one user moves the released vector by at most C (the sensitivity).
        moved = math.sqrt(np.sum((full_c - c) ** 2) + np.sum((full_e - e) ** 2))
        assert moved <= 1.5 + 1e-9


def test_clip_and_sum_without_clipping_is_the_plain_sum():
    rng = np.random.default_rng(1)
    user, pair, clicks, exam = _random_rows(rng)
    c, e, clipped = clip_and_sum(user, pair, clicks, exam, num_pairs=12, clip_norm=None)
    assert clipped == 0
    np.testing.assert_allclose(c, np.bincount(pair, weights=clicks, minlength=12))
    np.testing.assert_allclose(e, np.bincount(pair, weights=exam, minlength=12))
    big_c, big_e, _ = clip_and_sum(user, pair, clicks, exam, num_pairs=12, clip_norm=1e9)
    np.testing.assert_allclose(big_c, c)
    np.testing.assert_allclose(big_e, e)


def test_user_norms_merge_rows_of_a_pair_first():
    # One user, the same pair twice: clicks 2, exam 1.5 -> norm 2.5.
    norms = user_norms(
        np.array([7, 7]), np.array([3, 3]), np.array([1.0, 1.0]), np.array([1.0, 0.5]),
        num_pairs=5,
    )
    assert norms == {7: pytest.approx(2.5)}


def test_clip_and_sum_rejects_bad_input():
    with pytest.raises(ValueError, match="pair indices"):
        clip_and_sum(np.array([0]), np.array([5]), np.ones(1), np.ones(1), num_pairs=5,
                     clip_norm=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        clip_and_sum(np.array([0]), np.array([1]), -np.ones(1), np.ones(1), num_pairs=5,
                     clip_norm=1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_and_sum(np.array([0]), np.array([1]), np.ones(1), np.ones(1), num_pairs=5,
                     clip_norm=0.0)


def test_gaussian_release_noise_level():
    values = np.zeros(200_000)
    out = gaussian_release(values, noise_std=3.0, rng=np.random.default_rng(2))
    assert out.std() == pytest.approx(3.0, rel=0.01)
    assert np.array_equal(gaussian_release(values, noise_std=0.0, rng=np.random.default_rng(3)),
                          values)
    with pytest.raises(ValueError):
        gaussian_release(values, noise_std=float("nan"), rng=np.random.default_rng(3))


def test_csprng_generator_is_fresh_each_call():
    assert csprng_generator().random() != csprng_generator().random()


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_plan_split_spends_the_budget_across_both_mechanisms(epsilon):
    release, sgd = plan_split(
        epsilon=epsilon, delta=1e-5, release_share=0.75, sgd_sample_rate=0.125, sgd_steps=240
    )
    alone = epsilon_from_history(history=[(release, 1.0, 1)], delta=1e-5)
    both = epsilon_from_history(
        history=[(release, 1.0, 1), (sgd, 0.125, 240)], delta=1e-5
    )
    assert alone <= 0.75 * epsilon + 1e-9
    assert both <= epsilon + 1e-9
    assert both >= 0.98 * epsilon
    assert plan_split(
        epsilon=math.inf, delta=1e-5, release_share=0.5, sgd_sample_rate=0.1, sgd_steps=10
    ) == (0.0, 0.0)
