"""One-shot Gaussian release of per-user-bounded count vectors (numpy only).

A node releases, for every (query, product) pair of the public catalog index, two sums over
its users: clicks and examination-weighted impressions (``shared_model.evidence``). Privacy
unit: the **user** (add/remove one user's whole contribution).

Contribution bound
    Each user's contribution is one vector ``v_u = [clicks_u, exam_u]`` of length ``2P``
    (built from at most K of their sessions). It is scaled by ``min(1, C / ||v_u||_2)`` before
    summing, so adding or removing a user moves the released vector by at most ``C`` in L2:
    the sensitivity is exactly ``C`` (:func:`clip_and_sum`). Without clipping the exact
    worst case is :func:`worst_case_sensitivity` (every session of the user showing the same
    products at the same ranks, all clicked).

Mechanism
    ``sum + N(0, (noise_multiplier * C)^2 I)`` on every one of the ``2P`` coordinates, also
    the pairs the node never saw (:func:`gaussian_release`). For accounting it is one event
    ``(noise_multiplier, sample_rate=1, steps=1)`` of the subsampled Gaussian mechanism, the
    same shape the node's DP-SGD steps have, so it composes in the same RDP accountant.

Randomness
    Noise comes from a generator seeded by the OS CSPRNG (:func:`csprng_generator`); tests
    inject a seeded generator explicitly.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

__all__ = [
    "clip_and_sum",
    "csprng_generator",
    "gaussian_release",
    "user_norms",
    "worst_case_sensitivity",
]


def csprng_generator() -> np.random.Generator:
    """A numpy generator seeded with 128 bits from the OS CSPRNG (fresh every call)."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def worst_case_sensitivity(*, max_sessions: int, top_k: int, eta: float = 1.0) -> float:
    """Exact L2 sensitivity of unclipped [clicks, exam] sums when a user has ≤ K sessions.

    Each session shows ``top_k`` products at ranks 1..top_k, adds 1 to the click entry of each
    clicked product and ``rank**-eta`` to the exam entry of each shown one. The squared norm is
    largest when all K sessions show the same products at the same ranks and every result is
    clicked (a sum of squares grows when equal terms are aligned):
    ``K * sqrt(top_k + sum_r rank**(-2 eta))``.
    """
    if max_sessions < 1 or top_k < 1:
        raise ValueError(f"max_sessions and top_k must be >= 1, got {max_sessions}, {top_k}")
    ranks = np.arange(1, top_k + 1, dtype=np.float64)
    return float(max_sessions * math.sqrt(top_k + float(np.sum(ranks ** (-2.0 * eta)))))


def _check_rows(
    user: np.ndarray, pair: np.ndarray, clicks: np.ndarray, exam: np.ndarray, num_pairs: int
) -> None:
    n = len(user)
    if not (len(pair) == len(clicks) == len(exam) == n):
        raise ValueError("user, pair, clicks and exam must have the same length")
    if n and (pair.min() < 0 or pair.max() >= num_pairs):
        raise ValueError(f"pair indices must be in [0, {num_pairs})")
    if not (np.all(np.isfinite(clicks)) and np.all(np.isfinite(exam))):
        raise ValueError("clicks and exam must be finite")
    if np.any(clicks < 0) or np.any(exam < 0):
        raise ValueError("clicks and exam must be >= 0")


def _per_user_pair(
    user: np.ndarray, pair: np.ndarray, clicks: np.ndarray, exam: np.ndarray, num_pairs: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge rows of the same (user, pair): returns (user, pair, clicks, exam) unique rows."""
    key = user.astype(np.int64) * np.int64(num_pairs) + pair.astype(np.int64)
    uniq, inverse = np.unique(key, return_inverse=True)
    c = np.bincount(inverse, weights=clicks, minlength=len(uniq))
    e = np.bincount(inverse, weights=exam, minlength=len(uniq))
    return uniq // num_pairs, uniq % num_pairs, c, e


def user_norms(
    user: np.ndarray, pair: np.ndarray, clicks: np.ndarray, exam: np.ndarray, *, num_pairs: int
) -> dict[int, float]:
    """Each user's contribution norm ``||[clicks_u, exam_u]||_2`` (for choosing C)."""
    _check_rows(user, pair, clicks, exam, num_pairs)
    u, _, c, e = _per_user_pair(user, pair, clicks, exam, num_pairs)
    users, inv = np.unique(u, return_inverse=True)
    sq = np.bincount(inv, weights=c * c + e * e, minlength=len(users))
    return {int(k): float(math.sqrt(v)) for k, v in zip(users, sq, strict=True)}


def clip_and_sum(
    user: np.ndarray,
    pair: np.ndarray,
    clicks: np.ndarray,
    exam: np.ndarray,
    *,
    num_pairs: int,
    clip_norm: float | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Sum per-row (user, pair, clicks, exam) contributions with each user's L2 norm ≤ C.

    Rows of one user are merged per pair first, then the user's whole vector is scaled by
    ``min(1, clip_norm / norm)``; ``clip_norm=None`` sums unclipped (the caller then owes
    :func:`worst_case_sensitivity`). Returns ``(clicks [P], exam [P], users clipped)``.
    """
    if clip_norm is not None and not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    user = np.asarray(user)
    pair = np.asarray(pair)
    clicks = np.asarray(clicks, dtype=np.float64)
    exam = np.asarray(exam, dtype=np.float64)
    _check_rows(user, pair, clicks, exam, num_pairs)
    if len(user) == 0:
        return np.zeros(num_pairs), np.zeros(num_pairs), 0
    u, p, c, e = _per_user_pair(user, pair, clicks, exam, num_pairs)
    clipped = 0
    if clip_norm is not None:
        users, inv = np.unique(u, return_inverse=True)
        norm = np.sqrt(np.bincount(inv, weights=c * c + e * e, minlength=len(users)))
        scale = np.minimum(1.0, clip_norm / np.maximum(norm, 1e-300))
        clipped = int(np.sum(norm > clip_norm))
        c, e = c * scale[inv], e * scale[inv]
    out_c = np.bincount(p, weights=c, minlength=num_pairs)
    out_e = np.bincount(p, weights=e, minlength=num_pairs)
    return out_c, out_e, clipped


def gaussian_release(
    values: np.ndarray, *, noise_std: float, rng: np.random.Generator
) -> np.ndarray:
    """``values + N(0, noise_std^2)`` elementwise (``noise_std = noise_multiplier * C``)."""
    if not (noise_std >= 0 and math.isfinite(noise_std)):
        raise ValueError(f"noise_std must be finite and >= 0, got {noise_std!r}")
    values = np.asarray(values, dtype=np.float64)
    if noise_std == 0:
        return values.copy()
    return values + rng.normal(0.0, noise_std, size=values.shape)


def plan_split(
    *,
    epsilon: float,
    delta: float,
    release_share: float,
    sgd_sample_rate: float,
    sgd_steps: int,
) -> tuple[float, float]:
    """Noise multipliers ``(release, dp_sgd)`` that share one node's ε budget.

    The count release alone spends ``release_share * epsilon`` (one event ``(σ_r, 1, 1)``);
    DP-SGD gets the smallest σ whose planned steps, composed with the release in the same RDP
    accountant, stay within ``epsilon``. ``epsilon = inf`` gives ``(0, 0)`` (no noise).
    Imports the accountant lazily (it needs Opacus' RDP analysis).
    """
    from privacy.accounting import calibrate_noise_multiplier, epsilon_from_history

    if not 0 < release_share < 1:
        raise ValueError(f"release_share must be in (0, 1), got {release_share!r}")
    if math.isinf(epsilon):
        return 0.0, 0.0
    release = calibrate_noise_multiplier(
        target_epsilon=release_share * epsilon, delta=delta, sample_rate=1.0, steps=1
    )

    def eps_with(sgd: float) -> float:
        return epsilon_from_history(
            history=[(release, 1.0, 1), (sgd, sgd_sample_rate, sgd_steps)], delta=delta
        )

    low, high = 0.0, 1.0
    while eps_with(high) > epsilon:
        low, high = high, high * 2.0
        if high > 1e6:
            raise ValueError(f"no DP-SGD noise fits beside the release in ε={epsilon}")
    for _ in range(60):
        if high - low <= 1e-4 * high:
            break
        mid = 0.5 * (low + high) if low > 0 else 0.5 * high
        if eps_with(mid) <= epsilon:
            high = mid
        else:
            low = mid
    return release, high
