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

Client-level DP (the device shape: one client = one user) has its own section:
:func:`epsilon_client_level` (``dp_accounting`` RDP for a stated sampling and neighbouring
relation, independent of Flower), :func:`combined_noise_multiplier` (update sum + clipped count
as one Gaussian, with the proof), :func:`calibrate_client_level_noise`,
:func:`plan_client_level_noise` and :func:`client_level_delta`.

A noise multiplier of ``0.0`` means "no noise" (non-private); its epsilon is ``math.inf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

__all__ = [
    "CLIENT_NEIGHBOURINGS",
    "CLIENT_SAMPLINGS",
    "CLIPPED_COUNT_SENSITIVITY",
    "COUNT_NOISE_RATIO",
    "calibrate_client_level_noise",
    "client_level_delta",
    "combined_noise_multiplier",
    "epsilon_client_level",
    "plan_client_level_noise",
    "split_client_level_noise",
    "update_noise_for",
    "update_sensitivity",
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
def _search_noise_multiplier(
    eps_of: Callable[[float], float],
    *,
    target_epsilon: float,
    epsilon_tolerance: float,
    unreachable: str,
) -> float:
    """Smallest sigma (to ``epsilon_tolerance`` in epsilon) with ``eps_of(sigma) <= target``.

    ``eps_of`` must be non-increasing in sigma. Only a sigma whose epsilon was computed and
    found ``<= target_epsilon`` is ever returned. ``ValueError(unreachable)`` past
    :data:`MAX_NOISE_MULTIPLIER`.
    """
    # Bracket: eps(sigma_low) > target >= eps(sigma_high); sigma_low = 0 means "no noise".
    sigma_low, sigma_high = 0.0, 1.0
    eps_low = math.inf
    eps_high = eps_of(sigma_high)
    while eps_high > target_epsilon:
        sigma_low, eps_low = sigma_high, eps_high
        sigma_high = 4.0 * sigma_high
        if sigma_high > MAX_NOISE_MULTIPLIER:
            raise ValueError(unreachable)
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

    unreachable = (
        f"target_epsilon={target_epsilon!r} is unreachable with noise_multiplier <= "
        f"{MAX_NOISE_MULTIPLIER:g} (delta={delta!r}, sample_rate={sample_rate!r}, "
        f"steps={steps!r}); RDP over orders <= 63 cannot certify very small epsilon, "
        "try accountant='prv'"
    )
    return _search_noise_multiplier(
        eps_of,
        target_epsilon=target_epsilon,
        epsilon_tolerance=epsilon_tolerance,
        unreachable=unreachable,
    )


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


# --------------------------------------------------------------------------------------------
# client-level DP (device shape): one client = one user
# --------------------------------------------------------------------------------------------
CLIENT_SAMPLINGS: tuple[str, ...] = ("without-replacement", "poisson")
"""How a round's clients are sampled (the ledger's ``sampling`` values)."""

CLIENT_NEIGHBOURINGS: tuple[str, ...] = ("replace-one", "add-remove")
"""Neighbouring relations between client populations (the ledger's ``neighbouring`` values)."""

_SUPPORTED_CLIENT_ACCOUNTING = {
    ("without-replacement", "replace-one"),
    ("poisson", "add-remove"),
}

CLIPPED_COUNT_SENSITIVITY = 1.0
"""L2 sensitivity of the clipped-count query under either relation: a client's bit is 0 or 1."""


def _check_client_relation(*, sampling: str, neighbouring: str) -> None:
    if sampling not in CLIENT_SAMPLINGS:
        raise ValueError(f"sampling must be one of {CLIENT_SAMPLINGS}, got sampling={sampling!r}")
    if neighbouring not in CLIENT_NEIGHBOURINGS:
        raise ValueError(
            f"neighbouring must be one of {CLIENT_NEIGHBOURINGS}, got neighbouring={neighbouring!r}"
        )
    if (sampling, neighbouring) not in _SUPPORTED_CLIENT_ACCOUNTING:
        raise ValueError(
            f"no RDP analysis for sampling={sampling!r} with neighbouring={neighbouring!r}: "
            "sampling without replacement is analysed under replace-one (the population size "
            "is public), Poisson sampling under add-remove"
        )


def update_sensitivity(*, neighbouring: str) -> float:
    """L2 sensitivity of the sum of clipped client updates, in units of the clip norm ``C``.

    ``"replace-one"``: replacing client ``u`` by ``u'`` moves the sum by
    ``clip(u) - clip(u')``, of norm up to ``2C``, so ``2.0``. ``"add-remove"``: adding or
    removing one client moves it by ``clip(u)``, of norm up to ``C``, so ``1.0``.

    Raises
    ------
    ValueError
        On an unknown relation.
    """
    if neighbouring == "replace-one":
        return 2.0
    if neighbouring == "add-remove":
        return 1.0
    raise ValueError(
        f"neighbouring must be one of {CLIENT_NEIGHBOURINGS}, got neighbouring={neighbouring!r}"
    )


def combined_noise_multiplier(
    *, update_noise_multiplier: float, clipped_count_stddev: float, neighbouring: str
) -> float:
    r"""Effective noise multiplier of one adaptive-clipping round (update sum + clipped count).

    Each round, on the same sample ``S`` of clients, the server releases

    * the sum of clipped updates plus ``N(0, (z_u C)^2 I_d)`` (``z_u`` =
      ``update_noise_multiplier``, ``C`` the clip norm the clients clipped to), and
    * the number of clients whose update was clipped plus ``N(0, sigma_b^2)``
      (``sigma_b`` = ``clipped_count_stddev``; Andrew et al.'s adaptive clipping; the next
      round's clip norm is a function of this count only, i.e. post-processing).

    Returns ``z = (Delta_u^2 / z_u^2 + Delta_b^2 / sigma_b^2) ** -1/2`` with
    ``Delta_u = update_sensitivity(neighbouring)`` (2 for replace-one, 1 for add-remove) and
    ``Delta_b = 1``: the pair of releases is exactly as private as one Gaussian mechanism with
    noise multiplier ``z`` (noise std over L2 sensitivity), so ``GaussianDpEvent(z)`` under the
    same subsampling and neighbouring relation accounts for both queries of the round.

    Proof. Write ``M(S) = (A(S) + z_u C xi_1, B(S) + sigma_b xi_2)`` with
    ``A(S) = sum_{i in S} clip_C(u_i)``, ``B(S) = sum_{i in S} b_i`` (``b_i`` in {0, 1}) and
    ``xi = (xi_1, xi_2) ~ N(0, I_{d+1})``. The map ``T(a, b) = (a / (z_u C), b / sigma_b)``
    is public and invertible, so ``M`` and ``T o M`` have the same privacy (post-processing
    both ways), and ``T o M(S) = g(S) + xi`` with ``g(S) = (A(S) / (z_u C), B(S) / sigma_b)``:
    an isotropic unit-variance Gaussian mechanism. For neighbours ``S ~ S'``,
    ``||g(S) - g(S')||^2 = ||A(S) - A(S')||^2 / (z_u C)^2 + |B(S) - B(S')|^2 / sigma_b^2
    <= Delta_u^2 / z_u^2 + Delta_b^2 / sigma_b^2 = 1 / z^2``, because
    ``||A(S) - A(S')|| <= Delta_u C`` (one clipped update changed or added/removed) and
    ``|B(S) - B(S')| <= 1`` (one bit). The privacy loss distribution (hence every RDP order and
    the PLD) of a unit-variance Gaussian mechanism depends only on the L2 distance of the two
    means and is monotone in it, and equals that of ``GaussianDpEvent(z)`` at distance ``1/z``.
    Subsampling (without replacement or Poisson) acts on ``S`` before both queries, so the
    subsampled pair is the subsampled ``GaussianDpEvent(z)``; adaptively chosen rounds (the clip
    norm depends on earlier outputs) compose as usual under RDP. This is the same combination
    ``dp_accounting`` applies to a ``ComposedDpEvent`` of Gaussians
    (``z^-2 = sum_i z_i^-2`` with ``z_1 = z_u / Delta_u``, ``z_2 = sigma_b / Delta_b``).

    Flower 1.42's adaptive-clipping wrappers use ``z^-2 = z_u^-2 + (2 sigma_b)^-2``: the
    add-remove relation with a centred bit (sensitivity 1/2). Under replace-one with the raw
    count they send, both terms are larger.

    Parameters
    ----------
    update_noise_multiplier : float
        ``z_u``: std of the noise on the *sum* of clipped updates over the clip norm, ``>= 0``.
    clipped_count_stddev : float
        ``sigma_b``: std of the noise on the clipped count, ``>= 0``; ``math.inf`` when no
        count is released (fixed clipping).
    neighbouring : {"replace-one", "add-remove"}
        The neighbouring relation.

    Returns
    -------
    float
        The effective noise multiplier ``z`` (``0.0`` when either release is noiseless).

    Raises
    ------
    ValueError
        On a negative or NaN value or an unknown relation.
    """
    delta_u = update_sensitivity(neighbouring=neighbouring)
    for name, value in (
        ("update_noise_multiplier", update_noise_multiplier),
        ("clipped_count_stddev", clipped_count_stddev),
    ):
        if not _is_number(value) or math.isnan(value) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {name}={value!r}")
    if not math.isfinite(update_noise_multiplier):
        raise ValueError(f"update_noise_multiplier must be finite, got {update_noise_multiplier!r}")
    return _combine(float(update_noise_multiplier), float(clipped_count_stddev), delta_u)


def _combine(z_u: float, sigma_b: float, delta_u: float) -> float:
    if z_u == 0.0 or sigma_b == 0.0:
        return 0.0
    precision = (delta_u / z_u) ** 2 + (CLIPPED_COUNT_SENSITIVITY / sigma_b) ** 2
    return float(precision**-0.5)


def update_noise_for(
    *, combined_noise_multiplier: float, clipped_count_stddev: float, neighbouring: str
) -> float:
    """The ``z_u`` that gives an effective multiplier of exactly ``combined_noise_multiplier``.

    The inverse of :func:`combined_noise_multiplier` in its first argument:
    ``z_u = Delta_u / sqrt(z^-2 - sigma_b^-2)``; the count alone must be less private than the
    target (``sigma_b > z``, as ``Delta_b = 1``). Floating point may land a hair on either side:
    callers that must not overshoot nudge the result up (see :func:`split_client_level_noise`).

    Raises
    ------
    ValueError
        When ``clipped_count_stddev <= combined_noise_multiplier`` (the count query alone would
        spend more than the budget), on a value ``<= 0`` or an unknown relation.
    """
    delta_u = update_sensitivity(neighbouring=neighbouring)
    z, sigma_b = combined_noise_multiplier, clipped_count_stddev
    if not _is_number(z) or not math.isfinite(z) or z <= 0:
        raise ValueError(f"combined_noise_multiplier must be finite and > 0, got {z!r}")
    if not _is_number(sigma_b) or math.isnan(sigma_b) or sigma_b <= z:
        raise ValueError(
            f"clipped_count_stddev={sigma_b!r} must exceed the combined noise multiplier {z!r}: "
            "the clipped-count query alone would spend the whole budget"
        )
    return float(delta_u / math.sqrt(z**-2 - sigma_b**-2))


def split_client_level_noise(
    *, combined_noise_multiplier: float, clipped_count_stddev: float, neighbouring: str
) -> float:
    """``z_u`` (as :func:`update_noise_for`) rounded up so the combination is ``>= target``.

    Guarantees ``combined_noise_multiplier(update_noise_multiplier=result, ...) >=
    combined_noise_multiplier`` in floating point, so an ε computed from the target is never
    below the ε of what is actually run.
    """
    z_u = update_noise_for(
        combined_noise_multiplier=combined_noise_multiplier,
        clipped_count_stddev=clipped_count_stddev,
        neighbouring=neighbouring,
    )
    delta_u = update_sensitivity(neighbouring=neighbouring)
    for _ in range(64):
        if _combine(z_u, float(clipped_count_stddev), delta_u) >= combined_noise_multiplier:
            return z_u
        z_u = math.nextafter(z_u, math.inf) * (1.0 + 1e-12)
    raise ArithmeticError("could not round the update noise multiplier up")  # pragma: no cover


def _client_dp_event(
    *, noise_multiplier: float, sample_size: int, population: int, sampling: str
) -> object:
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling == "without-replacement":
        return dp_accounting.SampledWithoutReplacementDpEvent(population, sample_size, gaussian)
    return dp_accounting.PoissonSampledDpEvent(sample_size / population, gaussian)


def epsilon_client_level(
    *,
    noise_multiplier: float,
    sample_size: int,
    population: int,
    rounds: int,
    delta: float,
    sampling: str,
    neighbouring: str,
) -> float:
    """ε of ``rounds`` rounds of client-level DP, by Google's ``dp_accounting`` RDP.

    Independent of Flower (its ``RdpAccountant`` is not used): each round is
    ``SampledWithoutReplacementDpEvent(population, sample_size, GaussianDpEvent(z))`` under
    ``NeighboringRelation.REPLACE_ONE`` (Wang, Balle & Kasiviswanathan 2019, Thm. 27), or
    ``PoissonSampledDpEvent(sample_size / population, GaussianDpEvent(z))`` under
    ``ADD_OR_REMOVE_ONE``, self-composed ``rounds`` times by
    ``dp_accounting.rdp.RdpAccountant`` with its default orders (as Flower builds it).

    Parameters
    ----------
    noise_multiplier : float
        ``z``: noise std over the L2 sensitivity *under the stated neighbouring relation*, for
        all of a round's releases together: for the device shape
        :func:`combined_noise_multiplier` of the update and clipped-count noise (for
        replace-one that is about ``z_u / 2``, not ``z_u``). ``0`` gives ``math.inf``.
    sample_size : int
        Clients sampled per round (the expected number for Poisson sampling), ``1..population``.
    population : int
        Number of clients, ``>= 1``.
    rounds : int
        Number of rounds released, ``>= 1``.
    delta : float
        Target delta, in (0, 1).
    sampling : {"without-replacement", "poisson"}
        Fixed-size uniform sampling without replacement, or Poisson sampling at
        ``sample_size / population``.
    neighbouring : {"replace-one", "add-remove"}
        ``"replace-one"`` with ``"without-replacement"``; ``"add-remove"`` with ``"poisson"``.

    Returns
    -------
    float
        The epsilon after ``rounds`` rounds.

    Raises
    ------
    ValueError
        On an out-of-range argument (naming it) or an unsupported sampling/relation pair.
    """
    import dp_accounting

    _check_client_relation(sampling=sampling, neighbouring=neighbouring)
    delta = validate_delta(delta)
    for name, value in (("population", population), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}")
    if (
        isinstance(sample_size, bool)
        or not isinstance(sample_size, int)
        or not 0 < sample_size <= population
    ):
        raise ValueError(
            f"sample_size must be an integer in [1, population={population}], "
            f"got sample_size={sample_size!r}"
        )
    if (
        not _is_number(noise_multiplier)
        or not math.isfinite(noise_multiplier)
        or (noise_multiplier < 0)
    ):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if noise_multiplier == 0:
        return math.inf
    relation = (
        dp_accounting.NeighboringRelation.REPLACE_ONE
        if neighbouring == "replace-one"
        else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    accountant.compose(
        _client_dp_event(
            noise_multiplier=float(noise_multiplier),
            sample_size=sample_size,
            population=population,
            sampling=sampling,
        ),
        rounds,
    )
    eps = float(accountant.get_epsilon(delta))
    return math.inf if math.isnan(eps) else eps


def calibrate_client_level_noise(
    *,
    target_epsilon: float,
    delta: float,
    population: int,
    sample_size: int,
    rounds: int,
    sampling: str,
    neighbouring: str,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest effective noise multiplier whose whole-run ε (as
    :func:`epsilon_client_level`) is ``<= target_epsilon``, to ``epsilon_tolerance``.

    The result is the *combined* multiplier of a round (see :func:`combined_noise_multiplier`;
    split it into update and count noise with :func:`split_client_level_noise`). The same
    search as :func:`calibrate_noise_multiplier`: only a multiplier whose ε was computed and
    found ``<= target_epsilon`` is returned, so it never overshoots; its ε is within
    ``epsilon_tolerance`` (absolute) below the target unless the bracket closes first.
    ``target_epsilon = inf`` gives ``0.0`` (no noise).

    Raises
    ------
    ValueError
        On an out-of-range argument, or when even :data:`MAX_NOISE_MULTIPLIER` is not enough.
    """
    if not _is_number(target_epsilon) or math.isnan(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got target_epsilon={target_epsilon!r}")
    if (
        not _is_number(epsilon_tolerance)
        or not math.isfinite(epsilon_tolerance)
        or epsilon_tolerance <= 0
    ):
        raise ValueError(
            f"epsilon_tolerance must be a finite number > 0, got {epsilon_tolerance!r}"
        )

    def eps_of(z: float) -> float:
        return epsilon_client_level(
            noise_multiplier=z,
            sample_size=sample_size,
            population=population,
            rounds=rounds,
            delta=delta,
            sampling=sampling,
            neighbouring=neighbouring,
        )

    eps_of(1.0)  # validates every argument before the infinite-budget shortcut
    if math.isinf(target_epsilon):
        return 0.0
    return _search_noise_multiplier(
        eps_of,
        target_epsilon=target_epsilon,
        epsilon_tolerance=epsilon_tolerance,
        unreachable=(
            f"target_epsilon={target_epsilon!r} is unreachable with noise_multiplier <= "
            f"{MAX_NOISE_MULTIPLIER:g} (delta={delta!r}, sample_size={sample_size!r}, "
            f"population={population!r}, rounds={rounds!r})"
        ),
    )


COUNT_NOISE_RATIO = 4.0
"""Default ratio of the clipped-count noise to the effective multiplier in
:func:`plan_client_level_noise`: the count query takes at most ``1/16`` of each round's RDP."""


def client_level_delta(*, delta: float, population: int) -> float:
    """δ used for client-level DP over ``population`` clients: ``min(delta, 1/(10 population))``.

    A δ near ``1/population`` allows mechanisms that publish one client's data outright.

    Raises
    ------
    ValueError
        On a delta outside (0, 1) or a population below 1.
    """
    delta = validate_delta(delta)
    if isinstance(population, bool) or not isinstance(population, int) or population < 1:
        raise ValueError(f"population must be an integer >= 1, got population={population!r}")
    return min(delta, 1.0 / (10.0 * population))


def plan_client_level_noise(
    *,
    target_epsilon: float,
    delta: float,
    population: int,
    sample_size: int,
    rounds: int,
    sampling: str = "without-replacement",
    neighbouring: str = "replace-one",
    count_noise_ratio: float = COUNT_NOISE_RATIO,
) -> tuple[float, float, float]:
    """Noise plan of an adaptive-clipping client-level run: ``(z, z_u, sigma_b)``.

    ``z`` is :func:`calibrate_client_level_noise` for the whole planned run,
    ``sigma_b = max(sample_size / 20, count_noise_ratio * z)`` (Andrew et al.'s recommended
    count noise, or more) and ``z_u = split_client_level_noise(z, sigma_b)``, so that
    ``combined_noise_multiplier(z_u, sigma_b) >= z`` and the run's ε is ``<= target_epsilon``.
    ``(0.0, 0.0, 0.0)`` for an infinite budget. Pure: a verifier can recompute a run's plan
    from its configuration.

    Raises
    ------
    ValueError
        On an out-of-range argument, or ``count_noise_ratio <= 1``.
    """
    if not _is_number(count_noise_ratio) or not count_noise_ratio > 1:
        raise ValueError(f"count_noise_ratio must be > 1, got {count_noise_ratio!r}")
    z = calibrate_client_level_noise(
        target_epsilon=target_epsilon,
        delta=delta,
        population=population,
        sample_size=sample_size,
        rounds=rounds,
        sampling=sampling,
        neighbouring=neighbouring,
    )
    if z == 0.0:
        return 0.0, 0.0, 0.0
    sigma_b = max(sample_size / 20.0, count_noise_ratio * z)
    z_u = split_client_level_noise(
        combined_noise_multiplier=z, clipped_count_stddev=sigma_b, neighbouring=neighbouring
    )
    return z, z_u, sigma_b
