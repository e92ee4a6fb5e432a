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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

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
_ARRAYS = (  # the arrays of evidence.npz, in this order
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


class _PackedQueries(Mapping[str, EvidenceEntry]):
    """``{normalised text: EvidenceEntry}`` over the packed arrays (entries made on access)."""

    def __init__(self, owner: ReleaseEvidence) -> None:
        self._owner = owner

    def __getitem__(self, key: str) -> EvidenceEntry:
        i = self._owner._slot[key]
        return self._owner._entry(i)

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner._keys)

    def __len__(self) -> int:
        return len(self._owner._keys)


class ReleaseEvidence:
    """Memorised evidence for the seen queries, keyed by normalised query text.

    Held packed, as in the file: one array each of product rows and counts (in the storage
    dtype) and per-query offsets, so a device holding 10^5 queries keeps about 12 bytes per
    memorised pair (8 with float16) and a lookup is one dict access and a slice.

    Parameters
    ----------
    keys
        Normalised query texts, sorted, unique.
    pair_offsets
        ``int64 [len(keys) + 1]``: query ``i``'s pairs are ``pair_offsets[i]:pair_offsets[i+1]``.
    product_rows, clicks, exam
        Per pair: the product's row in the catalog's sorted ids (int32), the released click
        sum and examination-weight sum (``dtype``).
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

    Raises :class:`EvidenceError` naming the bad value when anything is inconsistent.
    """

    def __init__(
        self,
        *,
        keys: Sequence[str],
        pair_offsets: np.ndarray,
        product_rows: np.ndarray,
        clicks: np.ndarray,
        exam: np.ndarray,
        prior: PriorFit,
        noise_var: float,
        catalog: str,
        num_products: int,
        dtype: str = "float32",
    ) -> None:
        if dtype not in COUNT_DTYPES:
            raise EvidenceError(f"dtype must be one of {COUNT_DTYPES}, got {dtype!r}")
        if not math.isfinite(noise_var) or noise_var < 0:
            raise EvidenceError(f"noise_var must be finite and >= 0, got {noise_var!r}")
        for name in ("a", "b", "tau2"):
            value = getattr(prior, name)
            if not math.isfinite(value):
                raise EvidenceError(f"prior {name} must be finite, got {value!r}")
        if isinstance(num_products, bool) or not isinstance(num_products, int) or num_products < 0:
            raise EvidenceError(f"num_products must be an int >= 0, got {num_products!r}")
        keys = list(keys)
        if keys != sorted(set(keys)):
            raise EvidenceError("query keys must be sorted and unique")
        for key in keys:
            if normalise_query(key) != key:
                raise EvidenceError(f"query key {key!r} is not normalised")
        offsets = np.asarray(pair_offsets, np.int64)
        rows = np.asarray(product_rows, np.int32)
        store = np.dtype(dtype)
        c = np.asarray(clicks).astype(store)
        e = np.asarray(exam).astype(store)
        if (
            offsets.shape != (len(keys) + 1,) or offsets[0] != 0 or offsets[-1] != len(rows)
            or np.any(np.diff(offsets) < 0) or rows.ndim != 1
            or c.shape != rows.shape or e.shape != rows.shape
        ):
            raise EvidenceError(
                f"pair offsets {offsets.shape} and arrays rows {rows.shape}, clicks {c.shape}, "
                f"exam {e.shape} are inconsistent for {len(keys)} queries"
            )
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= num_products):
            raise EvidenceError(f"product rows outside [0, {num_products})")
        if not (np.all(np.isfinite(c)) and np.all(np.isfinite(e))):
            raise EvidenceError(f"counts are not all finite in {dtype}")
        self._keys = keys
        self._slot = {k: i for i, k in enumerate(keys)}
        self.pair_offsets = offsets
        self.product_rows = rows
        self.clicks = c
        self.exam = e
        self.prior = prior
        self.noise_var = float(noise_var)
        self.catalog = catalog
        self.num_products = num_products
        self.dtype = dtype

    @classmethod
    def from_entries(
        cls,
        queries: Mapping[str, EvidenceEntry],
        *,
        prior: PriorFit,
        noise_var: float,
        catalog: str,
        num_products: int,
        dtype: str = "float32",
    ) -> ReleaseEvidence:
        """Pack ``{normalised text: EvidenceEntry}`` (see the class for the other fields)."""
        keys = sorted(queries)
        for key in keys:
            entry = queries[key]
            n = len(entry.product_rows)
            if len(entry.clicks) != n or len(entry.exam) != n:
                raise EvidenceError(f"query {key!r}: rows, clicks and exam differ in length")
        offsets = np.zeros(len(keys) + 1, np.int64)
        offsets[1:] = np.cumsum([len(queries[k].product_rows) for k in keys])

        def cat(name: str) -> np.ndarray:
            parts = [np.asarray(getattr(queries[k], name), np.float64 if name != "product_rows"
                                else np.int64) for k in keys]
            return np.concatenate(parts) if parts else np.zeros(0)

        rows = cat("product_rows")
        if len(rows) and (rows.min() < 0 or rows.max() >= num_products):
            raise EvidenceError(f"product rows outside [0, {num_products})")
        return cls(
            keys=keys, pair_offsets=offsets, product_rows=rows, clicks=cat("clicks"),
            exam=cat("exam"), prior=prior, noise_var=noise_var, catalog=catalog,
            num_products=num_products, dtype=dtype,
        )

    def _entry(self, i: int) -> EvidenceEntry:
        sl = slice(int(self.pair_offsets[i]), int(self.pair_offsets[i + 1]))
        return EvidenceEntry(
            self.product_rows[sl], self.clicks[sl].astype(np.float64),
            self.exam[sl].astype(np.float64),
        )

    @property
    def queries(self) -> Mapping[str, EvidenceEntry]:
        """``{normalised text: EvidenceEntry}`` (read-only; entries are copies)."""
        return _PackedQueries(self)

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
        if dtype not in COUNT_DTYPES:
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
            queries[key] = EvidenceEntry(rows, model.clicks[sl], model.exam[sl])
        return cls.from_entries(
            queries, prior=model.prior, noise_var=float(model.noise_var),
            catalog=catalog_sha256(product_ids), num_products=len(product_ids), dtype=dtype,
        )

    # --- the file ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """``evidence.npz`` bytes (numpy arrays only, no pickle; deterministic content)."""
        encoded = [k.encode() for k in self._keys]
        text_offsets = np.zeros(len(encoded) + 1, np.int64)
        text_offsets[1:] = np.cumsum([len(b) for b in encoded])
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
            pair_offsets=self.pair_offsets,
            product_rows=self.product_rows,
            clicks=self.clicks,
            exam=self.exam,
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
            t_off = arrays["query_offsets"]
            if (
                t_off.ndim != 1 or len(t_off) < 1 or t_off[0] != 0 or t_off[-1] != len(text)
                or np.any(np.diff(t_off) < 0)
            ):
                raise EvidenceError(f"{where}: query text offsets are inconsistent")
            counts = arrays["clicks"], arrays["exam"]
            if any(str(a.dtype) != meta["dtype"] for a in counts):
                raise EvidenceError(f"{where}: counts are {counts[0].dtype}, meta says "
                                    f"{meta['dtype']!r}")
            if arrays["product_rows"].dtype != np.int32:
                raise EvidenceError(f"{where}: product rows are {arrays['product_rows'].dtype}")
            keys = [text[t_off[i] : t_off[i + 1]].decode() for i in range(len(t_off) - 1)]
            prior = meta["prior"]
            return cls(
                keys=keys,
                pair_offsets=arrays["pair_offsets"],
                product_rows=arrays["product_rows"],
                clicks=counts[0],
                exam=counts[1],
                prior=PriorFit(a=float(prior["a"]), b=float(prior["b"]),
                               tau2=float(prior["tau2"])),
                noise_var=float(meta["noise_var"]),
                catalog=str(meta["catalog_sha256"]),
                num_products=int(meta["num_products"]),
                dtype=str(meta["dtype"]),
            )
        except EvidenceError as exc:
            if str(exc).startswith(where):
                raise
            raise EvidenceError(f"{where}: {exc}") from None
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
        i = self._slot.get(normalise_query(query_text))
        return None if i is None else self._entry(i)

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
        cand = np.asarray(candidate_rows, np.int64)
        rows = np.asarray(entry.product_rows, np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        pos = np.minimum(np.searchsorted(sorted_rows, cand), max(len(rows) - 1, 0))
        known = (sorted_rows[pos] == cand) if len(rows) else np.zeros(len(cand), bool)
        idx = order[pos[known]] if len(rows) else np.zeros(0, np.int64)
        c = np.zeros(len(cand))
        e = np.zeros(len(cand))
        c[known] = entry.clicks[idx]
        e[known] = entry.exam[idx]
        return shrunk_scores(c, e, _standardise(head_scores), self.prior, self.noise_var)

    @property
    def num_pairs(self) -> int:
        """Memorised (query, product) pairs."""
        return len(self.product_rows)


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
    return ReleaseEvidence.from_entries(
        queries, prior=DEFAULT_PRIOR, noise_var=noise_var,
        catalog=catalog_sha256(product_ids), num_products=len(product_ids),
    )
