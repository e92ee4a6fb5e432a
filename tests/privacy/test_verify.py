"""Tests for privacy.verify and `fedrank audit verify`: chains re-walked, ε recomputed."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from privacy_runs import DELTA, NODE_PARAMS, ROUNDS, cli, honest_epsilon
from privacy_runs import make_run as _make_run
from typer.testing import CliRunner

from privacy.accounting import epsilon_dp_accounting
from privacy.ledger import Ledger, LedgerEvent, read_ledger, verify_chain
from privacy.verify import TOLERANCE, verify_run


def _dp_sgd(node: str, round_: int, sigma: float, q: float, steps: int, eps: float) -> LedgerEvent:
    return LedgerEvent(
        node=node, round=round_, mechanism="dp-sgd", unit_of_privacy="user",
        noise_multiplier=sigma, sample_rate=q, steps=steps, clip_norm=1.0, delta=DELTA,
        accountant="rdp", epsilon_after=eps,
    )  # fmt: skip


def make_run(root: Path, *, rounds: int = ROUNDS, refuse_last: bool = False) -> Path:
    """A regional run whose ledgers hold honest (Opacus RDP) ε; every node may refuse last."""
    return _make_run(root, rounds=rounds, refusing=NODE_PARAMS if refuse_last else ())


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
        assert [r.round for r in rows] == list(range(1, ROUNDS + 1))
        for index in (1, ROUNDS):
            expected = epsilon_dp_accounting(
                history=[(sigma, q, steps)] * index, delta=DELTA, method="rdp"
            )
            assert rows[index - 1].recomputed_epsilon == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("tamper", sorted(TAMPERINGS))
def test_verify_run_catches_tampering(tmp_path: Path, tamper: str) -> None:
    # Prepare
    run = make_run(tmp_path)
    path = run / "ledger" / "node-1.jsonl"
    line = TAMPERINGS[tamper](path)

    # Execute
    report = verify_run(run, pld_reference=False)

    # Assert
    assert not report.ok
    assert (str(path), line) in {(p.file, p.line) for p in report.problems}
    assert all(p.file == str(path) for p in report.problems)  # node-0 is untouched
    if tamper == "understate-5pct-rechained":
        (problem,) = report.problems
        assert "over-claimed" in problem.problem
        assert [r.status for r in report.rows if r.file == str(path)] == [
            "ok",
            "over-claim",
            "ok",
        ]


@pytest.mark.parametrize("tamper", sorted(TAMPERINGS))
def test_cli_verify_fails_on_tampering_naming_file_and_line(tmp_path: Path, tamper: str) -> None:
    # Prepare
    run = make_run(tmp_path)
    path = run / "ledger" / "node-1.jsonl"
    line = TAMPERINGS[tamper](path)

    # Execute
    result = CliRunner().invoke(cli(), ["audit", "verify", str(run), "--no-pld"])

    # Assert
    assert result.exit_code == 1, result.output
    assert f"{path}:{line}: " in result.output
    assert result.output.strip().splitlines()[-1].startswith("FAIL")


def test_cli_verify_passes_untouched_run(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path, refuse_last=True)

    # Execute
    result = CliRunner().invoke(cli(), ["audit", "verify", str(run)])

    # Assert
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    assert "node-0: ε claimed" in result.output and "PLD reference" in result.output


def test_cli_verify_json_and_missing_run_dir(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path)

    # Execute
    ok = CliRunner().invoke(cli(), ["audit", "verify", str(run), "--json", "--no-pld"])
    missing = CliRunner().invoke(cli(), ["audit", "verify", str(tmp_path / "nope")])

    # Assert
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["ok"] is True
    assert missing.exit_code == 2


def _append(path: Path, **overrides: object) -> None:
    fields: dict[str, object] = {
        "node": "node-1", "round": ROUNDS + 1, "mechanism": "dp-sgd",
        "unit_of_privacy": "user", "noise_multiplier": 1.2, "sample_rate": 0.05, "steps": 6,
        "clip_norm": 1.0, "delta": DELTA, "accountant": "rdp", "epsilon_after": 99.0,
    }  # fmt: skip
    fields.update(overrides)
    Ledger(path).append(LedgerEvent(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"steps": 0}, "steps=0"),
        ({"epsilon_after": 0.01}, "epsilon decreased"),
        ({"delta": 1e-6}, "delta changed"),
    ],
    ids=["zero-steps", "epsilon-decreases", "delta-changes"],
)
def test_flags_inconsistent_events_with_valid_chain(
    tmp_path: Path, overrides: dict[str, object], expected: str
) -> None:
    # Prepare
    run = make_run(tmp_path)
    path = run / "ledger" / "node-1.jsonl"
    _append(path, **overrides)

    # Execute
    report = verify_run(run, pld_reference=False)

    # Assert
    assert verify_chain(path) == []
    assert not report.ok
    hits = [p for p in report.problems if expected in p.problem]
    assert hits and all((p.file, p.line) == (str(path), ROUNDS + 1) for p in hits)


def test_refusal_with_zero_steps_is_chain_only(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path)
    path = run / "ledger" / "node-1.jsonl"
    claimed = read_ledger(path)[-1]["epsilon_after"]
    _append(path, mechanism="refusal", steps=0, epsilon_after=claimed)

    # Execute
    report = verify_run(run, pld_reference=False)

    # Assert
    assert report.ok, [str(p) for p in report.problems]
    assert report.rows[-1].status == "chain-only"
    assert report.rows[-1].recomputed_epsilon is None


def test_claim_above_recomputation_is_fine(tmp_path: Path) -> None:
    # Prepare: a conservative claim (2x) appended with a valid chain
    run = make_run(tmp_path)
    path = run / "ledger" / "node-1.jsonl"
    _append(path, epsilon_after=2 * honest_epsilon(1.2, 0.05, 6 * (ROUNDS + 1)))

    # Execute
    report = verify_run(run, pld_reference=False)

    # Assert
    assert report.ok, [str(p) for p in report.problems]


def test_private_run_without_ledgers_fails(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path)
    for path in (run / "ledger").glob("*.jsonl"):
        path.unlink()

    # Execute
    report = verify_run(run)

    # Assert
    assert not report.ok
    assert "no ledger files" in report.problems[0].problem


# --------------------------------------------------------------------------------------------
# client-level DP (device shape): server.jsonl, accountant "rdp-wor"
# --------------------------------------------------------------------------------------------
@functools.cache
def _wor_epsilons(z: float, sampled: int, population: int, rounds: int) -> tuple[float, ...]:
    """ε after each round, as Flower's RdpAccountant (dp_accounting, WOR, replace-one) does.

    One release's RDP curve times the number of rounds is what ``RdpAccountant.compose``
    accumulates; the Flower test below checks the last value against Flower itself.
    """
    import dp_accounting
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    acc.compose(
        dp_accounting.SampledWithoutReplacementDpEvent(
            population, sampled, dp_accounting.GaussianDpEvent(z)
        )
    )
    return tuple(
        float(compute_epsilon(acc.orders, r * acc.rdp, DELTA)[0]) for r in range(1, rounds + 1)
    )


def make_device_run(root: Path, *, understate_round: int | None = None) -> Path:
    run = root / "device-run"
    (run / "ledger").mkdir(parents=True)
    config = {"privacy-shape": "device", "epsilon": "10.0", "delta": DELTA, "secagg": True}
    (run / "config.json").write_text(json.dumps(config))
    ledger = Ledger(run / "ledger" / "server.jsonl")
    for round_, eps in enumerate(_wor_epsilons(0.8, 10, 50, 4), start=1):
        claimed = eps * 0.95 if round_ == understate_round else eps
        ledger.append(
            LedgerEvent(
                node="server",
                round=round_,
                mechanism="client-level-gaussian",
                unit_of_privacy="client",
                noise_multiplier=0.8,
                sample_rate=10 / 50,
                steps=1,
                clip_norm=0.5,
                delta=DELTA,
                accountant="rdp-wor",
                epsilon_after=claimed,
                detail="sampled=10 population=50",
            )  # fmt: skip
        )
    ledger.append(
        LedgerEvent(
            node="eu-west",
            round=4,
            mechanism="refusal",
            unit_of_privacy="client",
            noise_multiplier=0.8,
            sample_rate=0.2,
            steps=0,
            clip_norm=0.5,
            delta=DELTA,
            accountant="rdp-wor",
            epsilon_after=1.5,
            detail="region cap 1.5",
        )  # fmt: skip
    )
    return run


def test_client_level_run_passes_and_catches_understatement(tmp_path: Path) -> None:
    # Prepare
    honest = make_device_run(tmp_path / "a")
    lying = make_device_run(tmp_path / "b", understate_round=3)

    # Execute
    good = verify_run(honest)
    bad = verify_run(lying)

    # Assert
    assert good.ok, [str(p) for p in good.problems]
    rows = [r for r in good.rows if r.mechanism != "refusal"]
    assert len(rows) == 4 and all(r.status == "ok" for r in rows)
    assert all(r.recomputed_epsilon == pytest.approx(r.claimed_epsilon, rel=1e-12) for r in rows)
    assert "without replacement" in (rows[0].method or "")
    assert [(p.line, "over-claimed" in p.problem) for p in bad.problems] == [(3, True)]


def test_client_level_recomputation_matches_flower_rdp_accountant() -> None:
    # Prepare: the accountant the server really uses (flwr is allowed in tests, not in privacy/)
    privacy_accounting = pytest.importorskip("flwr.supercore.privacy_accounting")
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    flower = RdpAccountant(
        privacy_accounting.PrivacyConfig(
            DELTA,
            50,
            privacy_accounting.NeighboringRelation.REPLACE_ONE,
            privacy_accounting.SamplingMethod.WITHOUT_REPLACEMENT,
        )
    )

    # Execute: one release per round for 4 rounds (composed at once: one RDP evaluation)
    flower.compose(
        privacy_accounting.GaussianPrivacyEvent(
            noise_multiplier=0.8, sample_size=10, population_size=50
        ),
        4,
    )
    flower_eps = flower.get_privacy_spent().epsilon

    # Assert
    assert flower_eps == pytest.approx(_wor_epsilons(0.8, 10, 50, 4)[-1], rel=1e-12)
