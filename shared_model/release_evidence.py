"""The memorised click evidence a signed release carries, and how a device applies it.

The server's evidence (``shared_model.evidence``) is a sum of noisy per-node counts: already
differentially private, so anything computed from it is post-processing and safe to publish.
A release carries what on-device scoring needs to rank a **seen** query exactly as the
server's evaluator does (:class:`~shared_model.evidence.EvidenceModel`), compactly, in one
file, ``evidence.npz``, listed (by sha256) in the signed manifest like every release file:

``meta``
    UTF-8 JSON: ``format``, ``normalisation`` (how query keys were made), ``catalog_sha256``
    and ``num_products`` (the catalog the product rows index), the fitted prior
    ``{"a", "b", "tau2"}``, ``noise_var`` (the public variance of the DP noise per count) and
    ``dtype`` of the counts.
``query_text`` / ``query_offsets``
    The normalised texts of the queries that carry detectable traffic, concatenated as UTF-8
    bytes; query ``i`` is ``query_text[query_offsets[i]:query_offsets[i + 1]]`` (sorted).
``pair_offsets``
    Query ``i``'s memorised products are entries ``pair_offsets[i]:pair_offsets[i + 1]``.
``product_rows`` (int32), ``clicks``, ``exam`` (float32 or float16)
    Per memorised (query, product): the product's row in the catalog's sorted product ids,
    the released (noisy) click sum and examination-weight sum.

Queries whose released counts show no traffic (:func:`~shared_model.evidence.query_has_traffic`
is false, e.g. every unseen query) are left out: for them the evidence model scores exactly the
prior, which orders candidates as the head does, so a device ranks them by the head alone.

A query is looked up by its normalised text (:func:`normalise_query`: Unicode NFKC, case
folded, whitespace collapsed), exact match only. The device applies
:func:`~shared_model.evidence.shrunk_scores` to the candidates with the head's scores as the
base, the same arithmetic as ``EvidenceModel.__call__``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared_model.evidence import (
    EvidenceModel,
    PriorFit,
    _standardise,
    shrunk_scores,
)
from shared_model.schema import JudgedSearchData

__all__ = [
    "EVIDENCE_FILE",
    "EVIDENCE_FORMAT",
    "NORMALISATION",
    "EvidenceEntry",
    "ReleaseEvidence",
    "catalog_sha256",
    "normalise_query",
]

EVIDENCE_FILE = "evidence.npz"
EVIDENCE_FORMAT = 1
NORMALISATION = "nfkc-casefold-collapse-whitespace"
COUNT_DTYPES = ("float32", "float16")
_ARRAYS = (
    "meta", "query_text", "query_offsets", "pair_offsets", "product_rows", "clicks", "exam",
)


class EvidenceError(ValueError):
    """Evidence that must not be used: names the problem (and the value)."""


def normalise_query(text: str) -> str:
    """The key a query is looked up by: NFKC, case-folded, whitespace collapsed to one space.

    Raises ``TypeError`` for a non-string.
    """
    if not isinstance(text, str):
        raise TypeError(f"query text must be a string, got {type(text).__name__}")
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def catalog_sha256(product_ids: Sequence[str]) -> str:
    """Fingerprint of a catalog's product ids in sorted order (what product rows index)."""
    h = hashlib.sha256()
    for pid in sorted(product_ids):
        h.update(pid.encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class EvidenceEntry:
    """One seen query's memorised products (catalog rows) and their released counts."""

    product_rows: np.ndarray
    clicks: np.ndarray
    exam: np.ndarray


@dataclass(frozen=True)
class ReleaseEvidence:
    """Memorised evidence for the seen queries, keyed by normalised query text.

    Parameters
    ----------
    queries
        ``{normalised text: EvidenceEntry}``.
    prior
        The prior fitted on the server (over every pair, with the released head as base).
    noise_var
        Variance of the DP noise on each released count (public).
    catalog
        ``catalog_sha256`` of the catalog whose sorted product ids the rows index.
    num_products
        Size of that catalog.
    dtype
        Storage dtype of the counts: ``"float32"`` (exact) or ``"float16"`` (half the size).
    """

    queries: Mapping[str, EvidenceEntry]
    prior: PriorFit
    noise_var: float
    catalog: str
    num_products: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in COUNT_DTYPES:
            raise EvidenceError(f"dtype must be one of {COUNT_DTYPES}, got {self.dtype!r}")
        if not math.isfinite(self.noise_var) or self.noise_var < 0:
            raise EvidenceError(f"noise_var must be finite and >= 0, got {self.noise_var!r}")
        for name in ("a", "b", "tau2"):
            value = getattr(self.prior, name)
            if not math.isfinite(value):
                raise EvidenceError(f"prior {name} must be finite, got {value!r}")
        for key, entry in self.queries.items():
            if normalise_query(key) != key:
                raise EvidenceError(f"query key {key!r} is not normalised")
            n = len(entry.product_rows)
            if len(entry.clicks) != n or len(entry.exam) != n:
                raise EvidenceError(f"query {key!r}: rows, clicks and exam differ in length")
            rows = entry.product_rows
            if n and (rows.min() < 0 or rows.max() >= self.num_products):
                raise EvidenceError(
                    f"query {key!r}: product rows outside [0, {self.num_products})"
                )
            if not (np.all(np.isfinite(entry.clicks)) and np.all(np.isfinite(entry.exam))):
                raise EvidenceError(f"query {key!r}: counts are not all finite")

    # --- building ------------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model: EvidenceModel,
        data: JudgedSearchData,
        product_ids: Sequence[str],
        *,
        dtype: str = "float32",
    ) -> ReleaseEvidence:
        """Pack an :class:`EvidenceModel` (the server's, with the released head as base).

        Only queries with detectable traffic are kept (``model.searched``). Two catalog
        queries with the same normalised text keep the one with more released examination
        weight (ties: the smaller query id), so a key always means one query's evidence.
        """
        row = {pid: i for i, pid in enumerate(sorted(product_ids))}
        best: dict[str, tuple[float, str]] = {}
        index = model.index
        for q in index.query_ids:
            if not model.searched.get(q, False):
                continue
            start, n = index.offsets[q], len(index.products[q])
            weight = float(np.sum(model.exam[start : start + n]))
            key = normalise_query(data.queries[q].text)
            if key not in best or (weight, best[key][1]) > (best[key][0], q):
                best[key] = (weight, q)
        queries: dict[str, EvidenceEntry] = {}
        store = np.dtype(dtype) if dtype in COUNT_DTYPES else None
        if store is None:
            raise EvidenceError(f"dtype must be one of {COUNT_DTYPES}, got {dtype!r}")
        for key, (_, q) in sorted(best.items()):
            start, pids = index.offsets[q], index.products[q]
            try:
                rows = np.fromiter((row[p] for p in pids), np.int32, count=len(pids))
            except KeyError as err:
                raise EvidenceError(
                    f"query {q!r}: product {err.args[0]!r} is not in the catalog"
                ) from None
            sl = slice(start, start + len(pids))
            queries[key] = EvidenceEntry(
                rows,
                model.clicks[sl].astype(store).astype(np.float64),
                model.exam[sl].astype(store).astype(np.float64),
            )
        return cls(
            queries=queries, prior=model.prior, noise_var=float(model.noise_var),
            catalog=catalog_sha256(product_ids), num_products=len(product_ids), dtype=dtype,
        )

    # --- the file ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """``evidence.npz`` bytes (numpy arrays only, no pickle; deterministic content)."""
        keys = sorted(self.queries)
        encoded = [k.encode() for k in keys]
        text_offsets = np.zeros(len(keys) + 1, np.int64)
        text_offsets[1:] = np.cumsum([len(b) for b in encoded])
        pair_offsets = np.zeros(len(keys) + 1, np.int64)
        pair_offsets[1:] = np.cumsum([len(self.queries[k].product_rows) for k in keys])
        store = np.dtype(self.dtype)

        def cat(name: str, dtype: np.dtype[Any]) -> np.ndarray:
            parts = [np.asarray(getattr(self.queries[k], name)) for k in keys]
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        meta = {
            "format": EVIDENCE_FORMAT,
            "normalisation": NORMALISATION,
            "catalog_sha256": self.catalog,
            "num_products": self.num_products,
            "prior": {"a": self.prior.a, "b": self.prior.b, "tau2": self.prior.tau2},
            "noise_var": self.noise_var,
            "dtype": self.dtype,
        }
        buf = io.BytesIO()
        np.savez(
            buf,
            meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8),
            query_text=np.frombuffer(b"".join(encoded), np.uint8),
            query_offsets=text_offsets,
            pair_offsets=pair_offsets,
            product_rows=cat("product_rows", np.dtype(np.int32)),
            clicks=cat("clicks", store),
            exam=cat("exam", store),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = EVIDENCE_FILE) -> ReleaseEvidence:
        """Parse ``evidence.npz`` bytes; :class:`EvidenceError` names ``where`` and the problem."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                if sorted(npz.files) != sorted(_ARRAYS):
                    raise EvidenceError(f"{where}: arrays {sorted(npz.files)}, expected "
                                        f"{sorted(_ARRAYS)}")
                arrays = {k: npz[k] for k in _ARRAYS}
        except EvidenceError:
            raise
        except Exception as exc:  # zipfile/numpy raise many types on corrupt input
            raise EvidenceError(f"{where}: not a readable evidence file ({exc})") from None
        try:
            meta = json.loads(arrays["meta"].tobytes().decode())
            if meta.get("format") != EVIDENCE_FORMAT:
                raise EvidenceError(
                    f"{where}: format {meta.get('format')!r} is not supported "
                    f"(expected {EVIDENCE_FORMAT})"
                )
            if meta.get("normalisation") != NORMALISATION:
                raise EvidenceError(
                    f"{where}: query normalisation {meta.get('normalisation')!r} is not "
                    f"this build's {NORMALISATION!r}"
                )
            text = arrays["query_text"].tobytes()
            t_off, p_off = arrays["query_offsets"], arrays["pair_offsets"]
            rows, clicks, exam = arrays["product_rows"], arrays["clicks"], arrays["exam"]
            if (
                len(t_off) != len(p_off) or len(t_off) < 1 or t_off[0] != 0 or p_off[0] != 0
                or t_off[-1] != len(text) or p_off[-1] != len(rows)
                or np.any(np.diff(t_off) < 0) or np.any(np.diff(p_off) < 0)
                or len(clicks) != len(rows) or len(exam) != len(rows)
            ):
                raise EvidenceError(f"{where}: offsets and arrays are inconsistent")
            if str(clicks.dtype) != meta["dtype"] or str(exam.dtype) != meta["dtype"]:
                raise EvidenceError(f"{where}: counts are {clicks.dtype}, meta says "
                                    f"{meta['dtype']!r}")
            queries = {}
            for i in range(len(t_off) - 1):
                key = text[t_off[i] : t_off[i + 1]].decode()
                sl = slice(int(p_off[i]), int(p_off[i + 1]))
                queries[key] = EvidenceEntry(
                    rows[sl].astype(np.int64), clicks[sl].astype(np.float64),
                    exam[sl].astype(np.float64),
                )
            prior = meta["prior"]
            return cls(
                queries=queries,
                prior=PriorFit(a=float(prior["a"]), b=float(prior["b"]),
                               tau2=float(prior["tau2"])),
                noise_var=float(meta["noise_var"]),
                catalog=str(meta["catalog_sha256"]),
                num_products=int(meta["num_products"]),
                dtype=str(meta["dtype"]),
            )
        except EvidenceError:
            raise
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise EvidenceError(f"{where}: malformed evidence ({exc!r})") from None

    # --- applying ------------------------------------------------------------------------

    def check_catalog(self, product_ids: Sequence[str]) -> None:
        """Raise :class:`EvidenceError` unless the rows index this catalog."""
        actual = catalog_sha256(product_ids)
        if actual != self.catalog or len(product_ids) != self.num_products:
            raise EvidenceError(
                f"evidence indexes catalog {self.catalog[:12]} ({self.num_products} products), "
                f"this catalog is {actual[:12]} ({len(product_ids)} products)"
            )

    def lookup(self, query_text: str) -> EvidenceEntry | None:
        """The memorised evidence of a seen query (exact normalised match), else ``None``."""
        return self.queries.get(normalise_query(query_text))

    def apply(
        self, entry: EvidenceEntry, candidate_rows: np.ndarray, head_scores: np.ndarray
    ) -> np.ndarray:
        """Scores of candidates (catalog rows) for a seen query: the head's scores,
        standardised over the candidates, as the prior's base; memorised counts where a
        candidate has them (``EvidenceModel.__call__``'s arithmetic)."""
        head_scores = np.asarray(head_scores, np.float64)
        if head_scores.shape != (len(candidate_rows),):
            raise ValueError(
                f"head_scores has shape {head_scores.shape}, expected ({len(candidate_rows)},)"
            )
        where = {int(r): i for i, r in enumerate(entry.product_rows)}
        idx = np.fromiter((where.get(int(r), -1) for r in candidate_rows), np.int64,
                          count=len(candidate_rows))
        c = np.zeros(len(idx))
        e = np.zeros(len(idx))
        known = idx >= 0
        c[known] = entry.clicks[idx[known]]
        e[known] = entry.exam[idx[known]]
        return shrunk_scores(c, e, _standardise(head_scores), self.prior, self.noise_var)

    @property
    def num_pairs(self) -> int:
        """Memorised (query, product) pairs."""
        return sum(len(e.product_rows) for e in self.queries.values())


def synthetic_evidence(
    data: JudgedSearchData,
    product_ids: Sequence[str],
    *,
    seed: int,
    noise_var: float,
    max_exam: float,
) -> ReleaseEvidence:
    """Seeded made-up counts over every catalog query's judged pool: the shape of real
    evidence, for latency benchmarks and tests only (the values mean nothing).

    Each pair gets ``exam ~ U(0, max_exam)`` and ``clicks = exam * U(0, 1) / 2``; the prior is
    :data:`~shared_model.evidence.DEFAULT_PRIOR`.
    """
    from shared_model.evidence import DEFAULT_PRIOR

    if not math.isfinite(max_exam) or max_exam <= 0:
        raise ValueError(f"max_exam must be finite and > 0, got {max_exam!r}")
    rng = np.random.default_rng(seed)
    row = {pid: i for i, pid in enumerate(sorted(product_ids))}
    queries: dict[str, EvidenceEntry] = {}
    for q in sorted(data.query_ids):
        pids = sorted({j.product_id for j in data.judged(q)})
        exam = rng.uniform(0.0, max_exam, len(pids))
        queries.setdefault(normalise_query(data.queries[q].text), EvidenceEntry(
            np.fromiter((row[p] for p in pids), np.int64, count=len(pids)),
            (exam * rng.uniform(0.0, 1.0, len(pids)) / 2).astype(np.float32).astype(np.float64),
            exam.astype(np.float32).astype(np.float64),
        ))
    return ReleaseEvidence(
        queries=queries, prior=DEFAULT_PRIOR, noise_var=noise_var,
        catalog=catalog_sha256(product_ids), num_products=len(product_ids),
    )
