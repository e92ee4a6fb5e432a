"""Per-round bookkeeping on the server: evaluate, checkpoint, log progress."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from server.checkpoint import RunDirectory
from shared_model.evaluation import nest_views

log = logging.getLogger("fedrank.server")
PROGRESS = "[fedrank]"


class RoundRecorder:
    """Called by the strategy after each round with the new global weights.

    Keeps ``metrics.json`` (``rounds`` and ``final``) and a checkpoint per round, with the
    round number offset by the rounds a resumed run had already done. Each row's ``replies``
    says which nodes' replies were rejected (with the escaped reason), clipped (with the
    update norm they sent) or refused (error replies) that round (:meth:`note_replies`).
    """

    def __init__(
        self,
        run_dir: RunDirectory,
        *,
        evaluate: Callable[[dict[str, np.ndarray]], dict[str, float]],
        strategy_state: Callable[[], dict[str, np.ndarray]],
        config: dict[str, Any],
        total_rounds: int,
        offset: int = 0,
        previous_rounds: list[dict[str, Any]] | None = None,
        after_round: Callable[[int, dict[str, np.ndarray], dict[str, float]], Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.evaluate = evaluate
        self.strategy_state = strategy_state
        self.config = config
        self.total_rounds = total_rounds
        self.offset = offset
        self.rounds: list[dict[str, Any]] = list(previous_rounds or [])
        self.epsilon_max = max((r["epsilon_max"] for r in self.rounds), default=0.0)
        self.initial: dict[str, float] | None = None
        self.after_round = after_round
        self._round_started = time.perf_counter()
        self._replies: dict[str, list[dict[str, Any]]] = _no_replies()

    def note_replies(self, server_round: int, replies: dict[str, list[dict[str, Any]]]) -> None:
        """What reply validation did in ``server_round`` (goes into that round's row)."""
        del server_round  # the row written next is this round's
        self._replies = {k: list(replies.get(k, [])) for k in _no_replies()}

    def note_epsilon(self, epsilon: float) -> None:
        """ε reported by this round's nodes (cumulative per node, so keep the max)."""
        self.epsilon_max = max(self.epsilon_max, epsilon)

    def __call__(self, server_round: int, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        metrics = self.evaluate(arrays)
        if server_round == 0:
            # Flower evaluates the starting weights before round 1.
            self.initial = metrics
            log.info("%s start (round %d): %s", PROGRESS, self.offset, _fmt(metrics))
            self._round_started = time.perf_counter()
            return metrics
        true_round = self.offset + server_round
        seconds = time.perf_counter() - self._round_started
        eps = self.epsilon_max if self.config.get("epsilon") != "inf" else math.inf
        row = {"round": true_round, **metrics, "epsilon_max": eps, "seconds": round(seconds, 3),
               "replies": self._replies}
        self._replies = _no_replies()
        self.rounds = [r for r in self.rounds if r["round"] < true_round] + [row]
        digest = self.run_dir.save(
            round=true_round,
            arrays=arrays,
            strategy_state=self.strategy_state(),
            rng_state={"python": list(random.getstate()[1][:4]), "numpy_seed": true_round},
            config=self.config,
            metrics=self.metrics_json(),
        )
        if self.after_round is not None:
            self.after_round(true_round, arrays, metrics)
        log.info(
            "%s round %d/%d: %s eps_max=%s %.1fs weights=%s",
            PROGRESS, true_round, self.total_rounds, _fmt(metrics), _eps(eps), seconds, digest[:12],
        )
        self._round_started = time.perf_counter()
        return metrics

    def metrics_json(self) -> dict[str, Any]:
        """``{"rounds": [...], "final": {...}, "initial": {...}}`` (ε=inf written as "inf")."""
        rounds = [_jsonable(_with_views(r)) for r in self.rounds]
        out: dict[str, Any] = {"rounds": rounds, "final": rounds[-1] if rounds else {}}
        if self.initial is not None:
            out["initial"] = _with_views(self.initial)
        baselines = getattr(self.evaluate, "baselines", None)
        if baselines:
            # zero-shot MiniLM and BM25 on the same seen/unseen queries (server.evaluator)
            out["baselines"] = baselines
        return out


def _no_replies() -> dict[str, list[dict[str, Any]]]:
    return {"rejected": [], "clipped": [], "refused": [], "evidence": [], "downweighted": [],
            "robust_clipped": [], "robust_spread": []}


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _eps(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:.4f}"


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()}


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and return it."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def _with_views(row: dict[str, Any]) -> dict[str, Any]:
    """A row for metrics.json: flat ``seen-<metric>`` keys (what Flower's MetricRecord
    carries) become ``{"seen": {...}, "unseen": {...}}``; the flat unseen keys (``ndcg@10``,
    ``mrr``, ``auc``) stay as before. Rows already in that shape are returned as they are."""
    if not any(k.startswith("seen-") for k in row):
        return row
    flat = {k: v for k, v in row.items() if not k.startswith("seen-")}
    return {**flat, **nest_views(row)}
