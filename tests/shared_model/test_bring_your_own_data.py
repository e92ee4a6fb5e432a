"""Bring your own data: the catalog's content hash, a node refusing another catalog,
scenario files, `--data` on simulate / baseline / server start."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from client.node import NodeSettings, PrivacyRefusal, train_round
from privacy.ledger import read_ledger
from shared_model.data import (
    DEFAULT_WANDS_DIR,
    IMPORT_REPORT_FILE,
    catalog_hash,
    catalog_mismatch,
    catalog_run_config,
)
from shared_model.ranker import RankerHead
from shared_model.schema import DataError
from shared_model.settings import NodePrivacy, RunSettings
from shared_model.state import head_state
from simulations.scenario_file import load_scenario_file

WANDS_HASH = "sha256:06995531dcf62fa84ff2d80ddcfa9db7b6d5d7d6107f17fca3e38101be06080e"


def copy_wands(target: Path) -> Path:
    shutil.copytree(DEFAULT_WANDS_DIR, target)
    return target


def test_catalog_hash_is_the_content_not_the_place(tmp_path: Path) -> None:
    # Prepare
    copy = copy_wands(tmp_path / "copy")
    (copy / IMPORT_REPORT_FILE).write_text("{}", encoding="utf-8")  # does not count
    edited = copy_wands(tmp_path / "edited")
    labels = edited / "labels.tsv"
    labels.write_text(labels.read_text(encoding="utf-8").replace("Exact", "Partial", 1))
    # Execute / Assert
    assert catalog_hash(DEFAULT_WANDS_DIR) == WANDS_HASH
    assert catalog_hash(copy) == WANDS_HASH
    assert catalog_hash(edited) != WANDS_HASH
    with pytest.raises(DataError, match="queries.tsv: file not found"):
        catalog_hash(tmp_path)


def test_catalog_mismatch_names_both_hashes_and_no_path(tmp_path: Path) -> None:
    # Prepare
    edited = copy_wands(tmp_path / "edited")
    (edited / "queries.tsv").write_bytes((edited / "queries.tsv").read_bytes() + b"\n")
    # Execute
    reason = catalog_mismatch(edited, WANDS_HASH)
    # Assert
    assert catalog_mismatch(DEFAULT_WANDS_DIR, WANDS_HASH) == ""
    assert catalog_mismatch(edited, "") == ""
    assert reason.startswith("catalog hash mismatch: this node's catalog is sha256:")
    assert catalog_hash(edited) in reason and WANDS_HASH in reason
    assert str(tmp_path) not in reason
    assert "cannot be hashed (file not found)" in catalog_mismatch(tmp_path, WANDS_HASH)


def test_catalog_run_config(tmp_path: Path) -> None:
    assert catalog_run_config(None) == {}
    assert catalog_run_config(DEFAULT_WANDS_DIR) == {
        "catalog-dir": str(DEFAULT_WANDS_DIR.resolve()),
        "catalog-hash": WANDS_HASH,
    }
    with pytest.raises(DataError, match="labels.tsv: file not found"):
        bad = copy_wands(tmp_path / "bad")
        (bad / "labels.tsv").unlink()
        catalog_run_config(bad)


def test_node_with_another_catalog_refuses_naming_both_hashes(tmp_path: Path) -> None:
    # Prepare: the run uses WANDS; the node holds an edited copy
    edited = copy_wands(tmp_path / "catalog")
    (edited / "queries.tsv").write_bytes((edited / "queries.tsv").read_bytes() + b"\n")
    run = RunSettings(run_dir=str(tmp_path / "run"), catalog_hash=WANDS_HASH)
    node = NodeSettings(
        name="region-a",
        data_path=tmp_path / "clicks.parquet",
        state_dir=tmp_path / "state",
        ledger_dir=tmp_path / "ledger",
        catalog_dir=edited,
        privacy=NodePrivacy.of_run(run),
    )
    # Execute
    with pytest.raises(PrivacyRefusal) as caught:
        train_round(run=run, node=node, global_state=head_state(RankerHead()), server_round=1)
    # Assert: refused before any training, with both hashes in the reply and the ledger
    message = str(caught.value)
    assert "refuses round 1: catalog hash mismatch" in message
    assert WANDS_HASH in message and catalog_hash(edited) in message
    (line,) = read_ledger(node.ledger_dir / "region-a.jsonl")
    assert line["mechanism"] == "refusal" and WANDS_HASH in line["detail"]
    assert not (node.state_dir / "accountant.json").exists()
    # the same node with the run's catalog passes the check (and then fails on its data)
    same = dataclasses.replace(node, catalog_dir=DEFAULT_WANDS_DIR)
    with pytest.raises(Exception) as other:
        train_round(run=run, node=same, global_state=head_state(RankerHead()), server_round=1)
    assert "catalog hash" not in str(other.value)


def test_scenario_file_with_base_world_run_config_and_data(tmp_path: Path) -> None:
    # Prepare
    copy_wands(tmp_path / "shop")
    path = tmp_path / "shop.toml"
    path.write_text(
        'base = "regional-3"\nrounds = 2\ndata = "shop"\n'
        "[world]\nnum_users = 300\n[run_config]\nlearning-rate = 0.25\n",
        encoding="utf-8",
    )
    # Execute
    scenario, data = load_scenario_file(path)
    # Assert
    assert (scenario.name, scenario.partition, scenario.rounds) == ("shop", "regional", 2)
    assert scenario.world.num_users == 300 and scenario.world.num_regions == 3
    assert scenario.run_config["learning-rate"] == 0.25
    assert data == (tmp_path / "shop").resolve()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('partition = "regional"\nrounds = 2\nepochs = 3\n', "unknown key(s) epochs"),
        ('base = "regional-9"\n', "base: "),
        ("rounds = 2\n", "missing key 'partition'"),
        ('base = "regional-3"\n[world]\nusers = 5\n', "unknown [world] key(s) users"),
        ('base = "regional-3"\n[run_config]\nlearning-rat = 1\n', "learning-rat"),
        ('base = "regional-3"\ndata = "nowhere"\n', "is not a directory"),
        ('base = "regional-3"\nrounds = 0\n', "rounds must be >= 1"),
        ("base = \n", "not valid TOML"),
    ],
)
def test_bad_scenario_file_names_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as caught:
        load_scenario_file(path)
    assert str(path) in str(caught.value) and problem in str(caught.value)


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    """A fresh app with the commands that take --data (as fedrank.cli wires them)."""
    from privacy import commands as privacy_commands
    from shared_model import commands as shared_model_commands
    from simulations import canary_commands
    from simulations import commands as simulations_commands

    app = typer.Typer()
    bench_app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    for module in (shared_model_commands, privacy_commands, canary_commands, simulations_commands):
        module.register(app, bench_app)
    return app


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate"], "give a scenario name or --scenario-file FILE"),
        (["simulate", "regional-3", "--scenario-file", "x.toml"], "not both"),
        (["simulate", "--scenario-file", "missing.toml"], "scenario file not found"),
        (["simulate", "regional-3", "--data", "."], "queries.tsv: file not found"),
        (["baseline", "--data", "."], "queries.tsv: file not found"),
        (["bench", "train", "--data", "."], "queries.tsv: file not found"),
        (["audit", "canaries", "regional-3", "--epsilon", "1", "--data", "."], "queries.tsv"),
    ],
)
def test_cli_bad_data_or_scenario_file_exits_before_running(
    tmp_path: Path, cli: typer.Typer, args: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_server_config_data_key_sets_catalog_and_hash(tmp_path: Path) -> None:
    # Prepare
    from server.deploy import ServerConfig, settings_for

    copy_wands(tmp_path / "shop")
    path = tmp_path / "server.toml"
    path.write_text('[run]\nrun_dir = "run"\ndata = "shop"\n', encoding="utf-8")
    # Execute
    cfg = ServerConfig.load(path)
    config = settings_for(cfg)
    default = settings_for(dataclasses.replace(cfg, data=None))
    # Assert
    assert config["catalog-dir"] == str((tmp_path / "shop").resolve())
    assert config["catalog-hash"] == WANDS_HASH
    assert default["catalog-dir"] == "" and default["catalog-hash"] == WANDS_HASH
    assert json.dumps(config)  # plain values, submittable


def test_simulate_passes_the_scenario_file_and_data_to_the_runner(
    tmp_path: Path, cli: typer.Typer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the runner is replaced (no Flower); a scenario file naming its data
    import simulations.runner as runner

    seen: dict[str, object] = {}

    def fake_run_folds(scenario, *, run_dir, rounds, epsilon, folds, overrides, echo, dropout=0.0):  # type: ignore[no-untyped-def]  # noqa: E501
        seen.update(scenario=scenario, run_dir=run_dir, rounds=rounds, overrides=overrides)
        return {"rows": [], "wall_seconds": 0.0}

    monkeypatch.setattr(runner, "run_folds", fake_run_folds)
    copy_wands(tmp_path / "shop")
    path = tmp_path / "shop.toml"
    path.write_text('base = "regional-3"\nrounds = 2\ndata = "shop"\n', encoding="utf-8")
    # Execute
    from_file = CliRunner().invoke(
        cli, ["simulate", "--scenario-file", str(path), "--run-dir", str(tmp_path / "r")]
    )
    overrides_file = seen["overrides"]
    flag = CliRunner().invoke(
        cli, ["simulate", "regional-3", "--data", str(tmp_path / "shop"), "--strategy", "fedadam"]
    )
    # Assert
    assert from_file.exit_code == 0, from_file.output
    assert flag.exit_code == 0, flag.output
    expected = {"catalog-dir": str((tmp_path / "shop").resolve()), "catalog-hash": WANDS_HASH}
    assert overrides_file == expected
    assert seen["overrides"] == {**expected, "strategy": "fedadam"}
    assert seen["run_dir"] == Path("runs") / "regional-3-eps1"
