"""all-MiniLM-L6-v2 in onnxruntime: the fast query encoder of the on-device path.

:class:`OnnxMiniLMEncoder` gives the embeddings :class:`~shared_model.encoder.MiniLMEncoder`
gives (mean pooling over tokens and L2 normalisation are part of the ONNX graph; tested equal
within 1e-5) but runs in onnxruntime on one thread with the ``tokenizers`` fast tokenizer,
without torch or transformers once the graph exists.

The graph is exported from the bundled weights once (torch's TorchScript exporter), its
attention/layer-norm subgraphs fused with onnxruntime's BERT optimizer, checked against torch
on probe texts, and cached on disk, written atomically and keyed by the model fingerprint and
by :data:`EXPORT_RECIPE`, so a different model or a changed recipe never reuses a stale file.
The sha256 of the export is recorded next to it (``.onnx.sha256``); a cached file whose bytes
do not match, or that group/others could write, is not used (it is exported again), and the
session is built from the very bytes that were checked.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shared_model.encoder import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_LENGTH,
    EMBEDDING_DIM,
    default_cache_dir,
    default_model_dir,
    model_fingerprint,
)

__all__ = [
    "EXPORT_RECIPE",
    "OnnxMiniLMEncoder",
    "default_onnx_cache_dir",
    "export_minilm_onnx",
    "onnx_model_path",
    "shared_onnx_encoder",
]

# Bump when the export changes (opset, pooling, fusion, ...): it is part of the cache key.
EXPORT_RECIPE = "pooled-l2-opset17-bertfused-v1"
ONNX_OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "embedding"
MAX_POSITIONS = 512  # BERT position embeddings
# An export whose embeddings differ from torch's by more than this is refused.
EXPORT_TOLERANCE = 1e-4
_PROBE_TEXTS = (
    "modern blue velvet accent chair",
    "",
    "a comfortable sofa for a small living room with a pull-out bed " * 4,
)


def default_onnx_cache_dir() -> Path:
    """``default_cache_dir().parent / "onnx"`` (next to the embedding cache)."""
    return default_cache_dir().parent / "onnx"


def onnx_model_path(cache_dir: Path, fingerprint: str) -> Path:
    """Where the export of the model with ``fingerprint`` lives in ``cache_dir``."""
    recipe = hashlib.sha256(EXPORT_RECIPE.encode()).hexdigest()[:8]
    return Path(cache_dir) / f"all-minilm-l6-v2-{fingerprint}-{recipe}.onnx"


def digest_path(onnx_path: Path) -> Path:
    """The sidecar holding the sha256 of a cached export (written with it)."""
    return Path(onnx_path).with_name(Path(onnx_path).name + ".sha256")


def _write_digest(onnx_path: Path) -> None:
    digest = hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()
    fd, tmp = tempfile.mkstemp(dir=Path(onnx_path).parent, prefix=".digest-")
    with os.fdopen(fd, "w") as fh:
        fh.write(digest + "\n")
    os.replace(tmp, digest_path(onnx_path))


def read_checked(onnx_path: Path) -> bytes:
    """The cached export's bytes, read once, if they match the sha256 recorded at export time
    and neither file can be written by group/others; ``ValueError`` otherwise."""
    onnx_path = Path(onnx_path)
    for path in (onnx_path, digest_path(onnx_path)):
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file")
        if st.st_mode & 0o022:
            raise ValueError(f"{path}: writable by group/others")
    expected = digest_path(onnx_path).read_text().strip()
    data = onnx_path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ValueError(f"{onnx_path}: sha256 {actual[:16]} != recorded {expected[:16]}")
    return data


def _session(path: Path | bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def _tokenizer(model_dir: Path, max_length: int):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # tokenizer.json pads every text to 128 tokens; pad a batch to its longest text instead,
    # as the transformers tokenizer does with padding=True (same ids, tested).
    tokenizer.enable_truncation(max_length=max_length)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tokenizer


def _feeds(tokenizer, texts: Sequence[str], names: Sequence[str]) -> dict[str, np.ndarray]:
    encodings = tokenizer.encode_batch(list(texts))
    arrays = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    return {name: arrays[name] for name in names}


def export_minilm_onnx(model_dir: Path, destination: Path) -> Path:
    """Export MiniLM with pooling + L2 normalisation to ``destination``, atomically.

    The graph takes ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64
    ``[batch, sequence]``, both axes dynamic) and returns ``embedding`` float32 ``[batch, 384]``.
    It is checked against the torch model on probe texts before it is moved into place;
    ``RuntimeError`` when it differs by more than :data:`EXPORT_TOLERANCE`.
    """
    import warnings

    import torch
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model_dir = Path(model_dir)
    destination = Path(destination)
    # Eager attention: the plain softmax(QK^T)V pattern that onnxruntime's optimizer fuses.
    model = AutoModel.from_pretrained(
        str(model_dir), local_files_only=True, attn_implementation="eager"
    )
    model.eval()

    class Pooled(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    wrapper = Pooled(model).eval()
    tokenizer = _tokenizer(model_dir, DEFAULT_MAX_LENGTH)
    probe = _feeds(tokenizer, _PROBE_TEXTS, INPUT_NAMES)  # padded batch: masks are exercised
    example = tuple(torch.from_numpy(probe[name]) for name in INPUT_NAMES)
    with torch.inference_mode():
        expected = wrapper(*example).numpy()

    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, raw_name = tempfile.mkstemp(dir=destination.parent, prefix=".export-", suffix=".onnx")
    os.close(fd)
    fd, fused_name = tempfile.mkstemp(dir=destination.parent, prefix=".fused-", suffix=".onnx")
    os.close(fd)
    try:
        axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer notes
            torch.onnx.export(
                wrapper,
                example,
                raw_name,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes={**axes, OUTPUT_NAME: {0: "batch"}},
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        final_name = raw_name
        try:
            from onnxruntime.transformers import optimizer

            config = model.config
            fused = optimizer.optimize_model(
                raw_name,
                model_type="bert",
                num_heads=config.num_attention_heads,
                hidden_size=config.hidden_size,
                opt_level=0,  # fusions only; the session applies its own optimisations
                use_gpu=False,
            )
            fused.save_model_to_file(fused_name)
            final_name = fused_name
        except Exception:  # fusion is a speed-up only; the plain graph is exact
            final_name = raw_name

        session = _session(Path(final_name))
        names = [i.name for i in session.get_inputs()]
        (got,) = session.run([OUTPUT_NAME], _feeds(tokenizer, _PROBE_TEXTS, names))
        if final_name == fused_name and np.abs(got - expected).max() > EXPORT_TOLERANCE:
            final_name = raw_name  # a fusion that changed the numbers: use the plain graph
            session = _session(Path(final_name))
            names = [i.name for i in session.get_inputs()]
            (got,) = session.run([OUTPUT_NAME], _feeds(tokenizer, _PROBE_TEXTS, names))
        error = float(np.abs(got - expected).max())
        if got.shape != expected.shape or error > EXPORT_TOLERANCE:
            raise RuntimeError(
                f"ONNX export of {model_dir} differs from torch by {error:.3g} "
                f"(> {EXPORT_TOLERANCE}); not cached"
            )
        os.replace(final_name, destination)
        _write_digest(destination)
    finally:
        for name in (raw_name, fused_name):
            if os.path.exists(name):
                os.unlink(name)
    return destination


class OnnxMiniLMEncoder:
    """all-MiniLM-L6-v2 sentence encoder in onnxruntime (CPU, one thread).

    Same interface as :class:`~shared_model.encoder.MiniLMEncoder`: ``encode(texts)`` gives
    ``[N, 384]`` float32 L2-normalised rows, and ``fingerprint`` is the model's.

    Parameters
    ----------
    model_dir
        Hugging Face model folder; defaults to the bundled package's.
    cache_dir
        Where the exported graph is cached (default :func:`default_onnx_cache_dir`).
    max_length
        Token limit per sentence (8..512).
    batch_size
        Sentences per onnxruntime run.

    Attributes
    ----------
    exported
        Whether this construction exported the graph (``False``: it came from the cache).
    onnx_path
        The cached graph.
    """

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        cache_dir: Path | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if not 8 <= max_length <= MAX_POSITIONS:
            raise ValueError(f"max_length must be in [8, {MAX_POSITIONS}], got {max_length!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.fingerprint = model_fingerprint(self.model_dir)
        self.max_length = max_length
        self.batch_size = batch_size
        cache = Path(cache_dir) if cache_dir is not None else default_onnx_cache_dir()
        self.onnx_path = onnx_model_path(cache, self.fingerprint)
        self.exported = False
        try:
            data = read_checked(self.onnx_path)
        except (OSError, ValueError):
            # Missing, or not the file this cache exported (hash or permissions): re-export.
            export_minilm_onnx(self.model_dir, self.onnx_path)
            self.exported = True
            data = read_checked(self.onnx_path)
        self._tokenizer = _tokenizer(self.model_dir, max_length)
        self._session = _session(data)  # the bytes that were checked
        self._input_names = [i.name for i in self._session.get_inputs()]
        unknown = set(self._input_names) - set(INPUT_NAMES)
        if unknown:
            raise RuntimeError(f"{self.onnx_path}: unexpected inputs {sorted(unknown)}")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts.

        Returns
        -------
        np.ndarray
            ``[len(texts), 384]`` float32, each row L2-normalised.
        """
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            feeds = _feeds(self._tokenizer, batch, self._input_names)
            (vectors,) = self._session.run([OUTPUT_NAME], feeds)
            out[start : start + len(batch)] = vectors
        return out


def shared_onnx_encoder(
    model_dir: Path | None = None, cache_dir: Path | None = None
) -> OnnxMiniLMEncoder:
    """One :class:`OnnxMiniLMEncoder` per process and folders (its session is thread-safe),
    so several rankers (e.g. one per installed release) share one loaded graph."""
    model = Path(model_dir) if model_dir is not None else default_model_dir()
    cache = Path(cache_dir) if cache_dir is not None else default_onnx_cache_dir()
    return _shared(model.resolve(), cache.resolve())


@functools.lru_cache(maxsize=4)
def _shared(model_dir: Path, cache_dir: Path) -> OnnxMiniLMEncoder:
    return OnnxMiniLMEncoder(model_dir, cache_dir=cache_dir)
