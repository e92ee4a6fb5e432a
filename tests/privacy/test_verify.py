"""Tests for privacy.verify and `fedrank audit verify`: chains re-walked, ε recomputed."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from privacy_runs import (
    CONFIG,
    DELTA,
    NODE_PARAMS,
    ROUNDS,
    cli,
    honest_epsilon,
    signer_of,
    write_plan,
)
from privacy_runs import make_run as _make_run
from typer.testing import CliRunner

from privacy.accounting import epsilon_dp_accounting
from privacy.ledger import (
    Ledger,
    LedgerEvent,
    LedgerSigner,
    published_key_path,
    read_ledger,
    server_signer,
    verify_chain,
)
from privacy.verify import TOLERANCE, verify_run


def _dp_sgd(
    node: str, round_: int, sigma: float, q: float, steps: int, eps: float, clip: float = 1.0
) -> LedgerEvent:
    return LedgerEvent(
        node=node, round=round_, mechanism="dp-sgd", unit_of_privacy="user",
        noise_multiplier=sigma, sample_rate=q, steps=steps, clip_norm=clip, delta=DELTA,
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
    """The node itself (with its key) re-writes its ledger, line 2's ε understated by 5 %."""
    records = read_ledger(path)
    path.unlink()
    ledger = Ledger(path, signer=signer_of(path.parent.parent, path.stem))
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
        "unit_of_privacy": "user", "noise_multiplier": 1.2, "sample_rate": 1 / 20, "steps": 20,
        "clip_norm": 1.0, "delta": DELTA, "accountant": "rdp", "epsilon_after": 99.0,
    }  # fmt: skip
    fields.update(overrides)
    signer = signer_of(path.parent.parent, path.stem)
    Ledger(path, signer=signer).append(LedgerEvent(**fields))  # type: ignore[arg-type]


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
    _append(path, epsilon_after=2 * honest_epsilon(1.2, 1 / 20, 20 * (ROUNDS + 1)))

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
DEVICE_Z = 2.0


def make_device_run(
    root: Path,
    *,
    understate_round: int | None = None,
    legacy: bool = False,
    relation: tuple[str, str] = ("without-replacement", "replace-one"),
) -> Path:
    """A device-shape run: the server's signed ledger (z = 2, 10 of 50 devices, 4 rounds).

    Honest claims are replace-one with sensitivity 2C (Gaussian z/2). ``legacy``: the lines
    state no relation and claim what main accounted before (Gaussian z, under-reported).
    """
    run = root / "device-run"
    (run / "ledger").mkdir(parents=True)
    config = {"privacy-shape": "device", "epsilon": "10.0", "delta": DELTA, "secagg": True}
    (run / "config.json").write_text(json.dumps(config))
    ledger = Ledger(run / "ledger" / "server.jsonl", signer=server_signer(run / "server-key"))
    effective = DEVICE_Z if legacy else DEVICE_Z / 2
    sampling, neighbouring = (None, None) if legacy else relation
    for round_, eps in enumerate(_wor_epsilons(effective, 10, 50, 4), start=1):
        claimed = eps * 0.95 if round_ == understate_round else eps
        ledger.append(
            LedgerEvent(
                node="server", round=round_, mechanism="client-level-gaussian",
                unit_of_privacy="client", noise_multiplier=DEVICE_Z, sample_rate=10 / 50,
                steps=1, clip_norm=0.5, delta=DELTA, accountant="rdp-wor",
                epsilon_after=claimed, detail="sampled=10 population=50",
                sampling=sampling, neighbouring=neighbouring,
            )
        )  # fmt: skip
    ledger.append(
        LedgerEvent(
            node="eu-west", round=4, mechanism="refusal", unit_of_privacy="client",
            noise_multiplier=DEVICE_Z, sample_rate=0.2, steps=0, clip_norm=0.5, delta=DELTA,
            accountant="rdp-wor", epsilon_after=1.5, detail="region cap 1.5",
        )
    )  # fmt: skip
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
    assert "z/2" in (rows[0].method or "")
    assert [(p.line, "over-claimed" in p.problem) for p in bad.problems] == [(3, True)]


def test_client_level_line_without_relation_fails_and_is_recomputed_with_2c(
    tmp_path: Path,
) -> None:
    # Prepare: what main's device shape wrote: GaussianDpEvent(z) under replace-one, no relation
    run = make_device_run(tmp_path, legacy=True)

    # Execute
    report = verify_run(run, pld_reference=False)

    # Assert: every line fails twice (relation not stated; ε about 2.9x under-reported)
    assert not report.ok
    for line in range(1, 5):
        texts = [p.problem for p in report.problems if p.line == line]
        assert any("does not state sampling and neighbouring" in t for t in texts), texts
        assert any("over-claimed" in t for t in texts), texts
    final = [r for r in report.rows if r.mechanism != "refusal"][-1]
    assert final.recomputed_epsilon == pytest.approx(_wor_epsilons(DEVICE_Z / 2, 10, 50, 4)[-1])
    assert final.recomputed_epsilon > 2.5 * final.claimed_epsilon


def _combined_device_run(root: Path, *, claimed_z: float) -> Path:
    """Device lines as server/device.py writes them: the combined multiplier with its parts."""
    run = root / "combined"
    (run / "ledger").mkdir(parents=True)
    config = {"privacy-shape": "device", "epsilon": "10.0", "delta": DELTA, "secagg": True}
    (run / "config.json").write_text(json.dumps(config))
    ledger = Ledger(run / "ledger" / "server.jsonl", signer=server_signer(run / "server-key"))
    z_u, sigma_b = 4.0, 8.0
    combined = (4.0 / z_u**2 + 1.0 / sigma_b**2) ** -0.5
    for round_, eps in enumerate(_wor_epsilons(combined, 10, 50, 3), start=1):
        ledger.append(
            LedgerEvent(
                node="server", round=round_, mechanism="client-level-gaussian",
                unit_of_privacy="client", noise_multiplier=claimed_z, sample_rate=10 / 50,
                steps=1, clip_norm=0.5, delta=DELTA, accountant="rdp-wor", epsilon_after=eps,
                detail=f"sampled=10 population=50 update_noise_multiplier={z_u!r} "
                f"clipped_count_stddev={sigma_b!r}",
                sampling="without-replacement", neighbouring="replace-one",
            )
        )  # fmt: skip
    return run


def test_client_level_combined_multiplier_is_recomputed_from_its_parts(tmp_path: Path) -> None:
    # Prepare: honest lines state z = (4/z_u^2 + 1/sigma_b^2)^-1/2; a forged one claims more
    combined = (4.0 / 4.0**2 + 1.0 / 8.0**2) ** -0.5
    honest = _combined_device_run(tmp_path / "a", claimed_z=combined)
    forged = _combined_device_run(tmp_path / "b", claimed_z=2 * combined)

    # Execute
    good = verify_run(honest, pld_reference=False)
    bad = verify_run(forged, pld_reference=False)

    # Assert: the parts, not the stated z, decide the recomputed ε
    assert good.ok, [str(p) for p in good.problems]
    rows = [r for r in good.rows if r.mechanism != "refusal"]
    assert all(r.recomputed_epsilon == pytest.approx(r.claimed_epsilon) for r in rows)
    assert not bad.ok
    assert any("not the combined multiplier" in p.problem for p in bad.problems)


def test_client_level_poisson_add_remove_is_recomputed_with_c(tmp_path: Path) -> None:
    # Prepare: Poisson-sampled devices, add/remove-one: sensitivity C, Gaussian z, rate q
    run = tmp_path / "poisson"
    (run / "ledger").mkdir(parents=True)
    config = {"privacy-shape": "device", "epsilon": "10.0", "delta": DELTA, "secagg": True}
    (run / "config.json").write_text(json.dumps(config))
    ledger = Ledger(run / "ledger" / "server.jsonl", signer=server_signer(run / "server-key"))
    for round_ in (1, 2):
        eps = epsilon_dp_accounting(history=[(DEVICE_Z, 0.2, round_)], delta=DELTA, method="rdp")
        ledger.append(
            LedgerEvent(
                node="server", round=round_, mechanism="client-level-gaussian",
                unit_of_privacy="client", noise_multiplier=DEVICE_Z, sample_rate=0.2, steps=1,
                clip_norm=0.5, delta=DELTA, accountant="rdp", epsilon_after=eps,
                sampling="poisson", neighbouring="add-remove",
            )
        )  # fmt: skip

    # Execute
    report = verify_run(run, pld_reference=False)

    # Assert
    assert report.ok, [str(p) for p in report.problems]
    assert all("Poisson" in (r.method or "") for r in report.rows)


def test_client_level_over_budget_and_unanalysed_relation_fail(tmp_path: Path) -> None:
    # Prepare: budget 1 (the honest run spends 5.2); then a relation with no RDP analysis
    run = make_device_run(tmp_path / "a")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "epsilon": "1.0"}))
    odd = make_device_run(tmp_path / "b", relation=("without-replacement", "add-remove"))

    # Execute
    over = verify_run(run, pld_reference=False)
    unanalysed = verify_run(odd, pld_reference=False)

    # Assert
    assert any("over its budget 1" in p.problem for p in over.problems)
    assert any("has no RDP analysis" in p.problem for p in unanalysed.problems)


@functools.cache
def _wor_epsilons(z: float, sampled: int, population: int, rounds: int) -> tuple[float, ...]:
    """ε after each round of ``SampledWithoutReplacementDpEvent(GaussianDpEvent(z))`` under
    replace-one, as Flower's RdpAccountant (dp_accounting) composes it; ``z`` is the
    multiplier per unit of sensitivity (the device shape's z/2).

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


# --------------------------------------------------------------------------------------------
# signatures (issue 15, item 7: "the hash chain has no key")
# --------------------------------------------------------------------------------------------
def _pin_keys(run: Path, root: Path) -> Path:
    """The auditor's copy of the writers' public keys, taken before anything was tampered."""
    pinned = root / "pinned-keys"
    pinned.mkdir()
    for path in (run / "ledger").glob("*.jsonl"):
        (pinned / f"{path.stem}.pub").write_bytes(published_key_path(path).read_bytes())
    return pinned


def _rewrite_with_sigma(path: Path, sigma: float, signer: LedgerSigner | None) -> None:
    """An attacker rewrites a node's ledger with another σ, ε recomputed consistently (Opacus)
    and the hash chain rebuilt; signed with ``signer`` (their own key) or unsigned."""
    records = read_ledger(path)
    path.unlink()
    if signer is not None:  # replace the published key with theirs, too
        published_key_path(path).unlink()
    ledger = Ledger(path, signer=signer)
    total = 0
    for record in records:
        event = LedgerEvent.from_dict(record)
        total += event.steps
        ledger.append(
            _dp_sgd(
                event.node, event.round, sigma, event.sample_rate, event.steps,
                honest_epsilon(sigma, event.sample_rate, total),
            )
        )  # fmt: skip
    assert verify_chain(path) == []


def test_tampered_sigma_with_rebuilt_chain_fails_by_signature_and_by_plan(
    tmp_path: Path,
) -> None:
    # Prepare: node-1's σ lowered from 1.2 to 0.9, ε recomputed, chain rebuilt, own key
    run = make_run(tmp_path)
    pinned = _pin_keys(run, tmp_path)
    path = run / "ledger" / "node-1.jsonl"
    _rewrite_with_sigma(path, 0.9, LedgerSigner.generate())

    # Execute
    unpinned = verify_run(run, pld_reference=False)
    report = verify_run(run, pld_reference=False, trusted_keys=pinned)

    # Assert: the ε arithmetic is consistent, so only the plan and the key can see it
    assert all(r.status == "ok" for r in report.rows)
    for result in (unpinned, report):
        assert not result.ok
        for line in range(1, ROUNDS + 1):
            texts = [p.problem for p in result.problems if (p.file, p.line) == (str(path), line)]
            assert any("σ=0.9 differs from node 'node-1''s plan σ=1.2" in t for t in texts)
    for line in range(1, ROUNDS + 1):
        texts = [p.problem for p in report.problems if (p.file, p.line) == (str(path), line)]
        assert any("not by the writer's key" in t for t in texts), texts
    assert any("is not the trusted key" in p.problem for p in report.problems)
    assert not any(p.file == str(run / "ledger" / "node-0.jsonl") for p in report.problems)


def test_tampered_sigma_and_plan_fail_by_signature_with_pinned_keys(tmp_path: Path) -> None:
    # Prepare: the attacker also rewrites the plan; only the pinned key can tell
    run = make_run(tmp_path)
    pinned = _pin_keys(run, tmp_path)
    path = run / "ledger" / "node-1.jsonl"
    _rewrite_with_sigma(path, 1.1, LedgerSigner.generate())
    write_plan(run, "node-1", noise_multiplier=1.1)

    # Execute
    report = verify_run(run, pld_reference=False, trusted_keys=pinned)

    # Assert
    assert not report.ok
    lines = {p.line for p in report.problems if "not by the writer's key" in p.problem}
    assert lines == set(range(1, ROUNDS + 1))


def test_unsigned_ledger_fails_unless_allowed(tmp_path: Path) -> None:
    # Prepare: a run written with Ledger(path) (no signer), as main does today
    run = _make_run(tmp_path, signed=False)

    # Execute
    strict = verify_run(run, pld_reference=False)
    lenient = verify_run(run, pld_reference=False, require_signatures=False)
    cli_strict = CliRunner().invoke(cli(), ["audit", "verify", str(run), "--no-pld"])
    cli_lenient = CliRunner().invoke(
        cli(), ["audit", "verify", str(run), "--no-pld", "--allow-unsigned"]
    )

    # Assert
    assert not strict.ok
    assert {p.problem.split(":")[0] for p in strict.problems} == {"unsigned line"}
    assert len(strict.problems) == 2 * ROUNDS
    assert lenient.ok, [str(p) for p in lenient.problems]
    assert cli_strict.exit_code == 1 and "unsigned line" in cli_strict.output
    assert cli_lenient.exit_code == 0, cli_lenient.output


def test_line_signed_by_another_key_fails(tmp_path: Path) -> None:
    # Prepare: an appended line, correctly chained, signed by someone else's key
    run = make_run(tmp_path)
    path = run / "ledger" / "node-0.jsonl"
    published = published_key_path(path)
    original = published.read_bytes()
    published.unlink()
    sigma, q, steps = NODE_PARAMS["node-0"]
    Ledger(path, signer=LedgerSigner.generate()).append(
        _dp_sgd("node-0", ROUNDS + 1, sigma, q, steps, 5.9)
    )
    published.write_bytes(original)

    # Execute
    report = verify_run(run, pld_reference=False)

    # Assert
    assert verify_chain(path) == []
    assert [(p.line, "not by the writer's key" in p.problem) for p in report.problems] == [
        (ROUNDS + 1, True)
    ]


def test_edited_signed_line_with_rehash_fails_the_signature(tmp_path: Path) -> None:
    # Prepare: the last line's ε edited and its hash recomputed (the end of the chain)
    from privacy.ledger import canonical_json, record_hash

    run = make_run(tmp_path)
    path = run / "ledger" / "node-0.jsonl"
    lines = _lines(path)
    record = json.loads(lines[-1])
    record["epsilon_after"] *= 1.5
    record["hash"] = record_hash(record)
    lines[-1] = canonical_json(record) + "\n"
    path.write_text("".join(lines))

    # Execute
    report = verify_run(run, pld_reference=False)

    # Assert
    assert verify_chain(path) == []
    texts = [str(p) for p in report.problems]
    assert any(f":{ROUNDS}: bad signature" in t for t in texts), texts


def test_cli_trusted_keys_pass_and_fail(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path)
    pinned = _pin_keys(run, tmp_path)
    wrong = tmp_path / "wrong-keys"
    wrong.mkdir()
    for name in ("node-0", "node-1"):
        (wrong / f"{name}.pub").write_bytes(LedgerSigner.generate().public_pem())

    # Execute
    ok = CliRunner().invoke(
        cli(), ["audit", "verify", str(run), "--no-pld", "--trusted-keys", str(pinned)]
    )
    unpinned = CliRunner().invoke(cli(), ["audit", "verify", str(run), "--no-pld"])
    bad = CliRunner().invoke(
        cli(), ["audit", "verify", str(run), "--no-pld", "--trusted-keys", str(wrong)]
    )
    missing = CliRunner().invoke(
        cli(), ["audit", "verify", str(run), "--trusted-keys", str(tmp_path / "nope")]
    )

    # Assert
    assert ok.exit_code == 0, ok.output
    assert "note:" not in ok.output
    assert unpinned.exit_code == 0 and "not against pinned keys" in unpinned.output
    assert bad.exit_code == 1 and "not by the writer's key" in bad.output
    assert missing.exit_code == 2


# --------------------------------------------------------------------------------------------
# cross-checks against config.json, the node's plan and budget (issue 15, item 7)
# --------------------------------------------------------------------------------------------
def test_reviewers_finding_sigma_clip_and_budget_fails(tmp_path: Path) -> None:
    # Prepare: the review's ledger: σ=1.0 (plan 2.356), clip 50 (config 1.0), ε ≈ 4.16 against
    # a budget of 1, consistently accounted, chained and signed by the node's own key.
    run = tmp_path / "run"
    (run / "ledger").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({**CONFIG, "epsilon": "1.0"}))
    write_plan(run, "node-0", noise_multiplier=2.356, budget_epsilon=1.0)
    path = run / "ledger" / "node-0.jsonl"
    ledger = Ledger(path, signer=signer_of(run, "node-0"))
    q, steps = 1 / 50, 50
    for round_ in range(1, ROUNDS + 1):
        eps = honest_epsilon(1.0, q, steps * round_)
        ledger.append(_dp_sgd("node-0", round_, 1.0, q, steps, eps, clip=50.0))
    final = honest_epsilon(1.0, q, steps * ROUNDS)

    # Execute
    report = verify_run(run, pld_reference=False)
    result = CliRunner().invoke(cli(), ["audit", "verify", str(run), "--no-pld"])

    # Assert
    assert final > 1.0 and all(r.status == "ok" for r in report.rows)
    last = [str(p) for p in report.problems if (p.file, p.line) == (str(path), ROUNDS)]
    assert any("σ=1 differs from node 'node-0''s plan σ=2.356" in t for t in last), last
    assert any("clip_norm 50 differs from config.json clip-norm 1" in t for t in last), last
    assert any(f"epsilon {final:.6g}" in t and "over its budget 1" in t for t in last), last
    assert result.exit_code == 1
    assert f"{path}:{ROUNDS}: noise_multiplier σ=1 differs" in result.output


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"steps": 10}, "steps=10 but q=0.05 (k=20 batches per epoch)"),
        ({"sample_rate": 0.03, "steps": 33}, "is not 1/k for a whole number k"),
        ({"round": 2}, "round went back for node 'node-1': round 2 here, round 3 at line 3"),
        ({"round": ROUNDS + 2}, "outside the run's rounds 1..4"),
        ({"clip_norm": 2.0}, "clip_norm 2 differs from config.json clip-norm 1"),
        ({"unit_of_privacy": "client"}, "unit_of_privacy='client' (expected 'user')"),
        ({"node": "node-0"}, "dp-sgd line for node 'node-0' in the ledger of 'node-1'"),
        ({"epsilon_after": 7.0}, "epsilon 7 for node 'node-1' round 4 is over its budget 6"),
        (
            {"mechanism": "refusal", "steps": 3},
            "refusal with steps=3: a refused round takes no steps",
        ),
        ({"mechanism": "refusal", "steps": 0, "epsilon_after": 2.9}, "refusal states ε 2.9"),
    ],
    ids=[
        "steps-vs-q", "q-not-1-over-k", "round-back", "round-past-run", "clip", "unit",
        "foreign-node", "over-budget", "refusal-steps", "refusal-epsilon",
    ],
)  # fmt: skip
def test_cross_check_mismatches_name_file_line_and_values(
    tmp_path: Path, overrides: dict[str, object], expected: str
) -> None:
    # Prepare: one signed, chained line appended to node-1's ledger
    run = make_run(tmp_path)
    path = run / "ledger" / "node-1.jsonl"
    honest = honest_epsilon(1.2, 1 / 20, 20 * (ROUNDS + 1))
    _append(path, **{"epsilon_after": max(honest, 2.9), **overrides})

    # Execute
    report = verify_run(run, pld_reference=False)

    # Assert
    hits = [p for p in report.problems if expected in p.problem]
    assert hits, [str(p) for p in report.problems]
    assert all((p.file, p.line) == (str(path), ROUNDS + 1) for p in hits)


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        ({"batch_size": 32}, "plan batch_size 32 != config.json batch-size 64"),
        ({"planned_rounds": 9}, "plan planned_rounds 9 != config.json num-server-rounds 4"),
        ({"budget_epsilon": 8.0}, "plan budget_epsilon 8 > config.json epsilon 6"),
        ({"delta": 1e-4}, "plan delta 0.0001 != config.json delta 1e-05"),
    ],
    ids=["batch", "rounds", "budget", "delta"],
)
def test_plan_mismatches_config(tmp_path: Path, plan: dict[str, object], expected: str) -> None:
    # Prepare
    run = make_run(tmp_path)
    plan_path = write_plan(run, "node-0", **plan)

    # Execute
    report = verify_run(run, pld_reference=False)

    # Assert
    assert any((p.file, p.line) == (str(plan_path), 0) and expected in p.problem
               for p in report.problems), [str(p) for p in report.problems]  # fmt: skip


def test_plan_sigma_that_cannot_meet_the_budget_and_a_missing_plan_fail(tmp_path: Path) -> None:
    # Prepare: node-0's config budget lowered to 1 (its plan's σ=1.0 gives ε ≈ 2.2 over 4
    # rounds); node-1's plan deleted
    run = make_run(tmp_path)
    (run / "config.json").write_text(json.dumps({**CONFIG, "epsilon": "3.0"}))
    write_plan(run, "node-0", budget_epsilon=1.0)
    (run / "nodes" / "node-1" / "privacy_plan.json").unlink()

    # Execute
    report = verify_run(run, pld_reference=False)

    # Assert
    texts = [str(p) for p in report.problems]
    assert any("plan σ=1 does not meet the budget 1: 4 rounds of 50 steps" in t for t in texts)
    assert any("over its budget 1" in t for t in texts)  # the ledger's ε too
    assert any("no privacy plan for node 'node-1'" in t for t in texts)


def test_shape_mismatch_fails(tmp_path: Path) -> None:
    # Prepare: the regional ledgers under a config that says device
    run = make_run(tmp_path)
    (run / "config.json").write_text(json.dumps({**CONFIG, "privacy-shape": "device"}))

    # Execute
    report = verify_run(run, pld_reference=False)

    # Assert
    assert any("privacy-shape='device'" in p.problem for p in report.problems)


def test_cli_plans_folder_elsewhere(tmp_path: Path) -> None:
    # Prepare: a deployment-like layout: the nodes' state folders copied beside the run
    run = make_run(tmp_path)
    (run / "nodes").rename(tmp_path / "node-states")

    # Execute
    without = CliRunner().invoke(cli(), ["audit", "verify", str(run), "--no-pld"])
    with_plans = CliRunner().invoke(
        cli(), ["audit", "verify", str(run), "--no-pld", "--plans", str(tmp_path / "node-states")]
    )

    # Assert
    assert without.exit_code == 1 and "no privacy plan for node 'node-0'" in without.output
    assert with_plans.exit_code == 0, with_plans.output
