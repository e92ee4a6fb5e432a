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


# --- issue 9's per-field features (shared_model.features) -------------------------------


class _DigestEncoder:
    """Deterministic unit vectors per text (sha256-seeded): a FeatureBuilder without MiniLM."""

    def encode(self, texts):
        import hashlib

        from shared_model.encoder import EMBEDDING_DIM

        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
            v = np.random.default_rng(seed).normal(size=EMBEDDING_DIM)
            out[i] = v / np.linalg.norm(v)
        return out


def _tiny_builder(**kwargs):
    from shared_model.features import FeatureBuilder
    from shared_model.schema import JudgedSearchData, Judgment, Product, Query

    products = {
        "a": Product("a", "oak chair", "Chairs", "Furniture / Seating / Chairs"),
        "b": Product("b", "oak table", "Oak Tables", "Furniture / Tables"),
        "c": Product("c", "steel lamp", "Lamps", "Lighting / Lamps"),
        "d": Product("d", "chair cushion", "Cushions", ""),
        "e": Product("e", "brass lamp", "Lamps", "Lighting / Lamps"),
        "f": Product("f", "wool rug", "Rugs", "Decor / Rugs"),
    }
    data = JudgedSearchData(
        queries={"q": Query("q", "oak chair")},
        products=products,
        judgments=tuple(Judgment("q", p, 0.5) for p in products),
    )
    return FeatureBuilder(data, _DigestEncoder(), **kwargs)  # type: ignore[arg-type]


def test_production_features_are_the_rich_set_with_cosine_first():
    from shared_model.features import (
        BASE_FEATURE_NAMES,
        FEATURE_NAMES,
        NUM_FEATURES,
        RICH_FEATURE_NAMES,
    )

    assert FEATURE_NAMES == RICH_FEATURE_NAMES and NUM_FEATURES == 10
    assert FEATURE_NAMES[: len(BASE_FEATURE_NAMES)] == BASE_FEATURE_NAMES
    assert _tiny_builder().features_for_query_id("q", ["a", "b", "c", "d"]).shape == (4, 10)


def test_coverage_and_field_bm25_follow_the_query_tokens():
    from shared_model.features import RICH_FEATURE_NAMES

    b = _tiny_builder()
    raw = b.raw_features("oak chair", ["a", "b", "c", "d"])
    col = {n: raw[:, k] for k, n in enumerate(RICH_FEATURE_NAMES)}
    # "oak chair": a has both tokens, b and d one each, c none (IDF over all 6 products).
    np.testing.assert_allclose(col["coverage"], [1.0, 0.5, 0.0, 0.5])
    assert col["bm25_title"][0] > max(col["bm25_title"][1:])  # both tokens in a's title
    assert col["bm25_title"][2] == 0.0
    # Class + category tokens: only b's ("oak tables") match; "chairs" is not "chair".
    assert col["bm25_class"][1] > 0 and col["bm25_class"][[0, 2, 3]].tolist() == [0, 0, 0]


def test_prf_cosine_is_the_cosine_to_the_pools_top_k_centroid():
    b = _tiny_builder(prf_top_k=2)
    names = list(b.feature_names)
    pool = ["a", "b", "c", "d"]
    raw = b.raw_features("oak chair", pool)
    q = b.query_vector("oak chair")
    full = b.full[b.rows(pool)]
    top = np.argsort(-(full @ q), kind="stable")[:2]
    centroid = full[top].mean(0)
    expected = full @ (centroid / np.linalg.norm(centroid))
    np.testing.assert_allclose(raw[:, names.index("prf_cosine")], expected, rtol=1e-5)


def test_candidate_features_equal_features_over_the_same_pool_and_record_nothing():
    b = _tiny_builder()
    pool = ["d", "a", "c", "b"]
    q = _DigestEncoder().encode(["oak chair"])[0]
    got = b.candidate_features("oak chair", q, pool)
    assert b._queries == {}  # memo-free: the query is not recorded
    np.testing.assert_allclose(got, b.features("oak chair", pool), rtol=1e-5, atol=1e-6)
    assert got.shape == (4, 10)
    # Standardised per feature over the pool; cosine (col 0) keeps zero-shot's order.
    np.testing.assert_allclose(got.mean(0), 0, atol=1e-5)
    assert np.array_equal(np.argsort(got[:, 0]), np.argsort(b.full[b.rows(pool)] @ q))


def test_feature_subsets_and_bad_names():
    from shared_model.features import BASE_FEATURE_NAMES

    b = _tiny_builder(feature_names=BASE_FEATURE_NAMES)
    assert b.num_features == 4 and b.product_class is None
    assert b.features("oak chair", ["a", "b"]).shape == (2, 4)
    with pytest.raises(ValueError, match="start with 'cosine'"):
        _tiny_builder(feature_names=("bm25", "cosine"))
    with pytest.raises(ValueError, match="nope"):
        _tiny_builder(feature_names=("cosine", "nope"))


# --- the study's federation-equivalent DP settings (simulations.adapter_study) -----------


def test_study_pools_the_federations_noise_per_averaged_update():
    import math

    from simulations.adapter_study import StudyConfig, model_spec

    cfg = StudyConfig(nodes=5, node_batch=256, node_sigma=12.18, rounds=30)
    dp = cfg.dp_train()
    # FedAvg of 5 node updates (σ·C / 256 each) has std σ·C / (256·√5) on the mean gradient;
    # the pooled batch of 1,280 matches it at σ·√5.
    assert dp.batch_size == 1280 and dp.local_epochs == 30
    assert dp.noise_multiplier is not None
    assert dp.noise_multiplier / dp.batch_size == pytest.approx(12.18 / (256 * math.sqrt(5)))
    cols, adapter = model_spec("rich-minus-coverage")
    assert "coverage" not in cols and len(cols) == 9 and cols[0] == "cosine" and not adapter
    with pytest.raises(ValueError, match="cosine"):
        model_spec("rich-minus-cosine")  # the zero-shot column cannot be ablated
