"""Malicious simulated devices (issue 11): the poisoning mods on real legacy fit Messages,
around Flower's own ``adaptiveclipping_mod`` in the ClientApp's order."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.client.mod import adaptiveclipping_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat

from client.device_mods import bypass_poison_mod, compliant_poison_mod
from client.faults import DeviceAttack, Poison, simulated_device_attack

CLIP = 0.5
SENT = [np.array([0.1, -0.2, 0.3], np.float32), np.array([[1.0, 2.0]], np.float32)]
HONEST = [np.array([0.6, 0.8, 0.0], np.float32), np.array([[0.0, 0.0]], np.float32)]  # |u|=1


def _fit_message() -> Message:
    fitins = FitIns(ndarrays_to_parameters(SENT),
                    {"clipping_norm": CLIP, "keys": "a,b", "server-round": 1})
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train",
    )
    content = compat.fitins_to_recorddict(fitins, keep_input=True)
    return Message(content, metadata=metadata)  # type: ignore[call-overload]


def _train(msg: Message, ctxt: Context) -> Message:
    """An honest device: its update is HONEST (norm 1, above the clip)."""
    params = [s + u for s, u in zip(SENT, HONEST, strict=True)]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(params), 1, {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _device(tmp_path: Path, settings: dict[str, Any] | None, *, pid: int | None = 3) -> Context:
    if settings is not None:
        path = tmp_path / "nodes" / "node-3" / "node-settings.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    node_config: dict[str, Any] = {} if pid is None else {"partition-id": pid}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={"run-dir": str(tmp_path)})


def _app_order(ctxt: Context) -> Message:
    """The ClientApp's device train mods inside secaggplus: bypass, clip, compliant, train."""
    def clip(m: Message, c: Context) -> Message:
        return adaptiveclipping_mod(m, c, lambda m2, c2: compliant_poison_mod(m2, c2, _train))

    return bypass_poison_mod(_fit_message(), ctxt, clip)


def _update(reply: Message) -> np.ndarray:
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    got = parameters_to_ndarrays(fitres.parameters)
    return np.concatenate([(g.astype(np.float64) - s).ravel() for g, s in zip(got, SENT,
                                                                              strict=True)])


def _norm_bit(reply: Message) -> bool:
    return bool(compat.recorddict_to_fitres(reply.content, keep_input=True).metrics["norm_bit"])


HONEST_DIRECTION = np.concatenate([h.ravel() for h in HONEST]).astype(np.float64)


def test_honest_device_is_clipped_to_c(tmp_path: Path) -> None:
    # Prepare
    ctxt = _device(tmp_path, {"dropout": 0.0})
    # Execute
    reply = _app_order(ctxt)
    # Assert
    assert np.allclose(_update(reply), CLIP * HONEST_DIRECTION, atol=1e-6)
    assert _norm_bit(reply)


@pytest.mark.parametrize(("attack", "sign"), [("scale", 1.0), ("signflip", -1.0)])
def test_compliant_attacker_is_still_clipped_to_c(tmp_path: Path, attack: str,
                                                   sign: float) -> None:
    # Prepare
    ctxt = _device(tmp_path, {"attack": attack, "attack-strength": 100.0,
                              "attacker": "compliant"})
    # Execute
    reply = _app_order(ctxt)
    # Assert: the stock clip bounds it; only the direction is the attacker's
    update = _update(reply)
    assert np.linalg.norm(update) == pytest.approx(CLIP, rel=1e-5)
    assert np.allclose(update, sign * CLIP * HONEST_DIRECTION, atol=1e-5)


def test_bypass_attacker_scales_its_clipped_update(tmp_path: Path) -> None:
    # Prepare
    ctxt = _device(tmp_path, {"attack": "scale", "attack-strength": 100.0,
                              "attacker": "bypass"})
    # Execute
    reply = _app_order(ctxt)
    # Assert: x100 of the clipped update leaves the clip mod; the norm bit stays honest
    update = _update(reply)
    assert np.linalg.norm(update) == pytest.approx(100 * CLIP, rel=1e-5)
    assert np.allclose(update, 100 * CLIP * HONEST_DIRECTION, atol=1e-4)
    assert _norm_bit(reply)


def test_deployed_node_never_poisons(tmp_path: Path) -> None:
    # Prepare: a settings file that asks for an attack, but no partition-id (deployed)
    ctxt = _device(tmp_path, {"attack": "scale", "attack-strength": 100.0,
                              "attacker": "bypass"}, pid=None)
    # Execute
    reply = _app_order(ctxt)
    # Assert
    assert simulated_device_attack(ctxt) is None
    assert np.allclose(_update(reply), CLIP * HONEST_DIRECTION, atol=1e-6)


def test_regional_attack_marking_does_not_make_a_device_attacker(tmp_path: Path) -> None:
    # Prepare: the regional shape's marking (no `attacker` key)
    ctxt = _device(tmp_path, {"attack": "scale", "attack-strength": 100.0})
    # Execute
    reply = _app_order(ctxt)
    # Assert
    assert simulated_device_attack(ctxt) is None
    assert np.allclose(_update(reply), CLIP * HONEST_DIRECTION, atol=1e-6)


def test_poison_mods_pass_non_legacy_messages_and_errors_through(tmp_path: Path) -> None:
    # Prepare
    ctxt = _device(tmp_path, {"attack": "scale", "attack-strength": 100.0,
                              "attacker": "bypass"})
    msg = _fit_message()
    msg.content = RecordDict({})  # a regional/new-API message: no fitins.parameters
    seen: list[Message] = []

    def reply_of(m: Message, c: Context) -> Message:
        out = Message(RecordDict({}), reply_to=m)
        seen.append(out)
        return out

    call: Callable[[Message, Context, Any], Message]
    # Execute / Assert
    for call in (bypass_poison_mod, compliant_poison_mod):
        assert call(msg, ctxt, reply_of) is seen[-1]


@pytest.mark.parametrize(("attack", "attacker", "bad"), [
    ("lie", "bypass", "'lie'"), ("scale", "evil", "'evil'"),
])
def test_device_attack_names_the_bad_value(attack: str, attacker: str, bad: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=bad):
        DeviceAttack(Poison(attack, 100.0), attacker)
