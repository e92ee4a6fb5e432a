"""Server releases every N rounds, picked up (verified) by nodes from the file drop."""

from __future__ import annotations

from pathlib import Path

from client.node import NodeSettings, install_latest_release
from server.releases import ReleasePublisher, public_key_path
from shared_model.data import DEFAULT_WANDS_DIR
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.release import load_public_key, verify_release
from shared_model.settings import RunSettings
from shared_model.state import head_state


def test_release_every_two_rounds_is_signed_and_installed_by_a_node(tmp_path: Path) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    publisher = ReleasePublisher(run_dir, every=2, head_config=HeadConfig())
    arrays = head_state(RankerHead())
    run = RunSettings(run_dir=str(run_dir))
    node = NodeSettings(
        name="node-0", data_path=tmp_path / "x.parquet", state_dir=tmp_path / "node",
        ledger_dir=tmp_path / "ledger", catalog_dir=DEFAULT_WANDS_DIR,
    )
    # Execute
    skipped = publisher.maybe_publish(1, arrays, metrics={"ndcg@10": 0.5}, epsilon_per_node={})
    written = publisher.maybe_publish(
        2, arrays, metrics={"ndcg@10": 0.6}, epsilon_per_node={"node-0": 0.4}
    )
    installed_round = install_latest_release(node, run)
    # Assert
    assert skipped is None and written == run_dir / "releases" / "round-0002"
    manifest = verify_release(written, load_public_key(public_key_path(run_dir)))
    assert manifest.round == 2 and manifest.epsilon_per_node == {"node-0": 0.4}
    assert installed_round == 2.0


def test_node_refuses_a_tampered_release_and_keeps_none(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    publisher = ReleasePublisher(run_dir, every=1, head_config=HeadConfig())
    release = publisher.maybe_publish(
        1, head_state(RankerHead()), metrics={}, epsilon_per_node={}
    )
    assert release is not None
    (release / "head.onnx").write_bytes(b"tampered")
    node = NodeSettings(
        name="node-0", data_path=tmp_path / "x.parquet", state_dir=tmp_path / "node",
        ledger_dir=tmp_path / "ledger", catalog_dir=DEFAULT_WANDS_DIR,
    )
    assert install_latest_release(node, RunSettings(run_dir=str(run_dir))) == 0.0
