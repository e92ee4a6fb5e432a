"""Tests for shared_model.onnx_encoder: MiniLM exported to ONNX, run in onnxruntime.

The graph is exported once for the module, into a temporary folder (``onnx_dir``); the torch
MiniLM it is compared with is loaded once too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared_model import onnx_encoder as onnx_module
from shared_model.encoder import EMBEDDING_DIM, MiniLMEncoder, model_fingerprint
from shared_model.features import FeatureBuilder
from shared_model.onnx_encoder import OnnxMiniLMEncoder, onnx_model_path
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.release import write_release
from shared_model.scoring import DeviceRanker, top_by_bm25
from shared_model.state import head_state, load_head_state

TEXTS = [
    "modern blue velvet accent chair",
    "a comfortable sofa",
    "",  # only [CLS] [SEP]
    "   ",
    "Ünïcödé café – naïve 北京 🛋️",
    "x " * 500,  # past max_length: truncated
    "outdoor patio dining set with 6 chairs and umbrella hole " * 3,
]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def onnx_encoder(onnx_dir: Path) -> OnnxMiniLMEncoder:
    """Exported here, once for the module."""
    return OnnxMiniLMEncoder(cache_dir=onnx_dir)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


@pytest.fixture(scope="module")
def builder(request: pytest.FixtureRequest) -> FeatureBuilder:
    return request.getfixturevalue("wands_builder")


def test_export_is_cached_under_the_fingerprint(onnx_encoder, onnx_dir):
    assert onnx_encoder.exported
    assert onnx_encoder.fingerprint == model_fingerprint(onnx_encoder.model_dir)
    assert onnx_encoder.onnx_path == onnx_model_path(onnx_dir, onnx_encoder.fingerprint)
    assert onnx_encoder.fingerprint in onnx_encoder.onnx_path.name
    # Written atomically: only the final file and its recorded hash are left behind.
    assert sorted(p.name for p in onnx_dir.iterdir()) == [
        onnx_encoder.onnx_path.name, onnx_encoder.onnx_path.name + ".sha256"
    ]


def test_second_construction_reuses_the_export(onnx_encoder, onnx_dir, monkeypatch):
    path = onnx_encoder.onnx_path
    before = path.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the graph was cached")

    monkeypatch.setattr(onnx_module, "export_minilm_onnx", no_export)
    again = OnnxMiniLMEncoder(cache_dir=onnx_dir)
    assert not again.exported and again.onnx_path == path
    assert path.stat().st_mtime_ns == before
    np.testing.assert_array_equal(again.encode(TEXTS[:2]), onnx_encoder.encode(TEXTS[:2]))


def test_embeddings_equal_torch(onnx_encoder, minilm):
    expected = minilm.encode(TEXTS)
    batched = onnx_encoder.encode(TEXTS)  # one padded batch
    singles = np.stack([onnx_encoder.encode([t])[0] for t in TEXTS])
    for got in (batched, singles):
        assert got.shape == (len(TEXTS), EMBEDDING_DIM) and got.dtype == np.float32
        assert np.abs(got - expected).max() <= 1e-5
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Truncation: anything past max_length tokens is ignored, as in torch.
    np.testing.assert_allclose(
        onnx_encoder.encode(["x " * 500])[0], onnx_encoder.encode(["x " * 126])[0], atol=1e-6
    )
    assert onnx_encoder.encode([]).shape == (0, EMBEDDING_DIM)


def test_batches_across_batch_size(onnx_dir, minilm):
    small = OnnxMiniLMEncoder(cache_dir=onnx_dir, batch_size=3, max_length=16)
    torch16 = MiniLMEncoder(batch_size=3, max_length=16)
    assert np.abs(small.encode(TEXTS) - torch16.encode(TEXTS)).max() <= 1e-5


def test_arguments_checked(onnx_dir):
    with pytest.raises(ValueError, match="max_length"):
        OnnxMiniLMEncoder(cache_dir=onnx_dir, max_length=1024)
    with pytest.raises(ValueError, match="batch_size"):
        OnnxMiniLMEncoder(cache_dir=onnx_dir, batch_size=0)


def test_device_ranker_ranks_as_with_torch(onnx_encoder, builder, tmp_path):
    head = RankerHead(HeadConfig(hidden_dim=8))
    rng = np.random.default_rng(0)
    state = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in head_state(head).items()}
    load_head_state(head, state)
    release = write_release(
        tmp_path / "r",
        head=head,
        version="v1",
        round=1,
        epsilon_per_node={},
        metrics={},
        signing_key=Ed25519PrivateKey.generate(),
    )
    with_onnx = DeviceRanker(release, builder, query_encoder=onnx_encoder)
    with_torch = DeviceRanker(release, builder, query_encoder="torch")
    assert with_onnx.query_encoder is onnx_encoder and with_torch.query_encoder is None
    for index in (0, 9, 23, 39):
        text = builder.data.queries[builder.data.query_ids[index]].text
        # Texts that are not in the embedding cache, so the encoders really run.
        for query in (f"{text} ", f"cheap {text} for home"):
            ids = top_by_bm25(builder, query, 100)
            expected = with_torch.rank(query, ids, top=10)
            got = with_onnx.rank(query, ids, top=10)
            assert [p for p, _ in got] == [p for p, _ in expected], query
            np.testing.assert_allclose(
                with_onnx.scores(query, ids), with_torch.scores(query, ids), atol=1e-4
            )
