"""One feature builder per process and catalog folder (Ray reuses worker processes)."""

from __future__ import annotations

import functools
from pathlib import Path

from shared_model.data import load_judged_dir
from shared_model.encoder import CachedEncoder
from shared_model.features import FeatureBuilder


@functools.lru_cache(maxsize=2)
def cached_feature_builder(catalog_dir: str, cache_dir: str = "") -> FeatureBuilder:
    """The catalog's feature builder, built once per process (``cache_dir`` "" = default)."""
    encoder = CachedEncoder(cache_dir=Path(cache_dir) if cache_dir else None)
    return FeatureBuilder(load_judged_dir(Path(catalog_dir)), encoder)
