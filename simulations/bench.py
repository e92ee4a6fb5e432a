"""Benchmark of the node's training step: DP (ghost clipping) vs non-private vs Opacus hooks.

Same data, same process, modes interleaved per repeat so machine noise hits all of them;
reports the median throughput and the ratios.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from shared_model.catalog import cached_feature_builder
from shared_model.data import DEFAULT_WANDS_DIR
from shared_model.ranker import RankerHead
from shared_model.training import TrainConfig, build_user_groups, train_head
from shared_model.world import WorldConfig, simulate_click_log

MODES = {
    "non_private": dict(noise_multiplier=None),
    "dp_ghost": dict(noise_multiplier=1.0, grad_sample_mode="ghost"),
    "dp_hooks": dict(noise_multiplier=1.0, grad_sample_mode="hooks"),
}


def bench_train(
    *, users: int = 2000, repeats: int = 5, epochs: int = 3, catalog_dir: str = ""
) -> dict[str, Any]:
    """Median impressions/s per mode over ``repeats`` interleaved runs, and the ratios.

    ``catalog_dir``: a judged-search directory ("" = the bundled WANDS subset)."""
    torch.set_num_threads(1)
    builder = cached_feature_builder(catalog_dir or str(DEFAULT_WANDS_DIR))
    log = simulate_click_log(builder.data, WorldConfig(num_users=users, num_regions=1, seed=1))
    groups = build_user_groups(
        log, builder, max_sessions_per_user=2, rng=np.random.default_rng(0)
    )
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(repeats + 1):
        for mode, extra in MODES.items():
            config = TrainConfig(local_epochs=epochs, batch_size=256, seed=rep, **extra)  # type: ignore[arg-type]
            head = RankerHead()
            started = time.perf_counter()
            train_head(head, groups, config)
            elapsed = time.perf_counter() - started
            if rep > 0:  # the first pass warms up imports and allocators
                rates[mode].append(groups.num_impressions * epochs / elapsed)
    med = {m: statistics.median(v) for m, v in rates.items()}
    return {
        "impressions_per_s": {m: round(v) for m, v in med.items()},
        "users_per_s": {
            m: round(v / max(1, groups.num_impressions) * groups.num_users) for m, v in med.items()
        },
        "dp_ghost_slowdown_vs_non_private": round(med["non_private"] / med["dp_ghost"], 3),
        "dp_hooks_slowdown_vs_non_private": round(med["non_private"] / med["dp_hooks"], 3),
        "dp_ghost_speedup_vs_hooks": round(med["dp_ghost"] / med["dp_hooks"], 3),
        "users": groups.num_users,
        "impressions": groups.num_impressions,
        "epochs": epochs,
        "repeats": repeats,
        "threads": 1,
    }
