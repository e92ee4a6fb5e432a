"""Pure privacy-accounting math for fedrank.

Every function here is a pure, keyword-only function of its arguments (the Opacus style).
A *privacy event* is a tuple ``(noise_multiplier, sample_rate, steps)``: ``steps`` applications of
the Poisson-subsampled Gaussian mechanism with sampling rate ``sample_rate`` and noise multiplier
``noise_multiplier`` (the shape of an entry of ``opacus.accountants.IAccountant.history``).
A *history* is a sequence of events, composed sequentially.

Two families of accountants are used:

* Opacus (:func:`epsilon_rdp`, :func:`epsilon_from_history`, :func:`calibrate_noise_multiplier`):
  what training uses to spend and to plan the budget.
* Google's ``dp_accounting`` (:func:`epsilon_dp_accounting`): an independent recomputation for the
  auditor.  Its RDP result agrees with Opacus' RDP to well under 1 %; its PLD result is tighter
  (lower), so a claimed RDP epsilon must always be ``>=`` the PLD recomputation.

A noise multiplier of ``0.0`` means "no noise" (non-private); its epsilon is ``math.inf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

__all__ = [
    "calibrate_client_level_noise",
    "epsilon_client_level",
    "ACCOUNTANTS",
    "DEFAULT_ORDERS",
    "MAX_NOISE_MULTIPLIER",
    "PrivacyEvent",
    "calibrate_noise_multiplier",
    "epsilon_dp_accounting",
    "epsilon_from_history",
    "epsilon_rdp",
    "validate_delta",
    "validate_event",
]

PrivacyEvent = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)``, as in Opacus' ``accountant.history``."""

DEFAULT_ORDERS: tuple[float, ...] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)
"""RDP orders used by Opacus' ``RDPAccountant`` (1.1 ... 10.9, 12 ... 63)."""

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
"""Opacus accountants supported by :func:`epsilon_from_history` and the calibration."""

MAX_NOISE_MULTIPLIER = 1e6
"""Calibration gives up (``ValueError``) above this noise multiplier (as Opacus does)."""

_DP_ACCOUNTING_METHODS = ("pld", "rdp")
_MAX_BISECTION_STEPS = 200


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_delta(delta: float) -> float:
    """Check that ``delta`` is in the open interval (0, 1).

    Parameters
    ----------
    delta : float
        Target delta of the (epsilon, delta)-DP guarantee.

    Returns
    -------
    float
        ``delta`` as a float.

    Raises
    ------
    ValueError
        If ``delta`` is not a number in (0, 1); the message names the bad value.
    """
    if not _is_number(delta) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), got delta={delta!r}")
    return float(delta)


def validate_event(*, noise_multiplier: float, sample_rate: float, steps: int) -> PrivacyEvent:
    """Validate one privacy event and return it in canonical ``(float, float, int)`` form.

    Parameters
    ----------
    noise_multiplier : float
        Ratio of the Gaussian noise standard deviation to the clipping norm; finite, ``>= 0``
        (``0`` means no noise, i.e. infinite epsilon).
    sample_rate : float
        Poisson sampling rate ``q``, in (0, 1].
    steps : int
        Number of noisy steps, an integer ``>= 1``.

    Returns
    -------
    tuple of (float, float, int)
        ``(noise_multiplier, sample_rate, steps)``.

    Raises
    ------
    ValueError
        If a value is out of range; the message names the bad value.
    """
    if (
        not _is_number(noise_multiplier)
        or not math.isfinite(noise_multiplier)
        or noise_multiplier < 0
    ):
        raise ValueError(
            "noise_multiplier must be a finite number >= 0, "
            f"got noise_multiplier={noise_multiplier!r}"
        )
    if not _is_number(sample_rate) or not 0.0 < float(sample_rate) <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got sample_rate={sample_rate!r}")
    # Accept integral floats such as 10.0 (e.g. read back from JSON) but nothing else.
    steps_value: object = steps
    if isinstance(steps_value, float) and steps_value.is_integer():
        steps_value = int(steps_value)
    if isinstance(steps_value, bool) or not isinstance(steps_value, int) or steps_value < 1:
        raise ValueError(f"steps must be an integer >= 1, got steps={steps!r}")
    steps = steps_value
    return (float(noise_multiplier), float(sample_rate), int(steps))


def _validate_history(history: Sequence[Sequence[float]]) -> list[PrivacyEvent]:
    events: list[PrivacyEvent] = []
    for index, entry in enumerate(history):
        if len(entry) != 3:
            raise ValueError(
                f"history[{index}] must be (noise_multiplier, sample_rate, steps), got {entry!r}"
            )
        try:
            events.append(
                validate_event(
                    noise_multiplier=entry[0],
                    sample_rate=entry[1],
                    steps=cast(int, entry[2]),
                )
            )
        except ValueError as exc:
            raise ValueError(f"history[{index}] is invalid: {exc}") from exc
    return events


def _validate_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got accountant={accountant!r}")
    return accountant


# --------------------------------------------------------------------------------------------
# epsilon with Opacus
# --------------------------------------------------------------------------------------------
def _epsilon_rdp_events(
    events: Sequence[PrivacyEvent], delta: float, orders: Sequence[float]
) -> float:
    if not events:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in events):
        return math.inf
    rdp = sum(
        opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders))
        for sigma, q, steps in events
    )
    eps, _ = opacus_rdp.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    eps = float(eps)
    return math.inf if math.isnan(eps) else eps


def _epsilon_prv_events(events: Sequence[PrivacyEvent], delta: float) -> float:
    if not events:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in events):
        return math.inf
    accountant = PRVAccountant()
    accountant.history = list(events)
    return float(accountant.get_epsilon(delta=delta))


def epsilon_rdp(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps, by Opacus' RDP analysis.

    Equal to ``opacus.accountants.RDPAccountant`` with ``history=[(noise_multiplier,
    sample_rate, steps)]`` and the same orders.

    Parameters
    ----------
    noise_multiplier : float
        Noise standard deviation over clipping norm, ``>= 0`` (``0`` gives ``math.inf``).
    sample_rate : float
        Poisson sampling rate, in (0, 1].
    steps : int
        Number of steps, ``>= 1``.
    delta : float
        Target delta, in (0, 1).
    orders : sequence of float, optional
        RDP orders to optimise over; defaults to Opacus' ``RDPAccountant.DEFAULT_ALPHAS``.

    Returns
    -------
    float
        The epsilon spent (``math.inf`` when non-private).

    Raises
    ------
    ValueError
        On an out-of-range argument, naming it.
    """
    event = validate_event(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return _epsilon_rdp_events([event], validate_delta(delta), orders)


def epsilon_from_history(
    *,
    history: Sequence[Sequence[float]],
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon of a heterogeneous history of events, composed, by an Opacus accountant.

    Parameters
    ----------
    history : sequence of (noise_multiplier, sample_rate, steps)
        Events in the form of Opacus' ``accountant.history``. An empty history costs ``0.0``.
    delta : float
        Target delta, in (0, 1).
    accountant : {"rdp", "prv"}
        ``"rdp"``: RDP composition (Opacus ``RDPAccountant``, default orders).
        ``"prv"``: numerical PRV composition (Opacus ``PRVAccountant``; returns its upper bound).

    Returns
    -------
    float
        The epsilon spent over the whole history (``math.inf`` if any event has no noise).

    Raises
    ------
    ValueError
        On an invalid event, delta or accountant name, naming it.
    """
    delta = validate_delta(delta)
    accountant = _validate_accountant(accountant)
    events = _validate_history(history)
    if accountant == "rdp":
        return _epsilon_rdp_events(events, delta, DEFAULT_ORDERS)
    return _epsilon_prv_events(events, delta)


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------
def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier whose epsilon over the whole planned run is ``<= target``.

    A bracketing search like ``opacus.accountants.utils.get_noise_multiplier``: the noise
    multiplier is multiplied by 4 (from 1) until the epsilon of ``steps`` steps is at most
    ``target_epsilon``, then the bracket is shrunk (log-log interpolation safeguarded by
    bisection) until the epsilon of the returned value lies within ``epsilon_tolerance``
    (absolute, as in Opacus) below the target. The returned value is always
    one whose epsilon was computed and found ``<= target_epsilon``: it never overshoots.

    Parameters
    ----------
    target_epsilon : float
        Budget for the whole run, ``> 0``; ``math.inf`` returns ``0.0`` (no noise).
    delta : float
        Target delta, in (0, 1).
    sample_rate : float
        Poisson sampling rate, in (0, 1].
    steps : int
        Total number of steps of the planned run (all rounds), ``>= 1``.
    accountant : {"rdp", "prv"}
        Opacus accountant used to compute epsilon.
    epsilon_tolerance : float
        Absolute tolerance below the target at which the search stops, ``> 0``.

    Returns
    -------
    float
        The noise multiplier.

    Raises
    ------
    ValueError
        On an out-of-range argument (naming it), or when even ``MAX_NOISE_MULTIPLIER`` does not
        reach the target.
    """
    if not _is_number(target_epsilon) or math.isnan(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got target_epsilon={target_epsilon!r}")
    delta = validate_delta(delta)
    accountant = _validate_accountant(accountant)
    # Validate q and steps with a placeholder noise multiplier.
    _, sample_rate, steps = validate_event(
        noise_multiplier=1.0, sample_rate=sample_rate, steps=steps
    )
    if (
        not _is_number(epsilon_tolerance)
        or not math.isfinite(epsilon_tolerance)
        or epsilon_tolerance <= 0
    ):
        raise ValueError(
            "epsilon_tolerance must be a finite number > 0, "
            f"got epsilon_tolerance={epsilon_tolerance!r}"
        )
    if math.isinf(target_epsilon):
        return 0.0

    def eps_of(sigma: float) -> float:
        events = [(sigma, sample_rate, steps)]
        if accountant == "rdp":
            return _epsilon_rdp_events(events, delta, DEFAULT_ORDERS)
        return _epsilon_prv_events(events, delta)

    # Bracket: eps(sigma_low) > target >= eps(sigma_high); sigma_low = 0 means "no noise".
    sigma_low, sigma_high = 0.0, 1.0
    eps_low = math.inf
    eps_high = eps_of(sigma_high)
    while eps_high > target_epsilon:
        sigma_low, eps_low = sigma_high, eps_high
        sigma_high = 4.0 * sigma_high
        if sigma_high > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"target_epsilon={target_epsilon!r} is unreachable with noise_multiplier <= "
                f"{MAX_NOISE_MULTIPLIER:g} (delta={delta!r}, sample_rate={sample_rate!r}, "
                f"steps={steps!r}); RDP over orders <= 63 cannot certify very small epsilon, "
                "try accountant='prv'"
            )
        eps_high = eps_of(sigma_high)

    # Shrink the bracket, alternating an interpolation step (log eps is close to linear in
    # log sigma; aim slightly below the target so the step tends to land on the feasible side)
    # with a bisection step whenever the bracket did not halve. Only sigma_high is returned,
    # and only a sigma whose epsilon was computed and is <= target ever becomes sigma_high.
    aim = max(target_epsilon - 0.5 * epsilon_tolerance, 0.5 * target_epsilon)
    interpolate = True
    for _ in range(_MAX_BISECTION_STEPS):
        if target_epsilon - eps_high <= epsilon_tolerance:
            break
        width = sigma_high - sigma_low
        sigma = 0.5 * (sigma_low + sigma_high)
        if interpolate and sigma_low > 0 and math.isfinite(eps_low) and eps_high > 0:
            x_low, x_high = math.log(sigma_low), math.log(sigma_high)
            y_low, y_high = math.log(eps_low), math.log(eps_high)
            if y_low > y_high:
                x = x_low + (math.log(aim) - y_low) * (x_high - x_low) / (y_high - y_low)
                margin = 0.01 * width
                sigma = min(max(math.exp(x), sigma_low + margin), sigma_high - margin)
        if not sigma_low < sigma < sigma_high:  # bracket exhausted at float precision
            break
        eps = eps_of(sigma)
        if eps <= target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low, eps_low = sigma, eps
        # interpolate again only if the bracket at least halved
        interpolate = (sigma_high - sigma_low) <= 0.5 * width
    return sigma_high


# --------------------------------------------------------------------------------------------
# independent recomputation with Google's dp_accounting
# --------------------------------------------------------------------------------------------
def epsilon_dp_accounting(
    *,
    history: Sequence[Sequence[float]],
    delta: float,
    method: str = "pld",
    orders: Sequence[float] | None = None,
    value_discretization_interval: float = 1e-4,
) -> float:
    """Recompute the epsilon of a history with Google's ``dp_accounting`` (for the auditor).

    Each event becomes ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
    GaussianDpEvent(sigma)), steps)``; the history is a ``ComposedDpEvent`` of those, under the
    add-or-remove-one neighbouring relation (the one Opacus' analysis uses).

    Parameters
    ----------
    history : sequence of (noise_multiplier, sample_rate, steps)
        Events as in Opacus' ``accountant.history``.
    delta : float
        Target delta, in (0, 1).
    method : {"pld", "rdp"}
        ``"pld"``: ``dp_accounting.pld.PLDAccountant`` (pessimistic, tight; lower than RDP).
        ``"rdp"``: ``dp_accounting.rdp.RdpAccountant`` (agrees with Opacus' RDP within 1 %).
    orders : sequence of float, optional
        RDP orders for ``method="rdp"``; ``None`` uses ``dp_accounting``'s own defaults.
    value_discretization_interval : float
        PLD discretization interval for ``method="pld"`` (smaller is tighter and slower).

    Returns
    -------
    float
        The epsilon (``0.0`` for an empty history, ``math.inf`` if any event has no noise).

    Raises
    ------
    ValueError
        On an invalid event, delta or method, naming it.
    """
    import dp_accounting  # local import: only the auditor path needs it

    delta = validate_delta(delta)
    if method not in _DP_ACCOUNTING_METHODS:
        raise ValueError(f"method must be one of {_DP_ACCOUNTING_METHODS}, got method={method!r}")
    events = _validate_history(history)
    if not events:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in events):
        return math.inf
    dp_event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps,
            )
            for sigma, q, steps in events
        ]
    )
    acc: dp_accounting.PrivacyAccountant
    if method == "pld":
        acc = dp_accounting.pld.PLDAccountant(
            value_discretization_interval=value_discretization_interval
        )
    else:
        acc = dp_accounting.rdp.RdpAccountant(orders=None if orders is None else list(orders))
    acc.compose(dp_event)
    eps = float(acc.get_epsilon(delta))
    return math.inf if math.isnan(eps) else eps


def epsilon_client_level(
    *, noise_multiplier: float, population: int, sample_size: int, rounds: int, delta: float
) -> float:
    """ε of ``rounds`` rounds of client-level DP with fixed-size sampling without replacement.

    The construction Flower's ``RdpAccountant`` uses for its DP wrappers (dp-accounting RDP,
    ``SampledWithoutReplacementDpEvent`` of a Gaussian, replace-one neighbouring relation).
    """
    import dp_accounting

    if not 0 < sample_size <= population:
        raise ValueError(
            f"sample_size must be in (0, population={population}], got {sample_size!r}"
        )
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    if noise_multiplier <= 0:
        return math.inf
    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        population, sample_size, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def calibrate_client_level_noise(
    *,
    target_epsilon: float,
    delta: float,
    population: int,
    sample_size: int,
    rounds: int,
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier z (to ``tolerance``) whose whole-run ε stays <= target.

    ``target_epsilon = inf`` gives 0.0 (no noise).
    """
    if math.isinf(target_epsilon):
        return 0.0
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")

    def eps(z: float) -> float:
        return epsilon_client_level(
            noise_multiplier=z, population=population, sample_size=sample_size,
            rounds=rounds, delta=delta,
        )

    low, high = 0.05, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"no noise multiplier reaches ε={target_epsilon} at δ={delta}")
    while high - low > tolerance:
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
