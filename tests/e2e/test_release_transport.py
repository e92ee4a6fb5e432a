"""Signed releases reach nodes inside Flower messages, on a real loopback cluster.

A TLS + node-auth Deployment Engine cluster (``deploy_helpers.Cluster``): one SuperLink and
two SuperNodes, each node with only its own folder (state, click log, pinned release key; no
``release-dir``): nothing a node is configured with lies under the server's run directory
or key folder, so the only way a release can reach it is a Flower message. Two rounds with
``release-every = 1``: release round-0001 rides on round 2's train messages, the final
round-0002 on the ``query.install_release`` message after the last round. node-1 alters
round-0001 as it arrives (the ``tamper-release`` test hook): it must refuse it, keep
training, be sent the next release and install that one. Ports 9445-9456.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deploy_helpers import Cluster  # tests/e2e is on sys.path (rootdir)

from server.deploy import tagged_pids
from server.releases import ReleasePublisher
from shared_model.ranker import HeadConfig
from shared_model.release import (
    MANIFEST_FILE,
    MODEL_FILE,
    PUBLIC_KEY_FILE,
    SIGNATURE_FILE,
    ReleaseStore,
    load_public_key,
    signing_key_dir,
    verify_release,
)
from simulations.runner import prepare_run
from simulations.scenarios import get_scenario

pytestmark = [pytest.mark.deployment, pytest.mark.e2e]

PORT = 9445
NODES = ["node-0", "node-1"]
USERS_PER_NODE = 60


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, port=PORT, nodes=len(NODES))
    try:
        yield c
    finally:
        c.close()
        assert tagged_pids(c.tag) == [], "a deployment process outlived the test"


def _own_folder(cluster: Cluster, root: Path, name: str) -> tuple[Path, Path]:
    """The node's own copy of its click log and of the server's public key (pinned at set-up:
    an operator copies ``server-signing.pub`` once, out of band)."""
    own = root / name
    data = own / "data"
    data.mkdir(parents=True)
    table = pq.read_table(cluster.run_dir / "data" / name / "clicks.parquet")
    users = sorted(set(table.column("user_id").to_pylist()))[:USERS_PER_NODE]
    pq.write_table(table.filter(pc.is_in(table.column("user_id"), pa.array(users))),
                   data / "clicks.parquet")
    key = own / "server-signing.pub"
    shutil.copy(signing_key_dir(cluster.run_dir) / PUBLIC_KEY_FILE, key)
    return data, key


@pytest.mark.timeout(300)
def test_each_node_installs_releases_over_flower_and_refuses_one_altered_in_transit(
    cluster: Cluster, tmp_path: Path,
) -> None:
    # Prepare: the server's run (node click logs are simulated into its run dir, then each
    # node gets its own copy elsewhere), its signing key created before the nodes pin it
    settings = prepare_run(
        get_scenario("regional-3"), run_dir=cluster.run_dir, rounds=2, epsilon=1.0,
        overrides={"batch-size": 64, "min-train-nodes": 2, "release-every": 1},
    )
    ReleasePublisher(cluster.run_dir, every=1, head_config=HeadConfig())  # creates the key
    server_side = [cluster.run_dir.resolve(), signing_key_dir(cluster.run_dir).resolve()]
    cluster.start_server(register=NODES)
    node_dirs = tmp_path / "node-files"  # state dirs: tmp_path/nodes/NAME
    for name in NODES:
        data, key = _own_folder(cluster, node_dirs, name)
        extra = {"release-key": str(key)}
        if name == "node-1":
            extra["tamper-release"] = "1"  # round-0001 is altered on its way to node-1
        proc = cluster.start_node(name, data=data, extra=extra)
        config = proc.args if isinstance(proc.args, list) else [str(proc.args)]
        node_config = " ".join(map(str, config))
        assert "release-dir" not in node_config
        for path in re.findall(r'"(/[^"]+)"', node_config):  # every path the node is given
            assert not any(Path(path).resolve().is_relative_to(s) for s in server_side), path
    # Execute
    cluster.submit(settings.to_config())
    rc = cluster.wait_run(240)
    # Assert: the run completed; the server attached round-0001 in round 2 and sent the
    # final round-0002 after the last round
    assert rc == 0, cluster.tail()
    assert cluster.has_line("[fedrank] round 2/2"), cluster.tail()
    releases = cluster.run_dir / "releases"
    size_1 = sum(p.stat().st_size for p in (releases / "round-0001").iterdir())
    assert cluster.has_line(
        f"release round-0001 attached for 2 node(s), {size_1} bytes each"), cluster.tail()
    # node-1 refused the altered release: the server saw its old release round
    assert any(re.search(r"node \d+ did not install release round-0001 \(it reports release "
                         r"round 0", line) for line in cluster.lines), cluster.tail()
    assert cluster.has_line("final release round-0002 sent to 2 node(s)"), cluster.tail()
    assert cluster.has_line("final release round-0002 installed on 2/2 node(s)"), cluster.tail()
    # each node installed the server's signed release, byte for byte, in its own state dir
    final = releases / "round-0002"
    for name in NODES:
        store = ReleaseStore(cluster.root / "nodes" / name)
        assert store.current_version() == "round-0002", cluster.node_log(name)[-3000:]
        current = store.current()
        assert current is not None
        for file in (MANIFEST_FILE, SIGNATURE_FILE, MODEL_FILE):
            assert (current / file).read_bytes() == (final / file).read_bytes(), (name, file)
        verify_release(current, load_public_key(node_dirs / name / "server-signing.pub"))
    # node-0 installed round-0001 too; node-1 never did (it refused the altered copy)
    assert (cluster.root / "nodes" / "node-0" / "releases" / "round-0001").is_dir()
    assert not (cluster.root / "nodes" / "node-1" / "releases" / "round-0001").exists()
    log_1 = cluster.node_log("node-1")
    assert "node node-1 refused the release received over Flower" in log_1, log_1[-3000:]
    assert "head.onnx has sha256" in log_1, log_1[-3000:]
    assert "refused the release" not in cluster.node_log("node-0")
    # node-1 trained in both rounds all the same
    assert [e["round"] for e in cluster.ledger("node-1")] == [1, 2]
