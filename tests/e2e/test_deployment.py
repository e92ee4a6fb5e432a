"""Deployment Engine end to end: real SuperLink/SuperNodes on loopback, TLS + node auth.

The cluster runs live in ``shared_runs.py`` (one cluster exercises several behaviours; the
tests here ask for its result through the session fixtures ``faulty_deployment`` and
``crash_deployment`` in ``tests/conftest.py``). Every process is started by
``deploy_helpers.Cluster`` with one tag and stopped before the run returns (process trees,
then anything else carrying the tag). Ports: 9400-9499. Node data: ``regional-3`` click logs
from ``prepare_run``, cut to a few users per node so a round is bounded by Flower's process
start-up rather than training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import Cluster  # tests/e2e is on sys.path (rootdir)
from shared_runs import node_data, prepare

from privacy.ledger import verify_chain

pytestmark = [pytest.mark.deployment, pytest.mark.e2e]

NODES = ["node-0", "node-1", "node-2"]
USERS_PER_NODE = 150


def _prepare(cluster: Cluster, rounds: int, **overrides: Any) -> dict[str, Any]:
    """regional-3's click logs for ``cluster``, USERS_PER_NODE users per node; the run config."""
    return prepare(cluster, rounds, users=USERS_PER_NODE, **overrides)


def _node_data(cluster: Cluster, name: str) -> Path:
    return node_data(cluster, name)


def _ok(run: Any) -> None:
    """The shared run itself finished and left no process behind."""
    assert run.error is None, run.error
    assert run.leftover == [], "a deployment process outlived the run"


@pytest.mark.timeout(600)  # the first test to ask runs the shared cluster
def test_faulty_unregistered_and_plaintext_nodes_are_refused(faulty_deployment: Any) -> None:
    # Prepare + Execute (tests/e2e/shared_runs.py::faulty_run): registered nodes send NaN
    # arrays (node-1), a wrong shape (node-2) and more (see FAULTY_NODES), node-0 records what
    # it sends; node-6's key is not registered; a further node speaks plaintext. Two rounds.
    run = faulty_deployment
    _ok(run)
    cluster = run.cluster
    # Assert: both rounds completed on the good replies
    assert run.rc == 0, cluster.tail()
    assert cluster.has_line("[fedrank] round 2/2"), cluster.tail()
    rejected = [ln for ln in cluster.lines if "rejected reply from node" in ln]
    by_node = {
        name: [ln for ln in rejected if f"rejected reply from node {run.ids[name]} " in ln]
        for name in ("node-1", "node-2")
    }
    assert len(by_node["node-1"]) == 2 and all("NaN or Inf" in ln for ln in by_node["node-1"]), \
        rejected
    assert len(by_node["node-2"]) == 2 and all("shape" in ln for ln in by_node["node-2"]), \
        rejected
    # unregistered key: the SuperNode exits non-zero and never trains
    assert run.rogue_rc not in (None, 0), cluster.node_log("node-6")[-2000:]
    assert cluster.ledger("node-6") == []
    # plaintext against a TLS SuperLink: never connects, never trains
    assert run.plain_rc not in (None, 0), cluster.node_log("plain")[-2000:]
    assert cluster.ledger("plain") == []
    # only model arrays and aggregate metrics left node-0
    lines = [json.loads(ln) for ln in run.record.read_text().splitlines()]
    assert lines and all(not ln["has_error"] for ln in lines)
    # the answer to the final release delivery (server.releases): its release round only
    answers = [ln for ln in lines if ln["message_type"] == "query.install_release"]
    assert [a["content"] for a in answers] == [{"metrics": {
        "type": "MetricRecord", "keys": ["release-round"],
        "value_types": {"release-round": "float"}}}]
    lines = [ln for ln in lines if ln["message_type"] == "train"]
    assert len(lines) == 2  # one train reply per round
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


@pytest.mark.timeout(600)  # the first test to ask runs the shared cluster
def test_node_killed_in_round_two_and_restarted(crash_deployment: Any) -> None:
    # Prepare + Execute (tests/e2e/shared_runs.py::crash_run): three nodes, three rounds;
    # node-2 is killed as round 2 starts and restarted once round 2 has ended without it (the
    # server side is also crashed and restarted then: the other test of this run).
    run = crash_deployment
    _ok(run)
    cluster = run.cluster
    # Assert
    assert run.rc == 0, cluster.tail()
    assert any("[fedrank] round 2/3" in ln for ln in run.first_lines)
    assert cluster.has_line("[fedrank] round 3/3"), cluster.tail()
    metrics = json.loads((cluster.run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    ledger = cluster.ledger("node-2")
    assert verify_chain(cluster.root / "nodes" / "node-2" / "ledger" / "node-2.jsonl") == []
    eps = [e["epsilon_after"] for e in ledger]
    assert eps == sorted(eps) and eps[0] > 0  # continued from its ledger, never reset
    rounds = [e["round"] for e in ledger]
    assert rounds[0] == 1 and rounds == sorted(rounds)
    # it rejoined for round 3 (min-train-nodes = 3: the round waited for it)
    assert rounds[-1] == 3 and run.eps_before_node_kill is not None
    assert eps[-1] > run.eps_before_node_kill
    for name in ("node-0", "node-1"):
        assert [e["round"] for e in cluster.ledger(name)] == [1, 2, 3]


@pytest.mark.timeout(600)  # the first test to ask runs the shared cluster
def test_server_killed_mid_run_resumes_from_checkpoint(crash_deployment: Any) -> None:
    # Prepare + Execute (tests/e2e/shared_runs.py::crash_run): once round 2 has ended, the
    # server side (SuperLink, ServerApp, flwr run) is SIGKILLed, then started again with the
    # same run config; the nodes stay up (node-2 was restarted, the other test of this run).
    run = crash_deployment
    _ok(run)
    cluster = run.cluster
    # Assert
    assert run.rc == 0, cluster.tail()
    latest = run.checkpoint_at_kill
    round_at_kill, weights = latest["round"], latest["weights_sha256"][:12]
    assert round_at_kill >= 1
    assert cluster.has_line(
        f"resuming {cluster.run_dir.resolve()} from round {round_at_kill} (weights {weights})"
    ), cluster.tail()
    metrics = json.loads((cluster.run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    eps = [r["epsilon_max"] for r in metrics["rounds"]]
    assert eps == sorted(eps) and eps[round_at_kill] >= run.eps_at_server_kill  # not reset
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
