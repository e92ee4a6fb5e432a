"""Tests for privacy.audit and `fedrank audit RUN_DIR`: offline HTML + JSON with the same ε."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from privacy_runs import BUDGET, CONFIG, DELTA, NODE_PARAMS, ROUNDS, cli
from privacy_runs import make_run as _make_run
from typer.testing import CliRunner

from privacy.audit import (
    CAVEAT_EVALUATION,
    CAVEAT_RDP_UPPER_BOUND,
    CAVEAT_SECAGG,
    CAVEAT_SECURE_MODE,
    CAVEAT_UNPINNED_KEYS,
    THREAT_MODEL,
    build_audit,
    write_audit,
)
from privacy.ledger import Ledger, LedgerEvent, read_ledger, server_signer


def make_run(root: Path) -> Path:
    """A regional run: two nodes' honest ledgers, node-1 refusing one more round."""
    return _make_run(root, refusing=["node-1"])


def test_write_audit_writes_offline_html_and_json(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path)

    # Execute
    html_path, json_path = write_audit(run)

    # Assert
    assert (html_path, json_path) == (run / "audit.html", run / "audit.json")
    html = html_path.read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 2  # ε per node, NDCG@10 per round
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"<(script|link|iframe)\b", html, re.IGNORECASE)
    assert not re.search(r"""src=["'](?!data:)""", html)  # every src is inline
    audit = json.loads(json_path.read_text(encoding="utf-8"))
    assert audit["verify"]["ok"] is True
    assert "PASS" in html


def test_audit_json_has_the_ledger_epsilons_and_html_shows_them(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path)

    # Execute
    html_path, json_path = write_audit(run)

    # Assert
    audit = json.loads(json_path.read_text(encoding="utf-8"))
    html = html_path.read_text(encoding="utf-8")
    nodes = {n["node"]: n for n in audit["nodes"]}
    assert sorted(nodes) == sorted(NODE_PARAMS)
    for node, (sigma, q, steps) in NODE_PARAMS.items():
        spent = [
            r for r in read_ledger(run / "ledger" / f"{node}.jsonl") if r["mechanism"] == "dp-sgd"
        ]
        entry = nodes[node]
        assert entry["epsilon_per_round"] == [[r["round"], r["epsilon_after"]] for r in spent]
        assert entry["final_epsilon"] == spent[-1]["epsilon_after"]
        assert (entry["noise_multiplier"], entry["sample_rate"]) == (sigma, q)
        assert (entry["steps_per_round"], entry["clip_norm"], entry["delta"]) == (steps, 1.0, DELTA)
        assert entry["accountant"] == "rdp"
        assert entry["pld_reference_epsilon"] < entry["final_epsilon"]
        for _, eps in entry["epsilon_per_round"]:
            assert f"{eps:.4f}" in html
    assert (nodes["node-0"]["refusals"], nodes["node-1"]["refusals"]) == (0, 1)
    assert nodes["node-1"]["refused_rounds"] == [ROUNDS + 1]
    assert audit["budget_epsilon"] == BUDGET
    assert [r["ndcg@10"] for r in audit["metrics"]["rounds"]] == [0.51, 0.52, 0.53]


def test_audit_provenance_unit_and_caveats(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path)
    canonical = json.dumps(CONFIG, sort_keys=True, separators=(",", ":"))

    # Execute
    audit = build_audit(run)

    # Assert
    assert audit["config_hash"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert audit["code_version"]["fedrank_version"]
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", audit["code_version"]["git_commit"])
    assert list(audit["units_of_privacy"]) == ["user"]
    assert "one user's whole click history" in audit["units_of_privacy"]["user"]
    for caveat in (CAVEAT_SECURE_MODE, CAVEAT_EVALUATION):
        assert caveat in audit["caveats"]
    assert any(c.startswith(CAVEAT_RDP_UPPER_BOUND) for c in audit["caveats"])
    assert CAVEAT_SECAGG not in audit["caveats"]


def test_device_run_audit_has_client_level_caveats(tmp_path: Path) -> None:
    # Prepare: a server ledger whose claim is the recomputation itself (device shape)
    from privacy.verify import verify_run

    run = tmp_path / "device"
    (run / "ledger").mkdir(parents=True)
    config = {"privacy-shape": "device", "epsilon": "inf", "delta": DELTA, "secagg": True}
    (run / "config.json").write_text(json.dumps(config))
    ledger = Ledger(run / "ledger" / "server.jsonl", signer=server_signer(tmp_path / "key"))
    event = {
        "node": "server", "round": 1, "mechanism": "client-level-gaussian",
        "unit_of_privacy": "client", "noise_multiplier": 2.0, "sample_rate": 0.5, "steps": 1,
        "clip_norm": 0.5, "delta": DELTA, "accountant": "rdp-wor", "epsilon_after": 1e9,
        "detail": "sampled=5 population=10", "sampling": "without-replacement",
        "neighbouring": "replace-one",
    }  # fmt: skip
    ledger.append(LedgerEvent(**event))  # type: ignore[arg-type]

    # Execute
    audit = build_audit(run, report=verify_run(run))

    # Assert
    assert audit["verify"]["ok"] is True  # a claim above the recomputation is conservative
    assert list(audit["units_of_privacy"]) == ["client"]
    assert CAVEAT_SECAGG in audit["caveats"]
    assert CAVEAT_SECURE_MODE not in audit["caveats"]  # no Opacus in this run
    assert audit["budget_epsilon"] == "inf"
    assert "replace-one" in audit["nodes"][0]["recompute_method"]
    assert audit["per_user_epsilon"]["partition"] == "device: one user per client"
    assert audit["per_user_epsilon"]["epsilon"] == 1e9


def test_audit_of_tampered_run_embeds_the_failure(tmp_path: Path) -> None:
    # Prepare: delete line 2 of node-0's ledger
    run = make_run(tmp_path)
    path = run / "ledger" / "node-0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "".join(lines[2:]))

    # Execute
    html_path, json_path = write_audit(run)

    # Assert
    audit = json.loads(json_path.read_text(encoding="utf-8"))
    assert audit["verify"]["ok"] is False
    texts = [p["text"] for p in audit["verify"]["problems"]]
    assert any(t.startswith(f"{path}:2: ") for t in texts)
    html = html_path.read_text(encoding="utf-8")
    assert 'class="fail"' in html and f"{path}:2: " in html


def test_cli_audit_run_dir_and_report_and_verify(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path)
    runner = CliRunner()

    # Execute
    short = runner.invoke(cli(), ["audit", str(run)])
    (run / "audit.html").unlink()
    (run / "audit.json").unlink()
    long = runner.invoke(cli(), ["audit", "report", str(run)])
    verify = runner.invoke(cli(), ["audit", "verify", str(run), "--no-pld"])

    # Assert
    assert short.exit_code == 0, short.output
    assert f"wrote {run / 'audit.html'}" in short.output
    assert f"wrote {run / 'audit.json'}" in short.output
    assert long.exit_code == 0, long.output
    assert (run / "audit.html").is_file() and (run / "audit.json").is_file()
    assert verify.exit_code == 0, verify.output
    assert "PASS" in verify.output


def test_cli_audit_strict_fails_on_tampered_run_and_missing_dir_is_an_error(
    tmp_path: Path,
) -> None:
    # Prepare
    run = make_run(tmp_path)
    path = run / "ledger" / "node-1.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]
    path.write_text("".join(lines))
    runner = CliRunner()

    # Execute
    lenient = runner.invoke(cli(), ["audit", str(run)])
    strict = runner.invoke(cli(), ["audit", str(run), "--strict"])
    missing = runner.invoke(cli(), ["audit", str(tmp_path / "nope")])
    bare = runner.invoke(cli(), ["audit"])

    # Assert
    assert lenient.exit_code == 0, lenient.output
    assert "verify: FAIL" in lenient.output and f"{path}:1: " in lenient.output
    assert strict.exit_code == 1
    assert missing.exit_code == 2
    assert "verify" in bare.output and "report" in bare.output  # help lists subcommands


def test_audit_html_and_json_show_the_threat_model(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path)

    # Execute
    html_path, json_path = write_audit(run)

    # Assert
    audit = json.loads(json_path.read_text(encoding="utf-8"))
    html = html_path.read_text(encoding="utf-8")
    parties = [item["party"] for item in audit["threat_model"]]
    assert parties == [who for who, _ in THREAT_MODEL]
    for who in ("The server", "A node", "Other nodes and devices", "Someone holding a release",
                "Trusted"):  # fmt: skip
        assert who in parties and f"<b>{who}</b>" in html
    assert '<h2 id="threat-model">Threat model</h2>' in html
    trusted = dict(THREAT_MODEL)["Trusted"]
    for phrase in ("OS CSPRNG", "pinned", "SecAgg+", "clipped-count bit", "release"):
        assert phrase in trusted
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert "## Threat model" in readme


def test_audit_per_user_epsilon_states_partition_max_and_sum(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path)

    # Execute
    audit = build_audit(run)
    html = write_audit(run)[0].read_text(encoding="utf-8")

    # Assert
    per_user = audit["per_user_epsilon"]
    finals = {n["node"]: n["final_epsilon"] for n in audit["nodes"]}
    assert per_user["partition"] == "one node per user"
    assert per_user["epsilon"] == per_user["max_over_nodes"]
    assert per_user["max_over_nodes"] >= max(finals.values())
    assert per_user["sum_over_nodes"] >= sum(finals.values()) > per_user["max_over_nodes"]
    assert per_user["sum_delta"] == 2 * DELTA
    assert "region_id" in per_user["statement"] and "sum" in per_user["statement"]
    assert '<h2 id="per-user-epsilon">Per-user ε</h2>' in html
    assert f"{per_user['sum_over_nodes']:.4f}" in html


def test_audit_notes_unpinned_keys_and_shows_the_writers_keys(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path)

    # Execute
    audit = build_audit(run)
    html = write_audit(run)[0].read_text(encoding="utf-8")

    # Assert
    assert CAVEAT_UNPINNED_KEYS in audit["caveats"]
    keys = audit["verify"]["keys"]
    assert {k["writer"] for k in keys.values()} == set(NODE_PARAMS)
    assert {k["source"] for k in keys.values()} == {"published"}
    assert all(k["key_id"][:16] in html for k in keys.values())
