"""On-device scoring with a release's ONNX head: the path a node serves searches with.

:class:`OnnxScorer` runs ``head.onnx`` in onnxruntime on one thread; :class:`DeviceRanker`
encodes a query, computes the features of the candidates and ranks them.

Queries are encoded by :class:`~shared_model.onnx_encoder.OnnxMiniLMEncoder` (MiniLM in
onnxruntime, one thread; several times faster than torch, same embeddings within 1e-5) when it
can be built, else by the builder's torch MiniLM (:func:`query_encoder_for`).

Queries never touch the disk here: :func:`encode_query` reads the embedding cache when the
text is already in it but never writes a query to it (``FeatureBuilder.query_vector`` would
persist every search text's embedding), and :func:`candidate_features` keeps no per-query memo,
so a long-running node does not grow with the number of searches. Both give exactly what
``FeatureBuilder.features(query_text, candidate_ids)`` gives (tested).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared_model.encoder import text_key
from shared_model.features import FEATURE_NAMES, NUM_FEATURES, FeatureBuilder
from shared_model.release import (
    INPUT_NAME,
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_NAME,
    Manifest,
    ReleaseError,
    read_manifest,
    verify_release,
)

__all__ = [
    "DeviceRanker",
    "OnnxScorer",
    "QueryEncoder",
    "candidate_features",
    "encode_query",
    "query_encoder_for",
    "top_by_bm25",
]


class QueryEncoder(Protocol):
    """What encodes queries: ``encode(texts) -> [N, 384]`` and the model's ``fingerprint``."""

    fingerprint: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class OnnxScorer:
    """Scores features with a release's ``head.onnx`` (onnxruntime, CPU, one thread).

    Parameters
    ----------
    release_dir
        A release directory (``shared_model.release``).
    public_key
        When given, the release is verified first (:class:`ReleaseError` on any problem) and
        the model bytes loaded are the ones whose hash was checked. Without it the manifest
        is read unverified, if present.
    """

    def __init__(self, release_dir: Path, public_key: Ed25519PublicKey | None = None) -> None:
        import onnxruntime as ort

        self.release_dir = Path(release_dir)
        self.manifest: Manifest | None
        if public_key is not None:
            self.manifest = verify_release(self.release_dir, public_key)
        elif (self.release_dir / MANIFEST_FILE).is_file():
            self.manifest = read_manifest(self.release_dir)
        else:
            self.manifest = None
        model_path = self.release_dir / MODEL_FILE
        try:
            model_bytes = model_path.read_bytes()
        except OSError as exc:
            raise ReleaseError(
                f"release {self.release_dir}: cannot read {MODEL_FILE}: {exc}"
            ) from None
        if public_key is not None and self.manifest is not None:
            import hashlib

            # Read once, check these very bytes: no window between verifying and loading.
            if hashlib.sha256(model_bytes).hexdigest() != self.manifest.files[MODEL_FILE]:
                raise ReleaseError(
                    f"release {self.release_dir}: {MODEL_FILE} changed after it was verified"
                )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(
                model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ReleaseError(
                f"release {self.release_dir}: {MODEL_FILE} does not load: {exc}"
            ) from None
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
            raise ReleaseError(
                f"release {self.release_dir}: {MODEL_FILE} has inputs "
                f"{[i.name for i in inputs]} and outputs {[o.name for o in outputs]}, expected "
                f"[{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]"
            )
        width = inputs[0].shape[1] if len(inputs[0].shape) == 2 else None
        self.num_features = width if isinstance(width, int) else NUM_FEATURES

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Relevance logits ``[N]`` float32 for ``features`` ``[N, F]``."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"features must have shape [N, {self.num_features}], got {list(x.shape)}"
            )
        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        (out,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return np.asarray(out, dtype=np.float32).reshape(x.shape[0])


def encode_query(
    builder: FeatureBuilder, text: str, encoder: QueryEncoder | None = None
) -> np.ndarray:
    """``[384]`` embedding of a query: from the cache when present, else ``encoder`` (the
    builder's torch MiniLM when ``None``); never stored."""
    cached = builder.encoder
    vectors, missing = cached.cache.get([text_key(text, cached.fingerprint)])
    if not missing:
        return vectors[0]
    if encoder is None:
        return cached.encoder.encode([text])[0]
    return encoder.encode([text])[0]


def query_encoder_for(
    builder: FeatureBuilder, kind: Literal["onnx", "torch"] = "onnx"
) -> QueryEncoder | None:
    """The encoder for ``builder``'s queries: ``"onnx"`` gives the process's shared
    :class:`~shared_model.onnx_encoder.OnnxMiniLMEncoder` (exported and cached on first use) of
    the model the builder's catalog was embedded with, or ``None`` with a warning when it cannot
    be built; ``"torch"`` (or ``None``) means the builder's own torch MiniLM."""
    if kind == "torch":
        return None
    if kind != "onnx":
        raise ValueError(f"query encoder must be 'onnx' or 'torch', got {kind!r}")
    try:
        from shared_model.onnx_encoder import shared_onnx_encoder

        model_dir = getattr(builder.encoder, "_model_dir", None)
        encoder = shared_onnx_encoder(Path(model_dir) if model_dir is not None else None)
    except Exception as exc:  # any failure falls back to the exact torch path
        warnings.warn(
            f"ONNX query encoder unavailable ({type(exc).__name__}: {exc}); using torch MiniLM",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    if encoder.fingerprint != builder.encoder.fingerprint:
        warnings.warn(
            "ONNX query encoder's model differs from the catalog embeddings'; using torch MiniLM",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return encoder


def candidate_features(
    builder: FeatureBuilder,
    query_text: str,
    query_vector: np.ndarray,
    candidate_ids: Sequence[str],
) -> np.ndarray:
    """``builder.features(query_text, candidate_ids)`` for a given query vector, memo-free.

    Same arithmetic as ``FeatureBuilder.features`` (the candidates are the pool), without
    recording the query in the builder: ``FeatureBuilder.candidate_features``.
    """
    return builder.candidate_features(query_text, query_vector, candidate_ids)


def top_by_bm25(builder: FeatureBuilder, query_text: str, k: int = 100) -> list[str]:
    """The catalog's ``k`` best products for ``query_text`` by BM25; ties by product id."""
    ids = builder.product_ids
    scores = builder.bm25.score(query_text, ids)
    order = np.lexsort((np.arange(len(ids)), -scores))  # product_ids is sorted: index = id order
    return [ids[i] for i in order[:k]]


class DeviceRanker:
    """Ranks candidate products for a query with a release's ONNX head.

    Parameters
    ----------
    release_dir
        The release to score with.
    builder
        Catalog embeddings and BM25 (``FeatureBuilder``); its encoder encodes queries.
    public_key
        Verify the release first (recommended; see :class:`OnnxScorer`).
    query_encoder
        What encodes queries that are not in the embedding cache: ``"onnx"`` (default; MiniLM
        in onnxruntime, falling back to torch when unavailable), ``"torch"`` (the builder's
        MiniLM) or an encoder object with the builder's ``fingerprint``.
    """

    def __init__(
        self,
        release_dir: Path,
        builder: FeatureBuilder,
        public_key: Ed25519PublicKey | None = None,
        *,
        query_encoder: QueryEncoder | Literal["onnx", "torch"] = "onnx",
    ) -> None:
        self.scorer = OnnxScorer(release_dir, public_key)
        self.builder = builder
        if isinstance(query_encoder, str):
            self.query_encoder = query_encoder_for(builder, query_encoder)
        else:
            if query_encoder.fingerprint != builder.encoder.fingerprint:
                raise ValueError(
                    "query_encoder's model fingerprint differs from the catalog embeddings'"
                )
            self.query_encoder = query_encoder
        manifest = self.scorer.manifest
        if manifest is not None and manifest.feature_names != tuple(FEATURE_NAMES):
            raise ReleaseError(
                f"release {release_dir}: features {list(manifest.feature_names)} do not match "
                f"this build's {list(FEATURE_NAMES)}"
            )
        if self.scorer.num_features != NUM_FEATURES:
            raise ReleaseError(
                f"release {release_dir}: model takes {self.scorer.num_features} features, "
                f"this build computes {NUM_FEATURES}"
            )

    def scores(self, query_text: str, candidate_ids: Sequence[str]) -> np.ndarray:
        """Relevance logits ``[len(candidate_ids)]`` (candidates standardised as one pool)."""
        q = encode_query(self.builder, query_text, self.query_encoder)
        return self.scorer.scores(candidate_features(self.builder, query_text, q, candidate_ids))

    def rank(
        self, query_text: str, candidate_ids: Sequence[str], top: int = 10
    ) -> list[tuple[str, float]]:
        """The ``top`` best candidates as ``(product_id, score)``, best first; ties by id."""
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top!r}")
        ids = list(candidate_ids)
        if not ids:
            return []
        scores = self.scores(query_text, ids)
        order = sorted(range(len(ids)), key=lambda i: (-float(scores[i]), ids[i]))
        return [(ids[i], float(scores[i])) for i in order[:top]]
