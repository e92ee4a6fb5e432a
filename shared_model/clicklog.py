"""The click-log Parquet format: one row per shown result of one search session.

Columns (``CLICK_LOG_SCHEMA``): ``session_id`` int64, ``user_id`` int64, ``region_id`` int32,
``timestamp`` int64 (unix seconds), ``query_id`` string, ``product_id`` string, ``rank`` int16
(1-based position shown), ``clicked`` bool, ``exploration`` bool (session came from the
exploration policy). Writes are atomic (temp file + ``os.replace``) and
byte-deterministic for a given table and pyarrow version. No Flower, no torch here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shared_model.schema import DataError

CLICK_LOG_SCHEMA = pa.schema(
    [
        pa.field("session_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("region_id", pa.int32(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False),
        pa.field("clicked", pa.bool_(), nullable=False),
        # True for exploration traffic (random pool items in random order): the sessions a
        # ranker can learn from without the logging ranker's item-selection bias.
        pa.field("exploration", pa.bool_(), nullable=False),
    ]
)

# Fixed writer options so the same table always gives the same bytes.
_WRITE_OPTIONS: dict[str, object] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": True,
    "write_statistics": True,
    "version": "2.6",
    "data_page_version": "1.0",
    "row_group_size": 1 << 20,
}
WRITE_OPTIONS = _WRITE_OPTIONS
"""Parquet writer options of every click log (also for streaming writers)."""


def schema_problems(schema: pa.Schema) -> list[str]:
    """What keeps ``schema`` from being the click-log schema (empty when it is)."""
    expected = {f.name: f.type for f in CLICK_LOG_SCHEMA}
    actual = {f.name: f.type for f in schema}
    problems: list[str] = []
    missing = [name for name in expected if name not in actual]
    extra = [name for name in actual if name not in expected]
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected column(s) {', '.join(extra)}")
    for name, typ in expected.items():
        if name in actual and actual[name] != typ:
            problems.append(f"column {name} has type {actual[name]}, expected {typ}")
    return problems


def _null_problems(table: pa.Table) -> list[str]:
    return [
        f"column {name} has {table.column(name).null_count} null value(s)"
        for name in CLICK_LOG_SCHEMA.names
        if table.column(name).null_count
    ]


def _conform(table: pa.Table) -> pa.Table:
    """Columns in schema order with the schema's (non-null) fields and no metadata."""
    return pa.Table.from_arrays(
        [table.column(name) for name in CLICK_LOG_SCHEMA.names], schema=CLICK_LOG_SCHEMA
    )


def write_click_log(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` to ``path`` as zstd Parquet, atomically; returns the path.

    Raises ``ValueError`` naming the problem when ``table`` does not follow the schema.
    """
    problems = schema_problems(table.schema)
    if not problems:
        problems = _null_problems(table)
    if problems:
        raise ValueError("not a click log: " + "; ".join(problems))
    table = _conform(table)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a click log is an ordinary data file
        pq.write_table(table, tmp, **_WRITE_OPTIONS)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_click_log(path: str | Path) -> pa.Table:
    """Read one click log, checking its schema.

    Raises ``DataError(path, None, ...)`` for a missing file, a file that is not Parquet, and a
    schema that is not the click-log schema (naming missing or extra columns and wrong types).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "click log file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(path, None, f"not a readable Parquet file ({exc})") from exc
    problems = schema_problems(table.schema)
    if not problems:
        problems = _null_problems(table)
    if problems:
        raise DataError(path, None, "not a click log: " + "; ".join(problems))
    return _conform(table)


def read_click_logs(paths: Iterable[str | Path]) -> pa.Table:
    """Read and concatenate several click logs (an empty table when ``paths`` is empty)."""
    tables = [read_click_log(p) for p in paths]
    if not tables:
        return CLICK_LOG_SCHEMA.empty_table()
    return pa.concat_tables(tables)
