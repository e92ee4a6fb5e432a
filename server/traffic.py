"""Bytes per device per round, counted on the messages the ServerApp actually sends/receives.

:class:`TrafficGrid` wraps Flower's ``Grid``: every message sent to a node and every reply
received is measured as the serialized size of its content (each record deflated as Flower
puts it on the wire: array payloads with dtype/shape, config and metric values with their
keys), per node and per round. Message metadata and gRPC/HTTP/TLS framing are not counted.

It also widens the uint32 masked vectors that ``client.device_mods.compact_masked_mod``
sends back to the int64 Flower's SecAgg+ workflow sums (after measuring them).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.device_mods import widen


def message_bytes(msg: Message) -> int:
    """Serialized size of a message's content (0 for an error reply): each record as Flower
    deflates it for the wire (an ArrayRecord plus each of its Arrays: data, dtype, shape)."""
    if msg.has_error():
        return 0
    total = 0
    for record in msg.content.values():
        try:
            total += len(record.deflate())
        except (TypeError, ValueError) as exc:  # a value Flower could not serialize either
            raise ValueError(f"cannot size a {type(record).__name__}: {exc}") from exc
        if isinstance(record, ArrayRecord):
            total += sum(len(array.deflate()) for array in record.values())
    return total


class TrafficGrid:
    """A ``Grid`` that counts bytes per node (delegates everything else)."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.down: dict[int, int] = defaultdict(int)
        self.up: dict[int, int] = defaultdict(int)
        self.masked: dict[int, int] = defaultdict(int)
        self.failed: set[int] = set()
        self.sampled: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            nid = msg.metadata.dst_node_id
            self.sampled.add(nid)
            self.down[nid] += message_bytes(msg)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        answered = set()
        for reply in replies:
            nid = reply.metadata.src_node_id
            answered.add(nid)
            if reply.has_error():
                self.failed.add(nid)
                continue
            self.up[nid] += message_bytes(reply)
            cfg = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if cfg is not None and Key.MASKED_PARAMETERS in cfg:
                blobs = list(cfg[Key.MASKED_PARAMETERS])  # type: ignore[arg-type]
                self.masked[nid] += sum(len(b) for b in blobs)  # type: ignore[arg-type]
                cfg[Key.MASKED_PARAMETERS] = widen(blobs)  # type: ignore[arg-type]
        # A node that never answered (timeout) vanished too.
        self.failed.update(m.metadata.dst_node_id for m in messages
                           if m.metadata.dst_node_id not in answered)
        return replies

    def round_summary(self) -> dict[str, float]:
        """Mean bytes per device that completed the round (and counts); resets the counters.

        ``bytes_up_per_client``/``bytes_down_per_client``: means over the devices that
        answered every message of the round (all four SecAgg+ stages);
        ``bytes_up_model_per_client``: of those, the masked model update alone (the part that
        grows with the model: 4 bytes per parameter plus NumPy's header per array; the rest
        is SecAgg+'s key agreement and secret shares, which grow with ``num_shares``);
        ``clients_sampled``, ``clients_dropped``.
        """
        done = sorted(self.sampled - self.failed)
        out: dict[str, float] = {
            "clients_sampled": len(self.sampled),
            "clients_dropped": len(self.sampled & self.failed),
        }
        if done:
            out["bytes_up_per_client"] = statistics.fmean(self.up[n] for n in done)
            out["bytes_down_per_client"] = statistics.fmean(self.down[n] for n in done)
            out["bytes_up_per_client_max"] = max(self.up[n] for n in done)
            out["bytes_up_model_per_client"] = statistics.fmean(self.masked[n] for n in done)
        self.down.clear()
        self.up.clear()
        self.masked.clear()
        self.failed.clear()
        self.sampled.clear()
        return out
