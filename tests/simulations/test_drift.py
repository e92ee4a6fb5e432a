"""simulations.drift helpers: the file naming and clock, the schedule, the drifted truth."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.inbox import Inbox
from simulations.drift import DriftConfig, traffic_file, traffic_schedule, visible_rounds


def test_schedule_and_names(tmp_path: Path) -> None:
    cfg = DriftConfig(rounds=5, drift_round=4)
    assert traffic_schedule(cfg) == [(2, False), (3, False), (4, True), (5, True)]
    path = traffic_file(tmp_path / "node-0", 4)
    assert path == tmp_path / "node-0" / "inbox" / "round-0004-traffic.parquet"
    with pytest.raises(ValueError):
        DriftConfig(rounds=5, drift_round=1)
    with pytest.raises(ValueError):
        DriftConfig(rounds=5, drift_round=6)


def test_clock_releases_one_file_per_round(tmp_path: Path) -> None:
    node = tmp_path / "node-0"
    (node).mkdir()
    (node / "clicks.parquet").write_bytes(b"0")
    files = [node / "clicks.parquet"]
    for rnd, _ in traffic_schedule(DriftConfig(rounds=4, drift_round=3)):
        path = traffic_file(node, rnd)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([rnd]))
        files.append(path)
    assert visible_rounds(files, 1) == [0]
    assert visible_rounds(files, 3) == [0, 2, 3]
    inbox = Inbox(node, tmp_path / "state")
    for rnd in range(1, 5):
        new = inbox.pending(rnd)
        assert len(new) == 1  # round 1: clicks.parquet; round r: its traffic file
        inbox.mark_consumed(new, round=rnd)
    assert inbox.pending(5) == []


def test_drifted_truth_moves_relevance_by_category(wands_builder) -> None:
    from simulations.drift import drifted_data

    cfg = DriftConfig()
    data = wands_builder.data
    drifted = drifted_data(data, wands_builder, cfg)
    q = data.query_ids[0]
    old = {j.product_id: j.relevance for j in data.judged(q)}
    new = {j.product_id: j.relevance for j in drifted.judged(q)}
    assert old.keys() == new.keys()
    up = [p for p in old if new[p] == min(1.0, old[p] + cfg.boost)]
    down = [p for p in old if new[p] == old[p] * cfg.damp and old[p] > 0]
    assert up and down
    assert all(0.0 <= v <= 1.0 for v in new.values())
