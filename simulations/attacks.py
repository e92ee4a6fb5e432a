"""Model-poisoning attacks by one regional node, and an aggregation harness to measure them.

Issue 11, first part (unit level): the attacks transform what one node replies, given the
weights it was sent and (for "a little is enough") the honest updates it can estimate.

- ``scale``: the node's update times ``strength`` (x100 in the issue);
- ``signflip``: the node's update times ``-strength``;
- ``lie``: "a little is enough" (Baruch et al. 2019): ``mean - strength * std`` per
  coordinate over the honest updates (``strength`` is their z, ~1 for 5 nodes).

:func:`aggregate_with` runs one round of replies through the server's reply validation
(``server.validation.ValidatingStrategy``: clip to ``CLIP_UPDATE_NORM``, uniform weights)
and a Flower strategy (FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) with real
``flwr`` Messages, and returns the aggregated weights. ``measure`` compares the aggregate
with and without the attack on seeded synthetic updates.

Federated runs (:func:`federated`, ``fedrank attack``): the scenario on Flower's Simulation
Engine twice, without and with node ``partition-id 0`` (1 of 5 in regional-5) poisoning its
train replies (a simulation-only fault: ``client.faults.simulated_poison``, written into that
node's runner-written settings). ``defence on`` = the run config's default robust rule
(``robust-aggregation``, server.strategies) plus the server's update clip; ``off`` = the plain
mean (the update clip and reply validation always stay on: they are input validation). Seen
and unseen NDCG@10 of the final global model.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from client.faults import ATTACKER, POISON, POISON_STRENGTH, DeviceAttack, Poison
from server.strategies import aggregate_train_metrics
from server.validation import CLIP_UPDATE_NORM, ValidatingStrategy
from shared_model.settings import RunSettings, simulated_node_settings_path

ATTACKS = ("scale", "signflip", "lie")
Weights = dict[str, np.ndarray]


def poison(
    attack: str, strength: float, sent: Mapping[str, np.ndarray], own: Mapping[str, np.ndarray],
    honest: Sequence[Mapping[str, np.ndarray]],
) -> Weights:
    """The attacker's reply (float32) from the weights ``sent``, its own honest reply ``own``
    and the honest replies ``honest`` (used by ``lie`` only)."""
    out: Weights = {}
    for key, base in sent.items():
        base64 = np.asarray(base, np.float64)
        update = np.asarray(own[key], np.float64) - base64
        if attack == "scale":
            new = strength * update
        elif attack == "signflip":
            new = -strength * update
        elif attack == "lie":
            stack = np.stack([np.asarray(h[key], np.float64) - base64 for h in honest])
            new = stack.mean(axis=0) - strength * stack.std(axis=0)
        else:
            raise ValueError(f"unknown attack {attack!r}; expected one of {ATTACKS}")
        out[key] = (base64 + new).astype(np.float32)
    return out


def strategies(num_nodes: int, num_malicious: int = 1) -> dict[str, Callable[[], Strategy]]:
    """Flower strategies to compare (uniform weights, all nodes every round)."""
    common: dict[str, Any] = dict(
        fraction_evaluate=0.0, min_train_nodes=num_nodes, min_available_nodes=num_nodes,
        train_metrics_aggr_fn=aggregate_train_metrics,
    )
    f = num_malicious
    return {
        "fedavg": lambda: FedAvg(**common),
        "fedmedian": lambda: FedMedian(**common),
        "trimmedavg": lambda: FedTrimmedAvg(**common, beta=0.2),
        "krum": lambda: Krum(**common, num_malicious_nodes=f),
        "multikrum": lambda: MultiKrum(**common, num_malicious_nodes=f,
                                       num_nodes_to_select=num_nodes - f),
        **({"bulyan": lambda: Bulyan(**common, num_malicious_nodes=f)}
           if num_nodes >= 4 * f + 3 else {}),  # Bulyan needs n >= 4f + 3 (7 for f = 1)
    }


class _Grid:
    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = list(ids)

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


METRICS = {"num-examples": 1.0, "steps": 1.0, "epsilon": 1.0, "release-round": 0.0}


def aggregate_with(
    inner: Strategy, sent: Mapping[str, np.ndarray], replies: Sequence[Mapping[str, np.ndarray]],
    *, validate: bool = True,
) -> Weights:
    """One round: ``replies[i]`` from node ``i + 1``, through validation (clip) and ``inner``.

    Needs a ServerApp task identity (tests set ``TaskIdentity``; see tests/simulations).
    """
    ids = list(range(1, len(replies) + 1))
    strategy: Strategy = ValidatingStrategy(inner) if validate else inner
    record = ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in sent.items()})
    msgs = list(strategy.configure_train(1, record, ConfigRecord(), _Grid(ids)))  # type: ignore[arg-type]
    by_id = {m.metadata.dst_node_id: m for m in msgs}
    answers = []
    for node, reply in zip(ids, replies, strict=True):
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in reply.items()}),
            "metrics": MetricRecord(dict(METRICS)),
        })
        answers.append(Message(content, reply_to=by_id[node]))
    arrays, _ = strategy.aggregate_train(1, answers)
    if arrays is None:
        raise RuntimeError("no aggregate")
    return {k: v.numpy() for k, v in arrays.items()}


def synthetic_round(
    *, num_nodes: int = 5, dim: int = 400, signal: float = 0.5, noise: float = 0.3, seed: int = 0,
) -> tuple[Weights, list[Weights]]:
    """Seeded stand-in for one DP-SGD round: every node's update is a shared direction of norm
    ``signal`` plus independent Gaussian noise of norm ~``noise`` (DP noise, data skew)."""
    rng = np.random.default_rng(seed)
    sent = {"w": rng.normal(size=dim).astype(np.float32)}
    direction = rng.normal(size=dim)
    direction *= signal / np.linalg.norm(direction)
    replies = []
    for _ in range(num_nodes):
        update = direction + rng.normal(size=dim) * noise / np.sqrt(dim)
        replies.append({"w": (sent["w"] + update).astype(np.float32)})
    return sent, replies


def measure(
    attack: str, strength: float, strategy: str, *, num_nodes: int = 5, seed: int = 0,
    validate: bool = True,
) -> dict[str, float]:
    """Relative error of the aggregated update vs the honest nodes' mean update, without and
    with node 1 attacking (seeded synthetic updates)."""
    sent, replies = synthetic_round(num_nodes=num_nodes, seed=seed)
    target = np.mean([r["w"] - sent["w"] for r in replies[1:]], axis=0)
    make = strategies(num_nodes)[strategy]

    def err(rs: Sequence[Mapping[str, np.ndarray]]) -> float:
        agg = aggregate_with(make(), sent, rs, validate=validate)
        return float(np.linalg.norm(agg["w"] - sent["w"] - target) / np.linalg.norm(target))

    attacked = [poison(attack, strength, sent, replies[0], replies[1:]), *replies[1:]]
    return {"no_attack": err(replies), "attacked": err(attacked)}


def table(seeds: int = 5) -> list[str]:
    """The markdown rows of docs/results.md's poisoning table (all strategies, clip on/off)."""
    import logging

    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # a ServerApp's identity, for Messages
        setattr(TaskIdentity, attr, 1)
    for name in ("fedrank.server", "flwr"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    for attack, strength in [("scale", 100.0), ("signflip", 1.0), ("signflip", 100.0),
                             ("lie", 1.0)]:
        for name in strategies(5):
            for validate in (False, True):
                errs = [measure(attack, strength, name, seed=k, validate=validate)
                        for k in range(seeds)]
                rows.append(
                    f"| {attack} | {strength:g} | {name} | {'on' if validate else 'off'} | "
                    f"{np.mean([e['no_attack'] for e in errs]):.3f} | "
                    f"{np.mean([e['attacked'] for e in errs]):.3f} |"
                )
    return rows



DEFAULT_RULE = RunSettings.robust_aggregation


def attack_run_dir(root: Path, *, scenario: str, attack: str | None, strength: float,
                   rule: str, epsilon: float, rounds: int, fold: int) -> Path:
    """Where one federated run of :func:`federated` goes (reused when it finished)."""
    eps = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
    what = "none" if attack is None else f"{attack}-{strength:g}"
    return root / f"{scenario}-eps{eps}-r{rounds}-f{fold}" / f"{rule}" / what


def mark_attacker(run_dir: Path, poison: Poison | None, *, partition_id: int = 0) -> Path:
    """Write (or clear) the attack into simulated node ``partition_id``'s settings."""
    path = simulated_node_settings_path(run_dir, partition_id)
    values = json.loads(path.read_text())
    values.pop(POISON, None)
    values.pop(POISON_STRENGTH, None)
    if poison is not None:
        values.update({POISON: poison.attack, POISON_STRENGTH: poison.strength})
    path.write_text(json.dumps(values, indent=1))
    return path


def _views(metrics: Mapping[str, Any]) -> dict[str, float]:
    final = metrics.get("final") or {}
    if "seen" not in final or "ndcg@10" not in final:
        raise RuntimeError("run produced no final seen/unseen NDCG@10")
    return {"seen": float(final["seen"]["ndcg@10"]), "unseen": float(final["ndcg@10"])}


def _finished_run(scenario: Any, run_dir: Path, rounds: int, *, setup: Callable[[], Any],
                  echo: Callable[[str], None]) -> dict[str, Any]:
    """The metrics of the run in ``run_dir``: reused when it finished all ``rounds``, else
    started afresh (``setup`` prepares the run dir and returns its settings)."""
    from simulations.runner import run_simulation

    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if len(metrics.get("rounds", [])) == rounds:
        return dict(metrics)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    result = run_simulation(scenario, setup(), echo=echo)
    if len(result.metrics.get("rounds", [])) != rounds:
        raise RuntimeError(f"run in {run_dir} did not finish (flwr exit "
                           f"{result.returncode}); see {run_dir / 'flower.log'}")
    return dict(result.metrics)


def one_run(
    scenario_name: str, *, attack: str | None, strength: float, rule: str, epsilon: float,
    rounds: int, root: Path, fold: int = 0, echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One Simulation Engine run (reused if its metrics.json is complete); its final views
    and what the server recorded about the attacker (rounds clipped / down-weighted)."""
    from simulations.runner import prepare_run
    from simulations.scenarios import get_scenario

    scenario = get_scenario(scenario_name)
    poison = Poison(attack, strength) if attack is not None else None
    run_dir = attack_run_dir(root, scenario=scenario_name, attack=attack, strength=strength,
                             rule=rule, epsilon=epsilon, rounds=rounds, fold=fold)

    def setup() -> Any:
        settings = prepare_run(scenario, run_dir=run_dir, rounds=rounds, epsilon=epsilon,
                               eval_fold=fold, overrides={"robust-aggregation": rule})
        mark_attacker(run_dir, poison)
        return settings

    metrics = _finished_run(scenario, run_dir, rounds, setup=setup, echo=echo)
    actions: dict[str, int] = {}
    for row in metrics["rounds"]:
        for kind in ("rejected", "clipped", "downweighted"):
            actions[kind] = actions.get(kind, 0) + len(row.get("replies", {}).get(kind, []))
    return {"views": _views(metrics), "run_dir": str(run_dir), "actions": actions}


def federated(
    scenario: str, *, attack: str, strength: float, defence: bool, epsilon: float,
    rounds: int | None = None, root: Path = Path("runs/attack"), fold: int = 0,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The issue's JSON for one model-poisoning attack: no attack vs attacked, same defence."""
    from simulations.scenarios import get_scenario

    Poison(attack, strength)  # validates, naming a bad value
    rounds = rounds or get_scenario(scenario).rounds
    rule = DEFAULT_RULE if defence else "none"
    common = dict(rule=rule, epsilon=epsilon, rounds=rounds, root=root, fold=fold, echo=echo)
    clean = one_run(scenario, attack=None, strength=0.0, **common)  # type: ignore[arg-type]
    hit = one_run(scenario, attack=attack, strength=strength, **common)  # type: ignore[arg-type]
    return {
        "attack": attack, "strength": strength,
        "defence": f"{rule} + update clip {CLIP_UPDATE_NORM:g}" if defence
        else f"none (update clip {CLIP_UPDATE_NORM:g} only)",
        "epsilon": "inf" if math.isinf(epsilon) else epsilon, "rounds": rounds,
        "no_attack": clean["views"], "attacked": hit["views"],
        "target_rank_before": None, "target_rank_after": None,
        "server_actions": hit["actions"], "run_dirs": [clean["run_dir"], hit["run_dir"]],
    }


# ------------------------------------------------------------------ device shape
# 10% malicious devices under SecAgg+ (issue 11): a seeded set of simulated devices poisons
# its fit reply (client.faults.DeviceAttack): "compliant" before the clip (stock software),
# "bypass" after it (own code; only SecAgg+'s quantiser bounds it). The server's defence is
# the aggregate clip (server.device.AggregateClip, run config device-aggregate-clip).

DEVICE_ATTACK_FRACTION = 0.1
DEVICE_ATTACK_SEED = 0
ATTACKERS_FILE = "attackers.json"


def choose_attackers(num_nodes: int, fraction: float = DEVICE_ATTACK_FRACTION, *,
                     seed: int = DEVICE_ATTACK_SEED) -> list[int]:
    """``round(fraction * num_nodes)`` distinct partition ids (at least 1), sorted, drawn by
    a generator seeded with ``seed`` (simulated attackers are public and reproducible)."""
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"attacker fraction must be in (0, 1], got {fraction!r}")
    count = max(1, round(fraction * num_nodes))
    chosen = np.random.default_rng(seed).choice(num_nodes, size=count, replace=False)
    return sorted(int(i) for i in chosen)


def mark_device_attackers(
    run_dir: Path, attack: DeviceAttack | None, *, num_nodes: int,
    fraction: float = DEVICE_ATTACK_FRACTION, seed: int = DEVICE_ATTACK_SEED,
) -> dict[str, Any]:
    """Write (or clear, ``attack=None``) the attack into the chosen devices' settings and
    record the choice in ``RUN_DIR/attackers.json``; returns that record."""
    chosen = choose_attackers(num_nodes, fraction, seed=seed) if attack is not None else []
    marked = set(chosen)
    for pid in range(num_nodes):
        path = simulated_node_settings_path(run_dir, pid)
        values = json.loads(path.read_text())
        had = any(k in values for k in (POISON, POISON_STRENGTH, ATTACKER))
        if not had and pid not in marked:
            continue  # nothing to write: keep the runner's file as it is
        for key in (POISON, POISON_STRENGTH, ATTACKER):
            values.pop(key, None)
        if attack is not None and pid in marked:
            values.update({POISON: attack.poison.attack, POISON_STRENGTH: attack.poison.strength,
                           ATTACKER: attack.attacker})
        path.write_text(json.dumps(values, indent=1))
    record: dict[str, Any] = {
        "attack": None if attack is None else attack.poison.attack,
        "strength": None if attack is None else attack.poison.strength,
        "attacker": None if attack is None else attack.attacker,
        "fraction": fraction, "seed": seed, "num_nodes": num_nodes, "partition_ids": chosen,
    }
    (run_dir / ATTACKERS_FILE).write_text(json.dumps(record, indent=1))
    return record


def device_attack_run_dir(root: Path, *, scenario: str, attack: DeviceAttack | None,
                          defence: bool, epsilon: float, rounds: int, fold: int,
                          fraction: float = DEVICE_ATTACK_FRACTION,
                          seed: int = DEVICE_ATTACK_SEED) -> Path:
    """Where one device-shape run of :func:`federated_device` goes."""
    eps = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
    what = "none" if attack is None else (
        f"{attack.attacker}-{attack.poison.attack}-{attack.poison.strength:g}"
        f"-p{fraction:g}-s{seed}")
    clip = "aggregate-clip" if defence else "no-aggregate-clip"
    return root / f"{scenario}-eps{eps}-r{rounds}-f{fold}" / clip / what


def one_device_run(
    scenario_name: str, *, attack: DeviceAttack | None, defence: bool, epsilon: float,
    rounds: int, root: Path, fold: int = 0, fraction: float = DEVICE_ATTACK_FRACTION,
    seed: int = DEVICE_ATTACK_SEED, echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One device-shape Simulation Engine run (reused if its metrics.json is complete)."""
    from shared_model.settings import DEVICE_AGGREGATE_CLIP
    from simulations.runner import prepare_run
    from simulations.scenarios import get_scenario

    scenario = get_scenario(scenario_name)
    run_dir = device_attack_run_dir(root, scenario=scenario_name, attack=attack,
                                    defence=defence, epsilon=epsilon, rounds=rounds, fold=fold,
                                    fraction=fraction, seed=seed)

    def setup() -> Any:
        settings = prepare_run(scenario, run_dir=run_dir, rounds=rounds, epsilon=epsilon,
                               eval_fold=fold, overrides={DEVICE_AGGREGATE_CLIP: defence})
        mark_device_attackers(run_dir, attack, num_nodes=scenario.num_nodes,
                              fraction=fraction, seed=seed)
        return settings

    metrics = _finished_run(scenario, run_dir, rounds, setup=setup, echo=echo)
    return {"views": _views(metrics), "run_dir": str(run_dir), "rounds": rounds_summary(metrics)}


def rounds_summary(metrics: Mapping[str, Any], last: int = 10) -> dict[str, dict[str, float]]:
    """Seen/unseen NDCG@10 over the rounds: mean of the ``last`` rounds and the worst round
    (a device run's final value swings with one round's noise and sampled attackers)."""
    rows = metrics.get("rounds", [])
    out: dict[str, dict[str, float]] = {}
    for view, get in (("seen", lambda r: r["seen"]["ndcg@10"]), ("unseen", lambda r: r["ndcg@10"])):
        values = [float(get(r)) for r in rows if view != "seen" or "seen" in r]
        if values:
            out[view] = {f"mean_last_{last}": float(np.mean(values[-last:])),
                         "worst": float(min(values))}
    return out


def federated_device(
    scenario: str, *, attack: str, strength: float, attacker: str, defence: bool,
    epsilon: float, rounds: int | None = None, root: Path = Path("runs/attack"), fold: int = 0,
    fraction: float = DEVICE_ATTACK_FRACTION, seed: int = DEVICE_ATTACK_SEED,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The issue's JSON for 10% malicious devices: no attack vs attacked, same defence."""
    from simulations.scenarios import get_scenario

    chosen = get_scenario(scenario)
    if chosen.partition != "device":
        raise ValueError(f"scenario {scenario!r} is not a device scenario")
    hostile = DeviceAttack(Poison(attack, strength), attacker)  # validates, naming bad values
    choose_attackers(chosen.num_nodes, fraction, seed=seed)  # validates the fraction
    rounds = rounds or chosen.rounds
    common: dict[str, Any] = dict(defence=defence, epsilon=epsilon, rounds=rounds, root=root,
                                  fold=fold, fraction=fraction, seed=seed, echo=echo)
    clean = one_device_run(scenario, attack=None, **common)
    hit = one_device_run(scenario, attack=hostile, **common)
    record = json.loads((Path(hit["run_dir"]) / ATTACKERS_FILE).read_text())
    return {
        "attack": attack, "strength": strength, "attacker": attacker,
        "defence": ("aggregate clip (mean update <= C, before the noise) + device clip + "
                    "noise" if defence else "device clip + noise only"),
        "epsilon": "inf" if math.isinf(epsilon) else epsilon, "rounds": rounds,
        "no_attack": clean["views"], "attacked": hit["views"],
        "target_rank_before": None, "target_rank_after": None,
        "rounds_summary": {"no_attack": clean["rounds"], "attacked": hit["rounds"]},
        "attackers": {"fraction": fraction, "seed": seed,
                      "count": len(record["partition_ids"]), "of": chosen.num_nodes},
        "run_dirs": [clean["run_dir"], hit["run_dir"]],
    }


if __name__ == "__main__":
    print("\n".join(table()))
