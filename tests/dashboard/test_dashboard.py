"""The dashboard's state and access rules, without a browser (Starlette's test client)."""

from __future__ import annotations

import json

import pytest
from dashboard_runs import BUDGET, add_refusal, add_release, append_round, make_run, node_epsilon
from starlette.testclient import TestClient

from fedrank.dashboard import build_app, collect_state, dashboard_url, is_loopback


def test_state_has_rounds_views_baselines_and_epsilon_per_node(tmp_path):
    # Prepare: 3 of 5 rounds done; south then refuses round 4 on its budget.
    run = make_run(tmp_path, rounds=3, planned=5)
    add_refusal(run, "south", 4, node_epsilon(1, 3))

    state = collect_state(run)

    assert state["run"]["rounds_done"] == 3 and state["run"]["rounds_planned"] == 5
    assert state["run"]["status"] == "running"
    assert [r["round"] for r in state["rounds"]] == [1, 2, 3]
    assert state["rounds"][0]["views"]["seen"]["ndcg@10"] == pytest.approx(0.56)
    assert state["baselines"]["bm25"]["unseen"]["ndcg@10"] == 0.41
    nodes = {n["name"]: n for n in state["nodes"]}
    assert nodes["north"]["epsilon"] == [[r, node_epsilon(0, r)] for r in (1, 2, 3)]
    assert nodes["north"]["budget"] == 1.5 and nodes["north"]["cap"] == 1.5  # min(budget, cap)
    assert nodes["south"]["budget"] == BUDGET
    assert nodes["south"]["status"] == "out of budget"
    assert nodes["south"]["refusals"][0]["round"] == 4
    # Only whitelisted config keys: no paths.
    assert "data-dir" not in state["run"]["config"]


def test_releases_show_the_key_fingerprint_only_when_the_signature_verifies(tmp_path):
    run = make_run(tmp_path, rounds=3)
    fingerprint = add_release(run, 2)
    add_release(run, 3, tamper=True)

    releases = collect_state(run)["releases"]

    assert [(r["round"], r["signature"]) for r in releases] == [(2, "valid"), (3, "INVALID")]
    assert releases[0]["key_fingerprint"] == fingerprint
    assert releases[1]["key_fingerprint"] is None


def test_reply_summaries_and_log_fallback(tmp_path):
    run = make_run(tmp_path, rounds=2)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["rounds"][1]["replies"]["rejected"] = [
        {"node_id": 7, "node": "north", "reason": "unexpected metric(s) ['x']"}]
    metrics["rounds"][1]["replies"]["downweighted"] = [
        {"node_id": 8, "node": "east", "rule": "deviationdrop", "kept_share": 0.0,
         "expected_share": 1.0}]
    metrics["rounds"][0]["replies"]["evidence"] = [
        {"node_id": 9, "node": "west", "action": "rate-clamped", "pairs": 3,
         "clicks_removed": 40.0},
        {"node_id": 9, "node": "west", "action": "dropped"}]
    (run / "metrics.json").write_text(json.dumps(metrics))
    state = collect_state(run)
    assert state["replies"] == [
        {"round": 1, "kind": "evidence", "node": "west",
         "reason": "evidence clicks capped to the other nodes' rates on 3 pair(s)"},
        {"round": 2, "kind": "rejected", "node": "north",
         "reason": "unexpected metric(s) ['x']"},
        {"round": 2, "kind": "downweighted", "node": "east",
         "reason": "deviationdrop kept 0% of the update"}]
    # A metrics file without reply summaries: the server's warnings in flower.log.
    for row in metrics["rounds"]:
        del row["replies"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "flower.log").write_text(
        "INFO noise\nWARNING round 2: rejected reply from node 123 (south): bad shape\n"
        "WARNING round 2: node 9 sent no update: budget spent\n")
    replies = collect_state(run)["replies"]
    assert [(r["kind"], r["node"], r["reason"]) for r in replies] == [
        ("rejected", "south", "bad shape"), ("refused", "9", "budget spent")]


def test_never_reads_node_data_or_state(tmp_path):
    run = make_run(tmp_path, rounds=1)
    for folder in ("data/node-0", "nodes/north", "checkpoints"):
        (run / folder).mkdir(parents=True)
        (run / folder / "clicks.json").write_text('{"user": "SECRET-USER-42"}')
    client = TestClient(build_app(run))
    assert "SECRET-USER-42" not in client.get("/api/state").text


def test_loopback_bind_serves_without_token_but_checks_the_host(tmp_path):
    client = TestClient(build_app(make_run(tmp_path), loopback_only=True),
                        base_url="http://127.0.0.1:8050")
    page = client.get("/")
    assert page.status_code == 200 and "plotly.min.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/plotly.min.js").status_code == 200
    assert client.get("/", headers={"host": "attacker.example"}).status_code == 403


def test_token_required_on_every_request(tmp_path):
    app = build_app(make_run(tmp_path), token="s3cret", loopback_only=False)
    client = TestClient(app, base_url="http://127.0.0.1:8050")
    for path in ("/", "/api/state", "/static/dashboard.js", "/static/plotly.min.js"):
        assert client.get(path).status_code == 401, path
        assert client.get(path + "?token=wrong").status_code == 401, path
    assert client.get("/api/state", headers={"authorization": "Bearer s3cret"}).status_code == 200
    # ?token= sets an HttpOnly cookie that the page's own requests then carry.
    first = client.get("/?token=s3cret")
    assert first.status_code == 200
    assert "httponly" in first.headers["set-cookie"].lower()
    assert client.get("/api/state").status_code == 200


def test_urls_and_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    assert dashboard_url("0.0.0.0", 8050, "t") == "http://127.0.0.1:8050/?token=t"
    assert dashboard_url("127.0.0.1", 8050) == "http://127.0.0.1:8050/"


def test_state_of_an_empty_directory(tmp_path):
    state = collect_state(tmp_path)
    assert state["run"]["status"] == "not started" and state["rounds"] == []
    append_round(tmp_path, 1)  # metrics and ledger, no config yet
    assert collect_state(tmp_path)["run"]["rounds_done"] == 1
