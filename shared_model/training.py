"""One node's training of the ranker head on its click log, with or without DP-SGD.

The unit of privacy is the **user**. Each round a node keeps at most
``max_sessions_per_user`` of each user's sessions (sampled without replacement), packs them into
one group ``[M]`` of impressions per user, and DP-SGD treats a *group* as one sample: Poisson
sampling picks users, per-sample clipping bounds each user's whole gradient to ``clip_norm``,
and Gaussian noise of std ``noise_multiplier * clip_norm`` is added per step. Neighbouring data
sets therefore differ in one user's entire click history at the node (add/remove one user), and
the accountant's ε over all steps of all rounds is a user-level guarantee.

**Randomness.** DP-SGD's Poisson sampling and Gaussian noise come from a ``torch.Generator``
seeded from the OS CSPRNG (``secrets``) on every call (:func:`secure_generator`), fresh per
node and round: nothing about them can be derived from the run config, the round or the node
name. Tests inject their own generator (``train_head(..., generator=...)``); production code
never passes a seed for them. Caveat: Opacus' ``secure_mode`` (a CSPRNG *stream*) needs
``torchcsprng``, which is not on PyPI; so the stream is torch's Mersenne Twister seeded with
63 bits from the CSPRNG. Its state is unpredictable to the server; it is not a
cryptographically secure stream (nor are the noise's floating-point samples hardened against
Mironov's attack), which the audit report states. ``TrainConfig.seed`` seeds only non-private
shuffling (no guarantee is claimed there).

No Flower here; Opacus only inside :func:`train_head`.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from shared_model.features import NUM_FEATURES, FeatureBuilder
from shared_model.ranker import RankerHead

GRAD_SAMPLE_MODES = ("ghost", "hooks", "functorch", "ew")


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyperparameters of one node for one round.

    Parameters
    ----------
    learning_rate
        SGD step size.
    batch_size
        Expected users per step (Poisson sampling rate = batch_size / users).
    local_epochs
        Passes over the node's users per round.
    max_sessions_per_user
        Contribution bound: sessions kept per user per round.
    clip_norm
        Per-user gradient clip bound (DP only).
    noise_multiplier
        σ; ``None`` trains without DP (no clipping, no noise, plain shuffled batches).
    grad_sample_mode
        Opacus per-sample gradient mode. ``hooks`` is the fastest for this tiny head
        (`fedrank bench train`: ghost clipping pays for its second backward pass).
    seed
        Seeds the shuffling of *non-private* training only. DP sampling and noise never come
        from it (see :func:`train_head`'s ``generator``).
    """

    learning_rate: float = 0.5
    batch_size: int = 256
    local_epochs: int = 1
    max_sessions_per_user: int = 2
    clip_norm: float = 1.0
    noise_multiplier: float | None = None
    grad_sample_mode: str = "hooks"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs!r}")
        if self.max_sessions_per_user < 1:
            raise ValueError(
                f"max_sessions_per_user must be >= 1, got {self.max_sessions_per_user!r}"
            )
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm!r}")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(
                f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got "
                f"{self.grad_sample_mode!r}"
            )

    @property
    def private(self) -> bool:
        """Whether DP-SGD is on."""
        return self.noise_multiplier is not None


@dataclass(frozen=True)
class UserGroups:
    """A node's clicks for one round, one row per user (the unit of privacy).

    ``features`` is ``[U, M, F]``; the other arrays are ``[U, M]``: 1-based rank (0 = padding),
    click 0/1 and a validity mask.
    """

    features: np.ndarray
    rank: np.ndarray
    clicked: np.ndarray
    mask: np.ndarray

    @property
    def num_users(self) -> int:
        """U."""
        return int(self.rank.shape[0])

    @property
    def num_impressions(self) -> int:
        """Real (unpadded) rows."""
        return int(self.mask.sum())


def build_user_groups(
    table: pa.Table,
    builder: FeatureBuilder,
    *,
    max_sessions_per_user: int,
    rng: np.random.Generator,
    exploration_only: bool = True,
) -> UserGroups:
    """Group a click log by user, keeping at most ``max_sessions_per_user`` sessions each.

    With ``exploration_only`` (the default) only exploration sessions are used: sessions the
    logging ranker (BM25) filled show only its top K, and a ranker fitted on them learns
    what separates items *within* BM25's top K, which extrapolates badly to the rest of the
    candidate pool (measured on WANDS: held-out NDCG@10 below zero-shot with them, above
    without them). Position bias is handled by the position tower either way.

    Rows whose query or product is not in the catalog raise ``KeyError`` naming the id: a log
    that refers to an unknown item is a data error, not something to skip silently.
    """
    if exploration_only:
        table = table.filter(table.column("exploration"))
    if table.num_rows == 0:
        empty = np.zeros((0, 1), dtype=np.float32)
        feats = np.zeros((0, 1, NUM_FEATURES), dtype=np.float32)
        return UserGroups(feats, empty.astype(np.int64), empty, empty)
    cols = table.select(["user_id", "session_id", "query_id", "product_id", "rank", "clicked"])
    user = cols.column("user_id").to_numpy()
    session = cols.column("session_id").to_numpy()
    feats = row_features(cols, builder)
    rank = cols.column("rank").to_numpy().astype(np.int64)
    clicked = cols.column("clicked").to_numpy(zero_copy_only=False).astype(np.float32)

    order = np.lexsort((rank, session, user))
    user, session = user[order], session[order]
    feats, rank, clicked = feats[order], rank[order], clicked[order]
    # Session boundaries, then users' session lists.
    new_session = np.ones(len(session), dtype=bool)
    new_session[1:] = (session[1:] != session[:-1]) | (user[1:] != user[:-1])
    session_starts = np.flatnonzero(new_session)
    session_ends = np.append(session_starts[1:], len(session))
    session_user = user[session_starts]
    users, first = np.unique(session_user, return_index=True)
    last = np.append(first[1:], len(session_user))
    kept: list[np.ndarray] = []
    for a, b in zip(first, last, strict=True):
        chosen = np.arange(a, b)
        if b - a > max_sessions_per_user:
            chosen = np.sort(rng.choice(chosen, size=max_sessions_per_user, replace=False))
        kept.append(np.concatenate([np.arange(session_starts[s], session_ends[s]) for s in chosen]))
    width = max(len(k) for k in kept)
    shape = (len(users), width)
    out_f = np.zeros((*shape, feats.shape[1]), np.float32)
    out_r = np.zeros(shape, np.int64)
    out_c = np.zeros(shape, np.float32)
    out_m = np.zeros(shape, np.float32)
    for i, rows in enumerate(kept):
        n = len(rows)
        out_f[i, :n], out_r[i, :n] = feats[rows], rank[rows]
        out_c[i, :n], out_m[i, :n] = clicked[rows], 1.0
    return UserGroups(out_f, out_r, out_c, out_m)


def row_features(table: pa.Table, builder: FeatureBuilder) -> np.ndarray:
    """``[rows, F]`` features of a click log's (query_id, product_id) rows, one query at a time."""
    query_ids = np.asarray(table.column("query_id").to_pylist(), dtype=object)
    product_ids = np.asarray(table.column("product_id").to_pylist(), dtype=object)
    out = np.zeros((len(query_ids), NUM_FEATURES), dtype=np.float32)
    for qid in np.unique(query_ids):
        rows = np.flatnonzero(query_ids == qid)
        out[rows] = builder.features_for_query_id(str(qid), list(product_ids[rows]))
    return out


class ClickLoss(torch.nn.Module):
    """Criterion over packed targets ``[G, M]`` (1 click, 0 no click, -1 padding).

    ``reduction="none"`` gives the per-user loss ``[G]`` (Opacus' ghost clipping asks for it);
    ``"mean"`` averages over users.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, log_p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = (target >= 0).to(log_p.dtype)
        clicked = target.clamp(min=0)
        log_not_p = torch.log1p(-torch.exp(log_p).clamp(max=1 - 1e-6))
        per_user = (-(clicked * log_p + (1 - clicked) * log_not_p) * mask).sum(-1)
        if self.reduction == "none":
            return per_user
        if self.reduction == "sum":
            return per_user.sum()
        return per_user.mean()


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did (aggregate numbers only: safe to send)."""

    num_users: int
    num_impressions: int
    steps: int
    sample_rate: float
    mean_loss: float


def _batch(groups: UserGroups, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats = torch.from_numpy(groups.features[idx])
    rank = torch.from_numpy(groups.rank[idx])
    target = torch.from_numpy(np.where(groups.mask[idx] > 0, groups.clicked[idx], -1.0))
    return feats, rank, target


def secure_generator() -> torch.Generator:
    """A fresh torch generator seeded from the OS CSPRNG (63 bits; see the module notes)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def train_head(
    head: RankerHead,
    groups: UserGroups,
    config: TrainConfig,
    *,
    generator: torch.Generator | None = None,
) -> tuple[TrainResult, list[tuple[float, float, int]]]:
    """Train ``head`` in place for one round.

    ``generator`` drives DP-SGD's Poisson sampling and noise; ``None`` (production) draws a
    fresh :func:`secure_generator`. Only tests pass one, to make a private run reproducible.

    Returns
    -------
    TrainResult, list of (noise_multiplier, sample_rate, steps)
        The second item is the DP events actually taken, in Opacus' accountant-history format
        (empty when non-private); the caller's persistent accountant records them.
    """
    n_users = groups.num_users
    if n_users == 0:
        return TrainResult(0, 0, 0, 0.0, float("nan")), []
    if config.private:
        return _train_private(
            head, groups, config, generator if generator is not None else secure_generator()
        )
    rng = np.random.default_rng(config.seed)
    optimizer = torch.optim.SGD(head.parameters(), lr=config.learning_rate)
    criterion = ClickLoss("mean")
    losses, steps = [], 0
    head.train()
    for _ in range(config.local_epochs):
        perm = rng.permutation(n_users)
        for start in range(0, n_users, config.batch_size):
            feats, rank, target = _batch(groups, perm[start : start + config.batch_size])
            optimizer.zero_grad()
            loss = criterion(head(feats, rank), target)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            steps += 1
    mean_loss = float(np.mean(losses))
    result = TrainResult(
        n_users, groups.num_impressions, steps, sample_rate_for(config, n_users), mean_loss
    )
    return result, []


def sample_rate_for(config: TrainConfig, num_users: int) -> float:
    """Poisson sampling rate exactly as Opacus' DPDataLoader sets it: 1 / batches per epoch.

    Planning with ``batch_size / users`` instead over-estimates q whenever the last batch is
    partial, so σ came out larger than the budget needs (measured: nodes ended their planned
    run at ε 0.85 of a budget of 1).
    """
    return 1.0 / max(1, math.ceil(max(1, num_users) / config.batch_size))


def steps_per_round(config: TrainConfig, num_users: int) -> int:
    """DP-SGD steps one round takes: epochs x batches per epoch (Opacus' loader length)."""
    return config.local_epochs * max(1, math.ceil(max(1, num_users) / config.batch_size))


def _train_private(
    head: RankerHead, groups: UserGroups, config: TrainConfig, generator: torch.Generator
) -> tuple[TrainResult, list[tuple[float, float, int]]]:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    if config.noise_multiplier is None:  # narrowed for mypy; private implies set
        raise ValueError("noise_multiplier is required for private training")
    n_users = groups.num_users
    sample_rate = sample_rate_for(config, n_users)
    loader = DataLoader(
        _UserIndex(n_users),
        # Opacus turns this into Poisson sampling at q = 1 / len(loader) = sample_rate_for(),
        # drawn from this loader's generator (DPDataLoader.from_data_loader keeps it).
        batch_size=config.batch_size,
        generator=generator,
        collate_fn=_collate_indices,
    )
    optimizer = torch.optim.SGD(head.parameters(), lr=config.learning_rate)
    criterion_in = ClickLoss("mean")
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off; the audit report states it (PyPI has no
        # torchcsprng), so the warning would only repeat that caveat once per round.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
        made = engine.make_private(
            module=head,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=config.noise_multiplier,
            max_grad_norm=config.clip_norm,
            poisson_sampling=True,
            grad_sample_mode=config.grad_sample_mode,
            criterion=criterion_in,
            # One CSPRNG-seeded stream for sampling and noise (secure_mode needs torchcsprng).
            noise_generator=generator,
        )
    if config.grad_sample_mode == "ghost":
        model, dp_optimizer, criterion, dp_loader = made
    else:
        model, dp_optimizer, dp_loader = made
        criterion = criterion_in
    model.train()
    with warnings.catch_warnings():
        # The embeddings are frozen inputs, so torch notes that Opacus' full backward hooks
        # fire on module outputs only: expected here, and per-sample norms are unaffected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        losses = _dp_epochs(groups, config, model, dp_optimizer, criterion, dp_loader)
    history = [(float(s), float(r), int(n)) for s, r, n in engine.accountant.history]
    _unwrap_into(head, model)
    steps = sum(n for _, _, n in history)
    mean_loss = float(np.mean(losses)) if losses else float("nan")
    return TrainResult(n_users, groups.num_impressions, steps, sample_rate, mean_loss), history


class _UserIndex(torch.utils.data.Dataset[tuple[torch.Tensor]]):
    """The dataset DP-SGD samples from: user indices (a user = one sample).

    ``__getitems__`` lets the DataLoader fetch a whole Poisson batch at once instead of one
    index at a time (a quarter of a DP step's time went to per-item fetching).
    """

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (torch.tensor(i),)

    def __getitems__(self, indices: list[int]) -> list[int]:
        return indices


def _collate_indices(batch: list[int]) -> tuple[torch.Tensor]:
    return (torch.as_tensor(batch, dtype=torch.int64),)


def _dp_epochs(
    groups: UserGroups,
    config: TrainConfig,
    model: torch.nn.Module,
    dp_optimizer: torch.optim.Optimizer,
    criterion: Callable[[torch.Tensor, torch.Tensor], Any],
    dp_loader: Iterable[tuple[torch.Tensor]],
) -> list[float]:
    losses: list[float] = []
    for _ in range(config.local_epochs):
        for (idx,) in dp_loader:
            dp_optimizer.zero_grad()
            if len(idx) == 0:
                # Poisson sampling drew no user: still take the (noise-only) step, so the
                # accountant's step count matches what the analysis assumes. Opacus needs a
                # per-sample gradient for every parameter: here, none (zero rows).
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                            (0, *p.shape), dtype=p.dtype
                        )
                dp_optimizer.step()
                continue
            feats, rank, target = _batch(groups, idx.numpy())
            loss = criterion(model(feats, rank), target)
            loss.backward()
            dp_optimizer.step()
            losses.append(float(loss.detach()))
    return losses


def _unwrap_into(head: RankerHead, wrapped: torch.nn.Module) -> None:
    # Opacus trains the same Parameter objects; remove its hooks so `head` is plain again.
    remove = getattr(wrapped, "_close", None)
    if callable(remove):
        remove()
    for p in head.parameters():
        p.grad = None
        for attr in ("grad_sample", "_forward_counter", "_norm_sample"):
            if hasattr(p, attr):
                delattr(p, attr)
