"""A node installs the server's signed releases: from its own folder, with its own pinned key.

Both the folder the node reads releases from (``release-dir``) and the public key it checks
them with (``release-key``) are node settings, fixed by the node's operator at set-up
(``fedrank node start --release-dir --release-key``); nothing the server sends in a run config
chooses them. The node installs the release with the **highest verified round**:

- candidates are the sub-folders of ``release-dir`` (symlinks and files are skipped), tried
  newest name first (``round-NNNN`` by number, any other name after them), and the first one
  that verifies under the pinned key, whose folder name is its signed version and whose round
  is newer than the installed one wins: a planted ``round-zzzz`` or a ``round-9999`` signed by
  another key is refused (logged) and the next candidate is tried, so it never blocks a newer
  genuine release;
- every file is read once, never through a symlink, with a size cap
  (``shared_model.release.load_verified_release``); what was verified is what is installed;
- on any failure the node keeps its last good release (``ReleaseStore``'s pointer is only
  replaced after a complete, verified copy exists).

**Releases over Flower (the default in deployment).** A node need not see the server's disk:
the server attaches its newest signed release to the train message of each node that has not
reported it installed (record :data:`RELEASE_RECORD`, a ConfigRecord ``{"names": [file
names], "blobs": [file bytes]}``: ``head.onnx``, ``manifest.json``, ``manifest.sig``), and
sends the run's final release in one ``query.install_release`` message after the last round.
:func:`install_received_release` checks the record's shape and sizes, writes the files into
a fresh folder inside the node's own state dir, verifies them there with the node's pinned
key (the same :func:`~shared_model.release.load_verified_release` as above) and installs
them through :class:`~shared_model.release.ReleaseStore`; anything that does not verify is
refused (logged, naming the problem) and the node keeps its last good release. The
``release-round`` the node reports in its next reply tells the server what it installed, so
a refused release is sent again. ``release-dir`` (the file drop) stays optional.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared_model.release import (
    MANIFEST_FILE,
    MAX_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_FILE,
    ReleaseError,
    ReleaseStore,
    load_public_key,
    load_verified_release,
    write_private_file,
)

log = logging.getLogger("fedrank.node")

_ROUND_NAME = re.compile(r"round-(\d{1,9})")
_REASON_LIMIT = 300


def _current_round(store: ReleaseStore, node_name: str) -> int | None:
    """The round of the node's installed release (0 = none); ``None`` (logged) when its
    pointer is unreadable."""
    try:
        return store.current_round()
    except ReleaseError as exc:
        log.warning("node %s: release pointer unreadable: %s", node_name, _short(str(exc)))
        return None


def _short(text: str) -> str:
    text = text.encode("ascii", "backslashreplace").decode().replace("\n", " ")
    return text if len(text) <= _REASON_LIMIT else text[:_REASON_LIMIT] + "..."


def candidate_dirs(release_dir: Path) -> list[Path]:
    """Sub-folders of ``release_dir`` that may hold a release, newest name first.

    Entries are inspected with ``lstat``: symlinks, files and hidden names are skipped.
    """
    try:
        names = os.listdir(release_dir)
    except OSError:
        return []
    dirs: list[tuple[int, int, str]] = []
    for name in names:
        if name.startswith("."):
            continue
        try:
            st = os.lstat(Path(release_dir) / name)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        match = _ROUND_NAME.fullmatch(name)
        # (numeric names first, by round), then the rest by name, all descending.
        dirs.append((1, int(match.group(1)), name) if match else (0, 0, name))
    dirs.sort(reverse=True)
    return [Path(release_dir) / name for _, _, name in dirs]


def install_latest_release(
    *,
    release_dir: Path | None,
    release_key: Path | None,
    state_dir: Path,
    node_name: str,
) -> float:
    """Verify and install the newest release in ``release_dir``; returns the installed round.

    ``release_dir``/``release_key`` are the node's own settings (``None``: releases are not
    delivered to this node; the current release, if any, is kept). Returns the round of the
    node's current release after the attempt (0.0 = none).
    """
    store = ReleaseStore(Path(state_dir))
    current = _current_round(store, node_name)
    if current is None:
        return 0.0
    if release_dir is None or release_key is None:
        return float(current)
    try:
        key = load_public_key(Path(release_key))
    except (ReleaseError, OSError) as exc:
        log.warning("node %s: release key unusable, keeping release round %d: %s",
                    node_name, current, _short(str(exc)))
        return float(current)
    for candidate in candidate_dirs(Path(release_dir)):
        match = _ROUND_NAME.fullmatch(candidate.name)
        if match and int(match.group(1)) <= current:
            break  # every remaining numeric candidate is older than what is installed
        try:
            manifest, files = load_verified_release(candidate, key)
            if manifest.version != candidate.name:
                raise ReleaseError(
                    f"release {candidate}: folder name is not its signed version "
                    f"{manifest.version!r}"
                )
            if manifest.round <= current:
                continue
            store.install_loaded(candidate, manifest, files, key)
        except (ReleaseError, OSError) as exc:
            log.warning("node %s refused release %s: %s", node_name, _short(candidate.name),
                        _short(str(exc)))
            continue
        log.info("node %s installed release %s (round %d)", node_name, manifest.version,
                 manifest.round)
        return float(store.current_round())
    return float(current)


# --- releases carried in Flower messages -----------------------------------------------------

# The wire format (the server packs it: ``server.releases.release_record``).
RELEASE_RECORD = "release"  # ConfigRecord name in a train or install message
RELEASE_NAMES = "names"  # list[str]: file names
RELEASE_BLOBS = "blobs"  # list[bytes]: the files' bytes, same order
INSTALL_ACTION = "install_release"  # message type ``query.install_release``: final delivery
INCOMING_DIR = "incoming-releases"  # under the node's state dir: received, not yet verified
MAX_RELEASE_FILES = 16
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Test hook (node config, inert unless set): alter the bytes of the release for this round as
# they arrive, as an on-path attacker or a corrupted transfer would
# (tests/e2e/test_release_transport.py). ``fedrank node start`` never sets it.
TAMPER_RELEASE = "tamper-release"


def _size_cap(name: str) -> int:
    if name == MANIFEST_FILE:
        return MAX_MANIFEST_BYTES
    if name == SIGNATURE_FILE:
        return MAX_SIGNATURE_BYTES
    return MAX_FILE_BYTES


def unpack_release_record(record: Any) -> dict[str, bytes]:
    """``{file name: bytes}`` from a received :data:`RELEASE_RECORD`; nothing is trusted yet.

    Raises :class:`ReleaseError` naming the bad value when the record is not a ConfigRecord of
    exactly ``names`` (list of str) and ``blobs`` (list of bytes) of the same length, names a
    file badly (path separators, hidden names, duplicates), lists more than
    :data:`MAX_RELEASE_FILES` files, or carries a file over its size cap (the same caps as a
    release read from disk).
    """
    from flwr.app import ConfigRecord

    if not isinstance(record, ConfigRecord):
        raise ReleaseError(
            f"record {RELEASE_RECORD!r} is a {type(record).__name__}, expected a ConfigRecord"
        )
    keys = sorted(record.keys())
    if keys != sorted((RELEASE_NAMES, RELEASE_BLOBS)):
        raise ReleaseError(
            f"record {RELEASE_RECORD!r} has keys {_short(repr(keys))}, expected "
            f"{[RELEASE_BLOBS, RELEASE_NAMES]}"
        )
    names, blobs = record[RELEASE_NAMES], record[RELEASE_BLOBS]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ReleaseError(f"record {RELEASE_RECORD!r}: {RELEASE_NAMES!r} must be a list of "
                           f"str, got {_short(repr(names))}")
    if not isinstance(blobs, list) or not all(isinstance(b, bytes) for b in blobs):
        kinds = sorted({type(b).__name__ for b in blobs}) if isinstance(blobs, list) else None
        raise ReleaseError(f"record {RELEASE_RECORD!r}: {RELEASE_BLOBS!r} must be a list of "
                           f"bytes, got {type(blobs).__name__} of {kinds}")
    if len(names) != len(blobs):
        raise ReleaseError(f"record {RELEASE_RECORD!r}: {len(names)} names but {len(blobs)} "
                           "blobs")
    if not names or len(names) > MAX_RELEASE_FILES:
        raise ReleaseError(f"record {RELEASE_RECORD!r}: {len(names)} files (expected 1 to "
                           f"{MAX_RELEASE_FILES})")
    files: dict[str, bytes] = {}
    checked: list[tuple[str, bytes]] = list(zip(names, blobs, strict=True))  # type: ignore[arg-type]
    for name, blob in checked:
        if not _FILE_NAME.fullmatch(name):
            raise ReleaseError(f"record {RELEASE_RECORD!r}: bad file name {_short(repr(name))}")
        if name in files:
            raise ReleaseError(f"record {RELEASE_RECORD!r}: file {name!r} appears twice")
        if len(blob) > _size_cap(name):
            raise ReleaseError(f"record {RELEASE_RECORD!r}: {name} is {len(blob)} bytes, over "
                               f"the {_size_cap(name)}-byte cap")
        files[name] = blob
    return files


def tamper_spec(node_config: Mapping[str, Any]) -> int | None:
    """The :data:`TAMPER_RELEASE` test hook's round (``None`` = off); a bad value is an error."""
    value = node_config.get(TAMPER_RELEASE)
    if value in (None, "", "none"):
        return None
    try:
        rnd = int(str(value))
    except ValueError:
        rnd = -1
    if rnd < 1:
        raise ValueError(f"node config {TAMPER_RELEASE!r} must be a round >= 1, got {value!r}")
    return rnd


def tamper_release(files: dict[str, bytes], rnd: int) -> dict[str, bytes]:
    """Test hook: flip one byte of the model file when the (unverified) manifest says ``rnd``."""
    try:
        claimed = json.loads(files.get(MANIFEST_FILE, b"{}")).get("round")
    except (ValueError, AttributeError):
        return files
    if claimed != rnd:
        return files
    out = dict(files)
    for name, data in files.items():
        if name not in (MANIFEST_FILE, SIGNATURE_FILE) and data:
            out[name] = data[:-1] + bytes([data[-1] ^ 0xFF])
            log.warning("test hook %s: altered %s of the release for round %d in transit",
                        TAMPER_RELEASE, name, rnd)
            break
    return out


def _clear_incoming(incoming: Path) -> None:
    """Remove what an interrupted earlier receive left in the node's own incoming folder."""
    try:
        names = os.listdir(incoming)
    except OSError:
        return
    for name in names:
        if name.startswith(".recv-"):
            shutil.rmtree(incoming / name, ignore_errors=True)


def install_received_release(
    record: Any,
    *,
    release_key: Path | None,
    state_dir: Path,
    node_name: str,
    tamper_round: int | None = None,
) -> float:
    """Verify and install a release that arrived in a Flower message; returns the node's round.

    ``record``: the message's :data:`RELEASE_RECORD`. ``release_key``: the node's pinned key
    (``None``: the node takes no releases and says so in its log). The files are written
    into a fresh folder under ``state_dir/incoming-releases/`` (the node's own disk, created
    0700, each file ``O_CREAT|O_EXCL`` without following symlinks), verified there with the
    pinned key and installed from the bytes that verified; the folder is removed afterwards.
    A release that fails any check is refused (one log line naming the problem) and the node
    keeps its last good release; one that is not newer than the installed release is ignored.
    Returns the round of the node's current release after the attempt (0.0 = none).
    ``tamper_round``: the :data:`TAMPER_RELEASE` test hook.
    """
    store = ReleaseStore(Path(state_dir))
    current = _current_round(store, node_name)
    if current is None:
        return 0.0
    if release_key is None:
        log.warning("node %s: a release arrived but the node pins no release key "
                    "(release-key); not installed", node_name)
        return float(current)
    tmp: Path | None = None
    claimed = "version not verified"
    try:
        key = load_public_key(Path(release_key))
        files = unpack_release_record(record)
        if tamper_round is not None:
            files = tamper_release(files, tamper_round)
        incoming = Path(state_dir) / INCOMING_DIR
        incoming.mkdir(parents=True, exist_ok=True, mode=0o700)
        _clear_incoming(incoming)
        tmp = Path(tempfile.mkdtemp(prefix=".recv-", dir=incoming))
        for name, data in files.items():
            write_private_file(tmp / name, data, 0o644)
        manifest, verified = load_verified_release(tmp, key)
        claimed = manifest.version
        if manifest.round <= current:
            log.info("node %s: release %s (round %d) is not newer than its current round %d; "
                     "ignored", node_name, manifest.version, manifest.round, current)
            return float(current)
        store.install_loaded(tmp, manifest, verified, key)
    except (ReleaseError, OSError) as exc:
        # ReleaseError names the temp folder; the version is only known once verified.
        log.warning("node %s refused the release received over Flower (%s), keeping release "
                    "round %d: %s", node_name, _short(claimed), current, _short(str(exc)))
        return float(current)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("node %s installed release %s (round %d), received over Flower", node_name,
             manifest.version, manifest.round)
    return float(store.current_round())
