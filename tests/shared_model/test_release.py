"""Tests for shared_model.release: ONNX export, signed manifests, verification, ReleaseStore."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared_model.features import FEATURE_NAMES, NUM_FEATURES
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.release import (
    CURRENT_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    ReleaseError,
    ReleaseStore,
    generate_signing_key,
    load_public_key,
    load_signing_key,
    read_manifest,
    verify_release,
    write_public_key,
    write_release,
)
from shared_model.scoring import OnnxScorer
from shared_model.state import head_state, load_head_state


def random_head(hidden_dim: int = 0, seed: int = 0) -> RankerHead:
    """A head with random (not zero-shot) weights."""
    head = RankerHead(HeadConfig(hidden_dim=hidden_dim))
    rng = np.random.default_rng(seed)
    state = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in head_state(head).items()}
    load_head_state(head, state)
    return head


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def make_release(
    directory: Path,
    key: Ed25519PrivateKey,
    *,
    version: str = "v1",
    rnd: int = 1,
    head: RankerHead | None = None,
) -> Path:
    return write_release(
        directory,
        head=head or random_head(),
        version=version,
        round=rnd,
        epsilon_per_node={"node-0": 0.5, "node-1": 1.0},
        metrics={"ndcg@10": 0.61},
        signing_key=key,
    )


@pytest.fixture
def release(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    return make_release(tmp_path / "release", key)


# --- export -------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_dim", [0, 16])
@pytest.mark.parametrize("n", [1, 7, 300])
def test_onnx_scores_equal_torch_relevance(
    tmp_path: Path, key: Ed25519PrivateKey, hidden_dim: int, n: int
) -> None:
    head = random_head(hidden_dim, seed=hidden_dim + n)
    directory = make_release(tmp_path / "r", key, head=head)
    features = np.random.default_rng(n).normal(size=(n, NUM_FEATURES)).astype(np.float32)
    with torch.no_grad():
        expected = head.relevance(torch.from_numpy(features)).numpy()
    got = OnnxScorer(directory, key.public_key()).scores(features)
    assert got.shape == (n,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_onnx_graph_shape_and_empty_input(release: Path) -> None:
    model = onnx.load(release / MODEL_FILE)
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "features" and out.name == "scores"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == NUM_FEATURES
    scorer = OnnxScorer(release)
    assert scorer.scores(np.zeros((0, NUM_FEATURES), np.float32)).shape == (0,)
    with pytest.raises(ValueError, match="shape"):
        scorer.scores(np.zeros((3, NUM_FEATURES + 1), np.float32))


def test_export_leaves_head_untouched(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    head = random_head(8)
    head.train()
    before = head_state(head)
    make_release(tmp_path / "r", key, head=head)
    assert head.training
    for k, v in head_state(head).items():
        np.testing.assert_array_equal(v, before[k])


# --- manifest and signature ---------------------------------------------------------------


def test_release_layout_and_manifest(release: Path, key: Ed25519PrivateKey) -> None:
    assert sorted(p.name for p in release.iterdir()) == [MODEL_FILE, MANIFEST_FILE, SIGNATURE_FILE]
    raw = (release / MANIFEST_FILE).read_bytes()
    key.public_key().verify((release / SIGNATURE_FILE).read_bytes(), raw)
    obj = json.loads(raw)
    assert obj["version"] == "v1" and obj["round"] == 1
    assert obj["epsilon_per_node"] == {"node-0": 0.5, "node-1": 1.0}
    assert obj["metrics"] == {"ndcg@10": 0.61}
    assert obj["feature_names"] == list(FEATURE_NAMES)
    assert obj["head_config"]["num_features"] == NUM_FEATURES
    assert obj["created_at"].endswith("+00:00")
    digest = hashlib.sha256((release / MODEL_FILE).read_bytes()).hexdigest()
    assert obj["files"] == {MODEL_FILE: digest}
    manifest = verify_release(release, key.public_key())
    assert manifest == read_manifest(release)
    assert manifest.version == "v1" and manifest.files[MODEL_FILE] == digest
    # Nothing but the release is left next to it (the temp dir was renamed).
    assert [p.name for p in release.parent.iterdir()] == ["release"]


def test_write_release_refuses_bad_input(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    make_release(tmp_path / "r", key)
    with pytest.raises(FileExistsError):
        make_release(tmp_path / "r", key)
    for version in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="version"):
            make_release(tmp_path / "bad", key, version=version)
    with pytest.raises(ValueError, match="epsilon"):
        write_release(
            tmp_path / "bad",
            head=random_head(),
            version="v",
            round=0,
            epsilon_per_node={"n": float("nan")},
            metrics={},
            signing_key=key,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_tampered_manifest_is_refused(release: Path, key: Ed25519PrivateKey) -> None:
    path = release / MANIFEST_FILE
    path.write_bytes(path.read_bytes().replace(b'"node-0": 0.5', b'"node-0": 0.1'))
    with pytest.raises(ReleaseError, match="does not verify"):
        verify_release(release, key.public_key())


def test_tampered_onnx_is_refused(release: Path, key: Ed25519PrivateKey) -> None:
    path = release / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match=r"head\.onnx has sha256 .* tampered"):
        verify_release(release, key.public_key())
    with pytest.raises(ReleaseError, match="tampered"):
        OnnxScorer(release, key.public_key())


def test_wrong_key_is_refused(release: Path) -> None:
    with pytest.raises(ReleaseError, match="wrong key"):
        verify_release(release, Ed25519PrivateKey.generate().public_key())


def test_unsigned_release_is_refused(release: Path, key: Ed25519PrivateKey) -> None:
    (release / SIGNATURE_FILE).unlink()
    with pytest.raises(ReleaseError, match="unsigned"):
        verify_release(release, key.public_key())


def test_missing_manifest_is_refused(release: Path, key: Ed25519PrivateKey) -> None:
    (release / MANIFEST_FILE).unlink()
    with pytest.raises(ReleaseError, match="manifest.json is missing"):
        verify_release(release, key.public_key())


def test_extra_file_is_refused(release: Path, key: Ed25519PrivateKey) -> None:
    (release / "payload.py").write_text("print('hi')\n")
    with pytest.raises(ReleaseError, match="not listed in the manifest: payload.py"):
        verify_release(release, key.public_key())


def test_listed_file_missing_is_refused(release: Path, key: Ed25519PrivateKey) -> None:
    (release / MODEL_FILE).unlink()
    with pytest.raises(ReleaseError, match="head.onnx is listed in the manifest but missing"):
        verify_release(release, key.public_key())


def test_signed_but_malformed_manifest_is_refused(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    release = make_release(tmp_path / "r", key)
    obj = json.loads((release / MANIFEST_FILE).read_bytes())
    obj["files"]["../etc/passwd"] = "0" * 64
    raw = json.dumps(obj).encode()
    (release / MANIFEST_FILE).write_bytes(raw)
    (release / SIGNATURE_FILE).write_bytes(key.sign(raw))
    with pytest.raises(ReleaseError, match="bad file name"):
        verify_release(release, key.public_key())


# --- keys ---------------------------------------------------------------------------------


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.pem"
    key = generate_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_signing_key(path)
    msg = b"release"
    key.public_key().verify(loaded.sign(msg), msg)
    with pytest.raises(FileExistsError):
        generate_signing_key(path)
    assert load_signing_key(path).sign(msg) == key.sign(msg)  # not overwritten
    pub_path = write_public_key(key, tmp_path / "keys" / "public.pem")
    public = load_public_key(pub_path)
    public.verify(key.sign(msg), msg)
    assert write_public_key(public, tmp_path / "p2.pem").read_bytes() == pub_path.read_bytes()
    with pytest.raises(ReleaseError, match="public key"):
        load_public_key(path)
    with pytest.raises(ReleaseError, match="private key"):
        load_signing_key(pub_path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["public.pem", "signing.pem"]


# --- ReleaseStore -------------------------------------------------------------------------


def test_store_installs_and_keeps_last_good(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    store = ReleaseStore(tmp_path / "node")
    assert store.current() is None
    v1 = make_release(tmp_path / "c1", key, version="v1", rnd=1)
    manifest = store.install(v1, key.public_key())
    assert manifest.version == "v1"
    current = store.current()
    assert current == tmp_path / "node" / "releases" / "v1"
    verify_release(current, key.public_key())
    assert json.loads((tmp_path / "node" / CURRENT_FILE).read_text())["version"] == "v1"

    bad = make_release(tmp_path / "c2", key, version="v2", rnd=2)
    (bad / MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(ReleaseError, match="sha256"):
        store.install(bad, key.public_key())
    wrong_key = make_release(tmp_path / "c3", Ed25519PrivateKey.generate(), version="v3", rnd=3)
    with pytest.raises(ReleaseError, match="does not verify"):
        store.install(wrong_key, key.public_key())
    assert store.current() == current and store.current_version() == "v1"
    assert sorted(p.name for p in (tmp_path / "node" / "releases").iterdir()) == ["v1"]
    OnnxScorer(store.current(), key.public_key())  # still loads

    v4 = make_release(tmp_path / "c4", key, version="v4", rnd=4)
    store.install(v4, key.public_key())
    assert store.current() == tmp_path / "node" / "releases" / "v4"


def test_store_refuses_downgrade_and_version_reuse(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    store = ReleaseStore(tmp_path / "node")
    old = make_release(tmp_path / "old", key, version="v1", rnd=1)
    new = make_release(tmp_path / "new", key, version="v2", rnd=2)
    store.install(old, key.public_key())
    store.install(new, key.public_key())
    with pytest.raises(ReleaseError, match="downgrade"):
        store.install(old, key.public_key())
    assert store.current_version() == "v2"
    store.install(new, key.public_key())  # re-installing the same release is a no-op
    assert store.current_version() == "v2"
    other = make_release(tmp_path / "other", key, version="v2", rnd=3, head=random_head(seed=9))
    with pytest.raises(ReleaseError, match="already installed"):
        store.install(other, key.public_key())
    store.install(old, key.public_key(), allow_downgrade=True)
    assert store.current_version() == "v1"
    leftovers = [p.name for p in (tmp_path / "node").rglob("*") if ".tmp" in p.name]
    assert leftovers == []


# --- issue 16: score verifies by default; the cached ONNX encoder is hash-checked ----------


def test_score_refuses_an_unverified_release(release: Path) -> None:
    from typer.testing import CliRunner

    from fedrank.cli import _register, app

    _register()
    result = CliRunner().invoke(app, ["score", "--release", str(release), "--query", "chair"])
    assert result.exit_code == 2
    assert "refusing an unverified release" in result.output


def test_cached_onnx_encoder_is_hash_checked(tmp_path: Path) -> None:
    from shared_model.onnx_encoder import digest_path, read_checked

    path = tmp_path / "enc.onnx"
    path.write_bytes(b"graph")
    with pytest.raises(OSError):
        read_checked(path)  # no recorded hash: not trusted
    import hashlib

    digest_path(path).write_text(hashlib.sha256(b"graph").hexdigest() + "\n")
    path.chmod(0o644)
    digest_path(path).chmod(0o644)
    assert read_checked(path) == b"graph"
    path.write_bytes(b"evil graph")
    with pytest.raises(ValueError, match="sha256"):
        read_checked(path)
    path.write_bytes(b"graph")
    path.chmod(0o666)
    with pytest.raises(ValueError, match="writable"):
        read_checked(path)
