"""Run and node settings, each parsed once into a frozen dataclass.

- :class:`RunSettings`: the server's ``run_config`` (or a TOML table). Keys: the constants below.
- :class:`NodePrivacy`: a node's *pinned* privacy settings, from the node's own settings (its
  ``node_config``; in simulation, the file the runner writes per node). A run config can ask a
  node for stronger privacy, never weaker: :func:`effective_privacy` caps the budget and
  refuses the rest (:class:`PrivacyRequestRefused`).

Nothing else reads the raw mappings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# run_config keys (kebab-case, as Flower's pyproject convention).
SCENARIO = "scenario"
NUM_SERVER_ROUNDS = "num-server-rounds"
STRATEGY = "strategy"
PRIVACY_SHAPE = "privacy-shape"
EPSILON = "epsilon"
DELTA = "delta"
RUN_DIR = "run-dir"
DATA_DIR = "data-dir"
FRACTION_TRAIN = "fraction-train"
MIN_TRAIN_NODES = "min-train-nodes"
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
LEARNING_RATE = "learning-rate"
SERVER_LEARNING_RATE = "server-learning-rate"
MAX_SESSIONS_PER_USER = "max-sessions-per-user"
CLIP_NORM = "clip-norm"
SEED = "seed"
EVAL_FOLD = "eval-fold"
NUM_FOLDS = "num-folds"
SECAGG = "secagg"
HIDDEN_DIM = "hidden-dim"
EVIDENCE_SHARE = "evidence-share"
EVIDENCE_CLIP = "evidence-clip"
RELEASE_EVERY = "release-every"
REGION_CAPS = "region-epsilon-caps"
NODE_REGIONS = "node-regions"
CATALOG_DIR = "catalog-dir"
CATALOG_HASH = "catalog-hash"
CACHE_DIR = "cache-dir"
ONLINE = "online"
REPLAY_FILES = "replay-files"
ROBUST_AGGREGATION = "robust-aggregation"
ROBUST_TRIM_BETA = "robust-trim-beta"
ROBUST_MALICIOUS_NODES = "robust-malicious-nodes"
ROBUST_NORM_FACTOR = "robust-norm-factor"
ROBUST_CENTER_RADIUS = "robust-center-radius"
EVIDENCE_RATE_CLAMP = "evidence-rate-clamp"
DEVICE_AGGREGATE_CLIP = "device-aggregate-clip"

# node_config keys (a node's own settings; never read from run config). Paths:
NODE_NAME = "node-name"
NODE_DATA_PATH = "data-path"
NODE_STATE_DIR = "state-dir"
NODE_LEDGER_DIR = "ledger-dir"
NODE_CATALOG_DIR = "catalog-dir"
NODE_CACHE_DIR = "cache-dir"
NODE_RELEASE_DIR = "release-dir"
NODE_RELEASE_KEY = "release-key"
NODE_PATH_KEYS = (
    NODE_NAME, NODE_DATA_PATH, NODE_STATE_DIR, NODE_LEDGER_DIR, NODE_CATALOG_DIR,
    NODE_CACHE_DIR, NODE_RELEASE_DIR, NODE_RELEASE_KEY,
)
# ... and privacy (the node's pinned guarantee):
NODE_EPSILON_BUDGET = "epsilon-budget"
NODE_DELTA = "delta"
NODE_CLIP_NORM = "clip-norm"
NODE_MAX_SESSIONS = "max-sessions-per-user"
NODE_PRIVACY_SHAPE = "privacy-shape"
NODE_PRIVACY_KEYS = (
    NODE_EPSILON_BUDGET, NODE_DELTA, NODE_CLIP_NORM, NODE_MAX_SESSIONS, NODE_PRIVACY_SHAPE,
)
# Simulation: Flower's simulated node_config holds only this; the runner (each simulated
# node's operator) writes the rest to ``simulated_node_settings_path``.
PARTITION_ID = "partition-id"
NODE_SETTINGS_FILE = "node-settings.json"

STRATEGIES = ("fedavg", "fedadam")
# Robust aggregation of the regional head (Flower 1.42 strategies; server.strategies).
ROBUST_RULES = (
    "none", "fedtrimmedavg", "fedmedian", "krum", "multikrum", "bulyan", "normbound",
    "centeredclip", "deviationdrop",
)
PRIVACY_SHAPES = ("regional", "device")


@dataclass(frozen=True)
class RunSettings:
    """Everything a run is configured by; see ``pyproject.toml`` for defaults.

    ``epsilon`` is each node's whole-run budget (``math.inf`` = non-private).
    ``region_epsilon_caps`` is ``"region=cap,region=cap"`` (server-side policy; empty = none).
    ``node_regions`` is ``"ID=region,ID=region"``: the server's name for each Flower node id
    (``server.validation.parse_node_regions``; empty = ``node-<id>``); a reply's own name is
    a claim only.
    ``catalog_dir`` / ``cache_dir``: absolute paths of the judged catalog and the embedding
    cache ("" = the bundled WANDS data and ``.cache/embeddings``); Flower installs the app
    from a package that carries code only, so a run passes these explicitly.
    ``catalog_hash``: the catalog's content hash (``shared_model.data.catalog_hash``); a node
    whose own catalog hashes differently refuses the run ("" = no check).
    ``online``: a node whose data path is a folder treats it as an inbox (``client.inbox``):
    each round trains on the files that arrived since its last round, plus the last
    ``replay_files`` files it consumed (0 = no replay). Off: every round trains on the whole
    log, as a static data set.
    """

    scenario: str = "regional-5"
    num_server_rounds: int = 3
    strategy: str = "fedavg"
    privacy_shape: str = "regional"
    epsilon: float = 1.0
    delta: float = 1e-5
    run_dir: str = "runs/default"
    data_dir: str = "runs/default/data"
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    local_epochs: int = 1
    batch_size: int = 256
    learning_rate: float = 0.5
    server_learning_rate: float = 0.05
    max_sessions_per_user: int = 2
    clip_norm: float = 1.0
    seed: int = 0
    eval_fold: int = 0
    num_folds: int = 5
    secagg: bool = False
    hidden_dim: int = 0
    release_every: int = 0
    region_epsilon_caps: str = ""
    node_regions: str = ""
    catalog_dir: str = ""
    catalog_hash: str = ""
    cache_dir: str = ""
    online: bool = False
    replay_files: int = 0
    # Memorised click evidence (shared_model.evidence): the share of each node's ε spent on
    # its one-shot DP count release (0 = none; the rest goes to DP-SGD), and the L2 bound of
    # one user's [clicks, exam] contribution (sets the noise scale, not the guarantee).
    evidence_share: float = 0.0
    evidence_clip: float = 3.0
    # Click fraud bound on the released evidence (issue 11; server.validation): each node's
    # clicks on a pair are capped at what the other nodes' median click rate predicts for
    # its exam plus this many standard deviations (inf = off). Post-processing of the DP
    # releases; measured in docs/results.md, "Click fraud against the memorised evidence".
    evidence_rate_clamp: float = 2.0
    # The served head (evaluated and released): moved this fraction of the way from its
    # zero-shot start (shared_model.state.shrink_state; 1 = as trained). Post-processing of
    # the global weights, chosen on seen queries only (docs/results.md, "Unseen floor").
    head_shrink: float = 1.0
    # Robust aggregation of the head in the regional shape (server.strategies; issue 11):
    # one of ROBUST_RULES ("none" = the plain mean); it replaces the mean of the head
    # updates that FedAvg/FedAdam use (evidence stays summed); trim fraction per side for
    # fedtrimmedavg; the number of malicious nodes krum/multikrum/bulyan tolerate. Chosen by
    # measurement (docs/results.md, "Poisoning"). The device shape ignores it (SecAgg+ masks
    # each update: clipping + noise are the defence there).
    robust_aggregation: str = "deviationdrop"
    robust_trim_beta: float = 0.2
    robust_malicious_nodes: int = 1
    # normbound: each head update is clipped to this multiple of the round's median update
    # norm (Sun et al. 2019's norm bound, relative so it follows the honest DP-SGD scale).
    robust_norm_factor: float = 1.5
    # centeredclip: each head update's deviation from the round's coordinate-wise median is
    # clipped to this multiple of the median deviation, then the plain mean (Karimireddy et
    # al. 2021's centered clipping, with a robust centre and a radius that follows the honest
    # spread); deviationdrop: an update beyond it is left out instead.
    robust_center_radius: float = 3.0
    # Device shape (server.device.AggregateClip; issue 11): bound the round's mean update to
    # the devices' clip norm before the noise (a no-op without an attacker; measured in
    # docs/results.md, "Malicious devices under SecAgg+").
    device_aggregate_clip: bool = True

    def __post_init__(self) -> None:
        if self.num_server_rounds < 1:
            raise ValueError(f"{NUM_SERVER_ROUNDS} must be >= 1, got {self.num_server_rounds!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"{STRATEGY} must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.privacy_shape not in PRIVACY_SHAPES:
            raise ValueError(
                f"{PRIVACY_SHAPE} must be one of {PRIVACY_SHAPES}, got {self.privacy_shape!r}"
            )
        if not (self.epsilon > 0):
            raise ValueError(f"{EPSILON} must be > 0 (or inf), got {self.epsilon!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"{DELTA} must be in (0, 1), got {self.delta!r}")
        if not 0 < self.fraction_train <= 1:
            raise ValueError(f"{FRACTION_TRAIN} must be in (0, 1], got {self.fraction_train!r}")
        if not 0 <= self.eval_fold < self.num_folds:
            raise ValueError(
                f"{EVAL_FOLD} must be in [0, {self.num_folds}), got {self.eval_fold!r}"
            )
        if self.replay_files < 0:
            raise ValueError(f"{REPLAY_FILES} must be >= 0, got {self.replay_files!r}")
        if not 0 <= self.evidence_share < 1:
            raise ValueError(f"{EVIDENCE_SHARE} must be in [0, 1), got {self.evidence_share!r}")
        if not (self.evidence_clip > 0 and math.isfinite(self.evidence_clip)):
            raise ValueError(f"{EVIDENCE_CLIP} must be finite and > 0, got {self.evidence_clip!r}")
        if not self.evidence_rate_clamp >= 0:
            raise ValueError(
                f"{EVIDENCE_RATE_CLAMP} must be >= 0 (inf: off), got {self.evidence_rate_clamp!r}"
            )
        if not 0 <= self.head_shrink <= 1:
            raise ValueError(f"head-shrink must be in [0, 1], got {self.head_shrink!r}")
        if self.robust_aggregation not in ROBUST_RULES:
            raise ValueError(
                f"{ROBUST_AGGREGATION} must be one of {ROBUST_RULES}, "
                f"got {self.robust_aggregation!r}"
            )
        if not 0 <= self.robust_trim_beta < 0.5:
            raise ValueError(
                f"{ROBUST_TRIM_BETA} must be in [0, 0.5), got {self.robust_trim_beta!r}"
            )
        if self.robust_malicious_nodes < 0:
            raise ValueError(
                f"{ROBUST_MALICIOUS_NODES} must be >= 0, got {self.robust_malicious_nodes!r}"
            )
        if not (self.robust_norm_factor >= 1 and math.isfinite(self.robust_norm_factor)):
            raise ValueError(
                f"{ROBUST_NORM_FACTOR} must be finite and >= 1, got {self.robust_norm_factor!r}"
            )
        if not (self.robust_center_radius >= 1 and math.isfinite(self.robust_center_radius)):
            raise ValueError(
                f"{ROBUST_CENTER_RADIUS} must be finite and >= 1, "
                f"got {self.robust_center_radius!r}"
            )
        self.region_caps()  # validates the format

    def catalog_path(self) -> Path:
        """The judged catalog folder."""
        from shared_model.data import DEFAULT_WANDS_DIR

        return Path(self.catalog_dir) if self.catalog_dir else DEFAULT_WANDS_DIR

    def cache_path(self) -> Path | None:
        """The embedding cache folder (``None`` = default)."""
        return Path(self.cache_dir) if self.cache_dir else None

    @property
    def private(self) -> bool:
        """Whether DP is on (a finite ε)."""
        return math.isfinite(self.epsilon)

    def region_caps(self) -> dict[str, float]:
        """Parse ``region_epsilon_caps`` into ``{region: cap}``."""
        caps: dict[str, float] = {}
        for item in filter(None, (s.strip() for s in self.region_epsilon_caps.split(","))):
            name, sep, value = item.partition("=")
            try:
                cap = float(value)
            except ValueError:
                cap = float("nan")
            if not sep or not name.strip() or not cap > 0:
                raise ValueError(
                    f"{REGION_CAPS}: bad item {item!r}; expected 'region=cap' with cap > 0"
                )
            caps[name.strip()] = cap
        return caps

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Parse a run_config mapping; unknown keys are an error naming the key."""
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(config) - set(by_key))
        if unknown:
            raise ValueError(f"unknown run config key(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for key, raw in config.items():
            f = by_key[key]
            values[f.name] = _coerce(key, raw, f.type)
        return cls(**values)

    def to_config(self) -> dict[str, Any]:
        """The run_config mapping (ε = inf written as the string ``"inf"``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "epsilon":
                # A string, so "inf" and numbers share one type in Flower's run config.
                value = "inf" if math.isinf(value) else repr(float(value))
            out[f.name.replace("_", "-")] = value
        return out


def _coerce(key: str, raw: Any, type_name: Any) -> Any:
    kind = str(type_name)
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("true", "1", "yes"):
                return True
            if str(raw).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        if kind == "float":
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ValueError(f"run config {key!r}: cannot read {raw!r} as {kind}") from None


def _parse_epsilon(key: str, raw: Any) -> float:
    value = _coerce(key, raw, "float")
    if not (value > 0):
        raise ValueError(f"{key} must be > 0 (or inf), got {raw!r}")
    return float(value)


@dataclass(frozen=True)
class NodePrivacy:
    """A node's pinned privacy settings (node_config keys ``NODE_PRIVACY_KEYS``).

    ``epsilon_budget`` is the node's whole-life ε budget (``math.inf``: a non-private node,
    which trains with DP when a run asks for it). ``delta``, ``clip_norm`` and
    ``max_sessions_per_user`` are the largest values the node accepts; ``privacy_shape`` the
    only shape. Defaults equal :class:`RunSettings`' defaults, so a default run and a
    default node agree.
    """

    epsilon_budget: float = 1.0
    delta: float = 1e-5
    clip_norm: float = 1.0
    max_sessions_per_user: int = 2
    privacy_shape: str = "regional"

    def __post_init__(self) -> None:
        if not (self.epsilon_budget > 0):
            raise ValueError(
                f"node {NODE_EPSILON_BUDGET} must be > 0 (or inf), got {self.epsilon_budget!r}"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"node {NODE_DELTA} must be in (0, 1), got {self.delta!r}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError(
                f"node {NODE_CLIP_NORM} must be finite and > 0, got {self.clip_norm!r}"
            )
        if self.max_sessions_per_user < 1:
            raise ValueError(
                f"node {NODE_MAX_SESSIONS} must be >= 1, got {self.max_sessions_per_user!r}"
            )
        if self.privacy_shape not in PRIVACY_SHAPES:
            raise ValueError(
                f"node {NODE_PRIVACY_SHAPE} must be one of {PRIVACY_SHAPES}, "
                f"got {self.privacy_shape!r}"
            )

    @property
    def private(self) -> bool:
        """Whether the node insists on DP (a finite budget)."""
        return math.isfinite(self.epsilon_budget)

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> NodePrivacy:
        """The privacy keys of a node_config (others ignored); absent keys take defaults."""
        default = cls()
        try:
            return cls(
                epsilon_budget=_parse_epsilon(
                    NODE_EPSILON_BUDGET, config.get(NODE_EPSILON_BUDGET, default.epsilon_budget)
                ),
                delta=_coerce(NODE_DELTA, config.get(NODE_DELTA, default.delta), "float"),
                clip_norm=_coerce(
                    NODE_CLIP_NORM, config.get(NODE_CLIP_NORM, default.clip_norm), "float"
                ),
                max_sessions_per_user=_coerce(
                    NODE_MAX_SESSIONS,
                    config.get(NODE_MAX_SESSIONS, default.max_sessions_per_user), "int",
                ),
                privacy_shape=str(config.get(NODE_PRIVACY_SHAPE, default.privacy_shape)),
            )
        except ValueError as exc:
            raise ValueError(str(exc).replace("run config", "node config")) from None

    def to_config(self) -> dict[str, Any]:
        """node_config values (ε = inf written as ``"inf"``)."""
        budget = self.epsilon_budget
        return {
            NODE_EPSILON_BUDGET: "inf" if math.isinf(budget) else repr(float(budget)),
            NODE_DELTA: self.delta,
            NODE_CLIP_NORM: self.clip_norm,
            NODE_MAX_SESSIONS: self.max_sessions_per_user,
            NODE_PRIVACY_SHAPE: self.privacy_shape,
        }

    @classmethod
    def of_run(cls, run: RunSettings) -> NodePrivacy:
        """The node settings that accept exactly this run (what the simulation runner writes)."""
        return cls(
            epsilon_budget=run.epsilon, delta=run.delta, clip_norm=run.clip_norm,
            max_sessions_per_user=run.max_sessions_per_user, privacy_shape=run.privacy_shape,
        )


class PrivacyRequestRefused(ValueError):
    """A run config asked a node for weaker privacy than the node's pinned settings."""


@dataclass(frozen=True)
class EffectivePrivacy:
    """What a node actually uses for one run: its pinned settings, tightened by the run's.

    ``epsilon`` is min(node budget, stored budgets, run's ε); ``delta``, ``clip_norm`` and
    ``max_sessions_per_user`` the run's, which are at most the node's; the shape is the
    node's (the run's must equal it).
    """

    epsilon: float
    delta: float
    clip_norm: float
    max_sessions_per_user: int
    privacy_shape: str

    @property
    def private(self) -> bool:
        """Whether this run trains with DP."""
        return math.isfinite(self.epsilon)


def effective_privacy(
    node: NodePrivacy, run: RunSettings, *, stored_budget: float = math.inf
) -> EffectivePrivacy:
    """The node's privacy for ``run``; :class:`PrivacyRequestRefused` if ``run`` is weaker.

    Refused (the reason names the key and both values): another privacy shape; ``epsilon =
    inf`` on a private node; a larger δ, clip norm or sessions per user than the node's
    (each node value is the largest it accepts; a smaller one is used as asked). A larger
    finite ε is not refused but capped: the effective budget is min(node's,
    ``stored_budget`` (what the node's state already pinned), run's). The node's accountant
    keeps one δ for life: ``client.node`` also refuses a δ other than the one its stored
    history was accounted at.
    """
    problems = []
    if run.privacy_shape != node.privacy_shape:
        problems.append(
            f"{PRIVACY_SHAPE}={run.privacy_shape} but the node is pinned to {node.privacy_shape}"
        )
    cap = min(node.epsilon_budget, stored_budget)
    if math.isinf(run.epsilon) and math.isfinite(cap):
        problems.append(f"{EPSILON}=inf (no DP) but the node's budget is {cap:g}")
    epsilon = min(cap, run.epsilon)
    if math.isfinite(epsilon) and run.delta > node.delta:
        problems.append(f"{DELTA}={run.delta:g} exceeds the node's {node.delta:g}")
    if run.clip_norm > node.clip_norm:
        problems.append(f"{CLIP_NORM}={run.clip_norm:g} exceeds the node's {node.clip_norm:g}")
    if run.max_sessions_per_user > node.max_sessions_per_user:
        problems.append(
            f"{MAX_SESSIONS_PER_USER}={run.max_sessions_per_user} exceeds the node's "
            f"{node.max_sessions_per_user}"
        )
    if problems:
        raise PrivacyRequestRefused("; ".join(problems))
    return EffectivePrivacy(
        epsilon=epsilon,
        delta=run.delta if math.isfinite(epsilon) else node.delta,
        clip_norm=min(node.clip_norm, run.clip_norm),
        max_sessions_per_user=min(node.max_sessions_per_user, run.max_sessions_per_user),
        privacy_shape=node.privacy_shape,
    )


def simulated_node_settings_path(run_dir: str | Path, partition_id: int) -> Path:
    """Where the simulation runner writes simulated node ``partition_id``'s settings."""
    return Path(run_dir) / "nodes" / f"node-{partition_id}" / NODE_SETTINGS_FILE
