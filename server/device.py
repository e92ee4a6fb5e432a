"""Device shape: one client per user, client-level DP with adaptive clipping, SecAgg+.

Flower's SecAgg+ exists only on its legacy workflow, so this shape runs
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with the legacy FedAvg wrapped in
``DifferentialPrivacyClientSideAdaptiveClipping``: each sampled device clips its update
(``adaptiveclipping_mod``), SecAgg+ masks it, the server only ever sees the sum, adds
Gaussian noise to it, and adapts the clip bound from the clipped-count bits.

ε: Flower's ``RdpAccountant`` composes one ``GaussianPrivacyEvent`` per aggregated round
(fixed-size sampling without replacement, as the legacy client manager samples; the
noise multiplier z covers the update and the clipped-count query together). Each round is
also appended to ``RUN_DIR/ledger/server.jsonl``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import DifferentialPrivacyClientSideAdaptiveClipping
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)

from privacy.accounting import calibrate_client_level_noise
from privacy.ledger import Ledger, LedgerEvent
from server.checkpoint import RunDirectory
from server.evaluator import CentralEvaluator
from server.recorder import PROGRESS, RoundRecorder
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.settings import RunSettings
from shared_model.state import head_state

log = logging.getLogger("fedrank.server")

# Client-level DP parameters of the device shape (documented in README); the noise
# multiplier itself is calibrated from the run's ε budget (privacy.accounting).
INITIAL_CLIP_NORM = 0.5
TARGET_CLIPPED_QUANTILE = 0.5
CLIP_NORM_LR = 0.2


class AccountedAdaptiveClipping(DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive-clipping wrapper plus per-round accounting + ledger."""

    def __init__(
        self,
        strategy: LegacyFedAvg,
        noise_multiplier: float,
        num_sampled_clients: int,
        *,
        population: int,
        delta: float,
        ledger: Ledger,
        recorder: RoundRecorder,
        **kwargs: Any,
    ) -> None:
        super().__init__(strategy, noise_multiplier, num_sampled_clients, **kwargs)
        self.z = noise_multiplier
        self.population = population
        self.delta = delta
        self.ledger = ledger
        self.recorder = recorder
        self.accountant = RdpAccountant(
            PrivacyConfig(
                delta, population, NeighboringRelation.REPLACE_ONE,
                SamplingMethod.WITHOUT_REPLACEMENT,
            )
        )

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        clip_used = self.clipping_norm
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is not None:
            # Something was released: compose its privacy cost.
            self.accountant.compose(
                GaussianPrivacyEvent(
                    noise_multiplier=self.z,
                    sample_size=self.num_sampled_clients,
                    population_size=self.population,
                )
            )
            eps = float(self.accountant.get_privacy_spent().epsilon)
            self.recorder.note_epsilon(eps)
            self.ledger.append(
                LedgerEvent(
                    node="server", round=server_round, mechanism="client-level-gaussian",
                    unit_of_privacy="client", noise_multiplier=self.z,
                    sample_rate=self.num_sampled_clients / self.population, steps=1,
                    clip_norm=float(clip_used), delta=self.delta, accountant="rdp-wor",
                    epsilon_after=eps,
                    detail=f"sampled={self.num_sampled_clients} population={self.population}",
                )
            )
        return params, metrics


def run_device(grid: Grid, context: Context, settings: RunSettings) -> None:
    """Device shape: legacy DefaultWorkflow + SecAgg+ + client-level adaptive-clipping DP."""
    run_dir = RunDirectory(Path(settings.run_dir))
    config = settings.to_config()
    run_dir.write_config(config)
    evaluator = CentralEvaluator(settings)
    population = len(list(grid.get_node_ids()))
    sampled = max(2, int(population * settings.fraction_train))
    recorder = RoundRecorder(
        run_dir, evaluate=evaluator, strategy_state=dict, config=config,
        total_rounds=settings.num_server_rounds,
    )
    initial = head_state(RankerHead(HeadConfig(hidden_dim=settings.hidden_dim)))
    keys = list(initial)
    log.info("%s device shape: %d devices, %d sampled per round", PROGRESS, population, sampled)

    def evaluate_fn(server_round: int, ndarrays: list[np.ndarray], _cfg: dict) -> tuple:
        # Flower's DP wrapper adds float64 noise: the model itself is float32.
        weights = {k: np.asarray(a, dtype=np.float32) for k, a in zip(keys, ndarrays, strict=True)}
        metrics = recorder(server_round, weights)
        return metrics["ndcg@10"], metrics

    def fit_config(server_round: int) -> dict[str, Any]:
        return {"keys": ",".join(keys), "server-round": server_round}

    fedavg = LegacyFedAvg(
        fraction_fit=settings.fraction_train,
        fraction_evaluate=0.0,
        min_fit_clients=sampled,
        min_available_clients=population,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=fit_config,
        initial_parameters=ndarrays_to_parameters([initial[k] for k in keys]),
    )
    if settings.private:
        # The whole planned run meets the budget (hard cap, as nodes do in the regional shape).
        z = calibrate_client_level_noise(
            target_epsilon=settings.epsilon, delta=settings.delta, population=population,
            sample_size=sampled, rounds=settings.num_server_rounds,
        )
        log.info("%s client-level DP: noise multiplier %.3f for ε=%g over %d rounds",
                 PROGRESS, z, settings.epsilon, settings.num_server_rounds)
        strategy: Any = AccountedAdaptiveClipping(
            fedavg, z, sampled,
            population=population, delta=settings.delta,
            ledger=Ledger(Path(settings.run_dir) / "ledger" / "server.jsonl"),
            recorder=recorder,
            initial_clipping_norm=INITIAL_CLIP_NORM,
            target_clipped_quantile=TARGET_CLIPPED_QUANTILE,
            clip_norm_lr=CLIP_NORM_LR,
            # z must stay below 2 x this (Flower's adaptive-clipping constraint).
            clipped_count_stddev=max(sampled / 20.0, z),
        )
    else:
        strategy = fedavg
    # SecAgg+: shares among a small odd number of peers; threshold a majority of them.
    num_shares = min(sampled - (1 - sampled % 2), 7)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=num_shares,
            reconstruction_threshold=num_shares // 2 + 1,
            max_weight=1.0,
        )
        if settings.secagg
        else None
    )
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=settings.num_server_rounds),
        strategy=strategy,
    )
    workflow(grid, legacy)
    log.info("%s done: %s", PROGRESS, recorder.metrics_json()["final"])
