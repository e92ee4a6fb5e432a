"""Fixtures for tests that drive server strategies with real Flower Messages in-process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's Message needs the identity a ServerApp process has."""
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    yield
