"""Tests for privacy.ledger: hash chain append, reopen, tamper detection."""

from __future__ import annotations

import json
import math
import os
import stat
import threading
from pathlib import Path

import pytest

from privacy.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerError,
    LedgerEvent,
    LedgerKeyError,
    LedgerSigner,
    canonical_json,
    key_fingerprint,
    load_public_key,
    node_signer,
    published_key_path,
    read_ledger,
    record_hash,
    server_signer,
    verify_chain,
    verify_signatures,
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


# --------------------------------------------------------------------------------------------
# signed lines
# --------------------------------------------------------------------------------------------
def test_node_signer_creates_a_private_key_and_reuses_it(tmp_path: Path) -> None:
    # Prepare
    state = tmp_path / "state"

    # Execute
    first = node_signer(state)
    second = node_signer(state)

    # Assert
    assert first.key_id == second.key_id == key_fingerprint(first.public_key)
    assert first.path is not None
    assert stat.S_IMODE(os.stat(first.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(first.path.parent).st_mode) == 0o700
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name]  # no temp left


def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    # Prepare
    ids: list[str] = []

    def load() -> None:
        ids.append(server_signer(tmp_path / "keys").key_id)

    threads = [threading.Thread(target=load) for _ in range(6)]

    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert
    assert len(ids) == 6 and len(set(ids)) == 1


@pytest.mark.parametrize("target", ["key", "folder"])
def test_loose_permissions_are_refused(tmp_path: Path, target: str) -> None:
    # Prepare
    signer = node_signer(tmp_path)
    assert signer.path is not None
    os.chmod(signer.path if target == "key" else signer.path.parent, 0o755)

    # Execute / Assert
    with pytest.raises(LedgerKeyError, match="must not be readable or writable by group"):
        node_signer(tmp_path)


def test_symlinked_or_foreign_key_is_refused(tmp_path: Path) -> None:
    # Prepare: the key replaced by a symlink to a key elsewhere
    signer = node_signer(tmp_path / "a")
    other = node_signer(tmp_path / "b")
    assert signer.path is not None and other.path is not None
    signer.path.unlink()
    signer.path.symlink_to(other.path)

    # Execute / Assert
    with pytest.raises(LedgerKeyError, match="cannot open the ledger key"):
        node_signer(tmp_path / "a")


def test_signed_ledger_lines_verify_and_publish_the_key(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger" / "eu-west.jsonl"
    signer = node_signer(tmp_path / "state")

    # Execute
    ledger = Ledger(path, signer=signer)
    records = [ledger.append(_event(i, eps=0.1 * (i + 1))) for i in range(3)]
    reopened = Ledger(path, signer=node_signer(tmp_path / "state"))
    records.append(reopened.append(_event(3, eps=0.5)))

    # Assert
    published = published_key_path(path)
    assert published == tmp_path / "ledger" / "keys" / "eu-west.pub"
    assert key_fingerprint(load_public_key(published)) == signer.key_id
    assert all(r["key_id"] == signer.key_id and r["signature"] for r in records)
    assert verify_chain(path) == []
    assert verify_signatures(path, signer.public_key) == []
    assert record_hash(records[0]) == records[0]["hash"]  # the signature is not hashed


def test_unsigned_lines_hash_as_before_and_are_reported(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "l.jsonl"
    records = _write(path, 2)

    # Execute
    strict = verify_signatures(path, None)
    lenient = verify_signatures(path, None, require_signed=False)

    # Assert
    assert "key_id" not in records[0] and "signature" not in records[0]
    assert records[0]["hash"] == record_hash(records[0])
    assert [(p.line, p.problem.startswith("unsigned line")) for p in strict] == [
        (1, True),
        (2, True),
    ]
    assert lenient == []


def test_another_key_cannot_sign_into_a_ledger(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger" / "eu-west.jsonl"
    Ledger(path, signer=LedgerSigner.generate()).append(_event(0))

    # Execute / Assert
    with pytest.raises(LedgerKeyError, match="holds another writer's key"):
        Ledger(path, signer=LedgerSigner.generate())


def test_edited_or_forged_signed_line_is_detected(tmp_path: Path) -> None:
    # Prepare: line 2 edited and re-hashed (chain re-linked by hand), line 3 forged by
    # another key
    path = tmp_path / "eu-west.jsonl"
    signer = LedgerSigner.generate()
    ledger = Ledger(path, signer=signer)
    for i in range(2):
        ledger.append(_event(i, eps=0.1 * (i + 1)))
    lines = _lines(path)
    record = json.loads(lines[1])
    record["noise_multiplier"] = 0.5
    record["hash"] = record_hash(record)
    lines[1] = canonical_json(record) + "\n"
    path.write_text("".join(lines))
    published_key_path(path).unlink()
    Ledger(path, signer=LedgerSigner.generate()).append(_event(2, eps=0.9))

    # Execute
    problems = verify_signatures(path, signer.public_key, key_source="trusted key")

    # Assert
    assert [p.line for p in problems] == [2, 3]
    assert "bad signature" in problems[0].problem
    assert "not by the writer's key" in problems[1].problem
    assert "(trusted key)" in problems[1].problem


def test_reserved_signature_fields(tmp_path: Path) -> None:
    # Execute / Assert
    for field in ("key_id", "signature"):
        with pytest.raises(ValueError, match="reserved"):
            Ledger(tmp_path / "l.jsonl").append({**_event(0).to_dict(), field: "x"})
