"""client.evidence_release + server.evidence: one accounted release per node, summed."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from client.evidence_release import EvidencePlan, evidence_reply, released_round
from privacy.accountant_store import PersistentAccountant
from privacy.ledger import Ledger
from server.evidence import evidence_from_mean, head_only, initial_evidence, sum_evidence
from shared_model.clicklog import CLICK_LOG_SCHEMA
from shared_model.evidence import (
    EVIDENCE_CLICKS,
    EVIDENCE_EXAM,
    EVIDENCE_NOISE_VAR,
    EvidenceIndex,
)
from shared_model.schema import JudgedSearchData, Judgment, Product, Query


def _index() -> EvidenceIndex:
    products = {f"p{i}": Product(f"p{i}", f"t {i}") for i in range(4)}
    queries = {"q0": Query("q0", "a"), "q1": Query("q1", "b")}
    judgments = tuple(Judgment(q, p, 0.5) for q in queries for p in products)
    return EvidenceIndex(JudgedSearchData(queries=queries, products=products,
                                          judgments=judgments))


def _log() -> pa.Table:
    rows = [  # session, user, time, query, product, rank, clicked
        (1, 1, 10, "q0", "p0", 1, True), (1, 1, 10, "q0", "p1", 2, False),
        (2, 2, 10, "q1", "p3", 1, False), (2, 2, 10, "q1", "p2", 2, True),
    ]
    c = list(zip(*rows, strict=True))
    return pa.Table.from_arrays(
        [pa.array(c[0], pa.int64()), pa.array(c[1], pa.int64()),
         pa.array([0] * 4, pa.int32()), pa.array(c[2], pa.int64()),
         pa.array(c[3], pa.string()), pa.array(c[4], pa.string()),
         pa.array(c[5], pa.int16()), pa.array(c[6], pa.bool_()),
         pa.array([False] * 4, pa.bool_())],
        schema=CLICK_LOG_SCHEMA,
    )


def _reply(tmp_path, sent, *, sigma, rnd=1):
    accountant = PersistentAccountant(tmp_path / "acc.json", delta=1e-5, budget_epsilon=8.0)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    out = evidence_reply(
        sent=sent, clicks_log=_log(), index=_index(),
        plan=EvidencePlan(noise_multiplier=sigma, clip_norm=5.0, max_sessions_per_user=2,
                          delta=1e-5),
        state_dir=tmp_path / "state", accountant=accountant, ledger=ledger, node_name="node-0",
        server_round=rnd, rng=np.random.default_rng(0),
    )
    return out, accountant


def test_release_once_accounted_and_ledgered(tmp_path):
    sent = initial_evidence(_index())
    out, accountant = _reply(tmp_path, sent, sigma=2.0)
    assert set(out) == set(sent) and all(out[k].dtype == np.float32 for k in out)
    assert accountant.history == [(2.0, 1.0, 1)]
    assert out[EVIDENCE_NOISE_VAR][0] == pytest.approx(100.0)  # (2 * 5)^2
    line = json.loads((tmp_path / "ledger.jsonl").read_text().splitlines()[0])
    assert line["mechanism"] == "count-release" and line["sample_rate"] == 1.0
    assert released_round(tmp_path / "state") == 1
    # Later rounds: exactly what was sent (delta 0), nothing more spent.
    again, accountant = _reply(tmp_path, out, sigma=2.0, rnd=2)
    for k in out:
        np.testing.assert_array_equal(again[k], out[k])
    assert accountant.history == [(2.0, 1.0, 1)]


def test_noiseless_release_is_the_clipped_counts(tmp_path):
    out, _ = _reply(tmp_path, initial_evidence(_index()), sigma=0.0)
    # Pairs: q0/p0..p3 = 0..3, q1/p0..p3 = 4..7; no user is clipped at C=5.
    np.testing.assert_allclose(out[EVIDENCE_CLICKS], [1, 0, 0, 0, 0, 0, 1, 0])
    np.testing.assert_allclose(out[EVIDENCE_EXAM], [1, 0.5, 0, 0, 0, 0, 0.5, 1])


def test_server_sums_deltas_and_fedavg_mean_converts_to_the_sum():
    index = _index()
    sent = initial_evidence(index)
    sent[EVIDENCE_CLICKS] += 1.0
    r1 = {k: v + 2.0 for k, v in sent.items()}
    r2 = {k: v + 3.0 for k, v in sent.items()}
    total = sum_evidence(sent, [r1, r2])
    np.testing.assert_allclose(total[EVIDENCE_CLICKS], 1.0 + 5.0)
    np.testing.assert_allclose(total[EVIDENCE_EXAM], 5.0)
    mean = {k: (r1[k] + r2[k]) / 2 for k in sent} | {"w": np.ones(2, np.float32)}
    from_mean = evidence_from_mean(sent, mean, 2)
    for k in sent:
        np.testing.assert_allclose(from_mean[k], total[k], rtol=1e-6)
    np.testing.assert_array_equal(from_mean["w"], np.ones(2))
    assert set(head_only(mean)) == {"w"}
