"""Reply validation, server-side clipping, node identity and per-region ε caps.

The strategy tests drive the real wrapper around Flower's FedAvg with real ``Message``s
(replies built with ``reply_to``) and the node's own fault hooks (``client.faults.tamper``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flower_round import FixedGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from client.faults import FORGED_REASON, REPLY_FAULTS, tamper
from server.checkpoint import RunDirectory
from server.recorder import RoundRecorder
from server.strategies import aggregate_train_metrics
from server.validation import (
    CLIP_UPDATE_NORM,
    RoundReplies,
    ValidatingStrategy,
    check_reply,
    escape,
    parse_node_regions,
    reply_problems,
    update_norm,
)

REF = {"w": np.zeros((1, 4), np.float32), "b": np.zeros(1, np.float32)}
OK_METRICS = {"num-examples": 1.0, "steps": 4.0, "epsilon": 0.5, "release-round": 0.0}
NODES = [11, 22, 33]


def _reply(**changes: np.ndarray) -> dict[str, np.ndarray]:
    arrays = {k: v.copy() for k, v in REF.items()}
    arrays.update(changes)
    return arrays


# -- one reply at a time -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        (_reply(w=np.full((1, 4), np.nan, np.float32)), "w: NaN or Inf"),
        (_reply(w=np.full((1, 4), np.inf, np.float32)), "w: NaN or Inf"),
        (_reply(w=np.zeros((2, 4), np.float32)), "w: shape (2, 4), expected (1, 4)"),
        (_reply(w=np.zeros((1, 4), np.float64)), "w: dtype 'float64', expected float32"),
        (_reply(w=np.zeros((1, 4), ">f4")), "w: dtype '>f4', expected float32"),
        ({"w": REF["w"]}, "missing array(s) ['b']"),
        (_reply(extra=np.zeros(1, np.float32)), "unexpected array(s) ['extra']"),
        (_reply(w=np.full((1, 4), 1e3, np.float32)), "update norm 2e+03 is beyond"),
    ],
)
def test_malformed_arrays_are_named(arrays: dict[str, np.ndarray], expected: str) -> None:
    problems = reply_problems(arrays, OK_METRICS, reference=REF)
    assert expected in "; ".join(problems)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"injected": 0.0}, "unexpected metric(s) ['injected']"),
        ({"train-loss": 0.3}, "unexpected metric(s) ['train-loss']"),
        ({"epsilon": [0.1, 0.2]}, "metric 'epsilon' is a list, not a number"),
        ({"epsilon": -1.0}, "metric 'epsilon' is negative"),
        ({"steps": -3}, "metric 'steps' is negative"),
        ({"epsilon": float("nan")}, "metric 'epsilon' is not finite"),
        ({"release-round": float("inf")}, "metric 'release-round' is not finite"),
    ],
)
def test_metrics_must_be_exactly_the_contract(change: dict[str, Any], expected: str) -> None:
    problems = reply_problems(_reply(), {**OK_METRICS, **change}, reference=REF)
    assert expected in "; ".join(problems)


def test_missing_metrics_and_good_reply() -> None:
    assert reply_problems(_reply(), OK_METRICS, reference=REF) == []
    problems = reply_problems(_reply(), {"num-examples": 1.0, "epsilon": 0.5}, reference=REF)
    assert "missing metric(s) ['release-round', 'steps']" in problems


def _content(arrays: dict[str, np.ndarray] | None = None, **records: Any) -> RecordDict:
    out: dict[str, Any] = {
        "arrays": ArrayRecord({k: Array(v) for k, v in (arrays or _reply()).items()}),
        "metrics": MetricRecord(dict(OK_METRICS)),
        "node": ConfigRecord({"name": "region-a"}),
    }
    out.update(records)
    return RecordDict({k: v for k, v in out.items() if v is not None})


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (_content(extra=ConfigRecord({"x": 1})), "unexpected record(s) ['extra']"),
        (_content(metrics=None), "missing record(s) ['metrics']"),
        (_content(node=ConfigRecord({"name": "a", "evil": "b"})), "record 'node' must be"),
        (_content(node=ConfigRecord({"name": 7})), "record 'node' must be"),
    ],
)
def test_record_names_are_exact(content: RecordDict, expected: str) -> None:
    checked, problems = check_reply(content, REF)
    assert checked is None and expected in "; ".join(problems)


def _with_w(w: Array) -> RecordDict:
    return RecordDict({
        "arrays": ArrayRecord({"w": w, "b": Array(np.zeros(1, np.float32))}),
        "metrics": MetricRecord(dict(OK_METRICS)),
    })


def test_arrays_are_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: Array metadata that lies about what its npy bytes hold.
    def forged(shape: tuple[int, ...], data: np.ndarray) -> Array:
        return Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=Array(data).data)

    cases = {
        "float64 bytes": forged((1, 4), np.zeros((1, 4), np.float64)),
        "huge payload": forged((1, 4), np.zeros(100_000, np.float32)),
        "other shape": forged((4, 1), np.zeros((1, 4), np.float32)),
        "header shape": forged((1, 4), np.zeros((2, 2), np.float32)),
        "pickle stype": Array(dtype="float32", shape=(1, 4), stype="pickle", data=b"x" * 40),
        "not npy": Array(dtype="float32", shape=(1, 4), stype="numpy.ndarray", data=b"x" * 40),
    }
    monkeypatch.setattr(Array, "numpy", lambda self: pytest.fail("decoded a reply array"))
    # Execute
    problems = {name: "; ".join(check_reply(_with_w(w), REF)[1]) for name, w in cases.items()}
    # Assert
    assert problems == {
        "float64 bytes": "w: npy header says float64 (1, 4), expected float32 (1, 4)",
        "huge payload": "w: 400128 bytes of data, expected 16 + an npy header",
        "other shape": "w: shape (4, 1), expected (1, 4)",
        "header shape": "w: npy header says float32 (2, 2), expected float32 (1, 4)",
        "pickle stype": "w: serialization 'pickle', expected numpy.ndarray",
        "not npy": "w: bad npy header (ValueError)",
    }


def test_update_is_clipped_and_weight_ignored() -> None:
    big = _reply(w=np.full((1, 4), 30.0, np.float32))  # norm 60
    content = _content(arrays=big, metrics=MetricRecord({**OK_METRICS, "num-examples": 1e300}))
    checked, problems = check_reply(content, REF)
    assert problems == [] and checked is not None
    assert checked.clipped and checked.norm == pytest.approx(60.0)
    assert update_norm(checked.arrays.values()) == pytest.approx(CLIP_UPDATE_NORM, rel=1e-6)
    assert checked.metrics["num-examples"] == 1.0 and checked.claimed_name == "region-a"


def test_update_norm_does_not_overflow() -> None:
    top = np.full(1000, np.finfo(np.float32).max, np.float32)
    assert update_norm([top.astype(np.float64)]) == pytest.approx(3.4028235e38 * math.sqrt(1000))
    assert update_norm([np.array([np.inf])]) == math.inf
    assert update_norm([np.zeros(3)]) == 0.0


def test_escape_bounds_and_neutralises_control_characters() -> None:
    out = escape(FORGED_REASON)
    assert "\n" not in out and "\r" not in out and "\x1b" not in out
    assert out.startswith("budget\\x0a[fedrank] round 30/30")
    assert escape("a\u2028b\u202ec\\") == "a\\u2028b\\u202ec\\"
    long = escape("x" * 10_000)
    assert len(long) < 300 and long.endswith("...[9760 more chars]")


def test_node_regions_parse() -> None:
    assert parse_node_regions("") == {}
    assert parse_node_regions(" 11=eu-west, 22=us-east ") == {11: "eu-west", 22: "us-east"}
    for bad, match in [("11", "bad item"), ("x=eu", "bad item"), ("11=a,11=b", "twice"),
                       ("11=a,22=a", "two node ids")]:
        with pytest.raises(ValueError, match=match):
            parse_node_regions(bad)


def test_constructor_names_bad_bounds() -> None:
    with pytest.raises(ValueError, match="need 0 < clip_norm <= reject_norm, got -1"):
        ValidatingStrategy(FedAvg(), clip_norm=-1)
    with pytest.raises(ValueError, match="got 10.0 and 5.0"):
        ValidatingStrategy(FedAvg(), clip_norm=10.0, reject_norm=5.0)


# -- a whole round: the wrapper around Flower's FedAvg ----------------------------------


HONEST = {11: 0.1, 22: 0.2, 33: 0.3}  # each node moves every weight by this


def _honest(node: int, name: str) -> RecordDict:
    arrays = {k: v + np.float32(HONEST[node]) for k, v in REF.items()}
    return RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({**OK_METRICS, "epsilon": 0.1 * node}),
        "node": ConfigRecord({"name": name}),
    })


def _run_round(
    strategy: ValidatingStrategy,
    faults: dict[int, str],
    *,
    claims: dict[int, str] | None = None,
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    sent = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in REF.items()}),
                                         ConfigRecord(), FixedGrid(NODES)))  # type: ignore[arg-type]
    replies = []
    for msg in sent:
        node = msg.metadata.dst_node_id
        content = _honest(node, (claims or {}).get(node, f"node-{node}"))
        fault = faults.get(node)
        if fault == "forged-reason":
            replies.append(Message(Error(code=4001, reason=FORGED_REASON), reply_to=msg))
            continue
        replies.append(Message(tamper(content, fault) if fault else content, reply_to=msg))
    return strategy.aggregate_train(1, replies)


def _strategy(**kwargs: Any) -> tuple[ValidatingStrategy, list[RoundReplies]]:
    reports: list[RoundReplies] = []
    inner = FedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3,
                   train_metrics_aggr_fn=aggregate_train_metrics)
    strategy = ValidatingStrategy(inner, on_round=lambda _, r: reports.append(r), **kwargs)
    return strategy, reports


def _moved(arrays: ArrayRecord | None) -> np.ndarray:
    assert arrays is not None
    return np.concatenate([arrays[k].numpy().reshape(-1) - REF[k].reshape(-1) for k in REF])


@pytest.mark.parametrize("fault", ["extra-metric", "list-metric", "negative-epsilon",
                                   "huge-value", "max-float32", "forged-header"])
def test_a_faulty_reply_is_dropped_and_the_round_aggregates_the_rest(
    task_identity: None, fault: str
) -> None:
    # Prepare: node 22 is faulty
    strategy, reports = _strategy()
    # Execute
    arrays, metrics = _run_round(strategy, {22: fault})
    # Assert: FedAvg ran (no InconsistentMessageReplies/TypeError) on nodes 11 and 33 only
    np.testing.assert_allclose(_moved(arrays), 0.2, rtol=1e-6)
    assert [r["node_id"] for r in reports[0].rejected] == [22]
    assert reports[0].rejected[0]["node"] == "node-22"
    assert metrics is not None and dict(metrics) == {
        "epsilon": pytest.approx(3.3), "steps": 4.0, "release-round": 0.0}
    assert "node-22" not in strategy.node_epsilon


def test_two_replies_at_1_7e308_cannot_zero_the_model(task_identity: None) -> None:
    strategy, reports = _strategy()
    arrays, _ = _run_round(strategy, {22: "huge-value", 33: "max-float32"})
    np.testing.assert_allclose(_moved(arrays), HONEST[11], rtol=1e-6)
    assert sorted(r["node_id"] for r in reports[0].rejected) == [22, 33]


def test_self_reported_weight_buys_nothing_and_updates_are_clipped(task_identity: None) -> None:
    # Prepare: node 22 claims 1e300 examples and sends an update of norm 50 (clip is 5).
    strategy, reports = _strategy()
    # Execute
    arrays, metrics = _run_round(strategy, {22: "huge-weight"})
    # Assert: uniform mean of 11's, 33's and 22's *clipped* update
    moved = _moved(arrays)
    pushed = np.full(5, CLIP_UPDATE_NORM / math.sqrt(5))  # 22's update, clipped
    np.testing.assert_allclose(moved, (0.1 + 0.3 + pushed) / 3, rtol=1e-5)
    assert np.linalg.norm(moved) <= CLIP_UPDATE_NORM
    assert reports[0].rejected == []
    sent_norm = pytest.approx(50 + 0.2 * math.sqrt(5))  # its honest 0.2 plus the push
    assert reports[0].clipped == [{"node_id": 22, "node": "node-22", "norm": sent_norm}]
    assert metrics is not None and set(metrics) == {"epsilon", "steps", "release-round"}


def test_aggregated_train_metrics_carry_no_count_or_loss(task_identity: None) -> None:
    strategy, _ = _strategy()
    _, metrics = _run_round(strategy, {})
    assert metrics is not None
    assert dict(metrics) == {"epsilon": pytest.approx(3.3), "steps": 4.0, "release-round": 0.0}


def test_error_reason_is_escaped_in_the_log(
    task_identity: None, caplog: pytest.LogCaptureFixture
) -> None:
    strategy, reports = _strategy()
    with caplog.at_level(logging.INFO, logger="fedrank.server"):
        _run_round(strategy, {22: "forged-reason"})
    lines = "\n".join(r.getMessage() for r in caplog.records).splitlines()
    assert not any(line.startswith("[fedrank]") for line in lines), lines
    assert any("node-22) sent no update: budget\\x0a[fedrank] round 30/30" in line
               for line in lines)
    assert reports[0].refused[0]["node_id"] == 22


def test_rejection_reasons_are_escaped(
    task_identity: None, caplog: pytest.LogCaptureFixture
) -> None:
    # A metric key carrying a newline and a console line of its own.
    strategy, _ = _strategy()
    sent = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in REF.items()}),
                                         ConfigRecord(), FixedGrid(NODES)))  # type: ignore[arg-type]
    content = _honest(11, "x")
    content["metrics"] = MetricRecord({**OK_METRICS, "k\n[fedrank] round 9/9: done": 1.0})
    with caplog.at_level(logging.INFO, logger="fedrank.server"):
        strategy.aggregate_train(1, [Message(content, reply_to=sent[0])])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "\n[fedrank]" not in text and "unexpected metric(s) ['k\\n[fedrank] round 9/9" in text


def test_identity_comes_from_node_regions_not_the_reply(
    task_identity: None, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: node 33 claims to be region-a (node 11's region)
    strategy, _ = _strategy(node_regions={11: "region-a", 22: "region-b", 33: "region-c"})
    # Execute
    with caplog.at_level(logging.INFO, logger="fedrank.server"):
        _run_round(strategy, {}, claims={11: "region-a", 22: "region-b", 33: "region-a"})
    # Assert
    assert strategy.node_epsilon == {"region-a": pytest.approx(1.1), "region-b": pytest.approx(
        2.2), "region-c": pytest.approx(3.3)}
    assert any("node 33 is region-c to this server; it calls itself 'region-a'" in r.getMessage()
               for r in caplog.records)
    assert strategy.identity(44) == "node-44"  # not in the map


class _Inner:
    """A strategy stand-in that addresses one train message to each given node id."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in self.node_ids]


def test_region_over_its_cap_is_not_scheduled_and_refusal_is_recorded() -> None:
    # Prepare: region-a reported ε 0.5 then 0.8 (next ≈ 1.1 > cap 1.0); region-b is uncapped.
    refusals: list[tuple[int, str, float, float]] = []
    strategy = ValidatingStrategy(
        _Inner([11, 22]),  # type: ignore[arg-type]
        node_regions={11: "region-a", 22: "region-b"},
        region_caps={"region-a": 1.0},
        on_cap_refusal=lambda *args: refusals.append(args),
    )
    strategy._eps_history = {"region-a": [0.5, 0.8], "region-b": [0.5, 0.8]}
    # Execute
    sent = list(strategy.configure_train(3, ArrayRecord(), ConfigRecord(), None))  # type: ignore[arg-type]
    # Assert
    assert [m.metadata.dst_node_id for m in sent] == [22]
    assert refusals[0][:2] == (3, "region-a")
    assert refusals[0][2] == pytest.approx(1.1)
    assert strategy.predicted_epsilon("region-b") == pytest.approx(1.1)


def test_recorder_writes_each_rounds_rejections_and_clips(tmp_path: Path) -> None:
    recorder = RoundRecorder(
        RunDirectory(tmp_path), evaluate=lambda arrays: {"ndcg@10": 0.5},
        strategy_state=dict, config={"epsilon": "1.0"}, total_rounds=2,
    )
    rejected = {"node_id": 22, "node": "node-22", "reason": "unexpected metric(s) ['x']"}
    recorder.note_replies(1, {"rejected": [rejected], "clipped": [], "refused": []})
    recorder(1, dict(REF))
    recorder(2, dict(REF))
    rows = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    empty: dict[str, list[Any]] = {"rejected": [], "clipped": [], "refused": [], "evidence": [],
                                   "downweighted": [], "robust_clipped": [],
                                   "robust_spread": []}
    assert rows[0]["replies"] == {**empty, "rejected": [rejected]}
    assert rows[1]["replies"] == empty


def test_every_reply_fault_is_known_to_the_tests() -> None:
    covered = {"extra-metric", "list-metric", "negative-epsilon", "huge-value", "max-float32",
               "forged-header", "huge-weight", "forged-reason", "big-update"}
    assert set(REPLY_FAULTS) == covered
