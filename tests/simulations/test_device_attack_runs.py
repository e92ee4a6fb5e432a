"""Malicious devices under SecAgg+ (issue 11): the seeded choice of attackers, their marking
in the runner-written settings, the server's aggregate clip and the CLI's validation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from client.faults import DeviceAttack, Poison
from privacy.ledger import Ledger
from server.device import (
    SECAGG_CLIPPING_RANGE,
    SECAGG_QUANTIZATION_RANGE,
    AccountedAdaptiveClipping,
    AggregateClip,
    CsprngClientManager,
    clip_mean_update,
)
from simulations.attacks import (
    ATTACKERS_FILE,
    choose_attackers,
    mark_device_attackers,
    rounds_summary,
)

C = 0.5
DIM = 16


def _clipped(rng: np.random.Generator, k: int, clip: float = C) -> list[np.ndarray]:
    """k update vectors, each clipped to ``clip`` (as adaptiveclipping_mod does)."""
    out = []
    for _ in range(k):
        u = rng.normal(size=DIM) * rng.uniform(0.2, 3.0)
        out.append(u * min(1.0, clip / np.linalg.norm(u)))
    return out


def test_attackers_are_a_seeded_tenth_of_the_devices() -> None:
    # Execute
    first = choose_attackers(1000, 0.1, seed=0)
    again = choose_attackers(1000, 0.1, seed=0)
    other = choose_attackers(1000, 0.1, seed=1)
    # Assert
    assert first == again and first != other
    assert len(set(first)) == 100 and first == sorted(first)
    assert first[0] >= 0 and first[-1] < 1000
    assert choose_attackers(5, 0.1, seed=0) != []  # at least one


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_attacker_fraction_is_validated(fraction: float) -> None:
    with pytest.raises(ValueError, match=repr(fraction)):
        choose_attackers(1000, fraction)


def _settings(run_dir: Path, n: int) -> None:
    for pid in range(n):
        path = run_dir / "nodes" / f"node-{pid}" / "node-settings.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"node-name": f"node-{pid}"}))


def _marked(run_dir: Path, n: int) -> dict[int, dict[str, Any]]:
    out = {}
    for pid in range(n):
        values = json.loads((run_dir / "nodes" / f"node-{pid}" / "node-settings.json")
                            .read_text())
        if "attack" in values:
            out[pid] = values
    return out


def test_marking_writes_exactly_the_chosen_devices_and_records_them(tmp_path: Path) -> None:
    # Prepare
    _settings(tmp_path, 40)
    attack = DeviceAttack(Poison("signflip", 100.0), "compliant")
    # Execute
    record = mark_device_attackers(tmp_path, attack, num_nodes=40, fraction=0.1, seed=3)
    # Assert
    marked = _marked(tmp_path, 40)
    assert sorted(marked) == record["partition_ids"] == choose_attackers(40, 0.1, seed=3)
    assert all(v == {"node-name": f"node-{p}", "attack": "signflip", "attack-strength": 100.0,
                     "attacker": "compliant"} for p, v in marked.items())
    on_disk = json.loads((tmp_path / ATTACKERS_FILE).read_text())
    assert on_disk == record and on_disk["seed"] == 3 and on_disk["fraction"] == 0.1


def test_marking_without_attack_clears_earlier_marks(tmp_path: Path) -> None:
    # Prepare
    _settings(tmp_path, 20)
    mark_device_attackers(tmp_path, DeviceAttack(Poison("scale", 100.0), "bypass"),
                          num_nodes=20)
    # Execute
    record = mark_device_attackers(tmp_path, None, num_nodes=20)
    # Assert
    assert _marked(tmp_path, 20) == {} and record["partition_ids"] == []


def test_honest_mean_of_clipped_updates_is_never_clipped() -> None:
    # Prepare: many rounds of honest devices, the mean exactly as large as it can be
    rng = np.random.default_rng(0)
    bound = AggregateClip().bound(C, DIM)
    sent = [rng.normal(size=DIM)]
    aligned = [np.full(DIM, C / math.sqrt(DIM))] * 30  # all equal: mean norm = C exactly
    for updates in [_clipped(rng, 30) for _ in range(50)] + [aligned]:
        mean = [sent[0] + np.mean(updates, axis=0)]
        # Execute
        out, bounded = clip_mean_update(mean, sent, bound)
        # Assert
        assert not bounded and np.array_equal(out[0], mean[0])


def test_bypass_attackers_move_the_mean_by_at_most_the_bound() -> None:
    # Prepare: 27 honest devices, 3 sending x100 their clipped update
    rng = np.random.default_rng(1)
    updates = _clipped(rng, 30)
    updates[:3] = [100 * u for u in updates[:3]]
    sent = [rng.normal(size=DIM)]
    mean = [sent[0] + np.mean(updates, axis=0)]
    bound = AggregateClip().bound(C, DIM)
    # Execute
    out, bounded = clip_mean_update(mean, sent, bound)
    # Assert: projected (same direction, norm = bound)
    before, after = mean[0] - sent[0], out[0] - sent[0]
    assert bounded and np.linalg.norm(before) > 2 * bound
    assert np.linalg.norm(after) == pytest.approx(bound)
    assert np.allclose(after / np.linalg.norm(after), before / np.linalg.norm(before))


def test_bound_allows_secagg_quantisation_and_validates() -> None:
    # Prepare
    step = 2 * SECAGG_CLIPPING_RANGE / SECAGG_QUANTIZATION_RANGE
    # Execute / Assert
    assert AggregateClip().bound(C, 400) == pytest.approx(C * 1.01 + 20 * step)
    assert AggregateClip(slack=0.0, quantisation_step=0.0).bound(C, 400) == C
    with pytest.raises(ValueError, match="-0.1"):
        AggregateClip(slack=-0.1)
    with pytest.raises(ValueError, match="nan"):
        AggregateClip(quantisation_step=float("nan"))


class _Proxy:
    def __init__(self, cid: str) -> None:
        self.cid = cid


def _wrapper(tmp_path: Path, clip: AggregateClip | None) -> AccountedAdaptiveClipping:
    return AccountedAdaptiveClipping(
        FedAvg(), update_noise_multiplier=1e-9, clipped_count_stddev=1.0,
        num_sampled_clients=30, population=1000, delta=1e-4,
        ledger=Ledger(tmp_path / "server.jsonl"), initial_clipping_norm=C,
        rng_factory=lambda: np.random.default_rng(0), aggregate_clip=clip,
    )


def _round(strategy: AccountedAdaptiveClipping, sent: np.ndarray,
           updates: list[np.ndarray]) -> np.ndarray:
    manager = CsprngClientManager()
    for i in range(30):
        manager.register(_Proxy(str(i)))  # type: ignore[arg-type]
    strategy.configure_fit(1, ndarrays_to_parameters([sent]), manager)
    results = [(_Proxy(str(i)), FitRes(Status(Code.OK, ""),
                                       ndarrays_to_parameters([sent + u]), 1, {"norm_bit": 1}))
               for i, u in enumerate(updates)]
    params, _ = strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    assert params is not None
    return parameters_to_ndarrays(params)[0].astype(np.float64) - sent


@pytest.mark.parametrize("defence", [True, False])
def test_server_bounds_the_attacked_round_only_with_the_defence(tmp_path: Path,
                                                                defence: bool) -> None:
    # Prepare
    rng = np.random.default_rng(2)
    updates = _clipped(rng, 30)
    updates[:3] = [100 * u for u in updates[:3]]
    sent = rng.normal(size=DIM).astype(np.float32)
    strategy = _wrapper(tmp_path, AggregateClip() if defence else None)
    # Execute
    update = _round(strategy, sent, [u.astype(np.float32) for u in updates])
    # Assert
    norm = float(np.linalg.norm(update))
    if defence:
        assert norm == pytest.approx(AggregateClip().bound(C, DIM), rel=1e-4)
    else:
        assert norm > 2 * AggregateClip().bound(C, DIM)


def test_defence_leaves_an_honest_round_as_it_was(tmp_path: Path) -> None:
    # Prepare
    rng = np.random.default_rng(3)
    updates = [u.astype(np.float32) for u in _clipped(rng, 30)]
    sent = rng.normal(size=DIM).astype(np.float32)
    # Execute
    on = _round(_wrapper(tmp_path / "on", AggregateClip()), sent, updates)
    off = _round(_wrapper(tmp_path / "off", None), sent, updates)
    # Assert
    assert np.array_equal(on, off)


def _cli(args: list[str]) -> Any:
    import typer
    from typer.testing import CliRunner

    from simulations import commands

    app, bench = typer.Typer(), typer.Typer()
    commands.register(app, bench)
    return CliRunner().invoke(app, ["attack", *args])


@pytest.mark.parametrize(("args", "named"), [
    (["device-1000", "--attack", "lie", "--strength", "1"], "lie"),
    (["device-1000", "--attack", "scale", "--strength", "100", "--attacker", "evil"], "evil"),
    (["device-1000", "--attack", "scale", "--strength", "100", "--fraction", "1.5"], "1.5"),
    (["regional-5", "--attack", "scale", "--strength", "100", "--attacker", "bypass"],
     "regional"),
])
def test_cli_names_bad_device_attack_options(args: list[str], named: str) -> None:
    # Execute
    out = _cli(args)
    # Assert
    assert out.exit_code == 2 and named in out.output


def test_cli_prints_the_issue_json_with_bypass_by_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    # Prepare: no simulation; each run reports fixed views and writes its attackers record
    import simulations.attacks as attacks

    calls: list[dict[str, Any]] = []

    def fake_run(scenario: str, **kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        attack = kwargs["attack"]
        (tmp_path / ATTACKERS_FILE).write_text(json.dumps(
            {"partition_ids": [] if attack is None else list(range(100))}))
        views = {"seen": 0.70, "unseen": 0.85} if attack is None else {"seen": 0.5,
                                                                      "unseen": 0.6}
        return {"views": views, "run_dir": str(tmp_path), "rounds": {}}

    monkeypatch.setattr(attacks, "one_device_run", fake_run)
    # Execute
    out = _cli(["device-1000", "--attack", "scale", "--strength", "100", "--defence", "off",
                "--rounds", "2", "--runs", str(tmp_path), "--json"])
    # Assert
    assert out.exit_code == 0, out.output
    result = json.loads(out.output.strip().splitlines()[-1])
    assert {"attack", "defence", "no_attack", "attacked", "target_rank_before",
            "target_rank_after"} <= set(result)
    assert result["target_rank_before"] is None and result["target_rank_after"] is None
    assert result["no_attack"] == {"seen": 0.70, "unseen": 0.85}
    assert result["attacked"] == {"seen": 0.5, "unseen": 0.6}
    assert result["attacker"] == "bypass" and result["attackers"]["count"] == 100
    assert calls[0]["attack"] is None and calls[0]["defence"] is False
    assert calls[1]["attack"] == DeviceAttack(Poison("scale", 100.0), "bypass")
    assert calls[1]["rounds"] == 2 and calls[1]["fraction"] == 0.1


def test_rounds_summary_takes_the_last_rounds_mean_and_the_worst_round() -> None:
    # Prepare
    rows = [{"ndcg@10": 0.8 - 0.01 * i, "seen": {"ndcg@10": 0.7}} for i in range(12)]
    rows[0]["ndcg@10"] = 0.3
    # Execute
    summary = rounds_summary({"rounds": rows}, last=10)
    # Assert
    assert summary["unseen"]["worst"] == 0.3
    assert summary["unseen"]["mean_last_10"] == pytest.approx(np.mean([0.8 - 0.01 * i
                                                                       for i in range(2, 12)]))
    assert summary["seen"] == {"mean_last_10": pytest.approx(0.7), "worst": 0.7}
