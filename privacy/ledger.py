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

Signed lines
------------
A hash chain has no key: anyone can rebuild a valid one. A ledger opened with a
:class:`LedgerSigner` (``Ledger(path, signer=node_signer(state_dir))``) also writes, on every
line:

``key_id``
    :func:`key_fingerprint` of the writer's Ed25519 public key (covered by ``hash``).
``signature``
    base64 Ed25519 signature of the canonical JSON of the record without ``signature``
    (so it covers ``hash``, ``prev_hash`` and ``key_id``). ``hash`` never covers it.

and publishes the public key beside the ledger as ``keys/<ledger stem>.pub`` (PEM; an existing
different key there is an error: one ledger, one writer). :func:`verify_signatures` checks the
lines against a public key, preferably one the auditor pinned out of band
(``fedrank audit verify RUN_DIR --trusted-keys DIR``): a key published in the run directory
proves only that the lines were written by whoever holds it. The private key lives in its own
0700 folder, created 0600 with ``O_EXCL`` and permission-checked whenever it is reused
(:meth:`LedgerSigner.load_or_create`; :func:`node_signer`, :func:`server_signer`).

Non-finite floats
-----------------
JSON has no infinity. Every non-finite float in an event (e.g. ``epsilon_after`` of a
non-private run) is written as the string ``"inf"``, ``"-inf"`` or ``"nan"``;
:meth:`LedgerEvent.from_dict` and :func:`read_ledger` turn them back into floats.

Appends take an exclusive ``fcntl.flock`` on the file and re-read the tail under it, so several
processes can append to one ledger without forking the chain. Nothing is ever rewritten.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import stat
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "GENESIS_HASH",
    "KEYS_DIR",
    "MECHANISMS",
    "NEIGHBOURINGS",
    "RESERVED_FIELDS",
    "SAMPLINGS",
    "UNITS_OF_PRIVACY",
    "ChainProblem",
    "Ledger",
    "LedgerError",
    "LedgerEvent",
    "LedgerKeyError",
    "LedgerSigner",
    "canonical_json",
    "key_fingerprint",
    "load_public_key",
    "node_signer",
    "published_key_path",
    "read_ledger",
    "record_hash",
    "server_signer",
    "verify_chain",
    "verify_signatures",
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

RESERVED_FIELDS = ("seq", "prev_hash", "hash", "timestamp", "key_id", "signature")
"""Fields the ledger adds; an event may not carry them."""

KEYS_DIR = "keys"
"""Folder beside a ledger where its writer's public key is published (``<stem>.pub``)."""

_UNSIGNED_FIELDS = ("hash", "signature")

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


class LedgerKeyError(RuntimeError):
    """A ledger signing key cannot be created, read or trusted (path and reason named)."""


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
    """sha256 hex of the canonical JSON of ``record`` without its ``hash`` and ``signature``.

    Parameters
    ----------
    record : mapping
        A ledger record.

    Returns
    -------
    str
        64 hex characters.
    """
    return _sha256(canonical_json({k: v for k, v in record.items() if k not in _UNSIGNED_FIELDS}))


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
    mechanism : {"dp-sgd", "client-level-gaussian", "count-release", "refusal"}
        ``"dp-sgd"``: Opacus DP-SGD on a node; ``"client-level-gaussian"``: server/client-side
        clipping plus Gaussian noise on updates; ``"count-release"``: a node's one-shot Gaussian
        release of its users' clipped click counts (q=1, one step; ``client.evidence_release``);
        ``"refusal"``: a round not run because it would
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
# signing keys
# --------------------------------------------------------------------------------------------
def key_fingerprint(public_key: Any) -> str:
    """sha256 hex of an Ed25519 public key's 32 raw bytes (the ``key_id`` on signed lines)."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _public_pem(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def load_public_key(path: Path) -> Any:
    """An Ed25519 public key from a PEM file.

    Raises
    ------
    LedgerKeyError
        If the file is missing, not PEM or not an Ed25519 public key (path named).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise LedgerKeyError(f"{path}: public key not found") from None
    except (OSError, ValueError) as exc:
        raise LedgerKeyError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerKeyError(f"{path}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def published_key_path(ledger_path: Path) -> Path:
    """Where the writer of ``ledger_path`` publishes its public key: ``keys/<stem>.pub``."""
    ledger_path = Path(ledger_path)
    return ledger_path.parent / KEYS_DIR / f"{ledger_path.stem}.pub"


def _check_private(path: Path, st: os.stat_result, what: str) -> None:
    """Owned by us and closed to group and others, else :class:`LedgerKeyError`."""
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise LedgerKeyError(
            f"{path}: {what} is owned by uid {st.st_uid}, not by this process (uid "
            f"{os.geteuid()}); refusing to use it"
        )
    if st.st_mode & 0o077:
        raise LedgerKeyError(
            f"{path}: {what} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be "
            "readable or writable by group or others (0700 folder, 0600 key)"
        )


class LedgerSigner:
    """The Ed25519 key that signs a writer's ledger lines.

    Parameters
    ----------
    private_key : Ed25519PrivateKey
        The signing key (``cryptography``).
    path : pathlib.Path, optional
        The key file it was read from (for messages).
    """

    def __init__(self, private_key: Any, *, path: Path | None = None) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if not isinstance(private_key, Ed25519PrivateKey):
            raise LedgerKeyError(
                f"ledger lines are signed with Ed25519, got {type(private_key).__name__}"
            )
        self._key = private_key
        self.path = path
        self.public_key = private_key.public_key()
        self.key_id = key_fingerprint(self.public_key)

    @classmethod
    def generate(cls) -> LedgerSigner:
        """A fresh in-memory key (tests; production keys live in a file)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, key_path: Path) -> LedgerSigner:
        """The key at ``key_path``, created on first use.

        The folder is created 0700; the key (PKCS#8 PEM) is written to a temporary file opened
        with ``O_CREAT | O_EXCL`` mode 0600 and hard-linked into place, so concurrent first
        uses agree on one key and an existing key is never overwritten. A reused key and its
        folder must be owned by this user and closed to group and others; the key file must be
        a regular file (not a symlink).

        Raises
        ------
        LedgerKeyError
            On loose permissions, a foreign owner, a symlink or an unreadable key.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key_path = Path(key_path)
        folder = key_path.parent
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder_stat = os.stat(folder)
        except OSError as exc:
            raise LedgerKeyError(f"{folder}: cannot create the key folder ({exc})") from None
        _check_private(folder, folder_stat, "the key folder")
        if not os.path.lexists(key_path):
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            tmp = folder / f".{key_path.name}.{uuid.uuid4().hex}.tmp"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(tmp, flags, 0o600)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(pem)
                    handle.flush()
                    os.fsync(handle.fileno())
                try:
                    os.link(tmp, key_path)  # atomic; fails if another process won the race
                except FileExistsError:
                    pass
                else:
                    fsync_dir(folder)
            finally:
                tmp.unlink(missing_ok=True)
        return cls._load(key_path)

    @classmethod
    def _load(cls, key_path: Path) -> LedgerSigner:
        from cryptography.hazmat.primitives import serialization

        try:
            fd = os.open(key_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise LedgerKeyError(f"{key_path}: cannot open the ledger key ({exc})") from None
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise LedgerKeyError(f"{key_path}: the ledger key is not a regular file")
            _check_private(key_path, st, "the ledger key")
            data = handle.read()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise LedgerKeyError(
                f"{key_path}: not an unencrypted PEM private key ({type(exc).__name__})"
            ) from None
        return cls(key, path=key_path)

    def sign(self, message: bytes) -> str:
        """base64 Ed25519 signature of ``message``."""
        return base64.b64encode(self._key.sign(message)).decode("ascii")

    def public_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM."""
        return _public_pem(self.public_key)

    def publish(self, path: Path) -> Path:
        """Write the public key to ``path`` (0644), or check the one already there.

        Raises
        ------
        LedgerKeyError
            If ``path`` holds a different key (one ledger has one writer).
        """
        path = Path(path)
        pem = self.public_pem()
        if path.exists():
            if key_fingerprint(load_public_key(path)) != self.key_id:
                raise LedgerKeyError(
                    f"{path} holds another writer's key (key_id "
                    f"{key_fingerprint(load_public_key(path))[:16]}…, this key "
                    f"{self.key_id[:16]}…): refusing to sign into a ledger another key writes"
                )
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(pem)
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
        except FileExistsError:
            tmp.unlink(missing_ok=True)
            return self.publish(path)  # lost a race: check the winner's key
        tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return path


NODE_KEY_FILE = Path("ledger-key") / "ed25519.pem"
"""A node's ledger key, relative to its state folder (see :func:`node_signer`)."""
SERVER_KEY_FILE = "ledger-ed25519.pem"
"""The server's ledger key file inside its key folder (see :func:`server_signer`)."""


def node_signer(state_dir: Path) -> LedgerSigner:
    """A node's ledger signer: ``STATE_DIR/ledger-key/ed25519.pem`` (0700 folder, 0600 key).

    Use as ``Ledger(node.ledger_dir / f"{node.name}.jsonl", signer=node_signer(node.state_dir))``.
    """
    return LedgerSigner.load_or_create(Path(state_dir) / NODE_KEY_FILE)


def server_signer(key_dir: Path) -> LedgerSigner:
    """The server's ledger signer: ``KEY_DIR/ledger-ed25519.pem``.

    ``key_dir`` must be (or become) a folder of its own, 0700, e.g. the server's state
    folder; use as ``Ledger(run_dir / "ledger" / "server.jsonl", signer=server_signer(d))``.
    """
    return LedgerSigner.load_or_create(Path(key_dir) / SERVER_KEY_FILE)


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
    signer : LedgerSigner, optional
        Signs every appended line (``key_id``, ``signature``) and publishes its public key as
        :func:`published_key_path`. Without one, lines are unsigned (``fedrank audit verify``
        fails them unless told ``--allow-unsigned``).

    Raises
    ------
    LedgerError
        If the existing file's last line is not a valid record (the chain cannot be continued).
    LedgerKeyError
        If another key is already published for this ledger.
    """

    def __init__(self, path: Path, *, signer: LedgerSigner | None = None) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._head: dict[str, Any] | None = None
        self._signer = signer
        if signer is not None:
            signer.publish(published_key_path(self._path))
        if self._path.exists():
            with open(self._path, "rb") as handle:
                self._head = self._parse_tail(_read_last_line(handle))

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    @property
    def signer(self) -> LedgerSigner | None:
        """The key signing appended lines (``None``: unsigned)."""
        return self._signer

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
                    if self._signer is not None:
                        record["key_id"] = self._signer.key_id
                    record["hash"] = record_hash(record)
                    if self._signer is not None:
                        record["signature"] = self._signer.sign(
                            canonical_json(record).encode("utf-8")
                        )
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


def verify_signatures(
    path: Path, public_key: Any | None, *, require_signed: bool = True, key_source: str = ""
) -> list[ChainProblem]:
    """Check every line's Ed25519 signature against the writer's public key.

    Parameters
    ----------
    path : pathlib.Path
        The ledger file.
    public_key : Ed25519PublicKey or None
        The key the writer signs with (pinned by the auditor, or published beside the ledger).
        ``None``: no key is known, so every signed line is a problem.
    require_signed : bool
        Whether a line without ``signature``/``key_id`` is a problem (default: yes).
    key_source : str
        Where the key came from, for messages.

    Returns
    -------
    list of ChainProblem
        One per unsigned line (when required), line signed by another key, or bad signature.
        Unparseable lines are left to :func:`verify_chain`.
    """
    from cryptography.exceptions import InvalidSignature

    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        return [ChainProblem(file, 0, f"cannot read ledger: {exc}")]
    expected_id = None if public_key is None else key_fingerprint(public_key)
    where = f" ({key_source})" if key_source else ""
    problems: list[ChainProblem] = []
    for number, raw_line in enumerate(raw.split(b"\n"), start=1):
        if not raw_line.strip():
            continue
        try:
            record = json.loads(raw_line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        if not isinstance(record, dict):
            continue
        signature, key_id = record.get("signature"), record.get("key_id")
        if signature is None and key_id is None:
            if require_signed:
                problems.append(
                    ChainProblem(
                        file, number, "unsigned line: no signature/key_id (anyone can write it)"
                    )
                )
            continue
        if not isinstance(signature, str) or not isinstance(key_id, str):
            problems.append(ChainProblem(file, number, "malformed signature or key_id"))
            continue
        if expected_id is None or public_key is None:
            problems.append(
                ChainProblem(
                    file,
                    number,
                    f"signed by key {key_id[:16]}… but no public key is known for this "
                    f"writer{where}",
                )
            )
            continue
        if key_id != expected_id:
            problems.append(
                ChainProblem(
                    file,
                    number,
                    f"signed by key {key_id[:16]}…, not by the writer's key "
                    f"{expected_id[:16]}…{where}",
                )
            )
            continue
        message = canonical_json({k: v for k, v in record.items() if k != "signature"})
        try:
            public_key.verify(base64.b64decode(signature, validate=True), message.encode("utf-8"))
        except (InvalidSignature, ValueError):
            problems.append(
                ChainProblem(
                    file,
                    number,
                    f"bad signature: the line was not signed by key {key_id[:16]}…{where} "
                    "(edited or forged)",
                )
            )
    return problems
