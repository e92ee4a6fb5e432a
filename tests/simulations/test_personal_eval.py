"""Measurement of personalization and recommendation (simulations/personal.py), tiny worlds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from shared_model.personal import PersonalConfig
from shared_model.world import WorldConfig
from simulations import personal_commands
from simulations.personal import (
    load_run_world,
    personalized_ab,
    personalized_ceiling,
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


def test_personalized_ceiling_orders_the_oracles(world) -> None:
    # The judged relevance with the true taste is the best ranking under the click model; a
    # null personal config is exactly the release (lift 0).
    null = PersonalConfig(0.0, 0.0, 0.0, 0.0, 0.0)
    result = personalized_ceiling(world, config=null, users=30, sessions_per_user=3)
    assert result["personal"] == 0.0
    assert result["oracle_relevance_taste"] >= max(
        result["oracle_relevance"], result["true_taste"], result["personal"]
    )
    assert result["oracle_relevance_taste"] > 0.0 and 0.0 <= result["repeat_share"] <= 1.0


def test_recommend_eval_and_cli(world, run_dir: Path, wands_builder, monkeypatch) -> None:
    result = recommend_eval(world, users=25, seed=0)
    for key in ("hit@10", "ndcg@10", "hit@10_popular_in_region", "hit@10_similar_items",
                "hit@10_popular_public", "hit@10_oracle"):
        assert 0.0 <= result[key] <= 1.0
    assert result["users"] == 25
    # No checkpoint in this run directory: no public clicks, so no public popular list.
    assert result["public_clicks"] is False and result["hit@10_popular_public"] == 0.0
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


def test_public_clicks_come_from_the_final_checkpoints_evidence(
    tmp_path: Path, wands_builder
) -> None:
    # Prepare: two checkpoints; only the last one's evidence counts.
    from shared_model.evidence import (
        EVIDENCE_CLICKS,
        EVIDENCE_EXAM,
        EVIDENCE_NOISE_VAR,
        EvidenceIndex,
    )
    from simulations.personal import final_public_clicks

    index = EvidenceIndex(wands_builder.data)
    (tmp_path / "checkpoints").mkdir()
    assert final_public_clicks(tmp_path, wands_builder) is None
    for rnd, scale in ((1, 1.0), (2, 2.0)):
        arrays: dict[str, Any] = {
            EVIDENCE_CLICKS: scale * np.arange(index.num_pairs, dtype=np.float32),
            EVIDENCE_EXAM: np.full(index.num_pairs, scale, np.float32),
            EVIDENCE_NOISE_VAR: np.array([4.0], np.float32),
        }
        np.savez(tmp_path / "checkpoints" / f"round-{rnd:04d}.npz", **arrays)
    # Execute
    public = final_public_clicks(tmp_path, wands_builder)
    # Assert: keyed by query text, the last round's sums, the declared noise variance.
    q = index.query_ids[1]
    pids, clicks, exam = public.queries[wands_builder.data.queries[q].text]
    lo = index.offsets[q]
    assert list(pids) == index.products[q]
    np.testing.assert_allclose(clicks, 2.0 * np.arange(lo, lo + len(pids)))
    np.testing.assert_allclose(exam, 2.0)
    assert public.noise_var == 4.0
