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
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from shared_model.release import (
    ReleaseError,
    ReleaseStore,
    load_public_key,
    load_verified_release,
)

log = logging.getLogger("fedrank.node")

_ROUND_NAME = re.compile(r"round-(\d{1,9})")
_REASON_LIMIT = 300


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
    try:
        current = store.current_round()
    except ReleaseError as exc:
        log.warning("node %s: release pointer unreadable: %s", node_name, _short(str(exc)))
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
