"""One feature builder per process and catalog folder (Ray reuses worker processes)."""

from __future__ import annotations

import functools
from pathlib import Path

from shared_model.data import load_judged_dir
from shared_model.encoder import CachedEncoder
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


def node_feature_builder(catalog_dir: str, cache_dir: str = "",
                         state_dir: Path | None = None) -> FeatureBuilder:
    """The catalog's feature builder for a node, built once per process.

    A process that already holds the catalog's builder (a simulation's Ray worker serving
    many virtual nodes, or a warm ClientApp runner) uses it. Nothing is persisted as a
    pickle in ``state_dir``: loading one would turn a write to the node's state folder into
    code execution (the security review's "no pickle" rule); the embedding cache it reads
    is plain arrays. ``state_dir`` is accepted for callers that have one.
    """
    del state_dir  # kept in the signature: no pickled state is ever stored or loaded
    held = _IN_PROCESS.get((catalog_dir, cache_dir))
    if held is not None:
        return held
    builder = cached_feature_builder(catalog_dir, cache_dir)
    _IN_PROCESS[(catalog_dir, cache_dir)] = builder
    return builder
