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


# --- node-pinned privacy ----------------------------------------------------------------


def test_node_privacy_parses_node_config_keys_and_names_bad_values() -> None:
    from shared_model.settings import NodePrivacy

    parsed = NodePrivacy.from_mapping({
        "epsilon-budget": "2.5", "delta": "1e-6", "clip-norm": 0.5,
        "max-sessions-per-user": "3", "privacy-shape": "device", "data-path": "ignored",
    })
    assert parsed == NodePrivacy(2.5, 1e-6, 0.5, 3, "device")
    assert NodePrivacy.from_mapping(parsed.to_config()) == parsed
    assert not NodePrivacy.from_mapping({"epsilon-budget": "inf"}).private
    for bad, message in (
        ({"epsilon-budget": "0"}, "epsilon-budget must be > 0"),
        ({"delta": "2"}, "node delta must be in"),
        ({"clip-norm": "inf"}, "node clip-norm must be finite"),
        ({"max-sessions-per-user": "x"}, "node config 'max-sessions-per-user': cannot read"),
        ({"privacy-shape": "global"}, "node privacy-shape must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            NodePrivacy.from_mapping(bad)


def test_effective_privacy_caps_epsilon_and_tightens_only() -> None:
    from shared_model.settings import NodePrivacy, effective_privacy

    node = NodePrivacy(epsilon_budget=1.0, delta=1e-5, clip_norm=1.0, max_sessions_per_user=2)
    run = RunSettings(epsilon=8.0, clip_norm=0.5, max_sessions_per_user=1)
    got = effective_privacy(node, run)
    assert (got.epsilon, got.clip_norm, got.max_sessions_per_user) == (1.0, 0.5, 1)
    assert effective_privacy(node, RunSettings(epsilon=0.3)).epsilon == 0.3
    assert effective_privacy(node, run, stored_budget=0.7).epsilon == 0.7
    assert effective_privacy(node, RunSettings(delta=1e-7)).delta == 1e-7
    # A non-private node trains privately when a run asks for it, and not otherwise.
    open_node = NodePrivacy(epsilon_budget=math.inf)
    assert effective_privacy(open_node, RunSettings(epsilon=2.0)).epsilon == 2.0
    assert not effective_privacy(open_node, RunSettings(epsilon=math.inf)).private


@pytest.mark.parametrize(
    ("run", "reason"),
    [
        (RunSettings(epsilon=math.inf), "epsilon=inf"),
        (RunSettings(privacy_shape="device"), "privacy-shape=device"),
        (RunSettings(delta=1e-3), "delta=0.001 exceeds the node's 1e-05"),
        (RunSettings(clip_norm=2.0), "clip-norm=2 exceeds"),
        (RunSettings(max_sessions_per_user=9), "max-sessions-per-user=9 exceeds"),
    ],
)
def test_effective_privacy_refuses_weaker_requests(run: RunSettings, reason: str) -> None:
    from shared_model.settings import NodePrivacy, PrivacyRequestRefused, effective_privacy

    with pytest.raises(PrivacyRequestRefused, match=reason):
        effective_privacy(NodePrivacy(), run)
