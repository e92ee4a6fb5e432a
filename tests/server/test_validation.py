"""Reply validation and per-region ε caps on the server."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from server.validation import ValidatingStrategy, reply_problems

REF = {"w": np.zeros((1, 4), np.float32), "b": np.zeros(1, np.float32)}
OK_METRICS = {"num-examples": 10.0, "epsilon": 0.5}


def _reply(**changes: np.ndarray) -> dict[str, np.ndarray]:
    arrays = {k: v.copy() for k, v in REF.items()}
    arrays.update(changes)
    return arrays


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        (_reply(w=np.full((1, 4), np.nan, np.float32)), "w: NaN or Inf"),
        (_reply(w=np.full((1, 4), np.inf, np.float32)), "w: NaN or Inf"),
        (_reply(w=np.zeros((2, 4), np.float32)), "w: shape (2, 4), expected (1, 4)"),
        (_reply(w=np.zeros((1, 4), np.float64)), "w: dtype float64, expected float32"),
        ({"w": REF["w"]}, "missing array(s) ['b']"),
        (_reply(extra=np.zeros(1, np.float32)), "unexpected array(s) ['extra']"),
        (_reply(w=np.full((1, 4), 1e3, np.float32)), "update norm 2e+03 exceeds the bound 100"),
    ],
)
def test_malformed_replies_are_named(arrays: dict[str, np.ndarray], expected: str) -> None:
    # Execute
    problems = reply_problems(arrays, OK_METRICS, reference=REF, max_update_norm=100.0)
    # Assert
    assert expected in "; ".join(problems)


def test_good_reply_has_no_problems_and_bad_metrics_are_caught() -> None:
    assert reply_problems(_reply(), OK_METRICS, reference=REF, max_update_norm=100.0) == []
    bad = reply_problems(
        _reply(), {"num-examples": float("nan")}, reference=REF, max_update_norm=100.0
    )
    assert "metric 'epsilon' missing" in bad
    assert any("num-examples" in p and "finite" in p for p in bad)


class _Inner:
    """A strategy stand-in that addresses one train message to each given node id."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        # Flower Messages need a live run; the wrapper only reads the destination node id.
        return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in self.node_ids]


def test_region_over_its_cap_is_not_scheduled_and_refusal_is_recorded() -> None:
    # Prepare: region-a reported ε 0.5 then 0.8 (next ≈ 1.1 > cap 1.0); region-b is uncapped.
    refusals: list[tuple[int, str, float, float]] = []
    strategy = ValidatingStrategy(
        _Inner([11, 22]),  # type: ignore[arg-type]
        max_update_norm=100.0,
        region_caps={"region-a": 1.0},
        on_cap_refusal=lambda *args: refusals.append(args),
    )
    strategy.node_names = {11: "region-a", 22: "region-b"}
    strategy._eps_history = {"region-a": [0.5, 0.8], "region-b": [0.5, 0.8]}
    # Execute
    sent = list(strategy.configure_train(3, ArrayRecord(), ConfigRecord(), None))  # type: ignore[arg-type]
    # Assert
    assert [m.metadata.dst_node_id for m in sent] == [22]
    assert refusals[0][:2] == (3, "region-a")
    assert refusals[0][2] == pytest.approx(1.1)
    assert strategy.predicted_epsilon("region-b") == pytest.approx(1.1)


def test_constructor_names_bad_bound() -> None:
    with pytest.raises(ValueError, match="max_update_norm must be > 0, got -1"):
        ValidatingStrategy(_Inner([]), max_update_norm=-1)  # type: ignore[arg-type]
