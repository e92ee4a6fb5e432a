"""Node round logic: DP training, persisted accountant across a killed process, refusals,
fresh (CSPRNG) noise, public-only reply metrics and node-pinned privacy settings."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from client.node import (
    REPLY_METRICS,
    BudgetRefusal,
    NodeSettings,
    PrivacyRefusal,
    RoundOutcome,
    train_round,
)
from privacy.accountant_store import PersistentAccountant
from privacy.accounting import epsilon_dp_accounting
from privacy.ledger import read_ledger, verify_chain
from shared_model.clicklog import write_click_log
from shared_model.data import DEFAULT_WANDS_DIR
from shared_model.ranker import RankerHead
from shared_model.settings import NodePrivacy, RunSettings
from shared_model.state import head_state
from shared_model.world import WorldConfig, simulate_click_log

ROOT = Path(__file__).resolve().parents[2]


def _node(
    tmp_path: Path, *, users: int = 600, privacy: NodePrivacy | None = None
) -> tuple[RunSettings, NodeSettings]:
    from shared_model.catalog import cached_feature_builder

    data = tmp_path / "data" / "clicks.parquet"
    if not data.exists():
        builder = cached_feature_builder(str(DEFAULT_WANDS_DIR))
        log = simulate_click_log(
            builder.data, WorldConfig(num_users=users, num_regions=1, seed=3)
        )
        write_click_log(log, data)
    run = RunSettings(
        num_server_rounds=4, epsilon=1.0, delta=1e-4, batch_size=64,
        run_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"),
    )
    node = NodeSettings(
        name="region-a", data_path=data,
        state_dir=tmp_path / "state", ledger_dir=tmp_path / "ledger",
        catalog_dir=DEFAULT_WANDS_DIR,
        privacy=privacy or NodePrivacy(epsilon_budget=1.0, delta=1e-4),
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
    assert tuple(outcomes[1].metrics) == REPLY_METRICS


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
        ledger_dir=tmp_path / "l", catalog_dir=DEFAULT_WANDS_DIR, privacy=node.privacy,
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


# --- issue 15, finding 1: noise and sampling are not reproducible from public values ------


def _weights(outcome: RoundOutcome) -> np.ndarray:
    return np.concatenate([np.ravel(v) for v in outcome.state.values()])


def _fresh_node(tmp_path: Path, data_from: Path, name: str) -> tuple[RunSettings, NodeSettings]:
    """A node over ``data_from``'s click log with its own (empty) state."""
    run, node = _node(data_from)
    node = NodeSettings(
        name=node.name, data_path=node.data_path, state_dir=tmp_path / name / "state",
        ledger_dir=tmp_path / name / "ledger", catalog_dir=node.catalog_dir,
        privacy=node.privacy,
    )
    # A ready plan (σ=5): skips σ's calibration, which only slows these tests down.
    node.state_dir.mkdir(parents=True)
    (node.state_dir / "privacy_plan.json").write_text(json.dumps({
        "noise_multiplier": 5.0, "batch_size": run.batch_size, "planned_rounds": 4,
        "budget_epsilon": 1.0, "delta": 1e-4,
    }))
    return run, node


def test_identical_inputs_give_different_noise(tmp_path: Path) -> None:
    # Prepare: same data, run config, round and node name; separate (empty) state folders.
    _node(tmp_path / "shared", users=120)
    start = head_state(RankerHead())
    # Execute
    outs = []
    for copy in ("a", "b"):
        run, node = _fresh_node(tmp_path, tmp_path / "shared", copy)
        outs.append(train_round(run=run, node=node, global_state=start, server_round=1))
    # Assert: same DP event accounted, but different noise/sampling (seeded from the CSPRNG).
    assert outs[0].metrics == outs[1].metrics
    assert not np.allclose(_weights(outs[0]), _weights(outs[1]))


def test_an_injected_generator_makes_a_round_reproducible(tmp_path: Path) -> None:
    # Prepare
    _node(tmp_path / "shared", users=120)
    start = head_state(RankerHead())
    # Execute
    outs = []
    for copy in ("a", "b"):
        run, node = _fresh_node(tmp_path, tmp_path / "shared", copy)
        outs.append(train_round(run=run, node=node, global_state=start, server_round=1,
                                generator=torch.Generator().manual_seed(7)))
    # Assert
    np.testing.assert_array_equal(_weights(outs[0]), _weights(outs[1]))


def test_node_source_has_no_seed_from_run_config() -> None:
    source = (ROOT / "client" / "node.py").read_text()
    assert "run.seed" not in source and "_stable_hash" not in source


# --- issue 15, finding 2: replies carry only public or DP-protected values ---------------


def test_reply_metrics_are_exactly_the_public_keys_and_carry_no_count(tmp_path: Path) -> None:
    # Prepare: two nodes whose logs differ in users (one has a subset of the other's).
    _node(tmp_path / "big", users=120)
    table = __import__("pyarrow.parquet", fromlist=["read_table"]).read_table(
        tmp_path / "big" / "data" / "clicks.parquet"
    )
    keep = sorted(set(table.column("user_id").to_pylist()))[:-1]  # one user fewer
    import pyarrow as pa
    import pyarrow.compute as pc

    small = table.filter(pc.is_in(table.column("user_id"), pa.array(keep)))
    write_click_log(small, tmp_path / "small" / "data" / "clicks.parquet")
    start = head_state(RankerHead())
    # Execute
    outs = {}
    for which in ("big", "small"):
        run, node = _fresh_node(tmp_path, tmp_path / which, which)
        outs[which] = train_round(run=run, node=node, global_state=start, server_round=1)
    # Assert: exactly the contract's keys, finite floats, a constant weight; the exact user
    # count (which differs) is not in the reply.
    for out in outs.values():
        assert tuple(out.metrics) == REPLY_METRICS
        assert all(isinstance(v, float) and math.isfinite(v) for v in out.metrics.values())
        assert out.metrics["num-examples"] == 1.0
    assert outs["big"].num_users == outs["small"].num_users + 1
    assert outs["big"].num_users not in outs["big"].metrics.values()
    assert outs["big"].metrics["num-examples"] == outs["small"].metrics["num-examples"]


# --- issue 15, finding 3: the node's privacy settings are its own -------------------------


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        ({"epsilon": math.inf}, "epsilon=inf"),
        ({"privacy_shape": "device"}, "privacy-shape=device"),
        ({"delta": 1e-2}, "delta=0.01"),
        ({"clip_norm": 5.0}, "clip-norm=5"),
        ({"max_sessions_per_user": 50}, "max-sessions-per-user=50"),
    ],
)
def test_run_config_asking_weaker_privacy_is_refused(
    tmp_path: Path, request_: dict[str, object], reason: str
) -> None:
    # Prepare
    run, node = _node(tmp_path, users=50)
    weaker = RunSettings.from_config({**run.to_config(), **{
        k.replace("_", "-"): ("inf" if v == math.inf else v) for k, v in request_.items()
    }})
    # Execute / Assert: refused with the reason, before any training or accounting.
    with pytest.raises(PrivacyRefusal, match=f"refuses round 1: run config asks .*{reason}"):
        train_round(run=weaker, node=node, global_state=head_state(RankerHead()),
                    server_round=1)
    assert not (node.state_dir / "accountant.json").exists()
    (line,) = read_ledger(node.ledger_dir / "region-a.jsonl")
    assert line["mechanism"] == "refusal" and reason in line["detail"] and line["steps"] == 0


def test_larger_run_epsilon_is_capped_at_the_node_budget(tmp_path: Path) -> None:
    # Prepare: the node's budget is 1; the run asks for 8.
    run, node = _node(tmp_path, users=120)
    greedy = RunSettings.from_config({**run.to_config(), "epsilon": "8.0"})
    # Execute
    out = train_round(run=greedy, node=node, global_state=head_state(RankerHead()),
                      server_round=1)
    # Assert: σ was planned for ε=1 over the run, not for 8.
    plan = json.loads((node.state_dir / "privacy_plan.json").read_text())
    assert plan["budget_epsilon"] == 1.0
    assert 0 < out.metrics["epsilon"] <= 1.0


def test_a_stored_budget_is_enforced_against_a_larger_request(tmp_path: Path) -> None:
    # Prepare: the node spent ~0.99 of a budget of 1 (its accountant recorded that budget);
    # its settings now say 8 and the run asks for 8.
    run, node = _node(tmp_path, users=120, privacy=NodePrivacy(epsilon_budget=8.0, delta=1e-4))
    spent = PersistentAccountant(
        node.state_dir / "accountant.json", delta=1e-4, budget_epsilon=1.0
    )
    lo, hi = 1, 4096  # the most steps (σ=1, q=0.02) that stay within 0.99
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = spent.epsilon_after(noise_multiplier=1.0, sample_rate=0.02, steps=mid) <= 0.99
        lo, hi = (mid, hi) if ok else (lo, mid)
    spent.record(noise_multiplier=1.0, sample_rate=0.02, steps=lo)
    assert 0.9 < spent.epsilon() <= 0.99
    greedy = RunSettings.from_config({**run.to_config(), "epsilon": "8.0"})
    # Execute / Assert
    with pytest.raises(BudgetRefusal, match="past its budget 1 "):
        train_round(run=greedy, node=node, global_state=head_state(RankerHead()),
                    server_round=1)
    assert read_ledger(node.ledger_dir / "region-a.jsonl")[-1]["mechanism"] == "refusal"


def test_a_smaller_delta_is_used_but_the_stored_history_keeps_its_delta(tmp_path: Path) -> None:
    # Prepare: a node accepting δ up to 1e-4 trains one round at 1e-4.
    _node(tmp_path / "shared", users=120)
    run, node = _fresh_node(tmp_path, tmp_path / "shared", "n")
    train_round(run=run, node=node, global_state=head_state(RankerHead()), server_round=1)
    stricter = RunSettings.from_config({**run.to_config(), "delta": 1e-5})
    # Execute / Assert: δ=1e-5 is within what the node accepts, but its accountant's
    # history is at 1e-4: reported ε would mix two δ, so the run is refused.
    with pytest.raises(PrivacyRefusal, match="accountant keeps delta=0.0001"):
        train_round(run=stricter, node=node, global_state=head_state(RankerHead()),
                    server_round=2)
    last = read_ledger(node.ledger_dir / "region-a.jsonl")[-1]
    assert last["mechanism"] == "refusal" and last["delta"] == 1e-4
