"""Reply validation: nothing a node sends reaches aggregation unchecked.

A regional train reply (the contract in ``CONTRACT.md``) is exactly:

- record ``arrays``: an ArrayRecord with exactly the keys the server sent, each a float32
  ``numpy.ndarray`` of the sent shape (metadata, npy header and byte length are checked
  *before* anything is decoded);
- record ``metrics``: a MetricRecord with exactly :data:`EXPECTED_METRICS`, all finite scalars;
  ``epsilon``, ``steps`` and ``release-round`` >= 0. ``num-examples`` is ignored (replaced by 1:
  uniform weights; a node cannot buy influence by claiming more data);
- optionally record ``node``: a ConfigRecord ``{"name": str}``, a *claim* only.

The update (reply minus the weights sent) is clipped to :data:`CLIP_UPDATE_NORM`; one beyond
:data:`REJECT_UPDATE_NORM`, or non-finite, is rejected. A bad reply is dropped with one
bounded, escaped log line (:func:`escape`) and the round goes on with the others.

A node's identity is its Flower node id, named by the server's own ``node-regions`` run
config (:func:`parse_node_regions`); region caps and the per-node ε in signed releases use
that name, never the name a reply claims.
"""

from __future__ import annotations

import io
import logging
import math
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privacy.ledger import LedgerEvent
from server.wrapping import DelegatingStrategy
from shared_model.evidence import (
    EVIDENCE_CLICKS,
    EVIDENCE_EXAM,
    EVIDENCE_KEYS,
    EVIDENCE_NOISE_VAR,
    median_rate_caps,
)

if TYPE_CHECKING:
    from server.evidence import EvidenceBound
    from server.strategies import RobustHead

log = logging.getLogger("fedrank.server")

ARRAYS, METRICS, NODE = "arrays", "metrics", "node"
WEIGHT_KEY = "num-examples"
EXPECTED_METRICS = ("num-examples", "steps", "epsilon", "release-round")
NONNEGATIVE_METRICS = ("steps", "epsilon", "release-round")
EXPECTED_DTYPE = np.dtype("<f4")  # float32, little-endian (what numpy writes on x86/ARM)
NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY

# Server-side clip of each node's update (reply minus the weights it was sent), L2 norm.
# Measured with tests/server/measure_update_norms.py: the node code (client.node.train_round,
# real DP-SGD) for 3-5 FedAvg rounds from the initial head. Largest honest update seen:
#   DP-SGD (ε 0.1 / 1 / 8, regional-3 and regional-5, hidden-dim 0 and 32): 1.74 at defaults
#   (median 0.53); with batch 32, local-epochs 3 or learning-rate 2.0: at most 2.77;
#   non-private (ε = inf): 2.58 at defaults, 4.08 / 3.51 / 7.04 with those overrides.
# 5.0 is ~3x the largest DP-SGD update at the default settings and above every DP-SGD update
# measured; a non-private run at 4x the default learning rate is clipped a little (logged and
# recorded in metrics.json, so an operator sees it). One node among N moves the model by at
# most CLIP_UPDATE_NORM / N per round, whatever it sends.
CLIP_UPDATE_NORM = 5.0
# Beyond this (200x the clip) an update is not a training result at all: rejected, not clipped.
REJECT_UPDATE_NORM = 1_000.0
# npy header bytes allowed beyond the array's data (numpy writes 128 for these shapes).
MAX_NPY_HEADER = 1_024
# Longest text from a node (reason, name) that reaches a log line or metrics.json.
MAX_TEXT = 240
MAX_NAMES_LISTED = 5


def escape(value: object, limit: int = MAX_TEXT) -> str:
    """Node-supplied text made safe for one log line: control and format characters (bidi
    overrides too), line and paragraph separators escaped as ``\\xNN``/``\\uNNNN``; at most
    ``limit`` characters kept."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    out = []
    for ch in text[:limit]:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    if cut:
        out.append(f"...[{len(text) - limit} more chars]")
    return "".join(out)


def _names(names: Iterable[object]) -> str:
    items = sorted(str(n) for n in names)
    shown = ", ".join(escape(repr(n[:40]), 60) for n in items[:MAX_NAMES_LISTED])
    more = len(items) - MAX_NAMES_LISTED
    return f"[{shown}{f', +{more} more' if more > 0 else ''}]"


def parse_node_regions(spec: str) -> dict[int, str]:
    """``"ID=region,ID=region"`` (Flower node ids) -> ``{id: region}``; empty = ``{}``.

    Region names must be unique: each node's ε is reported under its region's name.
    """
    out: dict[int, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        raw_id, sep, region = (p.strip() for p in item.partition("="))
        if not sep or not raw_id.isdigit() or not region:
            raise ValueError(f"node-regions: bad item {item!r}; expected 'NODE_ID=region'")
        node_id = int(raw_id)
        if node_id in out:
            raise ValueError(f"node-regions: node id {node_id} is listed twice")
        if region in out.values():
            raise ValueError(f"node-regions: region {region!r} is given to two node ids")
        out[node_id] = region
    return out


def update_norm(delta: Iterable[np.ndarray]) -> float:
    """L2 norm over several float64 arrays, without overflow for huge finite values."""
    parts = [np.asarray(d, dtype=np.float64).reshape(-1) for d in delta]
    scale = max((float(np.max(np.abs(p))) for p in parts if p.size), default=0.0)
    if scale == 0.0:
        return 0.0
    if not math.isfinite(scale):
        return math.inf
    return scale * math.sqrt(sum(float(np.sum((p / scale) ** 2)) for p in parts))


def _decode(arr: object, key: str, ref: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Check one Flower ``Array``'s metadata and npy header, then decode it."""
    if not isinstance(arr, Array):
        return None, f"{key}: not an Array"
    if arr.stype != NUMPY_STYPE:
        return None, f"{key}: serialization {escape(arr.stype, 40)!r}, expected {NUMPY_STYPE}"
    if arr.dtype != "float32":
        return None, f"{key}: dtype {escape(arr.dtype, 40)!r}, expected float32"
    if tuple(arr.shape) != ref.shape:
        return None, f"{key}: shape {escape(tuple(arr.shape), 60)}, expected {ref.shape}"
    data = arr.data
    nbytes = ref.size * EXPECTED_DTYPE.itemsize
    if not isinstance(data, bytes | bytearray) or not (
        nbytes < len(data) <= nbytes + MAX_NPY_HEADER
    ):
        size = len(data) if isinstance(data, bytes | bytearray) else "?"
        return None, f"{key}: {size} bytes of data, expected {nbytes} + an npy header"
    fh = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(
                fh, max_header_size=MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(
                fh, max_header_size=MAX_NPY_HEADER)
        else:
            return None, f"{key}: npy format version {version} not accepted"
    except Exception as exc:  # a malformed header must not crash the round
        return None, f"{key}: bad npy header ({type(exc).__name__})"
    if dtype != EXPECTED_DTYPE or tuple(shape) != ref.shape:
        return None, (f"{key}: npy header says {escape(dtype, 40)} {escape(shape, 60)}, "
                      f"expected float32 {ref.shape}")
    offset = fh.tell()
    if len(data) - offset != nbytes:
        return None, f"{key}: {len(data) - offset} data bytes after the header, expected {nbytes}"
    flat = np.frombuffer(data, dtype=EXPECTED_DTYPE, count=ref.size, offset=offset)
    return flat.reshape(ref.shape, order="F" if fortran else "C"), None


def metric_problems(record: object) -> tuple[dict[str, float], list[str]]:
    """The reply's metrics as floats, or why they are not acceptable."""
    if not isinstance(record, MetricRecord):
        return {}, [f"record {METRICS!r} is not a MetricRecord"]
    problems = []
    keys = set(record.keys())
    if missing := set(EXPECTED_METRICS) - keys:
        problems.append(f"missing metric(s) {_names(missing)}")
    if extra := keys - set(EXPECTED_METRICS):
        problems.append(f"unexpected metric(s) {_names(extra)}")
    values: dict[str, float] = {}
    for key in EXPECTED_METRICS:
        if key not in keys:
            continue
        value = record[key]
        if type(value) not in (int, float):  # no bool, no list
            problems.append(f"metric {key!r} is a {escape(type(value).__name__, 20)}, "
                            f"not a number")
        elif not math.isfinite(float(value)):  # type: ignore[arg-type]
            problems.append(f"metric {key!r} is not finite")
        elif key in NONNEGATIVE_METRICS and float(value) < 0:  # type: ignore[arg-type]
            problems.append(f"metric {key!r} is negative: {float(value):.4g}")  # type: ignore[arg-type]
        else:
            values[key] = float(value)  # type: ignore[arg-type]
    return values, problems


@dataclass
class CheckedReply:
    """A reply that passed :func:`check_reply`, with its update already clipped."""

    arrays: dict[str, np.ndarray]  # float32, sent + clipped update
    metrics: dict[str, float]  # EXPECTED_METRICS, num-examples rewritten to 1.0
    claimed_name: str | None
    norm: float  # the update's norm as sent
    clipped: bool
    # Memorised evidence: what bounding did (None = as sent), whether the delta was dropped
    # (a second release), and whether the reply added any evidence at all.
    evidence_cut: dict[str, float] | None = None
    evidence_dropped: bool = False
    evidence_added: bool = False

    def content(self) -> RecordDict:
        """The canonical RecordDict handed to Flower's strategy."""
        return RecordDict({
            ARRAYS: ArrayRecord({k: Array(v) for k, v in self.arrays.items()}),
            METRICS: MetricRecord(dict(self.metrics)),
        })


def check_reply(
    content: RecordDict,
    reference: Mapping[str, np.ndarray],
    *,
    clip_norm: float = CLIP_UPDATE_NORM,
    reject_norm: float = REJECT_UPDATE_NORM,
    evidence_bound: EvidenceBound | None = None,
    evidence_allowed: bool = True,
) -> tuple[CheckedReply | None, list[str]]:
    """Validate a train reply against the weights sent (``reference``); clip its update.

    Evidence arrays (when sent) are bounded by ``evidence_bound`` (``server.evidence``);
    with ``evidence_allowed=False`` (the node already released) their delta is set to zero.

    Returns ``(checked, [])`` or ``(None, problems)``.
    """
    names = set(content.keys())
    problems = []
    if missing := {ARRAYS, METRICS} - names:
        problems.append(f"missing record(s) {_names(missing)}")
    if extra := names - {ARRAYS, METRICS, NODE}:
        problems.append(f"unexpected record(s) {_names(extra)}")
    if problems:
        return None, problems
    claimed: str | None = None
    if NODE in names:
        node = content[NODE]
        name = node.get("name") if isinstance(node, ConfigRecord) else None
        if not isinstance(node, ConfigRecord) or set(node.keys()) != {"name"} or not (
            isinstance(name, str) and 0 < len(name) <= 200
        ):
            problems.append(f"record {NODE!r} must be a ConfigRecord {{'name': str}}")
        else:
            claimed = name
    metrics, metric_issues = metric_problems(content[METRICS])
    problems += metric_issues
    record = content[ARRAYS]
    if not isinstance(record, ArrayRecord):
        return None, problems + [f"record {ARRAYS!r} is not an ArrayRecord"]
    keys = set(record.keys())
    if missing := set(reference) - keys:
        problems.append(f"missing array(s) {_names(missing)}")
    if extra := keys - set(reference):
        problems.append(f"unexpected array(s) {_names(extra)}")
    if problems:  # decode nothing from a reply that is already refused
        return None, problems
    decoded: dict[str, np.ndarray] = {}
    for key, ref in reference.items():
        arr, problem = _decode(record[key], key, np.asarray(ref))
        if problem is not None:
            problems.append(problem)
        elif arr is not None and not np.all(np.isfinite(arr)):
            problems.append(f"{key}: NaN or Inf values")
        elif arr is not None:
            decoded[key] = arr
    if problems:
        return None, problems
    refs = {k: np.asarray(v, dtype=np.float64) for k, v in reference.items()}
    delta = {k: decoded[k].astype(np.float64) - refs[k] for k in reference}
    # Memorised evidence arrays carry DP counts, not a training update (server.evidence):
    # outside the head's update norm and clip, bounded on their own (EvidenceBound).
    evidence_cut: dict[str, float] | None = None
    dropped = added = False
    if all(k in delta for k in EVIDENCE_KEYS):
        added = any(bool(np.any(delta[k] != 0)) for k in EVIDENCE_KEYS)
        if added and not evidence_allowed:
            dropped, added = True, False
            delta.update({k: np.zeros_like(delta[k]) for k in EVIDENCE_KEYS})
        elif added and evidence_bound is not None:
            bounded, evidence_cut = evidence_bound.apply({k: delta[k] for k in EVIDENCE_KEYS})
            delta.update(bounded)
    norm = update_norm(v for k, v in delta.items() if k not in EVIDENCE_KEYS)
    if not norm <= reject_norm:
        return None, [f"update norm {norm:.3g} is beyond any training result "
                      f"(rejected above {reject_norm:g})"]
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    arrays = {
        k: (refs[k] + delta[k] * (1.0 if k in EVIDENCE_KEYS else scale)).astype(np.float32)
        for k in reference
    }
    metrics[WEIGHT_KEY] = 1.0  # uniform weights: never the node's own claim
    return CheckedReply(arrays, metrics, claimed, norm, scale < 1.0, evidence_cut, dropped,
                        added), []


def reply_problems(
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, Any],
    *,
    reference: Mapping[str, np.ndarray],
    max_update_norm: float = REJECT_UPDATE_NORM,
) -> list[str]:
    """:func:`check_reply` on plain numpy arrays and a metrics mapping (tests, tools)."""
    try:
        content = RecordDict({
            ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            METRICS: MetricRecord(dict(metrics)),
        })
    except Exception as exc:
        return [f"not a valid reply: {type(exc).__name__}"]
    return check_reply(content, reference, reject_norm=max_update_norm)[1]


@dataclass
class RoundReplies:
    """What validation did with one round's replies (for metrics.json)."""

    rejected: list[dict[str, Any]] = field(default_factory=list)
    clipped: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    # Evidence deltas bounded (EvidenceBound) or dropped (a node's second release).
    evidence: list[dict[str, Any]] = field(default_factory=list)
    # Robust aggregation (server.strategies.RobustHead): nodes the rule kept at less than
    # half an average node's share, with their kept share.
    downweighted: list[dict[str, Any]] = field(default_factory=list)
    # Every node the rule kept less than all of (normbound / centeredclip: the clip acted),
    # down-weighted or not: shows whether an honest round was left the plain mean.
    robust_clipped: list[dict[str, Any]] = field(default_factory=list)
    # centeredclip / deviationdrop: each reply's distance from the coordinate-wise median
    # over the median distance (the rule acts beyond robust-center-radius).
    robust_spread: list[float] = field(default_factory=list)


def aggregation_events(
    round_: int, report: RoundReplies, *, node_epsilon: Mapping[str, float], clip_norm: float,
    delta: float,
) -> list[LedgerEvent]:
    """Server-ledger lines for one round: each node whose update was rejected, clipped or
    down-weighted (``refusal`` lines with no steps and the node's last reported ε, detail
    prefixed by ``privacy.audit.AGGREGATION_DETAIL_PREFIX``; the audit lists them)."""
    from privacy.audit import AGGREGATION_DETAIL_PREFIX

    actions: list[tuple[str, str]] = []
    actions += [(r["node"], f"rejected: {r['reason']}") for r in report.rejected]
    actions += [(r["node"], f"clipped: update norm {r['norm']:.4g} clipped to the server's "
                 f"bound") for r in report.clipped]
    actions += [(r["node"], f"down-weighted: {r['rule']} kept {100 * r['kept_share']:.1f}% "
                 f"of its update (an average node {100 * r['expected_share']:.1f}%)")
                for r in report.downweighted]
    actions += [(r["node"], f"evidence rate-clamped: {r['pairs']} pair(s), "
                 f"{r['clicks_removed']:.4g} click(s) above the other nodes' rates removed")
                for r in report.evidence if r.get("action") == "rate-clamped"]
    return [
        LedgerEvent(
            node=name, round=round_, mechanism="refusal", unit_of_privacy="user",
            noise_multiplier=0.0, sample_rate=0.0, steps=0, clip_norm=clip_norm, delta=delta,
            accountant="rdp", epsilon_after=float(node_epsilon.get(name, 0.0)),
            detail=AGGREGATION_DETAIL_PREFIX + escape(text, 2 * MAX_TEXT),
        )
        for name, text in actions
    ]


class ValidatingStrategy(DelegatingStrategy):
    """Wraps a Flower strategy; replies that fail :func:`check_reply` are dropped, the others
    reach it clipped, with uniform weights and canonical content.

    Error replies (a node that refused, e.g. on budget) are logged with their reason, escaped.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        clip_norm: float = CLIP_UPDATE_NORM,
        reject_norm: float = REJECT_UPDATE_NORM,
        node_regions: Mapping[int, str] | None = None,
        region_caps: Mapping[str, float] | None = None,
        on_cap_refusal: Callable[[int, str, float, float], None] | None = None,
        on_round: Callable[[int, RoundReplies], None] | None = None,
        evidence_bound: EvidenceBound | None = None,
        evidence_released: Iterable[int] = (),
        robust: RobustHead | None = None,
        evidence_rate_clamp: float = math.inf,
    ) -> None:
        if not 0 < clip_norm <= reject_norm:
            raise ValueError(
                f"need 0 < clip_norm <= reject_norm, got {clip_norm!r} and {reject_norm!r}"
            )
        self.inner = inner
        self.clip_norm = clip_norm
        self.reject_norm = reject_norm
        self.node_regions = dict(node_regions or {})
        self.region_caps = dict(region_caps or {})
        self.on_cap_refusal = on_cap_refusal
        self.on_round = on_round
        self.evidence_bound = evidence_bound
        self.robust = robust
        if not evidence_rate_clamp >= 0:
            raise ValueError(f"evidence_rate_clamp must be >= 0 (inf: off), got "
                             f"{evidence_rate_clamp!r}")
        self.evidence_rate_clamp = evidence_rate_clamp
        # Node ids whose evidence was accepted (once per node; the server app persists it in
        # the run directory and passes it back on resume).
        self.evidence_released: set[int] = set(evidence_released)
        self._eps_history: dict[str, list[float]] = {}
        self._sent: dict[str, np.ndarray] = {}
        self._claims: dict[int, str] = {}  # last name each node claimed (logged on change)
        self._unmapped_logged: set[int] = set()
        self.rejected: list[tuple[int, int, str]] = []  # (round, node id, reason)
        self.node_epsilon: dict[str, float] = {}  # latest ε per node (server's names)

    def identity(self, node_id: int) -> str:
        """The server's name for a Flower node id (``node-regions``, else ``node-<id>``)."""
        name = self.node_regions.get(node_id)
        if name is not None:
            return name
        if self.node_regions and node_id not in self._unmapped_logged:
            self._unmapped_logged.add(node_id)
            log.warning("node id %s is not in node-regions: calling it node-%s", node_id,
                        node_id)
        return f"node-{node_id}"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = {k: v.numpy() for k, v in arrays.items()}
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if not self.region_caps:
            return messages
        scheduled = []
        for msg in messages:
            name = self.identity(msg.metadata.dst_node_id)
            predicted = self.predicted_epsilon(name)
            cap = self.region_caps.get(name)
            if cap is not None and predicted is not None and predicted > cap:
                log.warning(
                    "round %s: not scheduling %s: its ε would reach about %.4f, past its "
                    "region cap %g", server_round, name, predicted, cap,
                )
                if self.on_cap_refusal is not None:
                    self.on_cap_refusal(server_round, name, predicted, cap)
                continue
            scheduled.append(msg)
        return scheduled

    def predicted_epsilon(self, name: str) -> float | None:
        """ε a node would report after one more round: last ε plus its last increment.

        ε composes sub-additively over rounds, so the last increment over-estimates the
        next one: the prediction errs on the side of not scheduling.
        """
        history = self._eps_history.get(name, [])
        if not history:
            return None
        step = history[-1] - history[-2] if len(history) > 1 else history[-1]
        return history[-1] + step

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good: list[Message] = []
        releasing: list[Message] = []  # accepted replies that added evidence this round
        report = RoundReplies()
        for msg in replies:
            node = msg.metadata.src_node_id
            name = self.identity(node)
            if msg.has_error():
                reason = escape(msg.error.reason)
                log.warning("round %s: node %s (%s) sent no update: %s", server_round, node,
                            name, reason)
                report.refused.append({"node_id": node, "node": name, "reason": reason})
                continue
            try:
                checked, problems = check_reply(
                    msg.content, self._sent, clip_norm=self.clip_norm,
                    reject_norm=self.reject_norm, evidence_bound=self.evidence_bound,
                    evidence_allowed=node not in self.evidence_released,
                )
            except Exception as exc:  # belt and braces: one reply never aborts the round
                checked, problems = None, [f"unreadable reply ({type(exc).__name__})"]
            if checked is None:
                reason = escape("; ".join(problems), 2 * MAX_TEXT)
                log.warning("round %s: rejected reply from node %s (%s): %s", server_round,
                            node, name, reason)
                self.rejected.append((server_round, node, reason))
                report.rejected.append({"node_id": node, "node": name, "reason": reason})
                continue
            self._note_claim(node, name, checked.claimed_name)
            if checked.clipped:
                log.warning("round %s: clipped the update of node %s (%s) from norm %.4g to "
                            "%g", server_round, node, name, checked.norm, self.clip_norm)
                report.clipped.append(
                    {"node_id": node, "node": name, "norm": round(checked.norm, 6)}
                )
            if checked.evidence_added:
                self.evidence_released.add(node)
            if checked.evidence_dropped:
                log.warning("round %s: dropped the evidence of node %s (%s): it released "
                            "before (once per node)", server_round, node, name)
                report.evidence.append({"node_id": node, "node": name, "action": "dropped"})
            elif checked.evidence_cut is not None:
                cut = checked.evidence_cut
                log.warning("round %s: bounded the evidence of node %s (%s): norm %.4g, "
                            "cap %.4g", server_round, node, name, cut["evidence_norm"],
                            cut["l2_cap"])
                report.evidence.append({"node_id": node, "node": name, "action": "bounded",
                                        **{k: round(float(v), 6) for k, v in cut.items()}})
            msg.content = checked.content()
            good.append(msg)
            if checked.evidence_added:
                releasing.append(msg)
            epsilon = checked.metrics["epsilon"]
            self.node_epsilon[name] = epsilon
            self._eps_history.setdefault(name, []).append(epsilon)
        if self.robust is not None and good:
            self._robust_round(server_round, good, report)
        if not math.isinf(self.evidence_rate_clamp) and len(releasing) >= 3:
            self._clamp_evidence_rates(server_round, releasing, report)
        if self.on_round is not None:
            self.on_round(server_round, report)
        if not good:
            log.warning("round %s: no valid replies; global model unchanged", server_round)
            return None, None
        return self.inner.aggregate_train(server_round, good)

    def _robust_round(self, server_round: int, good: list[Message], report: RoundReplies
                      ) -> None:
        """Robust head aggregate into every accepted reply; note the down-weighted nodes."""
        from server.strategies import CLIP_RULES, DOWNWEIGHT_FRACTION

        assert self.robust is not None
        shares = self.robust.apply(server_round, good, sent=self._sent)
        expected = self.robust.expected_share(len(good))
        report.robust_spread = list(self.robust.last_spread)
        for msg, share in zip(good, shares, strict=True):
            if self.robust.rule in CLIP_RULES and share < 1.0:
                report.robust_clipped.append({"node_id": msg.metadata.src_node_id,
                                              "node": self.identity(msg.metadata.src_node_id),
                                              "kept_share": round(share, 4)})
            if share < DOWNWEIGHT_FRACTION * expected:
                node = msg.metadata.src_node_id
                name = self.identity(node)
                log.warning("round %s: %s kept %.0f%% of the update of node %s (%s); an "
                            "average node %.0f%%", server_round, self.robust.rule,
                            100 * share, node, name, 100 * expected)
                report.downweighted.append({"node_id": node, "node": name,
                                            "rule": self.robust.rule,
                                            "kept_share": round(share, 4),
                                            "expected_share": round(expected, 4)})

    def _clamp_evidence_rates(self, server_round: int, releasing: list[Message],
                              report: RoundReplies) -> None:
        """Cap each releasing node's clicks per pair by the other nodes' click rates
        (:func:`shared_model.evidence.median_rate_caps`; post-processing of DP releases).

        ``releasing``: the accepted replies that added evidence this round (at least three:
        a median of the others needs two others)."""
        base = {k: np.asarray(self._sent[k], np.float64) for k in EVIDENCE_KEYS}
        clicks, exam, stds = [], [], []
        for msg in releasing:
            record = msg.content.array_records["arrays"]
            d = {k: record[k].numpy().astype(np.float64) - base[k] for k in EVIDENCE_KEYS}
            clicks.append(d[EVIDENCE_CLICKS])
            exam.append(d[EVIDENCE_EXAM])
            stds.append(math.sqrt(max(float(d[EVIDENCE_NOISE_VAR].sum()), 0.0)))
        caps = median_rate_caps(np.stack(clicks), np.stack(exam), np.asarray(stds),
                                z=self.evidence_rate_clamp)
        for msg, c, cap in zip(releasing, clicks, caps, strict=True):
            capped = np.minimum(c, cap)
            cut = capped < c
            if not cut.any():
                continue
            record = msg.content.array_records["arrays"]
            arrays = {k: record[k].numpy() for k in record}
            arrays[EVIDENCE_CLICKS] = (base[EVIDENCE_CLICKS] + capped).astype(np.float32)
            msg.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
            node = msg.metadata.src_node_id
            name = self.identity(node)
            removed = float(np.sum(c - capped))
            log.warning("round %s: capped the evidence clicks of node %s (%s) on %d pair(s) "
                        "to the other nodes' click rates (%.4g clicks removed)", server_round,
                        node, name, int(cut.sum()), removed)
            report.evidence.append({"node_id": node, "node": name, "action": "rate-clamped",
                                    "pairs": int(cut.sum()),
                                    "clicks_removed": round(removed, 3)})

    def _note_claim(self, node: int, name: str, claimed: str | None) -> None:
        if claimed is None or claimed == name or self._claims.get(node) == claimed:
            return
        self._claims[node] = claimed
        log.info("node %s is %s to this server; it calls itself %r (a claim, not used)",
                 node, name, escape(claimed, 80))
