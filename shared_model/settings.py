"""Run settings: parsed once from Flower's ``run_config`` (or a TOML table) into a frozen
dataclass. Keys are the constants below; nothing else reads the raw mapping.
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
CATALOG_DIR = "catalog-dir"
CACHE_DIR = "cache-dir"
ONLINE = "online"
REPLAY_FILES = "replay-files"

STRATEGIES = ("fedavg", "fedadam")
PRIVACY_SHAPES = ("regional", "device")


@dataclass(frozen=True)
class RunSettings:
    """Everything a run is configured by; see ``pyproject.toml`` for defaults.

    ``epsilon`` is each node's whole-run budget (``math.inf`` = non-private).
    ``region_epsilon_caps`` is ``"region=cap,region=cap"`` (server-side policy; empty = none).
    ``catalog_dir`` / ``cache_dir``: absolute paths of the judged catalog and the embedding
    cache ("" = the bundled WANDS data and ``.cache/embeddings``); Flower installs the app
    from a package that carries code only, so a run passes these explicitly.
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
    catalog_dir: str = ""
    cache_dir: str = ""
    online: bool = False
    replay_files: int = 0
    # Memorised click evidence (shared_model.evidence): the share of each node's ε spent on
    # its one-shot DP count release (0 = none; the rest goes to DP-SGD), and the L2 bound of
    # one user's [clicks, exam] contribution (sets the noise scale, not the guarantee).
    evidence_share: float = 0.0
    evidence_clip: float = 3.0

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
