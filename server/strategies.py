"""Strategy choice for the regional shape: Flower's FedAvg or FedAdam, uniform weights,
with a robust aggregation rule for the head (issue 11).

Replies reach the strategy through ``server.validation.ValidatingStrategy``: clipped, with
``num-examples`` rewritten to 1 (uniform weights: no node's claim sets its influence).

Robust aggregation (:class:`RobustHead`, run config ``robust-aggregation``): before
FedAvg/FedAdam average the replies, the head arrays (never the memorised evidence, which is
summed) of the round's accepted replies go through one of Flower 1.42's robust strategies
(FedTrimmedAvg, FedMedian, Krum, MultiKrum, Bulyan), and every reply's head is replaced by
that robust aggregate, so the mean FedAvg (or FedAdam's pseudo-gradient) takes is the robust
one; or through a rule that bounds updates itself (:data:`CLIP_RULES`: ``normbound``,
``centeredclip`` and the default ``deviationdrop``, which leaves out an update farther from
the coordinate-wise median than ``robust-center-radius`` x the median distance and is the
plain mean in a round without one). Per node, :class:`RobustHead` also says how much of its
update the rule kept (``kept_share``): the share of head coordinates where its value entered
the aggregate (Krum family: 1 if selected, else 0; clip rules: the scale kept, 0 = left
out). A node kept at less than half the share the rule keeps of an average node is
*down-weighted* (:data:`DOWNWEIGHT_FRACTION`): metrics.json and the server
ledger record it.

Aggregated train metrics carry only public or DP-protected values: ``epsilon`` (the max over
nodes: the run is only as private as its least private node), ``steps`` (max) and
``release-round`` (min). No count and no loss: Flower logs this record every round.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.multikrum import select_multikrum

from shared_model.evidence import EVIDENCE_KEYS
from shared_model.settings import ROBUST_RULES, RunSettings

# Aggregated train metric -> how it combines over replies.
TRAIN_METRICS: dict[str, Callable[[list[float]], float]] = {
    "epsilon": max, "steps": max, "release-round": min,
}


def aggregate_train_metrics(
    records: list[RecordDict],
    weighting_key: str,
    on_epsilon: Callable[[float], None] | None = None,
) -> MetricRecord:
    """Only :data:`TRAIN_METRICS` (ε max, steps max, release round min); no weights used."""
    del weighting_key  # uniform: nothing is weighted by a node's claim
    values: dict[str, list[float]] = {key: [] for key in TRAIN_METRICS}
    for record in records:
        for metrics in record.metric_records.values():
            for key, bucket in values.items():
                value = metrics.get(key)
                if type(value) in (int, float) and math.isfinite(float(value)):  # type: ignore[arg-type]
                    bucket.append(float(value))  # type: ignore[arg-type]
    out = MetricRecord({key: TRAIN_METRICS[key](v) for key, v in values.items() if v})
    if "epsilon" in out and on_epsilon is not None:
        on_epsilon(float(out["epsilon"]))  # type: ignore[arg-type]
    return out


def build_strategy(
    settings: RunSettings, *, on_epsilon: Callable[[float], None] | None = None
) -> Strategy:
    """FedAvg or FedAdam per ``settings.strategy``; no federated evaluation (central only).

    ``on_epsilon`` receives the max ε the nodes reported in each aggregated round.
    """
    common: dict[str, Any] = dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=settings.min_train_nodes,
        min_available_nodes=settings.min_train_nodes,
        train_metrics_aggr_fn=functools.partial(aggregate_train_metrics, on_epsilon=on_epsilon),
    )
    if settings.strategy == "fedadam":
        return FedAdam(**common, eta=settings.server_learning_rate, eta_l=settings.learning_rate)
    return FedAvg(**common)


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Arrays a resumed run needs to continue the strategy (FedAdam's moments)."""
    state: dict[str, np.ndarray] = {}
    for name in ("m_t", "v_t"):
        moments = getattr(strategy, name, None)
        if moments:
            state.update({f"{name}/{k}": np.asarray(v) for k, v in moments.items()})
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Inverse of :func:`strategy_state`."""
    for name in ("m_t", "v_t"):
        moments = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(name + "/")}
        if moments and hasattr(strategy, name):
            setattr(strategy, name, moments)


# A node is "down-weighted" when the rule kept less than this fraction of the share it keeps
# of an average node (trimmed mean, n = 5, β = 0.2: each node is kept in 3/5 of coordinates
# on average; down-weighted below 3/10). A definition of what the ledger calls
# down-weighted, not a tuning knob: it changes no aggregate.
DOWNWEIGHT_FRACTION = 0.5


# Rules RobustHead applies itself to the updates (not a Flower strategy): each acts only on
# an update outside its bound, so an honest round stays the plain mean.
CLIP_RULES = ("normbound", "centeredclip", "deviationdrop")


def robust_strategy(rule: str, *, trim_beta: float, malicious_nodes: int, num_nodes: int
                    ) -> Strategy | None:
    """The Flower strategy for ``rule`` on ``num_nodes`` replies; ``None`` for ``"none"`` or
    when the rule cannot run on that many (Krum family: n > 2f + 2; Bulyan: n >= 4f + 3)."""
    if rule not in ROBUST_RULES:
        raise ValueError(f"robust rule must be one of {ROBUST_RULES}, got {rule!r}")
    if not 0 <= trim_beta < 0.5:
        raise ValueError(f"trim_beta must be in [0, 0.5), got {trim_beta!r}")
    if malicious_nodes < 0:
        raise ValueError(f"malicious_nodes must be >= 0, got {malicious_nodes!r}")
    common: dict[str, Any] = dict(
        fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1,
        train_metrics_aggr_fn=aggregate_train_metrics,
    )
    f = malicious_nodes
    if rule == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=trim_beta)
    if rule == "fedmedian":
        return FedMedian(**common)
    if rule in ("krum", "multikrum") and num_nodes > 2 * f + 2:
        return (Krum(**common, num_malicious_nodes=f) if rule == "krum" else
                MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=num_nodes - f))
    if rule == "bulyan" and num_nodes >= 4 * f + 3:
        return Bulyan(**common, num_malicious_nodes=f)
    # "none" and CLIP_RULES: RobustHead bounds the updates itself, FedAvg averages
    return None


def norm_bound_scales(norms: list[float], *, factor: float) -> list[float]:
    """Per update, the scale that clips it to ``factor`` x the median of ``norms``.

    Sun et al. (2019), "Can you really backdoor federated learning?": an update's norm is
    bounded, here relative to the round's median so the bound follows the honest DP-SGD
    update scale (a majority of honest nodes sets the median). 1.0 = untouched.
    """
    if not norms:
        return []
    bound = factor * float(np.median(norms))
    return [min(1.0, bound / n) if n > 0 else 1.0 for n in norms]


def median_deviations(updates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The coordinate-wise median of ``(n, d)`` updates and each update's L2 distance to it."""
    if updates.ndim != 2:
        raise ValueError(f"updates must be (n, d), got shape {updates.shape}")
    if len(updates) == 0:
        return np.zeros(updates.shape[1]), np.zeros(0)
    centre = np.median(updates, axis=0)
    return centre, np.linalg.norm(updates - centre, axis=1)


def centered_clip_scales(
    updates: np.ndarray, *, radius: float, drop: bool = False
) -> tuple[np.ndarray, list[float]]:
    """Centre and per-update scales of centered clipping around the coordinate-wise median.

    Karimireddy, He & Jaggi (2021), "Learning from History for Byzantine Robust
    Optimization": ``v = m + mean_i (x_i - m) min(1, tau / |x_i - m|)``. Here the centre
    ``m`` is the coordinate-wise median of the round's updates (no server history to
    trust) and ``tau = radius x median_i |x_i - m|``, so the bound follows the honest spread
    (DP noise plus regional differences) that a majority of honest nodes sets. An update
    inside the ball is kept whole: without an outlier the aggregate *is* the plain mean.
    ``drop``: an update outside the ball is left out (scale 0) instead of pulled onto it.

    Parameters
    ----------
    updates : np.ndarray
        ``(n, d)`` head updates (reply minus the weights sent), float64.
    radius : float
        ``tau`` as a multiple of the median deviation; ``>= 1``.
    drop : bool
        Leave out, rather than clip, an update beyond ``tau``.

    Returns
    -------
    centre : np.ndarray
        ``(d,)`` the coordinate-wise median.
    scales : list[float]
        Per update, the share of its deviation from the centre that is kept (1.0 = all).
    """
    centre, dev = median_deviations(updates)
    return centre, ball_scales(dev, radius=radius, drop=drop)


def ball_scales(dev: np.ndarray, *, radius: float, drop: bool) -> list[float]:
    """Per distance ``d_i``, the share kept inside ``tau = radius x median(d)``: 1 within
    it, else ``tau / d_i`` (clip) or 0 (``drop``)."""
    if not (radius >= 1 and np.isfinite(radius)):
        raise ValueError(f"radius must be finite and >= 1, got {radius!r}")
    tau = radius * float(np.median(dev)) if len(dev) else 0.0
    return [1.0 if d <= tau else (0.0 if drop else tau / d) for d in dev.tolist()]


def centered_aggregate(updates: np.ndarray, centre: np.ndarray, scales: list[float], *,
                       drop: bool) -> np.ndarray:
    """The rule's mean update: clipped deviations averaged over all ``n`` updates, or, with
    ``drop``, the plain mean of the updates kept (scale 1)."""
    w = np.asarray(scales, np.float64)
    if drop:
        kept = updates[w >= 1.0]
        return kept.mean(axis=0) if len(kept) else centre
    return centre + ((updates - centre) * w[:, None]).mean(axis=0)


def kept_shares(
    rule: str, heads: list[dict[str, np.ndarray]], *, trim_beta: float, malicious_nodes: int,
) -> list[float]:
    """Per reply, the share of head coordinates whose value entered the rule's aggregate.

    Trimmed mean: the value is not among the ``int(β·n)`` lowest or highest of its
    coordinate; median: it is (one of) the middle value(s); Krum/MultiKrum: 1 if selected
    (Flower's own ``select_multikrum``), else 0; Bulyan: selected by its Krum stage. Plain
    mean ("none"): 1 for all.
    """
    n = len(heads)
    if n == 0:
        return []
    if rule == "none" or n == 1:
        return [1.0] * n
    if rule in ("krum", "multikrum", "bulyan"):
        f = malicious_nodes
        if robust_strategy(rule, trim_beta=trim_beta, malicious_nodes=f, num_nodes=n) is None:
            return [1.0] * n
        select = {"krum": 1, "multikrum": n - f, "bulyan": n - 2 * f}[rule]
        contents = [RecordDict({"arrays": ArrayRecord(
            {k: Array(np.asarray(v, np.float32)) for k, v in h.items()})}) for h in heads]
        chosen = {id(c) for c in select_multikrum(contents, num_malicious_nodes=f,
                                                  num_nodes_to_select=select)}
        return [1.0 if id(c) in chosen else 0.0 for c in contents]
    flat = np.stack([np.concatenate([np.asarray(h[k], np.float64).ravel() for k in sorted(h)])
                     for h in heads])
    ranks = np.argsort(np.argsort(flat, axis=0, kind="stable"), axis=0, kind="stable")
    if rule == "fedtrimmedavg":
        cut = int(trim_beta * n)
        kept = (ranks >= cut) & (ranks < n - cut)
    else:  # fedmedian
        middle = [(n - 1) // 2, n // 2]
        kept = np.isin(ranks, middle)
    return [float(v) for v in kept.mean(axis=1)]


class RobustHead:
    """Replaces the head arrays of a round's accepted replies by a robust aggregate.

    ``apply`` runs Flower's robust strategy (:func:`robust_strategy`) on head-only copies of
    the replies (evidence arrays left out and left untouched), then writes the robust head
    into every reply, so the FedAvg/FedAdam downstream averages identical heads. Returns each
    reply's :func:`kept_shares`.
    """

    def __init__(self, rule: str, *, trim_beta: float = 0.2, malicious_nodes: int = 1,
                 norm_factor: float = 1.5, center_radius: float = 3.0) -> None:
        robust_strategy(rule, trim_beta=trim_beta, malicious_nodes=malicious_nodes,
                        num_nodes=0)  # validates the arguments, naming a bad one
        if not (norm_factor >= 1 and np.isfinite(norm_factor)):
            raise ValueError(f"norm_factor must be finite and >= 1, got {norm_factor!r}")
        if not (center_radius >= 1 and np.isfinite(center_radius)):
            raise ValueError(f"center_radius must be finite and >= 1, got {center_radius!r}")
        self.rule = rule
        self.center_radius = center_radius
        # centeredclip / deviationdrop: the last round's distances from the median over the
        # median distance (what the radius is compared with; recorded in metrics.json)
        self.last_spread: list[float] = []
        self.trim_beta = trim_beta
        self.malicious_nodes = malicious_nodes
        self.norm_factor = norm_factor

    @classmethod
    def from_settings(cls, settings: RunSettings) -> RobustHead | None:
        """``None`` when the run config asks for no robust rule."""
        if settings.robust_aggregation == "none":
            return None
        return cls(settings.robust_aggregation, trim_beta=settings.robust_trim_beta,
                   malicious_nodes=settings.robust_malicious_nodes,
                   norm_factor=settings.robust_norm_factor,
                   center_radius=settings.robust_center_radius)

    def expected_share(self, n: int) -> float:
        """The share of an average node's coordinates the rule keeps with ``n`` replies."""
        if self.rule == "fedtrimmedavg":
            return (n - 2 * int(self.trim_beta * n)) / n
        if self.rule == "fedmedian":
            return (1 if n % 2 else 2) / n
        if self.rule in CLIP_RULES:
            return 1.0
        f = self.malicious_nodes
        select = {"krum": 1, "multikrum": n - f, "bulyan": n - 2 * f}.get(self.rule, n)
        return max(select, 1) / n

    def apply(self, server_round: int, replies: list[Message],
              sent: Mapping[str, np.ndarray] | None = None) -> list[float]:
        """Rewrite ``replies`` (accepted, canonical content) in place; their kept shares.

        ``sent``: the weights this round sent (:data:`CLIP_RULES` work on updates relative to
        them; the other rules ignore it). Their share is the scale the rule kept (of the
        update, or of its deviation from the centre; 0 = left out).
        """
        n = len(replies)
        self.last_spread = []
        if self.rule in CLIP_RULES:
            if sent is None:
                raise ValueError(f"{self.rule} needs the weights sent this round")
            if self.rule != "normbound":
                return self._centered_clip(replies, sent)
            return self._norm_bound(replies, sent)
        inner = robust_strategy(self.rule, trim_beta=self.trim_beta,
                                malicious_nodes=self.malicious_nodes, num_nodes=n)
        if inner is None or n < 2:
            return [1.0] * n
        originals = [m.content for m in replies]
        heads = []
        for content in originals:
            record = content.array_records["arrays"]
            heads.append({k: record[k].numpy() for k in record if k not in EVIDENCE_KEYS})
        shares = kept_shares(self.rule, heads, trim_beta=self.trim_beta,
                             malicious_nodes=self.malicious_nodes)
        try:
            for msg, head, content in zip(replies, heads, originals, strict=True):
                msg.content = RecordDict({
                    "arrays": ArrayRecord({k: Array(np.array(v)) for k, v in head.items()}),
                    "metrics": MetricRecord(dict(content.metric_records["metrics"])),
                })
            arrays, _ = inner.aggregate_train(server_round, replies)
        finally:
            for msg, content in zip(replies, originals, strict=True):
                msg.content = content
        if arrays is None:
            return [1.0] * n
        robust = {k: np.asarray(v.numpy(), np.float32) for k, v in arrays.items()}
        for content in originals:
            record = content.array_records["arrays"]
            merged = {k: (robust[k] if k in robust else record[k].numpy()) for k in record}
            content["arrays"] = ArrayRecord({k: Array(v) for k, v in merged.items()})
        return shares

    def _centered_clip(self, replies: list[Message], sent: Mapping[str, np.ndarray]
                       ) -> list[float]:
        deltas = _head_deltas(replies, sent)
        if len(deltas) < 3:  # the median of two is their mean: nothing to measure against
            return [1.0] * len(deltas)
        keys = sorted(deltas[0])
        flat = np.stack([np.concatenate([d[k].ravel() for k in keys]) for d in deltas])
        drop = self.rule == "deviationdrop"
        centre, dev = median_deviations(flat)
        scales = ball_scales(dev, radius=self.center_radius, drop=drop)
        median = float(np.median(dev))
        self.last_spread = [round(float(d) / median, 3) if median > 0 else 0.0 for d in dev]
        if min(scales) >= 1.0:
            return scales  # nobody outside the ball: the replies' own plain mean, untouched
        step = centered_aggregate(flat, centre, scales, drop=drop)
        sizes = np.cumsum([deltas[0][k].size for k in keys])[:-1]
        step_by_key = {k: part.reshape(deltas[0][k].shape)
                       for k, part in zip(keys, np.split(step, sizes), strict=True)}
        # every reply carries the rule's aggregate, so FedAvg's uniform mean is exactly it
        for msg in replies:
            _set_head(msg, sent, step_by_key)
        return scales

    def _norm_bound(self, replies: list[Message], sent: Mapping[str, np.ndarray]
                    ) -> list[float]:
        deltas = _head_deltas(replies, sent)
        norms = [float(np.sqrt(sum(float(np.sum(v * v)) for v in d.values()))) for d in deltas]
        scales = norm_bound_scales(norms, factor=self.norm_factor)
        for msg, delta, scale in zip(replies, deltas, scales, strict=True):
            if scale < 1.0:
                _set_head(msg, sent, {k: scale * v for k, v in delta.items()})
        return scales


def _head_deltas(replies: list[Message], sent: Mapping[str, np.ndarray]
                 ) -> list[dict[str, np.ndarray]]:
    """Per reply, its head arrays minus the weights sent (float64; evidence left out)."""
    deltas = []
    for msg in replies:
        record = msg.content.array_records["arrays"]
        deltas.append({k: record[k].numpy().astype(np.float64) - np.asarray(sent[k], np.float64)
                       for k in record if k not in EVIDENCE_KEYS})
    return deltas


def _set_head(msg: Message, sent: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]
              ) -> None:
    """Set the reply's head arrays to ``sent + delta`` (float32); its evidence untouched."""
    record = msg.content.array_records["arrays"]
    merged = {k: (np.asarray(sent[k], np.float64) + delta[k]).astype(np.float32)
              if k in delta else record[k].numpy() for k in record}
    msg.content["arrays"] = ArrayRecord({k: Array(v) for k, v in merged.items()})
