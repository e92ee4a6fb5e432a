"""Test hooks for deployment tests: fault injection and outgoing-message recording.

Both are **inert unless the operator sets them** in the SuperNode's node config:

- ``fault = nan | inf | shape | dtype | missing-key | extra-key | huge-norm``: the node's
  train reply carries corrupted arrays (what a broken or malicious node would send), so a
  test can prove the server rejects it (``server.validation``) and the round completes.
- ``record-messages = PATH``: a client mod appends one JSON line per outgoing reply to PATH,
  listing its record types and keys and, for MetricRecords/ConfigRecords, the value types,
  never model values, so a test can prove only model arrays and aggregate metrics leave the
  node (no query text, user ids or click rows).

Production nodes never set these keys; nothing here changes a reply otherwise.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

FAULT = "fault"
RECORD_MESSAGES = "record-messages"
FAULTS = ("nan", "inf", "shape", "dtype", "missing-key", "extra-key", "huge-norm")


def fault_of(node_config: Mapping[str, Any]) -> str | None:
    """The configured fault (``None`` = none); an unknown name is an error."""
    value = node_config.get(FAULT)
    if value in (None, "", "none"):
        return None
    if value not in FAULTS:
        raise ValueError(f"node config {FAULT!r} must be one of {FAULTS}, got {value!r}")
    return str(value)


def corrupt(state: Mapping[str, np.ndarray], fault: str) -> dict[str, np.ndarray]:
    """A corrupted copy of the reply's arrays (keys in their original order)."""
    out = {k: np.array(v, copy=True) for k, v in state.items()}
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
