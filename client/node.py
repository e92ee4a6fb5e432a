"""What a node does each round, without Flower: the ClientApp only unpacks and packs.

A node holds its own click log (never sent anywhere), its own state directory (privacy
accountant, plan, embedding cache) and its own ledger file. Each round it:

1. loads the global head from the server's arrays (shape-checked);
2. groups its clicks by user, keeping at most ``max_sessions_per_user`` sessions each;
3. regional shape: checks the accountant: if this round would take ε past the node's
   budget, refuses (and writes the refusal to its ledger); otherwise trains with DP-SGD and
   records the steps it actually took; device shape: trains plainly (the server clips and
   noises the update: client-level DP);
4. returns the new weights and aggregate metrics only.

**Privacy guarantee per user (regional shape).** A user's clicks all live at one node (their
region). Per round, at most ``max_sessions_per_user`` of their sessions enter one group, and
one group is one DP-SGD sample: Poisson sampling with rate q, per-sample clipping to C and
Gaussian noise σC. The accountant composes every step of every round (persisted across
restarts), so the node's reported ε bounds what the whole run reveals about any one user
(add/remove-one-user neighbouring relation), at δ. Server-side aggregation is
post-processing.

**Online learning** (run config ``online = true`` and a *folder* data path; ``client.inbox``).
Each round trains only on the click files that arrived since the node's last round, plus the
last ``replay-files`` files it already consumed; a round with nothing new is refused ("no new
clicks since round N"). A single-file data path, or ``online = false``, is a static log:
every round trains on all of it, as before. Files are marked consumed only after the round's
DP steps are in the accountant, so a crash in between re-trains (and re-accounts) them.

*Why ε stays a valid user-level bound across rounds.* Round r runs DP-SGD on the data set
D_r = the users in that round's files (new + replay), each user one sample (their sessions
in D_r, at most ``max_sessions_per_user``), with Poisson rate q_r = batch / |D_r|; the
accountant records (σ, q_r, steps) for every round. For any one user u, round r is the
subsampled Gaussian mechanism on D_r: if u has clicks in D_r, its RDP is the recorded
curve; if not, the round reveals nothing about u (RDP 0 <= the recorded curve). RDP
composes adaptively over rounds (each round's input weights depend on earlier outputs), so
the sum of the recorded curves bounds what the whole run reveals about u, however u's clicks
are spread over files and rounds, replays included (a replayed file is simply in D_r again
and is paid for again). It is conservative for users absent from some rounds. As in
standard DP-SGD, the round's user count |D_r| (hence q_r) is treated as public.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.evidence_release import attach_evidence, dp_sgd_noise_multiplier
from client.inbox import Inbox
from privacy.accountant_store import PersistentAccountant, plan_noise_multiplier
from privacy.ledger import Ledger, LedgerEvent
from shared_model.catalog import cached_feature_builder
from shared_model.clicklog import read_click_logs
from shared_model.evidence import split_evidence
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.release import ReleaseError, ReleaseStore, load_public_key
from shared_model.settings import RunSettings
from shared_model.state import head_state, load_head_state
from shared_model.training import (
    TrainConfig,
    build_user_groups,
    sample_rate_for,
    steps_per_round,
    train_head,
)

log = logging.getLogger("fedrank.node")

# node_config keys (deployment: `flower-supernode --node-config`; simulation: derived).
NODE_NAME = "node-name"
DATA_PATH = "data-path"
STATE_DIR = "state-dir"
LEDGER_DIR = "ledger-dir"
CATALOG_DIR = "catalog-dir"
PARTITION_ID = "partition-id"


@dataclass(frozen=True)
class NodeSettings:
    """Where a node's data and state live."""

    name: str
    data_path: Path
    state_dir: Path
    ledger_dir: Path
    catalog_dir: Path

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run: RunSettings) -> NodeSettings:
        """Deployment nodes name their paths; simulated ones derive them from partition-id."""
        if DATA_PATH in node_config:
            name = str(node_config.get(NODE_NAME, "node"))
            state = Path(str(node_config.get(STATE_DIR, f"node-state/{name}")))
            return cls(
                name=name,
                data_path=Path(str(node_config[DATA_PATH])),
                state_dir=state,
                ledger_dir=Path(str(node_config.get(LEDGER_DIR, state / "ledger"))),
                catalog_dir=Path(str(node_config.get(CATALOG_DIR, run.catalog_path()))),
            )
        if PARTITION_ID not in node_config:
            raise ValueError(
                f"node config needs {DATA_PATH!r} (deployment) or {PARTITION_ID!r} "
                f"(simulation); got keys {sorted(node_config)}"
            )
        pid = int(node_config[PARTITION_ID])
        run_dir = Path(run.run_dir)
        return cls(
            name=f"node-{pid}",
            data_path=Path(run.data_dir) / f"node-{pid}",
            state_dir=run_dir / "nodes" / f"node-{pid}",
            ledger_dir=run_dir / "ledger",
            catalog_dir=Path(str(node_config.get(CATALOG_DIR, run.catalog_path()))),
        )

    def uses_inbox(self, run: RunSettings) -> bool:
        """Inbox semantics (``client.inbox``): online runs whose data path is a folder."""
        return run.online and self.data_path.is_dir()

    def inbox(self) -> Inbox:
        """The node's inbox over its data folder; bookkeeping in its state folder."""
        return Inbox(self.data_path, self.state_dir)

    def round_click_files(
        self, run: RunSettings, server_round: int
    ) -> tuple[list[Path], list[Path]]:
        """(files to train on this round, files to mark consumed after it).

        Static log: every file, nothing to mark. Inbox: the files consumed by this round if
        it is being repeated (a resumed run), else the pending ones (available by
        ``server_round``), plus the replay buffer; :class:`NoNewClicks` when none are new.
        """
        if not self.uses_inbox(run):
            return self.click_files(), []
        inbox = self.inbox()
        new = inbox.consumed_in(server_round) or inbox.pending(server_round)
        if not new:
            raise NoNewClicks(
                f"node {self.name} has no new clicks since round {inbox.last_round} "
                f"(round {server_round}; inbox {self.data_path})"
            )
        replay = [
            p for p in inbox.replay(run.replay_files, before_round=server_round)
            if p not in new
        ]
        return replay + new, new

    def click_files(self) -> list[Path]:
        """The node's Parquet click logs: a file, or every ``*.parquet`` under a folder."""
        if self.data_path.is_dir():
            files = sorted(self.data_path.rglob("*.parquet"))
        elif self.data_path.exists():
            files = [self.data_path]
        else:
            raise FileNotFoundError(f"node {self.name}: click log not found: {self.data_path}")
        if not files:
            raise FileNotFoundError(f"node {self.name}: no .parquet click log in {self.data_path}")
        return files


@dataclass(frozen=True)
class PrivacyPlan:
    """The node's whole-run DP plan, fixed at its first round and persisted."""

    noise_multiplier: float
    batch_size: int
    planned_rounds: int
    budget_epsilon: float
    delta: float


class BudgetRefusal(Exception):
    """The node will not train: its next round would pass its ε budget."""


class NoNewClicks(BudgetRefusal):
    """Online node with no click file newer than its last round: nothing to train on.

    A :class:`BudgetRefusal` so the ClientApp answers it the same way (an error reply the
    server logs before carrying on); the reason names the last round that had data.
    """


@dataclass(frozen=True)
class RoundOutcome:
    """A node's reply content, Flower-free: weights and aggregate metrics only."""

    state: dict[str, np.ndarray]
    metrics: dict[str, float]


def _plan_path(node: NodeSettings) -> Path:
    return node.state_dir / "privacy_plan.json"


def load_or_make_plan(node: NodeSettings, run: RunSettings, num_users: int) -> PrivacyPlan:
    """Calibrate σ once so the whole planned run meets the budget; reuse it afterwards."""
    path = _plan_path(node)
    if path.exists():
        return PrivacyPlan(**json.loads(path.read_text()))
    config = TrainConfig(batch_size=run.batch_size, local_epochs=run.local_epochs)
    sigma = plan_noise_multiplier(
        budget_epsilon=run.epsilon,
        delta=run.delta,
        sample_rate=sample_rate_for(config, num_users),
        steps_per_round=steps_per_round(config, num_users),
        rounds=run.num_server_rounds,
    ) if not run.evidence_share else dp_sgd_noise_multiplier(  # the rest beside the release
        epsilon=run.epsilon, delta=run.delta, share=run.evidence_share,
        sample_rate=sample_rate_for(config, num_users),
        steps=steps_per_round(config, num_users) * run.num_server_rounds,
    )
    plan = PrivacyPlan(sigma, run.batch_size, run.num_server_rounds, run.epsilon, run.delta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(plan)))
    os.replace(tmp, path)
    return plan


def head_config(run: RunSettings) -> HeadConfig:
    """The head shape this run uses (server and nodes must agree)."""
    return HeadConfig(hidden_dim=run.hidden_dim)


def install_latest_release(node: NodeSettings, run: RunSettings) -> float:
    """File-drop delivery: verify and install the newest release the server published.

    Returns the round of the node's current release (0 = none). A release that fails
    verification is refused (logged) and the node keeps its last good one.
    """
    drop = Path(run.run_dir) / "releases"
    key_path = Path(run.run_dir) / "keys" / "server-signing.pub"
    store = ReleaseStore(node.state_dir)
    candidates = sorted(drop.glob("round-*")) if drop.is_dir() else []
    if candidates and key_path.exists() and store.current_version() != candidates[-1].name:
        try:
            store.install(candidates[-1], load_public_key(key_path))
        except ReleaseError as exc:
            log.warning("node %s refused release %s: %s", node.name, candidates[-1], exc)
    current = store.current_version()
    return float(current.split("-")[1]) if current else 0.0


def train_round(
    *,
    run: RunSettings,
    node: NodeSettings,
    global_state: Mapping[str, np.ndarray],
    server_round: int,
) -> RoundOutcome:
    """One round of local training; raises :class:`BudgetRefusal` when over budget."""
    head = RankerHead(head_config(run))
    load_head_state(head, split_evidence(global_state)[0])
    release_round = install_latest_release(node, run)
    builder = cached_feature_builder(str(node.catalog_dir), run.cache_dir)
    files, to_consume = node.round_click_files(run, server_round)
    clicks = read_click_logs(files)
    seed = run.seed * 1_000_003 + server_round * 7919 + _stable_hash(node.name)
    rng = np.random.default_rng(seed)
    groups = build_user_groups(
        clicks, builder, max_sessions_per_user=run.max_sessions_per_user, rng=rng
    )
    if groups.num_users == 0 and run.privacy_shape == "device":
        # A device whose user saw no exploration traffic would send a zero update, which
        # Flower's adaptive clipping cannot normalise (and one failed device fails the whole
        # round): it learns from its logged sessions instead.
        groups = build_user_groups(
            clicks, builder, max_sessions_per_user=run.max_sessions_per_user, rng=rng,
            exploration_only=False,
        )
    if run.privacy_shape == "device" or not run.private:
        config = TrainConfig(
            learning_rate=run.learning_rate,
            batch_size=run.batch_size,
            local_epochs=run.local_epochs,
            max_sessions_per_user=run.max_sessions_per_user,
            seed=seed % (2**31),
        )
        result, _ = train_head(head, groups, config)
        # Device shape: ε is the server's (client-level DP); the node reports none of its own.
        epsilon = 0.0 if run.private else math.inf
        metrics = _metrics(result, epsilon=epsilon, release_round=release_round)
        _consume(node, to_consume, server_round)
        state = _with_evidence(head_state(head), run, node, global_state, clicks, builder.data,
                               server_round, accountant=None, ledger=None)
        return RoundOutcome(state, metrics)

    plan = load_or_make_plan(node, run, groups.num_users)
    accountant = PersistentAccountant(
        node.state_dir / "accountant.json", delta=run.delta, budget_epsilon=run.epsilon
    )
    config = TrainConfig(
        learning_rate=run.learning_rate,
        batch_size=plan.batch_size,
        local_epochs=run.local_epochs,
        max_sessions_per_user=run.max_sessions_per_user,
        clip_norm=run.clip_norm,
        noise_multiplier=plan.noise_multiplier,
        seed=seed % (2**31),
    )
    q = sample_rate_for(config, groups.num_users)
    steps = steps_per_round(config, groups.num_users)
    ledger = Ledger(node.ledger_dir / f"{node.name}.jsonl")
    if accountant.would_exceed(noise_multiplier=plan.noise_multiplier, sample_rate=q, steps=steps):
        planned = accountant.epsilon_after(
            noise_multiplier=plan.noise_multiplier, sample_rate=q, steps=steps
        )
        reason = (
            f"node {node.name} refuses round {server_round}: ε would reach {planned:.4f}, "
            f"past its budget {run.epsilon:g} (spent {accountant.epsilon():.4f})"
        )
        ledger.append(
            LedgerEvent(
                node=node.name, round=server_round, mechanism="refusal", unit_of_privacy="user",
                noise_multiplier=plan.noise_multiplier, sample_rate=q, steps=0,
                clip_norm=run.clip_norm, delta=run.delta, accountant=accountant.accountant,
                epsilon_after=accountant.epsilon(), detail=reason,
            )
        )
        raise BudgetRefusal(reason)
    result, history = train_head(head, groups, config)
    epsilon = accountant.epsilon()
    for sigma, rate, n in history:
        epsilon = accountant.record(noise_multiplier=sigma, sample_rate=rate, steps=n)
        ledger.append(
            LedgerEvent(
                node=node.name, round=server_round, mechanism="dp-sgd", unit_of_privacy="user",
                noise_multiplier=sigma, sample_rate=rate, steps=n, clip_norm=run.clip_norm,
                delta=run.delta, accountant=accountant.accountant, epsilon_after=epsilon,
            )
        )
    # After the accountant has the round: a crash before this re-trains and re-accounts.
    _consume(node, to_consume, server_round)
    metrics = _metrics(result, epsilon=epsilon, release_round=release_round)
    state = _with_evidence(head_state(head), run, node, global_state, clicks, builder.data,
                           server_round, accountant=accountant, ledger=ledger)
    metrics["epsilon"] = accountant.epsilon()  # the release may have added to it
    return RoundOutcome(state, metrics)


def _with_evidence(
    state: dict[str, np.ndarray], run: RunSettings, node: NodeSettings,
    global_state: Mapping[str, np.ndarray], clicks: Any, data: Any, server_round: int, *,
    accountant: PersistentAccountant | None, ledger: Ledger | None,
) -> dict[str, np.ndarray]:
    """Head weights plus the node's evidence release (client.evidence_release)."""
    return attach_evidence(
        state, global_state=global_state, clicks_log=clicks, data=data,
        epsilon=run.epsilon, delta=run.delta, share=run.evidence_share,
        clip_norm=run.evidence_clip, max_sessions_per_user=run.max_sessions_per_user,
        state_dir=node.state_dir, ledger=ledger, accountant=accountant,
        node_name=node.name, server_round=server_round,
    )


def _consume(node: NodeSettings, files: list[Path], server_round: int) -> None:
    if files:
        node.inbox().mark_consumed(files, round=server_round)


def _stable_hash(text: str) -> int:
    # Python's hash() is salted per process; seeds must not be.
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little") % 1_000_003


def _metrics(result: Any, *, epsilon: float, release_round: float) -> dict[str, float]:
    return {
        "release-round": release_round,
        "num-examples": float(result.num_users),
        "num-impressions": float(result.num_impressions),
        "steps": float(result.steps),
        "train-loss": float(result.mean_loss) if result.steps else 0.0,
        "epsilon": float(epsilon) if math.isfinite(epsilon) else 1e9,
    }


def torch_threads(n: int = 1) -> None:
    """Keep each virtual node to one thread: many nodes share two cores."""
    torch.set_num_threads(n)
