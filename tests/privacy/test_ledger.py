"""Tests for privacy.ledger: hash chain append, reopen, tamper detection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from privacy.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerError,
    LedgerEvent,
    canonical_json,
    read_ledger,
    record_hash,
    verify_chain,
)


def _event(round_: int, eps: float = 0.5, **overrides: object) -> LedgerEvent:
    fields: dict[str, object] = {
        "node": "eu-west",
        "round": round_,
        "mechanism": "dp-sgd",
        "unit_of_privacy": "user",
        "noise_multiplier": 1.1,
        "sample_rate": 0.01,
        "steps": 100,
        "clip_norm": 1.0,
        "delta": 1e-5,
        "accountant": "rdp",
        "epsilon_after": eps,
    }
    fields.update(overrides)
    return LedgerEvent(**fields)  # type: ignore[arg-type]


def _write(path: Path, n: int = 4) -> list[dict[str, object]]:
    ledger = Ledger(path)
    return [ledger.append(_event(i, eps=0.1 * (i + 1))) for i in range(n)]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_append_and_verify_ok(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"

    # Execute
    records = _write(path)

    # Assert
    assert verify_chain(path) == []
    assert [r["seq"] for r in records] == [0, 1, 2, 3]
    assert records[0]["prev_hash"] == GENESIS_HASH
    assert records[1]["prev_hash"] != records[0]["hash"]  # links the whole previous line
    lines = _lines(path)
    assert all(line == canonical_json(json.loads(line)) + "\n" for line in lines)
    assert all(record_hash(json.loads(line)) == json.loads(line)["hash"] for line in lines)
    assert str(records[0]["timestamp"]).endswith("+00:00")
    assert verify_chain(path, expected_head_hash=str(records[-1]["hash"])) == []


def test_edited_epsilon_detected_with_line_number(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    _write(path)
    lines = _lines(path)
    record = json.loads(lines[1])
    record["epsilon_after"] = 0.01  # under-report
    lines[1] = canonical_json(record) + "\n"
    path.write_text("".join(lines))

    # Execute
    problems = verify_chain(path)

    # Assert
    assert problems
    assert problems[0].line == 2
    assert "hash mismatch" in problems[0].problem
    assert problems[0].file == str(path)


def test_edit_with_recomputed_hash_detected_by_next_line(tmp_path: Path) -> None:
    # Prepare: a careful forger also recomputes the edited line's own hash
    path = tmp_path / "ledger.jsonl"
    _write(path)
    lines = _lines(path)
    record = json.loads(lines[1])
    record["epsilon_after"] = 0.01
    record["hash"] = record_hash(record)
    lines[1] = canonical_json(record) + "\n"
    path.write_text("".join(lines))

    # Execute
    problems = verify_chain(path)

    # Assert
    assert [(p.line, "prev_hash" in p.problem) for p in problems] == [(3, True)]


def test_deleted_line_detected(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    _write(path)
    lines = _lines(path)
    del lines[1]
    path.write_text("".join(lines))

    # Execute
    problems = verify_chain(path)

    # Assert
    assert {p.line for p in problems} == {2}
    assert any("seq gap" in p.problem for p in problems)
    assert any("prev_hash" in p.problem for p in problems)


def test_deleted_first_line_detected(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    _write(path)
    path.write_text("".join(_lines(path)[1:]))

    # Execute
    problems = verify_chain(path)

    # Assert
    assert problems and problems[0].line == 1


def test_truncated_tail_detected_with_expected_head(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    records = _write(path)
    path.write_text("".join(_lines(path)[:-1]))

    # Execute
    problems = verify_chain(path, expected_head_hash=str(records[-1]["hash"]))

    # Assert
    assert len(problems) == 1 and "head hash" in problems[0].problem


def test_swapped_lines_detected(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    _write(path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("".join(lines))

    # Execute
    problems = verify_chain(path)

    # Assert
    assert {p.line for p in problems} >= {2, 3}
    assert not any(p.problem.startswith("hash mismatch") for p in problems)  # contents intact


def test_unparseable_line_detected(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    _write(path)
    lines = _lines(path)
    lines[2] = lines[2][:30] + "\n"
    path.write_text("".join(lines))

    # Execute
    problems = verify_chain(path)

    # Assert
    assert problems[0].line == 3
    assert "unparseable JSON" in problems[0].problem


def test_reopen_continues_chain(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    first = _write(path, n=2)

    # Execute
    reopened = Ledger(path)
    third = reopened.append(_event(2))

    # Assert
    assert reopened.next_seq == 3
    assert third["seq"] == 2
    assert third["prev_hash"] != GENESIS_HASH
    assert verify_chain(path) == []
    assert len(_lines(path)) == 3
    assert _lines(path)[0] == canonical_json(first[0]) + "\n"  # earlier lines untouched


def test_two_writers_share_one_chain(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    a, b = Ledger(path), Ledger(path)

    # Execute
    a.append(_event(0))
    b.append(_event(0, node="us-east"))
    a.append(_event(1))

    # Assert
    assert verify_chain(path) == []
    assert [r["seq"] for r in read_ledger(path)] == [0, 1, 2]


def test_reopen_refuses_corrupt_tail(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    _write(path, n=2)
    with open(path, "a") as handle:
        handle.write('{"seq": 2, "trunc')

    # Execute / Assert
    with pytest.raises(LedgerError, match=str(path)):
        Ledger(path)


def test_infinite_epsilon_serialised_as_string(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)

    # Execute
    ledger.append(_event(0, eps=math.inf, noise_multiplier=0.0, detail="non-private baseline"))
    raw = json.loads(_lines(path)[0])
    decoded = read_ledger(path)[0]

    # Assert
    assert raw["epsilon_after"] == "inf"
    assert "Infinity" not in _lines(path)[0]
    assert math.isinf(decoded["epsilon_after"])
    assert LedgerEvent.from_dict(raw) == _event(
        0, eps=math.inf, noise_multiplier=0.0, detail="non-private baseline"
    )
    assert verify_chain(path) == []


def test_event_validation_and_reserved_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mechanism"):
        _event(0, mechanism="laplace")
    with pytest.raises(ValueError, match="unit_of_privacy"):
        _event(0, unit_of_privacy="device")
    with pytest.raises(ValueError, match="round=-1"):
        _event(-1)
    with pytest.raises(ValueError, match="reserved"):
        Ledger(tmp_path / "l.jsonl").append({"seq": 5, "node": "x"})


def test_event_to_dict_round_trip_and_refusal() -> None:
    # Prepare
    event = _event(3, mechanism="refusal", steps=0, detail="would exceed budget", epsilon_after=0.9)

    # Execute
    data = event.to_dict()

    # Assert
    assert data["mechanism"] == "refusal"
    assert data["detail"] == "would exceed budget"
    assert LedgerEvent.from_dict(data) == event
    assert "detail" not in _event(0).to_dict()


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    # Prepare
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")

    # Execute / Assert
    assert verify_chain(empty) == []
    missing = verify_chain(tmp_path / "nope.jsonl")
    assert len(missing) == 1 and missing[0].line == 0
