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


def test_node_round_releases_once_within_one_budget(tmp_path):
    # A node's round with evidence in the global state: DP-SGD and the count release share
    # one accountant and one budget over the planned run.
    from client.node import NodeSettings, train_round
    from privacy.accounting import epsilon_from_history
    from shared_model.catalog import cached_feature_builder
    from shared_model.clicklog import write_click_log
    from shared_model.data import DEFAULT_WANDS_DIR
    from shared_model.ranker import RankerHead
    from shared_model.settings import NodePrivacy, RunSettings
    from shared_model.state import head_state
    from shared_model.world import WorldConfig, simulate_click_log

    builder = cached_feature_builder(str(DEFAULT_WANDS_DIR))
    log = simulate_click_log(builder.data, WorldConfig(num_users=300, num_regions=1, seed=3))
    write_click_log(log, tmp_path / "data" / "clicks.parquet")
    run = RunSettings(
        num_server_rounds=2, epsilon=1.0, delta=1e-4, batch_size=64, evidence_share=0.75,
        run_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"),
    )
    node = NodeSettings(
        name="region-a", data_path=tmp_path / "data" / "clicks.parquet",
        state_dir=tmp_path / "nodes" / "region-a", ledger_dir=tmp_path / "ledger",
        catalog_dir=DEFAULT_WANDS_DIR, privacy=NodePrivacy(epsilon_budget=1.0, delta=1e-4),
    )
    index = EvidenceIndex(builder.data)
    state = {**head_state(RankerHead()), **initial_evidence(index)}
    first = train_round(run=run, node=node, global_state=state, server_round=1)
    assert set(first.state) == set(state)
    assert first.state[EVIDENCE_NOISE_VAR][0] > 0
    assert np.abs(first.state[EVIDENCE_CLICKS]).sum() > 0
    second = train_round(run=run, node=node, global_state=first.state, server_round=2)
    for key in (EVIDENCE_CLICKS, EVIDENCE_EXAM, EVIDENCE_NOISE_VAR):
        np.testing.assert_array_equal(second.state[key], first.state[key])
    history = json.loads((node.state_dir / "accountant.json").read_text())["history"]
    assert sum(1 for s, q, n in history if q == 1.0 and n == 1) == 1  # one release
    spent = epsilon_from_history(history=history, delta=1e-4)
    assert 0.9 <= spent <= 1.0 and second.metrics["epsilon"] == pytest.approx(spent)
    lines = (node.ledger_dir / "region-a.jsonl").read_text().splitlines()
    assert [json.loads(x)["mechanism"] for x in lines].count("count-release") == 1
    # The auditor's independent recomputation composes the release with the DP-SGD steps.
    from privacy.verify import verify_run

    (tmp_path / "config.json").write_text(json.dumps(run.to_config()))
    report = verify_run(tmp_path, pld_reference=False)
    assert report.ok, [str(p) for p in report.problems]


def test_reply_validation_leaves_evidence_out_of_the_update_clip():
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from server.validation import check_reply

    sent = {"w": np.zeros(3, np.float32), **initial_evidence(_index())}
    reply = {k: v.copy() for k, v in sent.items()}
    reply["w"] += 10.0  # a head update beyond the clip: clipped
    reply[EVIDENCE_CLICKS] += 500.0  # noisy counts: far beyond any update norm, kept as sent
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in reply.items()}),
        "metrics": MetricRecord(
            {"num-examples": 1.0, "steps": 1.0, "epsilon": 1.0, "release-round": 0.0}
        ),
    })
    checked, problems = check_reply(content, sent, clip_norm=5.0, reject_norm=1000.0)
    assert problems == [] and checked is not None and checked.clipped
    assert np.linalg.norm(checked.arrays["w"]) == pytest.approx(5.0, rel=1e-5)
    np.testing.assert_array_equal(checked.arrays[EVIDENCE_CLICKS], reply[EVIDENCE_CLICKS])
