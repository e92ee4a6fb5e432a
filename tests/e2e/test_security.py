"""Deployment security on loopback with real Flower processes (issue 16).

- the address ``fedrank server start`` prints for nodes serves the Fleet API only: an outsider
  holding only ``ca.crt`` can neither register a node key nor start a run there;
- a node runs only the app (FAB hash) it pinned: a node pinned to another app refuses the
  run's ClientApp (error reply, no training, no ledger line) while a node pinned to this
  checkout trains (checked on the shared faulty-node cluster, ``shared_runs.faulty_run``);
- configuration checks that need no processes (Control API never exposed, key permissions,
  ``certs init`` re-runs print the SANs on disk).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.deploy import (
    PROJECT_ROOT,
    TAG_ENV,
    ServerConfig,
    deploy_env,
    init_certs,
    make_node_key,
    new_tag,
    stop_tagged,
    tagged_pids,
    write_connection,
)

FEDRANK = [sys.executable, "-m", "fedrank.cli"]


def _flwr(home: Path, *args: str, tag: str) -> subprocess.CompletedProcess[str]:
    env = deploy_env(flwr_home=home, tag=tag)
    return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path, str]]:
    """``fedrank server start`` (no run submitted) with node-0's key registered."""
    certs = init_certs(tmp_path / "certs", nodes=1)
    config = tmp_path / "server.toml"
    config.write_text(
        '[superlink]\nhost = "127.0.0.1"\nport = 9480\ncontrol_port = 9481\n'
        'database = "superlink.db"\nflwr_home = "flwr_home"\n'
        '[certs]\ndir = "certs"\n'
        '[nodes]\npublic_keys = ["certs/node-0.pub"]\n'
        '[run]\nrun_dir = "run"\nsubmit = false\n'
    )
    tag = new_tag()
    env = dict(os.environ, **{TAG_ENV: tag, "PYTHONPATH": str(PROJECT_ROOT)})
    proc = subprocess.Popen([*FEDRANK, "server", "start", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=PROJECT_ROOT, start_new_session=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        lines = [first]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if "SuperLink ready" in line:
                break
        assert any("SuperLink ready" in ln for ln in lines), lines
        yield proc, first, certs.ca_cert, tag
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        stop_tagged(tag, grace=3)
        assert tagged_pids(tag) == []


@pytest.mark.deployment
@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_outsider_with_only_the_ca_cannot_register_or_run(
    server: tuple[subprocess.Popen[str], str, Path, str], tmp_path: Path
) -> None:
    # Prepare: the address printed for nodes, and an outsider's FLWR_HOME holding only ca.crt
    proc, first, ca, tag = server
    assert first == "nodes connect to 127.0.0.1:9480"
    node_address = first.removeprefix("nodes connect to ")
    home = tmp_path / "outsider"
    home.mkdir()
    shutil.copy(ca, home / "ca.crt")
    write_connection(home, address=node_address, root_certificates=home / "ca.crt",
                     name="outsider")
    _, evil_pub = make_node_key(tmp_path / "evil" / "evil")
    # Execute
    register = _flwr(home, "supernode", "register", str(evil_pub), "outsider", tag=tag)
    run = _flwr(home, "run", str(PROJECT_ROOT), "outsider", tag=tag)
    listing = _flwr(home, "supernode", "list", "outsider", tag=tag)
    # Assert: all refused at the node address ...
    for out in (register, run, listing):
        text = out.stdout + out.stderr
        assert out.returncode != 0, text[-2000:]
        assert "registered successfully" not in text.lower()
        assert "serves the Fleet API only" in text, text[-2000:]  # the gateway's 404
    # ... and the operator (loopback Control API) sees no outsider key and no run
    operator = tmp_path / "flwr_home"
    keys = _flwr(operator, "supernode", "list", "fedrank", "--format", "json", tag=tag)
    assert keys.returncode == 0, keys.stdout + keys.stderr
    assert evil_pub.read_text().split()[1] not in keys.stdout
    runs = _flwr(operator, "ls", "fedrank", "--format", "json", tag=tag)
    assert runs.returncode == 0, runs.stdout + runs.stderr
    assert '"run-id"' not in runs.stdout and '"run_id"' not in runs.stdout, runs.stdout
    assert proc.poll() is None  # the server is still up


@pytest.mark.deployment
@pytest.mark.e2e
@pytest.mark.timeout(600)  # the first test to ask runs the shared cluster
def test_node_runs_only_the_app_it_pinned(faulty_deployment: Any) -> None:
    # Prepare + Execute (tests/e2e/shared_runs.py::faulty_run): node-0 pins this checkout's
    # app (default), node-5 pins another app; two rounds
    run = faulty_deployment
    assert run.error is None, run.error
    assert run.leftover == []
    cluster = run.cluster
    # Assert
    assert run.rc == 0, cluster.tail()
    assert cluster.has_line("[fedrank] round 2/2"), cluster.tail()
    assert [e["round"] for e in cluster.ledger("node-0")] == [1, 2]
    assert cluster.ledger("node-5") == []  # it never trained
    assert "refused app" in cluster.node_log("node-5"), cluster.node_log("node-5")[-3000:]
    assert "refused app" not in cluster.node_log("node-0")


# -- fast checks (no processes) -----------------------------------------------------------


def test_control_api_is_never_exposed(tmp_path: Path) -> None:
    init_certs(tmp_path / "certs", nodes=0)
    config = tmp_path / "server.toml"
    config.write_text('[superlink]\nhost = "0.0.0.0"\ncontrol_host = "0.0.0.0"\n'
                      '[certs]\ndir = "certs"\n')
    out = subprocess.run([*FEDRANK, "server", "start", "--config", str(config)],
                         capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT,
                         env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
    assert out.returncode == 2
    assert "would expose Flower's Control API" in out.stderr
    assert "nodes connect to" not in out.stdout
    ok = ServerConfig(host="0.0.0.0", port=9400, certs_dir=tmp_path / "certs")
    ok.check()  # nodes may reach the gateway on every interface; Control stays on loopback
    assert ok.control_address == "127.0.0.1:9401"


def test_certs_private_files_and_reruns(tmp_path: Path) -> None:
    import stat

    from shared_model.release import KeyPermissionError

    root = tmp_path / "certs"
    offline = tmp_path / "usb" / "ca.key"
    bundle = init_certs(root, sans=["a.example"], nodes=1, ca_key_path=offline)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for private in (offline, bundle.server_key, bundle.node_keys["node-0"][0]):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert not (root / "ca.key").exists()  # the CA key stayed on the offline medium
    assert set(bundle.sans) == {"a.example", "127.0.0.1"}
    # re-run with other SANs and without the CA key: the certificate on disk is kept and
    # the SANs reported are the ones it carries
    again = init_certs(root, sans=["b.example"], nodes=1)
    assert again.kept_server_cert and set(again.sans) == {"a.example", "127.0.0.1"}
    assert again.missing_sans == ("b.example",)
    out = subprocess.run([*FEDRANK, "certs", "init", str(root), "--san", "b.example",
                          "--nodes", "1"], capture_output=True, text=True, timeout=120,
                         cwd=PROJECT_ROOT, env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
    assert out.returncode == 0, out.stderr
    assert "SANs: 127.0.0.1, a.example (kept" in out.stdout
    assert "b.example" not in out.stdout and "does not carry b.example" in out.stderr
    # a reused private key that others can read is refused
    bundle.node_keys["node-0"][0].chmod(0o644)
    with pytest.raises(KeyPermissionError):
        init_certs(root, nodes=1)
