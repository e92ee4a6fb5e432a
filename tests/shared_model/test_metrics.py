"""Tests for shared_model.metrics against hand-computed values.

Gains are ``2**(2*rel) - 1``: rel 1.0 (Exact) -> 3, rel 0.5 (Partial) -> 1, rel 0.0 -> 0.
Discounts are ``1 / log2(i + 1)`` for 1-based rank i: 1, 1/log2(3) = 0.63093, 1/2, ...
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared_model.metrics import auc, dcg_at_k, mean_metrics, mrr, ndcg_at_k

LOG2_3 = math.log2(3)  # 1.5849625...


# --- DCG / NDCG -------------------------------------------------------------------------


def test_dcg_at_k_sums_discounted_gains_in_given_order():
    # Prepare: gains already in ranked order.
    gains = np.array([3.0, 1.0, 0.0, 3.0])

    # Execute
    dcg2 = dcg_at_k(gains, 2)
    dcg4 = dcg_at_k(gains, 4)

    # Assert: 3/log2(2) + 1/log2(3) = 3 + 0.63093 = 3.63093;
    # @4 adds 0/log2(4) + 3/log2(5) = 3/2.32193 = 1.29203 -> 4.92296.
    assert dcg2 == pytest.approx(3.0 + 1.0 / LOG2_3)
    assert dcg2 == pytest.approx(3.63093, abs=1e-5)
    assert dcg4 == pytest.approx(3.0 + 1.0 / LOG2_3 + 3.0 / math.log2(5))
    assert dcg4 == pytest.approx(4.92296, abs=1e-5)


def test_ndcg_hand_computed_three_items():
    # Prepare: scores order the items 0, 1, 2; relevances 0, 1 (Exact), 0.5 (Partial).
    scores = np.array([3.0, 2.0, 1.0])
    rel = np.array([0.0, 1.0, 0.5])

    # Execute
    full = ndcg_at_k(scores, rel, k=10)
    at2 = ndcg_at_k(scores, rel, k=2)
    at1 = ndcg_at_k(scores, rel, k=1)

    # Assert: ranked gains [0, 3, 1]; ideal [3, 1, 0].
    #   DCG   = 0 + 3/log2(3) + 1/log2(4) = 1.89279 + 0.5 = 2.39279
    #   IDCG  = 3 + 1/log2(3)             = 3 + 0.63093 = 3.63093
    #   NDCG  = 2.39279 / 3.63093 = 0.65900
    assert full == pytest.approx((3 / LOG2_3 + 0.5) / (3 + 1 / LOG2_3))
    assert full == pytest.approx(0.65900, abs=1e-5)
    #   @2: DCG = 3/log2(3) = 1.89279, IDCG = 3.63093 -> 0.52130
    assert at2 == pytest.approx((3 / LOG2_3) / (3 + 1 / LOG2_3))
    assert at2 == pytest.approx(0.52130, abs=1e-5)
    #   @1: the top item has gain 0 -> 0 / 3 = 0
    assert at1 == 0.0


def test_ndcg_perfect_ranking_is_one_and_reversed_is_less():
    # Prepare
    rel = np.array([1.0, 0.5, 0.0, 0.0])
    perfect = np.array([4.0, 3.0, 2.0, 1.0])

    # Execute
    best = ndcg_at_k(perfect, rel, k=3)
    worst = ndcg_at_k(-perfect, rel, k=3)

    # Assert: reversed top-3 gains [0, 0, 1] -> DCG = 1/log2(4) = 0.5;
    # IDCG@3 = 3 + 1/log2(3) = 3.63093 -> 0.5 / 3.63093 = 0.13771.
    assert best == pytest.approx(1.0)
    assert worst == pytest.approx(0.5 / (3 + 1 / LOG2_3))
    assert worst == pytest.approx(0.13771, abs=1e-5)


def test_ndcg_k_larger_than_list_equals_full_list():
    # Prepare
    scores, rel = np.array([0.2, 0.9]), np.array([1.0, 0.0])

    # Execute
    at2, at100 = ndcg_at_k(scores, rel, k=2), ndcg_at_k(scores, rel, k=100)

    # Assert: ranked gains [0, 3] -> 3/log2(3) = 1.89279; IDCG = 3 -> 0.63093.
    assert at2 == at100
    assert at2 == pytest.approx(1 / LOG2_3)


def test_ndcg_ties_keep_input_order():
    # Prepare: all scores tie, so the (stable) ranking is the input order.
    scores = np.array([1.0, 1.0])

    # Execute
    relevant_last = ndcg_at_k(scores, np.array([0.0, 1.0]), k=10)
    relevant_first = ndcg_at_k(scores, np.array([1.0, 0.0]), k=10)

    # Assert: ranked gains [0, 3] -> (3/log2(3)) / 3 = 0.63093; [3, 0] -> 1.
    assert relevant_last == pytest.approx(1 / LOG2_3)
    assert relevant_first == pytest.approx(1.0)


def test_ndcg_no_relevant_item_is_zero():
    # Prepare
    scores, rel = np.array([0.5, 0.1, 0.9]), np.zeros(3)

    # Execute
    value = ndcg_at_k(scores, rel, k=10)

    # Assert: IDCG = 0 -> defined as 0.0 (not NaN).
    assert value == 0.0


@pytest.mark.parametrize("k", [0, -1])
def test_ndcg_rejects_k_below_one_naming_it(k):
    # Prepare
    scores, rel = np.array([1.0]), np.array([1.0])

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"k must be >= 1, got {k}"):
        ndcg_at_k(scores, rel, k=k)


# --- MRR --------------------------------------------------------------------------------


def test_mrr_first_exact_item_and_partial_does_not_count():
    # Prepare: ranked relevances [0.5, 0, 1, 1]; only 1.0 (Exact) counts by default.
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    rel = np.array([0.5, 0.0, 1.0, 1.0])

    # Execute
    exact = mrr(scores, rel)
    partial_ok = mrr(scores, rel, threshold=0.5)

    # Assert: first Exact at rank 3 -> 1/3; with threshold 0.5 the Partial at rank 1 -> 1.
    assert exact == pytest.approx(1 / 3)
    assert partial_ok == 1.0


def test_mrr_orders_by_score_not_input_position():
    # Prepare: the only Exact item is last in input but has the 2nd-highest score.
    scores = np.array([0.1, 0.9, 0.5])
    rel = np.array([0.0, 0.0, 1.0])

    # Execute
    value = mrr(scores, rel)

    # Assert: ranked [0.9, 0.5, 0.1] -> Exact at rank 2 -> 1/2.
    assert value == 0.5


def test_mrr_ties_keep_input_order_and_no_hit_is_zero():
    # Prepare
    tied = np.array([1.0, 1.0, 1.0])

    # Execute
    tie_value = mrr(tied, np.array([0.0, 0.0, 1.0]))
    none_value = mrr(np.array([0.3, 0.2]), np.array([0.5, 0.0]))

    # Assert: ties keep input order -> Exact at rank 3 -> 1/3; no Exact -> 0.
    assert tie_value == pytest.approx(1 / 3)
    assert none_value == 0.0


# --- AUC --------------------------------------------------------------------------------


def test_auc_counts_correctly_ordered_pairs():
    # Prepare: positives (rel 1) score 0.9, 0.3; negatives score 0.8, 0.1.
    scores = np.array([0.9, 0.8, 0.3, 0.1])
    rel = np.array([1.0, 0.0, 1.0, 0.0])

    # Execute
    value = auc(scores, rel)

    # Assert: pairs (pos, neg): (.9,.8)=1 (.9,.1)=1 (.3,.8)=0 (.3,.1)=1 -> 3/4.
    assert value == 0.75


def test_auc_ties_count_half():
    # Prepare: a positive ties a negative at 0.5, and beats the other negative.
    scores = np.array([0.5, 0.5, 0.2])
    rel = np.array([1.0, 0.0, 0.0])

    # Execute
    value = auc(scores, rel)
    all_tied = auc(np.ones(4), np.array([1.0, 0.0, 1.0, 0.0]))

    # Assert: (0.5 vs 0.5) = 1/2, (0.5 vs 0.2) = 1 -> 1.5 / 2 = 0.75; all tied -> 0.5.
    assert value == 0.75
    assert all_tied == 0.5


def test_auc_partial_is_negative_by_default():
    # Prepare: the Partial item outscores the Exact one.
    scores, rel = np.array([0.0, 1.0]), np.array([1.0, 0.5])

    # Execute
    default = auc(scores, rel)
    lenient = auc(scores, np.array([1.0, 0.0]), threshold=0.5)

    # Assert: Exact below its only negative -> 0; threshold is honoured.
    assert default == 0.0
    assert lenient == 0.0
    # With threshold 0.5 both items are positive: one class only -> NaN.
    assert math.isnan(auc(scores, rel, threshold=0.5))


@pytest.mark.parametrize(
    "rel", [np.array([0.0, 0.5, 0.0]), np.array([1.0, 1.0, 1.0])], ids=["no-pos", "no-neg"]
)
def test_auc_one_class_is_nan(rel):
    # Prepare
    scores = np.array([0.1, 0.2, 0.3])

    # Execute
    value = auc(scores, rel)

    # Assert
    assert math.isnan(value)


def test_auc_matches_brute_force_with_many_ties():
    # Prepare: integer scores force lots of ties.
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=60).astype(float)
    rel = rng.choice([0.0, 0.5, 1.0], size=60)
    pos, neg = scores[rel >= 1.0], scores[rel < 1.0]

    # Execute
    value = auc(scores, rel)

    # Assert: the definition, pair by pair.
    expected = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert value == pytest.approx(expected)


# --- mean over queries ------------------------------------------------------------------


def test_mean_metrics_averages_and_skips_undefined_auc():
    # Prepare: query A ranks its only Exact first; query B has only a Partial, ranked 2nd.
    per_query = [
        (np.array([2.0, 1.0]), np.array([1.0, 0.0])),
        (np.array([2.0, 1.0]), np.array([0.0, 0.5])),
    ]

    # Execute
    out = mean_metrics(per_query, k=5)

    # Assert: A: ndcg 1, mrr 1, auc 1. B: gains [0, 1] -> (1/log2(3)) / 1 = 0.63093,
    # mrr 0 (no Exact), auc NaN (no positive) -> skipped.
    assert set(out) == {"ndcg@5", "mrr", "auc"}
    assert out["ndcg@5"] == pytest.approx((1 + 1 / LOG2_3) / 2)
    assert out["mrr"] == 0.5
    assert out["auc"] == 1.0


def test_mean_metrics_all_auc_undefined_is_nan_and_empty_raises():
    # Prepare
    per_query = [(np.array([1.0, 0.0]), np.array([0.0, 0.0]))]

    # Execute
    out = mean_metrics(per_query)

    # Assert
    assert out["ndcg@10"] == 0.0
    assert math.isnan(out["auc"])
    with pytest.raises(ValueError, match="no queries"):
        mean_metrics([])
