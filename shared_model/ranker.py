"""The ranker: a small trainable head on frozen MiniLM embeddings, built of typed parts.

``score = relevance(query, product)``; during training a position-bias tower is multiplied in
(PAL, Guo et al., RecSys 2019): P(click) = P(examined | rank) · P(relevant | q, p), so the
relevance tower learns from clicks without learning the logging ranker's position bias. The
position tower is dropped at scoring.

The relevance tower starts as zero-shot MiniLM cosine (the linear part's cosine weight is set
to ``cosine_scale``, everything else to zero), so an untrained or barely trained head ranks
exactly like the off-the-shelf encoder: training can only move it from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shared_model.encoder import EMBEDDING_DIM


@dataclass(frozen=True)
class HeadConfig:
    """Shape of the ranker head; all fields are hyperparameters an operator may set.

    Parameters
    ----------
    embedding_dim
        Dimension of the frozen encoder's vectors.
    hidden_dim
        Width of the non-linear interaction tower (0 disables it).
    max_rank
        Positions 1..max_rank get their own examination logit; deeper ranks share the last.
    cosine_scale
        Initial weight on the cosine feature (zero-shot start).
    position_aware
        Whether training uses the position tower (PAL); ``False`` trains naively on clicks.
    """

    embedding_dim: int = EMBEDDING_DIM
    hidden_dim: int = 16
    max_rank: int = 10
    cosine_scale: float = 5.0
    position_aware: bool = True

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim!r}")
        if self.hidden_dim < 0:
            raise ValueError(f"hidden_dim must be >= 0, got {self.hidden_dim!r}")
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank!r}")


class Interaction(nn.Module):
    """Query-product interaction features.

    Input ``q``, ``p``: ``[..., D]`` L2-normalised. Output ``[..., D + 1]``: the cosine
    (first column) followed by the element-wise product ``q * p``.
    """

    def forward(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        prod = q * p
        return torch.cat([prod.sum(-1, keepdim=True), prod], dim=-1)


class RelevanceTower(nn.Module):
    """Features ``[..., D + 1]`` -> relevance logit ``[...]``: linear + small MLP residual."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        width = config.embedding_dim + 1
        self.linear = nn.Linear(width, 1)
        self.mlp: nn.Sequential | None = None
        if config.hidden_dim > 0:
            out = nn.Linear(config.hidden_dim, 1)
            with torch.no_grad():
                # Output layer at zero: the MLP starts as a no-op, the tower as cosine.
                out.weight.zero_()
                out.bias.zero_()
            self.mlp = nn.Sequential(nn.Linear(width, config.hidden_dim), nn.ReLU(), out)
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
    """Rank ``[...]`` (int64, 1-based) -> examination logit ``[...]``."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.max_rank = config.max_rank
        self.logit = nn.Embedding(config.max_rank + 1, 1)  # row 0 unused (padding)
        with torch.no_grad():
            self.logit.weight.zero_()

    def forward(self, rank: torch.Tensor) -> torch.Tensor:
        return self.logit(rank.clamp(0, self.max_rank)).squeeze(-1)


class RankerHead(nn.Module):
    """The trainable head.

    ``forward(q [..., D], p [..., D], rank [...] | None) -> log P(click) [...]`` when training
    with positions; ``relevance(q, p) -> [...]`` logits for scoring.
    """

    def __init__(self, config: HeadConfig | None = None) -> None:
        super().__init__()
        self.config = config or HeadConfig()
        self.interaction = Interaction()
        self.relevance_tower = RelevanceTower(self.config)
        self.position_tower = PositionTower(self.config)

    def relevance(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Relevance logits ``[...]`` for query/product embeddings ``[..., D]``."""
        return self.relevance_tower(self.interaction(q, p))

    def forward(
        self, q: torch.Tensor, p: torch.Tensor, rank: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Click log-probability ``[...]``.

        With ``position_aware`` and ``rank`` given: log σ(relevance) + log σ(examination);
        otherwise log σ(relevance) (the naive model).
        """
        log_rel = nn.functional.logsigmoid(self.relevance(q, p))
        if self.config.position_aware and rank is not None:
            return log_rel + nn.functional.logsigmoid(self.position_tower(rank))
        return log_rel


def click_log_loss(log_p: torch.Tensor, clicked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-group binary cross-entropy on click log-probabilities.

    Parameters
    ----------
    log_p, clicked, mask
        ``[G, M]``: log P(click), 0/1 clicks, 1 where a row is real (0 = padding).

    Returns
    -------
    torch.Tensor
        ``[G]``: the summed loss of each group (a group is one user's impressions, the unit of
        privacy), so that per-sample clipping bounds each user's whole contribution.
    """
    # log(1 - p) computed stably from log p.
    log_not_p = torch.log1p(-torch.exp(log_p).clamp(max=1 - 1e-6))
    nll = -(clicked * log_p + (1 - clicked) * log_not_p)
    return (nll * mask).sum(-1)


def score(head: RankerHead, query: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
    """Score candidates: ``query [D]``, ``products [N, D]`` -> relevance logits ``[N]``."""
    with torch.no_grad():
        return head.relevance(query.unsqueeze(0).expand_as(products), products)
