"""Convert a node operator's real click log into the click-log Parquet format, in batches.

Input: one row per result shown in a search, as CSV (header row, one row per line), JSON
Lines (one object per line) or Parquet. Columns, by default name (each can be renamed):

==============  =======================================================================
``user``        who searched: any string (a number up to 18 digits is kept, other text
                becomes a stable 63-bit id: the first 8 bytes of its BLAKE2b hash)
``session``     one search: any string, mapped like ``user``. Optional: without the column
                each (user, query, timestamp) is one session
``query``       a ``query_id`` of the catalog, or else a query text of the catalog
``product``     a ``product_id`` of the catalog
``position``    the 1-based rank the product was shown at (1..32767)
``clicked``     1/0, true/false, yes/no, t/f, y/n (any letter case)
``timestamp``   unix seconds (a fraction is dropped) or ISO 8601 (``2024-05-01T12:00:00Z``,
                ``2024-05-01 12:00:00+02:00``; no offset = UTC)
``region``      optional integer region id; without the column every row gets ``region``
                (default 0)
``exploration`` optional boolean (as ``clicked``): the row comes from exploration traffic
                (random results in random order); without the column, false
==============  =======================================================================

Each bad row goes to a quarantine CSV (``line``, ``reason``, then the row's raw cells) and is
counted by reason: a row that does not parse (wrong number of fields, invalid JSON), an
empty required cell, an unknown query or product, a rank that is not an integer in
1..32767, a ``clicked`` that is not a boolean, an unparsable timestamp, a bad region, or a
duplicate (a second row for the same session and rank). Every other row is kept, so
``rows_in = rows_kept + rows_quarantined``. Blank lines are counted apart.

The input is read in batches of ``batch_rows`` rows and written batch by batch, so memory
stays bounded by the batch size, the catalog and 8 bytes per kept row (a sorted array of
session/rank keys, used to find duplicates; see :func:`_row_keys`). Output, quarantine and
report are written to temporary files beside their targets and renamed into place at the
end: a failure leaves nothing behind.
No Flower, no torch here.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import itertools
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shared_model.clicklog import CLICK_LOG_SCHEMA, WRITE_OPTIONS
from shared_model.data import load_judged_dir
from shared_model.schema import DataError, JudgedSearchData

__all__ = ["ClickColumns", "FORMATS", "import_click_log"]

FORMATS = ("csv", "jsonl", "parquet")
"""Input formats :func:`import_click_log` reads."""

_TRUE = ["1", "true", "t", "yes", "y"]
_FALSE = ["0", "false", "f", "no", "n"]
_INT_ID = r"^-?[0-9]{1,18}$"
_MAX_EXAMPLES = 20
# The click log's writer options, less the row-group size (each batch is its own row group).
_WRITER_OPTIONS: dict[str, object] = {
    k: v for k, v in WRITE_OPTIONS.items() if k != "row_group_size"
}


@dataclass(frozen=True)
class ClickColumns:
    """Input column names (see the module docstring for what each holds)."""

    user: str = "user"
    session: str = "session"
    query: str = "query"
    product: str = "product"
    rank: str = "position"
    clicked: str = "clicked"
    timestamp: str = "timestamp"
    region: str = "region"
    exploration: str = "exploration"

    def required(self) -> list[str]:
        return [self.user, self.query, self.product, self.rank, self.clicked, self.timestamp]


@dataclass
class _Batch:
    """String columns of some input rows and the line (CSV/JSONL) or row number of each."""

    table: pa.Table
    lines: np.ndarray
    bad: list[tuple[int, str, dict[str, str]]] = field(default_factory=list)
    blank: int = 0


# --------------------------------------------------------------------------------------
# Reading in batches, every cell as a string
# --------------------------------------------------------------------------------------


def _decode(path: Path, raw: bytes, codec: str, first_line: int) -> str:
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        line = first_line + raw.count(b"\n", 0, exc.start)
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        name = "UTF-8" if codec == "utf-8" else codec
        bad = raw[exc.start : exc.end].hex(" ")
        raise DataError(
            path,
            line,
            f"not valid {name}: byte(s) {bad} at byte {column} "
            f"of line {line}; if the file is Latin-1 or Windows-1252, pass --encoding latin-1",
        ) from None


def _header(path: Path, handle: io.BufferedReader, codec: str, delimiter: str) -> list[str]:
    first = handle.readline()
    if not first.strip():
        raise DataError(path, 1, "empty file or empty header line")
    text = _decode(path, first, codec, 1).removeprefix("\ufeff")
    header = next(csv.reader([text], delimiter=delimiter))
    names = [name.strip() for name in header]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise DataError(path, 1, f"duplicate column name(s) {', '.join(map(repr, duplicated))}")
    return names


def _csv_batches(
    path: Path, codec: str, delimiter: str, batch_rows: int
) -> tuple[list[str], Iterator[_Batch]]:
    handle = path.open("rb")
    try:
        names = _header(path, handle, codec, delimiter)
    except BaseException:
        handle.close()
        raise
    header_buffer = io.StringIO()
    csv.writer(header_buffer, delimiter=delimiter, lineterminator="\n").writerow(names)
    header_line = header_buffer.getvalue()  # quoted as needed, one line
    types = {name: pa.string() for name in names}

    def batches() -> Iterator[_Batch]:
        with handle:
            start = 2
            while True:
                chunk = list(itertools.islice(handle, batch_rows))
                if not chunk:
                    return
                text = _decode(path, b"".join(chunk), codec, start)
                invalid: list[tuple[int, str]] = []

                def on_invalid(row: pacsv.InvalidRow, into: list[tuple[int, str]] = invalid) -> str:
                    into.append((row.number, row.text))
                    return "skip"

                table = pacsv.read_csv(
                    io.BytesIO((header_line + text).encode("utf-8")),
                    read_options=pacsv.ReadOptions(use_threads=False),
                    parse_options=pacsv.ParseOptions(
                        delimiter=delimiter,
                        ignore_empty_lines=False,
                        invalid_row_handler=on_invalid,
                    ),
                    convert_options=pacsv.ConvertOptions(
                        column_types=types,
                        strings_can_be_null=False,
                        quoted_strings_can_be_null=False,
                    ),
                )
                # Lines of this chunk as file lines; the chunk's own line 2 is file line `start`.
                bad_lines = {start + number - 2 for number, _ in invalid}
                lines = np.array(
                    [n for n in range(start, start + len(chunk)) if n not in bad_lines],
                    dtype=np.int64,
                )
                bad = [
                    (
                        start + number - 2,
                        f"malformed row: expected {len(names)} fields",
                        {"raw": row_text},
                    )
                    for number, row_text in invalid
                ]
                start += len(chunk)
                yield _Batch(table=table, lines=lines, bad=bad)

    return names, batches()


def _jsonl_batches(path: Path, codec: str, batch_rows: int) -> tuple[list[str], Iterator[_Batch]]:
    """The keys of the first JSON object are the columns; a later row without one is ""."""
    wanted: list[str] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            text = _decode(path, raw, codec, number).removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                first = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(first, dict):
                wanted = [str(key) for key in first]
                break
    if not wanted:
        raise DataError(path, None, "no JSON object found (empty file, or no line is an object)")

    def batches() -> Iterator[_Batch]:
        with path.open("rb") as handle:
            start = 1
            while True:
                chunk = list(itertools.islice(handle, batch_rows))
                if not chunk:
                    return
                text = _decode(path, b"".join(chunk), codec, start).removeprefix("\ufeff")
                rows: dict[str, list[str]] = {name: [] for name in wanted}
                lines: list[int] = []
                bad: list[tuple[int, str, dict[str, str]]] = []
                blank = 0
                for offset, line_text in enumerate(text.splitlines()):
                    line = start + offset
                    if not line_text.strip():
                        blank += 1
                        continue
                    try:
                        obj = json.loads(line_text)
                    except json.JSONDecodeError as exc:
                        bad.append((line, f"invalid JSON: {exc.msg}", {"raw": line_text}))
                        continue
                    if not isinstance(obj, dict):
                        bad.append((line, "not a JSON object", {"raw": line_text}))
                        continue
                    for name in wanted:
                        value = obj.get(name)
                        rows[name].append(
                            ""
                            if value is None
                            else value
                            if isinstance(value, str)
                            else json.dumps(value)
                        )
                    lines.append(line)
                start += len(chunk)
                table = pa.table(
                    {name: pa.array(values, pa.string()) for name, values in rows.items()}
                )
                yield _Batch(
                    table=table, lines=np.array(lines, dtype=np.int64), bad=bad, blank=blank
                )

    return wanted, batches()


def _parquet_batches(path: Path, batch_rows: int) -> tuple[list[str], Iterator[_Batch]]:
    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(path, None, f"not a readable Parquet file ({exc})") from None
    names = list(reader.schema_arrow.names)

    def batches() -> Iterator[_Batch]:
        start = 1
        for batch in reader.iter_batches(batch_size=batch_rows):
            columns = {}
            for name in batch.schema.names:
                column = batch.column(name)
                if pa.types.is_timestamp(column.type):
                    column = pc.cast(pc.cast(column, pa.timestamp("s", tz="UTC")), pa.int64())
                text = pc.cast(column, pa.string())
                columns[name] = pc.fill_null(text, "")
            lines = np.arange(start, start + batch.num_rows, dtype=np.int64)
            start += batch.num_rows
            yield _Batch(table=pa.table(columns), lines=lines)

    return names, batches()


# --------------------------------------------------------------------------------------
# Converting one batch
# --------------------------------------------------------------------------------------


def _stable_id(text: str) -> int:
    """A 63-bit id for a text id (BLAKE2b, first 8 bytes)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _ids(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """int64 ids: numbers (up to 18 digits) as they are, any other text hashed."""
    numeric = pc.match_substring_regex(column, _INT_ID).to_numpy(zero_copy_only=False)
    out = np.zeros(len(column), dtype=np.int64)
    if numeric.any():
        out[numeric] = pc.cast(pc.filter(column, pa.array(numeric)), pa.int64()).to_numpy()
    if not numeric.all():
        texts = pc.filter(column, pa.array(~numeric)).to_pylist()
        out[~numeric] = np.array([_stable_id(t) for t in texts], dtype=np.int64)
    return out


def _row_keys(session: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """One uint64 per (session, rank), for finding duplicate rows.

    Exact (``session << 15 | rank``) for session ids in 0..2**48-1; other ids (negative,
    large, or hashed from text) are mixed into keys with the top bit set, where two different
    pairs share a key with probability about 2**-63, as two text ids share a hashed id.
    """
    s = session.astype(np.int64)
    r = rank.astype(np.uint64)
    small = (s >= 0) & (s < 2**48)
    keys = np.empty(len(s), dtype=np.uint64)
    keys[small] = (s[small].astype(np.uint64) << np.uint64(15)) | r[small]
    if not small.all():
        with np.errstate(over="ignore"):
            z = s[~small].view(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + r[~small]
            z ^= z >> np.uint64(31)
            z *= np.uint64(0xBF58476D1CE4E5B9)
            z ^= z >> np.uint64(29)
        keys[~small] = z | np.uint64(1 << 63)
    return keys


def _booleans(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(value, ok) arrays for a column of boolean words."""
    lower = pc.utf8_lower(column)
    true = pc.is_in(lower, value_set=pa.array(_TRUE)).to_numpy(zero_copy_only=False)
    false = pc.is_in(lower, value_set=pa.array(_FALSE)).to_numpy(zero_copy_only=False)
    return true, true | false


def _parse_time(text: str) -> int | None:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return math.floor(moment.timestamp())


def _timestamps(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(unix seconds, ok) for unix-second numbers or ISO 8601 texts."""
    numeric = pc.match_substring_regex(column, r"^-?[0-9]{1,12}(\.[0-9]*)?$").to_numpy(
        zero_copy_only=False
    )
    out = np.zeros(len(column), dtype=np.int64)
    ok = numeric.copy()
    if numeric.any():
        seconds = pc.cast(pc.filter(column, pa.array(numeric)), pa.float64()).to_numpy()
        out[numeric] = np.floor(seconds).astype(np.int64)
    if not numeric.all():
        rest = np.flatnonzero(~numeric)
        cache: dict[str, int | None] = {}
        for index, text in zip(rest, pc.take(column, pa.array(rest)).to_pylist(), strict=True):
            if text not in cache:
                cache[text] = _parse_time(text)
            value = cache[text]
            if value is not None:
                out[index] = value
                ok[index] = True
    return out, ok


@dataclass
class _Converter:
    path: Path
    catalog: JudgedSearchData
    columns: ClickColumns
    names: list[str]
    region: int
    seen: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    reasons: dict[str, int] = field(default_factory=dict)
    clicks: int = 0

    def __post_init__(self) -> None:
        missing = [c for c in self.columns.required() if c not in self.names]
        if missing:
            raise DataError(
                self.path,
                None,
                f"missing column(s) {', '.join(map(repr, missing))}; columns found: "
                f"{', '.join(map(repr, self.names))} (rename with --query-col, --product-col, ...)",
            )
        self.has_session = self.columns.session in self.names
        self.has_region = self.columns.region in self.names
        self.has_exploration = self.columns.exploration in self.names
        self.query_ids = pa.array(list(self.catalog.queries), pa.string())
        self.query_texts = pa.array([q.text for q in self.catalog.queries.values()], pa.string())
        self.product_ids = pa.array(list(self.catalog.products), pa.string())

    def convert(self, batch: _Batch) -> tuple[pa.Table, list[tuple[int, str, dict[str, str]]]]:
        table = batch.table
        n = table.num_rows
        cols = self.columns
        cell = {name: pc.utf8_trim_whitespace(table.column(name)) for name in table.column_names}
        reason = np.full(n, None, dtype=object)

        def flag(bad: np.ndarray, why: str | np.ndarray) -> None:
            new = bad & (reason == None)  # noqa: E711 (element-wise)
            reason[new] = why if isinstance(why, str) else why[new]

        for name in cols.required() + ([cols.session] if self.has_session else []):
            empty = pc.equal(cell[name], "").to_numpy(zero_copy_only=False)
            flag(empty, f"empty {name}")

        query = cell[cols.query]
        by_id = pc.is_in(query, value_set=self.query_ids).to_numpy(zero_copy_only=False)
        text_index = pc.index_in(query, value_set=self.query_texts)
        by_text = pc.is_valid(text_index).to_numpy(zero_copy_only=False) & ~by_id
        flag(~(by_id | by_text), "unknown query")
        query_id = np.asarray(query.to_pylist(), dtype=object)
        if by_text.any():
            found = pc.take(self.query_ids, pc.fill_null(text_index, 0)).to_numpy(
                zero_copy_only=False
            )
            query_id[by_text] = found[by_text]

        product = cell[cols.product]
        known = pc.is_in(product, value_set=self.product_ids).to_numpy(zero_copy_only=False)
        flag(~known, "unknown product")

        rank_ok = pc.match_substring_regex(cell[cols.rank], r"^[0-9]{1,9}$").to_numpy(
            zero_copy_only=False
        )
        rank = np.zeros(n, dtype=np.int64)
        if rank_ok.any():
            rank[rank_ok] = pc.cast(
                pc.filter(cell[cols.rank], pa.array(rank_ok)), pa.int64()
            ).to_numpy()
        flag(~rank_ok | (rank < 1) | (rank > 32767), "rank is not an integer in 1..32767")

        clicked, clicked_ok = _booleans(cell[cols.clicked])
        flag(~clicked_ok, "clicked is not a boolean (1/0, true/false, yes/no)")

        timestamp, time_ok = _timestamps(cell[cols.timestamp])
        flag(~time_ok, "unparsable timestamp")

        if self.has_region:
            region_ok = pc.match_substring_regex(cell[cols.region], r"^[0-9]{1,9}$").to_numpy(
                zero_copy_only=False
            )
            region = np.full(n, self.region, dtype=np.int64)
            if region_ok.any():
                region[region_ok] = pc.cast(
                    pc.filter(cell[cols.region], pa.array(region_ok)), pa.int64()
                ).to_numpy()
            flag(~region_ok | (region > 2**31 - 1), "region is not an integer in 0..2147483647")
        else:
            region = np.full(n, self.region, dtype=np.int64)

        if self.has_exploration:
            exploration, exploration_ok = _booleans(cell[cols.exploration])
            flag(~exploration_ok, "exploration is not a boolean")
        else:
            exploration = np.zeros(n, dtype=bool)

        user = _ids(cell[cols.user])
        if self.has_session:
            session = _ids(cell[cols.session])
        else:
            keys = pc.binary_join_element_wise(cell[cols.user], query, cell[cols.timestamp], "\x1f")
            session = _ids(pc.binary_join_element_wise("s\x1f", keys, ""))

        # Duplicates: a second row for one (session, rank), in this batch or an earlier one.
        good = np.flatnonzero(reason == None)  # noqa: E711
        if len(good):
            keys = _row_keys(session[good], rank[good])
            unique, first = np.unique(keys, return_index=True)
            repeat = np.ones(len(good), dtype=bool)
            repeat[first] = False
            if len(self.seen):
                position = np.searchsorted(self.seen, keys)
                repeat |= self.seen[np.minimum(position, len(self.seen) - 1)] == keys
            dup = np.zeros(n, dtype=bool)
            dup[good[repeat]] = True
            flag(dup, "duplicate: another row has the same session and rank")
            # Merge the new keys into the sorted array: O(seen + batch), no re-sort.
            new_keys = unique
            if len(self.seen):
                new_keys = new_keys[
                    self.seen[np.minimum(np.searchsorted(self.seen, new_keys), len(self.seen) - 1)]
                    != new_keys
                ]
            self.seen = np.insert(self.seen, np.searchsorted(self.seen, new_keys), new_keys)

        keep = reason == None  # noqa: E711
        kept = pa.Table.from_arrays(
            [
                pa.array(session[keep], pa.int64()),
                pa.array(user[keep], pa.int64()),
                pa.array(region[keep], pa.int32()),
                pa.array(timestamp[keep], pa.int64()),
                pa.array(query_id[keep], pa.string()),
                pc.filter(product, pa.array(keep)).combine_chunks()
                if isinstance(product, pa.ChunkedArray)
                else pc.filter(product, pa.array(keep)),
                pa.array(rank[keep], pa.int16()),
                pa.array(clicked[keep], pa.bool_()),
                pa.array(exploration[keep], pa.bool_()),
            ],
            schema=CLICK_LOG_SCHEMA,
        )
        self.clicks += int(clicked[keep].sum())
        bad_rows = np.flatnonzero(~keep)
        raw = table.take(pa.array(bad_rows)).to_pylist() if len(bad_rows) else []
        quarantined = [
            (int(batch.lines[i]), str(reason[i]), {k: str(v) for k, v in row.items()})
            for i, row in zip(bad_rows, raw, strict=True)
        ]
        return kept, quarantined


# --------------------------------------------------------------------------------------
# The import
# --------------------------------------------------------------------------------------


def _temp_beside(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(name, 0o644)
    return Path(name)


def import_click_log(
    source: Path,
    catalog: Path | JudgedSearchData,
    out: Path,
    *,
    fmt: str | None = None,
    columns: ClickColumns | None = None,
    region: int = 0,
    encoding: str = "utf-8",
    delimiter: str = ",",
    batch_rows: int = 100_000,
    quarantine: Path | None = None,
    report: Path | None = None,
) -> dict[str, object]:
    """Convert ``source`` into a click-log Parquet file at ``out``, batch by batch.

    Parameters
    ----------
    source
        The operator's log: CSV, JSON Lines or Parquet (see the module docstring).
    catalog
        The imported judged-search directory (or its loaded data) the log's queries and
        products must be in.
    out
        The click-log Parquet file to write.
    fmt
        ``"csv"``, ``"jsonl"`` or ``"parquet"``; default from the file name's suffix
        (``.jsonl``/``.ndjson`` = jsonl, ``.parquet``/``.pq`` = parquet, else csv).
    columns
        Input column names.
    region
        Region id of every row when the input has no region column.
    encoding, delimiter
        Of a CSV or JSON Lines input.
    batch_rows
        Rows read, checked and written at a time.
    quarantine
        The bad rows' CSV; default ``OUT`` with suffix ``.quarantine.csv``.
    report
        The JSON report; default ``OUT`` with suffix ``.report.json``.

    Returns
    -------
    dict
        The report: ``rows_in``, ``rows_kept``, ``rows_quarantined``, ``quarantine_file``,
        ``quarantined_by_reason``, ``quarantine_examples``, ``blank_lines``, ``output``,
        ``clicks``, ``batches``, ``defaults`` (which optional columns were absent).

    Raises
    ------
    DataError
        For a whole-file problem: missing file, undecodable bytes (naming line and byte),
        missing column, unreadable Parquet, bad catalog.
    ValueError
        For bad arguments (format, encoding, batch size, region).
    """
    source, out = Path(source), Path(out)
    columns = columns or ClickColumns()
    if fmt is None:
        suffix = source.suffix.lower()
        fmt = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}.get(
            suffix, "csv"
        )
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}; try utf-8, latin-1 or cp1252") from None
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    if not 0 <= region <= 2**31 - 1:
        raise ValueError(f"region must be in 0..2147483647, got {region}")
    if len(delimiter) != 1:
        raise ValueError(f"delimiter must be one character, got {delimiter!r}")
    if not source.is_file():
        raise DataError(source, None, "file not found" if not source.exists() else "not a file")
    if out.is_dir():
        raise ValueError(
            f"output {out} is a directory; give a file such as {out / 'clicks.parquet'}"
        )
    data = catalog if isinstance(catalog, JudgedSearchData) else load_judged_dir(Path(catalog))
    quarantine = quarantine or out.with_suffix(".quarantine.csv")
    report_path = report or out.with_suffix(".report.json")
    if len({out.absolute(), quarantine.absolute(), report_path.absolute(), source.absolute()}) < 4:
        raise ValueError("source, output, quarantine and report must be four different files")

    if fmt == "csv":
        names, batches = _csv_batches(source, codec, delimiter, batch_rows)
    elif fmt == "jsonl":
        names, batches = _jsonl_batches(source, codec, batch_rows)
    else:
        names, batches = _parquet_batches(source, batch_rows)
    converter = _Converter(source, data, columns, names, region)

    temps = [_temp_beside(out), _temp_beside(quarantine), _temp_beside(report_path)]
    rows_in = kept_rows = quarantined_rows = blank = 0
    examples: list[dict[str, object]] = []
    batch_count = 0
    try:
        with (
            pq.ParquetWriter(temps[0], CLICK_LOG_SCHEMA, **_WRITER_OPTIONS) as writer,
            temps[1].open("w", encoding="utf-8", newline="") as bad_file,
        ):
            bad_writer = csv.writer(bad_file, lineterminator="\n")
            bad_writer.writerow(["line", "reason", *names])
            for batch in batches:
                batch_count += 1
                blank += batch.blank
                if fmt == "csv":
                    empty_rows = (
                        np.all(
                            [
                                pc.equal(batch.table.column(c), "").to_numpy(zero_copy_only=False)
                                for c in names
                            ],
                            axis=0,
                        )
                        if batch.table.num_rows
                        else np.zeros(0, dtype=bool)
                    )
                    if empty_rows.any():
                        blank += int(empty_rows.sum())
                        batch = _Batch(
                            table=batch.table.filter(pa.array(~empty_rows)),
                            lines=batch.lines[~empty_rows],
                            bad=batch.bad,
                        )
                kept, bad = converter.convert(batch) if batch.table.num_rows else (None, [])
                if kept is not None and kept.num_rows:
                    writer.write_table(kept)
                    kept_rows += kept.num_rows
                everything = sorted(batch.bad + bad, key=lambda item: item[0])
                for line, why, row in everything:
                    key = why.split(":")[0]
                    converter.reasons[key] = converter.reasons.get(key, 0) + 1
                    cells = (
                        [row.get("raw", "")] if "raw" in row else [row.get(n, "") for n in names]
                    )
                    bad_writer.writerow([line, why, *cells])
                    if len(examples) < _MAX_EXAMPLES:
                        examples.append({"line": line, "reason": why})
                quarantined_rows += len(everything)
                rows_in += batch.table.num_rows + len(batch.bad)
        result: dict[str, object] = {
            "source": str(source),
            "format": fmt,
            "rows_in": rows_in,
            "rows_kept": kept_rows,
            "rows_quarantined": quarantined_rows,
            "quarantine_file": str(quarantine),
            "quarantined_by_reason": dict(sorted(converter.reasons.items())),
            "quarantine_examples": examples,
            "blank_lines": blank,
            "output": str(out),
            "clicks": converter.clicks,
            "batches": batch_count,
            "batch_rows": batch_rows,
            "defaults": {
                "session": None
                if converter.has_session
                else "one session per (user, query, timestamp)",
                "region": None if converter.has_region else region,
                "exploration": None if converter.has_exploration else False,
            },
        }
        temps[2].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        for temp, target in zip(temps, (out, quarantine, report_path), strict=True):
            os.replace(temp, target)
    except BaseException:
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise
    return result
