"""Named scenarios: plain data describing a world and a federation.

A scenario fixes the simulated population and click model (``WorldConfig``), how clicks are
partitioned into nodes, and the run settings that differ from ``RunSettings``' defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared_model.world import WorldConfig


@dataclass(frozen=True)
class Scenario:
    """A named experiment.

    Parameters
    ----------
    name
        What ``fedrank simulate NAME`` calls it.
    world
        Population and click model.
    partition
        ``regional`` (one node per region) or ``device`` (one node per user).
    rounds
        Default number of server rounds.
    run_config
        Run settings (kebab-case keys, see ``shared_model.settings``) for this scenario.
    description
        One line for ``fedrank simulate --help`` and the README.
    """

    name: str
    world: WorldConfig
    partition: str
    rounds: int
    run_config: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if self.partition not in ("regional", "device"):
            raise ValueError(f"partition must be 'regional' or 'device', got {self.partition!r}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds!r}")

    @property
    def num_nodes(self) -> int:
        """Virtual SuperNodes the Simulation Engine starts."""
        if self.partition == "regional":
            return self.world.num_regions
        return self.world.num_users


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="regional-5",
            world=WorldConfig(num_users=10_000, num_regions=5, seed=0),
            partition="regional",
            rounds=30,
            run_config={
                "privacy-shape": "regional",
                "strategy": "fedavg",
                "fraction-train": 1.0,
                "min-train-nodes": 2,
                "local-epochs": 1,
                "batch-size": 256,
                "learning-rate": 0.5,
                "max-sessions-per-user": 2,
                "clip-norm": 1.0,
                "delta": 1e-5,
                # 3/4 of each node's ε on one release of its memorised click evidence
                # (shared_model.evidence; docs/results.md), the rest on DP-SGD.
                "evidence-share": 0.75,
                "evidence-clip": 3.0,
            },
            description=(
                "5 regional data centres, 10,000 users; user-level DP-SGD and DP click "
                "evidence in each"
            ),
        ),
        Scenario(
            name="regional-5-100k",
            world=WorldConfig(num_users=100_000, num_regions=5, seed=0),
            partition="regional",
            rounds=30,
            run_config={
                "privacy-shape": "regional",
                "strategy": "fedavg",
                "fraction-train": 1.0,
                "min-train-nodes": 2,
                "local-epochs": 1,
                # 20,000 users per region: larger batches keep a round's DP-SGD steps (and
                # their cost on 2 cores) near regional-5's.
                "batch-size": 2048,
                "learning-rate": 0.5,
                "max-sessions-per-user": 2,
                "clip-norm": 1.0,
                "delta": 1e-5,
                "evidence-share": 0.75,
                "evidence-clip": 3.0,
            },
            description=(
                "regional-5 at 100,000 users (~5M logged impressions): memorised DP click "
                "evidence for seen queries beside DP-SGD"
            ),
        ),
        Scenario(
            name="regional-3",
            world=WorldConfig(num_users=3_000, num_regions=3, seed=0),
            partition="regional",
            rounds=5,
            run_config={
                "privacy-shape": "regional",
                "strategy": "fedavg",
                "min-train-nodes": 2,
                "batch-size": 128,
                "learning-rate": 0.5,
                "delta": 1e-4,
            },
            description="small 3-region federation for tests and demos",
        ),
        Scenario(
            name="regional-3-drift",
            world=WorldConfig(num_users=3_000, num_regions=3, seed=0),
            partition="regional",
            rounds=12,
            run_config={
                "privacy-shape": "regional",
                "strategy": "fedavg",
                "min-train-nodes": 2,
                "batch-size": 128,
                "learning-rate": 0.5,
                "delta": 1e-4,
                "online": True,
                "replay-files": 0,
            },
            description=(
                "regional-3 as an online federation whose taste drifts mid-run "
                "(run it with `fedrank drift`: it writes the per-round inbox traffic)"
            ),
        ),
        Scenario(
            name="device-500",
            world=WorldConfig(num_users=500, num_regions=5, sessions_per_user=8.0, seed=0),
            partition="device",
            rounds=20,
            run_config={
                "privacy-shape": "device",
                "fraction-train": 0.1,
                "min-train-nodes": 2,
                "batch-size": 4,
                "local-epochs": 2,
                "learning-rate": 0.2,
                "max-sessions-per-user": 8,
                "secagg": True,
                "delta": 1e-3,
            },
            description="500 devices (one per user), 10% per round; client-level DP + SecAgg+",
        ),
        Scenario(
            name="device-1000",
            world=WorldConfig(num_users=1000, num_regions=5, sessions_per_user=8.0, seed=0),
            partition="device",
            rounds=100,
            run_config={
                "privacy-shape": "device",
                "fraction-train": 0.03,
                "min-train-nodes": 2,
                "batch-size": 4,
                "local-epochs": 2,
                "learning-rate": 0.2,
                "max-sessions-per-user": 8,
                "secagg": True,
                "delta": 1e-4,
            },
            description=(
                "1,000 devices (one per user), 3% per round, 100 rounds; client-level DP + "
                "SecAgg+ (try --dropout 0.3)"
            ),
        ),
    )
}


def get_scenario(name: str) -> Scenario:
    """The named scenario; ``KeyError`` lists the known names."""
    try:
        return SCENARIOS[name]
    except KeyError:
        known = ", ".join(sorted(SCENARIOS))
        raise KeyError(f"unknown scenario {name!r}; known: {known}") from None
