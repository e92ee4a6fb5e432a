"""What a node does each round, without Flower: the ClientApp only unpacks and packs.

A node holds its own click log (never sent anywhere), its own state directory (privacy
accountant, plan, embedding cache) and its own ledger file. Each round it:

1. checks the run config against its own pinned privacy settings (``NodeSettings.privacy``:
   ε budget, δ, clip norm, sessions per user, privacy shape, set by the node's operator,
   never by the server): a weaker request is refused (reply + ledger line); a larger ε is
   capped at the node's budget and at any budget its state already recorded;
2. loads the global head from the server's arrays (shape-checked);
3. groups its clicks by user, keeping at most ``max_sessions_per_user`` sessions each;
4. regional shape: checks the accountant: if this round would take ε past the effective
   budget, refuses (and writes the refusal to its ledger); otherwise trains with DP-SGD and
   records the steps it actually took; device shape: trains plainly (the server clips and
   noises the update: client-level DP);
5. returns the new weights and public or DP-protected metrics only (``REPLY_METRICS``:
   a constant weight, steps, ε, release round; no exact counts or losses).

**Randomness.** Poisson sampling, DP noise and the per-user session choice come from a
generator seeded from the OS CSPRNG each round (``round_randomness``); nothing about them
follows from the run config, the round or the node's name (``shared_model.training``).

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
from privacy.ledger import Ledger, LedgerEvent, node_signer
from shared_model.catalog import node_feature_builder
from shared_model.clicklog import read_click_logs
from shared_model.encoder import CACHE_DIR_ENV
from shared_model.evidence import split_evidence
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.settings import (
    NODE_CACHE_DIR,
    NODE_CATALOG_DIR,
    NODE_DATA_PATH,
    NODE_LEDGER_DIR,
    NODE_NAME,
    NODE_RELEASE_DIR,
    NODE_RELEASE_KEY,
    NODE_STATE_DIR,
    PARTITION_ID,
    EffectivePrivacy,
    NodePrivacy,
    PrivacyRequestRefused,
    RunSettings,
    effective_privacy,
    simulated_node_settings_path,
)
from shared_model.state import head_state, load_head_state
from shared_model.training import (
    TrainConfig,
    build_user_groups,
    sample_rate_for,
    secure_generator,
    steps_per_round,
    train_head,
)

log = logging.getLogger("fedrank.node")

# Re-exported: the node_config keys (shared_model.settings defines them, Flower-free).
DATA_PATH = NODE_DATA_PATH
STATE_DIR = NODE_STATE_DIR
LEDGER_DIR = NODE_LEDGER_DIR
CATALOG_DIR = NODE_CATALOG_DIR


@dataclass(frozen=True)
class NodeSettings:
    """A node's own settings: where its data and state live, and its pinned privacy.

    **Where they come from.** Deployment: the SuperNode's ``node_config`` only (``fedrank
    node start`` flags / TOML build it; keys in ``shared_model.settings``: paths
    ``NODE_PATH_KEYS``, privacy ``NODE_PRIVACY_KEYS``); the server's run config is never
    read for them. Simulation: Flower's node_config holds only ``partition-id``, so the
    simulation runner, acting as every simulated node's operator, writes each node's
    settings to ``RUN_DIR/nodes/node-<pid>/node-settings.json`` (same keys) before launch,
    and the node reads that file (:meth:`from_node_config`).

    ``release_dir``/``release_key``: where the node looks for signed releases and the
    server's public key it pins (``None``: the node installs no releases).
    """

    name: str
    data_path: Path
    state_dir: Path
    ledger_dir: Path
    catalog_dir: Path
    cache_dir: Path | None = None
    release_dir: Path | None = None
    release_key: Path | None = None
    privacy: NodePrivacy = NodePrivacy()

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> NodeSettings:
        """Parse a node's settings (node_config keys); unknown keys are ignored.

        ``data-path`` is required; ``node-name`` defaults to ``node``, ``state-dir`` to
        ``node-state/<name>``, ``ledger-dir`` to ``<state-dir>/ledger``, ``catalog-dir`` to
        the bundled WANDS data, ``cache-dir`` to the default embedding cache; no release
        dir/key means no release installs. Privacy keys default to :class:`NodePrivacy`'s.
        """
        from shared_model.data import DEFAULT_WANDS_DIR

        if NODE_DATA_PATH not in config:
            raise ValueError(
                f"node settings need {NODE_DATA_PATH!r}; got keys {sorted(map(str, config))}"
            )

        def path(key: str) -> Path | None:
            value = config.get(key)
            if value is None or str(value) == "":
                return None
            return Path(str(value))

        name = str(config.get(NODE_NAME, "node")) or "node"
        state = path(NODE_STATE_DIR) or Path("node-state") / name
        return cls(
            name=name,
            data_path=Path(str(config[NODE_DATA_PATH])),
            state_dir=state,
            ledger_dir=path(NODE_LEDGER_DIR) or state / "ledger",
            catalog_dir=path(NODE_CATALOG_DIR) or DEFAULT_WANDS_DIR,
            cache_dir=path(NODE_CACHE_DIR),
            release_dir=path(NODE_RELEASE_DIR),
            release_key=path(NODE_RELEASE_KEY),
            privacy=NodePrivacy.from_mapping(config),
        )

    def to_config(self) -> dict[str, Any]:
        """The settings as node_config values (what the simulation runner writes)."""
        out: dict[str, Any] = {
            NODE_NAME: self.name,
            NODE_DATA_PATH: str(self.data_path),
            NODE_STATE_DIR: str(self.state_dir),
            NODE_LEDGER_DIR: str(self.ledger_dir),
            NODE_CATALOG_DIR: str(self.catalog_dir),
        }
        for key, value in (
            (NODE_CACHE_DIR, self.cache_dir),
            (NODE_RELEASE_DIR, self.release_dir),
            (NODE_RELEASE_KEY, self.release_key),
        ):
            if value is not None:
                out[key] = str(value)
        out.update(self.privacy.to_config())
        return out

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run: RunSettings) -> NodeSettings:
        """Deployment: the node_config itself. Simulation (only ``partition-id``): the file
        the runner wrote for this node (``run`` gives only that file's run folder)."""
        if NODE_DATA_PATH in node_config:
            return cls.from_mapping(node_config)
        if PARTITION_ID not in node_config:
            raise ValueError(
                f"node config needs {NODE_DATA_PATH!r} (deployment) or {PARTITION_ID!r} "
                f"(simulation); got keys {sorted(node_config)}"
            )
        path = simulated_node_settings_path(run.run_dir, int(node_config[PARTITION_ID]))
        if not path.is_file():
            raise FileNotFoundError(
                f"simulated node settings not found: {path} (the simulation runner writes "
                "them before launch: simulations.runner.write_node_settings)"
            )
        return cls.from_mapping(json.loads(path.read_text()))

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
                f"(round {server_round})"
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
    """The node will not train this round (its ε budget, or its pinned privacy, forbids it).

    The message is the reason sent to the server: built from numbers, keys and the node's
    name only, never from file content or a path.
    """


class PrivacyRefusal(BudgetRefusal):
    """The run config asked for weaker privacy than the node's pinned settings."""


class NoNewClicks(BudgetRefusal):
    """Online node with no click file newer than its last round: nothing to train on.

    A :class:`BudgetRefusal` so the ClientApp answers it the same way (an error reply the
    server logs before carrying on); the reason names the last round that had data.
    """


@dataclass(frozen=True)
class RoundOutcome:
    """A node's reply content, Flower-free: weights and the reply metrics.

    ``metrics`` is exactly :data:`REPLY_METRICS` (public or DP-protected values only).
    ``num_users`` is node-local (logs, tests): it is an exact count and never leaves the node.
    """

    state: dict[str, np.ndarray]
    metrics: dict[str, float]
    num_users: int = 0


# The regional reply's metric keys (the contract with server.validation). Exact counts and
# losses (users, impressions, train loss) are data-dependent and unnoised: never sent.
REPLY_METRICS = ("num-examples", "steps", "epsilon", "release-round")
# ε reported by a node that trains without DP (JSON/Flower metrics need a finite float).
NON_PRIVATE_EPSILON = 1e9


def _plan_path(node: NodeSettings) -> Path:
    return node.state_dir / "privacy_plan.json"


def _read_plan(node: NodeSettings) -> PrivacyPlan | None:
    path = _plan_path(node)
    return PrivacyPlan(**json.loads(path.read_text())) if path.exists() else None


def load_or_make_plan(
    node: NodeSettings, run: RunSettings, num_users: int, privacy: EffectivePrivacy
) -> PrivacyPlan:
    """Calibrate σ once so the whole planned run meets the budget; reuse it afterwards."""
    existing = _read_plan(node)
    if existing is not None:
        return existing
    config = TrainConfig(batch_size=run.batch_size, local_epochs=run.local_epochs)
    sigma = plan_noise_multiplier(
        budget_epsilon=privacy.epsilon,
        delta=privacy.delta,
        sample_rate=sample_rate_for(config, num_users),
        steps_per_round=steps_per_round(config, num_users),
        rounds=run.num_server_rounds,
    ) if not run.evidence_share else dp_sgd_noise_multiplier(  # the rest beside the release
        epsilon=privacy.epsilon, delta=privacy.delta, share=run.evidence_share,
        sample_rate=sample_rate_for(config, num_users),
        steps=steps_per_round(config, num_users) * run.num_server_rounds,
    )
    plan = PrivacyPlan(
        sigma, run.batch_size, run.num_server_rounds, privacy.epsilon, privacy.delta
    )
    path = _plan_path(node)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(plan)))
    os.replace(tmp, path)
    return plan


def _accountant_path(node: NodeSettings) -> Path:
    return node.state_dir / "accountant.json"


def stored_budget(node: NodeSettings) -> float:
    """The smallest ε budget the node's state already pinned (plan, accountant; inf if none).

    A budget once recorded is enforced: a node that spent 0.99 of a budget of 1 never
    accepts 8 later, whatever a run asks. (An operator who really means to raise it moves
    the state away, and with it the history the new budget would be counted against.)
    """
    budgets = [math.inf]
    plan = _read_plan(node)
    if plan is not None:
        budgets.append(float(plan.budget_epsilon))
    path = _accountant_path(node)
    if path.exists():
        try:
            raw = json.loads(path.read_text()).get("budget_epsilon", "inf")
            budgets.append(math.inf if raw == "inf" else float(raw))
        except (ValueError, AttributeError, TypeError):
            pass  # PersistentAccountant names the corrupt file when it loads it
    return min(budgets)


def head_config(run: RunSettings) -> HeadConfig:
    """The head shape this run uses (server and nodes must agree)."""
    return HeadConfig(hidden_dim=run.hidden_dim)


def install_latest_release(node: NodeSettings, run: RunSettings) -> float:
    """Verify and install the newest release (``client.releases``); returns its round.

    The release folder and the pinned public key are the node's own settings; only a
    simulated node (state under ``RUN_DIR/nodes/``) whose settings name neither falls back
    to the run's drop folder and the run's key.
    """
    from client.releases import install_latest_release as install
    from shared_model.release import default_public_key_path

    release_dir = getattr(node, "release_dir", None)
    release_key = getattr(node, "release_key", None)
    simulated = Path(node.state_dir) == Path(run.run_dir) / "nodes" / node.name
    if release_dir is None and release_key is None and simulated:
        release_dir = Path(run.run_dir) / "releases"
        release_key = default_public_key_path(Path(run.run_dir))
    return install(release_dir=release_dir, release_key=release_key,
                   state_dir=node.state_dir, node_name=node.name)


def _refuse(
    node: NodeSettings, server_round: int, reason: str, *, delta: float,
    noise_multiplier: float = 0.0, sample_rate: float = 0.0, clip_norm: float | None = None,
    epsilon: float | None = None, unit: str = "user",
) -> None:
    """Write the refusal to the node's ledger (the reply carries the same reason)."""
    if epsilon is None:
        epsilon = _spent_epsilon(node, delta)
    node_ledger(node).append(
        LedgerEvent(
            node=node.name, round=server_round, mechanism="refusal", unit_of_privacy=unit,
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=0,
            clip_norm=node.privacy.clip_norm if clip_norm is None else clip_norm,
            delta=delta, accountant="rdp", epsilon_after=epsilon, detail=reason,
        )
    )


def _ledger_delta(node: NodeSettings) -> float:
    """δ a refusal line states: the one the node's history is kept at (else the node's)."""
    path = _accountant_path(node)
    try:
        stored = json.loads(path.read_text()).get("delta") if path.exists() else None
    except (ValueError, AttributeError):
        stored = None
    return float(stored) if isinstance(stored, int | float) else node.privacy.delta


def _check_stored_delta(node: NodeSettings, privacy: EffectivePrivacy) -> None:
    """The node's accountant keeps one δ for life: a run asking another one is refused."""
    path = _accountant_path(node)
    if not privacy.private or not path.exists():
        return
    try:
        stored = json.loads(path.read_text()).get("delta")
    except (ValueError, AttributeError):
        return  # PersistentAccountant names the corrupt file when it loads it
    if isinstance(stored, int | float) and stored != privacy.delta:
        raise PrivacyRequestRefused(
            f"delta={privacy.delta:g} but the node's accountant keeps delta={stored:g}"
        )


def _spent_epsilon(node: NodeSettings, delta: float) -> float:
    path = _accountant_path(node)
    if not path.exists():
        return 0.0
    try:
        return PersistentAccountant(path, delta=delta, budget_epsilon=math.inf).epsilon()
    except ValueError:  # another δ, or a corrupt file: nothing honest to state
        return math.inf


def round_randomness(
    generator: torch.Generator | None,
) -> tuple[torch.Generator, np.random.Generator]:
    """(DP sampling/noise generator, session-choice rng) for one round.

    Production (``None``): seeded from the OS CSPRNG, fresh per node and round; nothing in
    them derives from run config, round or node name. Tests inject a seeded generator.
    """
    gen = generator if generator is not None else secure_generator()
    session_seed = int(torch.randint(0, 2**62, (1,), generator=gen).item())
    return gen, np.random.default_rng(session_seed)


def train_round(
    *,
    run: RunSettings,
    node: NodeSettings,
    global_state: Mapping[str, np.ndarray],
    server_round: int,
    generator: torch.Generator | None = None,
) -> RoundOutcome:
    """One round of local training; raises :class:`BudgetRefusal` when the node refuses.

    The node's pinned privacy (``node.privacy``) is checked against the run config first
    (:func:`shared_model.settings.effective_privacy`): a weaker request is refused, with
    the reason in the reply and in the node's ledger; a larger ε is capped at the node's
    budget and at any budget its state already recorded (:func:`stored_budget`).
    ``generator``: tests only (see :func:`round_randomness`).
    """
    from shared_model.data import catalog_mismatch

    mismatch = catalog_mismatch(node.catalog_dir, run.catalog_hash)
    if mismatch:  # another catalog than the server's: refuse, naming both hashes
        reason = f"node {node.name} refuses round {server_round}: {mismatch}"
        _refuse(node, server_round, reason, delta=_ledger_delta(node),
                unit="client" if node.privacy.privacy_shape == "device" else "user")
        raise PrivacyRefusal(reason)
    try:
        privacy = effective_privacy(node.privacy, run, stored_budget=stored_budget(node))
        _check_stored_delta(node, privacy)
    except PrivacyRequestRefused as exc:
        reason = f"node {node.name} refuses round {server_round}: run config asks {exc}"
        _refuse(node, server_round, reason, delta=_ledger_delta(node),
                unit="client" if node.privacy.privacy_shape == "device" else "user")
        raise PrivacyRefusal(reason) from None
    head = RankerHead(head_config(run))
    load_head_state(head, split_evidence(global_state)[0])
    release_round = install_latest_release(node, run)
    # A deployed node keeps its prepared builder in its state dir; a simulated one (state
    # under the run dir) shares its Ray worker's.
    simulated = Path(node.state_dir).parent == Path(run.run_dir) / "nodes"
    builder = node_feature_builder(
        str(node.catalog_dir), node_cache_dir(node, simulated=simulated),
        None if simulated else node.state_dir,
    )
    files, to_consume = node.round_click_files(run, server_round)
    clicks = read_click_logs(files)
    gen, rng = round_randomness(generator)
    sessions = privacy.max_sessions_per_user
    groups = build_user_groups(clicks, builder, max_sessions_per_user=sessions, rng=rng)
    if groups.num_users == 0 and privacy.privacy_shape == "device":
        # A device whose user saw no exploration traffic would send a zero update, which
        # Flower's adaptive clipping cannot normalise (and one failed device fails the whole
        # round): it learns from its logged sessions instead.
        groups = build_user_groups(
            clicks, builder, max_sessions_per_user=sessions, rng=rng, exploration_only=False,
        )
    if privacy.privacy_shape == "device" or not privacy.private:
        config = TrainConfig(
            learning_rate=run.learning_rate,
            batch_size=run.batch_size,
            local_epochs=run.local_epochs,
            max_sessions_per_user=sessions,
            # Non-private shuffling: seeded from the round's generator, not from config.
            seed=int(torch.randint(0, 2**31, (1,), generator=gen).item()),
        )
        result, _ = train_head(head, groups, config)
        # Device shape: ε is the server's (client-level DP); the node reports none of its own.
        epsilon = 0.0 if privacy.private else math.inf
        metrics = _metrics(result, epsilon=epsilon, release_round=release_round)
        _consume(node, to_consume, server_round)
        state = _with_evidence(head_state(head), run, node, privacy, global_state, clicks,
                               builder.data, server_round, accountant=None, ledger=None)
        return RoundOutcome(state, metrics, groups.num_users)

    plan = load_or_make_plan(node, run, groups.num_users, privacy)
    accountant = PersistentAccountant(
        _accountant_path(node), delta=privacy.delta,
        # The node's own cap (stored on disk); this run's request may be lower still.
        budget_epsilon=min(node.privacy.epsilon_budget, stored_budget(node)),
    )
    config = TrainConfig(
        learning_rate=run.learning_rate,
        batch_size=plan.batch_size,
        local_epochs=run.local_epochs,
        max_sessions_per_user=sessions,
        clip_norm=privacy.clip_norm,
        noise_multiplier=plan.noise_multiplier,
    )
    q = sample_rate_for(config, groups.num_users)
    steps = steps_per_round(config, groups.num_users)
    planned = accountant.epsilon_after(
        noise_multiplier=plan.noise_multiplier, sample_rate=q, steps=steps
    )
    if planned > privacy.epsilon:
        reason = (
            f"node {node.name} refuses round {server_round}: ε would reach {planned:.4f}, "
            f"past its budget {privacy.epsilon:g} (spent {accountant.epsilon():.4f})"
        )
        _refuse(
            node, server_round, reason, delta=privacy.delta,
            noise_multiplier=plan.noise_multiplier, sample_rate=q,
            clip_norm=privacy.clip_norm, epsilon=accountant.epsilon(),
        )
        raise BudgetRefusal(reason)
    ledger = node_ledger(node)
    result, history = train_head(head, groups, config, generator=gen)
    epsilon = accountant.epsilon()
    for sigma, rate, n in history:
        epsilon = accountant.record(noise_multiplier=sigma, sample_rate=rate, steps=n)
        ledger.append(
            LedgerEvent(
                node=node.name, round=server_round, mechanism="dp-sgd", unit_of_privacy="user",
                noise_multiplier=sigma, sample_rate=rate, steps=n, clip_norm=privacy.clip_norm,
                delta=privacy.delta, accountant=accountant.accountant, epsilon_after=epsilon,
            )
        )
    # After the accountant has the round: a crash before this re-trains and re-accounts.
    _consume(node, to_consume, server_round)
    metrics = _metrics(result, epsilon=epsilon, release_round=release_round)
    state = _with_evidence(head_state(head), run, node, privacy, global_state, clicks,
                           builder.data, server_round, accountant=accountant, ledger=ledger)
    metrics["epsilon"] = accountant.epsilon()  # the release may have added to it
    return RoundOutcome(state, metrics, groups.num_users)


def _with_evidence(
    state: dict[str, np.ndarray], run: RunSettings, node: NodeSettings,
    privacy: EffectivePrivacy, global_state: Mapping[str, np.ndarray], clicks: Any, data: Any,
    server_round: int, *, accountant: PersistentAccountant | None, ledger: Ledger | None,
) -> dict[str, np.ndarray]:
    """Head weights plus the node's evidence release (client.evidence_release)."""
    return attach_evidence(
        state, global_state=global_state, clicks_log=clicks, data=data,
        epsilon=privacy.epsilon, delta=privacy.delta, share=run.evidence_share,
        clip_norm=run.evidence_clip, max_sessions_per_user=privacy.max_sessions_per_user,
        state_dir=node.state_dir, ledger=ledger, accountant=accountant,
        node_name=node.name, server_round=server_round,
    )


def node_ledger(node: NodeSettings) -> Ledger:
    """The node's own ledger file, each line signed with the node's key (kept in its state
    folder, never sent anywhere; the public half is published beside the ledger)."""
    return Ledger(node.ledger_dir / f"{node.name}.jsonl", signer=node_signer(node.state_dir))


def _consume(node: NodeSettings, files: list[Path], server_round: int) -> None:
    if files:
        node.inbox().mark_consumed(files, round=server_round)


def _metrics(result: Any, *, epsilon: float, release_round: float) -> dict[str, float]:
    """Exactly :data:`REPLY_METRICS`: public or DP-protected values only."""
    metrics = {
        # A constant, so FedAvg weighs nodes uniformly (the user count is exact: never sent).
        "num-examples": 1.0,
        # DP-SGD steps: a function of the plan (batch size, epochs, ⌈users/B⌉, as q is public).
        "steps": float(result.steps),
        "epsilon": float(epsilon) if math.isfinite(epsilon) else NON_PRIVATE_EPSILON,
        "release-round": float(release_round),
    }
    return metrics


def torch_threads(n: int = 1) -> None:
    """Keep each virtual node to one thread: many nodes share two cores."""
    torch.set_num_threads(n)


def node_cache_dir(node: NodeSettings, *, simulated: bool) -> str:
    """The embedding cache a node reads ("" = :func:`shared_model.encoder.default_cache_dir`).

    The node's ``cache-dir`` when set. Otherwise a simulated node (and any process with
    ``$FEDRANK_CACHE_DIR`` set) uses the default cache; a deployed node uses
    ``<state-dir>/embedding-cache``: the default would resolve inside Flower's per-version app
    install folder, so every new app version would encode the whole catalog again.
    """
    if node.cache_dir is not None:
        return str(node.cache_dir)
    if simulated or os.environ.get(CACHE_DIR_ENV):
        return ""
    return str(Path(node.state_dir) / "embedding-cache")
