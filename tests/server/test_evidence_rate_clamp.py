"""The server's click fraud bound on the released evidence (issue 11): each node's clicks on
a pair are capped by the other nodes' click rates before the sum, recorded per node."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flower_round import one_round
from flwr.serverapp.strategy import FedAvg

from server.evidence import EvidenceSumming
from server.strategies import aggregate_train_metrics
from server.validation import RoundReplies, ValidatingStrategy, aggregation_events
from shared_model.evidence import EVIDENCE_CLICKS, EVIDENCE_EXAM, EVIDENCE_NOISE_VAR
from shared_model.settings import RunSettings

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = [11, 22, 33, 44, 55]
HEAD = {"w": np.zeros((1, 4), np.float32)}
METRICS = {"num-examples": 1.0, "steps": 4.0, "epsilon": 0.5, "release-round": 0.0}
NOISE_STD = 5.0


def _round(bot_clicks: float, *, clamp: float) -> tuple[dict[str, np.ndarray], RoundReplies]:
    """Every node releases rate 0.5 on 400 exam for two pairs; node 11 adds ``bot_clicks``
    to pair 1."""
    reports: list[RoundReplies] = []
    inner = FedAvg(fraction_evaluate=0.0, min_available_nodes=5, min_train_nodes=5,
                   train_metrics_aggr_fn=aggregate_train_metrics)
    strategy = ValidatingStrategy(EvidenceSumming(inner), evidence_rate_clamp=clamp,
                                  on_round=lambda _, r: reports.append(r))
    sent_arrays = {**HEAD, EVIDENCE_CLICKS: np.zeros(2, np.float32),
                   EVIDENCE_EXAM: np.zeros(2, np.float32),
                   EVIDENCE_NOISE_VAR: np.zeros(1, np.float32)}

    def reply_for(node: int) -> dict[str, Any]:
        return {
            **HEAD,
            EVIDENCE_CLICKS: np.array([200.0, 200.0 + (bot_clicks if node == 11 else 0.0)],
                                      np.float32),
            EVIDENCE_EXAM: np.array([400.0, 400.0], np.float32),
            EVIDENCE_NOISE_VAR: np.array([NOISE_STD**2], np.float32),
        }

    out = one_round(strategy, sent_arrays, NODES, reply_for, METRICS)
    return out, reports[0]


def test_a_bot_heavy_node_is_capped_to_the_other_nodes_rate_and_recorded() -> None:
    # Prepare / Execute: node 11's region has 300 bot clicks on pair 1
    clamped, report = _round(300.0, clamp=2.0)
    plain, plain_report = _round(300.0, clamp=float("inf"))
    # Assert: the sum keeps less than a fifth of the bots' clicks; pair 0 untouched
    assert plain[EVIDENCE_CLICKS][1] == pytest.approx(1000.0 + 300.0)
    kept = float(clamped[EVIDENCE_CLICKS][1]) - 1000.0
    assert 0.0 < kept < 60.0
    assert clamped[EVIDENCE_CLICKS][0] == pytest.approx(1000.0)
    assert clamped[EVIDENCE_EXAM] == pytest.approx(plain[EVIDENCE_EXAM])
    actions = [r for r in report.evidence if r["action"] == "rate-clamped"]
    assert [r["node_id"] for r in actions] == [11] and actions[0]["pairs"] == 1
    assert actions[0]["clicks_removed"] == pytest.approx(300.0 - kept, abs=1e-3)
    assert plain_report.evidence == []
    lines = aggregation_events(1, report, node_epsilon={}, clip_norm=1.0, delta=1e-5)
    assert any("evidence rate-clamped: 1 pair(s)" in e.detail for e in lines)


def test_honest_releases_pass_unchanged() -> None:
    # Prepare / Execute
    clamped, report = _round(0.0, clamp=2.0)
    # Assert
    assert clamped[EVIDENCE_CLICKS] == pytest.approx([1000.0, 1000.0])
    assert report.evidence == []


def test_the_clamp_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="evidence-rate-clamp .*-1"):
        RunSettings(evidence_rate_clamp=-1.0)
    with pytest.raises(ValueError, match="evidence_rate_clamp .*nan"):
        ValidatingStrategy(FedAvg(), evidence_rate_clamp=float("nan"))
    assert RunSettings().evidence_rate_clamp == 2.0  # on by default
