"""Shared pytest fixtures. Keep each owner's fixtures in its own delimited block."""

from __future__ import annotations

# ======================================================================================
# shared_model: one WANDS data set and one FeatureBuilder for the whole test session.
#
# Building the FeatureBuilder encodes ~20k product texts with MiniLM on a cold embedding
# cache (minutes on CPU; seconds once `.cache/embeddings` is warm), so it is built at most
# once per session and only by tests that ask for it. The cache location is the default
# (`$FEDRANK_CACHE_DIR` or the gitignored `<repo>/.cache/embeddings`).
# ======================================================================================
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def wands_data():
    """The bundled WANDS data set (``shared_model.data.load_wands``)."""
    from shared_model.data import load_wands

    return load_wands()


@pytest.fixture(scope="session")
def wands_builder(wands_data):
    """One ``FeatureBuilder`` over WANDS with the default on-disk embedding cache."""
    from shared_model.encoder import CachedEncoder
    from shared_model.features import FeatureBuilder

    return FeatureBuilder(wands_data, CachedEncoder())


# ======================================================================================
# end shared_model block
# ======================================================================================
