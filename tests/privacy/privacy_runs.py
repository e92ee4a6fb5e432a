"""Synthetic run directories for the audit and verify tests: honest ledgers written with the
real Ledger (ε from Opacus' RDP accountant), a config and a metrics file."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

import typer

from privacy.accounting import epsilon_from_history
from privacy.commands import register
from privacy.ledger import Ledger, LedgerEvent

DELTA = 1e-5
# Cheap but realistic DP-SGD parameters per node: (sigma, q, steps per round).
NODE_PARAMS = {"node-0": (1.0, 0.02, 10), "node-1": (1.2, 0.05, 6)}
ROUNDS = 3
CONFIG = {"privacy-shape": "regional", "epsilon": "3.0", "delta": DELTA, "secagg": False}


@functools.cache
def honest_epsilon(sigma: float, q: float, total_steps: int) -> float:
    """What a node's Opacus RDP accountant reports after ``total_steps`` identical steps."""
    return epsilon_from_history(history=[(sigma, q, total_steps)], delta=DELTA)


def _event(node: str, round_: int, mechanism: str, steps: int, eps: float) -> LedgerEvent:
    sigma, q, _ = NODE_PARAMS[node]
    return LedgerEvent(
        node=node, round=round_, mechanism=mechanism, unit_of_privacy="user",
        noise_multiplier=sigma, sample_rate=q, steps=steps, clip_norm=1.0, delta=DELTA,
        accountant="rdp", epsilon_after=eps,
        detail="over budget" if mechanism == "refusal" else None,
    )  # fmt: skip


def make_run(root: Path, *, rounds: int = ROUNDS, refusing: Iterable[str] = ()) -> Path:
    """A regional run of ``rounds`` rounds; nodes in ``refusing`` then refuse one more."""
    run = root / "run"
    (run / "ledger").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(CONFIG, indent=2))
    refusing = set(refusing)
    for node, (sigma, q, steps) in NODE_PARAMS.items():
        ledger = Ledger(run / "ledger" / f"{node}.jsonl")
        eps = 0.0
        for round_ in range(1, rounds + 1):
            eps = honest_epsilon(sigma, q, steps * round_)
            ledger.append(_event(node, round_, "dp-sgd", steps, eps))
        if node in refusing:
            ledger.append(_event(node, rounds + 1, "refusal", 0, eps))
    metrics = {
        "rounds": [
            {"round": r, "ndcg@10": 0.5 + 0.01 * r, "mrr": 0.4, "auc": 0.6,
             "epsilon_max": 1.0, "seconds": 1.0}  # fmt: skip
            for r in range(1, rounds + 1)
        ],
        "final": {"ndcg@10": 0.53, "mrr": 0.4, "auc": 0.6},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def cli() -> typer.Typer:
    """A fresh `fedrank`-like app with the privacy commands registered."""
    app = typer.Typer()
    bench = typer.Typer()
    app.add_typer(bench, name="bench")
    register(app, bench)
    return app
