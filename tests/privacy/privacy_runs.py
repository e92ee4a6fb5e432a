"""Synthetic run directories for the audit and verify tests: honest ledgers written with the
real Ledger (ε from Opacus' RDP accountant), signed by each node's key, beside each node's
privacy plan, a config and a metrics file."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

import typer

from privacy.accounting import epsilon_from_history
from privacy.commands import register
from privacy.ledger import Ledger, LedgerEvent, LedgerSigner, node_signer

DELTA = 1e-5
ROUNDS = 3
LOCAL_EPOCHS = 1
BATCH_SIZE = 64
CLIP_NORM = 1.0
BUDGET = 6.0
# Cheap but realistic DP-SGD parameters per node: (sigma, q, steps per round), with
# q = 1/k (k batches per epoch) and steps = LOCAL_EPOCHS * k, as Opacus' loader makes them.
NODE_PARAMS = {"node-0": (1.0, 1 / 50, 50), "node-1": (1.2, 1 / 20, 20)}
CONFIG = {
    "privacy-shape": "regional",
    "epsilon": repr(BUDGET),
    "delta": DELTA,
    "secagg": False,
    "clip-norm": CLIP_NORM,
    "batch-size": BATCH_SIZE,
    "local-epochs": LOCAL_EPOCHS,
    "num-server-rounds": ROUNDS + 1,  # one more than the ledgers show: room for a refusal
    "max-sessions-per-user": 2,
}


@functools.cache
def honest_epsilon(sigma: float, q: float, total_steps: int) -> float:
    """What a node's Opacus RDP accountant reports after ``total_steps`` identical steps."""
    return epsilon_from_history(history=[(sigma, q, total_steps)], delta=DELTA)


def dp_sgd_event(node: str, round_: int, mechanism: str, steps: int, eps: float) -> LedgerEvent:
    """A node's line with its planned parameters."""
    sigma, q, _ = NODE_PARAMS[node]
    return LedgerEvent(
        node=node, round=round_, mechanism=mechanism, unit_of_privacy="user",
        noise_multiplier=sigma, sample_rate=q, steps=steps, clip_norm=CLIP_NORM, delta=DELTA,
        accountant="rdp", epsilon_after=eps,
        detail="over budget" if mechanism == "refusal" else None,
    )  # fmt: skip


def signer_of(run: Path, node: str) -> LedgerSigner:
    """The node's ledger key (its state folder is RUN_DIR/nodes/<node>, as in simulation)."""
    return node_signer(run / "nodes" / node)


def write_plan(run: Path, node: str, **overrides: object) -> Path:
    """RUN_DIR/nodes/<node>/privacy_plan.json as client.node writes it."""
    sigma, _, _ = NODE_PARAMS[node]
    plan: dict[str, object] = {
        "noise_multiplier": sigma, "batch_size": BATCH_SIZE, "planned_rounds": ROUNDS + 1,
        "budget_epsilon": BUDGET, "delta": DELTA,
    }  # fmt: skip
    plan.update(overrides)
    path = run / "nodes" / node / "privacy_plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan))
    return path


def make_run(
    root: Path, *, rounds: int = ROUNDS, refusing: Iterable[str] = (), signed: bool = True
) -> Path:
    """A regional run of ``rounds`` rounds; nodes in ``refusing`` then refuse one more."""
    run = root / "run"
    (run / "ledger").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(CONFIG, indent=2))
    refusing = set(refusing)
    for node, (sigma, q, steps) in NODE_PARAMS.items():
        write_plan(run, node)
        ledger = Ledger(
            run / "ledger" / f"{node}.jsonl", signer=signer_of(run, node) if signed else None
        )
        eps = 0.0
        for round_ in range(1, rounds + 1):
            eps = honest_epsilon(sigma, q, steps * round_)
            ledger.append(dp_sgd_event(node, round_, "dp-sgd", steps, eps))
        if node in refusing:
            ledger.append(dp_sgd_event(node, rounds + 1, "refusal", 0, eps))
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
