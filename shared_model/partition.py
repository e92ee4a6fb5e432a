"""Split a click log into federated nodes: one per region, or one per user (device).

Rows keep their original order inside each partition; every row lands in exactly one.
No Flower, no torch here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from shared_model.clicklog import write_click_log


def _partition_by(table: pa.Table, column: str) -> dict[int, pa.Table]:
    keys = table.column(column).to_numpy()
    if len(keys) == 0:
        return {}
    order = np.argsort(keys, kind="stable")
    ordered = table.take(pa.array(order))
    sorted_keys = keys[order]
    uniques, starts = np.unique(sorted_keys, return_index=True)
    ends = np.append(starts[1:], len(sorted_keys))
    return {
        int(k): ordered.slice(int(s), int(e - s))
        for k, s, e in zip(uniques, starts, ends, strict=True)
    }


def partition_regional(table: pa.Table) -> dict[int, pa.Table]:
    """One partition per ``region_id`` (cross-silo: a region's store is a node)."""
    return _partition_by(table, "region_id")


def partition_device(table: pa.Table) -> dict[int, pa.Table]:
    """One partition per ``user_id`` (cross-device: a user's phone is a node)."""
    return _partition_by(table, "user_id")


def write_partitions(
    parts: dict[int, pa.Table], out_dir: str | Path, *, prefix: str = "node"
) -> dict[int, Path]:
    """Write each partition to ``out_dir/{prefix}-{id}/clicks.parquet``; returns the paths."""
    out = Path(out_dir)
    return {
        key: write_click_log(part, out / f"{prefix}-{key}" / "clicks.parquet")
        for key, part in sorted(parts.items())
    }
