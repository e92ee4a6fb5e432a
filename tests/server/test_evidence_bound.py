"""One node cannot steer the memorised evidence: bounded per node, accepted once per node.

Real ``Message``s through ``ValidatingStrategy`` -> ``EvidenceSumming`` -> FedAvg, as the
server app wires them.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flower_round import FixedGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from server.evidence import MAX_USERS_PER_NODE, NOISE_TAIL, EvidenceBound, EvidenceSumming
from server.strategies import aggregate_train_metrics
from server.validation import RoundReplies, ValidatingStrategy, check_reply
from shared_model.evidence import EVIDENCE_CLICKS, EVIDENCE_EXAM, EVIDENCE_NOISE_VAR

P = 6  # evidence pairs
REF = {
    "w": np.zeros((1, 4), np.float32),
    EVIDENCE_CLICKS: np.zeros(P, np.float32),
    EVIDENCE_EXAM: np.zeros(P, np.float32),
    EVIDENCE_NOISE_VAR: np.zeros(1, np.float32),
}
METRICS = {"num-examples": 1.0, "steps": 4.0, "epsilon": 0.5, "release-round": 0.0}
NODES = [11, 22, 33]
BOUND = EvidenceBound(clip=3.0, noise_std=2.0, max_users=10)
SIGNAL = BOUND.max_users * BOUND.clip  # 30


def _content(**changes: Any) -> RecordDict:
    arrays = {k: v.copy() for k, v in REF.items()}
    arrays.update({k.replace("_", "/"): np.asarray(v, np.float32) for k, v in changes.items()})
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "metrics": MetricRecord(dict(METRICS))})


def _honest_evidence() -> dict[str, np.ndarray]:
    return {"evidence_clicks": np.full(P, 2.0), "evidence_exam": np.full(P, 5.0),
            "evidence_noise-var": np.array([BOUND.noise_std**2])}


def _strategy() -> tuple[ValidatingStrategy, list[RoundReplies]]:
    reports: list[RoundReplies] = []
    inner = FedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3,
                   train_metrics_aggr_fn=aggregate_train_metrics)
    strategy = ValidatingStrategy(EvidenceSumming(inner), evidence_bound=BOUND,
                                  on_round=lambda _, r: reports.append(r))
    return strategy, reports


def _round(strategy: ValidatingStrategy, rnd: int, sent: dict[str, np.ndarray],
           contents: dict[int, RecordDict]) -> dict[str, np.ndarray]:
    msgs = list(strategy.configure_train(rnd, ArrayRecord({k: Array(v) for k, v in sent.items()}),
                                         ConfigRecord(), FixedGrid(NODES)))  # type: ignore[arg-type]
    replies = [Message(contents[m.metadata.dst_node_id], reply_to=m) for m in msgs]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    assert arrays is not None
    return {k: v.numpy() for k, v in arrays.items()}


def test_honest_evidence_passes_unchanged() -> None:
    checked, problems = check_reply(_content(**_honest_evidence()), REF, evidence_bound=BOUND)
    assert not problems and checked is not None
    assert checked.evidence_cut is None and checked.evidence_added
    assert np.allclose(checked.arrays[EVIDENCE_CLICKS], 2.0)


@pytest.mark.parametrize("value", [1e6, -1e6, 3e38])
def test_a_huge_evidence_entry_is_cut_to_the_bound(value: float) -> None:
    clicks = np.zeros(P)
    clicks[2] = value
    checked, problems = check_reply(
        _content(**{**_honest_evidence(), "evidence_clicks": clicks}), REF, evidence_bound=BOUND)
    assert not problems and checked is not None and checked.evidence_cut is not None
    s = BOUND.noise_std
    assert -NOISE_TAIL * s - 1e-3 <= checked.arrays[EVIDENCE_CLICKS][2] <= SIGNAL + NOISE_TAIL * s
    assert np.allclose(checked.arrays["w"], 0.0)  # the head is untouched by it


def test_l2_and_noise_var_are_bounded() -> None:
    ev = {"evidence_clicks": np.full(P, 1e6), "evidence_exam": np.full(P, 1e6),
          "evidence_noise-var": np.array([1e30])}
    checked, _ = check_reply(_content(**ev), REF, evidence_bound=BOUND)
    assert checked is not None
    s = BOUND.max_noise_std
    assert checked.arrays[EVIDENCE_NOISE_VAR][0] == pytest.approx(s**2, rel=1e-5)
    norm = math.sqrt(float(np.sum(checked.arrays[EVIDENCE_CLICKS].astype(np.float64) ** 2)
                           + np.sum(checked.arrays[EVIDENCE_EXAM].astype(np.float64) ** 2)))
    assert norm <= (SIGNAL + s * (math.sqrt(2 * P) + NOISE_TAIL)) * (1 + 1e-5)
    neg, _ = check_reply(_content(**{**_honest_evidence(), "evidence_noise-var": [-5.0]}), REF,
                         evidence_bound=BOUND)
    assert neg is not None and neg.arrays[EVIDENCE_NOISE_VAR][0] == 0.0


def test_from_settings_is_public_and_non_private_has_floor() -> None:
    settings = SimpleNamespace(epsilon=1.0, delta=1e-5, evidence_share=0.3, evidence_clip=3.0)
    bound = EvidenceBound.from_settings(settings)
    assert bound.noise_std > 0 and bound.max_users == MAX_USERS_PER_NODE
    inf = EvidenceBound.from_settings(SimpleNamespace(epsilon=math.inf, delta=1e-5,
                                                      evidence_share=0.3, evidence_clip=3.0))
    assert inf.noise_std == 0.0 and inf.max_noise_std > 0


def test_one_node_sending_1e6_cannot_move_any_entry_beyond_the_bound_and_only_once(
    task_identity: None,
) -> None:
    strategy, reports = _strategy()
    attack = _content(evidence_clicks=np.full(P, 1e6), evidence_exam=np.zeros(P),
                      **{"evidence_noise-var": [0.0]})
    honest = _content(**_honest_evidence())
    out = _round(strategy, 1, REF, {11: attack, 22: honest, 33: honest})
    s = BOUND.max_noise_std  # the attacker's noise claim is 0, so its slack is smaller
    per_node = SIGNAL + NOISE_TAIL * s
    assert np.all(out[EVIDENCE_CLICKS] <= 2 * 2.0 + per_node)
    assert np.all(out[EVIDENCE_CLICKS] <= 2 * 2.0 + SIGNAL + 1e-3)  # claimed no noise
    assert [e["action"] for e in reports[-1].evidence] == ["bounded"]
    assert reports[-1].evidence[0]["node_id"] == 11
    # Round 2: the nodes answer with what they were sent; the attacker adds again.
    sent = {k: v.astype(np.float32) for k, v in out.items()}
    again = {k.replace("/", "_"): sent[k] + np.float32(1e6) for k in
             (EVIDENCE_CLICKS, EVIDENCE_EXAM)}
    same = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in sent.items()}),
                       "metrics": MetricRecord(dict(METRICS))})
    out2 = _round(strategy, 2, sent, {11: _content(**again), 22: same, 33: same})
    assert np.allclose(out2[EVIDENCE_CLICKS], sent[EVIDENCE_CLICKS])
    assert np.allclose(out2[EVIDENCE_EXAM], sent[EVIDENCE_EXAM])
    assert [e["action"] for e in reports[-1].evidence] == ["dropped"]


def test_a_release_remembered_from_before_a_restart_is_not_accepted_again(
    task_identity: None,
) -> None:
    inner = FedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3,
                   train_metrics_aggr_fn=aggregate_train_metrics)
    reports: list[RoundReplies] = []
    strategy = ValidatingStrategy(EvidenceSumming(inner), evidence_bound=BOUND,
                                  evidence_released=[11],
                                  on_round=lambda _, r: reports.append(r))
    honest = _content(**_honest_evidence())
    out = _round(strategy, 1, REF, {11: honest, 22: honest, 33: honest})
    assert np.allclose(out[EVIDENCE_CLICKS], 2 * 2.0)  # only nodes 22 and 33 added
    assert strategy.evidence_released == {11, 22, 33}
    assert [(e["node_id"], e["action"]) for e in reports[-1].evidence] == [(11, "dropped")]
