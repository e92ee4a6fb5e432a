"""One-run privacy auditing with canaries: the ε lower bound (pure math, no Flower, no torch).

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023).
``m`` canaries are each included in the training data independently with probability 1/2
(``S_i ∈ {in, out}``, a seeded fair coin). After one training run the auditor scores every
canary, guesses "in" for the ``k_plus`` highest scores and "out" for the ``k_minus`` lowest,
and abstains on the rest: ``r = k_plus + k_minus`` guesses, ``v`` of them correct.

**The bound (their Theorem 5.2, Algorithm 2).** If the mechanism is (ε, δ)-DP with respect to
adding/removing one canary, then for every ``v``::

    P[W >= v] <= β(ε) + 2 m δ · α(ε)
    β(ε) = P[Binomial(r, p) >= v],       p = e^ε / (1 + e^ε)
    α(ε) = max_{1 <= i <= v}  P[v - i <= Binomial(r, p) < v] / i

(``p`` is the accuracy of ε-DP randomised response, the best any guesser can do on one
canary). :func:`p_value` computes that right-hand side; :func:`epsilon_lower_bound` returns
the largest ε whose p-value is still below ``1 - confidence`` (default: confidence 0.95, i.e.
p-value < 0.05): "with 95 % confidence, the mechanism is not (ε', δ)-DP for any ε' below this
number". The p-value increases with ε (a larger ε makes ``v`` correct guesses less
surprising); the search bisects on that monotone function. With ``v <= r / 2``
correct guesses the bound is 0.

The guesser may abstain on any canary and may choose how many guesses to make from the scores
(the theorem conditions on the guess vector), but never from the coins: choosing ``k`` or a
threshold by how many guesses turned out right would void the bound.

**Positive control and verdict** (:func:`audit_result`). A bound below the claim says nothing
unless the same audit can exceed the claim when the mechanism is broken; the audit driver
therefore repeats itself with σ = 0 and the verdict is ``"fail"`` when the audited bound
exceeds the claimed ε, ``"pass"`` when it does not and the control's bound does, and
``"inconclusive"`` otherwise (always for a non-private claim, ε = inf: nothing to refute).

All functions are keyword-only and pure (numpy/scipy only).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "AUDIT_RESULTS",
    "DEFAULT_CONFIDENCE",
    "AuditGuesses",
    "audit_result",
    "epsilon_lower_bound",
    "guess_above_threshold",
    "guess_from_scores",
    "p_value",
]

DEFAULT_CONFIDENCE = 0.95
"""Confidence of the reported lower bound (p-value threshold 0.05)."""

AUDIT_RESULTS = ("pass", "fail", "inconclusive")
"""Verdicts of :func:`audit_result`."""

_MAX_EPSILON = 60.0  # e^60/(1+e^60) == 1.0 in float64: no larger ε is distinguishable
_BISECTION_STEPS = 60


def _check_counts(*, m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {name}={value!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 <= delta <= 1) or isinstance(delta, bool):
        raise ValueError(f"delta must be in [0, 1], got delta={delta!r}")


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of ``v`` correct out of ``r`` guesses (``m`` canaries) under (ε, δ)-DP.

    Parameters
    ----------
    m : int
        Canaries, each included independently with probability 1/2.
    r : int
        Guesses made (abstentions excluded).
    v : int
        Correct guesses.
    epsilon : float
        ε of the null hypothesis, ``>= 0``.
    delta : float
        δ of the null hypothesis, in [0, 1].

    Returns
    -------
    float
        ``min(1, β + 2 m δ α)`` (see the module docstring): an upper bound on the probability
        of at least ``v`` correct guesses from any (ε, δ)-DP mechanism.
    """
    _check_counts(m=m, r=r, v=v)
    _check_delta(delta)
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0) or isinstance(epsilon, bool):
        raise ValueError(f"epsilon must be >= 0, got epsilon={epsilon!r}")
    if r == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-min(float(epsilon), _MAX_EPSILON)))
    beta = float(stats.binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    alpha = 0.0
    if v > 0 and delta > 0:
        # P[v - i <= Binomial < v] for i = 1..v, divided by i; its maximum over i.
        pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # pmf(v-1), pmf(v-2), ..., pmf(0)
        alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, beta + 2.0 * m * float(delta) * alpha)


def epsilon_lower_bound(
    *, m: int, r: int, v: int, delta: float, confidence: float = DEFAULT_CONFIDENCE
) -> float:
    """Largest ε with ``p_value(ε) < 1 - confidence`` (0.0 when even ε = 0 is plausible).

    Parameters
    ----------
    m, r, v : int
        Canaries, guesses, correct guesses (``0 <= v <= r <= m``).
    delta : float
        δ of the mechanism's claimed guarantee.
    confidence : float
        In (0, 1); the default 0.95 gives a 95 % lower bound.

    Returns
    -------
    float
        The empirical lower bound on ε (bisection to ~1e-9 relative; capped at 60, beyond
        which float64 cannot tell the binomial apart from a certain guess).
    """
    _check_counts(m=m, r=r, v=v)
    _check_delta(delta)
    if not (isinstance(confidence, float) and 0 < confidence < 1):
        raise ValueError(f"confidence must be a float in (0, 1), got confidence={confidence!r}")
    level = 1.0 - confidence

    def rejects(eps: float) -> bool:
        return p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) < level

    if not rejects(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejects(hi):
        lo, hi = hi, 2.0 * hi
        if hi >= _MAX_EPSILON:
            return _MAX_EPSILON if rejects(_MAX_EPSILON) else _bisect(rejects, lo, _MAX_EPSILON)
    return _bisect(rejects, lo, hi)


def _bisect(rejects: Any, lo: float, hi: float) -> float:
    # Invariant: rejects(lo) and not rejects(hi).
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if rejects(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class AuditGuesses:
    """The auditor's guesses and their outcome (what the bound is computed from)."""

    m: int
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    correct_in: int
    correct_out: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def guess_from_scores(
    *, scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int
) -> AuditGuesses:
    """Guess "in" for the ``k_plus`` highest scores, "out" for the ``k_minus`` lowest.

    Ties are broken by canary index (stable sort), never by the secret inclusion bits.

    Parameters
    ----------
    scores : array [m]
        The auditor's membership score per canary (higher = more likely in).
    included : bool array [m]
        The secret coin flips (used only to count correct guesses).
    k_plus, k_minus : int
        Guesses of each kind; ``k_plus + k_minus <= m``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise ValueError(
            f"scores and included must be 1-d of equal length, got {scores.shape} and "
            f"{included.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    m = int(scores.shape[0])
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(
            f"need k_plus, k_minus >= 0 and k_plus + k_minus <= m={m}, "
            f"got k_plus={k_plus}, k_minus={k_minus}"
        )
    order = np.argsort(-scores, kind="stable")  # highest first
    top = order[:k_plus]
    bottom = order[m - k_minus :] if k_minus else order[:0]
    correct_in = int(included[top].sum())
    correct_out = int((~included[bottom]).sum())
    return AuditGuesses(
        m=m,
        k_plus=int(k_plus),
        k_minus=int(k_minus),
        guesses=int(k_plus + k_minus),
        correct=correct_in + correct_out,
        correct_in=correct_in,
        correct_out=correct_out,
    )


def guess_above_threshold(
    *, scores: np.ndarray, included: np.ndarray, threshold: float
) -> AuditGuesses:
    """Guess "in" for every canary whose score exceeds ``threshold``; abstain on the rest.

    Parameters
    ----------
    scores : array [m]
        The auditor's membership score per canary (higher = more likely in).
    included : bool array [m]
        The secret coin flips (used only to count correct guesses).
    threshold : float
        Fixed before the scores are seen (it must not depend on the coins).
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise ValueError(
            f"scores and included must be 1-d of equal length, got {scores.shape} and "
            f"{included.shape}"
        )
    if not np.all(np.isfinite(scores)) or not math.isfinite(threshold):
        raise ValueError("scores and threshold must be finite")
    chosen = scores > threshold
    correct_in = int(included[chosen].sum())
    k_plus = int(chosen.sum())
    return AuditGuesses(
        m=int(scores.shape[0]),
        k_plus=k_plus,
        k_minus=0,
        guesses=k_plus,
        correct=correct_in,
        correct_in=correct_in,
        correct_out=0,
    )


def audit_result(
    *,
    claimed_epsilon: float,
    epsilon_lower_bound: float,
    positive_control_epsilon_lower_bound: float,
) -> str:
    """The audit's verdict: ``"fail"``, ``"pass"`` or ``"inconclusive"`` (module docstring).

    Parameters
    ----------
    claimed_epsilon : float
        The ε the audited run claims (``math.inf`` for a non-private run).
    epsilon_lower_bound : float
        The audited run's empirical lower bound.
    positive_control_epsilon_lower_bound : float
        The same audit's bound with σ = 0.
    """
    for name, value in (
        ("claimed_epsilon", claimed_epsilon),
        ("epsilon_lower_bound", epsilon_lower_bound),
        ("positive_control_epsilon_lower_bound", positive_control_epsilon_lower_bound),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if epsilon_lower_bound > claimed_epsilon:
        return "fail"
    if positive_control_epsilon_lower_bound > claimed_epsilon:
        return "pass"
    return "inconclusive"
