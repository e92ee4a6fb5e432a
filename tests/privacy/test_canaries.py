"""The one-run audit: bound math (golden values, fast) and one small audit with its control.

The small audits train a synthetic node (120 users) through the real DP-SGD path
(``shared_model.training.train_head``, Opacus) with fresh noise: a few seconds each.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from privacy.canaries import (
    audit_result,
    epsilon_lower_bound,
    guess_above_threshold,
    guess_from_scores,
    p_value,
)
from shared_model.features import NUM_FEATURES
from shared_model.ranker import RankerHead
from shared_model.training import TrainConfig, UserGroups, train_head
from simulations.canaries import (
    DOWN_IMPRESSIONS,
    UP_IMPRESSIONS,
    CanaryAuditResult,
    CanarySlots,
    canary_groups,
    run_canary_audit,
)

REPO = Path(__file__).resolve().parents[2]


# --- bound math -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("r", "golden"),
    [
        (10, 1.051873233231709),
        (12, 1.260300355971553),
        (24, 2.01780493454712),
        (40, 2.554010402610483),
    ],
)
def test_all_correct_bound_matches_closed_form(r: int, golden: float) -> None:
    # With δ = 0 and every guess right, the bound solves p^r = 0.05, p = e^ε / (1 + e^ε):
    # ε = log(p / (1 - p)) at p = 0.05^(1/r).
    p = 0.05 ** (1 / r)

    bound = epsilon_lower_bound(m=1000, r=r, v=r, delta=0.0)

    assert math.log(p / (1 - p)) == pytest.approx(golden, abs=1e-12)
    assert bound == pytest.approx(golden, abs=1e-8)


def _p_value_reference(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    # Steinke-Nasr-Jagielski Theorem 5.2 written out with exact binomial sums.
    p = math.exp(epsilon) / (1 + math.exp(epsilon))

    def pmf(k: int) -> float:
        return math.comb(r, k) * p**k * (1 - p) ** (r - k)

    beta = sum(pmf(k) for k in range(v, r + 1))
    alpha = max(sum(pmf(k) for k in range(v - i, v)) / i for i in range(1, v + 1))
    return min(1.0, beta + 2 * m * delta * alpha)


def test_p_value_matches_reference_with_delta_term() -> None:
    got = p_value(m=200, r=40, v=36, epsilon=1.0, delta=1e-5)

    assert got == pytest.approx(0.008635333481775344, rel=1e-9)
    assert got == pytest.approx(
        _p_value_reference(m=200, r=40, v=36, epsilon=1.0, delta=1e-5), rel=1e-9
    )


@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "golden"),
    [
        (200, 40, 36, 1e-5, 1.2966906733416923),
        (60, 18, 18, 1e-5, 1.7069114213238665),
        (120, 36, 36, 1e-5, 2.4409434980028113),
    ],
)
def test_bound_golden_values(m: int, r: int, v: int, delta: float, golden: float) -> None:
    assert epsilon_lower_bound(m=m, r=r, v=v, delta=delta) == pytest.approx(golden, abs=1e-8)


def test_half_correct_gives_zero() -> None:
    assert epsilon_lower_bound(m=1000, r=100, v=50, delta=1e-5) == 0.0


def test_monotone_in_correct_count() -> None:
    bounds = [epsilon_lower_bound(m=500, r=60, v=v, delta=1e-5) for v in range(30, 61)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))


def test_bound_is_where_p_value_crosses_level() -> None:
    eps = epsilon_lower_bound(m=200, r=40, v=36, delta=1e-5)
    assert p_value(m=200, r=40, v=36, epsilon=eps, delta=1e-5) < 1 - 0.95
    assert p_value(m=200, r=40, v=36, epsilon=eps + 1e-3, delta=1e-5) >= 1 - 0.95


def test_delta_term_only_loosens() -> None:
    assert epsilon_lower_bound(m=1000, r=100, v=90, delta=1e-3) <= epsilon_lower_bound(
        m=1000, r=100, v=90, delta=0.0
    )


def test_invalid_counts_raise() -> None:
    with pytest.raises(ValueError):
        p_value(m=10, r=20, v=5, epsilon=1.0, delta=0.0)


def test_guess_from_scores_counts() -> None:
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    g = guess_from_scores(scores=scores, included=included, k_plus=2, k_minus=2)
    assert (g.correct_in, g.correct_out, g.guesses) == (1, 1, 4)


def test_guess_above_threshold_abstains_below() -> None:
    scores = np.array([2.0, 0.5, 0.0, -3.0, 1.0])
    included = np.array([True, True, False, True, False])

    g = guess_above_threshold(scores=scores, included=included, threshold=0.5)

    assert (g.guesses, g.correct, g.k_minus) == (2, 1, 0)


@pytest.mark.parametrize(
    ("claimed", "bound", "control", "verdict"),
    [
        (1.0, 0.0, 1.7, "pass"),
        (1.0, 0.0, 0.9, "inconclusive"),
        (1.0, 1.2, 1.7, "fail"),
        (1.0, 1.2, 0.0, "fail"),
        (math.inf, 2.4, 2.4, "inconclusive"),
    ],
)
def test_audit_result_verdicts(claimed: float, bound: float, control: float, verdict: str) -> None:
    assert (
        audit_result(
            claimed_epsilon=claimed,
            epsilon_lower_bound=bound,
            positive_control_epsilon_lower_bound=control,
        )
        == verdict
    )


# --- canary design --------------------------------------------------------------------------


def _synthetic_node(users: int = 120, width: int = 4, seed: int = 0) -> UserGroups:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((users, width, NUM_FEATURES)).astype(np.float32)
    rank = np.tile(np.arange(1, width + 1), (users, 1)).astype(np.int64)
    clicked = (rng.random((users, width)) < 0.3).astype(np.float32)
    return UserGroups(feats, rank, clicked, np.ones((users, width), np.float32))


def test_slots_layout_and_canary_groups() -> None:
    slots = CanarySlots.layout(runs=2, rounds=3)
    groups = canary_groups(
        signs=np.array([1, -1, 1]),
        active=np.array([True, True, False]),
        width=8,
        features=np.ones(NUM_FEATURES, np.float32),
    )

    assert slots.m == 12
    assert sorted(zip(slots.run, slots.round, slots.sign, strict=True)) == sorted(
        (k, t, s) for k in range(2) for t in range(3) for s in (1, -1)
    )
    assert groups.mask.sum(axis=1).tolist() == [UP_IMPRESSIONS, DOWN_IMPRESSIONS, 0]
    assert (groups.rank == 0).all()  # the padding position no real impression has
    assert groups.clicked[0].sum() == UP_IMPRESSIONS and groups.clicked[1].sum() == 0


def test_real_users_never_move_the_audited_coordinate() -> None:
    # The design rests on this: only canaries (and DP noise) move position logit 0.
    head = RankerHead()
    config = TrainConfig(batch_size=40, noise_multiplier=0.0)

    train_head(head, _synthetic_node(), config)

    assert float(head.position_tower.logit.weight[0, 0]) == 0.0
    assert float(head.position_tower.logit.weight[1:].abs().sum()) > 0.0


# --- small audits through the real DP-SGD path ----------------------------------------------


def _small_audit(*, seed: int) -> CanaryAuditResult:
    # 120 users, q = 1/3, 6 steps a round, 40 rounds, 80 canaries. At σ = 0 every guess is
    # right and a round yields one with probability ~0.7 (one of its two canaries in and
    # sampled): ~27 expected (15 seeds at 30 rounds: 15-26), while 11 of 11 already bound ε
    # above 1.
    return run_canary_audit(
        real=_synthetic_node(),
        epsilon=1.0,
        delta=1e-5,
        rounds=40,
        runs=1,
        batch_size=40,
        local_epochs=2,
        seed=seed,
    )


def test_small_audit_control_beats_claim_while_honest_run_stays_below() -> None:
    result = _small_audit(seed=3)

    assert result.noise_multiplier is not None and result.noise_multiplier > 1.0
    assert result.positive_control_epsilon_lower_bound > 1.0
    assert result.positive_control_correct == result.positive_control_guesses
    assert result.epsilon_lower_bound <= 1.0
    assert result.result == "pass"
    as_json = result.to_dict()
    assert {
        "claimed_epsilon",
        "epsilon_lower_bound",
        "positive_control_epsilon_lower_bound",
        "result",
    } <= as_json.keys()


def test_audit_fails_an_implementation_that_drops_the_noise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Finding 6 of issue 15: σ forced to 0 while claiming ε = 1 must not look like an honest run.
    import privacy.accountant_store

    monkeypatch.setattr(privacy.accountant_store, "plan_noise_multiplier", lambda **_: 0.0)

    result = _small_audit(seed=4)

    assert result.epsilon_lower_bound > 1.0
    assert result.result == "fail"


# --- package arrows -------------------------------------------------------------------------


def test_privacy_package_never_imports_simulations() -> None:
    offenders = []
    for source in sorted((REPO / "privacy").glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            offenders += [
                f"{source.name}:{node.lineno}" for n in names if n.split(".")[0] == "simulations"
            ]

    assert offenders == []


def test_canaries_command_is_registered_under_audit() -> None:
    import typer
    from typer.testing import CliRunner

    from privacy import commands as privacy_commands
    from simulations import canary_commands

    app, bench = typer.Typer(), typer.Typer()
    privacy_commands.register(app, bench)
    canary_commands.register(app, bench)
    out = CliRunner().invoke(app, ["audit", "canaries", "--help"])

    assert out.exit_code == 0
    assert "positive control" in out.output


def test_canaries_command_writes_the_json_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import typer
    from typer.testing import CliRunner

    import simulations.canaries
    from privacy import commands as privacy_commands
    from simulations import canary_commands

    monkeypatch.setattr(simulations.canaries, "node_groups", lambda *_, **__: _synthetic_node())
    app, bench = typer.Typer(), typer.Typer()
    privacy_commands.register(app, bench)
    canary_commands.register(app, bench)
    path = tmp_path / "audit.json"

    out = CliRunner().invoke(
        app,
        [
            "audit",
            "canaries",
            "regional-5",
            "--epsilon",
            "inf",
            "--rounds",
            "2",
            "--runs",
            "1",
            "--json",
            str(path),
        ],
    )

    assert out.exit_code == 0, out.output
    report = json.loads(path.read_text())
    assert report["claimed_epsilon"] == "inf" and report["result"] == "inconclusive"
    assert report["noise_multiplier"] is None and report["canaries"] == 4
    assert "positive control (σ=0)" in out.output
