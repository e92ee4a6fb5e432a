"""Device shape at scale: simulated drop-outs, the uint32 masked upload, bytes per device."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, RecordDict
from flwr.common import Array, bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client import device_mods
from server.device import secagg_shares, trainable_parameters
from server.traffic import TrafficGrid, message_bytes


def _msg(content: RecordDict, *, dst: int = 7, src: int = 0) -> Message:
    metadata = Metadata(
        run_id=1, message_id=f"m{dst}", src_node_id=src, dst_node_id=dst,
        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
        message_type="train",
    )
    return Message(content, metadata=metadata)  # type: ignore[call-overload]


def _context(node_config: dict[str, Any], run_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=run_config)


def _stage(stage: str) -> RecordDict:
    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage})})


def test_masked_vector_travels_as_uint32_and_sums_like_int64() -> None:
    rng = np.random.default_rng(0)
    vectors = [rng.integers(0, 2**32, size=(16,), dtype=np.int64) for _ in range(5)]
    narrowed = [device_mods.narrow([ndarray_to_bytes(v)])[0] for v in vectors]
    assert all(bytes_to_ndarray(b).dtype == np.uint32 for b in narrowed)
    pairs = zip(narrowed, vectors, strict=True)
    assert all(len(n) < len(ndarray_to_bytes(v)) - 60 for n, v in pairs)
    widened = [bytes_to_ndarray(device_mods.widen([b])[0]) for b in narrowed]
    total = sum(widened) & (2**32 - 1)
    assert np.array_equal(total, sum(vectors) & (2**32 - 1))
    with pytest.raises(ValueError):
        device_mods.narrow([ndarray_to_bytes(np.array([-1], np.int64))])


def test_compact_masked_mod_rewrites_only_the_masked_vector() -> None:
    masked = np.arange(16, dtype=np.int64)

    def call_next(msg: Message, ctxt: Context) -> Message:
        cfg = ConfigRecord({Key.MASKED_PARAMETERS: [ndarray_to_bytes(masked)]})
        return Message(RecordDict({RECORD_KEY_CONFIGS: cfg}), reply_to=msg)

    msg = _msg(_stage(Stage.COLLECT_MASKED_VECTORS))
    reply = device_mods.compact_masked_mod(msg, _context({}, {}), call_next)
    blob = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS][0]
    arr = bytes_to_ndarray(blob)  # type: ignore[arg-type]
    assert arr.dtype == np.uint32 and np.array_equal(arr, masked)


def test_simulated_device_drops_after_receiving_the_model(tmp_path: Path) -> None:
    settings = tmp_path / "nodes" / "node-3" / "node-settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"dropout": 0.999999}))
    ran: list[str] = []

    def call_next(msg: Message, ctxt: Context) -> Message:
        ran.append("trained")
        return Message(RecordDict(), reply_to=msg)

    sim = _context({"partition-id": 3}, {"run-dir": str(tmp_path)})
    # Stage 0/1 (no model yet): never drops.
    device_mods.dropout_mod(_msg(_stage(Stage.SETUP)), sim, call_next)
    reply = device_mods.dropout_mod(_msg(_stage(Stage.COLLECT_MASKED_VECTORS)), sim, call_next)
    assert reply.has_error() and reply.error.code == device_mods.DROPPED_OUT
    assert ran == ["trained"]
    # A deployed node (no partition-id) never drops, whatever the run config says.
    deployed = _context({"node-name": "x"}, {"run-dir": str(tmp_path)})
    reply = device_mods.dropout_mod(
        _msg(_stage(Stage.COLLECT_MASKED_VECTORS)), deployed, call_next)
    assert not reply.has_error()


class _FakeGrid:
    def __init__(self, drop: set[int]) -> None:
        self.drop = drop
        self.run = "the-run"

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        out = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            if nid in self.drop:
                reply = Message(Error(code=4003, reason="gone"), reply_to=msg)
            else:
                cfg = ConfigRecord({Key.MASKED_PARAMETERS: device_mods.narrow(
                    [ndarray_to_bytes(np.arange(16, dtype=np.int64))])})
                reply = Message(RecordDict({RECORD_KEY_CONFIGS: cfg}), reply_to=msg)
            out.append(reply)
        return out


def test_traffic_grid_counts_bytes_per_completed_device_and_widens() -> None:
    grid = TrafficGrid(_FakeGrid(drop={2}))
    assert grid.run == "the-run"  # everything else is delegated
    model = RecordDict({"fitins.parameters": ArrayRecord(
        {"0": Array(np.zeros(16, np.float32))})})
    replies = list(grid.send_and_receive([_msg(model, dst=n) for n in (1, 2, 3)]))
    ok = [r for r in replies if not r.has_error()]
    blob = ok[0].content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS][0]
    assert bytes_to_ndarray(blob).dtype == np.int64  # type: ignore[arg-type]
    summary = grid.round_summary()
    assert summary["clients_sampled"] == 3 and summary["clients_dropped"] == 1
    down = message_bytes(_msg(model))
    assert summary["bytes_down_per_client"] == down
    # 16 parameters as uint32: 64 bytes of payload plus a fixed NumPy/record framing.
    assert 64 < summary["bytes_up_per_client"] < 64 + 300
    assert grid.round_summary()["clients_sampled"] == 0  # reset


def test_secagg_share_graph_survives_thirty_percent_dropouts() -> None:
    from scipy.stats import binom

    assert secagg_shares(50) == (41, 14)
    assert secagg_shares(30) == (29, 8)
    assert secagg_shares(2) == (1, 1)
    for sampled in (30, 50, 200):
        shares, threshold = secagg_shares(sampled)
        assert shares % 2 == 1 and 2 <= threshold < shares
        # P(a device keeps fewer than `threshold` live share holders | 30% vanish) is tiny.
        assert binom.cdf(threshold - 1, shares, 0.7) <= 1e-6


def test_trainable_parameters_counts_the_head() -> None:
    assert trainable_parameters({"a": np.zeros((1, 4)), "b": np.zeros(1)}) == 5
