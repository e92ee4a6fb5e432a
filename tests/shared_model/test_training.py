"""Tests for shared_model.training: per-user grouping, the click loss, and (DP) training."""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import pyarrow as pa
import pytest
import torch

from shared_model.clicklog import CLICK_LOG_SCHEMA
from shared_model.encoder import EMBEDDING_DIM
from shared_model.features import NUM_FEATURES, FeatureBuilder
from shared_model.ranker import RankerHead
from shared_model.schema import JudgedSearchData, Judgment, Product, Query
from shared_model.training import (
    ClickLoss,
    TrainConfig,
    UserGroups,
    build_user_groups,
    steps_per_round,
    train_head,
)

# --- a tiny hand-made click log ---------------------------------------------------------
# Each product's id encodes a number the fake builder returns as feature 0, so the packed
# groups show exactly which rows (and sessions) were kept.
PRODUCT_VALUE = {
    "a1": 101.0, "a2": 102.0,  # user 1, session 10 (exploration)
    "b1": 111.0, "b2": 112.0,  # user 1, session 11 (exploration)
    "c1": 121.0, "c2": 122.0,  # user 1, session 12 (exploration)
    "d1": 201.0, "d2": 202.0, "d3": 203.0,  # user 2, session 20 (exploration)
    "e1": 211.0, "e2": 212.0,  # user 2, session 21 (logging ranker)
    "f1": 301.0, "f2": 302.0,  # user 3, session 30 (logging ranker)
}  # fmt: skip
SESSION_OF = {
    p: {"a": 10, "b": 11, "c": 12, "d": 20, "e": 21, "f": 30}[p[0]] for p in PRODUCT_VALUE
}
# (user, session, product, rank, clicked, exploration); deliberately out of order.
ROWS = [
    (2, 20, "d3", 3, True, True),
    (1, 10, "a2", 2, False, True),
    (1, 10, "a1", 1, True, True),
    (1, 11, "b1", 1, False, True),
    (1, 11, "b2", 2, True, True),
    (2, 20, "d1", 1, True, True),
    (2, 20, "d2", 2, False, True),
    (1, 12, "c1", 1, False, True),
    (1, 12, "c2", 2, False, True),
    (2, 21, "e1", 1, True, False),
    (2, 21, "e2", 2, False, False),
    (3, 30, "f1", 1, False, False),
    (3, 30, "f2", 2, True, False),
]


def click_table(rows=ROWS, query_id: str = "q1") -> pa.Table:
    """A click log in the real schema from (user, session, product, rank, clicked, explore)."""
    return pa.table(
        {
            "session_id": [r[1] for r in rows],
            "user_id": [r[0] for r in rows],
            "region_id": [0] * len(rows),
            "timestamp": [1_700_000_000 + i for i in range(len(rows))],
            "query_id": [query_id] * len(rows),
            "product_id": [r[2] for r in rows],
            "rank": [r[3] for r in rows],
            "clicked": [r[4] for r in rows],
            "exploration": [r[5] for r in rows],
        },
        schema=CLICK_LOG_SCHEMA,
    )


class FakeBuilder:
    """FeatureBuilder-like: feature 0 is the product's number, the rest fixed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def features_for_query_id(self, query_id, product_ids):
        self.calls.append((query_id, list(product_ids)))
        out = np.zeros((len(product_ids), NUM_FEATURES), dtype=np.float32)
        out[:, 0] = [PRODUCT_VALUE[p] for p in product_ids]
        out[:, 1] = 0.5
        return out


def _fake() -> FeatureBuilder:
    """A FakeBuilder, typed as the FeatureBuilder it stands in for."""
    return cast(FeatureBuilder, FakeBuilder())


def _kept(groups: UserGroups, user_row: int) -> list[float]:
    n = int(groups.mask[user_row].sum())
    return groups.features[user_row, :n, 0].tolist()


def _sessions(values: list[float]) -> set[int]:
    by_value = {v: SESSION_OF[p] for p, v in PRODUCT_VALUE.items()}
    return {by_value[v] for v in values}


# --- build_user_groups ------------------------------------------------------------------


def test_groups_exploration_sessions_per_user_with_cap():
    # Prepare
    table = click_table()

    # Execute
    groups = build_user_groups(
        table, _fake(), max_sessions_per_user=2, rng=np.random.default_rng(0)
    )

    # Assert: users 1 and 2 have exploration sessions (user 3 has none).
    # User 1: 3 sessions capped at 2 -> 4 rows; user 2: session 20 only -> 3 rows. Width 4.
    assert groups.num_users == 2
    assert groups.features.shape == (2, 4, NUM_FEATURES)
    assert groups.rank.shape == groups.clicked.shape == groups.mask.shape == (2, 4)
    assert groups.mask.sum(1).tolist() == [4.0, 3.0]
    assert groups.num_impressions == 7
    assert len(_sessions(_kept(groups, 0))) == 2
    assert _sessions(_kept(groups, 0)) <= {10, 11, 12}
    # User 2's session in rank order, clicks carried along, padding zeroed.
    assert _kept(groups, 1) == [201.0, 202.0, 203.0]
    assert groups.rank[1].tolist() == [1, 2, 3, 0]
    assert groups.clicked[1].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert groups.features[1, 3].tolist() == [0.0] * NUM_FEATURES


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_session_cap_is_respected_for_every_user(cap):
    # Prepare
    table = click_table()

    # Execute
    groups = build_user_groups(
        table,
        _fake(),
        max_sessions_per_user=cap,
        rng=np.random.default_rng(1),
        exploration_only=False,
    )

    # Assert: users 1 (3 sessions), 2 (2 sessions), 3 (1 session).
    assert groups.num_users == 3
    kept = [_sessions(_kept(groups, u)) for u in range(3)]
    assert [len(k) for k in kept] == [min(cap, 3), min(cap, 2), 1]
    # Whole sessions are kept: each kept session contributes all its rows.
    for u in range(3):
        whole = sorted(PRODUCT_VALUE[p] for p in PRODUCT_VALUE if SESSION_OF[p] in kept[u])
        assert sorted(_kept(groups, u)) == whole


def test_session_choice_is_random_across_seeds():
    # Prepare / Execute: which of user 1's 3 sessions survive a cap of 1.
    chosen = {
        frozenset(
            _sessions(
                _kept(
                    build_user_groups(
                        click_table(),
                        _fake(),
                        max_sessions_per_user=1,
                        rng=np.random.default_rng(seed),
                    ),
                    0,
                )
            )
        )
        for seed in range(20)
    }

    # Assert: not always the first session.
    assert len(chosen) > 1


def test_exploration_filter_on_and_off():
    # Prepare
    table = click_table()
    only_logged = click_table([r for r in ROWS if not r[5]])

    # Execute
    explore = build_user_groups(
        table, _fake(), max_sessions_per_user=5, rng=np.random.default_rng(0)
    )
    everything = build_user_groups(
        table,
        _fake(),
        max_sessions_per_user=5,
        rng=np.random.default_rng(0),
        exploration_only=False,
    )
    empty = build_user_groups(
        only_logged, _fake(), max_sessions_per_user=5, rng=np.random.default_rng(0)
    )

    # Assert: logging-ranker rows (e*, f*) only appear without the filter.
    logged = {PRODUCT_VALUE[p] for p in ("e1", "e2", "f1", "f2")}
    assert explore.num_impressions == 9
    assert not logged & set(explore.features[..., 0][explore.mask > 0].tolist())
    assert everything.num_impressions == 13
    assert logged <= set(everything.features[..., 0][everything.mask > 0].tolist())
    assert empty.num_users == 0 and empty.num_impressions == 0
    assert empty.features.shape == (0, 1, NUM_FEATURES)


class _HashEncoder:
    """Deterministic unit vectors per text: a FeatureBuilder without MiniLM."""

    def encode(self, texts):
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            rng = np.random.default_rng(abs(hash(text)) % (2**32))
            v = rng.normal(size=EMBEDDING_DIM)
            out[i] = v / np.linalg.norm(v)
        return out


def _tiny_builder() -> FeatureBuilder:
    products = {p: Product(p, f"product {p}", "Class", "Furniture / Chairs") for p in PRODUCT_VALUE}
    data = JudgedSearchData(
        queries={"q1": Query("q1", "oak chair")},
        products=products,
        judgments=tuple(Judgment("q1", p, 0.5) for p in PRODUCT_VALUE),
    )
    return FeatureBuilder(data, _HashEncoder())  # type: ignore[arg-type]


def test_real_builder_groups_and_unknown_product_raises_naming_it():
    # Prepare: a real FeatureBuilder over a tiny catalog; one row names a missing product.
    builder = _tiny_builder()
    good = build_user_groups(
        click_table(), builder, max_sessions_per_user=2, rng=np.random.default_rng(0)
    )
    bad = click_table([*ROWS, (4, 40, "no-such-product", 1, True, True)])

    # Execute / Assert
    assert good.num_users == 2 and np.all(np.isfinite(good.features))
    with pytest.raises(KeyError, match="no-such-product"):
        build_user_groups(bad, builder, max_sessions_per_user=2, rng=np.random.default_rng(0))
    with pytest.raises(KeyError, match="q-missing"):
        build_user_groups(
            click_table(query_id="q-missing"),
            builder,
            max_sessions_per_user=2,
            rng=np.random.default_rng(0),
        )


# --- ClickLoss --------------------------------------------------------------------------


def test_click_loss_per_user_matches_hand_computation():
    # Prepare: P(click) per impression; targets 1 click, 0 no click, -1 padding.
    p = torch.tensor([[0.5, 0.25, 0.9], [0.8, 0.1, 0.5]])
    target = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    log_p = torch.log(p)

    # Execute
    per_user = ClickLoss("none")(log_p, target)
    mean = ClickLoss("mean")(log_p, target)
    total = ClickLoss("sum")(log_p, target)

    # Assert:
    # user 0: -log 0.5 - log(1 - 0.25) = 0.693147 + 0.287682 = 0.980829 (0.9 is padding)
    # user 1: -log(1 - 0.8) - log 0.1 - log(1 - 0.5) = 1.609438 + 2.302585 + 0.693147
    #       = 4.605170
    expected = [0.693147 + 0.287682, 1.609438 + 2.302585 + 0.693147]
    assert per_user.tolist() == pytest.approx(expected, abs=1e-5)
    assert mean.item() == pytest.approx(sum(expected) / 2, abs=1e-5)
    assert total.item() == pytest.approx(sum(expected), abs=1e-5)


def test_click_loss_is_finite_when_p_is_one_and_no_click():
    # Prepare: log p = 0 (p = 1) but not clicked; p is clamped to 1 - 1e-6.
    log_p, target = torch.zeros(1, 1), torch.zeros(1, 1)

    # Execute
    loss = ClickLoss("none")(log_p, target)

    # Assert: -log(1e-6) = 13.8155
    assert loss.item() == pytest.approx(-math.log(1e-6), rel=1e-3)


# --- train_head -------------------------------------------------------------------------


def separable_groups(num_users: int = 200, per_user: int = 5, seed: int = 0) -> UserGroups:
    """Clicks iff feature 1 > 0 (which the untrained head ignores), all shown at rank 1."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(num_users, per_user, NUM_FEATURES)).astype(np.float32)
    clicked = (feats[..., 1] > 0).astype(np.float32)
    shape = (num_users, per_user)
    return UserGroups(feats, np.ones(shape, np.int64), clicked, np.ones(shape, np.float32))


def _loss(head: RankerHead, groups: UserGroups) -> float:
    with torch.no_grad():
        log_p = head(torch.from_numpy(groups.features), torch.from_numpy(groups.rank))
        return float(ClickLoss("mean")(log_p, torch.from_numpy(groups.clicked)))


def test_non_private_training_reduces_loss_on_separable_problem():
    # Prepare
    groups = separable_groups()
    head = RankerHead()
    before = _loss(head, groups)
    config = TrainConfig(learning_rate=0.5, batch_size=32, local_epochs=10, seed=0)

    # Execute
    result, history = train_head(head, groups, config)

    # Assert
    after = _loss(head, groups)
    assert after < 0.7 * before, (before, after)
    assert head.relevance_tower.linear.weight[0, 1].item() > 1.0  # learned the signal
    assert history == []
    assert result.num_users == 200 and result.num_impressions == 1000
    assert result.steps == 10 * math.ceil(200 / 32)
    assert math.isfinite(result.mean_loss)


def test_training_with_no_users_is_a_no_op():
    # Prepare
    empty = UserGroups(
        np.zeros((0, 1, NUM_FEATURES), np.float32),
        np.zeros((0, 1), np.int64),
        np.zeros((0, 1), np.float32),
        np.zeros((0, 1), np.float32),
    )
    head = RankerHead()
    before = [p.detach().clone() for p in head.parameters()]

    # Execute
    result, history = train_head(head, empty, TrainConfig(noise_multiplier=1.0))

    # Assert
    assert result.steps == 0 and history == []
    assert all(torch.equal(a, b) for a, b in zip(before, head.parameters(), strict=True))


def _opacus_leftovers(head: RankerHead) -> list[str]:
    found = []
    for name, p in head.named_parameters():
        found += [
            f"{name}.{a}"
            for a in ("grad_sample", "_forward_counter", "_norm_sample")
            if hasattr(p, a)
        ]
    for name, m in head.named_modules():
        if m._forward_hooks or m._backward_hooks or m._forward_pre_hooks:
            found.append(f"hooks on {name or 'head'}")
    return found


@pytest.mark.parametrize("epochs", [1, 2])
def test_private_training_reports_opacus_history_and_leaves_plain_head(epochs):
    # Prepare: 200 users, batch 32 -> nominal q = 0.16, ceil(1/q) = 7 steps per epoch.
    # Opacus' DPDataLoader samples (and the accountant records) q = 1 / len(loader) = 1/7.
    groups = separable_groups()
    head = RankerHead()
    config = TrainConfig(
        learning_rate=0.5, batch_size=32, local_epochs=epochs, noise_multiplier=1.1, seed=3
    )
    start = [p.detach().clone() for p in head.parameters()]

    # Execute
    result, history = train_head(head, groups, config)

    # Assert: history in Opacus' (σ, q, steps) format, steps as the accountant assumes.
    assert history, "private training recorded no DP events"
    assert all(sigma == 1.1 and q == pytest.approx(1 / 7) for sigma, q, _ in history)
    assert sum(n for _, _, n in history) == steps_per_round(config, 200) == 7 * epochs
    assert result.steps == 7 * epochs
    assert type(head) is RankerHead
    assert _opacus_leftovers(head) == []
    assert any(not torch.equal(a, b) for a, b in zip(start, head.parameters(), strict=True))


def test_privately_trained_head_can_be_trained_again():
    # Prepare
    groups = separable_groups(num_users=100)
    head = RankerHead()
    private = TrainConfig(batch_size=20, noise_multiplier=0.8, seed=0)
    train_head(head, groups, private)

    # Execute: a second private round and then a plain one on the same head.
    _, history = train_head(head, groups, private)
    plain_result, plain_history = train_head(head, groups, TrainConfig(batch_size=20, seed=1))

    # Assert
    assert sum(n for _, _, n in history) == steps_per_round(private, 100) == 5
    assert plain_history == [] and plain_result.steps == 5
    assert _opacus_leftovers(head) == []
    assert all(torch.isfinite(p).all() for p in head.parameters())


def test_private_noise_is_fresh_unless_a_generator_is_injected():
    # Prepare
    groups = separable_groups(num_users=60)
    config = TrainConfig(batch_size=20, noise_multiplier=1.0)

    def run(generator=None):
        torch.manual_seed(0)  # identical initial heads (and global torch state) every time
        head = RankerHead()
        train_head(head, groups, config, generator=generator)
        return torch.cat([p.detach().ravel() for p in head.parameters()])

    # Execute
    fresh = [run(), run()]
    injected = [run(torch.Generator().manual_seed(5)), run(torch.Generator().manual_seed(5))]

    # Assert: production draws (CSPRNG-seeded) differ; a test's own generator reproduces.
    assert not torch.allclose(fresh[0], fresh[1])
    assert torch.equal(injected[0], injected[1])
