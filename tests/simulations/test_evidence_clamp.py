"""The click fraud clamps measured in simulations.clickfraud: the candidates and the
server's default (``shared_model.evidence.median_rate_caps``).

All are server-side post-processing of each node's already-noised evidence release.
Synthetic arrays only (no world), so these run in milliseconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared_model.evidence import median_rate_caps
from simulations.clickfraud import clamp_clicks_to_exam, loo_ratio_clamp


def test_exam_clamp_cuts_a_bot_heavy_pair_and_leaves_honest_pairs() -> None:
    # Prepare: pair 0 honest (clicks < exam), pair 1 bots (200 clicks on exam 40), s = 10.
    clicks, exam = np.array([30.0, 200.0]), np.array([60.0, 40.0])
    # Execute
    out = clamp_clicks_to_exam(clicks, exam, 10.0, z=2.0)
    # Assert: the honest pair is untouched, the bots' pair is cut to exam + 2 sqrt(2) s.
    assert out[0] == 30.0
    assert out[1] == pytest.approx(40.0 + 2.0 * math.sqrt(2.0) * 10.0)


def test_exam_clamp_without_noise_is_clicks_at_most_exam() -> None:
    out = clamp_clicks_to_exam(np.array([5.0, 1.0]), np.array([2.0, 3.0]), 0.0, z=3.0)
    assert out.tolist() == [2.0, 1.0]


@pytest.mark.parametrize(("clicks", "exam", "std", "z"), [
    (np.zeros(3), np.zeros(2), 1.0, 2.0),  # shapes differ
    (np.zeros(2), np.zeros(2), math.nan, 2.0),
    (np.zeros(2), np.zeros(2), -1.0, 2.0),
    (np.zeros(2), np.zeros(2), 1.0, math.inf),
])
def test_exam_clamp_refuses_bad_input(clicks: np.ndarray, exam: np.ndarray, std: float,
                                      z: float) -> None:
    with pytest.raises(ValueError):
        clamp_clicks_to_exam(clicks, exam, std, z=z)


def _regions(bot_clicks: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Five nodes, two pairs, rate 0.5 everywhere; node 0 gets ``bot_clicks`` on pair 1."""
    released = [(np.array([250.0, 250.0]), np.array([500.0, 500.0])) for _ in range(5)]
    released[0] = (np.array([250.0, 250.0 + bot_clicks]), np.array([500.0, 500.0]))
    return released


def _median_clamp(released: list[tuple[np.ndarray, np.ndarray]], noise_std: float, *,
                  z: float) -> list[tuple[np.ndarray, np.ndarray]]:
    caps = median_rate_caps(np.stack([c for c, _ in released]),
                            np.stack([e for _, e in released]),
                            np.full(len(released), noise_std), z=z)
    return [(np.minimum(c, cap), e) for (c, e), cap in zip(released, caps, strict=True)]


@pytest.mark.parametrize("median", [False, True])
def test_loo_clamp_cuts_the_bot_region_and_leaves_honest_regions(median: bool) -> None:
    # Prepare
    honest, attacked = _regions(0.0), _regions(200.0)
    clamp = _median_clamp if median else loo_ratio_clamp
    # Execute
    out_honest = clamp(honest, 10.0, z=2.0)
    out_attacked = clamp(attacked, 10.0, z=2.0)
    # Assert: honest releases pass unchanged; the bots' node keeps less than half their pull.
    for (c, e), (c2, e2) in zip(honest, out_honest, strict=True):
        assert np.array_equal(c, c2) and np.array_equal(e, e2)
    kept = out_attacked[0][0][1] - 250.0
    assert 0.0 < kept < 100.0
    assert out_attacked[0][0][0] == 250.0  # the node's other pair is untouched
    assert all(np.array_equal(out_attacked[i][0], attacked[i][0]) for i in range(1, 5))


def test_median_rate_caps_golden_values_and_bad_input() -> None:
    # Prepare: three nodes, one pair, rates 0.5 / 0.4 / 0.6 on 100 exam each, no noise
    clicks = np.array([[50.0], [40.0], [60.0]])
    exam = np.full((3, 1), 100.0)
    # Execute
    caps = median_rate_caps(clicks, exam, np.zeros(3), z=0.0)
    # Assert: with z = 0 the cap is exam x the median of the other two rates
    assert caps[:, 0] == pytest.approx([100 * 0.5, 100 * 0.55, 100 * 0.45])
    assert np.all(np.isinf(median_rate_caps(clicks, exam, np.zeros(3), z=math.inf)))
    assert np.all(np.isinf(median_rate_caps(clicks[:2], exam[:2], np.zeros(2), z=2.0)))
    with pytest.raises(ValueError, match="z must be >= 0"):
        median_rate_caps(clicks, exam, np.zeros(3), z=-1.0)
    with pytest.raises(ValueError, match=r"and \(2,\)"):
        median_rate_caps(clicks, exam, np.zeros(2), z=2.0)
    with pytest.raises(ValueError, match="nan"):
        median_rate_caps(clicks, exam, np.array([0.0, math.nan, 0.0]), z=2.0)
