"""Test hooks for deployment tests: fault injection and outgoing-message recording.

Both are **inert unless the operator sets them** in the SuperNode's node config:

- ``fault = nan | inf | shape | dtype | missing-key | extra-key | huge-norm``: the node's
  train reply carries corrupted arrays (what a broken or malicious node would send), so a
  test can prove the server rejects it (``server.validation``) and the round completes.
- ``fault = extra-metric | list-metric | negative-epsilon | huge-weight | huge-value |
  max-float32 | big-update | forged-header | forged-reason`` (:data:`REPLY_FAULTS`): the whole
  train reply is tampered with by :func:`fault_mod` as it leaves the node: an extra metric
  key, a list-valued metric, ε < 0, ``num-examples`` = 1e300 with an update of norm 50,
  arrays of 1.7e308 (float64), arrays at float32's largest finite value, an update of norm 50,
  Array metadata claiming float32 over float64 data, or an error reply whose reason tries to
  forge server console lines.
- ``record-messages = PATH``: a client mod appends one JSON line per outgoing reply to PATH,
  listing its record types and keys and, for MetricRecords/ConfigRecords, the value types,
  never model values, so a test can prove only model arrays and aggregate metrics leave the
  node (no query text, user ids or click rows).

Model poisoning, **simulation only** (issue 11): a simulated node (Flower node config holds
``partition-id``) whose runner-written settings (``RUN_DIR/nodes/node-<pid>/
node-settings.json``) carry ``attack = scale | signflip | lie`` and ``attack-strength = S``
replaces the head part of its honest train reply (never the memorised evidence) by
(:func:`poison_update`, update = reply minus the weights sent):

- ``scale``: ``S`` x its update (x100 in the issue);
- ``signflip``: ``-S`` x its update;
- ``lie``: "a little is enough" (Baruch et al. 2019), ``mean - S * std`` per coordinate of
  the honest updates. One node cannot see the others, so it estimates both (as the
  paper's simulation does with the corrupted nodes' own data): ``mean`` = its own honest
  update; ``std`` = the per-coordinate spread DP-SGD's noise gives every honest update,
  computed from its public plan (``learning-rate * sigma * clip-norm * sqrt(steps) /
  batch-size``: SGD without momentum, Opacus' noise on the summed clipped gradients over
  the expected batch). Data differences between regions add to the true spread, so the
  estimate is a lower bound and the attack at most as strong as with the true std. A
  non-private node (sigma 0) falls back to ``|own update|`` per coordinate.

Deterministic given the honest reply (no randomness of its own). A deployed node (no
``partition-id``) never poisons: nothing in its node config or from the server can make it.

Device shape (legacy SecAgg+ path; :func:`simulated_device_attack`): the runner marks a
seeded set of simulated devices (``simulations.attacks.mark_device_attackers``) with
``attack = scale | signflip``, ``attack-strength = S`` and ``attacker = compliant | bypass``;
the device's fit reply is poisoned by :func:`poison_fit_reply` from one of two places in the
ClientApp's train mods (``client.device_mods``):

- ``compliant``: inside ``adaptiveclipping_mod``, i.e. *before* the clip: a device running
  the stock client software (attested), whose poisoned update the clip then bounds to C;
- ``bypass``: between ``secaggplus_mod`` and ``adaptiveclipping_mod``, i.e. *after* the
  clip: a device running its own code scales its already-clipped update, so only SecAgg+'s
  quantiser (each parameter clipped to ``[-clipping_range, clipping_range]``) bounds it. Its
  clipped-count bit is the honest one (it could lie there too: see docs/results.md).

Production nodes never set these keys; nothing here changes a reply otherwise.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

FAULT = "fault"
RECORD_MESSAGES = "record-messages"
ARRAY_FAULTS = ("nan", "inf", "shape", "dtype", "missing-key", "extra-key", "huge-norm")
REPLY_FAULTS = (
    "extra-metric", "list-metric", "negative-epsilon", "huge-weight", "huge-value",
    "max-float32", "big-update", "forged-header", "forged-reason",
)
FAULTS = ARRAY_FAULTS + REPLY_FAULTS
BIG_UPDATE_NORM = 50.0
FORGED_REASON = "budget\n[fedrank] round 30/30: ndcg@10=0.9999 done\r\x1b[2K"


def fault_of(node_config: Mapping[str, Any]) -> str | None:
    """The configured fault (``None`` = none); an unknown name is an error."""
    value = node_config.get(FAULT)
    if value in (None, "", "none"):
        return None
    if value not in FAULTS:
        raise ValueError(f"node config {FAULT!r} must be one of {FAULTS}, got {value!r}")
    return str(value)


def corrupt(state: Mapping[str, np.ndarray], fault: str) -> dict[str, np.ndarray]:
    """A corrupted copy of the reply's arrays (keys in their original order).

    Reply-level faults (:data:`REPLY_FAULTS`) leave the arrays alone: :func:`fault_mod` applies
    them to the finished reply.
    """
    out = {k: np.array(v, copy=True) for k, v in state.items()}
    if fault in REPLY_FAULTS:
        return out
    first = next(iter(out))
    arr = out[first]
    if fault == "nan":
        arr.reshape(-1)[0] = np.nan
    elif fault == "inf":
        arr.reshape(-1)[0] = np.inf
    elif fault == "shape":
        out[first] = np.concatenate([arr.reshape(-1), np.zeros(1, arr.dtype)])
    elif fault == "dtype":
        out[first] = arr.astype(np.float64 if arr.dtype != np.float64 else np.float32)
    elif fault == "missing-key":
        del out[first]
    elif fault == "extra-key":
        out["injected"] = np.zeros(3, dtype=np.float32)
    elif fault == "huge-norm":
        out[first] = arr + np.asarray(1e6, dtype=arr.dtype)
    else:  # pragma: no cover - fault_of validates
        raise ValueError(fault)
    return out


def _push(arrays: Any, norm: float) -> Any:
    """``arrays`` (an ArrayRecord) moved by an update of L2 norm ``norm``."""
    from flwr.app import Array, ArrayRecord

    state = {k: v.numpy().astype(np.float64) for k, v in arrays.items()}
    size = sum(v.size for v in state.values())
    step = norm / np.sqrt(size)
    return ArrayRecord({k: Array((v + step).astype(np.float32)) for k, v in state.items()})


def tamper(content: Any, fault: str) -> Any:
    """A train reply's RecordDict with a reply-level fault (:data:`REPLY_FAULTS`) applied."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    records = {name: record for name, record in content.items()}
    metrics = dict(records["metrics"])
    arrays = records["arrays"]
    if fault == "extra-metric":
        metrics["injected"] = 0.0
    elif fault == "list-metric":
        metrics["epsilon"] = [0.1, 0.2]
    elif fault == "negative-epsilon":
        metrics["epsilon"] = -1.0
    elif fault == "huge-weight":
        metrics["num-examples"] = 1e300
        arrays = _push(arrays, BIG_UPDATE_NORM)
    elif fault == "big-update":
        arrays = _push(arrays, BIG_UPDATE_NORM)
    elif fault == "huge-value":
        arrays = ArrayRecord(
            {k: Array(np.full(v.shape, 1.7e308, np.float64)) for k, v in arrays.items()}
        )
    elif fault == "max-float32":
        top = np.finfo(np.float32).max
        arrays = ArrayRecord({k: Array(np.full(v.shape, top, np.float32))
                              for k, v in arrays.items()})
    elif fault == "forged-header":
        arrays = ArrayRecord({
            k: Array(dtype="float32", shape=tuple(v.shape), stype=v.stype,
                     data=Array(v.numpy().astype(np.float64)).data)
            for k, v in arrays.items()
        })
    else:  # pragma: no cover - fault_of validates; forged-reason is handled by fault_mod
        raise ValueError(fault)
    records["metrics"] = MetricRecord(metrics)
    records["arrays"] = arrays
    return RecordDict(records)


POISON = "attack"
POISON_STRENGTH = "attack-strength"
POISONS = ("scale", "signflip", "lie")


@dataclass(frozen=True)
class Poison:
    """A simulated node's model-poisoning attack (see the module docstring)."""

    attack: str
    strength: float

    def __post_init__(self) -> None:
        if self.attack not in POISONS:
            raise ValueError(f"{POISON} must be one of {POISONS}, got {self.attack!r}")
        if not (math.isfinite(self.strength) and self.strength > 0):
            raise ValueError(f"{POISON_STRENGTH} must be finite and > 0, got {self.strength!r}")


def poison_update(
    poison: Poison, sent: Mapping[str, np.ndarray], own: Mapping[str, np.ndarray], *,
    std: float | Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The poisoned reply (float32): head keys of ``own`` replaced, evidence keys as sent in
    ``own``. ``std`` (``lie`` only): the per-coordinate spread of honest updates, a scalar
    or per key; ``None`` or 0 = ``|own update|``."""
    from shared_model.evidence import EVIDENCE_KEYS

    out: dict[str, np.ndarray] = {}
    for key, value in own.items():
        if key in EVIDENCE_KEYS:
            out[key] = np.array(value, copy=True)
            continue
        base = np.asarray(sent[key], np.float64)
        update = np.asarray(value, np.float64) - base
        if poison.attack == "scale":
            new = poison.strength * update
        elif poison.attack == "signflip":
            new = -poison.strength * update
        else:
            spread = std.get(key) if isinstance(std, Mapping) else std
            spread_arr = np.abs(update) if spread is None or np.all(
                np.asarray(spread) == 0) else np.asarray(spread, np.float64)
            new = update - poison.strength * spread_arr
        out[key] = (base + new).astype(np.float32)
    return out


def dp_update_std(*, learning_rate: float, noise_multiplier: float, clip_norm: float,
                  steps: float, batch_size: float) -> float:
    """Per-coordinate std of the DP noise in one node's round update (plain SGD)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size!r}")
    return learning_rate * noise_multiplier * clip_norm * math.sqrt(max(steps, 0.0)) / batch_size


def simulated_poison(context: Any) -> Poison | None:
    """The attack a simulated node's runner-written settings ask for (``None``: none, and
    always ``None`` on a deployed node)."""
    from shared_model.settings import PARTITION_ID, simulated_node_settings_path

    pid = context.node_config.get(PARTITION_ID)
    run_dir = context.run_config.get("run-dir")
    if pid is None or not run_dir:
        return None
    path = simulated_node_settings_path(str(run_dir), int(pid))
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(values, dict) or values.get(POISON) in (None, "", "none"):
        return None
    return Poison(str(values[POISON]), float(values.get(POISON_STRENGTH, 1.0)))


ATTACKER = "attacker"
ATTACKERS = ("compliant", "bypass")
DEVICE_POISONS = ("scale", "signflip")


@dataclass(frozen=True)
class DeviceAttack:
    """A simulated device's poisoning: what it does (``poison``) and where (``attacker``)."""

    poison: Poison
    attacker: str

    def __post_init__(self) -> None:
        if self.attacker not in ATTACKERS:
            raise ValueError(f"{ATTACKER} must be one of {ATTACKERS}, got {self.attacker!r}")
        if self.poison.attack not in DEVICE_POISONS:
            # "lie" estimates the honest spread from a node's DP-SGD plan: no such plan here.
            raise ValueError(
                f"a device's {POISON} must be one of {DEVICE_POISONS}, got "
                f"{self.poison.attack!r}"
            )


def simulated_device_attack(context: Any) -> DeviceAttack | None:
    """The device attack a simulated node's runner-written settings ask for (``None``: none,
    and always ``None`` on a deployed node, which has no ``partition-id``)."""
    from shared_model.settings import PARTITION_ID, simulated_node_settings_path

    pid = context.node_config.get(PARTITION_ID)
    run_dir = context.run_config.get("run-dir")
    if pid is None or not run_dir:
        return None
    try:
        values = json.loads(simulated_node_settings_path(str(run_dir), int(pid)).read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(values, dict) or values.get(POISON) in (None, "", "none")
            or values.get(ATTACKER) in (None, "", "none")):
        return None
    poison = Poison(str(values[POISON]), float(values.get(POISON_STRENGTH, 1.0)))
    return DeviceAttack(poison, str(values[ATTACKER]))


def poison_fit_reply(msg: Any, reply: Any, poison: Poison) -> Any:
    """A legacy fit reply (``fitres.*``) whose parameters are poisoned against the
    parameters the fit message sent (:func:`poison_update`); other records unchanged.
    Error replies and messages without legacy fit parameters pass through."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    if reply.has_error() or "fitins.parameters" not in msg.content.array_records:
        return reply
    sent = parameters_to_ndarrays(compat.recorddict_to_fitins(msg.content,
                                                              keep_input=True).parameters)
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    own = parameters_to_ndarrays(fitres.parameters)
    if len(sent) != len(own):
        raise ValueError(f"fit reply has {len(own)} arrays for {len(sent)} sent")
    # Positional names: the legacy path carries no array names, and none is evidence.
    names = [f"p{i}" for i in range(len(own))]
    poisoned = poison_update(poison, dict(zip(names, sent, strict=True)),
                             dict(zip(names, own, strict=True)))
    fitres.parameters = ndarrays_to_parameters([poisoned[n] for n in names])
    reply.content = compat.fitres_to_recorddict(fitres, keep_input=True)
    return reply


def _lie_std(context: Any, steps: float) -> float | None:
    """DP-noise std of this node's update from its plan (``None`` when unknown/non-private)."""
    from client.node import NodeSettings
    from shared_model.settings import RunSettings

    run = RunSettings.from_config(context.run_config)
    node = NodeSettings.from_node_config(context.node_config, run)
    path = node.state_dir / "privacy_plan.json"
    try:
        plan = json.loads(path.read_text())
        sigma, batch = float(plan["noise_multiplier"]), float(plan["batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (sigma > 0 and math.isfinite(sigma)):
        return None
    return dp_update_std(learning_rate=run.learning_rate, noise_multiplier=sigma,
                         clip_norm=run.clip_norm, steps=steps, batch_size=batch)


def _poison_reply(msg: Any, ctxt: Any, reply: Any, poison: Poison) -> Any:
    from flwr.app import Array, ArrayRecord, RecordDict

    sent_record = msg.content.array_records.get("arrays")
    if sent_record is None:
        return reply
    sent = {k: v.numpy() for k, v in sent_record.items()}
    records = {name: record for name, record in reply.content.items()}
    own = {k: v.numpy() for k, v in records["arrays"].items()}
    std = None
    if poison.attack == "lie":
        steps = float(records["metrics"].get("steps", 0.0)) if "metrics" in records else 0.0
        std = _lie_std(ctxt, steps)
    poisoned = poison_update(poison, sent, own, std=std)
    records["arrays"] = ArrayRecord({k: Array(v) for k, v in poisoned.items()})
    reply.content = RecordDict(records)
    return reply


def fault_mod(msg: Any, ctxt: Any, call_next: Callable[[Any, Any], Any]) -> Any:
    """Client mod: when ``fault`` is a reply-level fault, tamper with the train reply; a
    simulated node set to attack (:func:`simulated_poison`) poisons its train reply."""
    reply = call_next(msg, ctxt)
    poison = simulated_poison(ctxt)
    if (poison is not None and not reply.has_error() and "arrays" in reply.content
            and str(reply.metadata.message_type) == "train"):
        return _poison_reply(msg, ctxt, reply, poison)
    fault = fault_of(ctxt.node_config)
    if fault not in REPLY_FAULTS or reply.has_error() or "arrays" not in reply.content:
        return reply
    if str(reply.metadata.message_type) != "train":
        return reply
    from flwr.app import Error, Message

    if fault == "forged-reason":
        return Message(Error(code=4001, reason=FORGED_REASON), reply_to=msg)
    reply.content = tamper(reply.content, fault)
    return reply


def _describe(content: Any) -> dict[str, Any]:
    """Record types, keys and (for metrics/configs) value types of a RecordDict."""
    out: dict[str, Any] = {}
    for name, record in content.items():
        kind = type(record).__name__
        entry: dict[str, Any] = {"type": kind, "keys": sorted(record.keys())}
        if kind in ("MetricRecord", "ConfigRecord"):
            entry["value_types"] = {k: type(v).__name__ for k, v in record.items()}
        elif kind == "ArrayRecord":
            entry["arrays"] = {
                k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in record.items()
            }
        out[name] = entry
    return out


def recording_mod(msg: Any, ctxt: Any, call_next: Callable[[Any, Any], Any]) -> Any:
    """Client mod: when ``record-messages`` is set, log the outgoing reply's structure."""
    reply = call_next(msg, ctxt)
    path = ctxt.node_config.get(RECORD_MESSAGES)
    if not path:
        return reply
    line: dict[str, Any] = {
        "time": time.time(),
        "node": ctxt.node_config.get("node-name"),
        "message_type": str(reply.metadata.message_type),
        "has_error": reply.has_error(),
    }
    if reply.has_error():
        line["error"] = {"code": reply.error.code, "reason": reply.error.reason}
    else:
        line["content"] = _describe(reply.content)
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    with open(str(path), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")
    return reply
