"""Measuring on-device personalization and "for you" recommendation on a run directory.

Both re-simulate the run's world (``config.json``: ``scenario``, ``seed``, folds), which gives
exactly the click logs the run's nodes trained on (training-fold queries only), and use the
run's final global model (its signed release when present, else its checkpoint). No Flower.

Personalized A/B (:func:`personalized_ab`)
    Every user's device learns its :class:`~shared_model.personal.UserState` from the user's
    own sessions in that log. Then each user runs max(1, Poisson(5)) *future* sessions on
    *seen* queries (training-fold queries, which the federation trained on), each query drawn
    from the user's own taste (the simulator's P ∝ w_user[category] + 0.02), sees the arm's top
    10 of the query's judged pool and clicks with the simulator's click model, user taste
    included: ``(1/rank) * min(1, alpha(rel) * (1 + 0.5 * w_user[category]))``. A seeded half
    of the users sees the personalized ranking (release + state), the other half the release
    alone; CTR, lift and its 95% interval by user (``simulations.ab.ctr_lift``).

Recommendation (:func:`recommend_eval`)
    Each user's sessions in time order; the last ``holdout`` share (at least one session, the
    user needs two or more) is held out. The device's recommender (``shared_model.recommend``)
    sees only the earlier sessions; a held-out session counts as a hit when one of its clicked
    products is in the top 10. hit@10 and ndcg@10 (binary gain: clicked in the held-out
    sessions) are means over users with at least one held-out click. Baselines:
    ``popular_in_region`` (the 10 most-clicked products of the user's region in everyone's
    earlier sessions: a central baseline, it needs every region user's raw clicks),
    ``popular_public`` (the 10 products with the most clicks in the release's public DP
    evidence: what a device can compute), ``similar_items`` (the 10 products most similar in
    MiniLM space to the user's last click, the clicked ones included) and ``oracle`` (each
    user's true taste and the exact click model: the simulator's ceiling).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from shared_model.personal import (
    PersonalConfig,
    PersonalScorer,
    Session,
    UserState,
    learn_state,
)
from simulations.ab import ArmCounts, ctr_lift

TOP_K = 10


@dataclass
class RunWorld:
    """What the measurements need from a run directory."""

    config: dict[str, Any]
    builder: Any
    population: Any
    train_queries: list[str]
    test_queries: list[str]
    log: pa.Table
    scorer: Any  # features [N, F] -> logits [N]
    model: str
    world: Any = None  # the WorldConfig simulated
    public_clicks: Any = None  # the final model's DP click evidence (PublicClicks) or None


def load_run_world(run_dir: Path, *, builder: Any = None, world: Any = None) -> RunWorld:
    """The run's world, its click log (training queries) and final global model."""
    from shared_model.catalog import cached_feature_builder
    from shared_model.data import DEFAULT_WANDS_DIR
    from shared_model.evaluation import query_folds
    from shared_model.world import simulate_click_log, world_population
    from simulations.ab import model_scorer, round_sources

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: is {run_dir} a fedrank run directory?")
    config = json.loads(config_path.read_text())
    if builder is None:
        builder = cached_feature_builder(
            config.get("catalog-dir") or str(DEFAULT_WANDS_DIR), config.get("cache-dir", "")
        )
    if world is None:
        from simulations.scenarios import get_scenario

        world = get_scenario(str(config["scenario"])).world
    data = builder.data
    test = query_folds(
        data.query_ids, num_folds=int(config["num-folds"]), seed=int(config.get("seed", 0))
    )[int(config["eval-fold"])]
    train = [q for q in data.query_ids if q not in set(test)]
    log = simulate_click_log(data, world, query_ids=train)
    sources = round_sources(run_dir)
    public_clicks = final_public_clicks(run_dir, builder)
    hidden = int(config.get("hidden-dim", 0))
    if sources:
        rnd, (kind, path) = list(sources.items())[-1]
        scorer = model_scorer(kind, path, hidden_dim=hidden)
        model = f"round {rnd} ({kind})"
    else:
        scorer = model_scorer("checkpoint", None, hidden_dim=hidden)
        model = "initial head (zero-shot)"
    return RunWorld(
        config, builder, world_population(data, world), train, list(test), log, scorer, model,
        world, public_clicks,
    )


def final_public_clicks(run_dir: Path, builder: Any) -> Any:
    """The DP click evidence of the run's last checkpoint as
    :class:`~shared_model.recommend.PublicClicks`, or ``None`` when it holds none.

    These are the noisy sums the server aggregated from the nodes' once-only DP releases
    (``shared_model.evidence``) and that a release carries to devices: post-processing.
    """
    from shared_model.evidence import (
        EVIDENCE_CLICKS,
        EVIDENCE_EXAM,
        EVIDENCE_NOISE_VAR,
        EvidenceIndex,
    )
    from shared_model.recommend import PublicClicks

    checkpoints = sorted((Path(run_dir) / "checkpoints").glob("round-*.npz"))
    if not checkpoints:
        return None
    with np.load(checkpoints[-1]) as npz:
        if EVIDENCE_CLICKS not in npz.files or EVIDENCE_EXAM not in npz.files:
            return None
        clicks, exam = npz[EVIDENCE_CLICKS], npz[EVIDENCE_EXAM]
        noise = float(npz[EVIDENCE_NOISE_VAR].reshape(-1)[0]) if (
            EVIDENCE_NOISE_VAR in npz.files) else 0.0
    index = EvidenceIndex(builder.data)
    if len(clicks) != index.num_pairs:
        return None
    return PublicClicks.from_evidence_arrays(builder.data, index, clicks, exam, noise)


def user_histories(log: pa.Table, data: Any) -> dict[int, list[Session]]:
    """Every user's sessions in time order (fast path of ``sessions_from_log``)."""
    from shared_model.clicks import user_session_order

    order = user_session_order(log)
    users = log.column("user_id").to_numpy()
    qids = log.column("query_id").to_pylist()
    pids = log.column("product_id").to_pylist()
    ranks = log.column("rank").to_numpy()
    clicked = log.column("clicked").to_numpy(zero_copy_only=False)
    times = log.column("timestamp").to_numpy()
    rows = np.lexsort((ranks, order, users))
    out: dict[int, list[Session]] = {}
    start = 0
    n = len(rows)
    while start < n:
        r0 = rows[start]
        end = start
        while end < n and users[rows[end]] == users[r0] and order[rows[end]] == order[r0]:
            end += 1
        idx = rows[start:end]
        q = qids[r0]
        query = data.queries.get(q)
        out.setdefault(int(users[r0]), []).append(
            Session(
                timestamp=int(times[r0]),
                query_id=q,
                query_text=query.text if query is not None else q,
                shown=tuple(pids[i] for i in idx),
                clicked=tuple(pids[i] for i in idx if clicked[i]),
            )
        )
        start = end
    return out


# ---- personalized A/B ------------------------------------------------------------------------


def _pools(world: RunWorld, queries: list[str]) -> dict[str, tuple[list[str], np.ndarray]]:
    from simulations.ab import pool_features

    pools = pool_features(world.builder, queries)
    return {
        q: (pids, np.asarray(world.scorer(f), dtype=np.float32))
        for q, (pids, f) in pools.items()
    }


def personalized_ab(
    world: RunWorld,
    *,
    config: PersonalConfig | None = None,
    users: int | None = None,
    seed: int = 0,
    sessions_per_user: float = 5.0,
    histories: dict[int, list[Session]] | None = None,
) -> dict[str, Any]:
    """The personalized-vs-global A/B on seen queries (module docstring)."""
    from shared_model.clicks import PositionBasedClickModel, dominant_category

    config = config or PersonalConfig()
    data, builder, pop = world.builder.data, world.builder, world.population
    histories = histories if histories is not None else user_histories(world.log, data)
    queries = list(world.train_queries)
    pools = _pools(world, queries)
    judged = {q: {j.product_id: j.relevance for j in data.judged(q)} for q in queries}
    rng = np.random.default_rng(seed * 7_919 + 14)
    ids = np.array(sorted(histories), dtype=np.int64)
    if users is not None and users < len(ids):
        ids = np.sort(rng.choice(ids, size=users, replace=False))
    if len(ids) < 2:
        raise ValueError("the A/B needs at least two users")
    arm = np.zeros(len(ids), dtype=np.int8)
    arm[rng.permutation(len(ids))[: len(ids) // 2]] = 1  # 0 = personalized, 1 = global
    qcats = [dominant_category(data, q) for q in queries]
    mass = pop.user_weights_for(qcats)[ids] + pop.query_smoothing
    probs = mass / mass.sum(axis=1, keepdims=True)
    per_user = np.maximum(1, rng.poisson(sessions_per_user, size=len(ids)))
    cat_col = {c: i for i, c in enumerate(pop.categories)}
    tastes = np.concatenate([pop.tastes, np.zeros((pop.num_users, 1))], axis=1)
    model = PositionBasedClickModel()
    exam = model.examination(np.arange(1, TOP_K + 1))
    global_top = {
        q: np.lexsort((np.arange(len(p)), -s))[:TOP_K] for q, (p, s) in pools.items()
    }
    clicks = np.zeros(len(ids))
    imps = np.zeros(len(ids))
    expected = np.zeros((2, len(ids)))  # expected clicks of both arms for every user (paired)

    def click_probability(u: int, q: str, top: np.ndarray) -> np.ndarray:
        pids = pools[q][0]
        shown = [pids[j] for j in top]
        rel = np.array([judged[q][p] for p in shown])
        cats = [cat_col.get(data.products[p].top_category, len(pop.categories)) for p in shown]
        mult = 1.0 + pop.taste_strength * tastes[u, cats]
        return exam[: len(shown)] * np.minimum(1.0, model.attractiveness(rel) * mult)

    for i, u in enumerate(ids.tolist()):
        personal = PersonalScorer(learn_state(histories[u], builder), builder, config)
        qs = rng.choice(len(queries), size=int(per_user[i]), p=probs[i])
        uniform = rng.random((len(qs), TOP_K))
        for s, qi in enumerate(qs.tolist()):
            q = queries[qi]
            pids, glob = pools[q]
            pers = personal.scores(glob, pids, query_text=data.queries[q].text)
            tops = (np.lexsort((np.arange(len(pids)), -pers))[:TOP_K], global_top[q])
            p_arms = [click_probability(u, q, t) for t in tops]
            expected[0, i] += float(p_arms[0].sum())
            expected[1, i] += float(p_arms[1].sum())
            p_click = p_arms[int(arm[i])]
            clicks[i] += float((uniform[s, : len(p_click)] < p_click).sum())
            imps[i] += len(p_click)
    a = ArmCounts(clicks[arm == 0], imps[arm == 0])
    b = ArmCounts(clicks[arm == 1], imps[arm == 1])
    lift = ctr_lift(a, b)
    return {
        "ctr_personalized": lift["ctr_a"],
        "ctr_global": lift["ctr_b"],
        "personalized_lift": lift["relative_lift"],
        "personalized_lift_ci95": lift["relative_lift_ci"],
        "absolute_lift": lift["lift"],
        "absolute_lift_ci95": lift["lift_ci"],
        # Same users, both rankings, expected clicks (no click noise): the effect itself.
        "paired_expected_lift": float(expected[0].sum() / expected[1].sum() - 1.0),
        "users_personalized": lift["users_a"],
        "users_global": lift["users_b"],
        "queries": "seen (training folds)",
        "model": world.model,
        "personal_config": {
            "category_weight": config.category_weight,
            "vector_weight": config.vector_weight,
            "click_weight": config.click_weight,
            "skip_weight": config.skip_weight,
            "query_vector_weight": config.query_vector_weight,
        },
        "interval": lift["interval"],
    }


def personalized_ceiling(
    world: RunWorld,
    *,
    config: PersonalConfig | None = None,
    users: int = 1_500,
    sessions_per_user: int = 5,
    seed: int = 5,
    histories: dict[int, list[Session]] | None = None,
) -> dict[str, float]:
    """How much a personal ranking *could* gain over the release: paired expected clicks.

    The first ``users`` users (by id) each run ``sessions_per_user`` future sessions on seen
    queries drawn from their own taste (as in :func:`personalized_ab`); for every session the
    expected clicks of each ranking's top 10 under the simulator's click model (no click
    noise). Returned as relative lift over the release's ranking:

    * ``personal``: the device's personal scoring (``config``);
    * ``true_taste``: ``log sigmoid(logit) + log(1 + taste_strength * w_user)``, the release
      plus each user's *true* taste (no device knows it);
    * ``oracle_relevance`` / ``oracle_relevance_taste``: the judged relevance (and the true
      taste): the simulator's ceiling;
    * ``repeat_share``: the share of future sessions whose query the user issued before.

    Parameters
    ----------
    world : RunWorld
        The run's world and final model (:func:`load_run_world`).
    config : PersonalConfig, optional
        The personal weights (default :class:`PersonalConfig`).
    users, sessions_per_user, seed
        Sample size and the generator of the future sessions.
    histories : dict, optional
        Precomputed :func:`user_histories`.

    Returns
    -------
    dict
        The lifts and ``repeat_share`` (floats).
    """
    from shared_model.clicks import PositionBasedClickModel, dominant_category

    config = config or PersonalConfig()
    data, builder, pop = world.builder.data, world.builder, world.population
    histories = histories if histories is not None else user_histories(world.log, data)
    queries = list(world.train_queries)
    pools = _pools(world, queries)
    judged = {q: {j.product_id: j.relevance for j in data.judged(q)} for q in queries}
    rng = np.random.default_rng(seed)
    ids = np.array(sorted(histories), dtype=np.int64)[:users]
    mass = pop.user_weights_for([dominant_category(data, q) for q in queries])[ids]
    probs = (mass + pop.query_smoothing) / (mass + pop.query_smoothing).sum(1, keepdims=True)
    cat_col = {c: i for i, c in enumerate(pop.categories)}
    tastes = np.concatenate([pop.tastes, np.zeros((pop.num_users, 1))], axis=1)
    model = PositionBasedClickModel()
    exam = model.examination(np.arange(1, TOP_K + 1))
    names = ("global", "personal", "true_taste", "oracle_relevance", "oracle_relevance_taste")
    total = dict.fromkeys(names, 0.0)
    repeats = sessions = 0
    for i, u in enumerate(ids.tolist()):
        state = learn_state(histories[u], builder)
        personal = PersonalScorer(state, builder, config)
        for qi in rng.choice(len(queries), size=sessions_per_user, p=probs[i]).tolist():
            q = queries[qi]
            pids, glob = pools[q]
            text = data.queries[q].text
            sessions += 1
            repeats += int(text in state.queries)
            rel = model.attractiveness(np.array([judged[q][p] for p in pids]))
            cats = np.array([cat_col.get(data.products[p].top_category, len(cat_col))
                             for p in pids])
            mult = 1.0 + pop.taste_strength * tastes[u, cats]
            attract = np.minimum(1.0, rel * mult)
            rankings = {
                "global": glob,
                "personal": personal.scores(glob, pids, query_text=text),
                "true_taste": -np.logaddexp(0.0, -glob) + np.log(mult),
                "oracle_relevance": rel,
                "oracle_relevance_taste": attract,
            }
            for name, score in rankings.items():
                top = np.lexsort((np.arange(len(pids)), -np.asarray(score)))[:TOP_K]
                total[name] += float((exam[: len(top)] * attract[top]).sum())
    out = {name: total[name] / total["global"] - 1.0 for name in names[1:]}
    out["repeat_share"] = repeats / max(1, sessions)
    return out


# ---- recommendation ----------------------------------------------------------------------------


def split_history(
    sessions: list[Session], holdout: float = 0.2
) -> tuple[list[Session], list[Session]]:
    """Earlier sessions and the held-out later ones (at least one of each; [] when < 2)."""
    if len(sessions) < 2:
        return sessions, []
    k = min(len(sessions) - 1, max(1, int(math.ceil(holdout * len(sessions)))))
    return sessions[:-k], sessions[-k:]


def _ndcg(ranked: list[str], relevant: set[str], k: int = TOP_K) -> float:
    gains = [1.0 / math.log2(i + 2) for i, p in enumerate(ranked[:k]) if p in relevant]
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return sum(gains) / ideal if ideal else 0.0


def _oracle_clicks(world: RunWorld, queries: list[str]) -> Any:
    """The simulator's exact P(click p | q, user) ingredients: per query the pool's product
    rows, expected examination under the logging policy and base attractiveness."""
    from shared_model.bm25 import Bm25Ranker

    data, builder = world.builder.data, world.builder
    cfg = world.world
    model = cfg.click_model()
    explore = cfg.exploration_probability
    exam = model.examination(np.arange(1, cfg.top_k + 1))
    bm25 = Bm25Ranker(data)
    cat_col = {c: i for i, c in enumerate(world.population.categories)}
    out = []
    for q in queries:
        rels = {j.product_id: j.relevance for j in data.judged(q)}
        ranked = list(bm25.rank(q))
        ranked += sorted(set(rels) - set(ranked))
        k = min(cfg.top_k, len(ranked))
        seen = np.full(len(ranked), explore * (k / len(ranked)) * float(exam[:k].mean()))
        seen[:k] += (1.0 - explore) * exam[:k]
        base = model.attractiveness(np.array([rels[p] for p in ranked]))
        cats = np.array([cat_col.get(data.products[p].top_category, len(cat_col))
                         for p in ranked])
        out.append((builder.rows(ranked), seen, base, cats))
    return out


def _greedy_cover(pq: np.ndarray, clicks: np.ndarray, top: int) -> list[int]:
    """Columns maximising P(the next session clicks one of them), greedily."""
    miss = np.ones(len(pq))
    chosen: list[int] = []
    for _ in range(min(top, clicks.shape[1])):
        gain = (pq * miss) @ clicks
        gain[chosen] = -1.0
        j = int(np.argmax(gain))
        chosen.append(j)
        miss = miss * (1.0 - clicks[:, j])
    return chosen


def recommend_eval(
    world: RunWorld,
    *,
    users: int | None = None,
    seed: int = 0,
    holdout: float = 0.2,
    histories: dict[int, list[Session]] | None = None,
    recommender_config: Any = None,
    oracle: bool = True,
) -> dict[str, Any]:
    """hit@10 / ndcg@10 of the device recommender, its baselines and the simulator's ceiling.

    Lists compared on each user's held-out later sessions (module docstring):

    * ``hit@10``: the device's "for you" list (state + release + its public DP click
      evidence, :class:`~shared_model.recommend.Recommender`);
    * ``hit@10_popular_in_region``: the 10 most-clicked products of the user's region in
      everyone's earlier sessions. **Not computable on a device**: it needs every region
      user's raw clicks (a central log); kept as the issue's reference;
    * ``hit@10_popular_public``: the 10 products with the most public (DP) clicks in the
      release's evidence: what a device can compute without any personal data;
    * ``hit@10_similar_items``: the 10 products most similar to the user's last click;
    * ``hit@10_oracle`` (``oracle=True``): the simulator's ceiling, a list built the same
      greedy way from each user's *true* taste and the exact click model (no device has it).
    """
    from shared_model.recommend import RecommendConfig, Recommender

    data, builder, pop = world.builder.data, world.builder, world.population
    histories = histories if histories is not None else user_histories(world.log, data)
    splits = {u: split_history(s, holdout) for u, s in histories.items()}
    # Region popularity over everyone's earlier sessions (a central, raw-data baseline).
    region_counts: dict[int, dict[str, int]] = {}
    for u, (past, _) in splits.items():
        counts = region_counts.setdefault(int(pop.region_ids[u]), {})
        for s in past:
            for p in s.clicked:
                counts[p] = counts.get(p, 0) + 1
    popular = {
        r: [p for p, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_K]]
        for r, c in region_counts.items()
    }
    public_popular: list[str] = []
    if world.public_clicks is not None:
        volume: dict[str, float] = {}
        for text, (pids, c, _) in world.public_clicks.queries.items():
            if world.public_clicks.has_traffic(text):
                for p, v in zip(pids, np.maximum(np.asarray(c), 0.0).tolist(), strict=True):
                    volume[p] = volume.get(p, 0.0) + v
        public_popular = [p for p, _ in sorted(volume.items(), key=lambda kv: (-kv[1], kv[0]))
                          [:TOP_K]]
    eligible = [u for u, (_, future) in splits.items() if any(s.clicked for s in future)]
    rng = np.random.default_rng(seed * 7_919 + 15)
    if users is not None and users < len(eligible):
        eligible = sorted(rng.choice(eligible, size=users, replace=False).tolist())
    scorer = world.scorer
    from shared_model.scoring import candidate_features

    def global_scores(text: str, ids: Sequence[str]) -> np.ndarray:
        q = builder.query_vector(text)
        return np.asarray(scorer(candidate_features(builder, text, q, ids)), dtype=np.float32)

    recommender = Recommender(
        builder, global_scores, recommender_config or RecommendConfig(),
        public_clicks=world.public_clicks,
    )
    full = builder.full
    lists = ["", "_popular_in_region", "_popular_public", "_similar_items"]
    if oracle and world.world is not None:
        from shared_model.clicks import dominant_category

        queries = list(world.train_queries)
        parts = _oracle_clicks(world, queries)
        cols = np.unique(np.concatenate([rows for rows, *_ in parts]))
        where = {int(r): i for i, r in enumerate(cols.tolist())}
        spots = [np.fromiter((where[int(r)] for r in rows), np.int64, count=len(rows))
                 for rows, *_ in parts]
        mass = pop.user_weights_for([dominant_category(data, q) for q in queries])
        mass = mass + pop.query_smoothing
        tastes = np.concatenate([pop.tastes, np.zeros((pop.num_users, 1))], axis=1)
        lists.append("_oracle")
    sums = {f"{m}@10{name}": 0.0 for name in lists for m in ("hit", "ndcg")}
    for u in eligible:
        past, future = splits[u]
        target = {p for s in future for p in s.clicked}
        state = learn_state(past, builder)
        ranked_lists = {"": [p for p, _ in recommender.recommend(state, top=TOP_K)],
                        "_popular_in_region": popular.get(int(pop.region_ids[u]), []),
                        "_popular_public": public_popular}
        last = state.recent[-1] if state.recent else None
        if last is not None:
            sims = full @ full[builder.product_row[last]]
            order = np.lexsort((np.arange(len(sims)), -sims))[:TOP_K]
            ranked_lists["_similar_items"] = [builder.product_ids[i] for i in order]
        else:
            ranked_lists["_similar_items"] = []
        if "_oracle" in lists:
            clicks = np.zeros((len(parts), len(cols)))
            for i, ((_, seen, base, cats), spot) in enumerate(zip(parts, spots, strict=True)):
                mult = 1.0 + pop.taste_strength * tastes[u, cats]
                clicks[i, spot] = seen * np.minimum(1.0, base * mult)
            pq = mass[u] / mass[u].sum()
            ranked_lists["_oracle"] = [
                builder.product_ids[int(cols[j])] for j in _greedy_cover(pq, clicks, TOP_K)
            ]
        for name in lists:
            ranked = ranked_lists[name]
            sums[f"hit@10{name}"] += float(any(p in target for p in ranked[:TOP_K]))
            sums[f"ndcg@10{name}"] += _ndcg(ranked, target)
    n = max(1, len(eligible))
    result: dict[str, Any] = {k: v / n for k, v in sums.items()}

    def ratio(a: str, b: str) -> float:
        return result[a] / result[b] if result.get(b) else float("inf")

    result.update(
        {
            "users": len(eligible),
            "holdout": holdout,
            "model": world.model,
            "public_clicks": world.public_clicks is not None,
            "lift_vs_popular_in_region": ratio("hit@10", "hit@10_popular_in_region"),
            "lift_vs_popular_public": ratio("hit@10", "hit@10_popular_public"),
        }
    )
    if "_oracle" in lists:
        result["oracle_vs_popular_in_region"] = ratio("hit@10_oracle",
                                                      "hit@10_popular_in_region")
    return result


def personal_state_size(world: RunWorld, histories: dict[int, list[Session]]) -> dict[str, int]:
    """Largest and median serialised state over the users (bytes)."""
    sizes = [len(learn_state(s, world.builder).to_bytes()) for s in histories.values()]
    return {"state_bytes_max": int(max(sizes)), "state_bytes_median": int(np.median(sizes))}


__all__ = [
    "RunWorld",
    "UserState",
    "load_run_world",
    "personal_state_size",
    "personalized_ab",
    "personalized_ceiling",
    "recommend_eval",
    "split_history",
    "user_histories",
]
