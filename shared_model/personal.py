"""On-device personalization: a small private user state learned from the device's own clicks.

What the state is (:class:`UserState`)
    Learned from the user's own time-ordered search sessions (their click log, which never
    leaves the device), with a recency decay per session (``decay`` = 0.8: a session ``k``
    sessions older weighs ``0.8**k``):

    * ``categories``: decayed click mass per top-level product category;
    * ``vector``: decayed mean of the MiniLM embeddings of the clicked products (float16);
    * ``queries``: decayed count of each query text the user issued (at most 64 kept);
    * ``recent``: the last clicked product ids (at most 32), newest last;
    * ``sessions``/``clicks``: how much history it saw.

    Serialised as JSON, at most :data:`MAX_STATE_BYTES` (64 KiB) -- about 3 KiB in practice.
    It lives in a file on the device (mode 0600) or only in memory; nothing in the federated
    code (``client/``, ``server/``) imports this module, so it is never part of a model update
    or of any message (tested).

How it is used (:class:`PersonalScorer`, :func:`personal_scores`)
    The signed global release scores the candidates; the state adds terms on top of the
    release's logits, on the same scale (the logits are z-scored over the candidates)::

        score = z(global) + category_weight * affinity(category) + vector_weight * z(cos(v, p))
                + click_weight * clicks(q, p) - skip_weight * skips(q, p)
                + query_vector_weight * z(cos(v_q, p))

    ``affinity`` is the user's smoothed click share of the product's category, ``cos(v, p)``
    the cosine of the user vector with the product's text embedding, ``clicks``/``skips`` the
    user's decayed clicks and examined skips of ``p`` for this query and ``v_q`` the
    click-weighted sum of the products the user clicked for this query. Weights come from
    :class:`PersonalConfig`; the defaults were picked once on a validation world (seed 1,
    docs/results.md) and are not tuned on the evaluation. :class:`PersonalScorer` precomputes
    the per-user terms over the catalog once per state, so a request is a few gathers.

No Flower and no torch here.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from shared_model.clicks import user_session_order

MAX_STATE_BYTES = 64 * 1024
MAX_QUERIES = 64
MAX_RECENT = 32
MAX_ITEMS_PER_QUERY = 20
STATE_VERSION = 1
DEFAULT_DECAY = 0.8

# Candidates (query text, product ids) -> the global release's relevance logits.
GlobalScorer = Callable[[str, Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class Session:
    """One search session of the user, as the device logged it."""

    timestamp: int
    query_id: str
    query_text: str
    shown: tuple[str, ...]  # in rank order
    clicked: tuple[str, ...]  # subset of shown, in rank order


def sessions_from_log(table: pa.Table, data: Any, *, user: int | None = None) -> list[Session]:
    """The user's sessions from a click log, oldest first.

    ``user=None`` requires the log to hold exactly one user (a device's own log).
    """
    users = table.column("user_id").to_numpy()
    present = np.unique(users)
    if user is None:
        if len(present) > 1:
            raise ValueError(
                f"the history holds {len(present)} users; pick one (--user)"
            )
        if len(present) == 0:
            return []
        user = int(present[0])
    rows = np.nonzero(users == user)[0]
    if len(rows) == 0:
        raise ValueError(f"the history has no sessions of user {user}")
    part = table.take(pa.array(rows))
    order = user_session_order(part)
    sessions: dict[int, list[int]] = {}
    for i, k in enumerate(order.tolist()):
        sessions.setdefault(k, []).append(i)
    qids = part.column("query_id").to_pylist()
    pids = part.column("product_id").to_pylist()
    ranks = part.column("rank").to_numpy()
    clicked = part.column("clicked").to_numpy(zero_copy_only=False)
    times = part.column("timestamp").to_numpy()
    out = []
    for k in sorted(sessions):
        idx = sorted(sessions[k], key=lambda i: int(ranks[i]))
        qid = qids[idx[0]]
        query = data.queries.get(qid)
        out.append(
            Session(
                timestamp=int(times[idx].min()),
                query_id=qid,
                query_text=query.text if query is not None else qid,
                shown=tuple(pids[i] for i in idx),
                clicked=tuple(pids[i] for i in idx if clicked[i]),
            )
        )
    return out


def read_history(path: str | Path, data: Any, *, user: int | None = None) -> list[Session]:
    """A history file (click-log Parquet, the device's own log) as sessions, oldest first."""
    from shared_model.clicklog import read_click_log

    return sessions_from_log(read_click_log(path), data, user=user)


@dataclass
class UserState:
    """The device's private user state (see the module docstring)."""

    categories: dict[str, float] = field(default_factory=dict)
    vector: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float16))
    queries: dict[str, float] = field(default_factory=dict)
    recent: list[str] = field(default_factory=list)
    sessions: int = 0
    clicks: int = 0
    # query text -> product id -> [decayed clicks, decayed examined-but-skipped]
    items: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    # -- learning --------------------------------------------------------------------------

    def observe(self, session: Session, builder: Any, *, decay: float = DEFAULT_DECAY) -> None:
        """Fold one new session (newer than all seen) into the state, online."""
        for store in (self.categories, self.queries):
            for k in list(store):
                store[k] *= decay
        for memo in self.items.values():
            for ev in memo.values():
                ev[0] *= decay
                ev[1] *= decay
        memo = self.items.setdefault(session.query_text, {})
        clicked = set(session.clicked)
        for rank, pid in enumerate(session.shown, start=1):
            ev = memo.setdefault(pid, [0.0, 0.0])
            if pid in clicked:
                ev[0] += 1.0
            else:
                ev[1] += 1.0 / rank  # P(examined | rank) under the position-based model
        if len(memo) > MAX_ITEMS_PER_QUERY:
            kept = sorted(memo.items(), key=lambda kv: (-(kv[1][0] + kv[1][1]), kv[0]))
            self.items[session.query_text] = dict(kept[:MAX_ITEMS_PER_QUERY])
        self.queries[session.query_text] = self.queries.get(session.query_text, 0.0) + 1.0
        if len(self.queries) > MAX_QUERIES:
            keep = sorted(self.queries.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_QUERIES]
            self.queries = dict(keep)
            self.items = {q: m for q, m in self.items.items() if q in self.queries}
        vec = self.vector.astype(np.float32) * decay
        for pid in session.clicked:
            product = builder.data.products.get(pid)
            if product is None:
                continue
            cat = product.top_category
            self.categories[cat] = self.categories.get(cat, 0.0) + 1.0
            emb = builder.full[builder.product_row[pid]].astype(np.float32)
            vec = emb.copy() if vec.size == 0 else vec + emb
            self.recent.append(pid)
            self.clicks += 1
        self.recent = self.recent[-MAX_RECENT:]
        self.vector = vec.astype(np.float16)
        self.sessions += 1

    # -- use ---------------------------------------------------------------------------------

    def affinity(self, categories: Sequence[str], *, prior: float = 1.0) -> np.ndarray:
        """Smoothed click share of each category: ``(m_c + prior/C) / (M + prior)``, C = the
        number of categories seen plus one."""
        total = sum(self.categories.values())
        c = len(self.categories) + 1
        return np.array(
            [(self.categories.get(x, 0.0) + prior / c) / (total + prior) for x in categories],
            dtype=np.float32,
        )

    def unit_vector(self) -> np.ndarray | None:
        """The user vector normalised to length 1, or ``None`` before any click."""
        if self.vector.size == 0:
            return None
        v = self.vector.astype(np.float32)
        norm = float(np.linalg.norm(v))
        return v / norm if norm > 1e-8 else None

    def query_weights(self) -> dict[str, float]:
        """The user's next-query distribution from their decayed query counts (sums to 1)."""
        total = sum(self.queries.values())
        return {q: w / total for q, w in self.queries.items()} if total > 0 else {}

    # -- storage -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "categories": {k: round(v, 6) for k, v in sorted(self.categories.items())},
            "vector": base64.b64encode(self.vector.astype("<f2").tobytes()).decode("ascii"),
            "queries": {k: round(v, 6) for k, v in sorted(self.queries.items())},
            "recent": list(self.recent),
            "sessions": self.sessions,
            "clicks": self.clicks,
            "items": {
                q: {p: [round(ev[0], 4), round(ev[1], 4)] for p, ev in sorted(m.items())}
                for q, m in sorted(self.items.items())
            },
        }

    def to_bytes(self) -> bytes:
        data = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        if len(data) > MAX_STATE_BYTES:
            raise ValueError(f"user state is {len(data)} bytes, over {MAX_STATE_BYTES}")
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> UserState:
        if len(data) > MAX_STATE_BYTES:
            raise ValueError(f"user state is {len(data)} bytes, over {MAX_STATE_BYTES}")
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("version") != STATE_VERSION:
            raise ValueError("not a fedrank user state (version 1)")
        vector = np.frombuffer(base64.b64decode(obj["vector"]), dtype="<f2").astype(np.float16)
        state = cls(
            categories={str(k): float(v) for k, v in obj["categories"].items()},
            vector=vector,
            queries={str(k): float(v) for k, v in obj["queries"].items()},
            recent=[str(p) for p in obj["recent"]],
            sessions=int(obj["sessions"]),
            clicks=int(obj["clicks"]),
            items={
                str(q): {str(p): [float(ev[0]), float(ev[1])] for p, ev in m.items()}
                for q, m in obj.get("items", {}).items()
            },
        )
        evidence = [x for m in state.items.values() for ev in m.values() for x in ev]
        for v in [*state.categories.values(), *state.queries.values(), *evidence]:
            if not math.isfinite(v) or v < 0:
                raise ValueError("user state holds a negative or non-finite weight")
        return state

    def save(self, path: str | Path) -> Path:
        """Write the state to ``path`` (0600, atomically); it stays on this device."""
        from shared_model.release import write_private_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        write_private_file(tmp, self.to_bytes())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> UserState:
        with open(path, "rb") as fh:
            return cls.from_bytes(fh.read(MAX_STATE_BYTES + 1))


def learn_state(
    sessions: Sequence[Session], builder: Any, *, decay: float = DEFAULT_DECAY
) -> UserState:
    """The state after observing ``sessions`` in time order."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay!r}")
    state = UserState()
    for s in sorted(sessions, key=lambda s: s.timestamp):
        state.observe(s, builder, decay=decay)
    return state


@dataclass(frozen=True)
class PersonalConfig:
    """How the state re-weights the release's scores (0 weights = the global ranking)."""

    category_weight: float = 1.0
    vector_weight: float = 0.25
    click_weight: float = 2.0
    skip_weight: float = 2.0
    query_vector_weight: float = 0.5

    def __post_init__(self) -> None:
        for name in ("category_weight", "vector_weight", "click_weight", "skip_weight",
                     "query_vector_weight"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")


def _zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        return x
    d = x - x.mean()
    std = math.sqrt(float(d @ d) / x.size)
    return d / (std if std > 1e-6 else 1.0)


# Feature builder -> (categories, row index); weak keys: a cache never keeps a catalog alive.
_CATALOG_CATEGORIES: weakref.WeakKeyDictionary[Any, tuple[list[str], np.ndarray]] = (
    weakref.WeakKeyDictionary()
)


def catalog_categories(builder: Any) -> tuple[list[str], np.ndarray]:
    """The catalog's top-level categories and each product row's index into them.

    Computed once per feature builder (the catalog is fixed for a builder's life).

    Parameters
    ----------
    builder : FeatureBuilder
        Holds the catalog (``data.products``) and its row order (``product_ids``).

    Returns
    -------
    names : list of str
        Distinct top-level categories, sorted.
    index : numpy.ndarray
        int64 ``[num_products]``: ``names[index[row]]`` is the product's category.
    """
    try:
        hit = _CATALOG_CATEGORIES.get(builder)
    except TypeError:  # not weak-referenceable or not hashable: compute, do not cache
        hit = None
    if hit is not None:
        return hit
    cats = [builder.data.products[p].top_category for p in builder.product_ids]
    names = sorted(set(cats))
    lookup = {c: i for i, c in enumerate(names)}
    index = np.fromiter((lookup[c] for c in cats), np.int64, count=len(cats))
    with contextlib.suppress(TypeError):
        _CATALOG_CATEGORIES[builder] = (names, index)
    return names, index


class PersonalScorer:
    """One user's personal terms precomputed over the whole catalog, for fast requests.

    Built once per state (i.e. after each new session, not per request): the category
    affinity of every product, the cosine of every product with the user vector, and, lazily
    per query the user issued, that query's click/skip memory and click-vector cosines as
    catalog-sized arrays. A request is then a few gathers over the candidates' rows and three
    z-scores; :func:`personal_scores` is the one-off form of :meth:`scores`.

    Parameters
    ----------
    state : UserState or None
        The user's private state (``None`` or no sessions: the global order).
    builder : FeatureBuilder
        The catalog: product rows, text embeddings (``full``) and categories.
    config : PersonalConfig, optional
        Weights of the terms (default :class:`PersonalConfig`).
    """

    def __init__(
        self, state: UserState | None, builder: Any, config: PersonalConfig | None = None
    ) -> None:
        self.state = state
        self.builder = builder
        self.config = config or PersonalConfig()
        self._memo: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None] | None] = {}
        self.static: np.ndarray | None = None
        self.cosine: np.ndarray | None = None
        active = state is not None and state.sessions > 0 and state.clicks > 0
        if active and self.config.category_weight:
            assert state is not None
            names, index = catalog_categories(builder)
            self.static = (self.config.category_weight * state.affinity(names))[index]
        if active and self.config.vector_weight:
            assert state is not None
            v = state.unit_vector()
            if v is not None:
                self.cosine = np.asarray(builder.full @ v, dtype=np.float32)

    def _query_terms(
        self, query_text: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """(clicks, skips, click-vector cosines or None) over the catalog for one query."""
        if query_text in self._memo:
            return self._memo[query_text]
        state, builder, config = self.state, self.builder, self.config
        memo = state.items.get(query_text) if state is not None else None
        terms: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
        if memo:
            n = len(builder.product_ids)
            known = [p for p in memo if p in builder.product_row]
            rows = builder.rows(known)
            ev = np.asarray([memo[p] for p in known], dtype=np.float32).reshape(-1, 2)
            clicks = np.zeros(n, dtype=np.float32)
            skips = np.zeros(n, dtype=np.float32)
            clicks[rows] = ev[:, 0]
            skips[rows] = ev[:, 1]
            qcos = None
            liked = ev[:, 0] > 0
            if config.query_vector_weight and liked.any():
                qv = ev[liked, 0] @ builder.full[rows[liked]]
                qcos = np.asarray(builder.full @ qv, dtype=np.float32)
            terms = (clicks, skips, qcos)
        if len(self._memo) >= 2 * MAX_QUERIES:
            self._memo.clear()
        self._memo[query_text] = terms
        return terms

    def scores(
        self,
        global_scores: np.ndarray,
        candidate_ids: Sequence[str],
        *,
        query_text: str | None = None,
        rows: np.ndarray | None = None,
    ) -> np.ndarray:
        """The release's logits re-weighted by the state (module docstring); float32 [N].

        Parameters
        ----------
        global_scores : numpy.ndarray
            The release's logits of the candidates.
        candidate_ids : sequence of str
            The candidates' product ids (catalog products).
        query_text : str, optional
            The query, for the per-query click memory.
        rows : numpy.ndarray, optional
            The candidates' catalog rows, when the caller already has them.

        Returns
        -------
        numpy.ndarray
            float32 ``[N]``; with no state (or no history yet), the z-scored global score.
        """
        out = _zscore(global_scores)
        state, config = self.state, self.config
        if state is None or state.sessions == 0 or len(candidate_ids) == 0:
            return out
        if rows is None:
            rows = self.builder.rows(candidate_ids)
        terms = self._query_terms(query_text) if query_text is not None else None
        if terms is not None:
            clicks, skips, qcos = terms
            if config.click_weight or config.skip_weight:
                out = out + config.click_weight * clicks[rows] - config.skip_weight * skips[rows]
            if qcos is not None:
                out = out + config.query_vector_weight * _zscore(qcos[rows])
        if self.static is not None:
            out = out + self.static[rows]
        if self.cosine is not None:
            out = out + config.vector_weight * _zscore(self.cosine[rows])
        return out.astype(np.float32, copy=False)


def personal_scores(
    global_scores: np.ndarray,
    candidate_ids: Sequence[str],
    state: UserState | None,
    builder: Any,
    config: PersonalConfig | None = None,
    *,
    query_text: str | None = None,
) -> np.ndarray:
    """The release's logits re-weighted by the user state (module docstring); float32 [N].

    One-off form of :meth:`PersonalScorer.scores` (it precomputes over the catalog on every
    call): for many requests of one user, build a :class:`PersonalScorer` once.
    With no state (or no history yet) this is the z-scored global score: same order.
    """
    return PersonalScorer(state, builder, config).scores(
        global_scores, candidate_ids, query_text=query_text
    )


def personal_rank(
    ranker: Any,
    query_text: str,
    candidate_ids: Sequence[str],
    state: UserState | PersonalScorer | None,
    *,
    top: int = 10,
    config: PersonalConfig | None = None,
) -> list[tuple[str, float]]:
    """A ``DeviceRanker``'s ranking re-weighted by the user state.

    Parameters
    ----------
    ranker : DeviceRanker
        The signed release's scorer (``scores(query_text, ids)``, ``builder``).
    query_text : str
        The query.
    candidate_ids : sequence of str
        The candidates.
    state : UserState, PersonalScorer or None
        The user's state, or its precomputed scorer (built once per state: fastest).
    top : int
        How many to return.
    config : PersonalConfig, optional
        Weights, when ``state`` is a ``UserState``.

    Returns
    -------
    list of (str, float)
        The ``top`` best as ``(product_id, personalized score)``, best first; ties by id.
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top!r}")
    ids = list(candidate_ids)
    if not ids:
        return []
    scorer = (
        state if isinstance(state, PersonalScorer)
        else PersonalScorer(state, ranker.builder, config)
    )
    scores = scorer.scores(ranker.scores(query_text, ids), ids, query_text=query_text)
    order = np.lexsort((np.asarray(ids), -scores))[:top]
    return [(ids[i], float(scores[i])) for i in order.tolist()]
