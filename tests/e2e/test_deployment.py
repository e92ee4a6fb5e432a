"""Deployment Engine end to end: real SuperLink/SuperNodes on loopback, TLS + node auth.

Every process is started by ``deploy_helpers.Cluster`` with one tag and stopped in the
fixture's ``finally`` (process trees, then anything else carrying the tag). Ports: 9400-9499.
Node data: ``regional-3`` click logs from ``prepare_run``, cut to a few users per node so a
round is bounded by Flower's process start-up rather than training.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deploy_helpers import Cluster  # tests/e2e is on sys.path (rootdir)

from privacy.ledger import verify_chain
from server.deploy import tagged_pids
from simulations.runner import prepare_run
from simulations.scenarios import get_scenario

pytestmark = [pytest.mark.deployment, pytest.mark.e2e]

NODES = ["node-0", "node-1", "node-2"]
USERS_PER_NODE = 150


def _prepare(cluster: Cluster, rounds: int, **overrides: Any) -> dict[str, Any]:
    settings = prepare_run(
        get_scenario("regional-3"), run_dir=cluster.run_dir, rounds=rounds, epsilon=1.0,
        overrides={"batch-size": 64, **overrides},
    )
    for name in NODES:  # keep the first USERS_PER_NODE users of each node
        path = cluster.run_dir / "data" / name / "clicks.parquet"
        table = pq.read_table(path)
        users = sorted(set(table.column("user_id").to_pylist()))[:USERS_PER_NODE]
        pq.write_table(table.filter(pc.is_in(table.column("user_id"), pa.array(users))), path)
    return settings.to_config()


def _node_data(cluster: Cluster, name: str) -> Path:
    return cluster.run_dir / "data" / name


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    port = request.param
    c = Cluster(tmp_path, port=port)
    try:
        yield c
    finally:
        c.close()
        assert tagged_pids(c.tag) == [], "a deployment process outlived the test"


@pytest.mark.timeout(420)
@pytest.mark.parametrize("cluster", [9400], indirect=True)
def test_faulty_unregistered_and_plaintext_nodes_are_refused(cluster: Cluster) -> None:
    # Prepare: 3 registered nodes (node-1 sends NaN, node-2 a wrong shape, node-0 records
    # what it sends); node-3's key is not registered; a 5th node speaks plaintext.
    config = _prepare(cluster, rounds=1, **{"min-train-nodes": 3})
    cluster.start_server(register=NODES)
    record = cluster.root / "node-0-messages.jsonl"
    cluster.start_node("node-0", data=_node_data(cluster, "node-0"),
                       extra={"record-messages": str(record)})
    cluster.start_node("node-1", data=_node_data(cluster, "node-1"), extra={"fault": "nan"})
    cluster.start_node("node-2", data=_node_data(cluster, "node-2"), extra={"fault": "shape"})
    rogue = cluster.start_node("node-3", data=_node_data(cluster, "node-0"), max_wait_time=30)
    plain = cluster.start_node("plain", insecure=True,
                               data=_node_data(cluster, "node-0"), max_wait_time=20)
    # Execute
    cluster.submit(config)
    rc = cluster.wait_run(300)
    # Assert: the round completed on the one good reply
    assert rc == 0, cluster.tail()
    assert cluster.has_line("[fedrank] round 1/1"), cluster.tail()
    rejected = [ln for ln in cluster.lines if "rejected reply from node" in ln]
    assert len(rejected) == 2, rejected
    assert any("NaN or Inf" in ln for ln in rejected), rejected
    assert any("shape" in ln for ln in rejected), rejected
    # unregistered key: the SuperNode exits non-zero and never trains
    assert rogue.wait(timeout=60) != 0, cluster.node_log("node-3")[-2000:]
    assert cluster.ledger("node-3") == []
    # plaintext against a TLS SuperLink: never connects, never trains
    assert plain.wait(timeout=60) != 0, cluster.node_log("plain")[-2000:]
    assert cluster.ledger("plain") == []
    # only model arrays and aggregate metrics left node-0
    lines = [json.loads(ln) for ln in record.read_text().splitlines()]
    assert lines and all(not ln["has_error"] for ln in lines)
    # the answer to the final release delivery (server.releases): its release round only
    answers = [ln for ln in lines if ln["message_type"] == "query.install_release"]
    assert [a["content"] for a in answers] == [{"metrics": {
        "type": "MetricRecord", "keys": ["release-round"],
        "value_types": {"release-round": "float"}}}]
    lines = [ln for ln in lines if ln["message_type"] == "train"]
    assert lines
    for line in lines:
        content = line["content"]
        # arrays, aggregate metrics, and the node's own operator-chosen name (for the
        # server's per-region policy): nothing else
        assert set(content) == {"arrays", "metrics", "node"}
        assert content["node"]["type"] == "ConfigRecord"
        assert content["node"]["keys"] == ["name"]
        assert content["arrays"]["type"] == "ArrayRecord"
        assert content["arrays"]["keys"] and all(
            k.endswith((".weight", ".bias")) for k in content["arrays"]["keys"]
        )
        assert content["metrics"]["type"] == "MetricRecord"
        assert set(content["metrics"]["keys"]) == {
            "release-round", "num-examples", "steps", "epsilon",
        }
        assert set(content["metrics"]["value_types"].values()) <= {"float", "int"}
        text = json.dumps(content)
        for forbidden in ("query", "user", "session", "click", "product"):
            assert forbidden not in text


@pytest.mark.timeout(480)
@pytest.mark.parametrize("cluster", [9430], indirect=True)
def test_node_killed_in_round_two_and_restarted(cluster: Cluster) -> None:
    # Prepare
    config = _prepare(cluster, rounds=3, **{"min-train-nodes": 2})
    cluster.start_server(register=NODES)
    for name in NODES:
        cluster.start_node(name, data=_node_data(cluster, name))
    cluster.submit(config)
    # Execute: kill node-2 as round 2 starts; restart it once the server has given up on it
    cluster.wait_for(lambda: cluster.has_line("[ROUND 2/3]"), 240, "round 2")
    time.sleep(3)  # its round-2 ClientApp is starting/training
    cluster.kill_node("node-2")
    eps_before = cluster.ledger("node-2")[-1]["epsilon_after"]
    cluster.wait_for(lambda: cluster.has_line("[fedrank] round 2/3"), 240, "round 2 to end")
    cluster.start_node("node-2", data=_node_data(cluster, "node-2"))
    rc = cluster.wait_run(240)
    # Assert
    assert rc == 0, cluster.tail()
    assert cluster.has_line("[fedrank] round 3/3"), cluster.tail()
    metrics = json.loads((cluster.run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    ledger = cluster.ledger("node-2")
    assert verify_chain(cluster.root / "nodes" / "node-2" / "ledger" / "node-2.jsonl") == []
    eps = [e["epsilon_after"] for e in ledger]
    assert eps == sorted(eps) and eps[0] > 0  # continued from its ledger, never reset
    rounds = [e["round"] for e in ledger]
    assert rounds[0] == 1 and rounds == sorted(rounds)
    if 3 in rounds:  # it rejoined for round 3 (it may miss it if it reconnects late)
        assert eps[-1] > eps_before
    for name in ("node-0", "node-1"):
        assert [e["round"] for e in cluster.ledger(name)] == [1, 2, 3]


@pytest.mark.timeout(480)
@pytest.mark.parametrize("cluster", [9460], indirect=True)
def test_server_killed_mid_run_resumes_from_checkpoint(cluster: Cluster) -> None:
    # Prepare
    config = _prepare(cluster, rounds=3, **{"min-train-nodes": 3})
    cluster.start_server(register=NODES)
    for name in NODES:
        cluster.start_node(name, data=_node_data(cluster, name))
    cluster.submit(config)
    cluster.wait_for(lambda: cluster.has_line("[fedrank] round 1/3"), 240, "round 1")
    # Execute: crash the server side (SuperLink, ServerApp, flwr run), then start it again
    cluster.kill_server()
    latest = json.loads((cluster.run_dir / "checkpoints" / "latest.json").read_text())
    eps_at_kill = json.loads((cluster.run_dir / "metrics.json").read_text())["rounds"][-1][
        "epsilon_max"]
    cluster.lines.clear()
    cluster.start_server(register=[])  # the state database keeps the registrations
    cluster.submit(config)
    rc = cluster.wait_run(360)
    # Assert
    assert rc == 0, cluster.tail()
    round_at_kill, weights = latest["round"], latest["weights_sha256"][:12]
    assert cluster.has_line(
        f"resuming {cluster.run_dir.resolve()} from round {round_at_kill} (weights {weights})"
    ), cluster.tail()
    metrics = json.loads((cluster.run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    eps = [r["epsilon_max"] for r in metrics["rounds"]]
    assert eps == sorted(eps) and eps[round_at_kill] >= eps_at_kill  # not reset
    for name in NODES:
        ledger = cluster.ledger(name)
        node_eps = [e["epsilon_after"] for e in ledger]
        assert node_eps == sorted(node_eps), name
        assert max(e["round"] for e in ledger) == 3


# -- fast checks (no processes) -----------------------------------------------------------


def test_certs_are_loadable_and_keys_are_openssh_p384(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    from server.deploy import init_certs

    bundle = init_certs(tmp_path, sans=["127.0.0.1", "example.test"], nodes=2)
    cert = x509.load_pem_x509_certificate(bundle.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "example.test" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ca = x509.load_pem_x509_certificate(bundle.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    private, public = bundle.node_keys["node-1"]
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    load_ssh_public_key(public.read_bytes())
    assert private.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("fault", ["nan", "inf", "shape", "dtype", "missing-key", "extra-key",
                                   "huge-norm"])
def test_every_injected_fault_is_rejected_by_the_server_checks(fault: str) -> None:
    import numpy as np

    from client.faults import corrupt
    from server.validation import reply_problems

    reference = {"a.weight": np.ones((2, 3), np.float32), "a.bias": np.zeros(2, np.float32)}
    bad = corrupt(reference, fault)
    metrics = {"num-examples": 1.0, "steps": 3.0, "epsilon": 0.1, "release-round": 0.0}
    assert reply_problems(reference, metrics, reference=reference, max_update_norm=100) == []
    assert reply_problems(bad, metrics, reference=reference, max_update_norm=100)
