"""Simulated clicks: a position-based click model over a non-IID user population.

Click model
    The position-based model (PBM; Richardson, Dominowska & Ragno 2007, "Predicting clicks";
    Craswell, Zoeter, Taylor & Ramsey 2008, "An experimental comparison of click
    position-bias models"): a shown result is clicked when it is examined *and* found
    attractive, independently::

        P(click | rank, rel) = P(examine | rank) * P(attractive | rel)
        P(examine | rank)    = (1 / rank) ** eta                      (eta = 1.0)
        P(attractive | rel)  = noise_floor + (alpha_max - noise_floor) * rel
                                                   (noise_floor = 0.05, alpha_max = 0.9)

    The noise floor keeps irrelevant results clickable now and then, as real users do.

Population
    Users live in regions; each region draws a Dirichlet (concentration 0.3) over the
    *query categories* (the dominant top-level product category of each query's judged
    pool, see ``dominant_category``), so regions favour a few categories. This shapes
    (a) which queries a region's users issue: P(query) ∝ w[region, category(query)] +
    query_smoothing (0.02), and (b) a mild taste bonus on attractiveness:
    ``min(1, alpha(rel) * (1 + taste_strength * w[region, category(product)]))`` with
    taste_strength = 0.5 (products outside the query categories get no bonus).

Per-user tastes
    Each user also draws their own Dirichlet (concentration 0.3) over the same categories;
    the user's category weights are ``w_user = (1 - user_taste_mix) * w[region] +
    user_taste_mix * own draw`` with ``user_taste_mix = 0.5`` (a fixed, documented default,
    not tuned). ``w_user`` replaces the region's weights for that user in both places above
    (query choice and the ``1 + taste_strength * w`` multiplier), so users of one region
    share a taste but differ from each other; ``user_taste_mix = 0`` gives the region-only
    world exactly. The user draws come from the population's generator after the region
    draws, so regions and region assignments do not depend on the mix.

Time order
    A user's sessions are consecutive rows with strictly increasing timestamps;
    :func:`user_session_order` gives each session's 0-based index in its user's history.

``simulate_sessions`` turns both into a click log (``shared_model.clicklog`` schema).
No Flower, no torch here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from shared_model.clicklog import CLICK_LOG_SCHEMA
from shared_model.schema import JudgedSearchData

DEFAULT_ETA = 1.0
DEFAULT_NOISE_FLOOR = 0.05
DEFAULT_ALPHA_MAX = 0.9
DEFAULT_CONCENTRATION = 0.3
DEFAULT_EXPLORATION_PROBABILITY = 0.3
DEFAULT_TASTE_STRENGTH = 0.5
DEFAULT_QUERY_SMOOTHING = 0.02
DEFAULT_USER_TASTE_MIX = 0.5


class Ranker(Protocol):
    """Anything that orders a query's candidate pool (e.g. ``Bm25Ranker``)."""

    def rank(self, query_id: str) -> list[str]: ...


@dataclass(frozen=True)
class PositionBasedClickModel:
    """Position-based click model: P(click) = (1/rank)**eta * alpha(rel).

    Parameters
    ----------
    eta
        Position-bias exponent of the examination curve (>= 0; 0 means no position bias).
    noise_floor
        Attractiveness of an irrelevant result (relevance 0), in [0, alpha_max].
    alpha_max
        Attractiveness of a perfectly relevant result (relevance 1), in [noise_floor, 1].
    """

    eta: float = DEFAULT_ETA
    noise_floor: float = DEFAULT_NOISE_FLOOR
    alpha_max: float = DEFAULT_ALPHA_MAX

    def __post_init__(self) -> None:
        for name in ("eta", "noise_floor", "alpha_max"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")
        if not 0.0 <= self.noise_floor <= 1.0:
            raise ValueError(f"noise_floor must be in [0, 1], got {self.noise_floor!r}")
        if not 0.0 <= self.alpha_max <= 1.0:
            raise ValueError(f"alpha_max must be in [0, 1], got {self.alpha_max!r}")
        if self.noise_floor > self.alpha_max:
            raise ValueError(
                f"noise_floor ({self.noise_floor!r}) must not exceed alpha_max ({self.alpha_max!r})"
            )

    def examination(self, rank: int | np.ndarray) -> np.ndarray:
        """P(examine | rank) = (1/rank)**eta for 1-based ``rank`` (scalar or array)."""
        r = np.asarray(rank, dtype=np.float64)
        if np.any(r < 1) or not np.all(np.isfinite(r)):
            raise ValueError(f"rank must be >= 1, got {rank!r}")
        return np.power(1.0 / r, self.eta)

    def attractiveness(self, rel: float | np.ndarray) -> np.ndarray:
        """P(attractive | rel) = noise_floor + (alpha_max - noise_floor) * rel, rel in [0, 1]."""
        x = np.asarray(rel, dtype=np.float64)
        if np.any(~np.isfinite(x)) or np.any(x < 0) or np.any(x > 1):
            raise ValueError(f"relevance must be in [0, 1], got {rel!r}")
        return self.noise_floor + (self.alpha_max - self.noise_floor) * x

    def click_probability(self, rank: int | np.ndarray, rel: float | np.ndarray) -> np.ndarray:
        """P(click | rank, rel) = examination(rank) * attractiveness(rel) (broadcasting)."""
        return self.examination(rank) * self.attractiveness(rel)


def dominant_category(data: JudgedSearchData, query_id: str) -> str:
    """The top-level category holding most relevance mass in the query's judged pool.

    Each judged product votes for its ``top_category`` with its relevance (all pool members
    vote 1 when no product is relevant); unknown categories (``""``) vote only when no product
    has a known one. Ties go to the alphabetically first category.
    """
    pool = data.judged(query_id)
    if not pool:
        raise KeyError(f"query_id {query_id!r} has no judgments")
    votes: dict[str, float] = {}
    relevant = any(j.relevance > 0 for j in pool)
    for j in pool:
        cat = data.products[j.product_id].top_category
        votes[cat] = votes.get(cat, 0.0) + (j.relevance if relevant else 1.0)
    known = {c: v for c, v in votes.items() if c and v > 0}
    if not known:
        return ""
    return min(known, key=lambda c: (-known[c], c))


def query_categories(data: JudgedSearchData) -> dict[str, str]:
    """``dominant_category`` of every judged query, keyed by query id (sorted)."""
    return {q: dominant_category(data, q) for q in data.query_ids}


@dataclass(frozen=True, eq=False)
class UserPopulation:
    """Users, their regions, each region's and each user's taste over categories.

    ``region_weights[r, c]`` is region ``r``'s Dirichlet weight on ``categories[c]``
    (rows sum to 1); ``user_weights[u, c]`` is user ``u``'s mix of its region's weights and
    its own draw (rows sum to 1; equal to the region's row when ``user_taste_mix`` is 0).
    Build with ``make_population``.
    """

    user_ids: np.ndarray  # int64, shape (num_users,)
    region_ids: np.ndarray  # int32, shape (num_users,)
    categories: tuple[str, ...]
    region_weights: np.ndarray  # float64, shape (num_regions, num_categories)
    taste_strength: float = DEFAULT_TASTE_STRENGTH
    query_smoothing: float = DEFAULT_QUERY_SMOOTHING
    concentration: float = DEFAULT_CONCENTRATION
    seed: int = 0
    user_weights: np.ndarray | None = None  # float64, shape (num_users, num_categories)
    user_taste_mix: float = 0.0

    @property
    def tastes(self) -> np.ndarray:
        """``(num_users, num_categories)`` category weights of every user."""
        if self.user_weights is not None:
            return self.user_weights
        return self.region_weights[self.region_ids]

    def user_weights_for(self, categories: Sequence[str]) -> np.ndarray:
        """(num_users, len(categories)) user weights; unknown categories weigh 0."""
        index = {c: i for i, c in enumerate(self.categories)}
        padded = np.concatenate([self.tastes, np.zeros((self.num_users, 1))], axis=1)
        cols = np.array([index.get(c, len(self.categories)) for c in categories], dtype=np.int64)
        return padded[:, cols]

    def user_taste_multiplier(self, user: int, category: str) -> float:
        """User's attractiveness multiplier 1 + taste_strength * w_user (before capping)."""
        try:
            c = self.categories.index(category)
        except ValueError:
            return 1.0
        return 1.0 + self.taste_strength * float(self.tastes[user, c])

    @property
    def num_users(self) -> int:
        return int(len(self.user_ids))

    @property
    def num_regions(self) -> int:
        return int(self.region_weights.shape[0])

    def weight(self, region_id: int, category: str) -> float:
        """Region's weight on ``category`` (0 for a category outside ``categories``)."""
        try:
            c = self.categories.index(category)
        except ValueError:
            return 0.0
        return float(self.region_weights[region_id, c])

    def weights_for(self, categories: Sequence[str]) -> np.ndarray:
        """(num_regions, len(categories)) weights; unknown categories weigh 0."""
        index = {c: i for i, c in enumerate(self.categories)}
        padded = np.concatenate([self.region_weights, np.zeros((self.num_regions, 1))], axis=1)
        cols = np.array([index.get(c, len(self.categories)) for c in categories], dtype=np.int64)
        return padded[:, cols]

    def query_probabilities(self, categories: Sequence[str]) -> np.ndarray:
        """P(region issues query) for queries of the given categories, (num_regions, Q).

        P ∝ w[region, category(query)] + query_smoothing; a row with zero mass is uniform.
        """
        if not categories:
            raise ValueError("no queries to choose from")
        mass = self.weights_for(categories) + self.query_smoothing
        totals = mass.sum(axis=1, keepdims=True)
        uniform = np.full_like(mass, 1.0 / mass.shape[1])
        safe = np.where(totals > 0, totals, 1.0)
        return np.where(totals > 0, mass / safe, uniform)

    def taste_multiplier(self, region_id: int, category: str) -> float:
        """Attractiveness multiplier 1 + taste_strength * w (before capping at 1)."""
        return 1.0 + self.taste_strength * self.weight(region_id, category)


def make_population(
    *,
    num_users: int,
    num_regions: int,
    seed: int,
    data: JudgedSearchData | None = None,
    categories: Sequence[str] | None = None,
    concentration: float = DEFAULT_CONCENTRATION,
    taste_strength: float = DEFAULT_TASTE_STRENGTH,
    query_smoothing: float = DEFAULT_QUERY_SMOOTHING,
    user_taste_mix: float = DEFAULT_USER_TASTE_MIX,
) -> UserPopulation:
    """Draw a population: users spread evenly (shuffled) over regions, Dirichlet tastes.

    Give exactly one of ``data`` (categories = the distinct ``dominant_category`` of its
    queries) or ``categories``. Each user's weights are ``(1 - user_taste_mix)`` × its
    region's plus ``user_taste_mix`` × its own Dirichlet(``concentration``) draw. Same
    arguments, same population.
    """
    if num_users < 1:
        raise ValueError(f"num_users must be >= 1, got {num_users!r}")
    if num_regions < 1:
        raise ValueError(f"num_regions must be >= 1, got {num_regions!r}")
    if not (concentration > 0 and math.isfinite(concentration)):
        raise ValueError(f"concentration must be > 0, got {concentration!r}")
    if not (taste_strength >= 0 and math.isfinite(taste_strength)):
        raise ValueError(f"taste_strength must be >= 0, got {taste_strength!r}")
    if not (query_smoothing >= 0 and math.isfinite(query_smoothing)):
        raise ValueError(f"query_smoothing must be >= 0, got {query_smoothing!r}")
    if not 0.0 <= user_taste_mix <= 1.0:
        raise ValueError(f"user_taste_mix must be in [0, 1], got {user_taste_mix!r}")
    if (data is None) == (categories is None):
        raise ValueError("give exactly one of data= or categories=")
    if data is not None:
        cats = tuple(sorted(set(query_categories(data).values())))
    else:
        assert categories is not None
        cats = tuple(dict.fromkeys(categories))
    if not cats:
        raise ValueError("no categories to draw tastes over")
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(len(cats), concentration), size=num_regions)
    weights = np.nan_to_num(weights, nan=0.0)
    regions = rng.permutation(np.arange(num_users) % num_regions).astype(np.int32)
    own = np.nan_to_num(rng.dirichlet(np.full(len(cats), concentration), size=num_users), nan=0.0)
    user_weights = (1.0 - user_taste_mix) * weights[regions] + user_taste_mix * own
    return UserPopulation(
        user_ids=np.arange(num_users, dtype=np.int64),
        region_ids=regions,
        categories=cats,
        region_weights=weights,
        taste_strength=float(taste_strength),
        query_smoothing=float(query_smoothing),
        concentration=float(concentration),
        seed=int(seed),
        user_weights=user_weights,
        user_taste_mix=float(user_taste_mix),
    )


def simulate_sessions(
    data: JudgedSearchData,
    population: UserPopulation,
    *,
    click_model: PositionBasedClickModel,
    logging_ranker: Ranker,
    query_ids: Sequence[str] | None = None,
    sessions_per_user_mean: float = 5.0,
    top_k: int = 10,
    start_time: int = 1_700_000_000,
    seed: int = 0,
    exploration_probability: float = DEFAULT_EXPLORATION_PROBABILITY,
) -> pa.Table:
    """Simulate search sessions and PBM clicks; returns a ``CLICK_LOG_SCHEMA`` table.

    With probability ``exploration_probability`` a session is exploration traffic: it shows
    ``top_k`` items drawn uniformly from the query's judged pool, in random order (an
    epsilon-greedy logging policy; OBD's "random" campaign is the same idea). Without it every
    query's results always sit at the same ranks and only BM25's top ``top_k`` is ever shown,
    so position bias cannot be told apart from relevance and a learned ranker never sees the
    rest of the candidate pool.

    Each user runs max(1, Poisson(sessions_per_user_mean)) sessions; in each, the user issues
    one query (drawn from their own query distribution, P ∝ w_user[category(query)] +
    query_smoothing, over ``query_ids`` or every judged query), sees the logging ranker's top
    ``top_k`` of that query's pool, and clicks each shown result independently with
    probability ``examination(rank) * min(1, attractiveness(rel) * (1 + taste_strength *
    w_user[category(product)]))``.
    A user's sessions are 1 minute to 2 days apart, starting within a day of ``start_time``.
    Rows are ordered by session then rank; same inputs and seed give an identical table.
    """
    if not (sessions_per_user_mean > 0 and math.isfinite(sessions_per_user_mean)):
        raise ValueError(f"sessions_per_user_mean must be > 0, got {sessions_per_user_mean!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k!r}")
    if not 0.0 <= exploration_probability <= 1.0:
        raise ValueError(
            f"exploration_probability must be in [0, 1], got {exploration_probability!r}"
        )
    qids = list(dict.fromkeys(data.query_ids if query_ids is None else query_ids))
    if not qids:
        raise ValueError("no queries to simulate")
    for q in qids:
        if not data.judged(q):
            raise ValueError(f"query_id {q!r} has no judged pool")

    # Per-query tables over the whole judged pool, in logging-ranker order (padded to the
    # largest pool): product ids, relevance, category, attractiveness per region.
    num_q, num_r = len(qids), population.num_regions
    pools = []
    for q in qids:
        rels = {j.product_id: j.relevance for j in data.judged(q)}
        ranked = list(logging_ranker.rank(q))
        for pid in ranked:
            if pid not in rels:
                raise ValueError(f"logging ranker returned {pid!r}, not judged for query {q!r}")
        ranked += sorted(set(rels) - set(ranked))  # unranked pool items go last
        pools.append((ranked, rels))
    width = max(top_k, max(len(r) for r, _ in pools))
    pool_sizes = np.array([len(r) for r, _ in pools], dtype=np.int64)
    lengths = np.minimum(pool_sizes, top_k)
    shown_ids: list[str] = []
    rel = np.zeros((num_q, width))
    cat_index = {c: i for i, c in enumerate(population.categories)}
    prod_cat = np.full((num_q, width), len(population.categories), dtype=np.int64)
    for i, (ranked, rels) in enumerate(pools):
        padded = ranked + [""] * (width - len(ranked))
        shown_ids.extend(padded)
        rel[i, : len(ranked)] = [rels[p] for p in ranked]
        prod_cat[i, : len(ranked)] = [
            cat_index.get(data.products[p].top_category, len(population.categories))
            for p in ranked
        ]
    base = click_model.attractiveness(rel)  # (Q, W)
    exam = click_model.examination(np.arange(1, top_k + 1))
    tastes = population.tastes  # (U, C); column C (unknown category) weighs 0
    padded_tastes = np.concatenate([tastes, np.zeros((len(tastes), 1))], axis=1)
    query_mass = population.user_weights_for(
        [dominant_category(data, q) for q in qids]
    ) + population.query_smoothing  # (U, Q)

    rng = np.random.default_rng(seed)
    num_u = population.num_users
    per_user = np.maximum(1, rng.poisson(sessions_per_user_mean, size=num_u))
    sess_user = np.repeat(np.arange(num_u), per_user)
    num_s = len(sess_user)
    sess_region = population.region_ids[sess_user].astype(np.int64)
    if np.any(sess_region < 0) or np.any(sess_region >= num_r):
        raise ValueError("population has region ids outside its region weights")

    # Query choice: inverse-CDF per user (a row with zero mass is uniform).
    u = rng.random(num_s)
    totals = query_mass.sum(axis=1, keepdims=True)
    query_probs = np.where(
        totals > 0, query_mass / np.where(totals > 0, totals, 1.0), 1.0 / num_q
    )
    cdf = np.cumsum(query_probs, axis=1)
    cdf[:, -1] = 1.0
    sess_query = (cdf[sess_user] <= u[:, None]).sum(axis=1).astype(np.int64)
    np.minimum(sess_query, num_q - 1, out=sess_query)

    # Timestamps: strictly increasing within each user.
    offset = rng.integers(0, 86_400, size=num_u)
    gaps = rng.integers(60, 2 * 86_400, size=num_s)
    csum = np.cumsum(gaps)
    block_start = np.repeat(np.cumsum(per_user) - per_user, per_user)
    before = np.concatenate([[0], csum])[block_start]
    sess_time = start_time + offset[sess_user] + (csum - before)

    # What each slot shows (an index into the query's pool): the logging ranker's top_k, or,
    # in an exploration session, top_k items drawn uniformly from the pool in random order.
    valid = np.arange(top_k)[None, :] < lengths[sess_query][:, None]
    explore = rng.random(num_s) < exploration_probability
    in_pool = np.arange(width)[None, :] < pool_sizes[sess_query][:, None]
    keys = np.where(explore[:, None], rng.random((num_s, width)), np.arange(width)[None, :])
    order = np.argsort(np.where(in_pool, keys, np.inf), axis=1, kind="stable")[:, :top_k]

    # Clicks: each shown item's attractiveness times the user's taste multiplier, capped at 1.
    shown_cat = prod_cat[sess_query[:, None], order]  # (S, top_k)
    taste = 1.0 + population.taste_strength * padded_tastes[sess_user[:, None], shown_cat]
    attract = np.minimum(1.0, base[sess_query[:, None], order] * taste)
    p_click = attract * exam[None, :]
    clicked = rng.random((num_s, top_k)) < p_click

    sess_idx, pos = np.nonzero(valid)
    flat_ids = sess_query[sess_idx] * width + order[sess_idx, pos]
    product_id = pa.array(shown_ids, type=pa.string()).take(pa.array(flat_ids))
    query_id = pa.array(qids, type=pa.string()).take(pa.array(sess_query[sess_idx]))
    columns = [
        pa.array(sess_idx.astype(np.int64)),
        pa.array(population.user_ids[sess_user][sess_idx].astype(np.int64)),
        pa.array(sess_region[sess_idx].astype(np.int32)),
        pa.array(sess_time[sess_idx].astype(np.int64)),
        query_id,
        product_id,
        pa.array((pos + 1).astype(np.int16)),
        pa.array(clicked[sess_idx, pos]),
        pa.array(explore[sess_idx]),
    ]
    return pa.Table.from_arrays(columns, schema=CLICK_LOG_SCHEMA)


def user_session_order(table: pa.Table) -> np.ndarray:
    """0-based index of each row's session in its user's time-ordered history, per row.

    Sessions are ordered by (timestamp, session_id) within a user; rows of one session share
    the index. Works on any click log (a device's own log, a region's, a whole world's).
    """
    n = table.num_rows
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    users = table.column("user_id").to_numpy()
    sessions = table.column("session_id").to_numpy()
    times = table.column("timestamp").to_numpy()
    keys, inverse = np.unique(np.stack([users, sessions]), axis=1, return_inverse=True)
    inverse = inverse.reshape(-1)
    first_time = np.full(keys.shape[1], np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_time, inverse, times)
    order = np.lexsort((keys[1], first_time, keys[0]))
    ranked_users = keys[0][order]
    start = np.r_[True, ranked_users[1:] != ranked_users[:-1]]
    group_start = np.maximum.accumulate(np.where(start, np.arange(len(order)), 0))
    index = np.empty(len(order), dtype=np.int64)
    index[order] = np.arange(len(order)) - group_start
    return index[inverse]


def click_through_by_rank(table: pa.Table) -> dict[int, float]:
    """Click-through rate per 1-based rank (clicks / impressions), for ranks present."""
    ranks = table.column("rank").to_numpy().astype(np.int64)
    clicks = table.column("clicked").to_numpy(zero_copy_only=False).astype(np.float64)
    if len(ranks) == 0:
        return {}
    shown = np.bincount(ranks)
    hits = np.bincount(ranks, weights=clicks)
    return {int(r): float(hits[r] / shown[r]) for r in np.nonzero(shown)[0]}
