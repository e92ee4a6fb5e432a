"""Run settings: one parse of run_config, defaults in step with pyproject.toml."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from shared_model.settings import RunSettings

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_matches_run_settings_defaults() -> None:
    # Prepare
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # Execute
    parsed = RunSettings.from_config(config)
    # Assert: same keys, same defaults
    assert set(config) == set(RunSettings().to_config())
    assert parsed == RunSettings()


def test_round_trip_and_infinite_epsilon() -> None:
    settings = RunSettings(epsilon=math.inf, strategy="fedadam")
    again = RunSettings.from_config(settings.to_config())
    assert again == settings and not again.private


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"strategy": "sgd"}, "strategy must be one of"),
        ({"epsilon": "-1"}, "epsilon must be > 0"),
        ({"num-server-rounds": "x"}, "cannot read 'x' as int"),
        ({"no-such-key": 1}, "unknown run config key"),
        ({"region-epsilon-caps": "a=1,b"}, "bad item 'b'"),
        ({"eval-fold": 7}, "eval-fold must be in"),
    ],
)
def test_bad_values_are_named(config: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunSettings.from_config(config)
