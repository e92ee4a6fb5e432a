"""The simulated world: a user population, a logging ranker and a click model over real data.

One frozen config describes it; the same config and seed always give the same click log.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from shared_model.bm25 import Bm25Ranker
from shared_model.clicks import (
    DEFAULT_USER_TASTE_MIX,
    PositionBasedClickModel,
    UserPopulation,
    make_population,
    simulate_sessions,
)
from shared_model.schema import JudgedSearchData


@dataclass(frozen=True)
class WorldConfig:
    """Population and click-model parameters (documented defaults, see README).

    Parameters
    ----------
    num_users, num_regions
        Population size and how many regions it is spread over.
    sessions_per_user
        Mean sessions per user (Poisson, at least one).
    top_k
        Results the logging ranker (BM25) shows per session.
    eta
        Examination ``(1/rank)**eta`` of the position-based click model.
    noise_floor, alpha_max
        Attractiveness of an irrelevant / a perfectly relevant result.
    exploration_probability
        Share of sessions that show random pool items in random order (epsilon-greedy
        logging), so position bias is learnable and the whole candidate pool gets clicks.
    user_taste_mix
        Each user's category weights are ``(1 - mix)`` × its region's plus ``mix`` × its own
        Dirichlet(0.3) draw (default 0.5, fixed; 0 = every user has its region's taste).
    seed
        Seeds the population and the clicks.
    """

    num_users: int = 10_000
    num_regions: int = 5
    sessions_per_user: float = 5.0
    top_k: int = 10
    exploration_probability: float = 0.3
    eta: float = 1.0
    noise_floor: float = 0.05
    alpha_max: float = 0.9
    user_taste_mix: float = DEFAULT_USER_TASTE_MIX
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_users < 1:
            raise ValueError(f"num_users must be >= 1, got {self.num_users!r}")
        if self.num_regions < 1:
            raise ValueError(f"num_regions must be >= 1, got {self.num_regions!r}")

    def click_model(self) -> PositionBasedClickModel:
        """The PBM these parameters describe."""
        return PositionBasedClickModel(
            eta=self.eta, noise_floor=self.noise_floor, alpha_max=self.alpha_max
        )


def world_population(data: JudgedSearchData, config: WorldConfig) -> UserPopulation:
    """The world's users, regions and tastes (what :func:`simulate_click_log` simulates)."""
    return make_population(
        num_users=config.num_users,
        num_regions=config.num_regions,
        seed=config.seed,
        data=data,
        user_taste_mix=config.user_taste_mix,
    )


def simulate_click_log(
    data: JudgedSearchData,
    config: WorldConfig,
    *,
    query_ids: list[str] | None = None,
    seed_offset: int = 0,
) -> pa.Table:
    """Simulate the world's sessions over ``query_ids`` (default: every judged query)."""
    population = world_population(data, config)
    return simulate_sessions(
        data,
        population,
        click_model=config.click_model(),
        logging_ranker=Bm25Ranker(data),
        query_ids=query_ids,
        sessions_per_user_mean=config.sessions_per_user,
        top_k=config.top_k,
        seed=config.seed + seed_offset,
        exploration_probability=config.exploration_probability,
    )
