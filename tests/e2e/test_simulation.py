"""End to end on Flower's Simulation Engine: real `flwr run`, Ray, SuperLink, ClientApps."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from privacy.accountant_store import PersistentAccountant
from privacy.ledger import read_ledger, verify_chain
from simulations.runner import _flower_processes, prepare_run, run_simulation
from simulations.scenarios import get_scenario

pytestmark = pytest.mark.e2e


def _fedrank(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedrank.cli", *args],
        capture_output=True, text=True, timeout=600,
    )


def test_simulate_writes_run_dir_resumes_and_cleans_up(tmp_path: Path) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    # Execute: two rounds, then the same command asks for three: it resumes at round 3.
    first = _fedrank("simulate", "regional-3", "--rounds", "2", "--epsilon", "1",
                     "--run-dir", str(run_dir))
    after_first = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    second = _fedrank("simulate", "regional-3", "--rounds", "3", "--epsilon", "1",
                      "--run-dir", str(run_dir))
    # Assert
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[fedrank] round 2/2" in first.stdout
    resumed_hash = after_first["weights_sha256"][:12]
    assert f"from round 2 (weights {resumed_hash})" in second.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    for row in metrics["rounds"] + [metrics["final"]]:
        assert set(row) >= {"round", "ndcg@10", "mrr", "auc", "epsilon_max", "seconds"}
    eps = [r["epsilon_max"] for r in metrics["rounds"]]
    assert eps == sorted(eps) and 0 < eps[-1] <= 1.0  # ε did not reset on resume
    for ledger in (run_dir / "ledger").glob("*.jsonl"):
        assert verify_chain(ledger) == []
        assert [e["round"] for e in read_ledger(ledger)] == [1, 2, 3]
    assert _flower_processes((run_dir / ".flwr_home").resolve()) == []


def test_node_with_spent_budget_refuses_and_the_run_finishes(tmp_path: Path) -> None:
    # Prepare: node-0 already spent its budget in an earlier run (its accountant says so).
    scenario = get_scenario("regional-3")
    settings = prepare_run(scenario, run_dir=tmp_path / "run", rounds=2, epsilon=1.0)
    spent = PersistentAccountant(
        Path(settings.run_dir) / "nodes" / "node-0" / "accountant.json",
        delta=settings.delta, budget_epsilon=math.inf,  # an earlier run with no cap
    )
    spent.record(noise_multiplier=0.9, sample_rate=0.1, steps=400)
    lines: list[str] = []
    # Execute
    result = run_simulation(scenario, settings, echo=lines.append)
    # Assert: the run finished both rounds with the other two nodes.
    assert result.returncode == 0
    assert [r["round"] for r in result.metrics["rounds"]] == [1, 2]
    refusals = [e for e in read_ledger(Path(settings.run_dir) / "ledger" / "node-0.jsonl")]
    assert [e["mechanism"] for e in refusals] == ["refusal", "refusal"]
    assert "past its budget 1" in refusals[0]["detail"]
    log = (Path(settings.run_dir) / "flower.log").read_text()
    assert "node-0 refuses round 1" in log
    for other in ("node-1", "node-2"):
        assert [e["mechanism"] for e in read_ledger(
            Path(settings.run_dir) / "ledger" / f"{other}.jsonl")] == ["dp-sgd", "dp-sgd"]


def test_identical_simulations_draw_fresh_noise_and_send_no_exact_counts(
    tmp_path: Path,
) -> None:
    # Prepare: two runs with identical settings, seed and data (one round each).
    scenario = get_scenario("regional-3")
    results = []
    # Execute
    for name in ("a", "b"):
        settings = prepare_run(scenario, run_dir=tmp_path / name, rounds=1, epsilon=1.0)
        results.append(run_simulation(scenario, settings, echo=lambda _line: None))
    # Assert: both finished; same accounted ε, different weights (noise from the CSPRNG).
    hashes = []
    for result in results:
        assert result.returncode == 0
        checkpoint = json.loads((result.run_dir / "checkpoints" / "latest.json").read_text())
        hashes.append(checkpoint["weights_sha256"])
        log = (result.run_dir / "flower.log").read_text()
        assert "num-impressions" not in log and "train-loss" not in log
    assert hashes[0] != hashes[1]
    eps = [r.metrics["final"]["epsilon_max"] for r in results]
    assert eps[0] == eps[1] and 0 < eps[0] <= 1.0
