"""The fedrank ServerApp: parse settings, pick the shape, run Flower's strategy.

- regional: FedAvg/FedAdam (new Message API) wrapped in reply validation (strict reply
  format, server-side update clipping, uniform weights, node names from the server's own
  ``node-regions``: ``server.validation``); nodes do DP-SGD.
- device: client-level DP (adaptive clipping) + SecAgg+ on Flower's legacy workflow
  (``server.device``).
Each round: central evaluation on held-out queries, a checkpoint, ``metrics.json``.
A run directory with a checkpoint resumes from it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from privacy.ledger import Ledger, LedgerEvent, server_signer
from server.checkpoint import RunDirectory
from server.evaluator import CentralEvaluator
from server.evidence import EvidenceBound, EvidenceSumming, initial_evidence
from server.recorder import PROGRESS, RoundRecorder
from server.releases import ReleaseCarrier, ReleasePublisher, deliver_release
from server.strategies import RobustHead, build_strategy, restore_strategy_state, strategy_state
from server.validation import ValidatingStrategy, aggregation_events, parse_node_regions
from shared_model.evidence import split_evidence
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.release import signing_key_dir
from shared_model.settings import RunSettings
from shared_model.state import head_state, shrink_state

app = ServerApp()
log = logging.getLogger("fedrank.server")


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) one federated training run."""
    _setup_logging()
    settings = RunSettings.from_config(context.run_config)
    if settings.privacy_shape == "device":
        from server.device import run_device

        run_device(grid, context, settings)
        return
    run_regional(grid, settings)


class ServedEvaluator:
    """The central evaluator applied to the served weights (``serve``); keeps ``baselines``."""

    def __init__(
        self,
        evaluator: CentralEvaluator,
        serve: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    ) -> None:
        self.evaluator = evaluator
        self.serve = serve
        self.baselines = evaluator.baselines

    def __call__(self, weights: dict[str, np.ndarray]) -> dict[str, float]:
        return self.evaluator(self.serve(weights))


def run_regional(grid: Grid, settings: RunSettings) -> None:
    """Regional shape on Flower's new strategy API."""
    run_dir = RunDirectory(Path(settings.run_dir))
    config = settings.to_config()
    run_dir.write_config(config)
    evaluator = CentralEvaluator(settings)
    # Nodes' ε (max over a round's replies) goes to the recorder, created below.
    inner = build_strategy(settings, on_epsilon=lambda eps: recorder.note_epsilon(eps))
    # Signed with the server's key, kept beside the release signing key outside the run dir.
    ledger = Ledger(
        run_dir.root / "ledger" / "server.jsonl",
        signer=server_signer(signing_key_dir(run_dir.root)),
    )

    def record_cap_refusal(rnd: int, name: str, predicted: float, cap: float) -> None:
        ledger.append(
            LedgerEvent(
                node=name, round=rnd + recorder.offset, mechanism="refusal",
                unit_of_privacy="user", noise_multiplier=0.0, sample_rate=0.0, steps=0,
                clip_norm=settings.clip_norm, delta=settings.delta, accountant="rdp",
                epsilon_after=strategy.node_epsilon.get(name, 0.0),
                detail=f"server did not schedule {name}: predicted ε {predicted:.4f} > "
                f"region cap {cap:g}",
            )
        )

    node_regions = parse_node_regions(settings.node_regions)
    caps = settings.region_caps()
    if node_regions and (unknown := sorted(set(caps) - set(node_regions.values()))):
        log.warning("region-epsilon-caps names regions no node id maps to: %s", unknown)
    aggregating = EvidenceSumming(inner) if settings.evidence_share else inner
    head_config = HeadConfig(hidden_dim=settings.hidden_dim)
    publisher = ReleasePublisher(
        run_dir.root, every=settings.release_every, head_config=head_config,
        final_round=settings.num_server_rounds,
    )
    # Signed releases ride on train messages to nodes that lack them (server.releases).
    carrier = ReleaseCarrier(aggregating, publisher)
    # Node ids whose evidence the server accepted: once per node, across restarts too.
    released_path = run_dir.root / "evidence_released.json"
    released = json.loads(released_path.read_text()) if released_path.exists() else []

    def on_round(rnd: int, replies: Any) -> None:
        recorder.note_replies(rnd, asdict(replies))
        # Nodes whose update was rejected, clipped or down-weighted (issue 11): signed lines.
        for event in aggregation_events(
            rnd + recorder.offset, replies, node_epsilon=strategy.node_epsilon,
            clip_norm=settings.clip_norm, delta=settings.delta,
        ):
            ledger.append(event)
        if strategy.evidence_released != set(released):
            released[:] = sorted(strategy.evidence_released)
            tmp = released_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(released))
            os.replace(tmp, released_path)

    strategy = ValidatingStrategy(
        carrier, node_regions=node_regions, region_caps=caps,
        on_cap_refusal=record_cap_refusal, on_round=on_round,
        evidence_bound=EvidenceBound.from_settings(settings) if settings.evidence_share
        else None,
        evidence_released=[int(n) for n in released],
        robust=RobustHead.from_settings(settings),
        evidence_rate_clamp=settings.evidence_rate_clamp,
    )
    checkpoint = run_dir.load_latest()
    if checkpoint is None:
        arrays = head_state(RankerHead(HeadConfig(hidden_dim=settings.hidden_dim)))
        if settings.evidence_share:  # memorised click evidence travels with the head
            arrays.update(initial_evidence(evaluator.evidence_index()))
        offset, previous = 0, []
    else:
        arrays, offset, previous = checkpoint.arrays, checkpoint.round, checkpoint.metrics_rounds
        restore_strategy_state(inner, checkpoint.strategy_state)
        log.info(
            "%s resuming %s from round %d (weights %s)",
            PROGRESS, settings.run_dir, offset, checkpoint.weights_sha256[:12],
        )
    remaining = settings.num_server_rounds - offset
    carrier.round_offset = offset

    def served(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # What the run evaluates and releases: the head shrunk toward zero-shot (public
        # post-processing; the nodes keep training the unshrunk global weights).
        return shrink_state(weights, settings.head_shrink, head_config)

    recorder = RoundRecorder(
        run_dir,
        evaluate=ServedEvaluator(evaluator, served),
        strategy_state=lambda: strategy_state(inner),
        config=config,
        total_rounds=settings.num_server_rounds,
        offset=offset,
        previous_rounds=previous,
        after_round=lambda rnd, weights, metrics: publisher.maybe_publish(
            rnd, split_evidence(served(weights))[0], metrics=metrics,
            epsilon_per_node=strategy.node_epsilon,
            evidence=lambda: evaluator.release_evidence(served(weights)),
        ),
    )
    if remaining <= 0:
        log.info("%s run already complete (%d rounds)", PROGRESS, offset)
        return

    def evaluate_fn(server_round: int, record: ArrayRecord) -> MetricRecord:
        values: dict[str, int | float | list[int] | list[float]] = dict(
            recorder(server_round, {k: v.numpy() for k, v in record.items()})
        )
        return MetricRecord(values)

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        num_rounds=remaining,
        train_config=ConfigRecord({"round-offset": offset}),
        evaluate_fn=evaluate_fn,
    )
    deliver_release(grid, carrier)  # the final release, to every node that lacks it
    final = {k: v for k, v in recorder.metrics_json()["final"].items() if k != "replies"}
    log.info("%s done: %s", PROGRESS, final)
