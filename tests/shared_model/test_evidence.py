"""shared_model.evidence: the pair index, per-user rows, the noise-aware scorer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from shared_model.clicklog import CLICK_LOG_SCHEMA
from shared_model.evaluation import evaluate
from shared_model.evidence import (
    EVIDENCE_CLICKS,
    EVIDENCE_EXAM,
    EVIDENCE_KEYS,
    EVIDENCE_NOISE_VAR,
    EvidenceIndex,
    EvidenceModel,
    PriorFit,
    denoised_exam,
    empty_evidence,
    shrunk_scores,
    split_evidence,
    user_pair_rows,
)
from shared_model.schema import JudgedSearchData, Judgment, Product, Query


def _data() -> JudgedSearchData:
    """3 queries x 40 products; relevance of product i for every query is (i % 3) / 2."""
    products = {f"p{i:02d}": Product(f"p{i:02d}", f"thing {i}") for i in range(40)}
    queries = {f"q{q}": Query(f"q{q}", f"query {q}") for q in range(3)}
    judgments = tuple(
        Judgment(q, p, (int(p[1:]) % 3) / 2) for q in queries for p in sorted(products)
    )
    return JudgedSearchData(queries=queries, products=products, judgments=judgments)


def _base(query_id, product_ids):
    # A weak base model: slightly prefers low product numbers, knows nothing of relevance.
    return -np.array([int(p[1:]) for p in product_ids], dtype=float)


def test_index_is_sorted_and_complete():
    index = EvidenceIndex(_data())
    assert index.num_pairs == 120
    assert index.query_ids == ["q0", "q1", "q2"]
    assert index.offsets == {"q0": 0, "q1": 40, "q2": 80}
    ids = index.pair_ids(["q1", "q2", "q9"], ["p00", "p39", "p00"])
    assert ids.tolist() == [40, 119, -1]


def _log(rows):
    cols = list(zip(*rows, strict=True))
    arrays = [
        pa.array(cols[0], pa.int64()), pa.array(cols[1], pa.int64()),
        pa.array([0] * len(rows), pa.int32()), pa.array(cols[2], pa.int64()),
        pa.array(cols[3], pa.string()), pa.array(cols[4], pa.string()),
        pa.array(cols[5], pa.int16()), pa.array(cols[6], pa.bool_()),
        pa.array([True] * len(rows), pa.bool_()),
    ]
    return pa.Table.from_arrays(arrays, schema=CLICK_LOG_SCHEMA)


def test_user_pair_rows_keep_first_k_sessions_by_time():
    index = EvidenceIndex(_data())
    # (session, user, time, query, product, rank, clicked); user 5's session 3 is earliest.
    table = _log([
        (1, 5, 300, "q0", "p00", 1, True),
        (1, 5, 300, "q0", "p01", 2, False),
        (2, 5, 200, "q1", "p02", 1, True),
        (3, 5, 100, "q2", "p03", 4, False),
        (4, 6, 100, "q0", "p04", 2, True),
        (4, 6, 100, "q0", "nope", 3, True),  # not in the index: dropped
    ])
    rows = user_pair_rows(table, index, max_sessions_per_user=2)
    got = sorted(zip(rows.user.tolist(), rows.pair.tolist(), rows.clicks.tolist(),
                     rows.exam.tolist(), strict=True))
    assert got == [(5, 42, 1.0, 1.0), (5, 83, 0.0, 0.25), (6, 4, 1.0, 0.5)]
    assert rows.num_users == 2


def test_without_evidence_the_model_ranks_as_its_base():
    data, index = _data(), EvidenceIndex(_data())
    model = EvidenceModel(index, empty_evidence(index), _base)
    pids = index.products["q0"]
    assert np.array_equal(np.argsort(-model("q0", pids)), np.argsort(-_base("q0", pids)))
    assert evaluate(data, ["q0"], model) == evaluate(data, ["q0"], _base)


def test_clean_evidence_is_learnt_and_huge_noise_falls_back_to_the_base():
    data, index = _data(), EvidenceIndex(_data())
    rng = np.random.default_rng(0)
    exam = np.full(index.num_pairs, 200.0)
    rel = np.array([(int(p[1:]) % 3) / 2 for q in index.query_ids for p in index.products[q]])
    clicks = rng.binomial(200, 0.05 + 0.85 * rel).astype(float)
    clean = {EVIDENCE_CLICKS: clicks, EVIDENCE_EXAM: exam, EVIDENCE_NOISE_VAR: np.zeros(1)}
    learnt = evaluate(data, index.query_ids, EvidenceModel(index, clean, _base))
    base = evaluate(data, index.query_ids, _base)
    assert learnt["ndcg@10"] == pytest.approx(1.0)
    assert base["ndcg@10"] < 0.9
    sd = 1e5
    noisy = {
        EVIDENCE_CLICKS: clicks + rng.normal(0, sd, clicks.shape),
        EVIDENCE_EXAM: exam + rng.normal(0, sd, exam.shape),
        EVIDENCE_NOISE_VAR: np.array([sd**2]),
    }
    model = EvidenceModel(index, noisy, _base)
    for q in index.query_ids:
        pids = index.products[q]
        assert np.array_equal(np.argsort(-model(q, pids)), np.argsort(-_base(q, pids)))


def test_shrunk_scores_weights_follow_exam_and_noise():
    prior = PriorFit(a=0.3, b=0.0, tau2=0.05)
    z = np.zeros(3)
    clicks = np.array([0.0, 90.0, 9.0])
    exam = np.array([0.0, 100.0, 10.0])
    out = shrunk_scores(clicks, exam, z, prior, noise_var=0.0)
    assert out[0] == pytest.approx(0.3)  # no evidence: the prior
    assert 0.3 < out[2] < out[1] < 0.9  # more evidence, more trust
    louder = shrunk_scores(clicks, exam, z, prior, noise_var=400.0)
    assert louder[1] - 0.3 < out[1] - 0.3


def test_denoised_exam_shrinks_pure_noise_to_its_mean():
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 10, 500)
    out = denoised_exam(noise, noise_var=100.0)
    assert out.std() < 1.0
    signal = np.concatenate([np.full(250, 200.0), np.zeros(250)]) + noise
    kept = denoised_exam(signal, noise_var=100.0)
    assert kept[:250].mean() > 150 and kept[250:].mean() < 50


def test_split_evidence():
    head = {"w": np.zeros(2, np.float32)}
    assert split_evidence(head) == (head, None)
    index = EvidenceIndex(_data())
    both = {**head, **empty_evidence(index)}
    got_head, ev = split_evidence(both)
    assert set(got_head) == {"w"} and ev is not None and set(ev) == set(EVIDENCE_KEYS)
    with pytest.raises(ValueError, match="incomplete"):
        split_evidence({**head, EVIDENCE_CLICKS: np.zeros(3)})
