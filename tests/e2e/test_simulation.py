"""End to end on Flower's Simulation Engine: real `flwr run`, Ray, SuperLink, ClientApps.

Each launch of the Simulation Engine costs tens of seconds on 2 cores (Ray, SuperLink,
SuperExec, one ClientApp per node and round), so the module runs three launches once
(``sim_runs``) and each test checks its behaviour on them:

- ``a`` and ``b``: two identical two-round runs (same settings, seed and data) in which
  node-0 has already spent its budget in an earlier run (its accountant says so);
- ``a`` resumed: ``fedrank simulate`` (the CLI) asks for three rounds in ``a``'s run dir: it
  resumes at round 3 and cleans up its Flower processes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from privacy.accountant_store import PersistentAccountant
from privacy.ledger import read_ledger, verify_chain
from simulations.runner import SimulationResult, _flower_processes, prepare_run, run_simulation
from simulations.scenarios import get_scenario

pytestmark = pytest.mark.e2e


def _fedrank(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedrank.cli", *args],
        capture_output=True, text=True, timeout=600,
    )


@dataclass
class SimRuns:
    first: dict[str, SimulationResult]  # "a", "b": the two-round runs
    lines: dict[str, list[str]]  # their progress lines
    checkpoint: dict[str, dict[str, Any]]  # their checkpoints/latest.json after round 2
    ledgers: dict[str, list[dict[str, Any]]]  # a's node ledgers after round 2
    resumed: subprocess.CompletedProcess[str]  # `fedrank simulate ... --rounds 2` in a


def _spend_node_0(run_dir: Path, delta: float) -> None:
    """node-0 already spent its budget in an earlier run with no cap."""
    spent = PersistentAccountant(
        run_dir / "nodes" / "node-0" / "accountant.json", delta=delta, budget_epsilon=math.inf,
    )
    spent.record(noise_multiplier=0.9, sample_rate=0.1, steps=400)


@pytest.fixture(scope="module")
def sim_runs(tmp_path_factory: pytest.TempPathFactory) -> SimRuns:
    root = tmp_path_factory.mktemp("simulation")
    scenario = get_scenario("regional-3")
    first: dict[str, SimulationResult] = {}
    lines: dict[str, list[str]] = {}
    checkpoint: dict[str, dict[str, Any]] = {}
    for name in ("a", "b"):
        settings = prepare_run(scenario, run_dir=root / name, rounds=2, epsilon=1.0)
        _spend_node_0(Path(settings.run_dir), settings.delta)
        lines[name] = []
        first[name] = run_simulation(scenario, settings, echo=lines[name].append)
        latest = root / name / "checkpoints" / "latest.json"
        checkpoint[name] = json.loads(latest.read_text()) if latest.exists() else {}
    ledgers = {p.stem: read_ledger(p) for p in (root / "a" / "ledger").glob("node-*.jsonl")}
    resumed = _fedrank("simulate", "regional-3", "--rounds", "3", "--epsilon", "1",
                       "--run-dir", str(root / "a"))
    return SimRuns(first, lines, checkpoint, ledgers, resumed)


@pytest.mark.timeout(900)  # the first test of the module runs the three launches
def test_simulate_writes_run_dir_resumes_and_cleans_up(sim_runs: SimRuns) -> None:
    # Prepare + Execute (sim_runs): two rounds in a, then the CLI asks for three: it resumes.
    first, second = sim_runs.first["a"], sim_runs.resumed
    run_dir = first.run_dir
    # Assert
    assert first.returncode == 0
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert any("[fedrank] round 2/2" in ln for ln in sim_runs.lines["a"])
    resumed_hash = sim_runs.checkpoint["a"]["weights_sha256"][:12]
    assert f"from round 2 (weights {resumed_hash})" in second.stdout
    assert "[fedrank] round 3/3" in second.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    for row in metrics["rounds"] + [metrics["final"]]:
        assert set(row) >= {"round", "ndcg@10", "mrr", "auc", "epsilon_max", "seconds"}
    eps = [r["epsilon_max"] for r in metrics["rounds"]]
    assert eps == sorted(eps) and 0 < eps[-1] <= 1.0  # ε did not reset on resume
    ledgers = sorted((run_dir / "ledger").glob("*.jsonl"))
    assert {p.stem for p in ledgers} >= {"node-0", "node-1", "node-2"}
    for ledger in ledgers:
        assert verify_chain(ledger) == []
        assert [e["round"] for e in read_ledger(ledger)] == [1, 2, 3]
    for result in sim_runs.first.values():
        assert _flower_processes((result.run_dir / ".flwr_home").resolve()) == []


@pytest.mark.timeout(900)
def test_node_with_spent_budget_refuses_and_the_run_finishes(sim_runs: SimRuns) -> None:
    # Prepare + Execute (sim_runs): node-0's accountant says its budget is spent; two rounds.
    result = sim_runs.first["a"]
    run_dir = result.run_dir
    # Assert: the run finished both rounds with the other two nodes.
    assert result.returncode == 0
    assert [r["round"] for r in result.metrics["rounds"]] == [1, 2]
    refusals = sim_runs.ledgers["node-0"]
    assert [e["mechanism"] for e in refusals] == ["refusal", "refusal"]
    assert "past its budget 1" in refusals[0]["detail"]
    log = (run_dir / "flower.log").read_text()
    assert "node-0 refuses round 1" in log
    for other in ("node-1", "node-2"):
        assert [e["mechanism"] for e in sim_runs.ledgers[other]] == ["dp-sgd", "dp-sgd"]
    # the identical run b, and a after its restart, still refuse for node-0
    assert [e["mechanism"] for e in read_ledger(
        sim_runs.first["b"].run_dir / "ledger" / "node-0.jsonl")] == ["refusal", "refusal"]
    assert read_ledger(run_dir / "ledger" / "node-0.jsonl")[-1]["mechanism"] == "refusal"


@pytest.mark.timeout(900)
def test_identical_simulations_draw_fresh_noise_and_send_no_exact_counts(
    sim_runs: SimRuns,
) -> None:
    # Prepare + Execute (sim_runs): two runs with identical settings, seed and data.
    results = [sim_runs.first[name] for name in ("a", "b")]
    # Assert: both finished; same accounted ε, different weights (noise from the CSPRNG).
    hashes = []
    for name, result in zip(("a", "b"), results, strict=True):
        assert result.returncode == 0
        hashes.append(sim_runs.checkpoint[name]["weights_sha256"])
        log = (result.run_dir / "flower.log").read_text()
        assert "num-impressions" not in log and "train-loss" not in log
    assert sim_runs.checkpoint["a"]["round"] == sim_runs.checkpoint["b"]["round"] == 2
    assert hashes[0] != hashes[1]
    eps = [r.metrics["final"]["epsilon_max"] for r in results]
    assert eps[0] == eps[1] and 0 < eps[0] <= 1.0
