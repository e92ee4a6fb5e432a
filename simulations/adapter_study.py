"""Flower-free study (issue 9, unseen floor): richer generalising features and a semantic adapter.

For each of the 5 query folds (seed 0) the models below are trained on the fold's training
(seen) queries' simulated clicks (regional-5 world, exploration sessions, at most 2 sessions
per user), centrally (no DP) and with DP-SGD at the noise an ε=1 regional-5 federation
adds, then scored on the seen and the held-out (unseen) queries' human judgments:

* ``base4``: the production head (``shared_model.features``' 4 features);
* ``rich``: a linear head over the richer per-field features of
  :mod:`shared_model.rich_features` (per-field cosines, per-field BM25, query-term
  coverage, pseudo-relevance feedback);
* ``adapter``: ``base4`` plus the low-rank residual of :mod:`shared_model.adapter`.

Every model starts as zero-shot MiniLM (its residual at zero), so ``α``-shrinking the
learned part toward the start is a blend with zero-shot. The guard chooses (model, α) by an
inner leave-queries-out CV on the fold's **seen** queries only; held-out labels are read
only to report.

    python -m simulations.adapter_study [--json FILE] [--folds 0,1,2,3,4] [--guard]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from shared_model.adapter import AdapterConfig, AdapterHead
from shared_model.baseline import restrict_to_queries
from shared_model.catalog import cached_feature_builder
from shared_model.data import DEFAULT_WANDS_DIR
from shared_model.evaluation import evaluate, query_folds
from shared_model.features import (
    BASE_FEATURE_NAMES,
    RICH_FEATURE_NAMES,
    FeatureBuilder,
    PairTable,
    build_pair_table,
)
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.training import TrainConfig, UserGroups, train_head
from shared_model.world import simulate_click_log
from simulations.scenarios import get_scenario

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
BASE4 = BASE_FEATURE_NAMES


@dataclass(frozen=True)
class StudyConfig:
    """Hyperparameters of the study (all of them; nothing is tuned on held-out labels).

    Parameters
    ----------
    nodes
        Regional nodes the federation averages over (regional-5: 5).
    node_batch
        Users per DP-SGD step at one node (regional-5's ``batch-size``).
    node_sigma
        σ a regional-5 node uses at ε=1 (``client.evidence_release.dp_sgd_noise_multiplier``
        with the release taking 3/4 of ε, q = 1/8, 240 steps: 12.18).
    rounds
        Federated rounds (one local epoch each): epochs of pooled DP-SGD.
    central
        Non-private training (pooled, plain SGD).
    dp_learning_rate
        SGD step size of the DP runs (regional-5's ``learning-rate``).
    clip_norm
        Per-user gradient bound.
    inner_folds
        Folds of the seen-query CV that chooses (model, α).
    """

    nodes: int = 5
    node_batch: int = 256
    node_sigma: float = 12.18
    rounds: int = 30
    central: TrainConfig = TrainConfig(learning_rate=0.1, batch_size=64, local_epochs=4)
    dp_learning_rate: float = 0.5
    clip_norm: float = 1.0
    inner_folds: int = 4

    def dp_train(self) -> TrainConfig:
        """Pooled DP-SGD with the same noise per averaged update as the federation:
        FedAvg over ``nodes`` node updates (batch ``node_batch``, σ ``node_sigma``) has noise
        std σ·C/(batch·sqrt(nodes)) on the mean gradient; pooled batch ``nodes·node_batch``
        needs σ·sqrt(nodes) for the same."""
        return TrainConfig(
            learning_rate=self.dp_learning_rate,
            batch_size=self.nodes * self.node_batch,
            local_epochs=self.rounds,
            clip_norm=self.clip_norm,
            noise_multiplier=self.node_sigma * math.sqrt(self.nodes),
        )


def pack_users(table: pa.Table, pairs: PairTable, *, sessions: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``[U, M]`` pair index, rank, click, mask: each user's kept exploration sessions
    (at most ``sessions``, drawn without replacement), as ``build_user_groups`` packs them."""
    table = table.filter(table.column("exploration"))
    user = table.column("user_id").to_numpy()
    session = table.column("session_id").to_numpy()
    rank = table.column("rank").to_numpy().astype(np.int64)
    clicked = table.column("clicked").to_numpy(zero_copy_only=False).astype(np.float32)
    qids = table.column("query_id").to_pylist()
    pids = table.column("product_id").to_pylist()
    pair = np.fromiter((pairs.index[(q, p)] for q, p in zip(qids, pids, strict=True)),
                       np.int64, len(qids))
    order = np.lexsort((rank, session, user))
    user, session, rank, clicked, pair = (a[order] for a in (user, session, rank, clicked, pair))
    new = np.ones(len(session), bool)
    new[1:] = (session[1:] != session[:-1]) | (user[1:] != user[:-1])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(session))
    s_user = user[starts]
    _, first = np.unique(s_user, return_index=True)
    last = np.append(first[1:], len(s_user))
    kept = []
    for a, b in zip(first, last, strict=True):
        chosen = np.arange(a, b)
        if b - a > sessions:
            chosen = np.sort(rng.choice(chosen, size=sessions, replace=False))
        kept.append(np.concatenate([np.arange(starts[s], ends[s]) for s in chosen]))
    width = max(len(k) for k in kept)
    out = [np.zeros((len(kept), width), t) for t in (np.int64, np.int64, np.float32, np.float32)]
    for i, rows in enumerate(kept):
        n = len(rows)
        out[0][i, :n], out[1][i, :n], out[2][i, :n], out[3][i, :n] = (
            pair[rows], rank[rows], clicked[rows], 1.0)
    return out[0], out[1], out[2], out[3]


def groups_for(packed: tuple[np.ndarray, ...], pairs: PairTable, cols: Sequence[str],
               *, adapter: bool) -> UserGroups:
    """UserGroups whose features are ``pairs``' standardised columns ``cols`` (plus, for
    the adapter, the query and pool-centred product vectors)."""
    pair, rank, clicked, mask = packed
    feats = pairs.matrix(cols, adapter=adapter)[pair]
    return UserGroups(feats, rank, clicked, mask)


def make_model(kind: str, num_features: int, config: AdapterConfig) -> torch.nn.Module:
    """A fresh zero-shot-initialised model."""
    if kind == "adapter":
        return AdapterHead(HeadConfig(num_features=num_features), config,
                           generator=torch.Generator().manual_seed(0))
    return RankerHead(HeadConfig(num_features=num_features))


def shrunk_scores(model: torch.nn.Module, feats: np.ndarray, alpha: float) -> np.ndarray:
    """Scores of the model moved ``alpha`` of the way from its zero-shot start:
    ``alpha·model + (1−alpha)·zero-shot`` (zero-shot = standardised cosine, column 0)."""
    x = torch.from_numpy(feats)
    with torch.no_grad():
        learned = model.relevance(x).numpy()  # type: ignore[operator]
    return alpha * learned + (1 - alpha) * feats[:, 0]


def ndcg(pairs: PairTable, queries: Sequence[str], model: torch.nn.Module | None,
         cols: Sequence[str], adapter: bool, alpha: float) -> float:
    """Mean NDCG@10 over ``queries``' judged pools."""
    mat = pairs.matrix(cols, adapter=adapter)

    def scorer(qid: str, product_ids: Sequence[str]) -> np.ndarray:
        rows = np.fromiter((pairs.index[(qid, p)] for p in product_ids), np.int64)
        if model is None:
            return mat[rows, 0]
        return shrunk_scores(model, mat[rows], alpha)

    return float(evaluate(pairs.data, queries, scorer)["ndcg@10"])


MODELS: dict[str, tuple[tuple[str, ...], bool]] = {
    "base4": (BASE4, False),
    "rich": (RICH_FEATURE_NAMES, False),
    "adapter": (BASE4, True),
}


def model_spec(kind: str) -> tuple[tuple[str, ...], bool]:
    """Feature columns and adapter flag of a model kind; ``rich-minus-NAME`` is the
    10-feature head without feature NAME (the ablation)."""
    if kind.startswith("rich-minus-"):
        name = kind.removeprefix("rich-minus-")
        if name not in RICH_FEATURE_NAMES[1:]:
            raise ValueError(f"cannot ablate {name!r}")
        return tuple(n for n in RICH_FEATURE_NAMES if n != name), False
    return MODELS[kind]


def train(kind: str, packed: tuple[np.ndarray, ...], pairs: PairTable, private: bool,
          cfg: StudyConfig, acfg: AdapterConfig, seed: int) -> torch.nn.Module:
    """Train one model on packed users (DP-SGD when ``private``)."""
    cols, adapter = model_spec(kind)
    groups = groups_for(packed, pairs, cols, adapter=adapter)
    model = make_model(kind, len(cols), acfg)
    tc = cfg.dp_train() if private else replace(cfg.central, seed=seed)
    train_head(model, groups, tc,  # type: ignore[arg-type]
               generator=torch.Generator().manual_seed(1000 + seed))
    return model


def guard(pairs: PairTable, clicks: pa.Table, seen: list[str], kinds: Sequence[str],
          private: bool, cfg: StudyConfig, acfg: AdapterConfig, seed: int) -> dict[str, Any]:
    """Choose (model, α) on the seen queries only: inner k-fold by query over them."""
    inner = query_folds(seen, num_folds=cfg.inner_folds, seed=seed)
    scores: dict[str, list[float]] = {}
    for j, inner_test in enumerate(inner):
        held = set(inner_test)
        inner_train = [q for q in seen if q not in held]
        packed = pack_users(restrict_to_queries(clicks, inner_train), pairs, sessions=2,
                            rng=np.random.default_rng(100 * seed + j))
        for kind in kinds:
            model = train(kind, packed, pairs, private, cfg, acfg, 100 * seed + j)
            cols, adapter = model_spec(kind)
            for a in ALPHAS:
                scores.setdefault(f"{kind}@{a}", []).append(
                    ndcg(pairs, inner_test, model, cols, adapter, a))
    means = {k: float(np.mean(v)) for k, v in scores.items()}
    best = max(means, key=lambda k: (means[k], -float(k.split("@")[1])))
    return {"inner_ndcg@10": means, "choice": best}


def run_fold(i: int, pairs: PairTable, clicks: pa.Table, builder: FeatureBuilder,
             cfg: StudyConfig, acfg: AdapterConfig, kinds: Sequence[str],
             modes: Sequence[str], with_guard: bool) -> dict[str, Any]:
    data = builder.data
    folds = query_folds(data.query_ids, num_folds=5, seed=0)
    test = folds[i]
    seen = [q for q in data.query_ids if q not in set(test)]
    row: dict[str, Any] = {"fold": i, "zero_shot": {
        "seen": ndcg(pairs, seen, None, BASE4, False, 0.0),
        "unseen": ndcg(pairs, test, None, BASE4, False, 0.0)}}
    packed = pack_users(restrict_to_queries(clicks, seen), pairs, sessions=2,
                        rng=np.random.default_rng(i))
    for mode in modes:
        for kind in kinds:
            t0 = time.perf_counter()
            model = train(kind, packed, pairs, mode == "dp", cfg, acfg, i)
            cols, adapter = model_spec(kind)
            row[f"{mode}/{kind}"] = {str(a): {
                "seen": ndcg(pairs, seen, model, cols, adapter, a),
                "unseen": ndcg(pairs, test, model, cols, adapter, a)} for a in ALPHAS}
            row[f"{mode}/{kind}_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps({"fold": i, "model": f"{mode}/{kind}", "zs": row["zero_shot"],
                              "at": row[f"{mode}/{kind}"]}), flush=True)
        if with_guard:
            g = guard(pairs, clicks, seen, kinds, mode == "dp", cfg, acfg, i)
            kind, a = g["choice"].split("@")
            g["served"] = row[f"{mode}/{kind}"][a]
            row[f"{mode}/guard"] = g
            print(json.dumps({"fold": i, "guard": mode, **g}), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default="")
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--models", default="base4,rich,adapter")
    p.add_argument("--modes", default="central,dp")
    p.add_argument("--rank", type=int, default=AdapterConfig().rank)
    p.add_argument("--sigma", type=float, default=StudyConfig().node_sigma,
                   help="σ of one node (ε=1 regional-5: 12.18; ε=8: 2.15)")
    p.add_argument("--guard", action="store_true")
    args = p.parse_args(argv)
    cfg = StudyConfig(node_sigma=args.sigma)
    acfg = AdapterConfig(rank=args.rank)
    scenario = get_scenario("regional-5")
    builder = cached_feature_builder(str(DEFAULT_WANDS_DIR), "")
    pairs = build_pair_table(builder)
    clicks = simulate_click_log(builder.data, scenario.world)
    rows = [run_fold(int(f), pairs, clicks, builder, cfg, acfg, args.models.split(","),
                     args.modes.split(","), args.guard) for f in args.folds.split(",")]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": {"sigma_node": cfg.node_sigma, "rank": acfg.rank},
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
