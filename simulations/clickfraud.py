"""Click fraud against the memorised evidence (issue 11), Flower-free.

The same pipeline as ``simulations.evidence_study`` (what the regional federation computes
for the evidence): the world's click log over the fold's seen queries, partitioned by
region; each region keeps <= K sessions per user, clips each user's [clicks, exam] vector to
C, adds Gaussian noise for its share of ε; the server sums. Bots: ``fraction`` of one
region's users (added to that region), each searching the target query K times (the most
that counts) and clicking the target product, shown at rank ``bot_rank``. The target is
the query's least relevant judged product (ties: the one the clean model ranks lowest).

``run(fraction=0.01, epsilon=1.0)`` returns the target's rank on the target query (1 =
top) without and with the bots, and seen NDCG@10 of both. ``python -m
simulations.clickfraud`` prints the rows of docs/results.md's table.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from privacy.accounting import calibrate_noise_multiplier
from privacy.count_release import clip_and_sum
from shared_model.catalog import cached_feature_builder
from shared_model.data import DEFAULT_WANDS_DIR
from shared_model.encoder import default_cache_dir
from shared_model.evaluation import cosine_scorer, evaluate, query_folds
from shared_model.evidence import (
    EVIDENCE_CLICKS,
    EVIDENCE_EXAM,
    EVIDENCE_NOISE_VAR,
    MAX_CLICKS_PER_USER_PAIR,
    EvidenceIndex,
    EvidenceModel,
    UserPairRows,
    cap_user_pair_clicks,
    median_rate_caps,
    user_pair_rows,
)
from shared_model.partition import partition_regional
from shared_model.world import WorldConfig, simulate_click_log

_CACHE: dict[tuple[int, int], Any] = {}


def bot_rows(num_bots: int, pair: int, *, sessions: int, rank: int, first_user: int,
             click: bool = True) -> UserPairRows:
    """``num_bots`` users, each ``sessions`` sessions clicking ``pair`` shown at ``rank``
    (``click=False``: decoys, shown the pair without clicking it)."""
    users = np.repeat(np.arange(first_user, first_user + num_bots, dtype=np.int64), sessions)
    n = len(users)
    return UserPairRows(user=users, pair=np.full(n, pair, np.int64),
                        clicks=np.full(n, 1.0 if click else 0.0),
                        exam=np.full(n, float(rank) ** -1.0), num_users=num_bots)


def clamp_clicks_to_exam(
    clicks: np.ndarray, exam: np.ndarray, noise_std: float, *, z: float
) -> np.ndarray:
    """Candidate (measured, not the default): ``min(clicks, exam + z sqrt(2) noise_std)``
    per pair, for ONE node's noisy release (post-processing, no privacy cost).

    Under the position-based click model a pair is not clicked more than it is examined
    (attractiveness <= 1); ``sqrt(2) noise_std`` is the std of a node's clicks - exam noise.
    """
    clicks = np.asarray(clicks, dtype=np.float64)
    exam = np.asarray(exam, dtype=np.float64)
    if clicks.shape != exam.shape:
        raise ValueError(f"clicks and exam shapes differ: {clicks.shape} vs {exam.shape}")
    if not (math.isfinite(noise_std) and noise_std >= 0 and math.isfinite(z) and z >= 0):
        raise ValueError(f"noise_std and z must be finite and >= 0, got {noise_std!r}, {z!r}")
    return np.minimum(clicks, exam + z * math.sqrt(2.0) * noise_std)


def loo_ratio_clamp(released: list[tuple[np.ndarray, np.ndarray]], noise_std: float, *,
                    z: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Candidate (measured, not the default): cut each node's clicks on a pair to what the
    OTHER nodes' pooled click rate on that pair predicts for its exam, plus ``z`` sd.

    ``rho = clip(Σ_other c / Σ_other e, 0, 1)``; ``c_r <= e_r rho + z sqrt(s²(1+rho²) +
    e_r rho + e_r² Var(rho))``, ``Var(rho) ≈ (k s²(1+rho²) + E rho) / E²`` (noise + click
    sampling; ``E = Σ_other e``, ``k`` other nodes). Only where ``E`` is beyond 3 noise sd.
    The default, :func:`shared_model.evidence.median_rate_caps`, takes the median of the
    other nodes' rates instead, so one node's bots do not raise the others' caps."""
    cs = np.stack([c for c, _ in released])
    es = np.stack([e for _, e in released])
    k = len(released) - 1
    out = []
    for r in range(len(released)):
        oc, oe = cs.sum(0) - cs[r], es.sum(0) - es[r]
        ok = oe > 3.0 * noise_std * math.sqrt(max(k, 1)) + 1.0
        rho = np.clip(np.where(ok, oc / np.where(ok, oe, 1.0), 1.0), 0.0, 1.0)
        er = np.maximum(es[r], 0.0)
        var_rho = (k * noise_std**2 * (1 + rho**2) + np.maximum(oe, 1.0) * rho) / np.maximum(
            oe, 1.0) ** 2
        slack = z * np.sqrt(noise_std**2 * (1 + rho**2) + er * rho + er**2 * var_rho)
        cap = np.where(ok, er * rho + slack, np.inf)
        out.append((np.minimum(cs[r], cap), es[r]))
    return out


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _world(users: int, seed: int) -> Any:
    key = (users, seed)
    if key not in _CACHE:
        builder = cached_feature_builder(str(DEFAULT_WANDS_DIR), str(default_cache_dir()))
        data = builder.data
        index = EvidenceIndex(data)
        unseen = set(query_folds(data.query_ids, num_folds=5, seed=seed)[0])
        seen = [q for q in data.query_ids if q not in unseen]
        log = simulate_click_log(data, WorldConfig(num_users=users, num_regions=5, seed=seed),
                                 query_ids=seen)
        parts = partition_regional(log)
        rows = {r: user_pair_rows(p, index, max_sessions_per_user=2, max_clicks_per_pair=None)
                for r, p in parts.items()}  # uncapped: run() applies the cap (or not)
        _CACHE[key] = (builder, data, index, seen, rows)
    return _CACHE[key]


def run(
    *, fraction: float, epsilon: float, users: int = 10_000, clip: float = 3.0,
    share: float = 0.75, delta: float = 1e-5, bot_rank: int = 10, seed: int = 0,
    query: str | None = None, evaluate_seen: bool = False, defence: bool = True,
    clamp: float | None = None, spread: bool = False, decoys: float = 0.0, draw: int = 0,
    clamp_mode: str = "exam",
) -> dict[str, Any]:
    """``defence``: the evidence's click fraud bound (each user's clicks on a pair count at
    most ``shared_model.evidence.MAX_CLICKS_PER_USER_PAIR`` times), for honest users and
    bots alike; ``False`` measures the evidence without it.

    ``clamp``: ``z`` of the server's per-node examination-consistency clamp
    (``shared_model.evidence.clamp_clicks_to_exam`` on each region's noisy release before
    the sum; ``None``: off). Adaptive bots: ``spread`` puts the same number of bots in
    every region in turn instead of region 0 only; ``decoys`` adds that fraction (of the
    users) of extra bots that are shown the target without clicking it (to raise its
    exam). ``draw`` picks another noise draw (0: the documented one). ``clamp_mode``
    "loo": :func:`loo_ratio_clamp` instead (a measured candidate, not the default)."""
    builder, data, index, seen, rows = _world(users, seed)
    base = cosine_scorer(builder)
    region = sorted(rows)[0]
    if query is None:  # a seen query with a full pool and real traffic: the most judged one
        query = max(seen, key=lambda q: (len(index.products[q]), q))
    pids = index.products[query]
    grades = {j.product_id: j.relevance for j in data.judged(query)}
    zs = np.asarray(base(query, pids))
    target = min(pids, key=lambda p: (grades[p], float(zs[pids.index(p)])))
    pair = int(index.query_pairs(query, [target])[0])
    num_bots = int(round(fraction * rows[region].num_users))
    num_decoys = int(round(decoys * rows[region].num_users))
    regions = sorted(rows)
    targets = regions if spread else [region]
    bots_in = dict(zip(targets, _split(num_bots, len(targets)), strict=True))
    decoys_in = dict(zip(targets, _split(num_decoys, len(targets)), strict=True))
    sigma = 0.0 if math.isinf(epsilon) else calibrate_noise_multiplier(
        target_epsilon=share * epsilon, delta=delta, sample_rate=1.0, steps=1)
    rng = np.random.default_rng(seed + 1 + 1000 * draw)
    noise = {r: (rng.normal(0, sigma * clip, index.num_pairs),
                 rng.normal(0, sigma * clip, index.num_pairs)) for r in rows}

    def model(with_bots: bool) -> EvidenceModel:
        released: list[tuple[np.ndarray, np.ndarray]] = []
        for r, rr in rows.items():
            if with_bots:
                for n_bots, click in ((bots_in.get(r, 0), True), (decoys_in.get(r, 0), False)):
                    if not n_bots:
                        continue
                    bots = bot_rows(n_bots, pair, sessions=2, rank=bot_rank, click=click,
                                    first_user=int(rr.user.max(initial=0)) + 1)
                    rr = UserPairRows(np.concatenate([rr.user, bots.user]),
                                      np.concatenate([rr.pair, bots.pair]),
                                      np.concatenate([rr.clicks, bots.clicks]),
                                      np.concatenate([rr.exam, bots.exam]),
                                      rr.num_users + n_bots)
            rr = cap_user_pair_clicks(rr, MAX_CLICKS_PER_USER_PAIR if defence else None)
            c, e, _ = clip_and_sum(rr.user, rr.pair, rr.clicks, rr.exam,
                                   num_pairs=index.num_pairs, clip_norm=clip)
            released.append((c + noise[r][0], e + noise[r][1]))  # same draw with/without bots
        if clamp is not None and clamp_mode == "exam":  # the server's per-node clamp
            released = [(clamp_clicks_to_exam(c, e, sigma * clip, z=clamp), e)
                        for c, e in released]
        elif clamp is not None and clamp_mode in ("median", "loo-median"):  # server default
            caps = median_rate_caps(np.stack([c for c, _ in released]),
                                    np.stack([e for _, e in released]),
                                    np.full(len(released), sigma * clip), z=clamp)
            released = [(np.minimum(c, cap), e)
                        for (c, e), cap in zip(released, caps, strict=True)]
        elif clamp is not None and clamp_mode == "loo":
            released = loo_ratio_clamp(released, sigma * clip, z=clamp)
        clicks = np.sum([c for c, _ in released], axis=0)
        exam = np.sum([e for _, e in released], axis=0)
        ev = {EVIDENCE_CLICKS: clicks, EVIDENCE_EXAM: exam,
              EVIDENCE_NOISE_VAR: np.array([len(rows) * (sigma * clip) ** 2])}
        return EvidenceModel(index, ev, base)

    def rank(m: EvidenceModel) -> int:
        scores = np.asarray(m(query, pids))
        return int(1 + np.sum(scores > scores[pids.index(target)]))

    clean, attacked = model(False), model(True)
    out: dict[str, Any] = {
        "attack": "clickfraud", "defence": defence, "clamp": clamp, "spread": spread,
        "decoys": num_decoys, "draw": draw,
        "clamp_mode": clamp_mode, "fraction": fraction,
        "epsilon": "inf" if math.isinf(epsilon) else epsilon, "users": users,
        "bots": num_bots, "region": region, "query": query, "target": target,
        "pool": len(pids), "target_rank_before": rank(clean),
        "target_rank_after": rank(attacked),
    }
    if evaluate_seen:
        unseen = [q for q in data.query_ids if q not in set(seen)]
        out["no_attack"] = {"seen": evaluate(data, seen, clean)["ndcg@10"],
                            "unseen": evaluate(data, unseen, clean)["ndcg@10"]}
        out["attacked"] = {"seen": evaluate(data, seen, attacked)["ndcg@10"],
                           "unseen": evaluate(data, unseen, attacked)["ndcg@10"]}
    return out


# The per-node clamp candidates of docs/results.md (none = today's evidence, cap on).
CLAMP_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"clamp": None}, {"clamp": 0.0}, {"clamp": 1.0}, {"clamp": 2.0}, {"clamp": 3.0},
    {"clamp": 2.0, "clamp_mode": "loo"}, {"clamp": 1.0, "clamp_mode": "loo-median"},
    {"clamp": 2.0, "clamp_mode": "loo-median"},
)


def clamp_rows(sizes: list[int]) -> None:
    """Print (JSON lines) the clamp candidates' rows: every candidate at 0.1/1/5 % bots and
    ε 1/8/inf (seen NDCG@10 at 1 %), adaptive bots (spread over regions; 4 % decoys) and
    two more noise draws of the 100k / 1 % / ε 1 cell."""
    def emit(**kw: Any) -> None:
        print(json.dumps(run(**kw)), flush=True)

    for users in sizes:
        for eps in (1.0, 8.0, math.inf):
            for frac in (0.001, 0.01, 0.05):
                for cand in CLAMP_CANDIDATES:
                    emit(fraction=frac, epsilon=eps, users=users, evaluate_seen=frac == 0.01,
                         **cand)
        for eps in (1.0, math.inf):
            for cand in (CLAMP_CANDIDATES[0], CLAMP_CANDIDATES[3], CLAMP_CANDIDATES[7]):
                emit(fraction=0.01, epsilon=eps, users=users, spread=True, **cand)
                emit(fraction=0.01, epsilon=eps, users=users, decoys=0.04, **cand)
                emit(fraction=0.05, epsilon=eps, users=users, spread=True, **cand)
    if 100_000 in sizes:
        for draw in (1, 2):
            for cand in (CLAMP_CANDIDATES[0], CLAMP_CANDIDATES[3], CLAMP_CANDIDATES[7]):
                emit(fraction=0.01, epsilon=1.0, users=100_000, draw=draw, evaluate_seen=True,
                     **cand)


if __name__ == "__main__":
    import sys

    if "--clamps" in sys.argv:
        clamp_rows([int(a) for a in sys.argv[1:] if a != "--clamps"] or [100_000, 10_000])
        raise SystemExit(0)
    sizes = [int(a) for a in sys.argv[1:]] or [10_000, 100_000]
    for users in sizes:
        for eps in (1.0, 8.0, math.inf):
            for frac in (0.001, 0.01, 0.05):
                for on in (False, True):
                    print(json.dumps(run(fraction=frac, epsilon=eps, users=users, defence=on,
                                         evaluate_seen=frac == 0.01)), flush=True)
