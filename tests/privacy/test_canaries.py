"""Unit tests of the one-run audit bound (privacy/canaries.py); fast, no training."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.canaries import epsilon_lower_bound, guess_from_scores, p_value


def test_all_correct_many_guesses_gives_large_bound() -> None:
    assert epsilon_lower_bound(m=1000, r=100, v=100, delta=1e-5) > 3.0


def test_half_correct_gives_zero() -> None:
    assert epsilon_lower_bound(m=1000, r=100, v=50, delta=1e-5) == 0.0


def test_monotone_in_correct_count() -> None:
    bounds = [epsilon_lower_bound(m=500, r=60, v=v, delta=1e-5) for v in range(30, 61)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))


def test_bound_is_where_p_value_crosses_level() -> None:
    eps = epsilon_lower_bound(m=200, r=40, v=36, delta=1e-5)
    assert p_value(m=200, r=40, v=36, epsilon=eps, delta=1e-5) < 1 - 0.95
    assert p_value(m=200, r=40, v=36, epsilon=eps + 1e-3, delta=1e-5) >= 1 - 0.95


def test_delta_term_only_loosens() -> None:
    assert epsilon_lower_bound(m=1000, r=100, v=90, delta=1e-3) <= epsilon_lower_bound(
        m=1000, r=100, v=90, delta=0.0
    )


def test_invalid_counts_raise() -> None:
    with pytest.raises(ValueError):
        p_value(m=10, r=20, v=5, epsilon=1.0, delta=0.0)


def test_guess_from_scores_counts() -> None:
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    g = guess_from_scores(scores=scores, included=included, k_plus=2, k_minus=2)
    assert (g.correct_in, g.correct_out, g.guesses) == (1, 1, 4)
