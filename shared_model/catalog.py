"""One feature builder per process and catalog folder (Ray reuses worker processes); a node's
builder is also prepared once and kept in its state folder (:func:`node_feature_builder`)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path

from shared_model.data import load_judged_dir
from shared_model.encoder import CachedEncoder, cached_model_fingerprint, default_cache_dir
from shared_model.features import FeatureBuilder

PREPARED_DIR = "prepared"
# The code whose objects are stored: a change to any of them invalidates prepared state.
_CODE = ("data.py", "schema.py", "encoder.py", "features.py", "bm25.py", "catalog.py")


# (catalog_dir, cache_dir) -> the builder this process already has.
_IN_PROCESS: dict[tuple[str, str], FeatureBuilder] = {}


@functools.lru_cache(maxsize=2)
def cached_feature_builder(catalog_dir: str, cache_dir: str = "") -> FeatureBuilder:
    """The catalog's feature builder, built once per process (``cache_dir`` "" = default)."""
    encoder = CachedEncoder(cache_dir=Path(cache_dir) if cache_dir else None)
    builder = FeatureBuilder(load_judged_dir(Path(catalog_dir)), encoder)
    _IN_PROCESS[(catalog_dir, cache_dir)] = builder
    return builder


def prepared_key(catalog_dir: Path, cache_dir: Path | None) -> str:
    """What a prepared builder depends on: the catalog files (name, size, mtime, inode), the
    encoder model's content hash and this code; sha256 hex."""
    from shared_model.encoder import default_model_dir

    digest = hashlib.sha256()
    root = Path(catalog_dir).resolve()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        digest.update(json.dumps([str(path.relative_to(root)), st.st_size, st.st_mtime_ns,
                                  st.st_ino]).encode())
    model = cached_model_fingerprint(default_model_dir(), cache_dir or default_cache_dir())
    digest.update(model.encode())
    here = Path(__file__).resolve().parent
    for name in _CODE:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def node_feature_builder(catalog_dir: str, cache_dir: str = "",
                         state_dir: Path | None = None) -> FeatureBuilder:
    """The catalog's feature builder for a node: prepared once, kept in its state folder.

    A ClientApp process serves one message; rebuilding the builder each time (catalog parse,
    embedding-cache load, BM25 index) costs most of a second. The first message stores it in
    ``state_dir/prepared/features-<key>.pkl`` (``key``: :func:`prepared_key`, so another
    catalog, model or code version prepares again); later ones load it. The folder is the
    node's own (nothing from the server is written there; created 0700) and a file is only
    unpickled if it and its folder are ours and writable by nobody else.
    A process that already holds the catalog's builder (a simulation's Ray worker serving
    many virtual nodes) uses it; no state dir: :func:`cached_feature_builder`.
    """
    held = _IN_PROCESS.get((catalog_dir, cache_dir))
    if held is not None:
        return held
    if state_dir is None:
        builder = cached_feature_builder(catalog_dir, cache_dir)
    else:
        builder = _node_builder(catalog_dir, cache_dir, str(Path(state_dir).resolve()))
    _IN_PROCESS[(catalog_dir, cache_dir)] = builder
    return builder


@functools.lru_cache(maxsize=2)
def _node_builder(catalog_dir: str, cache_dir: str, state_dir: str) -> FeatureBuilder:
    key = prepared_key(Path(catalog_dir), Path(cache_dir) if cache_dir else None)
    folder = Path(state_dir) / PREPARED_DIR
    path = folder / f"features-{key[:32]}.pkl"
    if path.is_file() and _private(path) and _private(folder):
        with contextlib.suppress(Exception), path.open("rb") as fh:
            builder = pickle.load(fh)  # noqa: S301 - the node's own state folder
            if isinstance(builder, FeatureBuilder):
                _IN_PROCESS[(catalog_dir, cache_dir)] = builder
                return builder
    builder = cached_feature_builder(catalog_dir, cache_dir)
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for old in folder.glob("features-*.pkl"):
            old.unlink(missing_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as out:
            pickle.dump(builder, out, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(out.name, path)
    return builder


def _private(path: Path) -> bool:
    """Owned by this user, not writable by group or others."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022
