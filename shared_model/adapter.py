"""The semantic adapter: a low-rank residual on the frozen MiniLM vectors (issue 9).

``relevance = head(features) + (q A)·((p − p̄) B)``, with ``q`` the query's embedding,
``p − p̄`` the product's embedding minus its candidate pool's mean (centring removes the
query-level offset that a pointwise click loss would otherwise learn), ``A, B`` two
``[384, rank]`` maps. ``B`` starts at zero, so an untrained adapter scores exactly as the
head it wraps (zero-shot cosine for a fresh head); ``A`` starts random (seeded, public), as
in LoRA, so ``B`` gets a gradient from the first step. Both are plain ``nn.Linear`` layers,
so Opacus computes per-user gradients and DP-SGD trains them like the head.

No Flower here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shared_model.encoder import EMBEDDING_DIM
from shared_model.ranker import HeadConfig, PositionTower, RelevanceTower


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of the low-rank residual.

    Parameters
    ----------
    rank
        Inner width of ``A`` and ``B``.
    dim
        Width of the frozen embeddings (MiniLM: 384).
    init_scale
        ``A``'s entries start N(0, (init_scale / sqrt(rank))²): ``|q A|`` ≈ ``init_scale``
        for a unit query vector.
    train_head
        Whether the wrapped head's feature weights train too (``False``: only the residual
        and the bias learn; the head stays zero-shot cosine).
    """

    rank: int = 8
    dim: int = EMBEDDING_DIM
    init_scale: float = 1.0
    train_head: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank!r}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim!r}")
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale!r}")


class LowRankResidual(nn.Module):
    """``(q [..., d], p [..., d]) -> (q A)·(p B) [...]``; zero while ``B`` is zero."""

    def __init__(self, config: AdapterConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.query_proj = nn.Linear(config.dim, config.rank, bias=False)  # A
        self.product_proj = nn.Linear(config.dim, config.rank, bias=False)  # B
        with torch.no_grad():
            std = config.init_scale / config.rank**0.5
            self.query_proj.weight.copy_(
                torch.randn(config.rank, config.dim, generator=generator) * std
            )
            self.product_proj.weight.zero_()

    def forward(self, query: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
        return (self.query_proj(query) * self.product_proj(product)).sum(-1)


class AdapterHead(nn.Module):
    """A ranker head with the semantic adapter.

    Inputs are ``[..., F + 2·dim]``: the head's ``F`` standardised features, then the query
    vector, then the pool-centred product vector. ``relevance`` and ``forward`` behave as
    :class:`shared_model.ranker.RankerHead`'s (the position tower is used only in training).
    """

    def __init__(
        self,
        config: HeadConfig | None = None,
        adapter: AdapterConfig | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.config = config or HeadConfig()
        self.adapter_config = adapter or AdapterConfig()
        self.relevance_tower = RelevanceTower(self.config)
        self.position_tower = PositionTower(self.config)
        self.residual = LowRankResidual(self.adapter_config, generator=generator)
        if not self.adapter_config.train_head:
            self.relevance_tower.linear.weight.requires_grad_(False)

    @property
    def input_width(self) -> int:
        """``F + 2·dim``."""
        return self.config.num_features + 2 * self.adapter_config.dim

    def relevance(self, inputs: torch.Tensor) -> torch.Tensor:
        """Relevance logits ``[...]`` for inputs ``[..., F + 2·dim]``."""
        f, d = self.config.num_features, self.adapter_config.dim
        if inputs.shape[-1] != f + 2 * d:
            raise ValueError(f"expected inputs of width {f + 2 * d}, got {inputs.shape[-1]}")
        base = self.relevance_tower(inputs[..., :f])
        return base + self.residual(inputs[..., f : f + d], inputs[..., f + d : f + 2 * d])

    def forward(self, inputs: torch.Tensor, rank: torch.Tensor | None = None) -> torch.Tensor:
        """Click log-probability ``[...]`` (PAL when ``position_aware`` and ``rank`` given)."""
        log_rel = nn.functional.logsigmoid(self.relevance(inputs))
        if self.config.position_aware and rank is not None:
            return log_rel + nn.functional.logsigmoid(self.position_tower(rank))
        return log_rel
