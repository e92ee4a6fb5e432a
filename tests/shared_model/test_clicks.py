"""Click model, simulator, click-log format, partitions, BM25 logging ranker and OBD check."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from shared_model.bm25 import Bm25Ranker, tokenize
from shared_model.clicklog import (
    CLICK_LOG_SCHEMA,
    read_click_log,
    read_click_logs,
    write_click_log,
)
from shared_model.clicks import (
    PositionBasedClickModel,
    UserPopulation,
    click_through_by_rank,
    dominant_category,
    make_population,
    simulate_sessions,
    user_session_order,
)
from shared_model.obd import DEFAULT_OBD_DIR, fit_eta, obd_ctr_by_position
from shared_model.partition import partition_device, partition_regional, write_partitions
from shared_model.schema import DataError, JudgedSearchData, Judgment, Product, Query

CATEGORIES = ("Furniture", "Lighting", "Outdoor", "Rugs", "Pet")
WORDS = ("chair", "lamp", "table", "bench", "rug", "bed", "shelf", "sofa", "desk", "stool")


def synthetic_data(seed: int = 7) -> JudgedSearchData:
    """25 queries, 200 products over 5 categories, a judged pool of 30 per query."""
    rng = np.random.default_rng(seed)
    products = {}
    for i in range(200):
        cat = CATEGORIES[i % len(CATEGORIES)]
        words = " ".join(rng.choice(WORDS, size=3))
        products[f"p{i:03d}"] = Product(
            product_id=f"p{i:03d}", title=f"{words} {i}", category_path=f"{cat} / Sub"
        )
    queries, judgments = {}, []
    for q in range(25):
        cat_idx = q % len(CATEGORIES)
        qid = f"q{q:02d}"
        queries[qid] = Query(qid, " ".join(rng.choice(WORDS, size=2)))
        # Most of the pool from the query's own category, so it has a clear dominant one.
        own = [i for i in range(200) if i % len(CATEGORIES) == cat_idx]
        other = [i for i in range(200) if i % len(CATEGORIES) != cat_idx]
        pool = list(rng.choice(own, size=22, replace=False)) + list(
            rng.choice(other, size=8, replace=False)
        )
        for i in pool:
            rel = float(rng.choice([0.0, 0.5, 1.0]))
            judgments.append(Judgment(qid, f"p{i:03d}", rel))
    return JudgedSearchData(queries=queries, products=products, judgments=tuple(judgments))


@pytest.fixture(scope="module")
def data() -> JudgedSearchData:
    return synthetic_data()


@pytest.fixture(scope="module")
def ranker(data: JudgedSearchData) -> Bm25Ranker:
    return Bm25Ranker(data)


@pytest.fixture(scope="module")
def population(data: JudgedSearchData) -> UserPopulation:
    return make_population(num_users=8000, num_regions=5, seed=3, data=data)


@pytest.fixture(scope="module")
def big_log(data: JudgedSearchData, population: UserPopulation, ranker: Bm25Ranker) -> pa.Table:
    return simulate_sessions(
        data, population, click_model=PositionBasedClickModel(), logging_ranker=ranker, seed=11
    )


def small_log(data: JudgedSearchData, ranker: Bm25Ranker, seed: int) -> pa.Table:
    pop = make_population(num_users=300, num_regions=3, seed=1, data=data)
    return simulate_sessions(
        data, pop, click_model=PositionBasedClickModel(), logging_ranker=ranker, seed=seed
    )


# --- click model -------------------------------------------------------------------------


def test_click_model_defaults_follow_documented_formula() -> None:
    # Prepare
    model = PositionBasedClickModel()
    # Execute
    p = model.click_probability(np.array([1, 2, 4]), np.array([1.0, 0.5, 0.0]))
    # Assert
    assert (model.eta, model.noise_floor, model.alpha_max) == (1.0, 0.05, 0.9)
    np.testing.assert_allclose(p, [0.9, 0.5 * 0.475, 0.25 * 0.05])


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"eta": -0.1}, "eta"),
        ({"eta": math.nan}, "eta"),
        ({"noise_floor": 0.95, "alpha_max": 0.9}, "noise_floor"),
        ({"alpha_max": 1.5}, "alpha_max"),
        ({"noise_floor": -0.01}, "noise_floor"),
    ],
)
def test_click_model_rejects_bad_parameters_by_name(kwargs: dict, named: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=named):
        PositionBasedClickModel(**kwargs)


def test_click_model_rejects_bad_rank_and_relevance() -> None:
    model = PositionBasedClickModel()
    with pytest.raises(ValueError, match="rank"):
        model.examination(0)
    with pytest.raises(ValueError, match="relevance"):
        model.attractiveness(1.5)


# --- simulator ---------------------------------------------------------------------------


def test_examination_curve_recovered_from_simulated_log(
    data: JudgedSearchData, population: UserPopulation, big_log: pa.Table
) -> None:
    # Prepare: the true per-row attractiveness (relevance, then the user's taste bonus).
    # (Per-user tastes, issue 14: this used the region's multiplier before.)
    model = PositionBasedClickModel()
    base = {
        (j.query_id, j.product_id): float(model.attractiveness(j.relevance)) for j in data.judgments
    }
    cats = population.categories
    cat_col = {c: i for i, c in enumerate(cats)}
    cat = {pid: p.top_category for pid, p in data.products.items()}
    rows = zip(
        big_log.column("query_id").to_pylist(),
        big_log.column("product_id").to_pylist(),
        big_log.column("user_id").to_pylist(),
        strict=True,
    )
    tastes = population.tastes

    def multiplier(u: int, c: str) -> float:
        w = float(tastes[u, cat_col[c]]) if c in cat_col else 0.0
        return 1.0 + population.taste_strength * w

    attract = np.array([min(1.0, base[(q, p)] * multiplier(u, cat[p])) for q, p, u in rows])
    ranks = big_log.column("rank").to_numpy().astype(int)
    clicked = big_log.column("clicked").to_numpy(zero_copy_only=False).astype(float)

    # Execute: P(exam | rank) = CTR(rank) / mean attractiveness shown at that rank.
    exam = {k: clicked[ranks == k].mean() / attract[ranks == k].mean() for k in range(1, 6)}

    # Assert: same shape as (1/rank)^eta once normalised by rank 1.
    for k in range(1, 6):
        expected = (1.0 / k) ** model.eta
        assert exam[k] / exam[1] == pytest.approx(expected, rel=0.10), k


def test_ctr_falls_with_rank(big_log: pa.Table) -> None:
    # Execute
    ctr = click_through_by_rank(big_log)
    # Assert
    assert sorted(ctr) == list(range(1, 11))
    assert ctr[1] > ctr[5] > 0


def test_same_seed_same_parquet_bytes_different_seed_differs(
    data: JudgedSearchData, ranker: Bm25Ranker, tmp_path: Path
) -> None:
    # Prepare / Execute
    a = write_click_log(small_log(data, ranker, seed=5), tmp_path / "a.parquet")
    b = write_click_log(small_log(data, ranker, seed=5), tmp_path / "b.parquet")
    c = write_click_log(small_log(data, ranker, seed=6), tmp_path / "c.parquet")
    # Assert
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_simulated_log_is_well_formed(
    data: JudgedSearchData, ranker: Bm25Ranker, population: UserPopulation, big_log: pa.Table
) -> None:
    # Execute
    table = big_log
    sessions = table.column("session_id").to_numpy()
    users = table.column("user_id").to_numpy()
    times = table.column("timestamp").to_numpy()
    first = np.r_[True, sessions[1:] != sessions[:-1]]
    # Assert: schema, 10 shown per session (pools have 30), shown = ranker's top 10.
    assert table.schema == CLICK_LOG_SCHEMA
    assert np.all(np.bincount(sessions) == 10)
    s0 = table.filter(pc.equal(table.column("session_id"), 0))
    q0 = s0.column("query_id")[0].as_py()
    assert s0.column("product_id").to_pylist() == ranker.rank(q0)[:10]
    assert s0.column("rank").to_pylist() == list(range(1, 11))
    # Every user has at least one session; timestamps strictly increase within a user.
    assert set(np.unique(users)) == set(population.user_ids.tolist())
    su, st = users[first], times[first]
    same_user = su[1:] == su[:-1]
    assert np.all(st[1:][same_user] > st[:-1][same_user])
    # Region of each row is the user's region.
    assert np.array_equal(table.column("region_id").to_numpy(), population.region_ids[users])


def test_query_ids_restricts_issued_queries(data: JudgedSearchData, ranker: Bm25Ranker) -> None:
    # Prepare
    pop = make_population(num_users=200, num_regions=2, seed=0, data=data)
    # Execute
    table = simulate_sessions(
        data,
        pop,
        click_model=PositionBasedClickModel(),
        logging_ranker=ranker,
        query_ids=["q01", "q02"],
        seed=0,
    )
    # Assert
    assert set(table.column("query_id").to_pylist()) <= {"q01", "q02"}


def test_regions_issue_queries_from_different_categories(
    data: JudgedSearchData, population: UserPopulation, big_log: pa.Table
) -> None:
    # Prepare
    cat_of = {q: dominant_category(data, q) for q in data.query_ids}
    cats = sorted(set(cat_of.values()))
    firsts = big_log.filter(pc.equal(big_log.column("rank"), 1))
    regions = firsts.column("region_id").to_numpy()
    qcats = np.array([cats.index(cat_of[q]) for q in firsts.column("query_id").to_pylist()])
    # Execute: each region's distribution of query categories.
    dist = np.array(
        [np.bincount(qcats[regions == r], minlength=len(cats)) for r in range(5)], dtype=float
    )
    dist /= dist.sum(axis=1, keepdims=True)
    tv = 0.5 * np.abs(dist[:, None, :] - dist[None, :, :]).sum(axis=2)
    # Assert: regions are clearly non-IID, and each follows its own Dirichlet taste.
    assert cats == sorted(CATEGORIES)
    assert tv.max() > 0.4
    assert np.median(tv[np.triu_indices(5, 1)]) > 0.2
    for r in range(5):
        favourite = population.categories[int(np.argmax(population.region_weights[r]))]
        assert cats[int(np.argmax(dist[r]))] == favourite


def test_user_tastes_mix_region_and_own_draw(data: JudgedSearchData) -> None:
    # Prepare / Execute
    mixed = make_population(num_users=400, num_regions=3, seed=2, data=data)
    region_only = make_population(
        num_users=400, num_regions=3, seed=2, data=data, user_taste_mix=0.0
    )
    # Assert: documented default 0.5; rows sum to 1; mix 0 is the region's row exactly; the
    # regions and their users do not depend on the mix; users of one region differ.
    assert mixed.user_taste_mix == 0.5
    assert np.allclose(mixed.tastes.sum(axis=1), 1.0)
    assert np.array_equal(region_only.tastes, region_only.region_weights[region_only.region_ids])
    assert np.array_equal(mixed.region_ids, region_only.region_ids)
    assert np.array_equal(mixed.region_weights, region_only.region_weights)
    own = (mixed.tastes - 0.5 * mixed.region_weights[mixed.region_ids]) / 0.5
    assert np.all(own >= -1e-12) and np.allclose(own.sum(axis=1), 1.0)
    in_region = mixed.tastes[mixed.region_ids == 0]
    assert np.abs(in_region - in_region.mean(axis=0)).max() > 0.2
    u0 = int(np.argmax(mixed.tastes[:, 0]))
    assert mixed.user_taste_multiplier(u0, mixed.categories[0]) == pytest.approx(
        1.0 + 0.5 * mixed.tastes[u0, 0]
    )
    assert mixed.user_taste_multiplier(u0, "no such category") == 1.0


def test_region_only_mix_reproduces_region_world(
    data: JudgedSearchData, ranker: Bm25Ranker
) -> None:
    # Prepare: a population whose users all carry their region's taste.
    pop = make_population(num_users=300, num_regions=3, seed=1, data=data, user_taste_mix=0.0)
    legacy = UserPopulation(
        user_ids=pop.user_ids, region_ids=pop.region_ids, categories=pop.categories,
        region_weights=pop.region_weights,
    )  # no user_weights: the region-only world
    # Execute
    a = simulate_sessions(data, pop, click_model=PositionBasedClickModel(),
                          logging_ranker=ranker, seed=4)
    b = simulate_sessions(data, legacy, click_model=PositionBasedClickModel(),
                          logging_ranker=ranker, seed=4)
    # Assert
    assert a.equals(b)


def test_users_issue_queries_of_their_own_taste(data: JudgedSearchData, ranker: Bm25Ranker) -> None:
    # Prepare: one region, so any difference between users comes from their own draws.
    pop = make_population(num_users=600, num_regions=1, seed=5, data=data)
    table = simulate_sessions(data, pop, click_model=PositionBasedClickModel(),
                              logging_ranker=ranker, sessions_per_user_mean=8.0, seed=5)
    firsts = table.filter(pc.equal(table.column("rank"), 1))
    cat_of = {q: dominant_category(data, q) for q in data.query_ids}
    issued = firsts.column("query_id").to_pylist()
    cols = np.array([pop.categories.index(cat_of[q]) for q in issued])
    users = firsts.column("user_id").to_numpy()
    # Execute: weight of the issued query's category under the issuing user's taste vs a
    # random other user's.
    own = pop.tastes[users, cols]
    other = pop.tastes[np.roll(np.arange(pop.num_users), 1)[users], cols]
    # Assert
    assert own.mean() > other.mean() + 0.05


def test_user_session_order_follows_time(data: JudgedSearchData, ranker: Bm25Ranker) -> None:
    # Prepare
    table = small_log(data, ranker, seed=3)
    # Execute
    order = user_session_order(table)
    # Assert: 0..n-1 per user, increasing with time, constant within a session; and the same
    # after the rows are shuffled.
    users = table.column("user_id").to_numpy()
    times = table.column("timestamp").to_numpy()
    sessions = table.column("session_id").to_numpy()
    for u in np.unique(users)[:20]:
        rows = users == u
        n = len(np.unique(sessions[rows]))
        assert sorted(set(order[rows].tolist())) == list(range(n))
        by_index = {int(i): int(t) for i, t in zip(order[rows], times[rows], strict=True)}
        assert [by_index[i] for i in range(n)] == sorted(by_index.values())
    perm = np.random.default_rng(0).permutation(table.num_rows)
    assert np.array_equal(user_session_order(table.take(pa.array(perm))), order[perm])


def test_make_population_validates() -> None:
    with pytest.raises(ValueError, match="num_users"):
        make_population(num_users=0, num_regions=2, seed=0, categories=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        make_population(num_users=5, num_regions=2, seed=0)


# --- click-log format --------------------------------------------------------------------


def test_click_log_round_trip_and_concat(
    data: JudgedSearchData, ranker: Bm25Ranker, tmp_path: Path
) -> None:
    # Prepare
    table = small_log(data, ranker, seed=1)
    # Execute
    path = write_click_log(table, tmp_path / "sub" / "clicks.parquet")
    back = read_click_log(path)
    both = read_click_logs([path, path])
    # Assert
    assert back.equals(table)
    assert both.num_rows == 2 * table.num_rows
    assert not list((tmp_path / "sub").glob("*.tmp"))


def _write_raw(table: pa.Table, path: Path) -> Path:
    pq.write_table(table, path)
    return path


def test_click_log_schema_errors_name_the_problem(
    data: JudgedSearchData, ranker: Bm25Ranker, tmp_path: Path
) -> None:
    # Prepare
    table = small_log(data, ranker, seed=1)
    missing = _write_raw(table.drop_columns(["clicked"]), tmp_path / "missing.parquet")
    wrong = _write_raw(
        table.set_column(6, "rank", table.column("rank").cast(pa.int64())),
        tmp_path / "wrong.parquet",
    )
    extra = _write_raw(
        table.append_column("score", pa.array(np.zeros(table.num_rows))),
        tmp_path / "extra.parquet",
    )
    text = tmp_path / "text.parquet"
    text.write_text("session_id,user_id\n1,2\n")
    # Execute / Assert
    with pytest.raises(DataError, match="missing column.*clicked") as err:
        read_click_log(missing)
    assert err.value.path == str(missing) and err.value.line is None
    with pytest.raises(DataError, match="rank has type int64, expected int16"):
        read_click_log(wrong)
    with pytest.raises(DataError, match="unexpected column.*score"):
        read_click_log(extra)
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_click_log(text)
    with pytest.raises(DataError, match="not found"):
        read_click_log(tmp_path / "absent.parquet")
    with pytest.raises(ValueError, match="missing column.*clicked"):
        write_click_log(table.drop_columns(["clicked"]), tmp_path / "never.parquet")


# --- partitions --------------------------------------------------------------------------


def test_partitions_cover_every_row_once_and_round_trip(
    data: JudgedSearchData, ranker: Bm25Ranker, tmp_path: Path
) -> None:
    # Prepare
    table = small_log(data, ranker, seed=2)
    # Execute
    regional = partition_regional(table)
    device = partition_device(table)
    paths = write_partitions(regional, tmp_path, prefix="node")
    back = read_click_logs(paths[k] for k in sorted(paths))
    # Assert: every row in exactly one partition, each partition homogeneous.
    assert sorted(regional) == [0, 1, 2]
    assert sum(t.num_rows for t in regional.values()) == table.num_rows
    assert sum(t.num_rows for t in device.values()) == table.num_rows
    assert all(set(t.column("region_id").to_pylist()) == {k} for k, t in regional.items())
    assert all(set(t.column("user_id").to_pylist()) == {k} for k, t in device.items())
    assert sorted(device) == sorted(set(table.column("user_id").to_pylist()))
    assert paths[1] == tmp_path / "node-1" / "clicks.parquet"
    key = [("session_id", "ascending"), ("rank", "ascending")]
    assert back.sort_by(key).equals(table.sort_by(key))


# --- BM25 logging ranker -----------------------------------------------------------------


def test_bm25_ranks_the_judged_pool_deterministically(
    data: JudgedSearchData, ranker: Bm25Ranker
) -> None:
    # Execute
    ranked = ranker.rank("q00")
    scores = ranker.score(data.queries["q00"].text, ranked)
    # Assert
    assert tokenize("King-Size Bed, 2x") == ["king", "size", "bed", "2x"]
    assert sorted(ranked) == sorted(j.product_id for j in data.judged("q00"))
    keys = list(zip(-scores, ranked, strict=True))
    assert keys == sorted(keys)
    assert Bm25Ranker(data).rank("q00") == ranked
    with pytest.raises(KeyError, match="nope"):
        ranker.rank("nope")


# --- OBD ---------------------------------------------------------------------------------


def test_obd_ctr_by_position_and_eta_fit() -> None:
    # Execute
    ctr = obd_ctr_by_position(DEFAULT_OBD_DIR)
    eta = fit_eta({p: c for p, (c, _, _) in ctr.items()})
    # Assert
    assert sorted(ctr) == [1, 2, 3]
    assert sum(n for _, _, n in ctr.values()) == 30_000
    assert sum(k for _, k, _ in ctr.values()) == 130
    assert all(c == k / n for c, k, n in ctr.values())
    assert math.isfinite(eta)


def test_fit_eta_recovers_a_power_law_and_rejects_too_few_points() -> None:
    assert fit_eta({r: 0.3 * r**-0.7 for r in range(1, 6)}) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="two or more"):
        fit_eta({1: 0.1, 2: 0.0})


def test_obd_missing_directory_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no OBD log"):
        obd_ctr_by_position(tmp_path)


# --- real WANDS (when the adapter is present) --------------------------------------------


def test_default_population_on_wands_has_position_bias() -> None:
    # Prepare
    data_mod = pytest.importorskip("shared_model.data")
    wands = data_mod.load_wands()
    pop = make_population(num_users=2000, num_regions=5, seed=0, data=wands)
    # Execute
    table = simulate_sessions(
        wands,
        pop,
        click_model=PositionBasedClickModel(),
        logging_ranker=Bm25Ranker(wands),
        seed=0,
    )
    ctr = click_through_by_rank(table)
    # Assert
    assert ctr[1] > 2 * ctr[5]
    assert set(table.column("query_id").to_pylist()) <= set(wands.query_ids)


def test_short_pools_show_fewer_than_top_k(data: JudgedSearchData, ranker: Bm25Ranker) -> None:
    # Prepare
    pop = make_population(num_users=50, num_regions=2, seed=0, data=data)
    # Execute
    table = simulate_sessions(
        data, pop, click_model=PositionBasedClickModel(), logging_ranker=ranker, top_k=40, seed=0
    )
    # Assert: every pool has 30 products, so every session shows 30.
    assert np.all(np.bincount(table.column("session_id").to_numpy()) == 30)
    assert table.column("rank").to_numpy().max() == 30
