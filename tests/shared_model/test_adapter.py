"""Tests for shared_model.adapter (the semantic adapter: a low-rank residual on MiniLM vectors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared_model.adapter import AdapterConfig, AdapterHead, LowRankResidual
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.training import TrainConfig, UserGroups, train_head

F, D = 4, 16  # small embedding width keeps the tests fast; production uses 384


def _inputs(*shape: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(size=(*shape, F + 2 * D)).astype(np.float32))


def _head(rank: int = 3, seed: int = 0, train_head_weights: bool = True) -> AdapterHead:
    return AdapterHead(HeadConfig(num_features=F),
                       AdapterConfig(rank=rank, dim=D, train_head=train_head_weights),
                       generator=torch.Generator().manual_seed(seed))


def test_shapes_for_flat_and_grouped_inputs():
    head = _head()
    rank = torch.arange(1, 6).repeat(3, 1)
    assert head.relevance(_inputs(7)).shape == (7,)
    assert head.relevance(_inputs(3, 5)).shape == (3, 5)
    logp = head(_inputs(3, 5), rank)
    assert logp.shape == (3, 5) and torch.all(logp <= 0)
    assert head.input_width == F + 2 * D


def test_wrong_input_width_is_refused_naming_both_widths():
    with pytest.raises(ValueError, match=f"width {F + 2 * D}, got {F + 2 * D - 1}"):
        _head().relevance(torch.zeros(2, F + 2 * D - 1))


def test_untrained_adapter_scores_exactly_as_the_zero_shot_head():
    # The residual's product map B starts at zero: scores equal RankerHead's, i.e. the
    # cosine feature (column 0) times cosine_scale, whatever the query/product vectors are.
    x = _inputs(9, seed=3)
    with torch.no_grad():
        adapted = _head().relevance(x)
        plain = RankerHead(HeadConfig(num_features=F)).relevance(x[:, :F])
    assert torch.equal(adapted, plain)
    assert torch.equal(adapted, x[:, 0])


def test_residual_is_the_low_rank_bilinear_form():
    res = LowRankResidual(AdapterConfig(rank=2, dim=D), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        res.product_proj.weight.copy_(torch.ones(2, D))
    q, p = torch.randn(5, D), torch.randn(5, D)
    a, b = res.query_proj.weight, res.product_proj.weight  # [r, d]
    expected = torch.einsum("nd,rd,re,ne->n", q, a, b, p)
    torch.testing.assert_close(res(q, p), expected)


def test_seeded_init_is_reproducible_golden():
    w = _head(rank=2, seed=7).residual.query_proj.weight.detach()
    assert torch.equal(w, _head(rank=2, seed=7).residual.query_proj.weight.detach())
    assert not torch.equal(w, _head(rank=2, seed=8).residual.query_proj.weight.detach())
    # Golden: N(0, 1/rank) entries from torch's generator seeded 7.
    expected = torch.randn(2, D, generator=torch.Generator().manual_seed(7)) / 2**0.5
    torch.testing.assert_close(w, expected)


def _groups(num_users: int = 64, per_user: int = 6, seed: int = 0) -> UserGroups:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(num_users, per_user, F + 2 * D)).astype(np.float32)
    # Clicks follow the bilinear signal q·p on the first coordinates: only the residual can
    # learn it (the features carry no signal).
    signal = (feats[..., F : F + 4] * feats[..., F + D : F + D + 4]).sum(-1)
    clicked = (signal > 0).astype(np.float32)
    rank = np.tile(np.arange(1, per_user + 1), (num_users, 1)).astype(np.int64)
    return UserGroups(feats, rank, clicked, np.ones_like(clicked))


def test_dp_sgd_trains_the_residual_and_freezes_the_head_when_asked():
    head = _head(rank=4, train_head_weights=False)
    w0 = head.relevance_tower.linear.weight.detach().clone()
    cfg = TrainConfig(learning_rate=0.5, batch_size=16, local_epochs=2, noise_multiplier=0.5)
    result, history = train_head(head, _groups(), cfg,  # type: ignore[arg-type]
                                 generator=torch.Generator().manual_seed(0))
    assert result.steps > 0 and history
    assert torch.equal(head.relevance_tower.linear.weight, w0)  # frozen
    assert head.residual.product_proj.weight.abs().sum() > 0  # B moved off zero
    # Plain module again (Opacus' hooks removed): no per-sample gradients linger.
    assert not any(hasattr(p, "grad_sample") for p in head.parameters())


def test_central_training_learns_a_signal_only_the_residual_can_see():
    groups = _groups(num_users=256, seed=1)
    head = _head(rank=4)
    cfg = TrainConfig(learning_rate=0.5, batch_size=32, local_epochs=10)
    train_head(head, groups, cfg)  # type: ignore[arg-type]
    x = torch.from_numpy(groups.features.reshape(-1, F + 2 * D))
    y = groups.clicked.reshape(-1)
    with torch.no_grad():
        s = head.relevance(x).numpy()
    # AUC of the learned scores against the bilinear clicks, well above chance (0.5).
    pos, neg = s[y == 1], s[y == 0]
    auc = (pos[:, None] > neg[None, :]).mean()
    assert auc > 0.7


@pytest.mark.parametrize("field,value", [("rank", 0), ("dim", 0), ("init_scale", 0.0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        AdapterConfig(**{field: value})
