"""A node's click inbox: Parquet files that land in its data folder, consumed once each.

Online learning (run config ``online = true``): a node's click log grows. New Parquet files
land anywhere under its data folder (e.g. ``node-K/clicks.parquet`` at the start, then
``node-K/inbox/*.parquet``); each round trains on the files that arrived since the node's
last round (plus, optionally, a bounded replay buffer of the last few files it consumed).

Arrival order
    Files sort by name, then modification time, then relative path. Name first keeps the
    order reproducible when files are copied (mtimes change, names do not); writers that
    want a strict order name files ``round-NNNN-*.parquet`` or with a timestamp prefix.

Simulation clock
    A file named ``round-NNNN-<anything>.parquet`` is *available from round NNNN*: the inbox
    lists it only when asked about a round >= NNNN. Simulations pre-write the traffic of
    later rounds this way (Flower gives the runner no hook between rounds); a file without
    that prefix is available from round 0. Deployments simply drop files as they arrive.

Bookkeeping
    ``state_dir/inbox.json`` (written atomically: temp file + ``os.replace``) records every
    consumed file with its sha256, size and the round that consumed it. A consumed file that
    was modified afterwards (its hash differs) raises :class:`InboxModifiedError` naming it:
    its old clicks were already trained on and accounted, new rows in it would never be, and
    silently re-reading it would break "train on each click once (plus bounded replay)".
    A consumed file that later disappears is only an error when replay needs it.

No Flower, no torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INBOX_STATE = "inbox.json"
ROUND_NAME = re.compile(r"^round-(\d+)-.+\.parquet$")
STATE_VERSION = 1

__all__ = [
    "Inbox",
    "InboxError",
    "InboxModifiedError",
    "available_from_round",
    "round_file_name",
]


class InboxError(Exception):
    """The inbox cannot be read consistently (missing data folder, bad state file, ...)."""


class InboxModifiedError(InboxError):
    """A file the node already trained on was changed afterwards."""


def available_from_round(path: str | Path) -> int:
    """The simulation clock: ``round-NNNN-*.parquet`` -> NNNN; any other name -> 0."""
    match = ROUND_NAME.match(Path(path).name)
    return int(match.group(1)) if match else 0


def round_file_name(round: int, tag: str) -> str:
    """``round-NNNN-<tag>.parquet``: a file the inbox lists from round ``round`` on."""
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round!r}")
    if not tag or not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        raise ValueError(f"tag must be non-empty [A-Za-z0-9_.-], got {tag!r}")
    return f"round-{round:04d}-{tag}.parquet"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ConsumedFile:
    """One consumed file as recorded in ``inbox.json``."""

    path: str  # relative to the data folder, POSIX separators
    sha256: str
    size: int
    round: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size, "round": self.round}


class Inbox:
    """The Parquet files under ``data_path`` and which of them the node has consumed.

    Parameters
    ----------
    data_path
        The node's data folder (searched recursively for ``*.parquet``; hidden files, e.g.
        a writer's ``.name.tmp``, are skipped).
    state_dir
        Where ``inbox.json`` lives (the node's private state folder).
    """

    def __init__(self, data_path: str | Path, state_dir: str | Path) -> None:
        self.data_path = Path(data_path)
        self.state_dir = Path(state_dir)
        self.state_path = self.state_dir / INBOX_STATE
        self._consumed: list[ConsumedFile] = self._load()

    # ---- reading -------------------------------------------------------------------------

    def _load(self) -> list[ConsumedFile]:
        if not self.state_path.exists():
            return []
        try:
            raw = json.loads(self.state_path.read_text())
            if raw.get("version") != STATE_VERSION:
                raise ValueError(f"version {raw.get('version')!r}, expected {STATE_VERSION}")
            return [ConsumedFile(**item) for item in raw["consumed"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise InboxError(f"{self.state_path}: unreadable inbox state ({exc})") from None

    def _rel(self, path: Path) -> str:
        try:
            return Path(path).resolve().relative_to(self.data_path.resolve()).as_posix()
        except ValueError:
            raise InboxError(f"{path} is not inside the inbox {self.data_path}") from None

    def files(self, current_round: int | None = None) -> list[Path]:
        """Every available ``*.parquet`` in arrival order (name, then mtime, then path).

        With ``current_round``, files of the simulation clock that become available later
        (``round-NNNN-*`` with NNNN > current_round) are left out.
        """
        if not self.data_path.is_dir():
            raise InboxError(f"inbox folder not found: {self.data_path}")
        found = [
            p for p in self.data_path.rglob("*.parquet")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(
                self.data_path).parts)
        ]
        if current_round is not None:
            found = [p for p in found if available_from_round(p) <= current_round]
        return sorted(found, key=lambda p: (p.name, p.stat().st_mtime_ns, self._rel(p)))

    @property
    def consumed(self) -> list[ConsumedFile]:
        """Consumed files in the order they were consumed."""
        return list(self._consumed)

    @property
    def last_round(self) -> int:
        """The last round that consumed anything (0 = none yet)."""
        return max((c.round for c in self._consumed), default=0)

    def verify(self) -> None:
        """Raise :class:`InboxModifiedError` naming the first consumed file that changed."""
        for item in self._consumed:
            path = self.data_path / item.path
            if not path.exists():
                continue  # deleted after use: harmless unless replay needs it
            if path.stat().st_size != item.size or file_sha256(path) != item.sha256:
                raise InboxModifiedError(
                    f"{path} was modified after it was consumed in round {item.round} "
                    f"(recorded sha256 {item.sha256[:12]}…); append new clicks as a new file "
                    f"instead of rewriting a consumed one"
                )

    def pending(self, current_round: int | None = None) -> list[Path]:
        """Available files not yet consumed, in arrival order (checks consumed files first)."""
        self.verify()
        done = {c.path for c in self._consumed}
        return [p for p in self.files(current_round) if self._rel(p) not in done]

    def consumed_in(self, round: int) -> list[Path]:
        """Files consumed by ``round`` (a repeated round re-trains on exactly these)."""
        self.verify()
        return [self.data_path / c.path for c in self._consumed if c.round == round]

    def replay(self, n: int, *, before_round: int | None = None) -> list[Path]:
        """The last ``n`` consumed files (in consumption order), for a bounded replay buffer.

        ``before_round`` keeps only files consumed by earlier rounds. Raises
        :class:`InboxError` if one of them is gone, :class:`InboxModifiedError` if changed.
        """
        if n < 0:
            raise ValueError(f"replay size must be >= 0, got {n!r}")
        if n == 0:
            return []
        self.verify()
        pool = [c for c in self._consumed if before_round is None or c.round < before_round]
        chosen = pool[-n:]
        paths = [self.data_path / c.path for c in chosen]
        for c, p in zip(chosen, paths, strict=True):
            if not p.exists():
                raise InboxError(f"replay file {p} (consumed in round {c.round}) is gone")
        return paths

    # ---- writing -------------------------------------------------------------------------

    def mark_consumed(self, files: Iterable[str | Path], *, round: int | None = None) -> None:
        """Record ``files`` as consumed (by ``round``; default last_round + 1), atomically.

        Files already recorded are checked (hash) and left as they are.
        """
        rnd = self.last_round + 1 if round is None else int(round)
        known = {c.path: c for c in self._consumed}
        added: list[ConsumedFile] = []
        for f in files:
            path = Path(f)
            rel = self._rel(path)
            digest = file_sha256(path)
            if rel in known:
                if known[rel].sha256 != digest:
                    raise InboxModifiedError(
                        f"{path} was modified after it was consumed in round {known[rel].round}"
                    )
                continue
            item = ConsumedFile(rel, digest, path.stat().st_size, rnd)
            known[rel] = item
            added.append(item)
        if not added:
            return
        self._save(self._consumed + added)
        self._consumed = self._consumed + added

    def _save(self, consumed: list[ConsumedFile]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        payload = {"version": STATE_VERSION, "consumed": [c.to_json() for c in consumed]}
        fd, tmp = tempfile.mkstemp(prefix=f".{INBOX_STATE}.", suffix=".tmp", dir=self.state_dir)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(payload, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.state_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
