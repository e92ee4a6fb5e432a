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
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One embedding cache for the whole session, inherited by every process the tests start
# (SuperNodes' ClientApps, Ray workers): without it each deployed test node would encode the
# catalog into its own state folder (minutes each on a cold CI machine).
os.environ.setdefault(
    "FEDRANK_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "embeddings")
)


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


# ======================================================================================
# e2e: Deployment Engine runs shared between tests (tests/e2e/shared_runs.py).
#
# One loopback cluster per run exercises several behaviours; each test that checks one of
# them asks for the run's result. Session scope: the run happens once, when the first test
# that needs it runs, and has stopped all its processes before any test looks at it.
# ======================================================================================
import sys  # noqa: E402

_E2E_DIR = str(Path(__file__).resolve().parent / "e2e")


def _shared_runs():  # type: ignore[no-untyped-def]
    if _E2E_DIR not in sys.path:
        sys.path.insert(0, _E2E_DIR)
    import shared_runs

    return shared_runs


@pytest.fixture(scope="session")
def faulty_deployment(tmp_path_factory):  # type: ignore[no-untyped-def]
    """``shared_runs.faulty_run``: faulty, unregistered, plaintext and wrongly pinned nodes."""
    return _shared_runs().faulty_run(tmp_path_factory.mktemp("faulty-deployment"))


@pytest.fixture(scope="session")
def crash_deployment(tmp_path_factory):  # type: ignore[no-untyped-def]
    """``shared_runs.crash_run``: a node killed in round 2, then the server killed and resumed."""
    return _shared_runs().crash_run(tmp_path_factory.mktemp("crash-deployment"))


# ======================================================================================
# end e2e block
# ======================================================================================
