"""Device shape on Flower's Simulation Engine: devices vanish mid-round, SecAgg+ recovers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privacy.ledger import read_ledger
from shared_model.world import WorldConfig
from simulations.runner import prepare_run, run_simulation
from simulations.scenarios import Scenario, get_scenario

pytestmark = pytest.mark.e2e


def test_devices_dropping_mid_round_do_not_stop_secagg_rounds(tmp_path: Path) -> None:
    # Prepare: 40 devices, 20 sampled per round (SecAgg+ 19 shares, threshold 7), each
    # vanishing with probability 0.2 once it has the model.
    base = get_scenario("device-1000")
    scenario = Scenario(
        name="device-1000", world=WorldConfig(num_users=40, num_regions=2,
                                              sessions_per_user=8.0, seed=0),
        partition="device", rounds=2, run_config={**base.run_config, "fraction-train": 0.5},
    )
    settings = prepare_run(scenario, run_dir=tmp_path / "run", rounds=2, epsilon=1.0,
                           dropout=0.2)
    # Execute
    result = run_simulation(scenario, settings, echo=lambda _line: None, timeout=400)
    # Assert: both rounds completed, some devices dropped, bytes were counted
    assert result.returncode == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rows = metrics["rounds"]
    log_tail = (tmp_path / "run" / "flower.log").read_text()[-3000:]
    assert [r["round"] for r in rows] == [1, 2], log_tail
    assert all(r["clients_sampled"] == 20 for r in rows)
    assert sum(r["clients_dropped"] for r in rows) > 0  # P(no drop in 40 draws) = 1e-4
    params = metrics["final"]["trainable_params"]
    for row in rows:
        # the masked update goes up as uint32: 4 bytes per parameter plus fixed framing
        assert row["bytes_up_per_client"] > 4 * params
        assert row["bytes_down_per_client"] > 4 * params
    ledger = read_ledger(tmp_path / "run" / "ledger" / "server.jsonl")
    assert [e["round"] for e in ledger] == [1, 2]
