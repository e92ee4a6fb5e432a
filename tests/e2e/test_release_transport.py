"""Signed releases reach nodes inside Flower messages, on a real loopback cluster.

The shared faulty-node cluster (``shared_runs.faulty_run``: TLS + node auth, six registered
SuperNodes, two rounds, ``release-every = 1``). Its release nodes, node-0 and node-4
(``shared_runs.RELEASE_NODES``), have only their own folders (state, click log, pinned
release key; no ``release-dir``): nothing a node is configured with lies under the server's
run directory or key folder, so the only way a release can reach it is a Flower message.
Release round-0001 rides on round 2's train messages, the final round-0002 on the
``query.install_release`` message after the last round. node-4 alters round-0001 as it
arrives (the ``tamper-release`` test hook): it must refuse it, keep training, be sent the
next release and install that one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from shared_runs import RELEASE_NODES  # tests/e2e is on sys.path (rootdir)

from shared_model.release import (
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    ReleaseStore,
    load_public_key,
    signing_key_dir,
    verify_release,
)

pytestmark = [pytest.mark.deployment, pytest.mark.e2e]

CLEAN, TAMPERED = "node-0", "node-4"


@pytest.mark.timeout(600)  # the first test to ask runs the shared cluster
def test_each_node_installs_releases_over_flower_and_refuses_one_altered_in_transit(
    faulty_deployment: Any,
) -> None:
    # Prepare + Execute: tests/e2e/shared_runs.py::faulty_run (see the module docstring)
    run = faulty_deployment
    assert run.error is None, run.error
    cluster = run.cluster
    assert RELEASE_NODES == {CLEAN: None, TAMPERED: 1}
    # Assert: the release nodes were given no path on the server's side
    server_side = [cluster.run_dir.resolve(), signing_key_dir(cluster.run_dir).resolve()]
    for name in RELEASE_NODES:
        node_config = run.node_args[name]
        assert "release-dir" not in node_config
        for path in re.findall(r'"(/[^"]+)"', node_config):  # every path the node is given
            assert not any(Path(path).resolve().is_relative_to(s) for s in server_side), path
    # the run completed; the server attached round-0001 in round 2 and sent the final
    # round-0002 after the last round
    assert run.rc == 0, cluster.tail()
    assert cluster.has_line("[fedrank] round 2/2"), cluster.tail()
    releases = cluster.run_dir / "releases"
    size_1 = sum(p.stat().st_size for p in (releases / "round-0001").iterdir())
    assert any(re.search(rf"release round-0001 attached for \d+ node\(s\), {size_1} bytes each",
                         line) for line in cluster.lines), cluster.tail()
    # node-4 refused the altered release: the server saw its old release round
    assert any(re.search(rf"node {run.ids[TAMPERED]} did not install release round-0001 "
                         r"\(it reports release round 0", line)
               for line in cluster.lines), cluster.tail()
    assert cluster.has_line("final release round-0002 sent to"), cluster.tail()
    installed = [re.search(r"final release round-0002 installed on (\d+)/(\d+) node\(s\)", ln)
                 for ln in cluster.lines]
    counts = [(int(m[1]), int(m[2])) for m in installed if m]
    assert counts and counts[0][0] >= len(RELEASE_NODES), cluster.tail()
    # each release node installed the server's signed release, byte for byte, in its own
    # state dir
    final = releases / "round-0002"
    for name in RELEASE_NODES:
        store = ReleaseStore(cluster.root / "nodes" / name)
        assert store.current_version() == "round-0002", cluster.node_log(name)[-3000:]
        current = store.current()
        assert current is not None
        for file in (MANIFEST_FILE, SIGNATURE_FILE, MODEL_FILE):
            assert (current / file).read_bytes() == (final / file).read_bytes(), (name, file)
        verify_release(current, load_public_key(run.own_folders[name] / "server-signing.pub"))
    # node-0 installed round-0001 too; node-4 never did (it refused the altered copy)
    assert (cluster.root / "nodes" / CLEAN / "releases" / "round-0001").is_dir()
    assert not (cluster.root / "nodes" / TAMPERED / "releases" / "round-0001").exists()
    log_t = cluster.node_log(TAMPERED)
    assert f"node {TAMPERED} refused the release received over Flower" in log_t, log_t[-3000:]
    assert "head.onnx has sha256" in log_t, log_t[-3000:]
    assert "refused the release" not in cluster.node_log(CLEAN)
    # node-4 trained in both rounds all the same
    assert [e["round"] for e in cluster.ledger(TAMPERED)] == [1, 2]
