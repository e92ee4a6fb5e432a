"""Robust aggregation of the head (issue 11): Flower's strategies behind reply validation,
with the memorised evidence still summed, and what the server records about each node."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flower_round import one_round
from flwr.serverapp.strategy import FedAvg

from privacy.audit import AGGREGATION_DETAIL_PREFIX
from server.evidence import EvidenceSumming
from server.strategies import (
    RobustHead,
    aggregate_train_metrics,
    centered_clip_scales,
    kept_shares,
    norm_bound_scales,
)
from server.validation import CLIP_UPDATE_NORM, RoundReplies, ValidatingStrategy, aggregation_events
from shared_model.evidence import EVIDENCE_CLICKS, EVIDENCE_EXAM, EVIDENCE_NOISE_VAR
from shared_model.settings import RunSettings

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = [11, 22, 33, 44, 55]
HEAD = {"w": np.zeros((1, 40), np.float32), "b": np.zeros(1, np.float32)}
EVIDENCE = {EVIDENCE_CLICKS: np.zeros(3, np.float32), EVIDENCE_EXAM: np.zeros(3, np.float32),
            EVIDENCE_NOISE_VAR: np.zeros(1, np.float32)}
METRICS = {"num-examples": 1.0, "steps": 4.0, "epsilon": 0.5, "release-round": 0.0}
# Each node's step: a common 0.02 plus its own seeded spread, per weight.
_RNG = np.random.default_rng(0)
HONEST = {n: {k: (0.02 + 0.01 * _RNG.normal(size=v.shape)).astype(np.float32)
              for k, v in HEAD.items()} for n in NODES}


def _round(robust: RobustHead | None, attacker_factor: float | None
           ) -> tuple[dict[str, np.ndarray], RoundReplies]:
    """One round: node 11 steps ``attacker_factor`` x its honest step (None: honest); every
    node adds evidence clicks [node id, 0, 0]."""
    reports: list[RoundReplies] = []
    inner = FedAvg(fraction_evaluate=0.0, min_available_nodes=5, min_train_nodes=5,
                   train_metrics_aggr_fn=aggregate_train_metrics)
    strategy = ValidatingStrategy(EvidenceSumming(inner), robust=robust,
                                  on_round=lambda _, r: reports.append(r))
    sent_arrays = {**HEAD, **EVIDENCE}

    def reply_for(node: int) -> dict[str, Any]:
        factor = 1.0 if node != 11 or attacker_factor is None else attacker_factor
        arrays: dict[str, Any] = {k: v + np.float32(factor) * HONEST[node][k]
                                  for k, v in HEAD.items()}
        arrays.update({k: v.copy() for k, v in EVIDENCE.items()})
        arrays[EVIDENCE_CLICKS] = np.array([node, 0, 0], np.float32)
        return arrays

    out = one_round(strategy, sent_arrays, NODES, reply_for, METRICS)
    return out, reports[0]


def _honest_steps() -> np.ndarray:
    return np.stack([np.concatenate([HONEST[n][k].ravel() for k in HEAD]) for n in NODES[1:]])


def _step(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([arrays[k].ravel() for k in HEAD])


def test_trimmed_mean_removes_a_x100_node_and_records_it() -> None:
    plain, plain_report = _round(None, 100.0)
    robust, report = _round(RobustHead("fedtrimmedavg", trim_beta=0.2), 100.0)
    honest = _honest_steps()
    # Without the robust rule the clipped attacker (norm 5 / 5 nodes) swamps the honest mean.
    assert np.linalg.norm(_step(plain) - honest.mean(0)) > 3 * np.linalg.norm(honest.mean(0))
    # Trimmed mean: each coordinate lies within the honest nodes' range.
    step = _step(robust)
    assert np.all(step >= honest.min(0) - 1e-6) and np.all(step <= honest.max(0) + 1e-6)
    assert [r["node_id"] for r in report.downweighted] == [11]
    assert report.downweighted[0]["kept_share"] < 0.1
    assert plain_report.downweighted == []
    # The evidence is summed over all five replies, robust rule or not.
    assert robust[EVIDENCE_CLICKS][0] == pytest.approx(sum(NODES))
    assert plain[EVIDENCE_CLICKS][0] == pytest.approx(sum(NODES))


def test_no_attack_trimmed_mean_downweights_nobody() -> None:
    _, report = _round(RobustHead("fedtrimmedavg", trim_beta=0.2), None)
    assert report.downweighted == []


@pytest.mark.parametrize("rule", ["krum", "multikrum", "fedmedian"])
def test_other_rules_keep_the_attacker_out(rule: str) -> None:
    robust, report = _round(RobustHead(rule, malicious_nodes=1), -100.0)
    honest = _honest_steps()
    step = _step(robust)  # within the honest steps: the sign-flipped node left no mark
    assert np.all(step >= honest.min(0) - 1e-6) and np.all(step <= honest.max(0) + 1e-6)
    assert 11 in [r["node_id"] for r in report.downweighted]


def test_norm_bound_clips_a_x100_node_to_the_honest_scale_and_records_it() -> None:
    # Prepare + Execute: node 11 sends 100x (server-clipped to norm 5), then sign-flipped
    scaled, report = _round(RobustHead("normbound", norm_factor=1.5), 100.0)
    flipped, _ = _round(RobustHead("normbound", norm_factor=1.5), -100.0)
    honest = _honest_steps()
    # the round's median norm: the four honest norms and the attacker's (the largest)
    median = float(np.median([*np.linalg.norm(honest, axis=1), np.inf]))
    # Assert: the attacker moves the mean by at most 1.5 x the median norm / 5 nodes
    for arrays in (scaled, flipped):
        shift = np.linalg.norm(_step(arrays) - honest.sum(0) / 5)
        assert shift <= 1.5 * median / 5 + 1e-5
    assert [r["node_id"] for r in report.downweighted] == [11]
    assert report.downweighted[0]["rule"] == "normbound"
    # the evidence is still summed over all five replies
    assert scaled[EVIDENCE_CLICKS][0] == pytest.approx(sum(NODES))


def test_norm_bound_leaves_honest_rounds_alone() -> None:
    # Prepare / Execute
    robust, report = _round(RobustHead("normbound", norm_factor=1.5), None)
    plain, _ = _round(None, None)
    # Assert: honest norms are within 1.5 x their median: the plain mean, nobody recorded
    assert report.downweighted == []
    assert np.allclose(_step(robust), _step(plain), atol=1e-7)
    assert norm_bound_scales([1.0, 2.0, 3.0, 30.0], factor=1.5) == pytest.approx(
        [1.0, 1.0, 1.0, 3.75 / 30.0])
    assert norm_bound_scales([], factor=1.5) == []


def test_centered_clip_bounds_a_x100_or_flipped_node_by_the_honest_spread() -> None:
    # Prepare + Execute: node 11 sends 100x (server-clipped to norm 5), then sign-flipped
    scaled, report = _round(RobustHead("centeredclip", center_radius=2.0), 100.0)
    flipped, flipped_report = _round(RobustHead("centeredclip", center_radius=2.0), -100.0)
    honest = _honest_steps()
    # Assert: the mean moves from the honest steps' median-centred mean by at most
    # radius x (the largest honest deviation from any centre inside their hull) / 5
    spread = float(np.max(np.linalg.norm(honest[:, None] - honest[None], axis=2)))
    for arrays in (scaled, flipped):
        shift = np.linalg.norm(_step(arrays) - honest.mean(0))
        assert shift <= (2.0 * spread + spread) / 5 + 1e-5
        assert shift < 0.5 * np.linalg.norm(honest.mean(0))  # far less than the clip-5 pull
    for r in (report, flipped_report):
        assert [d["node_id"] for d in r.downweighted] == [11]
        assert r.downweighted[0]["rule"] == "centeredclip"
        assert [d["node_id"] for d in r.robust_clipped] == [11]
    assert scaled[EVIDENCE_CLICKS][0] == pytest.approx(sum(NODES))  # evidence still summed


@pytest.mark.parametrize("rule", ["centeredclip", "deviationdrop"])
def test_centered_rules_are_the_plain_mean_without_an_outlier(rule: str) -> None:
    # Prepare / Execute
    robust, report = _round(RobustHead(rule, center_radius=2.0), None)
    plain, _ = _round(None, None)
    # Assert: every honest deviation is inside 2 x the median one: the plain mean (up to
    # float32 summation order: Flower samples the nodes in a random order)
    assert report.downweighted == [] and report.robust_clipped == []
    assert np.allclose(_step(robust), _step(plain), rtol=0, atol=1e-8)
    assert len(report.robust_spread) == 5 and max(report.robust_spread) <= 2.0


def test_deviation_drop_leaves_a_x100_or_flipped_node_out_entirely() -> None:
    # Prepare / Execute
    scaled, report = _round(RobustHead("deviationdrop", center_radius=2.0), 100.0)
    flipped, _ = _round(RobustHead("deviationdrop", center_radius=2.0), -100.0)
    honest = _honest_steps()
    # Assert: exactly the mean of the four honest steps
    others = honest.mean(0)
    for arrays in (scaled, flipped):
        assert np.allclose(_step(arrays), others, atol=1e-6)
    assert [d["node_id"] for d in report.downweighted] == [11]
    assert report.downweighted[0]["kept_share"] == 0.0
    assert max(report.robust_spread) > 2.0
    assert scaled[EVIDENCE_CLICKS][0] == pytest.approx(sum(NODES))


def test_centered_clip_scales_golden_values() -> None:
    # Prepare: four points around 0 and one far out on the first axis
    updates = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [21.0, 0.0]])
    # Execute
    centre, scales = centered_clip_scales(updates, radius=2.0)
    # Assert: median centre (0, 0); deviations 1, 1, 1, 1, 21; tau = 2 x 1
    assert centre == pytest.approx([0.0, 0.0])
    assert scales == pytest.approx([1.0, 1.0, 1.0, 1.0, 2.0 / 21.0])
    _, dropped = centered_clip_scales(updates, radius=2.0, drop=True)
    assert dropped == [1.0, 1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="radius .*0.5"):
        centered_clip_scales(updates, radius=0.5)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        centered_clip_scales(updates[:, 0], radius=2.0)


def test_kept_shares_follow_each_rule() -> None:
    heads = [{"w": np.array([v, -v])} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    trimmed = kept_shares("fedtrimmedavg", heads, trim_beta=0.2, malicious_nodes=1)
    assert trimmed[-1] == 0.0 and trimmed[0] == 0.0 and trimmed[2] == 1.0
    assert kept_shares("fedmedian", heads, trim_beta=0.2, malicious_nodes=1)[2] == 1.0
    multikrum = kept_shares("multikrum", heads, trim_beta=0.2, malicious_nodes=1)
    assert multikrum == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert kept_shares("none", heads, trim_beta=0.2, malicious_nodes=1) == [1.0] * 5


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"rule": "trimmed"}, "'trimmed'"),
    ({"rule": "fedtrimmedavg", "trim_beta": 0.5}, "0.5"),
    ({"rule": "krum", "malicious_nodes": -1}, "-1"),
    ({"rule": "normbound", "norm_factor": 0.5}, "0.5"),
    ({"rule": "centeredclip", "center_radius": float("nan")}, "nan"),
])
def test_robust_head_names_a_bad_argument(kwargs: dict[str, Any], named: str) -> None:
    rule = kwargs.pop("rule")
    with pytest.raises(ValueError, match=named):
        RobustHead(rule, **kwargs)


def test_run_config_key_is_validated_and_off_means_none() -> None:
    with pytest.raises(ValueError, match="robust-aggregation .*'median'"):
        RunSettings(robust_aggregation="median")
    with pytest.raises(ValueError, match="robust-trim-beta .*0.6"):
        RunSettings(robust_trim_beta=0.6)
    with pytest.raises(ValueError, match="robust-norm-factor .*0.9"):
        RunSettings(robust_norm_factor=0.9)
    with pytest.raises(ValueError, match="robust-center-radius .*0.9"):
        RunSettings(robust_center_radius=0.9)
    assert RobustHead.from_settings(RunSettings(robust_aggregation="none")) is None
    assert RobustHead.from_settings(RunSettings()) is not None  # a robust rule by default


def test_ledger_lines_for_rejected_clipped_and_downweighted_nodes() -> None:
    report = RoundReplies(
        rejected=[{"node_id": 1, "node": "node-1", "reason": "w: NaN or Inf values"}],
        clipped=[{"node_id": 2, "node": "node-2", "norm": 500.0}],
        downweighted=[{"node_id": 2, "node": "node-2", "rule": "fedtrimmedavg",
                       "kept_share": 0.0, "expected_share": 0.6}],
    )
    events = aggregation_events(7, report, node_epsilon={"node-2": 0.4}, clip_norm=1.0,
                                delta=1e-5)
    assert [(e.node, e.round, e.mechanism, e.steps) for e in events] == [
        ("node-1", 7, "refusal", 0), ("node-2", 7, "refusal", 0), ("node-2", 7, "refusal", 0)]
    assert all((e.detail or "").startswith(AGGREGATION_DETAIL_PREFIX) for e in events)
    assert "NaN" in (events[0].detail or "") and "500" in (events[1].detail or "")
    assert "kept 0.0%" in (events[2].detail or "") and events[2].epsilon_after == 0.4
    assert CLIP_UPDATE_NORM > 0
