"""Measurement of personalization and recommendation (simulations/personal.py), tiny worlds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from shared_model.personal import PersonalConfig
from shared_model.world import WorldConfig
from simulations import personal_commands
from simulations.personal import (
    load_run_world,
    personalized_ab,
    recommend_eval,
    split_history,
    user_histories,
)

WORLD = WorldConfig(num_users=120, num_regions=2, seed=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run")
    config = {"scenario": "regional-3", "num-folds": 5, "eval-fold": 0, "seed": 0}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def world(run_dir: Path, wands_builder):
    return load_run_world(run_dir, builder=wands_builder, world=WORLD)


def test_histories_cover_the_log_in_time_order(world) -> None:
    histories = user_histories(world.log, world.builder.data)
    assert sum(len(s.shown) for h in histories.values() for s in h) == world.log.num_rows
    for sessions in histories.values():
        assert [s.timestamp for s in sessions] == sorted(s.timestamp for s in sessions)
        past, future = split_history(sessions)
        assert past + future == sessions
        assert (len(future) >= 1) == (len(sessions) >= 2)
    assert set(world.train_queries).isdisjoint(world.test_queries)


def test_personalized_ab_keys_and_null_config(world) -> None:
    # A state that changes nothing gives identical rankings: the paired lift is exactly 0.
    null = PersonalConfig(0.0, 0.0, 0.0, 0.0, 0.0)
    result = personalized_ab(world, config=null, seed=1)
    assert result["paired_expected_lift"] == 0.0
    for key in ("ctr_personalized", "ctr_global", "personalized_lift"):
        assert result[key] + (1.0 if key == "personalized_lift" else 0.0) >= 0.0
    lo, hi = result["personalized_lift_ci95"]
    assert lo <= result["personalized_lift"] <= hi
    assert result["users_personalized"] + result["users_global"] == WORLD.num_users
    again = personalized_ab(world, config=null, seed=1)
    assert again == result


def test_recommend_eval_and_cli(world, run_dir: Path, wands_builder, monkeypatch) -> None:
    result = recommend_eval(world, users=25, seed=0)
    for key in ("hit@10", "ndcg@10", "hit@10_popular_in_region", "hit@10_similar_items"):
        assert 0.0 <= result[key] <= 1.0
    assert result["users"] == 25
    # The CLI prints the same JSON keys.
    import simulations.personal as module

    monkeypatch.setattr(
        module, "load_run_world", lambda path: load_run_world(
            path, builder=wands_builder, world=WORLD)
    )
    app = typer.Typer()
    app.command("noop")(lambda: None)
    personal_commands.register(app, typer.Typer())
    out = CliRunner().invoke(app, ["recommend-eval", str(run_dir), "--users", "25", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["hit@10"] == result["hit@10"]
