"""A node's own settings: parsed from its node_config (deployment) or from the file the
simulation runner writes (simulation); never from the server's run config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.node import NodeSettings, node_cache_dir
from shared_model.data import DEFAULT_WANDS_DIR
from shared_model.settings import NodePrivacy, RunSettings, simulated_node_settings_path


def test_deployment_settings_come_from_node_config_only(tmp_path: Path) -> None:
    # Prepare: the server's run config names other folders; the node must not use them.
    run = RunSettings(catalog_dir=str(tmp_path / "server-catalog"),
                      cache_dir=str(tmp_path / "server-cache"), epsilon=8.0, delta=1e-3)
    config = {
        "node-name": "region-eu", "data-path": str(tmp_path / "clicks"),
        "state-dir": str(tmp_path / "state"), "release-dir": str(tmp_path / "drop"),
        "release-key": str(tmp_path / "server.pub"), "epsilon-budget": "0.5",
        "delta": "1e-6",
    }
    # Execute
    node = NodeSettings.from_node_config(config, run)
    # Assert
    assert node.name == "region-eu" and node.data_path == tmp_path / "clicks"
    assert node.ledger_dir == tmp_path / "state" / "ledger"
    assert node.catalog_dir == DEFAULT_WANDS_DIR and node.cache_dir is None
    assert (node.release_dir, node.release_key) == (tmp_path / "drop", tmp_path / "server.pub")
    assert node.privacy == NodePrivacy(epsilon_budget=0.5, delta=1e-6)
    assert NodeSettings.from_mapping(node.to_config()) == node


def test_simulated_node_reads_the_file_its_runner_wrote(tmp_path: Path) -> None:
    # Prepare
    run = RunSettings(run_dir=str(tmp_path / "run"))
    written = NodeSettings(
        name="node-2", data_path=tmp_path / "d", state_dir=tmp_path / "s",
        ledger_dir=tmp_path / "l", catalog_dir=tmp_path / "c",
        privacy=NodePrivacy(epsilon_budget=3.0, max_sessions_per_user=4),
    )
    path = simulated_node_settings_path(run.run_dir, 2)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(written.to_config()))
    # Execute / Assert
    assert NodeSettings.from_node_config({"partition-id": 2}, run) == written
    with pytest.raises(FileNotFoundError, match="runner writes them before launch"):
        NodeSettings.from_node_config({"partition-id": 3}, run)


def test_bad_node_settings_are_named(tmp_path: Path) -> None:
    run = RunSettings()
    with pytest.raises(ValueError, match="needs 'data-path'"):
        NodeSettings.from_node_config({"node-name": "x"}, run)
    with pytest.raises(ValueError, match="node clip-norm must be finite and > 0"):
        NodeSettings.from_node_config({"data-path": "x", "clip-norm": "-1"}, run)


def test_runner_writes_each_simulated_nodes_settings(tmp_path: Path) -> None:
    from simulations.runner import write_node_settings
    from simulations.scenarios import get_scenario

    # Prepare
    scenario = get_scenario("regional-3")
    run = RunSettings(run_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "run" / "data"),
                      epsilon=2.0, delta=1e-4)
    # Execute
    paths = write_node_settings(scenario, run)
    # Assert: one file per node, read back by the node with the run's privacy pinned.
    assert len(paths) == scenario.num_nodes == 3
    node = NodeSettings.from_node_config({"partition-id": 1}, run)
    assert node.name == "node-1" and node.data_path == tmp_path / "run" / "data" / "node-1"
    assert node.state_dir == tmp_path / "run" / "nodes" / "node-1"
    assert node.release_dir == tmp_path / "run" / "releases"
    assert node.privacy == NodePrivacy.of_run(run)


def test_deployed_node_keeps_its_embedding_cache_in_its_state_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: no cache-dir and no $FEDRANK_CACHE_DIR; the default would otherwise resolve
    # inside Flower's per-version app install folder.
    monkeypatch.delenv("FEDRANK_CACHE_DIR", raising=False)
    node = NodeSettings.from_mapping({"data-path": "x", "state-dir": str(tmp_path / "s")})
    pinned = NodeSettings.from_mapping(
        {"data-path": "x", "state-dir": str(tmp_path / "s"), "cache-dir": str(tmp_path / "c")})
    # Execute
    deployed = node_cache_dir(node, simulated=False)
    simulated = node_cache_dir(node, simulated=True)
    own = node_cache_dir(pinned, simulated=False)
    monkeypatch.setenv("FEDRANK_CACHE_DIR", str(tmp_path / "env"))
    from_env = node_cache_dir(node, simulated=False)
    # Assert
    assert deployed == str(tmp_path / "s" / "embedding-cache")
    assert simulated == "" and from_env == ""
    assert own == str(tmp_path / "c")
