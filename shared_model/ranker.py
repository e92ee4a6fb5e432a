"""The ranker: a small trainable head over query-product features, built of typed parts.

``score = relevance(features)``; during training a position-bias tower is multiplied in
(PAL, Guo et al., RecSys 2019): P(click) = P(examined | rank) · P(relevant | q, p), so the
relevance tower learns from clicks without learning the logging ranker's position bias. The
position tower is dropped at scoring.

The relevance tower starts as zero-shot MiniLM cosine (weight ``cosine_scale`` on feature 0,
everything else zero), so an untrained head ranks exactly like the off-the-shelf encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shared_model.features import NUM_FEATURES


@dataclass(frozen=True)
class HeadConfig:
    """Shape of the ranker head; all fields are hyperparameters an operator may set.

    Parameters
    ----------
    num_features
        Width of the feature vector (``shared_model.features``).
    hidden_dim
        Width of the non-linear tower (0 disables it).
    max_rank
        Positions 1..max_rank get their own examination logit; deeper ranks share the last.
    cosine_scale
        Initial weight on the cosine feature (zero-shot start).
    position_aware
        Whether training uses the position tower (PAL); ``False`` trains naively on clicks.
    """

    num_features: int = NUM_FEATURES
    hidden_dim: int = 0
    max_rank: int = 10
    cosine_scale: float = 1.0
    position_aware: bool = True

    def __post_init__(self) -> None:
        if self.num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {self.num_features!r}")
        if self.hidden_dim < 0:
            raise ValueError(f"hidden_dim must be >= 0, got {self.hidden_dim!r}")
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank!r}")


class RelevanceTower(nn.Module):
    """Features ``[..., F]`` -> relevance logit ``[...]``: linear + small MLP residual."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(config.num_features, 1)
        self.mlp: nn.Sequential | None = None
        if config.hidden_dim > 0:
            out = nn.Linear(config.hidden_dim, 1)
            with torch.no_grad():
                # Output layer at zero: the MLP starts as a no-op, the tower as cosine.
                out.weight.zero_()
                out.bias.zero_()
            self.mlp = nn.Sequential(
                nn.Linear(config.num_features, config.hidden_dim), nn.ReLU(), out
            )
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[0, 0] = config.cosine_scale
            self.linear.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.linear(features)
        if self.mlp is not None:
            out = out + self.mlp(features)
        return out.squeeze(-1)


class PositionTower(nn.Module):
    """Rank ``[...]`` (int64, 1-based; 0 = padding) -> examination logit ``[...]``."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.max_rank = config.max_rank
        self.logit = nn.Embedding(config.max_rank + 1, 1)
        with torch.no_grad():
            self.logit.weight.zero_()

    def forward(self, rank: torch.Tensor) -> torch.Tensor:
        return self.logit(rank.clamp(0, self.max_rank)).squeeze(-1)


class RankerHead(nn.Module):
    """The trainable head.

    ``forward(features [..., F], rank [...] | None) -> log P(click) [...]`` for training;
    ``relevance(features [..., F]) -> [...]`` logits for scoring.
    """

    def __init__(self, config: HeadConfig | None = None) -> None:
        super().__init__()
        self.config = config or HeadConfig()
        self.relevance_tower = RelevanceTower(self.config)
        self.position_tower = PositionTower(self.config)

    def relevance(self, features: torch.Tensor) -> torch.Tensor:
        """Relevance logits ``[...]`` for features ``[..., F]``."""
        return self.relevance_tower(features)

    def forward(self, features: torch.Tensor, rank: torch.Tensor | None = None) -> torch.Tensor:
        """Click log-probability ``[...]``.

        With ``position_aware`` and ``rank`` given: log σ(relevance) + log σ(examination);
        otherwise log σ(relevance) (the naive model).
        """
        log_rel = nn.functional.logsigmoid(self.relevance(features))
        if self.config.position_aware and rank is not None:
            return log_rel + nn.functional.logsigmoid(self.position_tower(rank))
        return log_rel


def score(head: RankerHead, features: torch.Tensor) -> torch.Tensor:
    """Score candidates: ``features [N, F]`` -> relevance logits ``[N]``."""
    head.eval()
    with torch.no_grad():
        return head.relevance(features)


def shrink_toward_init(head: RankerHead, alpha: float) -> RankerHead:
    """A copy of ``head`` whose relevance tower is moved ``alpha`` of the way from its
    zero-shot start (``alpha=0``: zero-shot cosine; ``1``: ``head`` unchanged).

    For the linear tower this scores exactly ``alpha·head + (1−alpha)·zero-shot`` (the
    blend); the MLP residual (init zero) is scaled by ``alpha`` at its output layer. The
    position tower is kept (it is dropped at scoring anyway).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    out = RankerHead(head.config)
    init = RankerHead(head.config).state_dict()
    state = head.state_dict()
    blended = {}
    for key, value in state.items():
        if key.startswith("relevance_tower.mlp.") and not key.startswith(
            "relevance_tower.mlp.2."
        ):
            blended[key] = value.clone()  # hidden layer: scaling the output layer suffices
        elif key.startswith("relevance_tower."):
            blended[key] = init[key] + alpha * (value - init[key])
        else:
            blended[key] = value.clone()
    out.load_state_dict(blended)
    return out
