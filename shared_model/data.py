"""Read and write judged-search data: the bundled WANDS subset, plain CSVs and the import format.

Three ways in, one way out:

- :func:`load_wands` reads the bundled WANDS subset (``data/wands-pool40``).
- :func:`load_csv` reads a plain CSV with one judgment per row (ESCI / Home Depot style);
  :func:`import_csv` reads the same from a messy real file (``--encoding``,
  ``--on-conflict``), dropping bad rows into a report instead of stopping.
- :func:`load_judged_dir` reads a directory written by :func:`save_judged` (the import
  format, which is the WANDS layout with a numeric ``relevance`` column).

:func:`catalog_hash` is a directory's content hash; the server and every node must agree on
it. Every bad input raises :class:`~shared_model.schema.DataError` naming the file, the 1-based
line (the header is line 1) and the problem with the bad value. Writes are atomic: a failed
:func:`save_judged` leaves nothing behind.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared_model.schema import DataError, JudgedSearchData, Judgment, Product, Query

__all__ = [
    "DEFAULT_WANDS_DIR",
    "ESCI_GRADES",
    "WANDS_GRADES",
    "CsvColumns",
    "load_csv",
    "load_judged_dir",
    "load_wands",
    "save_judged",
    "ON_CONFLICT",
    "catalog_hash",
    "catalog_mismatch",
    "catalog_run_config",
    "IMPORT_REPORT_FILE",
    "ImportResult",
    "check_encoding",
    "import_csv",
]

DEFAULT_WANDS_DIR = Path(__file__).resolve().parents[1] / "data" / "wands-pool40"
"""The bundled 40-query WANDS subset."""

WANDS_GRADES: Mapping[str, float] = {"Exact": 1.0, "Partial": 0.5, "Irrelevant": 0.0}
"""WANDS label -> relevance."""

ESCI_GRADES: Mapping[str, float] = {"E": 1.0, "S": 0.5, "C": 0.2, "I": 0.0}
"""ESCI label (Exact, Substitute, Complement, Irrelevant) -> relevance.

The full words (``Exact``, ``Substitute``, ``Complement``, ``Irrelevant``) are accepted too,
in any letter case.
"""

QUERIES_FILE = "queries.tsv"
PRODUCTS_FILE = "products.tsv"
LABELS_FILE = "labels.tsv"

_QUERY_HEADER = ("query_id", "query", "query_class")
_PRODUCT_HEADER = ("product_id", "product_name", "product_class", "category_hierarchy")
_DESCRIPTION_COLUMN = "product_description"
_LABEL_HEADER = ("query_id", "product_id", "relevance")

_ESCI_WORDS = {"exact": "E", "substitute": "S", "complement": "C", "irrelevant": "I"}


@dataclass(frozen=True)
class CsvColumns:
    """Which CSV columns hold which fields, for :func:`load_csv`.

    Parameters
    ----------
    query
        Column with the query text.
    title
        Column with the product title.
    relevance
        Column with the graded relevance: a number, or an ESCI label (``E``/``S``/``C``/``I``).
    product_id
        Column with the product id. Without it the id is derived from the title
        (``"p"`` + the first 12 hex digits of its SHA-1).
    query_id
        Column with the query id. Without it the id is derived from the query text
        (``"q"`` + the first 12 hex digits of its SHA-1).
    product_class
        Column with the product class, if any.
    category
        Column with the category path (levels joined with ``" / "``), if any.
    description
        Column with the product description, if any.
    """

    query: str
    title: str
    relevance: str
    product_id: str | None = None
    query_id: str | None = None
    product_class: str | None = None
    category: str | None = None
    description: str | None = None


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    """A delimited file's header and rows, each row with the line it starts on."""

    path: Path
    header: tuple[str, ...]
    rows: tuple[tuple[int, dict[str, str]], ...]


def _show(value: str, limit: int = 80) -> str:
    """``repr`` of a value, shortened so an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def check_encoding(encoding: str) -> str:
    """The codec's canonical name, or a ValueError naming an unknown ``encoding``."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}; try utf-8, latin-1 or cp1252") from None


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    """The whole file as text, or a DataError for missing, unreadable, undecodable or empty.

    A decode error names the line, the byte(s) and their offset, and suggests
    ``--encoding latin-1`` (which decodes any byte).
    """
    codec = check_encoding(encoding)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, None, "is a directory, not a file") from None
    except OSError as exc:
        raise DataError(path, None, f"cannot read file: {exc.strerror or exc}") from None
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = raw[exc.start : exc.end].hex(" ")
        name = "UTF-8" if codec == "utf-8" else codec
        raise DataError(
            path,
            line,
            f"not valid {name}: byte(s) {bad} at byte offset {exc.start} (byte {column} of "
            f"line {line}); if the file is Latin-1 or Windows-1252, pass --encoding latin-1",
        ) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DataError(path, None, "empty file")
    return text


def _read_table(
    path: Path,
    delimiter: str,
    required: Sequence[str],
    *,
    encoding: str = "utf-8",
    bad_rows: list[tuple[int, str, str]] | None = None,
) -> _Table:
    """Read a delimited file with a header row into (line, {column: value}) rows.

    With ``bad_rows`` given, a row with the wrong number of fields is appended there as
    ``(line, reason, detail)`` instead of raising.

    Raises
    ------
    DataError
        For a missing/unreadable/empty/non-UTF-8 file, malformed quoting, a duplicated
        column name, a row with the wrong number of fields, a missing required column, or
        a file with a header but no data rows.
    """
    text = _read_text(path, encoding)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    sep = "tab" if delimiter == "\t" else repr(delimiter)
    header: tuple[str, ...] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(path, start, f"malformed quoting: {exc}") from None
        if not fields:  # blank line
            continue
        if header is None:
            header = tuple(f.strip() for f in fields)
            seen: set[str] = set()
            for name in header:
                if name in seen:
                    raise DataError(path, start, f"duplicate column name {_show(name)}")
                seen.add(name)
            continue
        if len(fields) != len(header):
            detail = (
                f"expected {len(header)} {sep}-separated fields, found {len(fields)}: "
                f"{_show(delimiter.join(fields))}"
            )
            if bad_rows is None:
                raise DataError(path, start, detail)
            bad_rows.append((start, "wrong number of fields", detail))
            continue
        rows.append((start, dict(zip(header, fields, strict=True))))
    if header is None:  # only blank lines; _read_text already rejects whitespace-only
        raise DataError(path, None, "empty file")
    for name in required:
        if name not in header:
            raise DataError(
                path,
                None,
                f"missing column {_show(name)}; columns found: {', '.join(map(repr, header))}",
            )
    if not rows and not bad_rows:
        raise DataError(path, None, "no data rows after the header")
    return _Table(path=path, header=header, rows=tuple(rows))


def _need_id(table: _Table, line: int, column: str, value: str) -> str:
    """A stripped, non-empty id, or a DataError."""
    ident = value.strip()
    if not ident:
        raise DataError(table.path, line, f"empty {column}")
    return ident


def _finite(path: Path, line: int, value: str) -> float | None:
    """``float(value)``, ``None`` if it is not a number; DataError for NaN or infinity."""
    try:
        number = float(value)
    except ValueError:
        return None
    if math.isnan(number):
        raise DataError(path, line, f"relevance {_show(value)} is NaN")
    if math.isinf(number):
        raise DataError(path, line, f"relevance {_show(value)} is not finite")
    return number


def _keep_max(
    pairs: Iterable[tuple[str, str, float]],
) -> tuple[Judgment, ...]:
    """One judgment per (query, product): the maximum relevance, in first-seen order."""
    best: dict[tuple[str, str], float] = {}
    for query_id, product_id, relevance in pairs:
        key = (query_id, product_id)
        best[key] = max(best.get(key, relevance), relevance)
    return tuple(Judgment(q, p, r) for (q, p), r in best.items())


def _read_queries(path: Path) -> dict[str, Query]:
    table = _read_table(path, "\t", ("query_id", "query"))
    queries: dict[str, Query] = {}
    first_line: dict[str, int] = {}
    for line, row in table.rows:
        query_id = _need_id(table, line, "query_id", row["query_id"])
        if query_id in queries:
            raise DataError(
                path,
                line,
                f"duplicate query_id {_show(query_id)} (first on line {first_line[query_id]})",
            )
        queries[query_id] = Query(query_id=query_id, text=row["query"])
        first_line[query_id] = line
    return queries


def _read_products(path: Path) -> dict[str, Product]:
    table = _read_table(path, "\t", ("product_id", "product_name"))
    products: dict[str, Product] = {}
    first_line: dict[str, int] = {}
    for line, row in table.rows:
        product_id = _need_id(table, line, "product_id", row["product_id"])
        if product_id in products:
            raise DataError(
                path,
                line,
                f"duplicate product_id {_show(product_id)} (first on line "
                f"{first_line[product_id]})",
            )
        products[product_id] = Product(
            product_id=product_id,
            title=row["product_name"],
            product_class=row.get("product_class", ""),
            category_path=row.get("category_hierarchy", ""),
            description=row.get(_DESCRIPTION_COLUMN, ""),
        )
        first_line[product_id] = line
    return products


def _grade(path: Path, line: int, value: str, *, numeric: bool) -> float:
    """Relevance of a label cell: a WANDS label, or (when ``numeric``) a number in [0, 1]."""
    text = value.strip()
    for label, relevance in WANDS_GRADES.items():
        if text.lower() == label.lower():
            return relevance
    if numeric:
        number = _finite(path, line, text)
        if number is not None:
            if not 0.0 <= number <= 1.0:
                raise DataError(path, line, f"relevance {_show(value)} is outside [0, 1]")
            return number
    expected = ", ".join(WANDS_GRADES) + (" or a number in [0, 1]" if numeric else "")
    raise DataError(path, line, f"relevance {_show(value)} does not parse; expected {expected}")


def _read_dir(directory: Path, *, numeric: bool) -> JudgedSearchData:
    """Shared reader of the WANDS layout; ``numeric`` also allows a numeric relevance."""
    queries = _read_queries(directory / QUERIES_FILE)
    products = _read_products(directory / PRODUCTS_FILE)
    labels_path = directory / LABELS_FILE
    if numeric:
        # Peek at the header to learn which relevance column this file uses.
        table = _read_table(labels_path, "\t", ("query_id", "product_id"))
        column = "relevance" if "relevance" in table.header else "label"
        if column not in table.header:
            raise DataError(
                labels_path,
                None,
                "missing column 'relevance' (or 'label'); columns found: "
                f"{', '.join(map(repr, table.header))}",
            )
    else:
        column = "label"
        table = _read_table(labels_path, "\t", ("query_id", "product_id", column))
    pairs: list[tuple[str, str, float]] = []
    for line, row in table.rows:
        query_id = _need_id(table, line, "query_id", row["query_id"])
        product_id = _need_id(table, line, "product_id", row["product_id"])
        if query_id not in queries:
            raise DataError(
                labels_path, line, f"unknown query_id {_show(query_id)} (not in {QUERIES_FILE})"
            )
        if product_id not in products:
            raise DataError(
                labels_path,
                line,
                f"unknown product_id {_show(product_id)} (not in {PRODUCTS_FILE})",
            )
        pairs.append(
            (query_id, product_id, _grade(labels_path, line, row[column], numeric=numeric))
        )
    return JudgedSearchData(
        queries=queries, products=products, judgments=_keep_max(pairs), source=str(directory)
    )


def load_wands(directory: Path = DEFAULT_WANDS_DIR) -> JudgedSearchData:
    """Load a WANDS-layout directory (``queries.tsv``, ``products.tsv``, ``labels.tsv``).

    Grades map Exact=1.0, Partial=0.5, Irrelevant=0.0. WANDS repeats some (query, product)
    pairs, occasionally with different labels; each pair is kept once, with its
    **maximum** grade, at the position of its first occurrence. ``query_class`` is not kept
    (:class:`~shared_model.schema.Query` has no field for it).

    Parameters
    ----------
    directory
        Folder with the three TSV files; defaults to the bundled ``data/wands-pool40``.

    Returns
    -------
    JudgedSearchData
        For the bundled subset: 40 queries, 6,482 products, 6,890 judgments.

    Raises
    ------
    DataError
        For any bad input, naming file, line and problem.
    """
    return _read_dir(Path(directory), numeric=False)


def load_judged_dir(directory: Path) -> JudgedSearchData:
    """Load a directory in the import format written by :func:`save_judged`.

    Same layout as WANDS, but ``labels.tsv`` may hold either a ``relevance`` column or a
    ``label`` column, and each cell may be a WANDS label (Exact/Partial/Irrelevant) or a
    number in [0, 1]. ``products.tsv`` may carry an extra ``product_description`` column.
    Duplicate (query, product) pairs keep their maximum relevance.

    Raises
    ------
    DataError
        For any bad input, naming file, line and problem.
    """
    return _read_dir(Path(directory), numeric=True)


def _derived_id(prefix: str, text: str) -> str:
    """A stable id for a text: ``prefix`` + the first 12 hex digits of its SHA-1."""
    return prefix + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _esci_label(value: str) -> str | None:
    """The ESCI letter a cell names (``"E"``/``"S"``/``"C"``/``"I"``), or ``None``."""
    text = value.strip()
    if text.upper() in ESCI_GRADES:
        return text.upper()
    return _ESCI_WORDS.get(text.lower())


ON_CONFLICT = ("error", "first", "most-common")
"""Ways to resolve a product or query id whose text differs between rows."""

IMPORT_REPORT_FILE = "import-report.json"
"""The import report written beside an import (see :func:`import_csv`)."""

_CONFLICT_EXAMPLES = 5
_DROPPED_EXAMPLES = 100
_PRODUCT_FIELDS = ("title", "product_class", "category_path", "description")


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_csv` read: the data and its report (JSON-ready)."""

    data: JudgedSearchData
    report: dict[str, object]


class _Variants:
    """Every text one id was given, with the rows that gave it, in first-seen order."""

    def __init__(self) -> None:
        self.by_id: dict[str, dict[object, list[int]]] = {}

    def add(self, ident: str, value: object, line: int) -> None:
        self.by_id.setdefault(ident, {}).setdefault(value, []).append(line)

    def conflicting(self) -> list[str]:
        return [ident for ident, seen in self.by_id.items() if len(seen) > 1]

    def pick(self, ident: str, on_conflict: str) -> object:
        seen = self.by_id[ident]
        if on_conflict == "most-common":
            # Ties go to the first seen (dicts keep insertion order; max keeps the first).
            return max(seen, key=lambda value: len(seen[value]))
        return next(iter(seen))


def _describe_conflict(kind: str, ident: str, seen: Mapping[object, list[int]]) -> str:
    """``product_id '7' has title 'a' on line 9 (1 row) but 'b' on line 2 (3 rows)``."""
    (first, first_lines), (other, other_lines) = list(seen.items())[:2]
    if isinstance(first, Product) and isinstance(other, Product):
        name = next(n for n in _PRODUCT_FIELDS if getattr(first, n) != getattr(other, n))
        first_text, other_text = getattr(first, name), getattr(other, name)
    else:
        name = "query"
        first_text, other_text = str(first), str(other)
    more = f" (+{len(seen) - 2} more variant(s))" if len(seen) > 2 else ""
    return (
        f"{kind} {_show(ident)} has {name} {_show(other_text)} on line {other_lines[0]} "
        f"({len(other_lines)} row(s)) but {_show(first_text)} on line {first_lines[0]} "
        f"({len(first_lines)} row(s)){more}"
    )


def _parse_relevance(value: str) -> tuple[float | str | None, str]:
    """An ESCI letter, a finite number, or ``(None, why)``."""
    label = _esci_label(value)
    if label is not None:
        return label, ""
    try:
        number = float(value.strip())
    except ValueError:
        return None, (
            f"relevance {_show(value)} does not parse; expected a number or an ESCI label "
            "(E, S, C, I)"
        )
    if math.isnan(number):
        return None, f"relevance {_show(value)} is NaN"
    if math.isinf(number):
        return None, f"relevance {_show(value)} is not finite"
    return number, ""


def _parse_csv(
    path: Path,
    columns: CsvColumns,
    *,
    delimiter: str,
    relevance_scale: tuple[float, float] | None,
    encoding: str,
    on_conflict: str,
    strict: bool,
) -> ImportResult:
    """The one CSV reader behind :func:`load_csv` (strict) and :func:`import_csv`."""
    if on_conflict not in ON_CONFLICT:
        raise ValueError(
            f"on_conflict must be one of {', '.join(ON_CONFLICT)}, got {on_conflict!r}"
        )
    if relevance_scale is not None:
        low, high = relevance_scale
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(
                f"relevance_scale must be finite with low < high, got {relevance_scale}"
            )
    optional = [
        columns.product_id,
        columns.query_id,
        columns.product_class,
        columns.category,
        columns.description,
    ]
    required = [columns.query, columns.title, columns.relevance]
    required += [c for c in optional if c is not None]
    dropped: list[tuple[int, str, str]] = []
    table = _read_table(
        path, delimiter, required, encoding=encoding, bad_rows=None if strict else dropped
    )

    def cell(row: dict[str, str], column: str | None) -> str:
        return row[column].strip() if column is not None else ""

    def bad(line: int, reason: str, detail: str) -> None:
        if strict:
            raise DataError(path, line, detail)
        dropped.append((line, reason, detail))

    query_variants = _Variants()
    product_variants = _Variants()
    rows: list[tuple[int, str, str, str, float | str]] = []
    first_kind: tuple[int, str, bool] | None = None  # line, value, is_label
    for line, row in table.rows:
        text = cell(row, columns.query)
        if not text:
            bad(line, "empty query", f"empty query in column {_show(columns.query)}")
            continue
        title = cell(row, columns.title)
        if not title:
            bad(line, "empty title", f"empty product title in column {_show(columns.title)}")
            continue
        if columns.query_id is not None:
            query_id = row[columns.query_id].strip()
            if not query_id:
                bad(line, "empty query id", f"empty {columns.query_id}")
                continue
        else:
            query_id = _derived_id("q", text)
        if columns.product_id is not None:
            product_id = row[columns.product_id].strip()
            if not product_id:
                bad(line, "empty product id", f"empty {columns.product_id}")
                continue
        else:
            product_id = _derived_id("p", title)
        value = row[columns.relevance]
        parsed, why = _parse_relevance(value)
        if parsed is None:
            bad(line, "bad relevance", why)
            continue
        is_label = isinstance(parsed, str)
        if first_kind is None:
            first_kind = (line, value, is_label)
        elif first_kind[2] != is_label:
            what = "an ESCI label" if is_label else "a number"
            other = "an ESCI label" if first_kind[2] else "a number"
            bad(
                line,
                "mixed relevance kinds",
                f"relevance {_show(value)} is {what}, but line {first_kind[0]} has {other} "
                f"({_show(first_kind[1])}); do not mix the two",
            )
            continue
        if relevance_scale is not None and not is_label:
            low, high = relevance_scale
            if not low <= float(parsed) <= high:
                bad(
                    line,
                    "relevance outside scale",
                    f"relevance {_show(value)} is outside the scale [{low:g}, {high:g}]",
                )
                continue
        query_variants.add(query_id, text, line)
        product_variants.add(
            product_id,
            Product(
                product_id=product_id,
                title=title,
                product_class=cell(row, columns.product_class),
                category_path=cell(row, columns.category),
                description=cell(row, columns.description),
            ),
            line,
        )
        rows.append((line, query_id, product_id, value, parsed))

    if not rows:
        first = sorted(dropped)[0]
        raise DataError(
            path,
            None,
            f"no usable rows: all {len(dropped)} row(s) were bad (first: line {first[0]}: "
            f"{first[2]})",
        )

    # Conflicting text for one id: fail listing them all (count and first few), or pick one.
    product_conflicts = product_variants.conflicting()
    query_conflicts = query_variants.conflicting()
    if on_conflict == "error" and (product_conflicts or query_conflicts):
        parts = []
        lines = []
        for kind, variants, conflicts in (
            ("product_id", product_variants, product_conflicts),
            ("query_id", query_variants, query_conflicts),
        ):
            if conflicts:
                parts.append(f"{len(conflicts)} {kind}(s)")
                lines += [
                    (min(ls[0] for ls in list(variants.by_id[i].values())[1:]), kind, i)
                    for i in conflicts
                ]
        lines.sort()
        examples = [
            _describe_conflict(
                kind,
                ident,
                (product_variants if kind == "product_id" else query_variants).by_id[ident],
            )
            for _, kind, ident in lines[:_CONFLICT_EXAMPLES]
        ]
        raise DataError(
            path,
            lines[0][0],
            f"{' and '.join(parts)} have different text on different rows; first "
            f"{len(examples)}: {'; '.join(examples)}. Pass --on-conflict first or "
            "--on-conflict most-common to keep one text per id",
        )
    queries = {
        ident: Query(query_id=ident, text=str(query_variants.pick(ident, on_conflict)))
        for ident in query_variants.by_id
    }
    products: dict[str, Product] = {}
    for ident in product_variants.by_id:
        chosen = product_variants.pick(ident, on_conflict)
        assert isinstance(chosen, Product)
        products[ident] = chosen

    # Relevance into [0, 1].
    assert first_kind is not None
    scale: list[float] | None = None
    if first_kind[2]:
        pairs = [(q, p, ESCI_GRADES[str(v)]) for _, q, p, _, v in rows]
    else:
        if relevance_scale is not None:
            low, high = relevance_scale
        else:
            numbers = [float(v) for *_, v in rows]
            low, high = min(numbers), max(numbers)
            if low == high:
                raise DataError(
                    path,
                    None,
                    f"cannot infer a relevance scale: every relevance is {low:g}; give "
                    "relevance_scale (--relevance-min/--relevance-max)",
                )
        scale = [low, high]
        span = high - low
        pairs = [(q, p, min(1.0, max(0.0, (float(v) - low) / span))) for _, q, p, _, v in rows]
    judgments = _keep_max(pairs)
    data = JudgedSearchData(
        queries=queries, products=products, judgments=judgments, source=str(path)
    )

    def overridden(variants: _Variants, conflicts: list[str]) -> int:
        return sum(
            len(lines_)
            for ident in conflicts
            for value, lines_ in variants.by_id[ident].items()
            if value != variants.pick(ident, on_conflict)
        )

    reasons: dict[str, int] = {}
    for _, reason, _ in sorted(dropped):
        reasons[reason] = reasons.get(reason, 0) + 1
    rows_read = len(table.rows) + sum(1 for d in dropped if d[1] == "wrong number of fields")
    report: dict[str, object] = {
        "source": str(path),
        "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "encoding": check_encoding(encoding),
        "on_conflict": on_conflict,
        "relevance_scale": scale,
        "relevance_kind": "esci-label" if first_kind[2] else "number",
        "rows_read": rows_read,
        "rows_kept": len(rows),
        "rows_dropped": len(dropped),
        "dropped_by_reason": reasons,
        "dropped_rows": [
            {"line": line, "reason": reason, "detail": detail}
            for line, reason, detail in sorted(dropped)[:_DROPPED_EXAMPLES]
        ],
        "rows_merged": {
            "duplicate_pairs": len(rows) - len(judgments),
            "product_text_conflicts": overridden(product_variants, product_conflicts),
            "query_text_conflicts": overridden(query_variants, query_conflicts),
        },
        "conflicts": {
            "product_ids": len(product_conflicts),
            "query_ids": len(query_conflicts),
            "examples": [
                _describe_conflict("product_id", i, product_variants.by_id[i])
                for i in product_conflicts[:_CONFLICT_EXAMPLES]
            ]
            + [
                _describe_conflict("query_id", i, query_variants.by_id[i])
                for i in query_conflicts[:_CONFLICT_EXAMPLES]
            ],
        },
        "queries": len(queries),
        "products": len(products),
        "judgments": len(judgments),
    }
    return ImportResult(data=data, report=report)


def load_csv(
    path: Path,
    columns: CsvColumns,
    *,
    delimiter: str = ",",
    relevance_scale: tuple[float, float] | None = None,
    encoding: str = "utf-8",
    on_conflict: str = "error",
) -> JudgedSearchData:
    """Load a plain CSV with one judgment per row (ESCI / Home Depot style), strictly.

    Relevance is mapped into [0, 1]:

    - numbers are scaled linearly, ``(r - low) / (high - low)``, where ``(low, high)`` is
      ``relevance_scale`` or, when not given, the smallest and largest relevance in the file
      (Home Depot's 1..3 becomes 0..1);
    - ESCI labels map E=1.0, S=0.5, C=0.2, I=0.0 (:data:`ESCI_GRADES`; the full words work
      too, in any case); ``relevance_scale`` is ignored for them. A file must not mix the two.

    All cells are stripped of surrounding whitespace. Without an id column, ids are derived
    from the text: ``"q" + sha1(query)[:12]`` and ``"p" + sha1(title)[:12]`` (hex), so the
    same text always gets the same id. Products and queries repeat across rows; with
    ``on_conflict="error"`` every repeat must agree with the first, ``"first"`` keeps the
    first text seen, ``"most-common"`` the text on most rows (ties: the first seen).
    Duplicate (query, product) pairs keep their maximum relevance. Any bad row raises;
    :func:`import_csv` drops and reports them instead.

    Parameters
    ----------
    path
        The CSV file (header row first).
    columns
        Which columns hold which fields.
    delimiter
        Field separator.
    relevance_scale
        ``(low, high)`` of the numeric relevance, ``low < high``.
    encoding
        The file's text encoding (any Python codec name).
    on_conflict
        ``"error"``, ``"first"`` or ``"most-common"`` (see above).

    Raises
    ------
    DataError
        For any bad input, naming file, line and problem.
    ValueError
        If ``relevance_scale``, ``encoding`` or ``on_conflict`` itself is invalid.
    """
    return _parse_csv(
        Path(path),
        columns,
        delimiter=delimiter,
        relevance_scale=relevance_scale,
        encoding=encoding,
        on_conflict=on_conflict,
        strict=True,
    ).data


def import_csv(
    path: Path,
    columns: CsvColumns,
    *,
    delimiter: str = ",",
    relevance_scale: tuple[float, float] | None = None,
    encoding: str = "utf-8",
    on_conflict: str = "error",
    on_bad_row: str = "drop",
) -> ImportResult:
    """Read a messy judged-search CSV: like :func:`load_csv`, but bad rows are dropped.

    A row is dropped (never silently: the report counts each reason and lists the first
    100 rows with line and detail) when it has the wrong number of fields, an empty query,
    title or id, a relevance that does not parse, is NaN or infinite, lies outside
    ``relevance_scale``, or is of the other kind (ESCI label vs number) than the file's
    first relevance. Whole-file problems (missing file or column, undecodable bytes, no
    usable row, conflicting text under ``on_conflict="error"``) still raise.

    The report (JSON-ready; :func:`save_judged` writes it as ``import-report.json``) has
    ``rows_read`` = ``rows_kept`` + ``rows_dropped``, ``dropped_by_reason``,
    ``dropped_rows``, ``rows_merged`` (rows folded into an earlier judgment of the same
    pair, and rows whose product/query text lost a conflict), ``conflicts`` (how many ids,
    first examples) and the output counts (``judgments`` = ``rows_kept`` -
    ``rows_merged.duplicate_pairs``). ``on_bad_row="error"`` raises at the first bad row
    instead, as :func:`load_csv` does.
    """
    if on_bad_row not in ("drop", "error"):
        raise ValueError(f"on_bad_row must be drop or error, got {on_bad_row!r}")
    return _parse_csv(
        Path(path),
        columns,
        delimiter=delimiter,
        relevance_scale=relevance_scale,
        encoding=encoding,
        on_conflict=on_conflict,
        strict=on_bad_row == "error",
    )


# --------------------------------------------------------------------------------------
# Content hash
# --------------------------------------------------------------------------------------


def catalog_hash(directory: Path) -> str:
    """The content hash of a judged-search directory: ``sha256:`` + 64 hex digits.

    SHA-256 over ``queries.tsv``, ``products.tsv`` and ``labels.tsv`` in that order, each as
    its name, its byte length and its bytes (other files, such as ``import-report.json``,
    do not count). Two folders with byte-identical files have the same hash wherever they
    are; the server and every node must hold the same catalog.

    Raises
    ------
    DataError
        If a file is missing or unreadable, naming it.
    """
    digest = hashlib.sha256()
    for name in (QUERIES_FILE, PRODUCTS_FILE, LABELS_FILE):
        path = Path(directory) / name
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise DataError(path, None, "file not found") from None
        except OSError as exc:
            raise DataError(path, None, f"cannot read file: {exc.strerror or exc}") from None
        digest.update(f"{name}\0{len(raw)}\0".encode())
        digest.update(raw)
    return "sha256:" + digest.hexdigest()


def catalog_mismatch(directory: Path, expected: str) -> str:
    """``""`` when ``directory``'s :func:`catalog_hash` is ``expected`` (or nothing is
    expected), else a one-line reason naming both hashes. The reason goes to the server: it
    names no path and no file content."""
    if not expected:
        return ""
    try:
        actual = catalog_hash(directory)
    except DataError as exc:
        return f"this node's catalog cannot be hashed ({exc.problem}); the run uses {expected}"
    if actual == expected:
        return ""
    return (
        f"catalog hash mismatch: this node's catalog is {actual}, the server's run uses "
        f"{expected}; give the node the same imported catalog"
    )


def catalog_run_config(directory: Path | None) -> dict[str, str]:
    """Run-config keys for a judged-search directory: its absolute path and content hash.

    ``{}`` for ``None`` (the bundled WANDS data). The whole catalog is loaded first, so a
    bad one fails here with a :class:`DataError` naming file and line.
    """
    if directory is None:
        return {}
    folder = Path(directory).resolve()
    load_judged_dir(folder)
    return {"catalog-dir": str(folder), "catalog-hash": catalog_hash(folder)}


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _write_tsv(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Write one TSV in the WANDS style: UTF-8, tab-separated, ``"``-quoting only if needed."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())


def save_judged(
    data: JudgedSearchData, directory: Path, *, report: Mapping[str, object] | None = None
) -> Path:
    """Write ``data`` as the import format, readable by :func:`load_judged_dir`.

    Files (UTF-8, tab-separated, header row, values that hold a tab, newline or ``"`` in
    CSV quoting as in WANDS):

    - ``queries.tsv``: ``query_id``, ``query``, ``query_class`` (always empty);
    - ``products.tsv``: ``product_id``, ``product_name``, ``product_class``,
      ``category_hierarchy``, plus ``product_description`` when any product has one;
    - ``labels.tsv``: ``query_id``, ``product_id``, ``relevance`` (a float, ``repr``).

    The files are written into a temporary folder beside ``directory`` and renamed into
    place at the end; an existing ``directory`` is replaced only after everything was
    written. On failure nothing new is left behind and an existing ``directory`` is kept.

    Parameters
    ----------
    data
        What to write.
    directory
        Target folder; its parent is created if missing.
    report
        An import report (:func:`import_csv`), written as ``import-report.json`` in the
        same atomic step, with the written catalog's ``catalog_hash`` added.

    Returns
    -------
    Path
        ``directory``.
    """
    target = Path(directory).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_tsv(
            temp / QUERIES_FILE,
            _QUERY_HEADER,
            ((q.query_id, q.text, "") for q in data.queries.values()),
        )
        with_description = any(p.description for p in data.products.values())
        product_header = _PRODUCT_HEADER + ((_DESCRIPTION_COLUMN,) if with_description else ())
        product_rows = (
            (p.product_id, p.title, p.product_class, p.category_path)
            + ((p.description,) if with_description else ())
            for p in data.products.values()
        )
        _write_tsv(temp / PRODUCTS_FILE, product_header, product_rows)
        _write_tsv(
            temp / LABELS_FILE,
            _LABEL_HEADER,
            ((j.query_id, j.product_id, repr(float(j.relevance))) for j in data.judgments),
        )
        if report is not None:
            report = {**report, "catalog_hash": catalog_hash(temp)}
            report_path = temp / IMPORT_REPORT_FILE
            report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _move_into_place(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return Path(directory)


def _move_into_place(temp: Path, target: Path) -> None:
    """Rename ``temp`` to ``target``, swapping out an existing ``target`` last."""
    if not target.exists():
        os.replace(temp, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(temp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
