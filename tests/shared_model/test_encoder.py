"""Tests for shared_model.encoder with the real all-MiniLM-L6-v2 weights.

The model is loaded once for the module (``minilm`` fixture); cache tests hand that encoder to
``CachedEncoder`` or stub the loader out, so no test loads the weights a second time.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest

from shared_model import encoder as encoder_module
from shared_model.encoder import (
    EMBEDDING_DIM,
    CachedEncoder,
    EmbeddingCache,
    MiniLMEncoder,
    default_model_dir,
    model_fingerprint,
    text_key,
)

SOFA, COUCH = "a comfortable sofa", "a cozy couch"
UNRELATED = "quarterly corporate tax filing deadline"


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    """The real encoder, loaded once for this module."""
    return MiniLMEncoder()


class _NoModel:
    """Stands in for MiniLMEncoder where loading the model would be a bug."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("the model was loaded although every text was cached")


class _FakeEncoder:
    """Deterministic stand-in encoder with a chosen fingerprint; counts encoded texts."""

    def __init__(self, fingerprint: str, value: float) -> None:
        self.model_dir = default_model_dir()
        self.fingerprint = fingerprint
        self.value = value
        self.encoded: list[str] = []

    def encode(self, texts):
        self.encoded.extend(texts)
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        out[:, 0] = self.value
        return out


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_paraphrase_scores_higher_than_unrelated(minilm):
    # Prepare
    texts = [SOFA, COUCH, UNRELATED]

    # Execute
    sofa, couch, unrelated = minilm.encode(texts)

    # Assert: a clear margin, not a coin flip.
    paraphrase, other = _cos(sofa, couch), _cos(sofa, unrelated)
    assert paraphrase > other + 0.3, (paraphrase, other)
    assert paraphrase > 0.6


def test_vectors_are_float32_unit_norm_dim_384(minilm):
    # Prepare
    texts = [SOFA, "", "x " * 500]  # empty text and one past max_length (truncated)

    # Execute
    vectors = minilm.encode(texts)

    # Assert
    assert vectors.shape == (3, EMBEDDING_DIM) == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_a_vector(minilm):
    # Prepare: alone, a sentence has no padding; batched with a long one it is padded.
    short, long = "oak bar stool", "a very long description of a solid oak counter height bar stool"

    # Execute
    alone = minilm.encode([short])[0]
    batched = minilm.encode([short, long])[0]

    # Assert: mean pooling masks the padding out.
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_cache_hit_returns_identical_vectors_without_loading_model(minilm, tmp_path, monkeypatch):
    # Prepare: fill a fresh cache through the real encoder.
    texts = [SOFA, COUCH, SOFA]
    first = CachedEncoder(minilm, cache_dir=tmp_path).encode(texts)
    monkeypatch.setattr(encoder_module, "MiniLMEncoder", _NoModel)

    # Execute: a new CachedEncoder with no encoder reads the same folder from disk.
    reader = CachedEncoder(cache_dir=tmp_path)
    second = reader.encode(texts)

    # Assert: byte-identical, two distinct texts stored, model never constructed.
    assert np.array_equal(first, second)
    assert len(reader.cache) == 2
    assert (tmp_path / minilm.fingerprint[:16] / "vectors.npy").is_file()
    assert reader._encoder is None


def test_cache_miss_does_load_model(minilm, tmp_path, monkeypatch):
    # Prepare: the same stub as above, so the hit test above cannot pass vacuously.
    CachedEncoder(minilm, cache_dir=tmp_path).encode([SOFA])
    monkeypatch.setattr(encoder_module, "MiniLMEncoder", _NoModel)
    reader = CachedEncoder(cache_dir=tmp_path)

    # Execute / Assert
    with pytest.raises(AssertionError, match="model was loaded"):
        reader.encode([SOFA, "a text nobody cached"])


def test_cache_key_depends_on_fingerprint(tmp_path):
    # Prepare: two models (fingerprints) sharing one cache folder.
    old = _FakeEncoder("a" * 64, value=1.0)
    new = _FakeEncoder("b" * 64, value=-1.0)

    # Execute
    old_vec = CachedEncoder(cast(MiniLMEncoder, old), cache_dir=tmp_path).encode([SOFA])
    new_vec = CachedEncoder(cast(MiniLMEncoder, new), cache_dir=tmp_path).encode([SOFA])

    # Assert: different keys, and the new model is never served the old model's vector.
    assert text_key(SOFA, "a" * 64) != text_key(SOFA, "b" * 64)
    assert text_key(SOFA, "a" * 64) == text_key(SOFA, "a" * 64)
    assert new.encoded == [SOFA]
    assert old_vec[0, 0] == 1.0 and new_vec[0, 0] == -1.0
    _, missing = EmbeddingCache(tmp_path, "b" * 64).get([text_key(SOFA, "a" * 64)])
    assert missing == [0]


def test_fingerprint_is_stable_and_matches_encoder(minilm):
    # Execute
    again = model_fingerprint(default_model_dir())

    # Assert: sha256 hex, same as the loaded encoder's.
    assert again == minilm.fingerprint
    assert len(again) == 64 and int(again, 16) >= 0


@pytest.mark.parametrize(
    "missing", ["model.safetensors", "config.json", "tokenizer.json", "vocab.txt"]
)
def test_missing_model_file_raises_naming_it(tmp_path, missing):
    # Prepare: a model folder of links to the real files, less one.
    for src in default_model_dir().iterdir():
        if src.name != missing:
            (tmp_path / src.name).symlink_to(src)

    # Execute / Assert: both the fingerprint and the encoder refuse, naming the file.
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        model_fingerprint(tmp_path)
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        MiniLMEncoder(tmp_path)


def test_cached_fingerprint_is_recorded_and_follows_file_changes(tmp_path: Path) -> None:
    import json as _json
    import os as _os

    from shared_model.encoder import _FINGERPRINT_FILES, cached_model_fingerprint

    model = tmp_path / "model"
    model.mkdir()
    for name in _FINGERPRINT_FILES:
        (model / name).write_bytes(name.encode())
    cache = tmp_path / "cache"
    first = cached_model_fingerprint(model, cache)
    assert first == model_fingerprint(model)
    recorded = _json.loads((cache / "fingerprints.json").read_text())
    assert recorded[str(model.resolve())]["sha256"] == first
    assert cached_model_fingerprint(model, cache) == first  # from the record
    (model / "config.json").write_bytes(b"another model")
    st = (model / "config.json").stat()
    _os.utime(model / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = cached_model_fingerprint(model, cache)
    assert changed == model_fingerprint(model) != first


def test_node_feature_builder_is_reused_in_process_and_never_pickled(tmp_path: Path) -> None:
    # Prepare
    from shared_model import catalog
    from shared_model.data import DEFAULT_WANDS_DIR

    state = tmp_path / "state"
    catalog._IN_PROCESS.clear()  # as a fresh ClientApp process
    # Execute
    first = catalog.node_feature_builder(str(DEFAULT_WANDS_DIR), "", state)
    again = catalog.node_feature_builder(str(DEFAULT_WANDS_DIR), "", tmp_path / "x")
    # Assert: one builder per process, and nothing written (no pickle to load later)
    assert again is first
    assert not state.exists() and not (tmp_path / "x").exists()
