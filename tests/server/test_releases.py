"""Server releases every N rounds; nodes install them with their own pinned key
(client.releases): from their own folder (highest verified round) or, by default, from the
release carried in Flower messages (server.releases.ReleaseCarrier / deliver_release)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from client.node import NodeSettings
from client.node import install_latest_release as node_install
from client.releases import (
    INCOMING_DIR,
    RELEASE_RECORD,
    install_latest_release,
    install_received_release,
    tamper_spec,
    unpack_release_record,
)
from server.releases import (
    ReleaseCarrier,
    ReleasePublisher,
    deliver_release,
    public_key_path,
    record_bytes,
)
from shared_model.data import DEFAULT_WANDS_DIR
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.release import (
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
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



# -- releases carried in Flower messages ---------------------------------------------------



@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's Message needs the identity a ServerApp process has."""
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    yield


def _wire(msg: Message) -> Message:
    """The message as the node gets it: serialized to Flower's protobuf and parsed back."""
    return message_from_proto(message_to_proto(msg))


def _sent(record: ConfigRecord) -> Message:
    msg = Message(RecordDict({RELEASE_RECORD: record}), dst_node_id=7,
                  message_type="query.install_release")
    return _wire(msg)


def _receive(msg: Message, key: Path | None, state: Path, tamper: int | None = None) -> float:
    return install_received_release(msg.content[RELEASE_RECORD], release_key=key,
                                    state_dir=state, node_name="node-0", tamper_round=tamper)


def _server_with_releases(tmp_path: Path, rounds: list[int]) -> tuple[ReleasePublisher, Path]:
    """A run that published ``rounds``; the node's pinned copy of the key in its own folder."""
    publisher = _publish(tmp_path / "server" / "run", rounds)
    pinned = tmp_path / "node-setup" / "server-signing.pub"
    pinned.parent.mkdir()
    shutil.copy(public_key_path(publisher.run_dir), pinned)
    return publisher, pinned


def _record_of(publisher: ReleasePublisher) -> ConfigRecord:
    newest = publisher.newest()
    assert newest is not None
    return newest[1]


def test_node_installs_the_release_from_a_flower_message_without_the_servers_disk(
    tmp_path: Path, task_identity: None,
) -> None:
    # Prepare: the server published rounds 1 and 2; the node has only its pinned key
    publisher, pinned = _server_with_releases(tmp_path, [1, 2])
    state = tmp_path / "node-state"
    server_release = publisher.run_dir / "releases" / "round-0002"
    # Execute: the newest release, serialized as Flower sends it, then installed
    record = _record_of(publisher)
    installed = _receive(_sent(record), pinned, state)
    # Assert: the node's copy is the server's release, byte for byte, and verifies
    assert installed == 2.0
    store = ReleaseStore(state)
    assert store.current_version() == "round-0002"
    current = store.current()
    assert current is not None and not current.is_relative_to(publisher.run_dir)
    for name in (MANIFEST_FILE, SIGNATURE_FILE, MODEL_FILE):
        assert (current / name).read_bytes() == (server_release / name).read_bytes()
    verify_release(current, load_public_key(pinned))
    assert os.listdir(state / INCOMING_DIR) == []  # the received copy is cleaned up
    # the record carries exactly the release's files
    assert record_bytes(record) == sum(p.stat().st_size for p in server_release.iterdir())
    # receiving the same release again changes nothing
    assert _receive(_sent(record), pinned, state) == 2.0


def _flip(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def _altered(record: ConfigRecord, change: Callable[[dict[str, bytes]], dict[str, bytes]]
             ) -> ConfigRecord:
    files = change(unpack_release_record(record))
    return ConfigRecord({"names": list(files), "blobs": list(files.values())})


def _rewrite_manifest(files: dict[str, bytes]) -> dict[str, bytes]:
    manifest = json.loads(files[MANIFEST_FILE])
    manifest["round"] = 99  # a newer-looking round, signature unchanged
    return {**files, MANIFEST_FILE: json.dumps(manifest).encode()}


ALTERATIONS: dict[str, tuple[Callable[[dict[str, bytes]], dict[str, bytes]], str]] = {
    "model byte flipped": (lambda f: {**f, MODEL_FILE: _flip(f[MODEL_FILE])}, "sha256"),
    "manifest rewritten": (_rewrite_manifest, "does not verify"),
    "signature flipped": (lambda f: {**f, SIGNATURE_FILE: _flip(f[SIGNATURE_FILE])},
                          "does not verify"),
    "signature dropped": (lambda f: {k: v for k, v in f.items() if k != SIGNATURE_FILE},
                          "unsigned"),
    "model dropped": (lambda f: {k: v for k, v in f.items() if k != MODEL_FILE},
                      "listed in the manifest but missing"),
    "file added": (lambda f: {**f, "extra.bin": b"x"}, "not listed in the manifest"),
}


@pytest.mark.parametrize("alteration", sorted(ALTERATIONS))
def test_release_altered_in_transit_is_refused_and_the_last_good_one_kept(
    tmp_path: Path, task_identity: None, alteration: str, caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the node installed round 1 over Flower; round 2 is published
    publisher, pinned = _server_with_releases(tmp_path, [1])
    state = tmp_path / "node-state"
    assert _receive(_sent(_record_of(publisher)), pinned, state) == 1.0
    publisher.maybe_publish(2, head_state(RankerHead()), metrics={}, epsilon_per_node={})
    change, reason = ALTERATIONS[alteration]
    # Execute: round 2 arrives altered
    with caplog.at_level(logging.WARNING, logger="fedrank.node"):
        installed = _receive(_sent(_altered(_record_of(publisher), change)), pinned, state)
    # Assert: refused with the reason logged; round 1 still current and intact
    assert installed == 1.0
    assert ReleaseStore(state).current_version() == "round-0001"
    assert not (state / "releases" / "round-0002").exists()
    assert not (state / "releases" / "round-0099").exists()
    verify_release(ReleaseStore(state).current(), load_public_key(pinned))  # type: ignore[arg-type]
    refusals = [r.getMessage() for r in caplog.records if "refused the release" in r.getMessage()]
    assert len(refusals) == 1 and reason in refusals[0], refusals
    assert os.listdir(state / INCOMING_DIR) == []
    # the genuine release still installs afterwards
    assert _receive(_sent(_record_of(publisher)), pinned, state) == 2.0


def test_release_signed_by_another_key_or_with_no_pinned_key_is_not_installed(
    tmp_path: Path, task_identity: None, caplog: pytest.LogCaptureFixture,
) -> None:
    publisher, pinned = _server_with_releases(tmp_path, [1])
    record = _record_of(publisher)
    other = tmp_path / "other.pub"
    write_public_key(Ed25519PrivateKey.generate(), other)
    with caplog.at_level(logging.WARNING, logger="fedrank.node"):
        assert _receive(_sent(record), other, tmp_path / "a") == 0.0
        assert _receive(_sent(record), None, tmp_path / "b") == 0.0
        assert _receive(_sent(record), tmp_path / "missing.pub", tmp_path / "c") == 0.0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "does not verify" in text and "pins no release key" in text
    assert "missing.pub" in text
    for name in "abc":
        assert ReleaseStore(tmp_path / name).current_version() is None


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (MetricRecord({"names": 1.0}), "expected a ConfigRecord"),
        (ConfigRecord({"names": ["a"]}), "has keys"),
        (ConfigRecord({"names": "a", "blobs": [b"x"]}), "must be a list of str"),
        (ConfigRecord({"names": ["a"], "blobs": ["x"]}), "must be a list of bytes"),
        (ConfigRecord({"names": ["a", "b"], "blobs": [b"x"]}), "2 names but 1 blobs"),
        (ConfigRecord({"names": ["../etc"], "blobs": [b"x"]}), "bad file name '../etc'"),
        (ConfigRecord({"names": [".hidden"], "blobs": [b"x"]}), "bad file name '.hidden'"),
        (ConfigRecord({"names": ["a", "a"], "blobs": [b"x", b"y"]}), "appears twice"),
        (ConfigRecord({"names": [SIGNATURE_FILE], "blobs": [b"x" * 2000]}), "over the 1024"),
        (ConfigRecord({"names": [], "blobs": []}), "0 files"),
    ],
)
def test_malformed_release_records_are_refused_naming_the_bad_value(
    record: Any, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ReleaseError, match=message.replace("(", r"\(").replace(".", r"\.")):
        unpack_release_record(record)
    # ... and the install path refuses them without touching the node's releases
    key = tmp_path / "k.pub"
    write_public_key(Ed25519PrivateKey.generate(), key)
    assert install_received_release(record, release_key=key, state_dir=tmp_path / "s",
                                    node_name="n") == 0.0
    assert not (tmp_path / "s" / "releases").exists()


def test_tamper_hook_alters_only_the_named_round_and_rejects_bad_values(tmp_path: Path) -> None:
    publisher, pinned = _server_with_releases(tmp_path, [1])
    record = _record_of(publisher)
    assert tamper_spec({}) is None and tamper_spec({"tamper-release": "2"}) == 2
    with pytest.raises(ValueError, match="'tamper-release' must be a round >= 1, got 'x'"):
        tamper_spec({"tamper-release": "x"})
    # the hook for another round leaves the release alone; for its round the node refuses
    assert install_received_release(record, release_key=pinned, state_dir=tmp_path / "a",
                                    node_name="n", tamper_round=2) == 1.0
    assert install_received_release(record, release_key=pinned, state_dir=tmp_path / "b",
                                    node_name="n", tamper_round=1) == 0.0


# -- the server side: which nodes get the release ----------------------------------------

NODES = (11, 22)


class _Nodes:
    """A grid stand-in for configure_train (FedAvg only asks it for node ids)."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)


def _reply(to: Message, release_round: float) -> Message:
    to.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    reply = Message(RecordDict({
        "arrays": ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
        "metrics": MetricRecord({"num-examples": 1.0, "steps": 1.0, "epsilon": 0.1,
                                 "release-round": release_round}),
    }), reply_to=to)
    reply.metadata.__dict__["_src_node_id"] = to.metadata.dst_node_id
    return reply


def test_carrier_attaches_the_newest_release_only_to_nodes_that_lack_it(
    tmp_path: Path, task_identity: None, caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    publisher = ReleasePublisher(run_dir, every=1, head_config=HeadConfig())
    carrier = ReleaseCarrier(FedAvg(min_available_nodes=2, min_train_nodes=2), publisher)
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})

    def configure(rnd: int) -> dict[int, Message]:
        msgs = carrier.configure_train(rnd, arrays, ConfigRecord({}), _Nodes())  # type: ignore[arg-type]
        return {m.metadata.dst_node_id: m for m in msgs}

    # Execute / Assert: round 1, nothing published: nothing attached
    first = configure(1)
    assert all(RELEASE_RECORD not in m.content for m in first.values())
    carrier.aggregate_train(1, [_reply(m, 0.0) for m in first.values()])
    publisher.maybe_publish(1, head_state(RankerHead()), metrics={}, epsilon_per_node={})
    # round 2: both lack round 1; each message has its own content (FedAvg shares one)
    second = configure(2)
    assert all(RELEASE_RECORD in m.content for m in second.values())
    assert second[11].content is not second[22].content
    sent = _wire(second[11]).content[RELEASE_RECORD]
    installed = install_received_release(
        sent, release_key=public_key_path(run_dir), state_dir=tmp_path / "n11", node_name="n11")
    assert installed == 1.0
    # node 22 refused it (reports 0): the server says so and sends it again
    with caplog.at_level(logging.WARNING, logger="fedrank.server"):
        carrier.aggregate_train(2, [_reply(second[11], 1.0), _reply(second[22], 0.0)])
    assert any("node 22 did not install release round-0001" in r.getMessage()
               for r in caplog.records)
    third = configure(3)
    assert RELEASE_RECORD not in third[11].content and RELEASE_RECORD in third[22].content
    assert [d["nodes"] for d in carrier.deliveries] == [[11, 22], [22]]
    assert carrier.deliveries[0]["bytes_per_node"] == record_bytes(sent)  # type: ignore[arg-type]
    # a resumed run (10 rounds done) names rounds as the run counts them
    carrier.round_offset = 10
    configure(4)
    assert carrier.deliveries[-1]["round"] == 14


class _InProcessGrid:
    """Hands each message, serialized and parsed, to fedrank's real ClientApp in-process."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        from client.app import app

        self.app = app
        self.contexts = contexts

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.__dict__["_src_node_id"] = 0
            nid = msg.metadata.dst_node_id
            reply = _wire(self.app(_wire(msg), self.contexts[nid]))
            reply.metadata.__dict__["_src_node_id"] = nid
            replies.append(reply)
        return replies


def test_final_release_is_delivered_to_each_node_through_the_client_app(
    tmp_path: Path, task_identity: None, caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the run's final release; node 1 pins the key, node 2 alters it in transit,
    # node 3 pins no key. Nothing a node uses lies under the server's run dir.
    publisher, pinned = _server_with_releases(tmp_path, [3])
    run = RunSettings(run_dir=str(publisher.run_dir))

    def context(nid: int, **extra: str) -> Context:
        node_config = {"node-name": f"node-{nid}", "data-path": str(tmp_path / "data"),
                       "state-dir": str(tmp_path / f"state-{nid}"), **extra}
        return Context(run_id=1, node_id=nid, node_config=node_config,  # type: ignore[arg-type]
                       state=RecordDict(), run_config=run.to_config())

    grid = _InProcessGrid({
        1: context(1, **{"release-key": str(pinned)}),
        2: context(2, **{"release-key": str(pinned), "tamper-release": "3"}),
        3: context(3),
    })
    carrier = ReleaseCarrier(FedAvg(), publisher)
    # Execute
    with caplog.at_level(logging.INFO, logger="fedrank.server"):
        answered = deliver_release(grid, carrier)  # type: ignore[arg-type]
    # Assert: node 1 installed round 3; 2 and 3 kept none; the server logged who lacks it
    assert answered == {1: 3.0, 2: 0.0, 3: 0.0}
    assert ReleaseStore(tmp_path / "state-1").current_version() == "round-0003"
    assert ReleaseStore(tmp_path / "state-2").current_version() is None
    assert ReleaseStore(tmp_path / "state-3").current_version() is None
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "final release round-0003 installed on 1/3 node(s); not on [2, 3]" in text
    # a second delivery goes only to the nodes that still lack it
    assert set(deliver_release(grid, carrier)) == {2, 3}  # type: ignore[arg-type]
