"""Tests for privacy.verify and `fedrank audit verify`: chains re-walked, ε recomputed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from privacy.accounting import epsilon_dp_accounting, epsilon_from_history
from privacy.commands import register
from privacy.ledger import Ledger, LedgerEvent, read_ledger, verify_chain
from privacy.verify import TOLERANCE, verify_run

DELTA = 1e-5
# Cheap but realistic DP-SGD parameters per node: (sigma, q, steps per round).
NODE_PARAMS = {"node-0": (1.1, 0.1, 8), "node-1": (0.9, 0.08, 10)}
ROUNDS = 3


def _dp_sgd(node: str, round_: int, sigma: float, q: float, steps: int, eps: float) -> LedgerEvent:
    return LedgerEvent(
        node=node, round=round_, mechanism="dp-sgd", unit_of_privacy="user",
        noise_multiplier=sigma, sample_rate=q, steps=steps, clip_norm=1.0, delta=DELTA,
        accountant="rdp", epsilon_after=eps,
    )  # fmt: skip


def make_run(root: Path, *, rounds: int = ROUNDS, refuse_last: bool = False) -> Path:
    """A regional run whose ledgers hold honest (Opacus RDP) ε, written with the real Ledger."""
    run = root / "run"
    (run / "ledger").mkdir(parents=True)
    config = {"privacy-shape": "regional", "epsilon": "3.0", "delta": DELTA, "secagg": False}
    (run / "config.json").write_text(json.dumps(config))
    for node, (sigma, q, steps) in NODE_PARAMS.items():
        ledger = Ledger(run / "ledger" / f"{node}.jsonl")
        history: list[tuple[float, float, int]] = []
        eps = 0.0
        for round_ in range(1, rounds + 1):
            history.append((sigma, q, steps))
            eps = epsilon_from_history(history=history, delta=DELTA)
            ledger.append(_dp_sgd(node, round_, sigma, q, steps, eps))
        if refuse_last:
            ledger.append(
                LedgerEvent(
                    node=node, round=rounds + 1, mechanism="refusal", unit_of_privacy="user",
                    noise_multiplier=sigma, sample_rate=q, steps=0, clip_norm=1.0, delta=DELTA,
                    accountant="rdp", epsilon_after=eps, detail="over budget",
                )  # fmt: skip
            )
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
    app = typer.Typer()
    bench = typer.Typer()
    app.add_typer(bench, name="bench")
    register(app, bench)
    return app


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


# --------------------------------------------------------------------------------------------
# tamperings: each returns the (file, line) the problem must name
# --------------------------------------------------------------------------------------------
def _edit_epsilon(path: Path) -> int:
    lines = _lines(path)
    record = json.loads(lines[1])
    record["epsilon_after"] = record["epsilon_after"] * 1.1  # even a *higher* claim is caught
    lines[1] = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    path.write_text("".join(lines))
    return 2


def _delete_line(path: Path) -> int:
    lines = _lines(path)
    del lines[1]
    path.write_text("".join(lines))
    return 2


def _swap_lines(path: Path) -> int:
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("".join(lines))
    return 2


def _understate_rechained(path: Path) -> int:
    """Re-write the whole ledger with a valid chain, line 2's ε understated by 5 %."""
    records = read_ledger(path)
    path.unlink()
    ledger = Ledger(path)
    for index, record in enumerate(records):
        event = LedgerEvent.from_dict(record)
        if index == 1:
            event = _dp_sgd(
                event.node, event.round, event.noise_multiplier, event.sample_rate,
                event.steps, event.epsilon_after * 0.95,
            )  # fmt: skip
        ledger.append(event)
    assert verify_chain(path) == []  # the chain alone cannot see it
    return 2


TAMPERINGS = {
    "edit-epsilon": _edit_epsilon,
    "delete-line": _delete_line,
    "swap-lines": _swap_lines,
    "understate-5pct-rechained": _understate_rechained,
}


# --------------------------------------------------------------------------------------------
# verify_run
# --------------------------------------------------------------------------------------------
def test_untouched_run_passes(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path, refuse_last=True)

    # Execute
    report = verify_run(run)

    # Assert
    assert report.ok, [str(p) for p in report.problems]
    assert len(report.files) == 2
    assert len(report.rows) == 2 * (ROUNDS + 1)
    checked = [r for r in report.rows if r.recomputed_epsilon is not None]
    assert len(checked) == 2 * ROUNDS
    for row in checked:
        assert row.status == "ok"
        assert row.recomputed_epsilon == pytest.approx(row.claimed_epsilon, rel=TOLERANCE)
    assert {r.status for r in report.rows if r.mechanism == "refusal"} == {"chain-only"}
    for node, reference in report.reference_epsilon.items():
        final = [r for r in checked if r.node == node][-1]
        assert 0 < reference < final.claimed_epsilon  # PLD is tighter than RDP
    assert report.summary().startswith("PASS")


def test_recomputation_equals_epsilon_dp_accounting(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path)

    # Execute
    report = verify_run(run, pld_reference=False)

    # Assert: the incremental recomputation is dp_accounting's RDP of the node's history so far
    for node, (sigma, q, steps) in NODE_PARAMS.items():
        rows = [r for r in report.rows if r.node == node]
        for index, row in enumerate(rows, start=1):
            expected = epsilon_dp_accounting(
                history=[(sigma, q, steps)] * index, delta=DELTA, method="rdp"
            )
            assert row.recomputed_epsilon == pytest.approx(expected, rel=1e-9)
