"""Server releases every N rounds; nodes install them from their own folder with their own
pinned key (client.releases), choosing the highest verified round."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.node import NodeSettings
from client.node import install_latest_release as node_install
from client.releases import install_latest_release
from server.releases import ReleasePublisher, public_key_path
from shared_model.data import DEFAULT_WANDS_DIR
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.release import (
    MANIFEST_FILE,
    MODEL_FILE,
    KeyPermissionError,
    ReleaseError,
    ReleaseStore,
    load_public_key,
    load_verified_release,
    signing_key_dir,
    verify_release,
    write_public_key,
    write_release,
)
from shared_model.settings import RunSettings
from shared_model.state import head_state


def _publish(run_dir: Path, rounds: list[int]) -> ReleasePublisher:
    publisher = ReleasePublisher(run_dir, every=1, head_config=HeadConfig())
    for rnd in rounds:
        publisher.maybe_publish(rnd, head_state(RankerHead()), metrics={}, epsilon_per_node={})
    return publisher


def _install(release_dir: Path, key: Path, state: Path) -> float:
    return install_latest_release(release_dir=release_dir, release_key=key, state_dir=state,
                                  node_name="node-0")


def test_release_every_two_rounds_is_signed_and_installed_by_a_node(tmp_path: Path) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    publisher = ReleasePublisher(run_dir, every=2, head_config=HeadConfig())
    arrays = head_state(RankerHead())
    # Execute
    skipped = publisher.maybe_publish(1, arrays, metrics={"ndcg@10": 0.5}, epsilon_per_node={})
    written = publisher.maybe_publish(
        2, arrays, metrics={"ndcg@10": 0.6}, epsilon_per_node={"node-0": 0.4}
    )
    # the node pinned the public key at set-up and reads its own copy of the releases
    pinned = tmp_path / "node-setup" / "server-signing.pub"
    pinned.parent.mkdir()
    shutil.copy(public_key_path(run_dir), pinned)
    installed_round = _install(run_dir / "releases", pinned, tmp_path / "node")
    # Assert
    assert skipped is None and written == run_dir / "releases" / "round-0002"
    manifest = verify_release(written, load_public_key(pinned))
    assert manifest.round == 2 and manifest.epsilon_per_node == {"node-0": 0.4}
    assert installed_round == 2.0


def test_final_round_is_always_released_and_verifies(tmp_path: Path) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    publisher = ReleasePublisher(run_dir, every=0, head_config=HeadConfig(), final_round=3)
    arrays = head_state(RankerHead())
    # Execute
    written = [
        publisher.maybe_publish(rnd, arrays, metrics={}, epsilon_per_node={})
        for rnd in (1, 2, 3)
    ]
    # Assert: only the final round, signed with the run's key (kept outside the run dir)
    assert written[:2] == [None, None]
    assert written[2] == run_dir / "releases" / "round-0003"
    assert verify_release(written[2], load_public_key(public_key_path(run_dir))).round == 3
    with pytest.raises(ValueError, match="final_round"):
        ReleasePublisher(run_dir, every=0, head_config=HeadConfig(), final_round=0)


def test_signing_key_lives_outside_the_run_dir_private(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _publish(run_dir, [1])
    key_dir = signing_key_dir(run_dir)
    key = key_dir / "server-signing.pem"
    assert not key.resolve().is_relative_to(run_dir.resolve())
    assert [p.name for p in run_dir.rglob("*.pem")] == []  # nothing secret in the run dir
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    # a reused key that group/others can read is refused, never used
    key.chmod(0o644)
    with pytest.raises(KeyPermissionError, match="readable by group/others"):
        ReleasePublisher(run_dir, every=1, head_config=HeadConfig())


def test_planted_and_foreign_releases_never_block_or_replace_the_genuine_one(
    tmp_path: Path,
) -> None:
    # Prepare: genuine releases for rounds 1-2 in the node's release source, its pinned key
    run_dir = tmp_path / "run"
    _publish(run_dir, [1, 2])
    source = run_dir / "releases"
    key = public_key_path(run_dir)
    state = tmp_path / "node"
    other = Ed25519PrivateKey.generate()
    # planted: a copy of round 1 as round-zzzz, another key's round-9999, a symlinked folder
    shutil.copytree(source / "round-0001", source / "round-zzzz")
    write_release(source / "round-9999", head=RankerHead(), version="round-9999", round=9999,
                  epsilon_per_node={}, metrics={}, signing_key=other)
    os.symlink(source / "round-0002", source / "round-0500")
    # Execute / Assert: the highest *verified* round is installed
    assert _install(source, key, state) == 2.0
    assert ReleaseStore(state).current_version() == "round-0002"
    # a newer genuine release is still picked up (the planted ones do not block it)
    ReleasePublisher(run_dir, every=1, head_config=HeadConfig()).maybe_publish(
        3, head_state(RankerHead()), metrics={}, epsilon_per_node={})
    assert _install(source, key, state) == 3.0
    # Bar: a release signed by another key, placed in the node's release source as the newest
    # round, is refused and the node keeps its last good release
    write_release(source / "round-0004", head=RankerHead(), version="round-0004", round=4,
                  epsilon_per_node={}, metrics={}, signing_key=other)
    assert _install(source, key, state) == 3.0
    assert ReleaseStore(state).current_version() == "round-0003"
    verify_release(ReleaseStore(state).current(), load_public_key(key))  # type: ignore[arg-type]
    # ... and so is one whose key was swapped next to it (the node's key is its own)
    write_public_key(other, source / "server-signing.pub")
    assert _install(source, key, state) == 3.0


def test_release_files_are_read_without_following_symlinks_and_capped(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _publish(run_dir, [1])
    release = run_dir / "releases" / "round-0001"
    public = load_public_key(public_key_path(run_dir))
    manifest, files = load_verified_release(release, public)
    assert set(files) >= {MANIFEST_FILE, MODEL_FILE} and manifest.round == 1
    with pytest.raises(ReleaseError, match="larger than"):
        load_verified_release(release, public, max_file_bytes=10)
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((release / MODEL_FILE).read_bytes())
    (release / MODEL_FILE).unlink()
    os.symlink(outside, release / MODEL_FILE)
    with pytest.raises(ReleaseError, match="not a regular file"):
        load_verified_release(release, public)
    assert _install(run_dir / "releases", public_key_path(run_dir), tmp_path / "node") == 0.0


def test_deployed_node_never_takes_releases_or_key_from_the_run_config(tmp_path: Path) -> None:
    # The server's run config names run-dir; an attacker-signed release with a swapped key
    # sits in it. A deployed node (state in its own folder) ignores both.
    run_dir = tmp_path / "run"
    _publish(run_dir, [1])
    node = NodeSettings(
        name="node-0", data_path=tmp_path / "x.parquet", state_dir=tmp_path / "node",
        ledger_dir=tmp_path / "ledger", catalog_dir=DEFAULT_WANDS_DIR,
    )
    assert node_install(node, RunSettings(run_dir=str(run_dir))) == 0.0
    assert ReleaseStore(tmp_path / "node").current_version() is None


def test_simulated_node_installs_from_the_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _publish(run_dir, [1])
    node = NodeSettings(
        name="node-0", data_path=tmp_path / "x.parquet", state_dir=run_dir / "nodes" / "node-0",
        ledger_dir=tmp_path / "ledger", catalog_dir=DEFAULT_WANDS_DIR,
    )
    assert node_install(node, RunSettings(run_dir=str(run_dir))) == 1.0
    (run_dir / "releases" / "round-0001" / MODEL_FILE).write_bytes(b"tampered")
    assert node_install(node, RunSettings(run_dir=str(run_dir))) == 1.0  # kept
