"""Tests for shared_model.scoring and the `fedrank score` / `fedrank bench score` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

import shared_model.features as features_module
from shared_model import release_commands
from shared_model.features import FeatureBuilder
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.release import ReleaseError, write_public_key, write_release
from shared_model.scoring import (
    DeviceRanker,
    OnnxScorer,
    candidate_features,
    encode_query,
    query_encoder_for,
    top_by_bm25,
)
from shared_model.state import head_state, load_head_state


@pytest.fixture(scope="session")
def builder(request: pytest.FixtureRequest) -> FeatureBuilder:
    """The session's one WANDS FeatureBuilder (``wands_builder`` from conftest when present)."""
    try:
        return request.getfixturevalue("wands_builder")
    except pytest.FixtureLookupError:
        from shared_model.data import load_wands
        from shared_model.encoder import CachedEncoder

        return FeatureBuilder(load_wands(), CachedEncoder())


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def trained_like_head(seed: int = 0) -> RankerHead:
    head = RankerHead(HeadConfig(hidden_dim=8))
    rng = np.random.default_rng(seed)
    load_head_state(
        head, {k: rng.normal(size=v.shape).astype(np.float32) for k, v in head_state(head).items()}
    )
    return head


def release_for(directory: Path, key: Ed25519PrivateKey, head: RankerHead) -> Path:
    return write_release(
        directory,
        head=head,
        version="v1",
        round=1,
        epsilon_per_node={"node-0": 1.0},
        metrics={},
        signing_key=key,
    )


def catalog_query(builder: FeatureBuilder, index: int = 0) -> tuple[str, list[str]]:
    """A WANDS query text (its embedding is in the cache) and its judged pool."""
    qid = builder.data.query_ids[index]
    pool = list(dict.fromkeys(j.product_id for j in builder.data.judged(qid)))
    return builder.data.queries[qid].text, pool


# --- features -----------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 7, 23])
def test_candidate_features_equal_feature_builder(builder: FeatureBuilder, index: int) -> None:
    text, pool = catalog_query(builder, index)
    rng = np.random.default_rng(index)
    for ids in (pool, [pool[i] for i in rng.permutation(len(pool))[:10]], pool[:1]):
        q = builder.query_vector(text)
        got = candidate_features(builder, text, q, ids)
        np.testing.assert_array_equal(got, builder.features(text, ids))
        assert got.dtype == np.float32


def test_encode_query_reads_cache_without_writing(builder: FeatureBuilder) -> None:
    text, _ = catalog_query(builder, 3)
    expected = builder.query_vector(text)  # puts the text in the cache (if it was not)
    size = len(builder.encoder.cache)
    np.testing.assert_array_equal(encode_query(builder, text), expected)
    fresh = f"{text} never seen before"
    np.testing.assert_allclose(
        encode_query(builder, fresh), builder.encoder.encoder.encode([fresh])[0], atol=1e-6
    )
    assert len(builder.encoder.cache) == size  # neither query was written to the cache


class _CountingEncoder:
    """A query encoder with the builder's fingerprint that records what it encodes."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.texts: list[str] = []

    def encode(self, texts):
        self.texts.extend(texts)
        out = np.zeros((len(texts), 384), dtype=np.float32)
        out[:, 0] = 1.0
        return out


def test_encode_query_uses_given_encoder_on_cache_miss(builder: FeatureBuilder) -> None:
    text, _ = catalog_query(builder, 3)
    builder.query_vector(text)
    encoder = _CountingEncoder(builder.encoder.fingerprint)
    np.testing.assert_array_equal(encode_query(builder, text, encoder), builder.query_vector(text))
    assert encoder.texts == []  # a cache hit encodes nothing
    assert encode_query(builder, f"{text} unseen", encoder)[0] == 1.0
    assert encoder.texts == [f"{text} unseen"]


def test_query_encoder_falls_back_to_torch(
    builder: FeatureBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shared_model.onnx_encoder as onnx_module

    assert query_encoder_for(builder, "torch") is None
    with pytest.raises(ValueError, match="onnx"):
        query_encoder_for(builder, "tensorflow")  # type: ignore[arg-type]

    def broken(*args, **kwargs):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(onnx_module, "shared_onnx_encoder", broken)
    with pytest.warns(RuntimeWarning, match="no exporter here"):
        assert query_encoder_for(builder) is None

    monkeypatch.setattr(
        onnx_module, "shared_onnx_encoder", lambda *a, **k: _CountingEncoder("other-model")
    )
    with pytest.warns(RuntimeWarning, match="differs"):
        assert query_encoder_for(builder) is None


def test_device_ranker_query_encoder(
    tmp_path: Path, key: Ed25519PrivateKey, builder: FeatureBuilder
) -> None:
    release = release_for(tmp_path / "r", key, trained_like_head())
    encoder = _CountingEncoder(builder.encoder.fingerprint)
    ranker = DeviceRanker(release, builder, query_encoder=encoder)
    text, pool = catalog_query(builder, 6)
    ranker.rank(f"{text} unseen", pool)
    assert encoder.texts == [f"{text} unseen"]
    with pytest.raises(ValueError, match="fingerprint"):
        DeviceRanker(release, builder, query_encoder=_CountingEncoder("other-model"))
    default = DeviceRanker(release, builder)  # ONNX MiniLM (shared), or torch as a fallback
    assert default.query_encoder is None or (
        default.query_encoder.fingerprint == builder.encoder.fingerprint
    )


def test_top_by_bm25(builder: FeatureBuilder) -> None:
    text, _ = catalog_query(builder, 5)
    ids = top_by_bm25(builder, text, 100)
    assert len(ids) == len(set(ids)) == 100
    scores = builder.bm25.score(text, ids)
    assert np.all(np.diff(scores) <= 0)
    everything = builder.bm25.score(text, builder.product_ids)
    assert scores[0] == everything.max()
    assert scores[-1] >= np.sort(everything)[-100]


# --- DeviceRanker -------------------------------------------------------------------------


def test_device_ranker_top_k_sorted(
    tmp_path: Path, key: Ed25519PrivateKey, builder: FeatureBuilder
) -> None:
    head = trained_like_head()
    ranker = DeviceRanker(release_for(tmp_path / "r", key, head), builder, key.public_key())
    text, pool = catalog_query(builder, 2)
    ranked = ranker.rank(text, pool, top=10)
    assert len(ranked) == 10
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True)
    assert len({p for p, _ in ranked}) == 10 and all(p in pool for p, _ in ranked)
    # The ranking is the torch head's over FeatureBuilder features.
    with torch.no_grad():
        expected = head.relevance(torch.from_numpy(builder.features(text, pool))).numpy()
    np.testing.assert_allclose(ranker.scores(text, pool), expected, atol=1e-5)
    best = [pool[i] for i in np.argsort(-expected, kind="stable")[:10]]
    assert [p for p, _ in ranked] == best
    assert len(ranker.rank(text, pool[:3], top=10)) == 3
    assert ranker.rank(text, [], top=5) == []
    with pytest.raises(ValueError, match="top"):
        ranker.rank(text, pool, top=0)
    with pytest.raises(KeyError, match="no-such-product"):
        ranker.rank(text, [pool[0], "no-such-product"])


def test_untrained_release_ranks_like_cosine(
    tmp_path: Path, key: Ed25519PrivateKey, builder: FeatureBuilder
) -> None:
    ranker = DeviceRanker(release_for(tmp_path / "r", key, RankerHead()), builder)
    text, pool = catalog_query(builder, 11)
    cosine = builder.full[builder.rows(pool)] @ builder.query_vector(text)
    top = [p for p, _ in ranker.rank(text, pool, top=5)]
    assert top == [pool[i] for i in np.argsort(-cosine, kind="stable")[:5]]


def test_device_ranker_refuses_bad_release(
    tmp_path: Path, key: Ed25519PrivateKey, builder: FeatureBuilder
) -> None:
    directory = release_for(tmp_path / "r", key, RankerHead())
    with pytest.raises(ReleaseError, match="does not verify"):
        DeviceRanker(directory, builder, Ed25519PrivateKey.generate().public_key())
    (directory / "head.onnx").write_bytes(b"garbage")
    with pytest.raises(ReleaseError, match="does not load"):
        OnnxScorer(directory)  # unverified: still refused, by onnxruntime


# --- CLI ----------------------------------------------------------------------------------


@pytest.fixture
def cli(builder: FeatureBuilder, monkeypatch: pytest.MonkeyPatch) -> typer.Typer:
    """A fresh app with this module's commands; the commands reuse the session's builder."""
    monkeypatch.setattr(features_module, "FeatureBuilder", lambda *args, **kwargs: builder)
    app = typer.Typer()
    bench_app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    release_commands.register(app, bench_app)
    return app


def test_cli_score(
    tmp_path: Path, key: Ed25519PrivateKey, builder: FeatureBuilder, cli: typer.Typer
) -> None:
    release = release_for(tmp_path / "r", key, trained_like_head(1))
    public = write_public_key(key, tmp_path / "public.pem")
    text, pool = catalog_query(builder, 4)
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("\n".join(pool) + "\n")
    args = ["score", "--release", str(release), "--query", text, "--public-key", str(public)]
    runner = CliRunner()
    result = runner.invoke(cli, [*args, "--candidates", str(candidates), "--top", "5"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "path: head (no evidence in the release: ranked by the head alone)")
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "score", "product_id"]
    rows = [line.split(maxsplit=3) for line in lines[1:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    expected = DeviceRanker(release, builder).rank(text, pool, top=5)
    assert [r[2] for r in rows] == [p for p, _ in expected]
    assert rows[0][3] == builder.data.products[expected[0][0]].title
    assert [float(r[1]) for r in rows] == sorted((float(r[1]) for r in rows), reverse=True)

    # Default candidates: the catalog's BM25 top-100.
    result = runner.invoke(cli, [*args, "--top", "3"])
    assert result.exit_code == 0, result.output
    ids = [line.split()[2] for line in result.stdout.strip().splitlines()[1:]]
    default = DeviceRanker(release, builder).rank(text, top_by_bm25(builder, text, 100), top=3)
    assert ids == [p for p, _ in default]

    # A wrong key is refused with a clear message and exit code 2.
    other = write_public_key(Ed25519PrivateKey.generate(), tmp_path / "other.pem")
    bad = [*args[:-1], str(other)]
    result = runner.invoke(cli, bad)
    assert result.exit_code == 2 and "does not verify" in result.output


def test_cli_bench_score(cli: typer.Typer) -> None:
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(cli, ["bench", "score", "--json", "--repeats", "5"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("encode_and_score", "encode", "torch_encode", "head", "torch_head"):
        assert 0 < report[f"{name}_p50_ms"] <= report[f"{name}_p99_ms"]
    assert report["query_encoder"] == "onnx"
    # The default release carries synthetic evidence over every catalog query: the seen path
    # (encode + features + head + evidence) is timed too.
    assert report["evidence"] == "synthetic" and report["evidence_queries"] >= 1
    assert report["evidence_bytes"] > 0
    assert 0 < report["seen_encode_and_score_p50_ms"] <= report["seen_encode_and_score_p99_ms"]
    assert 0 < report["seen_evidence_overhead_p50_ms"] <= report["seen_evidence_overhead_p99_ms"]
    assert report["repeats"] == 5 and report["candidates"] == 100 and report["threads"] == 1


# --- memorised evidence in the release (issue 9) ------------------------------------------

SEEN = range(0, 12)  # catalog query indices given click evidence; the rest stay unseen


def evidence_model(builder: FeatureBuilder, head: RankerHead, seed: int = 0):
    """A server-side EvidenceModel over the real catalog index: strong seeded click evidence
    on the SEEN queries (true attractiveness independent of the head), none elsewhere."""
    from shared_model.evaluation import head_scorer
    from shared_model.evidence import (
        EVIDENCE_CLICKS,
        EVIDENCE_EXAM,
        EVIDENCE_NOISE_VAR,
        EvidenceIndex,
        EvidenceModel,
    )

    index = EvidenceIndex(builder.data)
    rng = np.random.default_rng(seed)
    clicks = np.zeros(index.num_pairs, np.float32)
    exam = np.zeros(index.num_pairs, np.float32)
    for i in SEEN:
        q = builder.data.query_ids[i]
        sl = slice(index.offsets[q], index.offsets[q] + len(index.products[q]))
        e = rng.uniform(300.0, 600.0, sl.stop - sl.start)
        exam[sl] = e
        clicks[sl] = e * rng.uniform(0.02, 0.9, len(e))
    arrays = {EVIDENCE_CLICKS: clicks, EVIDENCE_EXAM: exam,
              EVIDENCE_NOISE_VAR: np.array([4.0], np.float32)}
    return EvidenceModel(index, arrays, head_scorer(head, builder))


def evidence_release(directory: Path, key: Ed25519PrivateKey, builder: FeatureBuilder,
                     head: RankerHead, **kwargs) -> Path:
    from shared_model.release_evidence import ReleaseEvidence

    pack = ReleaseEvidence.from_model(
        evidence_model(builder, head), builder.data, builder.product_ids, **kwargs
    )
    return write_release(directory, head=head, version="v1", round=1,
                         epsilon_per_node={"node-0": 1.0}, metrics={}, signing_key=key,
                         evidence=pack)


def test_release_evidence_packs_seen_queries_only(builder: FeatureBuilder) -> None:
    from shared_model.release_evidence import EvidenceError, ReleaseEvidence, normalise_query

    model = evidence_model(builder, trained_like_head(2))
    pack = ReleaseEvidence.from_model(model, builder.data, builder.product_ids)
    data = builder.data
    assert set(pack.queries) == {normalise_query(data.queries[data.query_ids[i]].text)
                                 for i in SEEN}
    assert pack.prior == model.prior and pack.noise_var == pytest.approx(4.0)
    again = ReleaseEvidence.from_bytes(pack.to_bytes())
    assert again.prior == pack.prior and set(again.queries) == set(pack.queries)
    for k, entry in pack.queries.items():
        np.testing.assert_array_equal(again.queries[k].product_rows, entry.product_rows)
        np.testing.assert_array_equal(again.queries[k].clicks, entry.clicks)
    assert pack.to_bytes() == again.to_bytes()  # deterministic bytes
    half = ReleaseEvidence.from_model(model, data, builder.product_ids, dtype="float16")
    assert len(half.to_bytes()) < len(pack.to_bytes())
    with pytest.raises(EvidenceError, match="'float64'"):
        ReleaseEvidence.from_model(model, data, builder.product_ids, dtype="float64")
    with pytest.raises(EvidenceError, match="not a readable evidence file"):
        ReleaseEvidence.from_bytes(b"not a zip")
    with pytest.raises(EvidenceError, match="catalog"):
        pack.check_catalog(builder.product_ids[:-1])
    assert normalise_query("  Modern\tBLUE  Velvet ") == "modern blue velvet"


def test_evidence_changes_seen_ranking_not_unseen(
    tmp_path: Path, key: Ed25519PrivateKey, builder: FeatureBuilder
) -> None:
    head = trained_like_head(3)
    release = evidence_release(tmp_path / "r", key, builder, head)
    assert (release / "evidence.npz").is_file()
    ranker = DeviceRanker(release, builder, key.public_key())
    head_only = DeviceRanker(release, builder, key.public_key(), use_evidence=False)
    model = evidence_model(builder, head)
    data = builder.data
    for i in SEEN:
        qid = data.query_ids[i]
        text, pool = data.queries[qid].text, sorted(model.index.products[qid])
        # Exact normalised match: case and spacing do not matter.
        assert ranker.path(text) == ranker.path(f"  {text.upper()} ") == "evidence"
        got = ranker.scores(text, pool)
        # The device ranks a seen query as the server's evaluator does.
        np.testing.assert_allclose(got, model(qid, pool), rtol=1e-5, atol=1e-6)
        assert sorted(ranker.memorised_products(text)) == pool
    changed = 0
    for i in SEEN:
        text, pool = catalog_query(builder, i)
        changed += [p for p, _ in ranker.rank(text, pool)] != [
            p for p, _ in head_only.rank(text, pool)]
    assert changed >= len(SEEN) - 1  # strong evidence reorders (nearly) every seen query
    for i in range(len(SEEN), len(data.query_ids)):  # unseen: the head alone, exactly
        text, pool = catalog_query(builder, i)
        assert ranker.path(text) == "head" and ranker.memorised_products(text) == []
        np.testing.assert_array_equal(ranker.scores(text, pool), head_only.scores(text, pool))
    assert ranker.path(data.queries[data.query_ids[0]].text + " extra") == "head"


def test_altered_evidence_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey, builder: FeatureBuilder
) -> None:
    from shared_model.release_evidence import ReleaseEvidence

    release = evidence_release(tmp_path / "r", key, builder, trained_like_head(4))
    path = release / "evidence.npz"
    original = path.read_bytes()
    pack = ReleaseEvidence.from_bytes(original)
    # Boost one product of one seen query, a well-formed file: only the signature catches it.
    pack.clicks[0] += 1e4
    path.write_bytes(pack.to_bytes())
    with pytest.raises(ReleaseError, match="evidence.npz has sha256"):
        DeviceRanker(release, builder, key.public_key())
    # ... and re-listing its hash in the manifest breaks the manifest's signature.
    manifest = json.loads((release / "manifest.json").read_text())
    import hashlib

    manifest["files"]["evidence.npz"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (release / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReleaseError, match="does not verify"):
        DeviceRanker(release, builder, key.public_key())
    # Dropping the evidence from a signed release is refused too (listed but missing).
    fresh = evidence_release(tmp_path / "r2", key, builder, trained_like_head(4))
    (fresh / "evidence.npz").unlink()
    with pytest.raises(ReleaseError, match="evidence.npz is listed in the manifest but missing"):
        DeviceRanker(fresh, builder, key.public_key())
    # A verified release installs (and scores) as one self-contained folder.
    from shared_model.release import ReleaseStore

    good = evidence_release(tmp_path / "r3", key, builder, trained_like_head(4))
    store = ReleaseStore(tmp_path / "node")
    store.install(good, key.public_key())
    installed = store.current()
    assert installed is not None and (installed / "evidence.npz").read_bytes() == original
    text = builder.data.queries[builder.data.query_ids[0]].text
    assert DeviceRanker(installed, builder, key.public_key()).path(text) == "evidence"


def golden_release(tmp_path: Path, key: Ed25519PrivateKey, builder: FeatureBuilder) -> Path:
    """Seeded head + seeded strong evidence for catalog query 5 only."""
    from shared_model.evidence import PriorFit
    from shared_model.release_evidence import (
        EvidenceEntry,
        ReleaseEvidence,
        catalog_sha256,
        normalise_query,
    )

    text, pool = catalog_query(builder, 5)
    pool = sorted(pool)
    rng = np.random.default_rng(2026)
    # Strong, well-separated evidence: click rates 0.02 + 0.9 * (a seeded permutation / n),
    # 20,000 examinations each, so the order is the evidence's whatever the head (the golden
    # top 5 survives changes to the head's features).
    exam = np.full(len(pool), 20000.0)
    rate = 0.02 + 0.9 * rng.permutation(len(pool)) / len(pool)
    pack = ReleaseEvidence.from_entries(
        {normalise_query(text): EvidenceEntry(builder.rows(pool), exam * rate, exam)},
        prior=PriorFit(a=0.3, b=0.1, tau2=0.02), noise_var=1.0,
        catalog=catalog_sha256(builder.product_ids), num_products=len(builder.product_ids),
    )
    return write_release(tmp_path / "golden", head=trained_like_head(5), version="v1",
                         round=1, epsilon_per_node={"node-0": 1.0}, metrics={},
                         signing_key=key, evidence=pack)


# Top 5 of catalog query 5's judged pool under golden_release's evidence (seed 2026): the
# evidence's order (the head cannot reorder rates this far apart at 20,000 examinations).
GOLDEN_TOP5 = ["30863", "23395", "23418", "13965", "30870"]


def test_cli_score_golden_seen_and_unseen(
    tmp_path: Path, key: Ed25519PrivateKey, builder: FeatureBuilder, cli: typer.Typer
) -> None:
    release = golden_release(tmp_path, key, builder)
    public = write_public_key(key, tmp_path / "public.pem")
    text, pool = catalog_query(builder, 5)
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("\n".join(pool) + "\n")
    args = ["score", "--release", str(release), "--public-key", str(public), "--top", "5"]
    runner = CliRunner()
    result = runner.invoke(cli, [*args, "--query", text, "--candidates", str(candidates)])
    assert result.exit_code == 0, result.output
    assert "path: evidence (seen query" in result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[2] for line in lines[1:]] == GOLDEN_TOP5
    # Default candidates: BM25 top-100 plus the memorised products.
    result = runner.invoke(cli, [*args, "--query", text.upper()])
    assert result.exit_code == 0 and "path: evidence" in result.stderr
    # Another query: the head alone, exactly as a release without evidence ranks it.
    other, other_pool = catalog_query(builder, 6)
    candidates.write_text("\n".join(other_pool) + "\n")
    result = runner.invoke(cli, [*args, "--query", other, "--candidates", str(candidates)])
    assert result.exit_code == 0, result.output
    assert "path: head (unseen query: ranked by the head alone)" in result.stderr
    lines = result.stdout.strip().splitlines()
    plain = DeviceRanker(release, builder, use_evidence=False).rank(other, other_pool, top=5)
    assert [line.split()[2] for line in lines[1:]] == [p for p, _ in plain]


def test_server_release_reproduces_seen_evaluation_on_device(
    tmp_path: Path, builder: FeatureBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's publisher packs its evaluator's evidence model into the release; a device
    scoring the seen queries with that release gets the server's seen NDCG@10, and the unseen
    view is the head's."""
    from server.evaluator import CentralEvaluator
    from server.releases import ReleasePublisher, public_key_path
    from shared_model.evaluation import evaluate
    from shared_model.evidence import EVIDENCE_NOISE_VAR, empty_evidence
    from shared_model.release import load_public_key
    from shared_model.settings import RunSettings

    monkeypatch.delenv("FEDRANK_KEY_DIR", raising=False)
    run_dir = tmp_path / "run"
    head = trained_like_head(7)
    settings = RunSettings.from_config({"run-dir": str(run_dir), "eval-fold": 0,
                                        "hidden-dim": head.config.hidden_dim})
    evaluator = CentralEvaluator(settings)
    index = evaluator.evidence_index()
    rng = np.random.default_rng(11)
    evidence = empty_evidence(index)
    for q in evaluator.seen_queries:  # noisy clicks on the seen queries only
        sl = slice(index.offsets[q], index.offsets[q] + len(index.products[q]))
        e = rng.uniform(20.0, 80.0, sl.stop - sl.start)
        evidence["evidence/exam"][sl] = e + rng.normal(0, 2.0, len(e))
        evidence["evidence/clicks"][sl] = e * rng.uniform(0.0, 0.8, len(e)) + rng.normal(
            0, 2.0, len(e))
    evidence[EVIDENCE_NOISE_VAR][:] = 4.0
    arrays = {**head_state(head), **evidence}
    publisher = ReleasePublisher(run_dir, every=1, head_config=head.config)
    release = publisher.maybe_publish(
        1, head_state(head), metrics={}, epsilon_per_node={"node-0": 1.0},
        evidence=lambda: evaluator.release_evidence(arrays),
    )
    assert release is not None and (release / "evidence.npz").is_file()
    ranker = DeviceRanker(release, builder, load_public_key(public_key_path(run_dir)))
    data = builder.data
    assert all(ranker.path(data.queries[q].text) == "evidence" for q in evaluator.seen_queries)
    assert all(ranker.path(data.queries[q].text) == "head" for q in evaluator.test_queries)

    def device(qid: str, pids) -> np.ndarray:
        return ranker.scores(data.queries[qid].text, pids)

    server = evaluator(arrays)
    on_device = evaluate(data, evaluator.seen_queries, device)
    assert on_device["ndcg@10"] == pytest.approx(server["seen-ndcg@10"], abs=1e-9)
    assert evaluate(data, evaluator.test_queries, device)["ndcg@10"] == pytest.approx(
        server["ndcg@10"], abs=1e-9)
    # Without evidence the server's evaluator releases none.
    assert evaluator.release_evidence(head_state(head)) is None


def test_release_evidence_refuses_bad_input(builder: FeatureBuilder) -> None:
    import io

    from shared_model.evidence import DEFAULT_PRIOR
    from shared_model.release_evidence import EvidenceError, ReleaseEvidence, synthetic_evidence

    good = synthetic_evidence(builder.data, builder.product_ids, seed=0, noise_var=1.0,
                              max_exam=10.0)
    fields = dict(keys=["a b"], pair_offsets=np.array([0, 2]), product_rows=np.array([0, 1]),
                  clicks=np.array([1.0, 2.0]), exam=np.array([3.0, 4.0]), prior=DEFAULT_PRIOR,
                  noise_var=1.0, catalog="0" * 64, num_products=10)
    ReleaseEvidence(**fields)
    for change, message in (
        ({"keys": ["A B"]}, "'A B' is not normalised"),
        ({"keys": ["b", "a"], "pair_offsets": np.array([0, 1, 2])}, "sorted and unique"),
        ({"pair_offsets": np.array([0, 3])}, "inconsistent"),
        ({"product_rows": np.array([0, 10])}, r"outside \[0, 10\)"),
        ({"clicks": np.array([1.0, np.nan])}, "not all finite"),
        ({"noise_var": -1.0}, "noise_var must be finite and >= 0, got -1.0"),
        ({"dtype": "int8"}, "got 'int8'"),
        ({"num_products": -3}, "got -3"),
    ):
        with pytest.raises(EvidenceError, match=message):
            ReleaseEvidence(**{**fields, **change})
    # A file whose arrays disagree with each other is refused, naming the file.
    with np.load(io.BytesIO(good.to_bytes())) as npz:
        arrays = {k: npz[k] for k in npz.files}
    buf = io.BytesIO()
    np.savez(buf, **{**arrays, "pair_offsets": arrays["pair_offsets"][:-1]})
    with pytest.raises(EvidenceError, match="where.npz: .*inconsistent"):
        ReleaseEvidence.from_bytes(buf.getvalue(), where="where.npz")
    buf = io.BytesIO()
    np.savez(buf, **{k: v for k, v in arrays.items() if k != "exam"})
    with pytest.raises(EvidenceError, match="expected"):
        ReleaseEvidence.from_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="max_exam"):
        synthetic_evidence(builder.data, builder.product_ids, seed=0, noise_var=1.0,
                           max_exam=0.0)
