"""Tests for privacy.accounting: golden values, calibration, cross-checks with dp_accounting."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from privacy.accounting import (
    DEFAULT_ORDERS,
    calibrate_noise_multiplier,
    epsilon_dp_accounting,
    epsilon_from_history,
    epsilon_rdp,
)

DELTA = 1e-5
# (noise_multiplier, sample_rate, steps)
GOLDEN_EVENTS = [
    (1.0, 0.01, 1000),
    (0.8, 0.05, 200),
    (2.0, 0.001, 10000),
    (1.1, 1.0, 10),
]
HETEROGENEOUS = [(1.0, 0.01, 300), (1.5, 0.02, 200), (0.9, 0.005, 500)]
PLD_INTERVAL = 1e-3  # coarser than the default 1e-4: still a valid (pessimistic) bound, faster


def _opacus_rdp(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


# ------------------------------------------------------------------ golden values
def test_golden_sigma1_q001_1000_steps_matches_opacus_rdp_accountant() -> None:
    # Prepare
    expected = _opacus_rdp([(1.0, 0.01, 1000)])

    # Execute
    eps = epsilon_rdp(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=DELTA)

    # Assert
    assert eps == pytest.approx(expected, rel=1e-12)
    assert eps == pytest.approx(2.1013652716, rel=1e-8)  # value measured with opacus 1.6.0


@pytest.mark.parametrize(("sigma", "q", "steps"), GOLDEN_EVENTS)
def test_epsilon_rdp_matches_opacus_and_dp_accounting_rdp(
    sigma: float, q: float, steps: int
) -> None:
    # Prepare
    opacus_eps = _opacus_rdp([(sigma, q, steps)])

    # Execute
    ours = epsilon_rdp(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA)
    google = epsilon_dp_accounting(history=[(sigma, q, steps)], delta=DELTA, method="rdp")

    # Assert
    assert ours == pytest.approx(opacus_eps, rel=1e-12)
    assert google == pytest.approx(ours, rel=0.01)


def test_heterogeneous_history_composes_like_opacus_and_dp_accounting() -> None:
    # Prepare
    opacus_eps = _opacus_rdp(HETEROGENEOUS)

    # Execute
    ours = epsilon_from_history(history=HETEROGENEOUS, delta=DELTA)
    google_rdp = epsilon_dp_accounting(history=HETEROGENEOUS, delta=DELTA, method="rdp")
    google_pld = epsilon_dp_accounting(
        history=HETEROGENEOUS,
        delta=DELTA,
        method="pld",
        value_discretization_interval=PLD_INTERVAL,
    )

    # Assert
    assert ours == pytest.approx(opacus_eps, rel=1e-12)
    assert google_rdp == pytest.approx(ours, rel=0.01)
    assert google_pld <= ours  # PLD is tighter: a claimed RDP epsilon is never below it
    assert google_pld > 0.5 * ours  # ... but in the same ballpark


def test_prv_history_matches_opacus_prv_accountant_and_is_below_rdp() -> None:
    # Prepare
    accountant = PRVAccountant()
    accountant.history = list(HETEROGENEOUS)
    expected = float(accountant.get_epsilon(delta=DELTA))

    # Execute
    eps = epsilon_from_history(history=HETEROGENEOUS, delta=DELTA, accountant="prv")

    # Assert
    assert eps == pytest.approx(expected, rel=1e-9)
    assert eps < epsilon_from_history(history=HETEROGENEOUS, delta=DELTA, accountant="rdp")


def test_composition_of_split_history_equals_self_composition() -> None:
    # Prepare
    split = [(1.0, 0.01, 400), (1.0, 0.01, 600)]

    # Execute
    eps_split = epsilon_from_history(history=split, delta=DELTA)
    eps_whole = epsilon_rdp(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=DELTA)

    # Assert
    assert eps_split == pytest.approx(eps_whole, rel=1e-12)


def test_empty_history_and_zero_noise() -> None:
    # Execute / Assert
    assert epsilon_from_history(history=[], delta=DELTA) == 0.0
    assert epsilon_dp_accounting(history=[], delta=DELTA, method="rdp") == 0.0
    assert math.isinf(epsilon_rdp(noise_multiplier=0.0, sample_rate=0.1, steps=1, delta=DELTA))
    assert math.isinf(epsilon_from_history(history=[(0.0, 0.1, 1)], delta=DELTA, accountant="prv"))
    assert math.isinf(epsilon_dp_accounting(history=[(0.0, 0.1, 1)], delta=DELTA))


def test_more_steps_give_more_epsilon() -> None:
    # Prepare
    steps_grid = [1, 10, 100, 1000, 5000]

    # Execute
    eps = [
        epsilon_rdp(noise_multiplier=1.2, sample_rate=0.02, steps=s, delta=DELTA)
        for s in steps_grid
    ]

    # Assert
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False))


@given(
    sigma=st.floats(min_value=0.6, max_value=5.0),
    q=st.one_of(st.floats(min_value=1e-3, max_value=0.3), st.just(1.0)),
    steps=st.integers(min_value=1, max_value=2000),
    extra=st.integers(min_value=1, max_value=2000),
)
@settings(max_examples=15, deadline=None)
def test_epsilon_is_monotone_in_steps_and_noise(
    sigma: float, q: float, steps: int, extra: int
) -> None:
    # Execute
    base = epsilon_rdp(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA)
    more_steps = epsilon_rdp(
        noise_multiplier=sigma, sample_rate=q, steps=steps + extra, delta=DELTA
    )
    more_noise = epsilon_rdp(noise_multiplier=sigma * 1.5, sample_rate=q, steps=steps, delta=DELTA)

    # Assert
    assert more_steps >= base
    assert more_noise <= base


# ------------------------------------------------------------------ calibration
@given(
    # fedrank's user-level sampling rates are small; q=1.0 covers full-batch (and is cheap).
    # Large q with large sigma makes each RDP evaluation slow (~0.3 s), hence the range.
    q=st.one_of(st.floats(min_value=1e-3, max_value=0.1), st.just(1.0)),
    steps=st.integers(min_value=1, max_value=2000),
    target=st.floats(min_value=0.5, max_value=20.0),
)
@settings(max_examples=30, deadline=None)
def test_calibrated_sigma_never_overshoots(q: float, steps: int, target: float) -> None:
    # Execute
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps
    )
    eps = epsilon_rdp(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA)

    # Assert
    assert sigma > 0
    assert eps <= target * (1 + 1e-9)


def test_calibration_is_tight_and_close_to_opacus() -> None:
    # Prepare
    kwargs = {"target_epsilon": 1.0, "delta": DELTA, "sample_rate": 0.01, "steps": 1000}

    # Execute
    sigma = calibrate_noise_multiplier(**kwargs)  # type: ignore[arg-type]
    opacus_sigma = get_noise_multiplier(
        target_epsilon=1.0, target_delta=DELTA, sample_rate=0.01, steps=1000
    )
    eps = epsilon_rdp(noise_multiplier=sigma, sample_rate=0.01, steps=1000, delta=DELTA)

    # Assert
    assert 1.0 - 0.01 <= eps <= 1.0
    assert sigma == pytest.approx(opacus_sigma, rel=0.02)
    # smallest: a noticeably smaller sigma overshoots the target
    assert epsilon_rdp(noise_multiplier=sigma * 0.98, sample_rate=0.01, steps=1000, delta=DELTA) > 1


def test_calibration_with_prv_meets_target_under_prv() -> None:
    # Execute
    sigma = calibrate_noise_multiplier(
        target_epsilon=2.0, delta=DELTA, sample_rate=0.02, steps=200, accountant="prv"
    )
    eps = epsilon_from_history(history=[(sigma, 0.02, 200)], delta=DELTA, accountant="prv")

    # Assert
    assert eps <= 2.0
    assert sigma <= calibrate_noise_multiplier(
        target_epsilon=2.0, delta=DELTA, sample_rate=0.02, steps=200
    )


def test_infinite_target_is_non_private() -> None:
    # Execute / Assert
    assert (
        calibrate_noise_multiplier(target_epsilon=math.inf, delta=DELTA, sample_rate=0.1, steps=10)
        == 0.0
    )


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"sample_rate": 0.0}, "sample_rate=0.0"),
        ({"sample_rate": 1.5}, "sample_rate=1.5"),
        ({"steps": 0}, "steps=0"),
        ({"steps": 2.5}, "steps=2.5"),
        ({"delta": 1.0}, "delta=1.0"),
        ({"delta": 0.0}, "delta=0.0"),
        ({"target_epsilon": 0.0}, "target_epsilon=0.0"),
        ({"target_epsilon": -1.0}, "target_epsilon=-1.0"),
        ({"target_epsilon": math.nan}, "target_epsilon=nan"),
        ({"accountant": "gdp"}, "accountant='gdp'"),
        ({"epsilon_tolerance": 0.0}, "epsilon_tolerance=0.0"),
    ],
)
def test_calibration_validates_and_names_bad_value(kwargs: dict[str, object], bad: str) -> None:
    # Prepare
    args: dict[str, object] = {
        "target_epsilon": 1.0,
        "delta": DELTA,
        "sample_rate": 0.01,
        "steps": 100,
    }
    args.update(kwargs)

    # Execute / Assert
    with pytest.raises(ValueError, match=bad.replace("(", r"\(").replace(".", r"\.")):
        calibrate_noise_multiplier(**args)  # type: ignore[arg-type]


def test_unreachable_target_raises() -> None:
    # RDP over orders <= 63 has an epsilon floor (~0.2 at delta=1e-6)
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise_multiplier(target_epsilon=0.05, delta=1e-6, sample_rate=1.0, steps=100)


def test_event_validation_names_history_index() -> None:
    with pytest.raises(ValueError, match=r"history\[1\].*noise_multiplier=-1"):
        epsilon_from_history(history=[(1.0, 0.1, 1), (-1.0, 0.1, 1)], delta=DELTA)
    with pytest.raises(ValueError, match="method='moments'"):
        epsilon_dp_accounting(history=[(1.0, 0.1, 1)], delta=DELTA, method="moments")


def test_default_orders_are_opacus_orders() -> None:
    assert list(DEFAULT_ORDERS) == [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]


# ------------------------------------------------------------------ client level (device shape)
WOR = {"sampling": "without-replacement", "neighbouring": "replace-one"}
POISSON = {"sampling": "poisson", "neighbouring": "add-remove"}


def _direct_client_epsilon(
    *, z_u: float, sigma_b: float, m: int, n: int, rounds: int, delta: float, wor: bool
) -> float:
    """dp_accounting built by hand: the update sum (sensitivity 2C or C, noise z_u C) and the
    clipped count (sensitivity 1, noise sigma_b) as a ComposedDpEvent on one sample."""
    import dp_accounting

    delta_u = 2.0 if wor else 1.0
    inner = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.GaussianDpEvent(z_u / delta_u),
            dp_accounting.GaussianDpEvent(sigma_b),
        ]
    )
    if wor:
        event: object = dp_accounting.SampledWithoutReplacementDpEvent(n, m, inner)
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    else:
        event = dp_accounting.PoissonSampledDpEvent(m / n, inner)
        relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    acc.compose(event, rounds)
    return float(acc.get_epsilon(delta))


def test_client_level_golden_values() -> None:
    # dp_accounting 0.7 RDP, default orders (recorded on this build).
    from privacy.accounting import epsilon_client_level

    wor = epsilon_client_level(
        noise_multiplier=1.5845007167684282,
        sample_size=50,
        population=500,
        rounds=3,
        delta=2e-4,
        **WOR,
    )
    poisson = epsilon_client_level(
        noise_multiplier=1.0, sample_size=50, population=500, rounds=10, delta=1e-5, **POISSON
    )
    assert wor == pytest.approx(0.9985565975278954, rel=1e-9)
    assert poisson == pytest.approx(3.441642764041644, rel=1e-9)
    # Poisson/add-remove is the construction of the node-level auditor path too.
    assert poisson == pytest.approx(
        epsilon_dp_accounting(history=[(1.0, 0.1, 10)], delta=1e-5, method="rdp"), rel=1e-9
    )


def test_replace_one_device_round_costs_twice_the_sensitivity() -> None:
    # Regression (issue 15 finding 4): main accounted a device round as GaussianDpEvent(z_u)
    # under replace-one, but replacing one device moves the clipped sum by 2C: ≈ 2.7x ε.
    from privacy.accounting import combined_noise_multiplier, epsilon_client_level

    z_u = 2.8203125  # main's calibrated z for device-500, ε=1, δ=1e-3, 20 rounds
    z = combined_noise_multiplier(
        update_noise_multiplier=z_u, clipped_count_stddev=math.inf, neighbouring="replace-one"
    )
    eps = epsilon_client_level(
        noise_multiplier=z, sample_size=50, population=500, rounds=20, delta=1e-3, **WOR
    )
    assert z == pytest.approx(z_u / 2)
    assert eps == pytest.approx(2.6879, abs=1e-3)  # what main called ε = 0.9994
    assert eps == pytest.approx(
        _direct_client_epsilon(
            z_u=z_u, sigma_b=math.inf, m=50, n=500, rounds=20, delta=1e-3, wor=True
        ),
        rel=1e-9,
    )


@pytest.mark.parametrize(("neighbouring", "delta_u"), [("replace-one", 2.0), ("add-remove", 1.0)])
def test_combined_noise_multiplier_matches_dp_accounting_composition(
    neighbouring: str, delta_u: float
) -> None:
    from dp_accounting import ComposedDpEvent, GaussianDpEvent
    from dp_accounting.rdp.rdp_privacy_accountant import _effective_gaussian_noise_multiplier

    from privacy.accounting import combined_noise_multiplier

    z = combined_noise_multiplier(
        update_noise_multiplier=3.0, clipped_count_stddev=5.0, neighbouring=neighbouring
    )
    expected = _effective_gaussian_noise_multiplier(
        ComposedDpEvent([GaussianDpEvent(3.0 / delta_u), GaussianDpEvent(5.0)])
    )
    assert z == pytest.approx(expected, rel=1e-12)
    assert z < min(3.0 / delta_u, 5.0)


@given(
    z=st.floats(min_value=0.05, max_value=50.0),
    ratio=st.floats(min_value=1.0001, max_value=100.0),
    neighbouring=st.sampled_from(["replace-one", "add-remove"]),
)
@settings(max_examples=200, deadline=None)
def test_split_then_combine_never_undershoots(z: float, ratio: float, neighbouring: str) -> None:
    from privacy.accounting import combined_noise_multiplier, split_client_level_noise

    sigma_b = z * ratio
    z_u = split_client_level_noise(
        combined_noise_multiplier=z, clipped_count_stddev=sigma_b, neighbouring=neighbouring
    )
    back = combined_noise_multiplier(
        update_noise_multiplier=z_u, clipped_count_stddev=sigma_b, neighbouring=neighbouring
    )
    assert back >= z
    assert back == pytest.approx(z, rel=1e-9)


def test_split_refuses_a_count_noise_below_the_target() -> None:
    from privacy.accounting import split_client_level_noise

    with pytest.raises(ValueError, match="clipped_count_stddev"):
        split_client_level_noise(
            combined_noise_multiplier=2.0, clipped_count_stddev=2.0, neighbouring="replace-one"
        )


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"sampling": "poisson", "neighbouring": "replace-one"}, "no RDP analysis"),
        ({"sampling": "without-replacement", "neighbouring": "add-remove"}, "no RDP analysis"),
        ({"sampling": "shuffle", "neighbouring": "add-remove"}, "sampling"),
        ({"sampling": "poisson", "neighbouring": "swap"}, "neighbouring"),
        ({**WOR, "sample_size": 0}, "sample_size"),
        ({**WOR, "sample_size": 501}, "sample_size"),
        ({**WOR, "rounds": 0}, "rounds"),
        ({**WOR, "delta": 0.0}, "delta"),
        ({**WOR, "noise_multiplier": -1.0}, "noise_multiplier"),
    ],
)
def test_client_level_validation_names_bad_value(kwargs: dict[str, object], bad: str) -> None:
    from privacy.accounting import epsilon_client_level

    args: dict[str, object] = {
        "noise_multiplier": 1.0,
        "sample_size": 50,
        "population": 500,
        "rounds": 3,
        "delta": 1e-5,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=bad):
        epsilon_client_level(**args)  # type: ignore[arg-type]


def test_client_level_zero_noise_is_infinite_and_infinite_budget_is_no_noise() -> None:
    from privacy.accounting import calibrate_client_level_noise, epsilon_client_level

    assert math.isinf(
        epsilon_client_level(
            noise_multiplier=0.0, sample_size=5, population=10, rounds=1, delta=1e-5, **WOR
        )
    )
    assert (
        calibrate_client_level_noise(
            target_epsilon=math.inf, delta=1e-5, population=10, sample_size=5, rounds=1, **WOR
        )
        == 0.0
    )


@given(
    m=st.integers(min_value=1, max_value=200),
    rounds=st.integers(min_value=1, max_value=100),
    target=st.floats(min_value=0.3, max_value=8.0),
)
@settings(max_examples=8, deadline=None)
def test_calibrated_client_noise_never_overshoots_poisson(
    m: int, rounds: int, target: float
) -> None:
    from privacy.accounting import calibrate_client_level_noise

    z = calibrate_client_level_noise(
        target_epsilon=target,
        delta=1e-5,
        population=1000,
        sample_size=m,
        rounds=rounds,
        **POISSON,
    )
    independent = _direct_client_epsilon(
        z_u=z, sigma_b=math.inf, m=m, n=1000, rounds=rounds, delta=1e-5, wor=False
    )
    assert independent <= target
    assert independent >= target - 0.011


@pytest.mark.parametrize(
    ("n", "m", "rounds", "target", "delta"),
    [(500, 50, 3, 1.0, 2e-4), (500, 50, 20, 1.0, 2e-4)],
)
def test_calibrated_client_noise_never_overshoots_wor(
    n: int, m: int, rounds: int, target: float, delta: float
) -> None:
    # Property on the device shape's own relation (slow analysis: a few fixed cases).
    from privacy.accounting import (
        calibrate_client_level_noise,
        combined_noise_multiplier,
        split_client_level_noise,
    )

    z = calibrate_client_level_noise(
        target_epsilon=target, delta=delta, population=n, sample_size=m, rounds=rounds, **WOR
    )
    sigma_b = 4 * z
    z_u = split_client_level_noise(
        combined_noise_multiplier=z, clipped_count_stddev=sigma_b, neighbouring="replace-one"
    )
    independent = _direct_client_epsilon(
        z_u=z_u, sigma_b=sigma_b, m=m, n=n, rounds=rounds, delta=delta, wor=True
    )
    assert (
        combined_noise_multiplier(
            update_noise_multiplier=z_u, clipped_count_stddev=sigma_b, neighbouring="replace-one"
        )
        >= z
    )
    assert independent <= target
    assert independent >= 0.99 * target


def test_client_level_calibration_matches_flower_accountant() -> None:
    # Flower's RdpAccountant with the same (effective) multiplier reports the same ε.
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    from privacy.accounting import epsilon_client_level

    z = 1.5845007167684282  # calibrated for ε=1 (test_calibrated_client_noise_never_overshoots_wor)
    ours = epsilon_client_level(
        noise_multiplier=z, population=500, sample_size=50, rounds=3, delta=2e-4, **WOR
    )
    flower = RdpAccountant(
        PrivacyConfig(
            2e-4, 500, NeighboringRelation.REPLACE_ONE, SamplingMethod.WITHOUT_REPLACEMENT
        )
    )
    for _ in range(3):
        flower.compose(
            GaussianPrivacyEvent(noise_multiplier=z, sample_size=50, population_size=500)
        )
    assert 0.99 <= ours <= 1.0
    assert flower.get_privacy_spent().epsilon == pytest.approx(ours, rel=1e-9)


def test_client_level_delta_is_at_most_a_tenth_of_one_over_the_population() -> None:
    from privacy.accounting import client_level_delta

    assert client_level_delta(delta=1e-3, population=500) == pytest.approx(2e-4)
    assert client_level_delta(delta=1e-6, population=500) == 1e-6
    with pytest.raises(ValueError, match="population"):
        client_level_delta(delta=1e-3, population=0)
    with pytest.raises(ValueError, match="delta"):
        client_level_delta(delta=1.0, population=10)


def test_client_level_plan_edges() -> None:
    from privacy.accounting import plan_client_level_noise

    assert plan_client_level_noise(
        target_epsilon=math.inf, delta=1e-5, population=10, sample_size=5, rounds=1
    ) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="count_noise_ratio"):
        plan_client_level_noise(
            target_epsilon=1.0,
            delta=1e-5,
            population=10,
            sample_size=5,
            rounds=1,
            count_noise_ratio=1.0,
        )
