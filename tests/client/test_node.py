"""Node round logic: DP training, persisted accountant across a killed process, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from client.node import BudgetRefusal, NodeSettings, train_round
from privacy.accounting import epsilon_dp_accounting
from privacy.ledger import read_ledger, verify_chain
from shared_model.clicklog import write_click_log
from shared_model.data import DEFAULT_WANDS_DIR
from shared_model.ranker import RankerHead
from shared_model.settings import RunSettings
from shared_model.state import head_state
from shared_model.world import WorldConfig, simulate_click_log

ROOT = Path(__file__).resolve().parents[2]


def _node(tmp_path: Path, *, users: int = 600) -> tuple[RunSettings, NodeSettings]:
    from shared_model.catalog import cached_feature_builder

    builder = cached_feature_builder(str(DEFAULT_WANDS_DIR))
    log = simulate_click_log(builder.data, WorldConfig(num_users=users, num_regions=1, seed=3))
    write_click_log(log, tmp_path / "data" / "clicks.parquet")
    run = RunSettings(
        num_server_rounds=4, epsilon=1.0, delta=1e-4, batch_size=64,
        run_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"),
    )
    node = NodeSettings(
        name="region-a", data_path=tmp_path / "data" / "clicks.parquet",
        state_dir=tmp_path / "state", ledger_dir=tmp_path / "ledger",
        catalog_dir=DEFAULT_WANDS_DIR,
    )
    return run, node


def _recomputed(node: NodeSettings, delta: float) -> float:
    history = json.loads((node.state_dir / "accountant.json").read_text())["history"]
    events = [(float(s), float(q), int(n)) for s, q, n in history]
    return epsilon_dp_accounting(history=events, delta=delta, method="rdp")


def test_reported_epsilon_matches_independent_recomputation(tmp_path: Path) -> None:
    # Prepare
    run, node = _node(tmp_path)
    state = head_state(RankerHead())
    # Execute
    outcomes = []
    for rnd in (1, 2):
        outcome = train_round(run=run, node=node, global_state=state, server_round=rnd)
        state = outcome.state
        outcomes.append(outcome)
    # Assert: ε grows, stays within budget, and an independent accountant agrees within 1%
    eps = [o.metrics["epsilon"] for o in outcomes]
    assert 0 < eps[0] < eps[1] <= run.epsilon
    assert eps[1] == pytest.approx(_recomputed(node, run.delta), rel=0.01)
    assert verify_chain(node.ledger_dir / "region-a.jsonl") == []
    assert set(outcomes[1].metrics) == {
        "num-examples", "num-impressions", "steps", "train-loss", "epsilon", "release-round"
    }


_WORKER = """
import sys, json
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.client.test_node import _node
from client.node import train_round
from shared_model.ranker import RankerHead
from shared_model.state import head_state
run, node = _node(Path({tmp!r}))
state = head_state(RankerHead())
for rnd in range({first}, {last} + 1):
    out = train_round(run=run, node=node, global_state=state, server_round=rnd)
    state = out.state
    print(json.dumps({{"round": rnd, "epsilon": out.metrics["epsilon"]}}), flush=True)
    if {hang}:
        import time; time.sleep(600)
"""


def test_epsilon_continues_after_node_process_is_killed(tmp_path: Path) -> None:
    # Prepare: a real node process that trains round 1 and then hangs "mid-run".
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    code = _WORKER.format(root=str(ROOT), tmp=str(tmp_path), first=1, last=1, hang=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    # Execute: kill it hard, then restart the node for rounds 2-3.
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    code = _WORKER.format(root=str(ROOT), tmp=str(tmp_path), first=2, last=3, hang=False)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    # Assert: ε continued from the persisted history (no reset) and matches recomputation.
    assert done.returncode == 0, done.stderr[-2000:]
    later = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["round"] for r in later] == [2, 3]
    assert first["epsilon"] < later[0]["epsilon"] < later[1]["epsilon"]
    ledger = read_ledger(tmp_path / "ledger" / "region-a.jsonl")
    assert [e["round"] for e in ledger] == [1, 2, 3]
    history = json.loads((tmp_path / "state" / "accountant.json").read_text())["history"]
    recomputed = epsilon_dp_accounting(
        history=[(float(s), float(q), int(n)) for s, q, n in history], delta=1e-4, method="rdp"
    )
    assert later[1]["epsilon"] == pytest.approx(recomputed, rel=0.01)


def test_node_refuses_when_budget_would_be_exceeded(tmp_path: Path) -> None:
    # Prepare: the plan covers 4 rounds; a 5th would pass the budget.
    run, node = _node(tmp_path)
    state = head_state(RankerHead())
    for rnd in range(1, 5):
        state = train_round(run=run, node=node, global_state=state, server_round=rnd).state
    spent = json.loads((node.state_dir / "accountant.json").read_text())
    # Execute / Assert
    with pytest.raises(BudgetRefusal, match=r"refuses round 5: ε would reach .* past its budget 1"):
        train_round(run=run, node=node, global_state=state, server_round=5)
    assert json.loads((node.state_dir / "accountant.json").read_text()) == spent
    last = read_ledger(node.ledger_dir / "region-a.jsonl")[-1]
    assert last["mechanism"] == "refusal" and last["round"] == 5


def test_missing_click_log_is_named(tmp_path: Path) -> None:
    run, node = _node(tmp_path, users=50)
    broken = NodeSettings(
        name="n", data_path=tmp_path / "nope.parquet", state_dir=tmp_path / "s",
        ledger_dir=tmp_path / "l", catalog_dir=DEFAULT_WANDS_DIR,
    )
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        train_round(run=run, node=broken, global_state=head_state(RankerHead()), server_round=1)


def test_wrong_shape_global_model_is_rejected(tmp_path: Path) -> None:
    from shared_model.state import ModelStateError

    run, node = _node(tmp_path, users=50)
    state = head_state(RankerHead())
    state["relevance_tower.linear.weight"] = state["relevance_tower.linear.weight"][:, :2]
    with pytest.raises(ModelStateError, match="relevance_tower.linear.weight: shape"):
        train_round(run=run, node=node, global_state=state, server_round=1)
    assert not (node.state_dir / "accountant.json").exists()
