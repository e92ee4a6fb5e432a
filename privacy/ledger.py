"""Append-only, hash-chained JSONL ledger of privacy events.

Each line of the ledger is one record in canonical JSON
(``json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)``) with the event's
fields plus:

``seq``
    0-based position in the chain.
``timestamp``
    ISO-8601 UTC time of the append (``2026-01-01T12:00:00.000000+00:00``).
``prev_hash``
    sha256 hex of the canonical JSON of the previous record (including its ``hash``);
    ``"0" * 64`` for the first record.
``hash``
    sha256 hex of the canonical JSON of this record without the ``hash`` field.

Editing a line breaks its ``hash``; deleting, inserting or swapping lines breaks ``seq`` and
``prev_hash``. Truncating the *end* of the file cannot be seen from the file alone: keep the last
hash (:attr:`Ledger.head_hash`) elsewhere and pass it as ``expected_head_hash`` to
:func:`verify_chain`.

Non-finite floats
-----------------
JSON has no infinity. Every non-finite float in an event (e.g. ``epsilon_after`` of a
non-private run) is written as the string ``"inf"``, ``"-inf"`` or ``"nan"``;
:meth:`LedgerEvent.from_dict` and :func:`read_ledger` turn them back into floats.

Appends take an exclusive ``fcntl.flock`` on the file and re-read the tail under it, so several
processes can append to one ledger without forking the chain. Nothing is ever rewritten.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "GENESIS_HASH",
    "MECHANISMS",
    "NEIGHBOURINGS",
    "RESERVED_FIELDS",
    "SAMPLINGS",
    "UNITS_OF_PRIVACY",
    "ChainProblem",
    "Ledger",
    "LedgerError",
    "LedgerEvent",
    "canonical_json",
    "read_ledger",
    "record_hash",
    "verify_chain",
]

GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first record."""

MECHANISMS = ("dp-sgd", "client-level-gaussian", "count-release", "refusal")
"""Allowed values of :attr:`LedgerEvent.mechanism`."""

UNITS_OF_PRIVACY = ("user", "client")
"""Allowed values of :attr:`LedgerEvent.unit_of_privacy`."""

SAMPLINGS = ("poisson", "without-replacement")
"""Allowed values of :attr:`LedgerEvent.sampling`."""

NEIGHBOURINGS = ("add-remove", "replace-one")
"""Allowed values of :attr:`LedgerEvent.neighbouring`."""

RESERVED_FIELDS = ("seq", "prev_hash", "hash", "timestamp")
"""Fields the ledger adds; an event may not carry them."""

_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_FLOAT_FIELDS = (
    "noise_multiplier",
    "sample_rate",
    "clip_norm",
    "delta",
    "epsilon_after",
)


class LedgerError(RuntimeError):
    """The ledger file cannot be continued (its last line is unreadable)."""


# --------------------------------------------------------------------------------------------
# canonical form
# --------------------------------------------------------------------------------------------
def encode_nonfinite(value: Any) -> Any:
    """``value`` with non-finite floats as ``"inf"``/``"-inf"``/``"nan"`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): encode_nonfinite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_nonfinite(v) for v in value]
    return value


def _decode_float(value: Any) -> Any:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    return value


def canonical_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, strict (no NaN/Infinity literals).

    Parameters
    ----------
    obj : Any
        A JSON-serialisable object (non-finite floats must already be encoded as strings).

    Returns
    -------
    str
        ``json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)``.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``record`` without its ``hash`` field.

    Parameters
    ----------
    record : mapping
        A ledger record.

    Returns
    -------
    str
        64 hex characters.
    """
    return _sha256(canonical_json({k: v for k, v in record.items() if k != "hash"}))


def _link_hash(record: Mapping[str, Any]) -> str:
    """The ``prev_hash`` a successor of ``record`` must carry."""
    return _sha256(canonical_json(dict(record)))


# --------------------------------------------------------------------------------------------
# events
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LedgerEvent:
    """One privacy event, as written to the ledger.

    Parameters
    ----------
    node : str
        Node (region) id, or ``"server"`` for server-side client-level DP.
    round : int
        Federated round, ``>= 0``.
    mechanism : {"dp-sgd", "client-level-gaussian", "refusal"}
        ``"dp-sgd"``: Opacus DP-SGD on a node; ``"client-level-gaussian"``: server/client-side
        clipping plus Gaussian noise on updates; ``"refusal"``: a round not run because it would
        exceed the budget (its parameters are the planned ones, ``steps`` may be 0).
    unit_of_privacy : {"user", "client"}
        What one neighbouring-dataset change adds or removes.
    noise_multiplier : float
        Noise standard deviation over clipping norm.
    sample_rate : float
        Poisson sampling rate.
    steps : int
        Noisy steps in this event.
    clip_norm : float
        Clipping norm (the initial one for adaptive clipping).
    delta : float
        Target delta.
    accountant : str
        Accountant that computed ``epsilon_after`` (e.g. ``"rdp"``, ``"prv"``, ``"flwr-rdp"``).
    epsilon_after : float
        Cumulative epsilon after this event (``math.inf`` allowed; written as ``"inf"``).
    detail : str or None
        Free text.
    sampling : {"poisson", "without-replacement"} or None
        How the event's participants were sampled (stated by client-level events; DP-SGD
        events are Poisson-sampled). Omitted when ``None``.
    neighbouring : {"add-remove", "replace-one"} or None
        The neighbouring relation the ε is stated under. Omitted when ``None``.

    Raises
    ------
    ValueError
        On an unknown mechanism / unit of privacy or a negative round/steps, naming the value.
    """

    node: str
    round: int
    mechanism: str
    unit_of_privacy: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    accountant: str
    epsilon_after: float
    detail: str | None = None
    sampling: str | None = None
    neighbouring: str | None = None

    def __post_init__(self) -> None:
        if self.sampling is not None and self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.neighbouring is not None and self.neighbouring not in NEIGHBOURINGS:
            raise ValueError(
                f"neighbouring must be one of {NEIGHBOURINGS}, got {self.neighbouring!r}"
            )
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if self.unit_of_privacy not in UNITS_OF_PRIVACY:
            raise ValueError(
                f"unit_of_privacy must be one of {UNITS_OF_PRIVACY}, got {self.unit_of_privacy!r}"
            )
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ValueError(f"round must be an integer >= 0, got round={self.round!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got steps={self.steps!r}")
        if not isinstance(self.node, str) or not self.node:
            raise ValueError(f"node must be a non-empty string, got node={self.node!r}")

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-safe dict (non-finite floats as ``"inf"``/``"-inf"``/``"nan"``).

        Returns
        -------
        dict
            One key per field; ``detail`` is omitted when ``None``.
        """
        data = dataclasses.asdict(self)
        for optional in ("detail", "sampling", "neighbouring"):
            if data[optional] is None:
                del data[optional]
        return encode_nonfinite(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEvent:
        """Build an event from :meth:`to_dict` output or a ledger record (extra keys ignored).

        Parameters
        ----------
        data : mapping
            The fields.

        Returns
        -------
        LedgerEvent
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in _FLOAT_FIELDS:
            if key in kwargs:
                kwargs[key] = _decode_float(kwargs[key])
        return cls(**kwargs)


@dataclass(frozen=True)
class ChainProblem:
    """A problem found by :func:`verify_chain`.

    Parameters
    ----------
    file : str
        The ledger path.
    line : int
        1-based line number (0 for a problem with the file as a whole).
    problem : str
        What is wrong.
    """

    file: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.problem}"


# --------------------------------------------------------------------------------------------
# the ledger
# --------------------------------------------------------------------------------------------
def _read_last_line(handle: BinaryIO) -> bytes | None:
    """The last non-empty line of a binary file (without newline), or None when empty."""
    handle.seek(0, os.SEEK_END)
    end = handle.tell()
    if end == 0:
        return None
    block = 4096
    pos = end
    data = b""
    while pos > 0:
        read = min(block, pos)
        pos -= read
        handle.seek(pos)
        data = handle.read(read) + data
        stripped = data.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    stripped = data.rstrip(b"\n")
    return stripped or None


class Ledger:
    """Append-only hash-chained JSONL ledger.

    Opening an existing ledger continues its chain from its last line. Only :meth:`append`
    writes, always at the end (``flush`` + ``fsync`` per record).

    Parameters
    ----------
    path : pathlib.Path
        The ledger file (created with its parent folder on first append).

    Raises
    ------
    LedgerError
        If the existing file's last line is not a valid record (the chain cannot be continued).
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._head: dict[str, Any] | None = None
        if self._path.exists():
            with open(self._path, "rb") as handle:
                self._head = self._parse_tail(_read_last_line(handle))

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    @property
    def head_hash(self) -> str:
        """``hash`` of the last record (``GENESIS_HASH`` when empty), as of the last append/open."""
        return GENESIS_HASH if self._head is None else str(self._head["hash"])

    @property
    def next_seq(self) -> int:
        """``seq`` the next record will get, as of the last append/open."""
        return 0 if self._head is None else int(self._head["seq"]) + 1

    def _parse_tail(self, line: bytes | None) -> dict[str, Any] | None:
        if line is None:
            return None
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise LedgerError(
                f"cannot continue ledger {self._path}: last line is not valid JSON ({exc})"
            ) from exc
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("seq"), int)
            or not isinstance(record.get("hash"), str)
        ):
            raise LedgerError(
                f"cannot continue ledger {self._path}: last line has no integer 'seq' / 'hash'"
            )
        if record_hash(record) != record["hash"]:
            raise LedgerError(
                f"cannot continue ledger {self._path}: last line's hash does not match its content"
            )
        return record

    def append(self, event: Mapping[str, Any] | LedgerEvent) -> dict[str, Any]:
        """Append one event as a new record.

        Parameters
        ----------
        event : mapping or LedgerEvent
            The event fields (JSON-serialisable; non-finite floats are encoded as strings).
            It may not contain ``seq``, ``prev_hash``, ``hash`` or ``timestamp``.

        Returns
        -------
        dict
            The record written, with ``seq``, ``prev_hash``, ``timestamp`` and ``hash``.

        Raises
        ------
        ValueError
            If the event carries a reserved field or is not JSON-serialisable.
        LedgerError
            If the file's last line is not a valid record.
        """
        fields = event.to_dict() if isinstance(event, LedgerEvent) else dict(event)
        clash = sorted(set(fields) & set(RESERVED_FIELDS))
        if clash:
            raise ValueError(f"event may not contain the reserved field(s) {clash}")
        fields = encode_nonfinite(fields)
        with self._lock:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            created = not self._path.exists()
            with open(self._path, "a+b") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                try:
                    head = self._parse_tail(_read_last_line(handle))
                    record = dict(fields)
                    record["seq"] = 0 if head is None else int(head["seq"]) + 1
                    record["prev_hash"] = GENESIS_HASH if head is None else _link_hash(head)
                    record["timestamp"] = _dt.datetime.now(_dt.UTC).isoformat(
                        timespec="microseconds"
                    )
                    record["hash"] = record_hash(record)
                    line = canonical_json(record) + "\n"
                    handle.seek(0, os.SEEK_END)
                    handle.write(line.encode("utf-8"))
                    handle.flush()
                    os.fsync(handle.fileno())
                finally:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            if created:
                fsync_dir(self._path.parent)
            self._head = record
        return dict(record)


def fsync_dir(directory: Path) -> None:
    """fsync a folder so a rename inside it survives a crash (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# reading and verification
# --------------------------------------------------------------------------------------------
def read_ledger(path: Path) -> list[dict[str, Any]]:
    """All records of a ledger, with ``"inf"``/``"-inf"``/``"nan"`` in float fields decoded.

    Does not verify the chain (use :func:`verify_chain`).

    Parameters
    ----------
    path : pathlib.Path
        The ledger file.

    Returns
    -------
    list of dict
        One dict per non-empty line.

    Raises
    ------
    ValueError
        If a line is not valid JSON.
    """
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                for key in _FLOAT_FIELDS:
                    if key in record:
                        record[key] = _decode_float(record[key])
                records.append(record)
    return records


def verify_chain(path: Path, *, expected_head_hash: str | None = None) -> list[ChainProblem]:
    """Check a ledger's hash chain.

    Detects edited lines (``hash`` mismatch), deleted, inserted or swapped lines (``seq`` and
    ``prev_hash`` mismatches), unparseable lines and, when ``expected_head_hash`` is given, a
    truncated or extended end.

    Parameters
    ----------
    path : pathlib.Path
        The ledger file.
    expected_head_hash : str, optional
        ``hash`` the last record must have (kept elsewhere, e.g. :attr:`Ledger.head_hash`).

    Returns
    -------
    list of ChainProblem
        Empty when the chain is intact (an empty file is an intact, empty chain).
    """
    file = str(path)
    problems: list[ChainProblem] = []
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return [ChainProblem(file, 0, "ledger file not found")]
    except OSError as exc:
        return [ChainProblem(file, 0, f"cannot read ledger: {exc}")]

    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last record
    elif lines:
        problems.append(
            ChainProblem(file, len(lines), "last line has no trailing newline (partial write?)")
        )

    prev: dict[str, Any] | None = None  # previous parseable record (None after a broken line)
    last: dict[str, Any] | None = None
    for number, raw_line in enumerate(lines, start=1):
        try:
            record = json.loads(raw_line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            what = "empty line" if not raw_line.strip() else f"unparseable JSON ({exc})"
            problems.append(ChainProblem(file, number, what))
            prev, last = None, None
            continue
        if not isinstance(record, dict):
            problems.append(ChainProblem(file, number, "record is not a JSON object"))
            prev, last = None, None
            continue
        missing = [k for k in ("seq", "prev_hash", "hash") if k not in record]
        if missing:
            problems.append(ChainProblem(file, number, f"missing field(s) {missing}"))
            prev, last = None, None
            continue

        if record_hash(record) != record["hash"]:
            problems.append(
                ChainProblem(
                    file, number, "hash mismatch: the record's content was edited after writing"
                )
            )

        seq = record["seq"]
        expected_seq: int | None
        expected_prev: str | None
        if number == 1:
            expected_seq, expected_prev = 0, GENESIS_HASH
        elif prev is not None:
            expected_seq, expected_prev = int(prev["seq"]) + 1, _link_hash(prev)
        else:
            expected_seq, expected_prev = None, None  # after an unparseable line: resync
        if expected_seq is not None and seq != expected_seq:
            problems.append(
                ChainProblem(
                    file,
                    number,
                    f"seq gap: expected seq {expected_seq}, found {seq!r} "
                    "(a line was deleted, inserted or moved)",
                )
            )
        if expected_prev is not None and record["prev_hash"] != expected_prev:
            problems.append(
                ChainProblem(
                    file,
                    number,
                    "prev_hash mismatch: the previous line is not this record's predecessor "
                    "(a line was deleted, inserted, moved or edited)",
                )
            )
        prev, last = record, record

    if expected_head_hash is not None:
        head = GENESIS_HASH if not lines else (None if last is None else last.get("hash"))
        if head != expected_head_hash:
            problems.append(
                ChainProblem(
                    file,
                    len(lines),
                    f"head hash {head!r} != expected {expected_head_hash!r} "
                    "(the ledger was truncated, extended or replaced)",
                )
            )
    return sorted(problems, key=lambda p: p.line)
