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


# --- run directories: zero-shot comparator, seen and unseen views (issue 9) ---------------


def _oracle_release(directory, key, builder, queries, head):
    """A release whose evidence memorises the judged relevance of ``queries`` (strong,
    nearly noise-free counts): a stand-in for what 100k users' clicks learn."""
    from shared_model.evidence import DEFAULT_PRIOR
    from shared_model.release import write_release
    from shared_model.release_evidence import (
        EvidenceEntry,
        ReleaseEvidence,
        catalog_sha256,
        normalise_query,
    )

    entries = {}
    for q in queries:
        pids = sorted(j.product_id for j in builder.data.judged(q))
        rel = np.array([builder.data.relevance(q, p) for p in pids])
        exam = np.full(len(pids), 5000.0)
        entries[normalise_query(builder.data.queries[q].text)] = EvidenceEntry(
            builder.rows(pids), exam * (0.05 + 0.85 * rel), exam)
    evidence = ReleaseEvidence.from_entries(
        entries, prior=DEFAULT_PRIOR, noise_var=1.0,
        catalog=catalog_sha256(builder.product_ids), num_products=len(builder.product_ids),
    )
    return write_release(directory, head=head, version=directory.name, round=1,
                         epsilon_per_node={}, metrics={}, signing_key=key, evidence=evidence)


def test_run_ab_zero_shot_seen_and_unseen(tmp_path, wands_builder) -> None:
    import json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared_model.evaluation import seen_unseen_queries
    from shared_model.ranker import RankerHead
    from shared_model.release import write_public_key
    from simulations.ab import COMPARATORS, VIEWS, run_ab

    builder = wands_builder
    run = tmp_path / "run"
    (run / "releases").mkdir(parents=True)
    config = {"num-folds": 5, "eval-fold": 0, "seed": 0, "hidden-dim": 0, "epsilon": "1",
              "scenario": "test"}
    (run / "config.json").write_text(json.dumps(config))
    seen, unseen = seen_unseen_queries(builder.data.query_ids, num_folds=5, seed=0, eval_fold=0)
    key = Ed25519PrivateKey.generate()
    write_public_key(key, tmp_path / "run.keys" / "server-signing.pub")
    # Round 1: untrained head (= zero-shot order) + memorised seen queries; round 2: the head
    # alone (no evidence).
    _oracle_release(run / "releases" / "round-0001", key, builder, seen, RankerHead())
    from shared_model.release import write_release

    write_release(run / "releases" / "round-0002", head=RankerHead(), version="round-0002",
                  round=2, epsilon_per_node={}, metrics={}, signing_key=key)
    # Round 3: a checkpoint (head + summed evidence arrays, as the server saves them),
    # scored as the server's evaluator scores it.
    from shared_model.evidence import (
        EVIDENCE_CLICKS,
        EVIDENCE_EXAM,
        EvidenceIndex,
        empty_evidence,
    )
    from shared_model.state import head_state

    index = EvidenceIndex(builder.data)
    arrays = {**head_state(RankerHead()), **empty_evidence(index)}
    for q in seen:
        sl = slice(index.offsets[q], index.offsets[q] + len(index.products[q]))
        rel = np.array([builder.data.relevance(q, p) for p in index.products[q]])
        arrays[EVIDENCE_EXAM][sl] = 100.0
        arrays[EVIDENCE_CLICKS][sl] = 100.0 * (0.05 + 0.85 * rel)
    (run / "checkpoints").mkdir()
    np.savez(run / "checkpoints" / "round-0003.npz", **arrays)
    result = run_ab(run, users=4000, builder=builder, out_dir=tmp_path / "ab")
    assert result["seen_queries"] == seen and result["held_out_queries"] == unseen
    r1, r2, r3 = result["rounds"]
    assert (r1["evidence"], r2["evidence"], r3["evidence"]) == (True, False, True)
    assert r3["source"] == "checkpoint"
    assert r3["seen"]["vs_zero_shot"]["lift_ci"][0] > 0
    assert r3["seen"]["vs_previous"]["lift_ci"][0] > 0  # vs round 2's head alone
    for r in (r1, r2):
        for view in VIEWS:
            assert set(r[view]) == set(COMPARATORS)
        assert r["vs_bm25"] == r["unseen"]["vs_bm25"]  # older readers' keys: unseen
    # Seen queries: memorised relevance beats zero-shot MiniLM and BM25, clearly.
    assert r1["seen"]["vs_zero_shot"]["lift_ci"][0] > 0
    assert r1["seen"]["vs_bm25"]["lift_ci"][0] > 0
    # ... and dropping the evidence (round 2) loses it again: worse than round 1.
    assert r2["seen"]["vs_previous"]["lift_ci"][1] < 0
    assert r2["seen"]["vs_previous"]["previous_round"] == 1
    # Unseen queries get no evidence: an untrained head shows zero-shot's ranking, so the
    # zero-shot comparison is a tie (the interval covers 0) in both rounds.
    for r in (r1, r2):
        ci = r["unseen"]["vs_zero_shot"]["lift_ci"]
        assert ci[0] <= 0 <= ci[1]
    written = json.loads((tmp_path / "ab" / "ab.json").read_text())
    assert written["final"]["seen"]["vs_zero_shot"]["ctr_b"] == pytest.approx(
        r3["seen"]["vs_zero_shot"]["ctr_b"])
    assert (tmp_path / "ab" / "ab.png").stat().st_size > 0
