"""Online A/B tests in simulation: simulated users click on what each round's model shows.

For a run directory, every round's global model is put in front of simulated users and
compared with (b) BM25, the logging ranker, (c) zero-shot MiniLM (the frozen encoder's cosine,
what a shop gets without any training) and (d) the previous round's model (round 0 = the
untrained head, i.e. zero-shot MiniLM), on two views of the queries: **unseen** (the
held-out fold) and **seen** (the fold's training queries, whose clicks the nodes learned
from). No training and no Flower here.

Models
    Round r's weights come from ``RUN_DIR/releases/round-NNNN/`` when that signed release
    exists, scored exactly as a device serves it (``shared_model.scoring``: ``head.onnx`` in
    onnxruntime; a seen query whose normalised text the release's ``evidence.npz`` memorised is
    scored with that DP click evidence too; verified against
    ``RUN_DIR.keys/server-signing.pub`` when present), else from ``checkpoints/round-NNNN.npz``
    scored as the server's evaluator scores it (the head moved ``head-shrink`` toward
    zero-shot, with the summed evidence when the checkpoint has some; ``strategy/*`` arrays
    are skipped).

Traffic
    Per view, that view's queries (``config.json``: ``eval-fold``, ``num-folds``, ``seed``;
    ``shared_model.evaluation.seen_unseen_queries``); no node ever trained on an unseen one. Each
    simulated user runs max(1, Poisson(5)) sessions; a session issues a query drawn
    uniformly from the fold, sees the arm's top 10 of the query's judged pool and clicks
    each result independently with the position-based click model's default probability
    ``(1/rank) * (0.05 + 0.85 * rel)`` (``shared_model.clicks.PositionBasedClickModel()``),
    ``rel`` being the human judgment. Regional taste bonuses are left out: the A/B test
    measures ranking quality on the judged relevance, not the population mix.

Design: A/B split by user, 50/50
    Each comparison is its own experiment: ``users`` simulated users, a seeded random half
    sees arm A, the other half arm B, for all their sessions (a user never switches arm).
    The same simulated users (same queries and click randomness, same split) are used for
    every round of a comparison, so round-to-round changes come from the models, not from
    re-drawing the users; each (view, comparison) pair has its own seeded users.
    Interleaving would need fewer users, but an A/B split reports what operators read (each
    arm's CTR) and extends to any metric.

CTR and its interval
    CTR = clicks / impressions of an arm (10 impressions per session). Sessions of one user
    are not independent in general, so the user is the unit of the 95% interval: by default
    a normal approximation with the delta method for a ratio of sums (variance of
    ``clicks_u - CTR * impressions_u`` over users), for the absolute lift CTR_A - CTR_B and,
    on the log scale, the relative lift CTR_A / CTR_B - 1; ``bootstrap=N`` uses a percentile
    bootstrap over users instead (N resamples per arm; slower, agrees within a few percent
    of the width at these sizes, tested).

``ab.json`` (also what ``fedrank ab --json`` prints)
    ``run_dir``, ``scenario``, ``epsilon``, ``eval_fold``, ``held_out_queries`` (unseen),
    ``seen_queries``, ``users_per_experiment``, ``design``, ``json``, ``plot``, ``rounds``
    (one per round with a model, ascending) and ``final`` (the last of them). A round is::

        {"round": r, "source": "release" | "checkpoint",
         "evidence": true when the model scored seen queries with memorised evidence,
         "unseen": {"vs_bm25": LIFT, "vs_zero_shot": LIFT, "vs_previous": LIFT},
         "seen":   {"vs_bm25": LIFT, "vs_zero_shot": LIFT, "vs_previous": LIFT},
         "vs_bm25": ..., "vs_previous": ...}   # = the unseen ones (kept for older readers)

    ``LIFT`` is :func:`ctr_lift`'s dict, arm A = the round's model, arm B = the comparator
    (``ctr_a``, ``ctr_b``, ``users_a``, ``users_b``, ``lift``, ``lift_ci``,
    ``relative_lift``, ``relative_lift_ci``, ``interval``); ``vs_previous`` also has
    ``previous_round``. Non-finite numbers are written as strings (``"nan"``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from shared_model.clicks import PositionBasedClickModel

TOP_K = 10
SESSIONS_PER_USER = 5.0

# Features [N, F] of a query's pool -> scores [N], higher is better.
Scorer = Callable[[np.ndarray], np.ndarray]
# (query id, the pool's product ids, its features [N, F]) -> scores [N], higher is better.
QueryScorer = Callable[[str, Sequence[str], np.ndarray], np.ndarray]
VIEWS = ("unseen", "seen")
COMPARATORS = ("vs_bm25", "vs_zero_shot", "vs_previous")


# ---- statistics --------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmCounts:
    """Per-user clicks and impressions of one arm."""

    clicks: np.ndarray  # float64 [users]
    impressions: np.ndarray  # float64 [users]

    @property
    def ctr(self) -> float:
        total = float(self.impressions.sum())
        return float(self.clicks.sum()) / total if total else float("nan")

    @property
    def users(self) -> int:
        return int(len(self.clicks))


def _bootstrap_ctr(arm: ArmCounts, rng: np.random.Generator, resamples: int) -> np.ndarray:
    n = arm.users
    clicks = np.empty(resamples)
    imps = np.empty(resamples)
    chunk = max(1, 2_000_000 // n)  # bounded memory: ~16 MB of indices at a time
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        clicks[start:stop] = arm.clicks[idx].sum(axis=1)
        imps[start:stop] = arm.impressions[idx].sum(axis=1)
    return np.divide(clicks, imps, out=np.full(resamples, np.nan), where=imps > 0)


def _ctr_variance(arm: ArmCounts) -> float:
    """Delta-method variance of CTR = sum(clicks) / sum(impressions), users as the unit."""
    n = arm.users
    mean_imps = float(arm.impressions.mean())
    resid = arm.clicks - arm.ctr * arm.impressions
    return float(resid.var(ddof=1)) / (n * mean_imps**2) if n > 1 and mean_imps else math.inf


def ctr_lift(
    a: ArmCounts,
    b: ArmCounts,
    *,
    resamples: int = 0,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """CTR of each arm, absolute lift A - B and relative lift A / B - 1, with intervals.

    ``resamples = 0``: normal approximation, the delta method for a ratio of sums with the
    user as the unit (cluster-robust: a user's sessions may be correlated); the relative
    lift's interval is taken on log(CTR_A / CTR_B) and mapped back. ``resamples > 0``:
    percentile bootstrap over users (each arm resampled independently). Identical arms give
    a lift of exactly 0.
    """
    if a.users == 0 or b.users == 0:
        raise ValueError("each arm needs at least one user")
    ctr_a, ctr_b = a.ctr, b.ctr
    if resamples <= 0:
        from statistics import NormalDist

        z = NormalDist().inv_cdf(0.5 + level / 2.0)
        var_a, var_b = _ctr_variance(a), _ctr_variance(b)
        se = math.sqrt(var_a + var_b)
        log_ratio = math.log(ctr_a / ctr_b) if ctr_a > 0 and ctr_b > 0 else float("nan")
        se_log = math.sqrt(var_a / ctr_a**2 + var_b / ctr_b**2) if ctr_a > 0 and ctr_b > 0 else 0
        return {
            "ctr_a": ctr_a,
            "ctr_b": ctr_b,
            "users_a": a.users,
            "users_b": b.users,
            "lift": ctr_a - ctr_b,
            "lift_ci": [ctr_a - ctr_b - z * se, ctr_a - ctr_b + z * se],
            "relative_lift": ctr_a / ctr_b - 1.0 if ctr_b else float("nan"),
            "relative_lift_ci": [
                math.exp(log_ratio - z * se_log) - 1.0,
                math.exp(log_ratio + z * se_log) - 1.0,
            ],
            "interval": f"normal (delta method, by user), {level:.0%}",
        }
    rng = np.random.default_rng(seed)
    boot_a = _bootstrap_ctr(a, rng, resamples)
    boot_b = _bootstrap_ctr(b, rng, resamples)
    tail = (1.0 - level) / 2.0 * 100.0
    diff = boot_a - boot_b
    rel = boot_a / boot_b - 1.0
    return {
        "ctr_a": ctr_a,
        "ctr_b": ctr_b,
        "users_a": a.users,
        "users_b": b.users,
        "lift": ctr_a - ctr_b,
        "lift_ci": [float(np.nanpercentile(diff, tail)), float(np.nanpercentile(diff, 100 - tail))],
        "relative_lift": ctr_a / ctr_b - 1.0 if ctr_b else float("nan"),
        "relative_lift_ci": [
            float(np.nanpercentile(rel, tail)),
            float(np.nanpercentile(rel, 100 - tail)),
        ],
        "interval": f"percentile bootstrap over users ({resamples} resamples), {level:.0%}",
    }


# ---- simulated users ---------------------------------------------------------------------


@dataclass(frozen=True)
class SimulatedUsers:
    """A fixed population for one experiment: sessions, queries, click randomness, split.

    ``arm`` is 0 (A) or 1 (B) per user; ``uniform[s, k]`` decides the click on slot k of
    session s (clicked when below the click probability), so the same users can be shown
    different rankings with everything else held fixed.
    """

    session_user: np.ndarray  # int64 [sessions]
    session_query: np.ndarray  # int64 [sessions], index into query_ids
    uniform: np.ndarray  # float64 [sessions, TOP_K]
    arm: np.ndarray  # int8 [users]
    query_ids: tuple[str, ...]

    @property
    def num_users(self) -> int:
        return int(len(self.arm))


def make_users(
    query_ids: Sequence[str],
    *,
    users: int,
    seed: int,
    sessions_per_user: float = SESSIONS_PER_USER,
) -> SimulatedUsers:
    """``users`` simulated users, split 50/50 (a seeded random half per arm)."""
    if users < 2:
        raise ValueError(f"users must be >= 2 (one per arm), got {users!r}")
    if not query_ids:
        raise ValueError("no queries to simulate")
    rng = np.random.default_rng(seed)
    per_user = np.maximum(1, rng.poisson(sessions_per_user, size=users))
    session_user = np.repeat(np.arange(users), per_user)
    session_query = rng.integers(0, len(query_ids), size=len(session_user))
    uniform = rng.random((len(session_user), TOP_K))
    arm = np.zeros(users, dtype=np.int8)
    arm[rng.permutation(users)[: users // 2]] = 1
    return SimulatedUsers(session_user, session_query, uniform, arm, tuple(query_ids))


def pool_features(
    builder: Any, query_ids: Sequence[str]
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Each query's judged pool (sorted ids) and its ``[N, F]`` features, computed once."""
    out = {}
    for q in query_ids:
        pids = sorted(j.product_id for j in builder.data.judged(q))
        out[q] = (pids, builder.features_for_query_id(q, pids))
    return out


def bm25_scores(features: np.ndarray) -> np.ndarray:
    """BM25 ranking from the features: column ``bm25`` is BM25 standardised per pool, a
    monotone map, so it orders the pool exactly as raw BM25 does."""
    from shared_model.features import FEATURE_NAMES

    return features[:, FEATURE_NAMES.index("bm25")]


def zero_shot_scorer(builder: Any) -> QueryScorer:
    """Zero-shot MiniLM: cosine of the query's and each product's full-text embedding."""

    def scorer(query_id: str, pids: Sequence[str], features: np.ndarray) -> np.ndarray:
        text = builder.data.queries[query_id].text
        return np.asarray(builder.full[builder.rows(pids)] @ builder.query_vector(text))

    return scorer


def by_features(scorer: Scorer) -> QueryScorer:
    """A features-only scorer as a :data:`QueryScorer`."""
    return lambda query_id, pids, features: scorer(features)


def shown_relevance(
    scorer: Scorer | QueryScorer,
    pools: dict[str, tuple[list[str], np.ndarray]],
    judged: dict[str, dict[str, float]],
    query_ids: Sequence[str],
    *,
    per_query: bool = False,
) -> np.ndarray:
    """``[queries, TOP_K]`` judged relevance of the scorer's top 10 (ties by product id;
    a pool smaller than 10 pads with -1 = nothing shown). ``per_query``: ``scorer`` is a
    :data:`QueryScorer`, else it takes the features alone."""
    out = np.full((len(query_ids), TOP_K), -1.0)
    for i, q in enumerate(query_ids):
        pids, feats = pools[q]
        raw = (cast(QueryScorer, scorer)(q, pids, feats) if per_query
               else cast(Scorer, scorer)(feats))
        scores = np.asarray(raw, dtype=np.float64)
        order = np.lexsort((np.arange(len(pids)), -scores))[:TOP_K]
        out[i, : len(order)] = [judged[q][pids[j]] for j in order]
    return out


def arm_counts(
    users: SimulatedUsers,
    shown: np.ndarray,
    arm: int,
    *,
    click_model: PositionBasedClickModel | None = None,
) -> ArmCounts:
    """Per-user clicks and impressions of the users in ``arm`` shown ``shown`` rankings."""
    model = click_model or PositionBasedClickModel()
    rel = shown[users.session_query]  # [sessions, TOP_K]
    valid = rel >= 0
    p = model.examination(np.arange(1, TOP_K + 1))[None, :] * model.attractiveness(
        np.clip(rel, 0.0, 1.0)
    )
    clicked = (users.uniform < p) & valid
    in_arm = users.arm[users.session_user] == arm
    n = users.num_users
    clicks = np.bincount(users.session_user[in_arm], weights=clicked[in_arm].sum(1), minlength=n)
    imps = np.bincount(users.session_user[in_arm], weights=valid[in_arm].sum(1), minlength=n)
    members = users.arm == arm
    return ArmCounts(clicks[members].astype(np.float64), imps[members].astype(np.float64))


def ab_test(
    users: SimulatedUsers,
    shown_a: np.ndarray,
    shown_b: np.ndarray,
    *,
    seed: int = 0,
    resamples: int = 0,
) -> dict[str, Any]:
    """Half the users see A, half B; CTRs and lifts (see :func:`ctr_lift`)."""
    return ctr_lift(
        arm_counts(users, shown_a, 0), arm_counts(users, shown_b, 1),
        seed=seed, resamples=resamples,
    )


# ---- run directories ---------------------------------------------------------------------


def round_sources(run_dir: Path) -> dict[int, tuple[str, Path]]:
    """``{round: ("release" | "checkpoint", path)}``; a release wins over a checkpoint."""
    sources: dict[int, tuple[str, Path]] = {}
    for npz in sorted((run_dir / "checkpoints").glob("round-*.npz")):
        sources[int(npz.stem.split("-")[1])] = ("checkpoint", npz)
    for rel in sorted((run_dir / "releases").glob("round-*")):
        if rel.is_dir() and (rel / "head.onnx").exists():
            sources[int(rel.name.split("-")[1])] = ("release", rel)
    return dict(sorted(sources.items()))


def _head_scorer(state: dict[str, np.ndarray], hidden_dim: int) -> Scorer:
    import torch

    from shared_model.ranker import HeadConfig, RankerHead
    from shared_model.state import load_head_state

    head = RankerHead(HeadConfig(hidden_dim=hidden_dim))
    if state:
        load_head_state(head, state)
    head.eval()

    def scorer(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return head.relevance(torch.from_numpy(features)).numpy()

    return scorer


def _checkpoint_state(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """A checkpoint's head arrays and its memorised evidence arrays (``None`` when absent);
    ``strategy/*`` arrays are skipped."""
    from server.checkpoint import STRATEGY_PREFIX
    from shared_model.evidence import split_evidence

    with np.load(path) as npz:
        state = {k: npz[k] for k in npz.files if not k.startswith(STRATEGY_PREFIX)}
    return split_evidence(state)


def model_scorer(kind: str, path: Path | None, *, hidden_dim: int) -> Scorer:
    """The scorer of one round's model (``path=None``: the initial, untrained head)."""
    if path is None:
        return _head_scorer({}, hidden_dim)
    if kind == "checkpoint":
        return _head_scorer(_checkpoint_state(path)[0], hidden_dim)
    from shared_model.release import default_public_key_path, load_public_key
    from shared_model.scoring import OnnxScorer

    key_path = default_public_key_path(path.parent.parent)
    return OnnxScorer(path, load_public_key(key_path) if key_path.exists() else None).scores


def round_ranker(
    kind: str, path: Path | None, *, hidden_dim: int, builder: Any, head_shrink: float = 1.0,
    evidence_index: Any = None,
) -> tuple[QueryScorer, bool]:
    """One round's model as a :data:`QueryScorer`, and whether it used memorised evidence.

    A release is scored as a device scores it (``DeviceRanker``'s arithmetic: head, plus the
    release's evidence for a seen query). A checkpoint is scored as the server evaluated it:
    its head moved ``head_shrink`` of the way from zero-shot (``shared_model.state.
    shrink_state``), with its summed evidence when it has some (``EvidenceModel`` over
    ``evidence_index``). ``path=None``: the untrained head.
    """
    if path is None:
        return by_features(model_scorer(kind, None, hidden_dim=hidden_dim)), False
    if kind == "checkpoint":
        from shared_model.evaluation import head_scorer
        from shared_model.evidence import EvidenceIndex, EvidenceModel
        from shared_model.ranker import HeadConfig, RankerHead
        from shared_model.state import load_head_state, shrink_state

        head_arrays, evidence = _checkpoint_state(path)
        config = HeadConfig(hidden_dim=hidden_dim)
        served = shrink_state(head_arrays, head_shrink, config)
        if evidence is None:
            return by_features(_head_scorer(served, hidden_dim)), False
        head = RankerHead(config)
        load_head_state(head, served)
        model = EvidenceModel(
            evidence_index if evidence_index is not None else EvidenceIndex(builder.data),
            evidence, head_scorer(head, builder),
        )
        return (lambda query_id, pids, features: model(query_id, pids)), True
    from shared_model.release import ReleaseError, default_public_key_path, load_public_key
    from shared_model.release_evidence import EVIDENCE_FILE, EvidenceError, ReleaseEvidence
    from shared_model.scoring import OnnxScorer

    key_path = default_public_key_path(path.parent.parent)
    onnx = OnnxScorer(path, load_public_key(key_path) if key_path.exists() else None)
    data = onnx.files.get(EVIDENCE_FILE)
    if data is None:
        return by_features(onnx.scores), False
    try:
        memorised = ReleaseEvidence.from_bytes(data, where=f"release {path}: {EVIDENCE_FILE}")
        memorised.check_catalog(builder.product_ids)
    except EvidenceError as exc:
        raise ReleaseError(f"release {path}: {exc}") from None

    def scorer(query_id: str, pids: Sequence[str], features: np.ndarray) -> np.ndarray:
        head = onnx.scores(features)
        entry = memorised.lookup(builder.data.queries[query_id].text)
        return head if entry is None else memorised.apply(entry, builder.rows(pids), head)

    return scorer, True


def run_ab(
    run_dir: Path,
    *,
    users: int = 20_000,
    seed: int = 0,
    resamples: int = 0,
    out_dir: Path | None = None,
    builder: Any = None,
) -> dict[str, Any]:
    """A/B tests of every round's model vs BM25, vs zero-shot MiniLM and vs the previous
    round, on unseen and on seen queries; writes ``ab.json`` (keys: module docstring) and
    ``ab.png`` and returns the same dict."""
    from shared_model.catalog import cached_feature_builder
    from shared_model.data import DEFAULT_WANDS_DIR
    from shared_model.evaluation import seen_unseen_queries

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: is {run_dir} a fedrank run directory?")
    if users < 2:
        raise ValueError(f"users must be >= 2 (one per arm), got {users!r}")
    config = json.loads(config_path.read_text())
    sources = round_sources(run_dir)
    if not sources:
        raise FileNotFoundError(f"{run_dir} has no checkpoints/round-*.npz nor releases/")
    if builder is None:
        builder = cached_feature_builder(
            config.get("catalog-dir") or str(DEFAULT_WANDS_DIR), config.get("cache-dir", "")
        )
    data = builder.data
    seen, test = seen_unseen_queries(
        data.query_ids, num_folds=int(config["num-folds"]), seed=int(config.get("seed", 0)),
        eval_fold=int(config["eval-fold"]),
    )
    view_queries = {"unseen": list(test), "seen": list(seen)}
    hidden = int(config.get("hidden-dim", 0))
    head_shrink = float(config.get("head-shrink", 1.0))
    from shared_model.evidence import EvidenceIndex

    index = EvidenceIndex(data)
    zero_shot = zero_shot_scorer(builder)
    initial = by_features(model_scorer("checkpoint", None, hidden_dim=hidden))
    views: dict[str, dict[str, Any]] = {}
    for v, name in enumerate(VIEWS):
        queries = view_queries[name]
        if not queries:
            continue
        judged = {q: {j.product_id: j.relevance for j in data.judged(q)} for q in queries}
        pools = pool_features(builder, queries)
        views[name] = {
            "queries": queries, "judged": judged, "pools": pools,
            # Seeds: the unseen view keeps the seeds it always had (+1 BM25, +2 previous).
            "users": {c: make_users(queries, users=users, seed=seed * 7_919 + 1 + i + 3 * v)
                      for i, c in enumerate(("vs_bm25", "vs_previous", "vs_zero_shot"))},
            "vs_bm25": shown_relevance(bm25_scores, pools, judged, queries),
            "vs_zero_shot": shown_relevance(zero_shot, pools, judged, queries, per_query=True),
            "vs_previous": shown_relevance(initial, pools, judged, queries, per_query=True),
        }
    previous_round = 0
    rounds: list[dict[str, Any]] = []
    for rnd, (kind, path) in sources.items():
        scorer, has_evidence = round_ranker(kind, path, hidden_dim=hidden, builder=builder,
                                            head_shrink=head_shrink, evidence_index=index)
        row: dict[str, Any] = {"round": rnd, "source": kind, "evidence": has_evidence}
        for name, view in views.items():
            shown = shown_relevance(
                scorer, view["pools"], view["judged"], view["queries"], per_query=True
            )
            row[name] = {
                c: ab_test(view["users"][c], shown, view[c], seed=seed + rnd,
                           resamples=resamples)
                for c in COMPARATORS
            }
            row[name]["vs_previous"] = {"previous_round": previous_round,
                                        **row[name]["vs_previous"]}
            view["vs_previous"] = shown
        if "unseen" in row:  # the keys older readers know: the unseen view
            row["vs_bm25"] = row["unseen"]["vs_bm25"]
            row["vs_previous"] = row["unseen"]["vs_previous"]
        rounds.append(row)
        previous_round = rnd
    out = Path(out_dir) if out_dir is not None else run_dir / "ab"
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "run_dir": str(run_dir),
        "scenario": config.get("scenario"),
        "epsilon": config.get("epsilon"),
        "eval_fold": int(config["eval-fold"]),
        "held_out_queries": list(test),
        "seen_queries": list(seen),
        "users_per_experiment": users,
        "design": "A/B split 50/50 by user; PBM defaults; 95% interval by user",
        "rounds": rounds,
        "final": rounds[-1],
        "json": str(out / "ab.json"),
        "plot": str(out / "ab.png"),
    }
    (out / "ab.json").write_text(json.dumps(_jsonable(result), indent=2))
    _plot(rounds, out / "ab.png", title=f"{run_dir.name}: simulated A/B")
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _plot(rounds: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = [v for v in VIEWS if v in rounds[0]]
    fig, axes = plt.subplots(2, len(views), figsize=(5.5 * len(views), 6), sharex=True,
                             squeeze=False)
    x = [r["round"] for r in rounds]
    for col, view in enumerate(views):
        ax1, ax2 = axes[0][col], axes[1][col]
        ax1.plot(x, [r[view]["vs_bm25"]["ctr_a"] for r in rounds], marker="o",
                 label="round's model")
        ax1.plot(x, [r[view]["vs_bm25"]["ctr_b"] for r in rounds], linestyle="--",
                 label="BM25 arm")
        ax1.plot(x, [r[view]["vs_zero_shot"]["ctr_b"] for r in rounds], linestyle="-.",
                 label="zero-shot MiniLM arm")
        ax1.plot(x, [r[view]["vs_previous"]["ctr_b"] for r in rounds], linestyle=":",
                 label="previous round arm")
        ax1.set_ylabel("CTR (clicks / impression)")
        ax1.set_title(f"{view} queries", fontsize=10)
        ax1.legend(fontsize=7)
        for key, label in (("vs_bm25", "vs BM25"), ("vs_zero_shot", "vs zero-shot"),
                           ("vs_previous", "vs previous round")):
            lift = np.array([r[view][key]["relative_lift"] for r in rounds]) * 100
            lo = np.array([r[view][key]["relative_lift_ci"][0] for r in rounds]) * 100
            hi = np.array([r[view][key]["relative_lift_ci"][1] for r in rounds]) * 100
            ax2.errorbar(x, lift, yerr=[lift - lo, hi - lift], capsize=2, marker=".",
                         label=label)
        ax2.axhline(0, color="grey", linewidth=0.8)
        ax2.set_xlabel("round")
        ax2.set_ylabel("relative CTR lift, % (95% CI)")
        ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
