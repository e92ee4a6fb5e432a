"""client.inbox: pending / consumed / replay, the simulation clock, modified files, persistence."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from client.inbox import (
    Inbox,
    InboxError,
    InboxModifiedError,
    available_from_round,
    round_file_name,
)


def _drop(folder: Path, name: str, content: bytes = b"x") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_pending_in_arrival_order_then_consumed(tmp_path: Path) -> None:
    data, state = tmp_path / "node", tmp_path / "state"
    first = _drop(data, "clicks.parquet")
    b = _drop(data, "inbox/b.parquet")
    a = _drop(data, "inbox/a.parquet")
    _drop(data, "inbox/.a.parquet.tmp")  # a writer's temp file: not a click log
    _drop(data, "inbox/.hidden.parquet")
    inbox = Inbox(data, state)
    assert inbox.pending() == [a, b, first]  # by name
    inbox.mark_consumed([a, b, first], round=1)
    assert inbox.pending() == []
    c = _drop(data, "inbox/c.parquet")
    assert inbox.pending() == [c]
    assert inbox.last_round == 1


def test_same_name_ordered_by_mtime(tmp_path: Path) -> None:
    data = tmp_path / "node"
    late = _drop(data, "x/day.parquet")
    early = _drop(data, "y/day.parquet")
    os.utime(early, ns=(1_000_000_000, 1_000_000_000))
    os.utime(late, ns=(2_000_000_000, 2_000_000_000))
    assert Inbox(data, tmp_path / "s").pending() == [early, late]


def test_state_persists_across_instances_atomically(tmp_path: Path) -> None:
    data, state = tmp_path / "node", tmp_path / "state"
    a = _drop(data, "a.parquet")
    Inbox(data, state).mark_consumed([a], round=3)
    again = Inbox(data, state)
    assert again.pending() == []
    assert again.last_round == 3
    assert [c.path for c in again.consumed] == ["a.parquet"]
    assert [p.name for p in state.iterdir()] == ["inbox.json"]  # no temp file left behind
    assert json.loads((state / "inbox.json").read_text())["consumed"][0]["round"] == 3


def test_replay_is_the_last_n_consumed(tmp_path: Path) -> None:
    data, state = tmp_path / "node", tmp_path / "state"
    inbox = Inbox(data, state)
    files = [_drop(data, f"f{i}.parquet", bytes([i])) for i in range(4)]
    for rnd, f in enumerate(files, start=1):
        inbox.mark_consumed([f], round=rnd)
    assert inbox.replay(0) == []
    assert inbox.replay(2) == files[2:]
    assert inbox.replay(10) == files
    assert inbox.replay(2, before_round=3) == files[:2]
    assert inbox.consumed_in(2) == [files[1]]
    files[0].unlink()
    with pytest.raises(InboxError, match="f0.parquet"):
        inbox.replay(4)
    assert inbox.replay(3) == files[1:]  # a deleted old file is fine unless replay needs it


def test_modified_consumed_file_is_named(tmp_path: Path) -> None:
    data, state = tmp_path / "node", tmp_path / "state"
    a = _drop(data, "inbox/a.parquet", b"old")
    Inbox(data, state).mark_consumed([a], round=1)
    a.write_bytes(b"new")  # same size: the hash must catch it
    inbox = Inbox(data, state)
    with pytest.raises(InboxModifiedError, match=r"inbox/a\.parquet.*round 1"):
        inbox.pending()
    with pytest.raises(InboxModifiedError):
        inbox.mark_consumed([a], round=2)


def test_simulation_clock(tmp_path: Path) -> None:
    assert round_file_name(12, "traffic") == "round-0012-traffic.parquet"
    assert available_from_round("round-0012-traffic.parquet") == 12
    assert available_from_round("clicks.parquet") == 0
    assert available_from_round("round-x-traffic.parquet") == 0
    with pytest.raises(ValueError):
        round_file_name(1, "a/b")
    data = tmp_path / "node"
    base = _drop(data, "clicks.parquet")
    r3 = _drop(data, "inbox/" + round_file_name(3, "t"))
    inbox = Inbox(data, tmp_path / "s")
    assert inbox.pending(1) == [base]
    assert inbox.pending(2) == [base]
    assert inbox.pending(3) == [base, r3]
    assert inbox.pending() == [base, r3]  # no clock: everything


def test_bad_state_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "inbox.json").write_text("{nope")
    with pytest.raises(InboxError, match="inbox.json"):
        Inbox(tmp_path, tmp_path / "s")
    with pytest.raises(InboxError, match="not found"):
        Inbox(tmp_path / "missing", tmp_path / "s2").pending()


def test_node_online_rounds_consume_new_files_only(tmp_path: Path) -> None:
    import math

    from client.node import NodeSettings, NoNewClicks, train_round
    from shared_model.catalog import cached_feature_builder
    from shared_model.clicklog import write_click_log
    from shared_model.data import DEFAULT_WANDS_DIR
    from shared_model.ranker import RankerHead
    from shared_model.settings import NodePrivacy, RunSettings
    from shared_model.state import head_state
    from shared_model.world import WorldConfig, simulate_click_log

    data = cached_feature_builder(str(DEFAULT_WANDS_DIR)).data
    node_dir = tmp_path / "node-0"
    for users, seed, name in ((120, 1, "clicks.parquet"), (40, 2, "inbox/round-0003-t.parquet")):
        log = simulate_click_log(data, WorldConfig(num_users=users, num_regions=1, seed=seed))
        write_click_log(log, node_dir / name)
    node = NodeSettings(
        name="node-0", data_path=node_dir, state_dir=tmp_path / "state",
        ledger_dir=tmp_path / "ledger", catalog_dir=DEFAULT_WANDS_DIR,
        privacy=NodePrivacy(epsilon_budget=math.inf),  # a non-private node: ε=inf runs are ok
    )
    state = head_state(RankerHead())

    def run(online: bool, replay: int, rnd: int) -> float:
        settings = RunSettings(epsilon=math.inf, online=online, replay_files=replay,
                               run_dir=str(tmp_path / "run"))
        out = train_round(run=settings, node=node, global_state=state, server_round=rnd)
        return out.num_users  # node-local: the reply carries no exact count

    first = run(True, 0, 1)  # consumes clicks.parquet only (round-0003 is not out yet)
    with pytest.raises(NoNewClicks, match="no new clicks since round 1"):
        run(True, 0, 2)
    third = run(True, 0, 3)
    assert 0 < third < first  # only the 40 new users' exploration sessions
    assert run(True, 0, 3) == third  # a repeated round re-trains on that round's files
    with pytest.raises(NoNewClicks, match="since round 3"):
        run(True, 1, 4)
    assert run(False, 0, 4) > first  # static log: everything, every round
