"""On-device personalization (issue 14): the private user state, personalized scoring and the
"for you" recommender. Small synthetic histories over the real WANDS catalog; seconds."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from shared_model import features as features_module
from shared_model import personal_commands, release_commands
from shared_model.clicklog import write_click_log
from shared_model.evidence import EvidenceIndex
from shared_model.features import FeatureBuilder
from shared_model.personal import (
    MAX_STATE_BYTES,
    PersonalConfig,
    PersonalScorer,
    Session,
    UserState,
    learn_state,
    personal_rank,
    personal_scores,
    read_history,
    sessions_from_log,
)
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.recommend import PublicClicks, RecommendConfig, Recommender
from shared_model.release import write_public_key, write_release
from shared_model.scoring import DeviceRanker, top_by_bm25
from shared_model.world import WorldConfig, simulate_click_log

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def builder(request: pytest.FixtureRequest) -> FeatureBuilder:
    return request.getfixturevalue("wands_builder")


def _session(builder: FeatureBuilder, qid: str, t: int, clicked: int = 1) -> Session:
    pool = sorted(j.product_id for j in builder.data.judged(qid))[:10]
    return Session(t, qid, builder.data.queries[qid].text, tuple(pool), tuple(pool[:clicked]))


def _user_log(builder: FeatureBuilder, *, sessions: float = 8.0, seed: int = 3):
    return simulate_click_log(
        builder.data,
        WorldConfig(num_users=1, num_regions=1, sessions_per_user=sessions, seed=seed),
    )


def test_state_is_learned_in_time_order_and_round_trips(builder: FeatureBuilder) -> None:
    # Prepare
    qa, qb = builder.data.query_ids[:2]
    old, new = _session(builder, qa, 100), _session(builder, qb, 200)
    # Execute
    state = learn_state([new, old], builder)  # given out of order
    again = UserState.from_bytes(state.to_bytes())
    # Assert: the newer query weighs more (decay 0.8 per session); clicks counted; the state
    # survives serialisation exactly (vector float16).
    w = state.query_weights()
    assert w[builder.data.queries[qb].text] == pytest.approx(1 / 1.8)
    assert w[builder.data.queries[qa].text] == pytest.approx(0.8 / 1.8)
    assert state.sessions == 2 and state.clicks == 2 and state.recent[-1] == new.clicked[0]
    assert again.to_bytes() == state.to_bytes()
    assert np.array_equal(again.vector, state.vector)


def test_state_stays_under_64_kib_for_a_heavy_user(builder: FeatureBuilder) -> None:
    # Prepare: 300 sessions over every catalog query, many clicks.
    sessions = [
        _session(builder, q, t, clicked=5)
        for t, q in enumerate(builder.data.query_ids * 8, start=1)
    ]
    # Execute
    state = learn_state(sessions, builder)
    data = state.to_bytes()
    # Assert
    assert len(data) <= MAX_STATE_BYTES
    assert len(state.recent) == 32 and len(state.queries) == len(builder.data.query_ids)
    assert all(len(m) <= 20 for m in state.items.values())
    with pytest.raises(ValueError, match="over"):
        UserState.from_bytes(b" " * (MAX_STATE_BYTES + 1))


def test_state_file_is_private(builder: FeatureBuilder, tmp_path: Path) -> None:
    state = learn_state([_session(builder, builder.data.query_ids[0], 1)], builder)
    path = state.save(tmp_path / "me" / "state.json")
    assert path.stat().st_mode & 0o777 == 0o600
    assert UserState.load(path).to_bytes() == state.to_bytes()


def test_no_state_keeps_global_order_and_state_moves_toward_taste(
    builder: FeatureBuilder,
) -> None:
    # Prepare
    qid = builder.data.query_ids[0]
    text = builder.data.queries[qid].text
    ids = top_by_bm25(builder, text, 50)
    glob = np.linspace(1.0, 0.0, len(ids)).astype(np.float32)
    cats = [builder.data.products[p].top_category for p in ids]
    liked = next(c for c in cats[10:] if c != cats[0])
    liked_products = [
        p for p in builder.product_ids if builder.data.products[p].top_category == liked
    ][:6]
    history = [Session(1, "x", "some other search", tuple(liked_products), tuple(liked_products))]
    state = learn_state(history, builder)
    # Execute
    plain = personal_scores(glob, ids, None, builder)
    mine = personal_scores(glob, ids, state, builder, PersonalConfig(vector_weight=0.0))
    # Assert
    assert list(np.argsort(-plain, kind="stable")) == list(range(len(ids)))
    mean_rank = lambda s: np.mean([list(np.argsort(-s, kind="stable")).index(i)  # noqa: E731
                                    for i, c in enumerate(cats) if c == liked])
    assert mean_rank(mine) < mean_rank(plain)


def test_click_memory_promotes_clicked_and_demotes_skipped(builder: FeatureBuilder) -> None:
    qid = builder.data.query_ids[1]
    text = builder.data.queries[qid].text
    ids = sorted(j.product_id for j in builder.data.judged(qid))[:20]
    glob = np.linspace(1.0, 0.0, len(ids)).astype(np.float32)
    # The user skipped rank 1 (examined for sure) and clicked the item at rank 5.
    s = Session(1, qid, text, tuple(ids[:5]), (ids[4],))
    state = learn_state([s], builder)
    config = PersonalConfig(category_weight=0, vector_weight=0, query_vector_weight=0)
    scores = personal_scores(glob, ids, state, builder, config, query_text=text)
    order = [ids[i] for i in np.argsort(-scores, kind="stable")]
    assert order[0] == ids[4]
    assert order.index(ids[0]) > 3
    # Another query's scores are untouched by this query's memory.
    other = personal_scores(glob, ids, state, builder, config, query_text="another query")
    assert np.allclose(other, personal_scores(glob, ids, None, builder))


def test_history_from_click_log_is_time_ordered(builder: FeatureBuilder, tmp_path: Path) -> None:
    # Prepare
    log = _user_log(builder)
    path = write_click_log(log, tmp_path / "clicks.parquet")
    # Execute
    sessions = read_history(path, builder.data)
    # Assert
    assert [s.timestamp for s in sessions] == sorted(s.timestamp for s in sessions)
    assert sum(len(s.shown) for s in sessions) == log.num_rows
    assert all(set(s.clicked) <= set(s.shown) for s in sessions)
    two = simulate_click_log(builder.data, WorldConfig(num_users=2, num_regions=1, seed=1))
    with pytest.raises(ValueError, match="2 users"):
        sessions_from_log(two, builder.data)
    assert sessions_from_log(two, builder.data, user=1)


def _global(builder: FeatureBuilder):
    def scores(text: str, ids):
        q = builder.query_vector(text)
        return builder.full[builder.rows(ids)] @ q

    return scores


def _public_clicks(builder: FeatureBuilder, *, noise_var: float = 0.0) -> PublicClicks:
    """Click and examination sums per (query, product) of a simulated population's log: what
    the release's evidence holds, without the DP noise."""
    log = simulate_click_log(builder.data, WorldConfig(num_users=400, num_regions=2, seed=5))
    index = EvidenceIndex(builder.data)
    pairs = index.pair_ids(log.column("query_id").to_pylist(),
                           log.column("product_id").to_pylist())
    clicked = log.column("clicked").to_numpy(zero_copy_only=False).astype(np.float64)
    exam = 1.0 / log.column("rank").to_numpy().astype(np.float64)
    clicks = np.bincount(pairs, weights=clicked, minlength=index.num_pairs)
    exams = np.bincount(pairs, weights=exam, minlength=index.num_pairs)
    return PublicClicks.from_evidence_arrays(builder.data, index, clicks, exams, noise_var)


def _category_sessions(builder: FeatureBuilder, public: PublicClicks) -> dict[str, list[str]]:
    """Query ids with public traffic, grouped by their recommender category."""
    rec = Recommender(builder, _global(builder), public_clicks=public)
    groups: dict[str, list[str]] = {}
    for qid in builder.data.query_ids:
        text = builder.data.queries[qid].text
        if public.has_traffic(text):
            groups.setdefault(rec.query_category(text), []).append(qid)
    return groups


def test_recommender_follows_the_users_recent_categories(builder: FeatureBuilder) -> None:
    # Prepare: two categories with public traffic; one user searched A then B, another B then
    # A (same sessions, other order).
    public = _public_clicks(builder)
    groups = _category_sessions(builder, public)
    (cat_a, qa), (cat_b, qb) = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:2]
    ab = learn_state([_session(builder, qa[0], 1), _session(builder, qb[0], 2)], builder)
    ba = learn_state([_session(builder, qb[0], 1), _session(builder, qa[0], 2)], builder)
    rec = Recommender(builder, _global(builder), public_clicks=public)
    texts_b = {builder.data.queries[q].text for q in qb}
    # Execute
    first = rec.recommend(ab, 10)
    again = Recommender(builder, _global(builder), public_clicks=public).recommend(ab, 10)
    swapped = rec.recommend(ba, 10)
    # Assert: same input, same list; the more recent category weighs more in P(next query)
    # and in the list; greedy gains never increase; no history, no list.
    assert first == again and len(first) == 10
    p_b = lambda st: sum(w for t, w in rec.next_queries(st).items() if t in texts_b)  # noqa: E731
    assert p_b(ab) > p_b(ba)
    assert sum(rec.next_queries(ab).values()) == pytest.approx(1.0)
    in_b = {p for q in qb for p in public.queries[builder.data.queries[q].text][0]}
    assert sum(p in in_b for p, _ in first) >= sum(p in in_b for p, _ in swapped)
    gains = [g for _, g in first]
    assert gains == sorted(gains, reverse=True) and gains[-1] > 0
    assert rec.recommend(UserState(), 10) == []


def test_recommender_diversifies_across_likely_queries(builder: FeatureBuilder) -> None:
    # The greedy list covers more distinct queries' products than plain expected clicks.
    public = _public_clicks(builder)
    qids = [q for qs in _category_sessions(builder, public).values() for q in qs][:4]
    state = learn_state([_session(builder, q, t) for t, q in enumerate(qids, 1)], builder)
    cover = Recommender(builder, _global(builder), public_clicks=public)
    plain = Recommender(builder, _global(builder), RecommendConfig(diversify=False),
                        public_clicks=public)
    owner = {p: t for t, (pids, _, _) in public.queries.items() for p in pids}

    def distinct(recs: list[tuple[str, float]]) -> int:
        return len({owner.get(p) for p, _ in recs})

    assert distinct(cover.recommend(state, 10)) >= distinct(plain.recommend(state, 10))
    expected = [s for _, s in plain.recommend(state, 10)]
    assert expected == sorted(expected, reverse=True)


def test_noisy_public_clicks_fall_back_to_the_head(builder: FeatureBuilder) -> None:
    # Noise far above the counts: no query shows traffic, so click rates come from the
    # release's head over the BM25 candidates, not from the (unreadable) sums.
    quiet = _public_clicks(builder, noise_var=1e9)
    qid = builder.data.query_ids[0]
    text = builder.data.queries[qid].text
    assert not quiet.has_traffic(text)
    rec = Recommender(builder, _global(builder), RecommendConfig(candidates=30),
                      public_clicks=quiet)
    state = learn_state([_session(builder, qid, 1)], builder)
    listed = [p for p, _ in rec.recommend(state, 10)]
    candidates = {p for t in rec.next_queries(state) for p in top_by_bm25(builder, t, 30)}
    assert listed and set(listed) <= candidates
    with pytest.raises(ValueError, match="prior_strength"):
        RecommendConfig(prior_strength=0.0)


def test_personal_scorer_reused_across_queries_matches_one_off(builder: FeatureBuilder) -> None:
    # Prepare: a user with several sessions; one precomputed scorer serves every request.
    sessions = sessions_from_log(_user_log(builder, sessions=12.0, seed=4), builder.data)
    state = learn_state(sessions, builder)
    scorer = PersonalScorer(state, builder)
    rng = np.random.default_rng(0)
    # Execute / Assert: same scores as the one-off form, for seen and unseen query texts,
    # in any order (the per-query cache does not leak between queries).
    for text in [s.query_text for s in sessions][::-1] + ["never searched", sessions[0].query_text]:
        ids = top_by_bm25(builder, text, 60)
        glob = rng.normal(size=len(ids)).astype(np.float32)
        fast = scorer.scores(glob, ids, query_text=text)
        assert fast.dtype == np.float32
        np.testing.assert_allclose(
            fast, personal_scores(glob, ids, state, builder, query_text=text), atol=1e-6
        )
    zero = PersonalScorer(state, builder, PersonalConfig(0.0, 0.0, 0.0, 0.0, 0.0))
    glob = rng.normal(size=60).astype(np.float32)
    ids = top_by_bm25(builder, sessions[0].query_text, 60)
    np.testing.assert_allclose(zero.scores(glob, ids, query_text=sessions[0].query_text),
                               (glob - glob.mean()) / glob.std(), atol=1e-5)


def test_node_reply_with_a_personal_state_holds_only_the_contract(
    builder: FeatureBuilder, tmp_path: Path
) -> None:
    # Prepare: a node whose device-side personal state exists (saved in its state dir, and
    # in use in this process) trains one round; the reply is the message that leaves it.
    import math

    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

    from client.app import train
    from client.node import REPLY_METRICS
    from shared_model.data import DEFAULT_WANDS_DIR
    from shared_model.settings import RunSettings
    from shared_model.state import head_state

    log = simulate_click_log(builder.data, WorldConfig(num_users=40, num_regions=1, seed=1))
    data = write_click_log(log, tmp_path / "clicks.parquet")
    state = learn_state(sessions_from_log(log, builder.data, user=0), builder)
    state.save(tmp_path / "state" / "personal" / "user-0.json")
    in_use = PersonalScorer(state, builder)
    sent = {k: Array(v) for k, v in head_state(RankerHead()).items()}
    content = RecordDict({"arrays": ArrayRecord(sent), "config": ConfigRecord({"server-round": 1})})
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
        group_id="1", created_at=0.0, ttl=3600.0, message_type="train",
    )
    message = Message(content, metadata=metadata)  # type: ignore[call-overload]
    run = RunSettings(epsilon=math.inf, run_dir=str(tmp_path / "run"))
    node_config: dict[str, bool | float | int | str] = {
        "node-name": "region-x", "data-path": str(data), "state-dir": str(tmp_path / "state"),
        "catalog-dir": str(DEFAULT_WANDS_DIR), "epsilon-budget": "inf",
    }
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config=run.to_config())
    # Execute
    reply = train(message, context)
    # Assert: exactly the contract's records and keys; nothing of the state in any value.
    assert in_use.static is not None and not reply.has_error()
    assert set(reply.content) == {"arrays", "metrics", "node"}
    arrays = reply.content.array_records["arrays"]
    assert set(arrays) == set(sent)
    for key, value in arrays.items():
        assert value.numpy().shape == sent[key].numpy().shape
        assert value.numpy().dtype == np.float32
    assert tuple(reply.content.metric_records["metrics"]) == REPLY_METRICS
    node = reply.content.config_records["node"]
    assert dict(node) == {"name": "region-x"}
    blob = b"".join(
        [v.numpy().tobytes() for v in arrays.values()]
        + [repr(dict(reply.content.metric_records["metrics"])).encode(), repr(dict(node)).encode()]
    )
    secrets = [state.vector.tobytes(), *(t.encode() for t in state.queries)]
    assert state.queries and not any(s in blob for s in secrets)


def test_federated_code_never_touches_the_personal_state() -> None:
    # The personal state must never enter an update or a message: nothing in the node's or
    # the server's code imports the personalization modules.
    banned = {"shared_model.personal", "shared_model.recommend", "shared_model.personal_bench"}
    for package in ("client", "server", "privacy"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                assert not banned & set(names), f"{path} imports {banned & set(names)}"


# --- CLI ----------------------------------------------------------------------------------


@pytest.fixture
def cli(builder: FeatureBuilder, monkeypatch: pytest.MonkeyPatch) -> typer.Typer:
    monkeypatch.setattr(features_module, "FeatureBuilder", lambda *args, **kwargs: builder)
    app = typer.Typer()
    bench_app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    release_commands.register(app, bench_app)
    personal_commands.register(app, bench_app)
    return app


def test_cli_recommend_and_personalized_score(
    tmp_path: Path, builder: FeatureBuilder, cli: typer.Typer
) -> None:
    # Prepare
    key = Ed25519PrivateKey.generate()
    release = write_release(
        tmp_path / "r", head=RankerHead(HeadConfig()), version="v1", round=1,
        epsilon_per_node={}, metrics={}, signing_key=key,
    )
    public = write_public_key(key, tmp_path / "pub.pem")
    history = write_click_log(_user_log(builder), tmp_path / "clicks.parquet")
    runner = CliRunner()
    base = ["--release", str(release), "--history", str(history)]
    # Execute / Assert: recommend needs a key (or --unverified), prints a ranked list, and can
    # keep the state on the device.
    refused = runner.invoke(cli, ["recommend", *base])
    assert refused.exit_code == 2 and "--public-key" in refused.output
    state_path = tmp_path / "state.json"
    out = runner.invoke(cli, ["recommend", *base, "--public-key", str(public), "--top", "5",
                              "--save-state", str(state_path)])
    assert out.exit_code == 0, out.output
    rows = [line.split(maxsplit=3) for line in out.stdout.strip().splitlines()[1:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    state = UserState.load(state_path)
    ranker = DeviceRanker(release, builder, None)
    assert [r[2] for r in rows] == [p for p, _ in Recommender(builder, ranker.scores).recommend(
        state, 5)]
    wrong = write_public_key(Ed25519PrivateKey.generate(), tmp_path / "other.pem")
    bad = runner.invoke(cli, ["recommend", *base, "--public-key", str(wrong)])
    assert bad.exit_code == 2 and "does not verify" in bad.output
    # score --history re-ranks with the same state.
    text = next(iter(state.queries))
    out = runner.invoke(cli, ["score", *base, "--public-key", str(public), "--query", text,
                              "--top", "5"])
    assert out.exit_code == 0, out.output
    ids = [line.split()[2] for line in out.stdout.strip().splitlines()[1:]]
    expected = personal_rank(ranker, text, top_by_bm25(builder, text, 100), state, top=5)
    assert ids == [p for p, _ in expected]
