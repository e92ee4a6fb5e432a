"""Model-poisoning attacks (issue 11) and the defences, at unit level with real Messages."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.faults import Poison, dp_update_std, poison_update, simulated_poison
from shared_model.evidence import EVIDENCE_CLICKS, EVIDENCE_EXAM, EVIDENCE_NOISE_VAR
from shared_model.settings import RunSettings
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


def _cli() -> Any:
    import typer

    from simulations import commands

    app, bench_app = typer.Typer(), typer.Typer()
    app.add_typer(bench_app, name="bench")
    commands.register(app, bench_app)
    return app


def test_attack_command_validates_and_prints_the_issue_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    import simulations.attacks as attacks

    seen: dict[str, Any] = {}

    def fake_run(scenario: str, **kwargs: Any) -> dict[str, Any]:
        seen[str(kwargs["attack"])] = kwargs
        views = {"seen": 0.75, "unseen": 0.84}
        return {"views": views, "run_dir": str(tmp_path), "actions": {}}

    monkeypatch.setattr(attacks, "one_run", fake_run)
    runner = CliRunner()
    result = runner.invoke(_cli(), ["attack", "regional-5", "--attack", "signflip",
                                    "--strength", "100", "--defence", "off", "--rounds", "2",
                                    "--runs", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert set(out) >= {"attack", "defence", "no_attack", "attacked", "target_rank_before",
                        "target_rank_after"}
    assert out["no_attack"] == {"seen": 0.75, "unseen": 0.84}
    assert seen["signflip"]["rule"] == "none" and seen["signflip"]["rounds"] == 2
    on = runner.invoke(_cli(), ["attack", "regional-5", "--attack", "lie", "--strength", "1",
                                "--runs", str(tmp_path), "--json"])
    assert on.exit_code == 0 and seen["lie"]["rule"] == RunSettings.robust_aggregation
    for args, named in [(["--attack", "clickfraud", "--strength", "5"], "fraction"),
                        (["--attack", "scale", "--strength", "-1"], "-1"),
                        (["--attack", "nope", "--strength", "1"], "'nope'")]:
        bad = runner.invoke(_cli(), ["attack", "regional-5", *args, "--json"])
        assert bad.exit_code == 2 and named in bad.output
    # Device scenarios take scale|signflip only (tests/simulations/test_device_attack_runs.py).
    device = runner.invoke(_cli(), ["attack", "device-500", "--attack", "lie", "--strength",
                                    "1"])
    assert device.exit_code == 2 and "regional" in device.output


# -- the node-side fault (client.faults), as the Simulation Engine runs it --------------

SENT = {"w": np.array([[1.0, -1.0, 0.5]], np.float32), "b": np.zeros(1, np.float32),
        EVIDENCE_CLICKS: np.zeros(2, np.float32), EVIDENCE_EXAM: np.zeros(2, np.float32),
        EVIDENCE_NOISE_VAR: np.zeros(1, np.float32)}
OWN = {**SENT, "w": np.array([[1.2, -1.1, 0.5]], np.float32), "b": np.full(1, 0.3, np.float32),
       EVIDENCE_CLICKS: np.array([4.0, 1.0], np.float32)}


def _update(arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
    return np.asarray(arrays[key], np.float64) - SENT[key]


def test_poison_update_changes_the_head_and_never_the_evidence() -> None:
    honest = _update(OWN, "w")
    scaled = poison_update(Poison("scale", 100.0), SENT, OWN)
    flipped = poison_update(Poison("signflip", 2.0), SENT, OWN)
    lie = poison_update(Poison("lie", 1.5), SENT, OWN, std=0.01)
    assert np.allclose(_update(scaled, "w"), 100 * honest, atol=1e-4)
    assert np.allclose(_update(flipped, "w"), -2 * honest, atol=1e-6)
    assert np.allclose(_update(lie, "w"), honest - 0.015, atol=1e-6)
    fallback = poison_update(Poison("lie", 1.0), SENT, OWN, std=None)
    assert np.allclose(_update(fallback, "w"), honest - np.abs(honest), atol=1e-6)
    for poisoned in (scaled, flipped, lie):
        assert all(poisoned[k].dtype == np.float32 for k in poisoned)
        assert np.array_equal(poisoned[EVIDENCE_CLICKS], OWN[EVIDENCE_CLICKS])


@pytest.mark.parametrize(("attack", "strength", "named"),
                         [("flip", 1.0, "'flip'"), ("scale", 0.0, "0.0"),
                          ("lie", math.inf, "inf")])
def test_poison_names_a_bad_setting(attack: str, strength: float, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Poison(attack, strength)


def test_dp_update_std_is_the_plain_sgd_noise() -> None:
    std = dp_update_std(learning_rate=0.5, noise_multiplier=2.0, clip_norm=1.0, steps=16,
                        batch_size=256)
    assert std == pytest.approx(0.5 * 2.0 * 4 / 256)


def _context(tmp_path: Path, pid: int | None, values: dict[str, Any]) -> Any:
    from shared_model.settings import simulated_node_settings_path

    if pid is not None:
        path = simulated_node_settings_path(tmp_path, pid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    node_config = {} if pid is None else {"partition-id": pid}
    return SimpleNamespace(node_config=node_config, run_config={"run-dir": str(tmp_path)})


def test_only_a_simulated_node_with_an_attack_poisons(tmp_path: Path) -> None:
    assert simulated_poison(_context(tmp_path, 0, {"attack": "scale",
                                                   "attack-strength": 100})) == Poison(
        "scale", 100.0)
    assert simulated_poison(_context(tmp_path, 1, {"data-path": "x"})) is None
    deployed = SimpleNamespace(node_config={"data-path": "x", "attack": "scale"},
                               run_config={"run-dir": str(tmp_path)})
    assert simulated_poison(deployed) is None  # a deployed node never reads the file
    with pytest.raises(ValueError, match="'nope'"):
        simulated_poison(_context(tmp_path, 2, {"attack": "nope"}))


def test_fault_mod_poisons_the_train_reply_as_it_leaves(tmp_path: Path) -> None:
    from client.faults import fault_mod

    ctxt = _context(tmp_path, 0, {"attack": "signflip", "attack-strength": 1.0})
    sent = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in SENT.items()}),
                               "config": ConfigRecord({"server-round": 1})}),
                   dst_node_id=5, message_type="train")
    metrics = MetricRecord({"num-examples": 1.0, "steps": 3.0, "epsilon": 0.1,
                            "release-round": 0.0})

    def honest_node(msg: Message, _: Any) -> Message:
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in OWN.items()}),
                              "metrics": metrics})
        return Message(content, reply_to=msg)

    reply = fault_mod(sent, ctxt, honest_node)
    out = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert np.allclose(_update(out, "w"), -_update(OWN, "w"), atol=1e-6)
    assert np.array_equal(out[EVIDENCE_CLICKS], OWN[EVIDENCE_CLICKS])
    assert dict(reply.content["metrics"]) == dict(metrics)


def test_a_users_repeat_clicks_on_a_pair_count_once() -> None:
    from shared_model.evidence import UserPairRows, cap_user_pair_clicks
    from simulations.clickfraud import bot_rows

    bots = bot_rows(3, pair=7, sessions=2, rank=10, first_user=0)
    honest = UserPairRows(np.array([9, 9, 9]), np.array([7, 7, 8]), np.array([1.0, 0.0, 1.0]),
                          np.array([1.0, 0.5, 0.2]), 1)
    both = UserPairRows(np.concatenate([bots.user, honest.user]),
                        np.concatenate([bots.pair, honest.pair]),
                        np.concatenate([bots.clicks, honest.clicks]),
                        np.concatenate([bots.exam, honest.exam]), 4)
    capped = cap_user_pair_clicks(both)
    rows = {(int(u), int(p)): (c, e) for u, p, c, e in
            zip(capped.user, capped.pair, capped.clicks, capped.exam, strict=True)}
    assert rows[(0, 7)] == pytest.approx((1.0, 0.2))  # a bot: 2 clicks -> 1, exam kept
    assert rows[(9, 7)] == pytest.approx((1.0, 1.5)) and rows[(9, 8)] == pytest.approx((1.0, 0.2))
    uncapped = cap_user_pair_clicks(both, None)
    assert float(uncapped.clicks.sum()) == float(both.clicks.sum())
    with pytest.raises(ValueError, match="0"):
        cap_user_pair_clicks(both, 0.0)


def test_finished_run_reuses_a_complete_run_and_reruns_an_incomplete_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a stand-in for the Simulation Engine that writes a run of `done` rounds
    import simulations.runner as runner
    from simulations.attacks import _finished_run

    calls: list[str] = []

    class Result:
        def __init__(self, rounds: int) -> None:
            self.metrics = {"rounds": [{"round": r} for r in range(1, rounds + 1)]}
            self.returncode = 0 if rounds == 3 else 1

    done = {"rounds": 3}
    monkeypatch.setattr(runner, "run_simulation",
                        lambda scenario, settings, echo: (calls.append(settings),
                                                          Result(done["rounds"]))[1])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"rounds": [{"round": 1}]}))
    (run_dir / "stale.txt").write_text("left from an interrupted run")
    # Execute + Assert: an incomplete run is removed and run again
    metrics = _finished_run(None, run_dir, 3, setup=lambda: "settings", echo=print)
    assert calls == ["settings"] and len(metrics["rounds"]) == 3
    assert not (run_dir / "stale.txt").exists()
    # a complete run is reused without running anything
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    assert _finished_run(None, run_dir, 3, setup=lambda: "again", echo=print) == metrics
    assert calls == ["settings"]
    # a run that stops early is an error naming its folder
    done["rounds"] = 2
    with pytest.raises(RuntimeError, match="did not finish"):
        _finished_run(None, tmp_path / "other", 3, setup=lambda: "s", echo=print)
