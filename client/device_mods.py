"""Client mods of the device shape (legacy SecAgg+ path): simulated drop-outs, compact upload.

- :func:`dropout_mod`: a **simulated** device (Simulation Engine; its node config holds
  ``partition-id``) whose runner-written settings (``RUN_DIR/nodes/node-<pid>/
  node-settings.json``) carry ``dropout = P`` vanishes with probability P in SecAgg+'s
  "collect masked vectors" stage, i.e. *after* it received the model and its peers' key
  shares and *before* it sends its masked update. It answers an error reply
  (:data:`DROPPED_OUT`), which is what the server sees in deployment too when a SuperNode
  goes away mid-round (Flower turns messages to a lost node into error replies); SecAgg+
  then removes the vanished device's pairwise masks with its peers' shares. A deployed node
  (no ``partition-id``) never drops: nothing from the server can make it.
- :func:`compact_masked_mod`: SecAgg+ masks values modulo ``mod_range`` (at most 2^32) but
  ships them as int64; this mod re-encodes the masked vector as uint32 on the way out, so
  the upload is 4 bytes per parameter (plus NumPy's per-array header).
  ``server.traffic.TrafficGrid`` widens it back to int64 before Flower's workflow sums it.

- :func:`compliant_poison_mod` / :func:`bypass_poison_mod`: a **simulated** malicious device
  (issue 11; its runner-written settings carry ``attack``, ``attack-strength`` and
  ``attacker``, ``client.faults.simulated_device_attack``) poisons its fit reply, the
  compliant one inside ``adaptiveclipping_mod`` (before the clip), the bypass one between
  ``secaggplus_mod`` and ``adaptiveclipping_mod`` (after the clip, before the quantiser). A
  deployed node never poisons.

The first two are Flower mods for ``@app.train(mods=[...])``, outside ``secaggplus_mod``.
"""

from __future__ import annotations

import functools
import json
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)

from client.faults import poison_fit_reply, simulated_device_attack
from shared_model.settings import PARTITION_ID, simulated_node_settings_path

DROPPED_OUT = 4003
DROPOUT = "dropout"
_random = secrets.SystemRandom()


@functools.lru_cache(maxsize=4096)
def _simulated_dropout(settings_path: str) -> float:
    try:
        value = float(json.loads(Path(settings_path).read_text()).get(DROPOUT, 0.0))
    except (OSError, ValueError, TypeError):
        return 0.0
    return min(max(value, 0.0), 1.0)


def simulated_dropout(context: Context) -> float:
    """P of a simulated device (0 for any deployed node)."""
    pid = context.node_config.get(PARTITION_ID)
    run_dir = context.run_config.get("run-dir")
    if pid is None or not run_dir:
        return 0.0
    return _simulated_dropout(str(simulated_node_settings_path(str(run_dir), int(pid))))


def _stage(msg: Message) -> Any:
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if cfg is None else cfg.get(Key.STAGE)


def dropout_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Vanish (error reply) with the simulated device's probability, after the model arrived."""
    if _stage(msg) == Stage.COLLECT_MASKED_VECTORS:
        p = simulated_dropout(ctxt)
        if p > 0 and _random.random() < p:
            return Message(
                Error(code=DROPPED_OUT, reason="device dropped out mid-round (simulated)"),
                reply_to=msg,
            )
    return call_next(msg, ctxt)  # type: ignore[no-any-return]


def narrow(masked: list[bytes]) -> list[bytes]:
    """int64 arrays with values in [0, 2^32) -> the same values as uint32 arrays."""
    out = []
    for blob in masked:
        arr = bytes_to_ndarray(blob)
        if arr.dtype.kind in "iu" and arr.dtype.itemsize > 4:
            if arr.size and (arr.min() < 0 or arr.max() >= 2**32):
                raise ValueError("masked vector outside [0, 2^32): cannot narrow it")
            arr = arr.astype(np.uint32)
        out.append(ndarray_to_bytes(arr))
    return out


def widen(masked: list[bytes]) -> list[bytes]:
    """uint32 masked arrays back to int64 (what Flower's SecAgg+ workflow sums)."""
    out = []
    for blob in masked:
        arr = bytes_to_ndarray(blob)
        out.append(ndarray_to_bytes(arr.astype(np.int64)) if arr.dtype == np.uint32 else blob)
    return out


def compact_masked_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Send SecAgg+'s masked vector as uint32 (4 bytes per parameter)."""
    reply: Message = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    cfg = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    if cfg is not None and Key.MASKED_PARAMETERS in cfg:
        cfg[Key.MASKED_PARAMETERS] = narrow(list(cfg[Key.MASKED_PARAMETERS]))  # type: ignore[arg-type]
    return reply


def _poison_as(attacker: str, msg: Message, ctxt: Context, call_next: Any) -> Message:
    reply: Message = call_next(msg, ctxt)
    attack = simulated_device_attack(ctxt)
    if attack is None or attack.attacker != attacker:
        return reply
    return poison_fit_reply(msg, reply, attack.poison)  # type: ignore[no-any-return]


def compliant_poison_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """A simulated ``compliant`` attacker poisons its honest reply; placed inside
    ``adaptiveclipping_mod``, so the stock clip still bounds it to C."""
    return _poison_as("compliant", msg, ctxt, call_next)


def bypass_poison_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """A simulated ``bypass`` attacker poisons its *clipped* reply; placed between
    ``secaggplus_mod`` and ``adaptiveclipping_mod``, so only the quantiser bounds it."""
    return _poison_as("bypass", msg, ctxt, call_next)
