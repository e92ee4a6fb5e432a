"""Model-poisoning attacks (issue 11) and the defences, at unit level with real Messages."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from simulations.attacks import aggregate_with, measure, poison, strategies, synthetic_round


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    yield


def test_attacks_transform_the_update() -> None:
    sent, replies = synthetic_round(seed=1)
    update = replies[0]["w"] - sent["w"]
    scaled = poison("scale", 100.0, sent, replies[0], replies[1:])["w"] - sent["w"]
    flipped = poison("signflip", 1.0, sent, replies[0], replies[1:])["w"] - sent["w"]
    assert np.allclose(scaled, 100 * update, rtol=1e-3, atol=1e-4)
    assert np.allclose(flipped, -update, atol=1e-5)
    lie = poison("lie", 1.0, sent, replies[0], replies[1:])["w"] - sent["w"]
    honest = np.stack([r["w"] - sent["w"] for r in replies[1:]])
    assert np.allclose(lie, honest.mean(0) - honest.std(0), atol=1e-5)
    with pytest.raises(ValueError, match="unknown attack"):
        poison("nope", 1.0, sent, replies[0], replies[1:])


def test_server_clip_bounds_a_x100_node_under_fedavg() -> None:
    off = measure("scale", 100.0, "fedavg", validate=False)
    on = measure("scale", 100.0, "fedavg", validate=True)
    assert off["attacked"] > 10 and on["attacked"] < off["attacked"] / 5


@pytest.mark.parametrize("attack", ["scale", "signflip"])
def test_multikrum_drops_the_poisoned_node(attack: str) -> None:
    result = measure(attack, 100.0, "multikrum")
    assert result["attacked"] < 1e-5  # the aggregate is the 4 honest nodes' mean


@pytest.mark.parametrize("name", ["fedmedian", "trimmedavg"])
def test_coordinate_wise_defences_bound_a_x100_node(name: str) -> None:
    assert measure("scale", 100.0, name)["attacked"] < 0.5


def test_bulyan_needs_seven_nodes_for_one_attacker() -> None:
    assert "bulyan" not in strategies(5) and "bulyan" in strategies(7)
    sent, replies = synthetic_round(num_nodes=7, seed=2)
    replies[0] = poison("scale", 100.0, sent, replies[0], replies[1:])
    agg = aggregate_with(strategies(7)["bulyan"](), sent, replies)
    assert np.linalg.norm(agg["w"] - sent["w"]) < 1.0


def test_click_fraud_bots_are_users_each_bounded_by_the_clip() -> None:
    from privacy.count_release import clip_and_sum
    from simulations.clickfraud import bot_rows

    bots = bot_rows(20, pair=3, sessions=2, rank=10, first_user=100)
    assert bots.num_users == 20 and len(bots.user) == 40 and set(bots.pair) == {3}
    assert np.allclose(bots.exam, 0.1) and np.all(bots.clicks == 1.0)
    clicks, exam, _ = clip_and_sum(bots.user, bots.pair, bots.clicks * 10, bots.exam,
                                   num_pairs=5, clip_norm=3.0)
    # Each bot contributes at most C = 3 in L2: 20 bots add at most 60 to the pair.
    assert clicks[3] <= 20 * 3.0 + 1e-9 and np.all(clicks[[0, 1, 2, 4]] == 0)


def test_attack_command_names_what_is_not_built() -> None:
    import typer
    from typer.testing import CliRunner

    from simulations import commands

    app, bench_app = typer.Typer(), typer.Typer()
    app.add_typer(bench_app, name="bench")
    commands.register(app, bench_app)
    runner = CliRunner()
    result = runner.invoke(app, ["attack", "regional-5", "--attack", "scale", "--strength",
                                 "100", "--json"])
    assert result.exit_code == 2 and "simulations.attacks" in result.output
    bad = runner.invoke(app, ["attack", "regional-5", "--attack", "clickfraud", "--strength",
                              "5", "--json"])
    assert bad.exit_code == 2 and "fraction" in bad.output
