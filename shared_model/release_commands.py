"""CLI commands for released models: `fedrank score` and `fedrank bench score`."""

from __future__ import annotations

import typer

DEFAULT_BENCH_QUERY = "modern blue velvet accent chair"


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Attach `score` to ``app`` and `score` to ``bench_app``."""

    @app.command("score")
    def score(
        release: str = typer.Option(..., "--release", help="Release directory (head.onnx ...)."),
        query: str = typer.Option(..., "--query", help="Query text."),
        candidates: str | None = typer.Option(
            None,
            "--candidates",
            help="File with one product id per line (default: the catalog's BM25 top-100).",
        ),
        top: int = typer.Option(10, "--top", min=1, help="How many products to print."),
        public_key: str | None = typer.Option(
            None, "--public-key",
            help="The server's release public key (PEM): the release is verified before use.",
        ),
        unverified: bool = typer.Option(
            False, "--unverified", help="Score an unverified release (no --public-key; unsafe)."
        ),
        data_dir: str | None = typer.Option(
            None, "--data", help="Catalog directory (default: the bundled WANDS subset)."
        ),
        history: str | None = typer.Option(
            None, "--history", help="The user's own click log (Parquet): personalize with it."
        ),
        user: int | None = typer.Option(None, "--user", help="User id in --history."),
    ) -> None:
        """Rank products for a query with a release's ONNX head; a seen query (its normalised
        text memorised in the release's evidence) also with its DP click evidence. Which path
        was taken is printed on stderr (stdout stays the ranking table)."""
        from pathlib import Path

        from shared_model.data import DEFAULT_WANDS_DIR, load_judged_dir
        from shared_model.encoder import CachedEncoder
        from shared_model.features import FeatureBuilder
        from shared_model.release import ReleaseError, load_public_key
        from shared_model.schema import DataError
        from shared_model.scoring import DeviceRanker, top_by_bm25

        require_verified_release(public_key, unverified=unverified, use="score it")
        try:
            key = load_public_key(Path(public_key)) if public_key else None
            data = load_judged_dir(Path(data_dir) if data_dir else DEFAULT_WANDS_DIR)
            builder = FeatureBuilder(data, CachedEncoder())
            ranker = DeviceRanker(Path(release), builder, key)
            if candidates:
                lines = Path(candidates).read_text().splitlines()
                ids = list(dict.fromkeys(s.strip() for s in lines if s.strip()))
                if not ids:
                    raise ValueError(f"{candidates}: no product ids")
            else:
                # A seen query's memorised products are candidates too (BM25 top-100 first).
                ids = list(dict.fromkeys(
                    [*top_by_bm25(builder, query, 100), *ranker.memorised_products(query)]
                ))
            if history:  # issue 14: on-device personalization (shared_model/personal.py)
                from shared_model.personal import learn_state, personal_rank, read_history

                state = learn_state(read_history(Path(history), data, user=user), builder)
                ranked = personal_rank(ranker, query, ids, state, top=top)
            else:
                ranked = ranker.rank(query, ids, top=top)
        except (ReleaseError, DataError, OSError, KeyError, ValueError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code=2) from None
        path = ranker.path(query)
        if path == "evidence":
            memorised = len(ranker.memorised_products(query))
            typer.echo(f"path: evidence (seen query: head + {memorised} memorised products' "
                       "DP click evidence)", err=True)
        else:
            why = "no evidence in the release" if ranker.evidence is None else "unseen query"
            typer.echo(f"path: head ({why}: ranked by the head alone)", err=True)
        typer.echo(f"{'rank':>4}  {'score':>9}  {'product_id':<12}  title")
        for rank, (pid, value) in enumerate(ranked, start=1):
            title = data.products[pid].title
            typer.echo(f"{rank:>4}  {value:>9.4f}  {pid:<12}  {title}")

    @bench_app.command("score")
    def bench_score(
        as_json: bool = typer.Option(False, "--json", help="Print only JSON on stdout."),
        repeats: int = typer.Option(500, "--repeats", min=1, help="Timed repeats per measure."),
        release: str | None = typer.Option(
            None, "--release", help="Release to time (default: a fresh head, exported here)."
        ),
        query: str = typer.Option(DEFAULT_BENCH_QUERY, "--query", help="Query text."),
        num_candidates: int = typer.Option(
            100, "--candidates", min=1, help="Candidates per query (BM25 top of the catalog)."
        ),
        evidence_seed: int = typer.Option(
            0, "--evidence-seed",
            help="Seed of the synthetic evidence a default (fresh) release carries.",
        ),
        evidence_noise_var: float = typer.Option(
            4.0, "--evidence-noise-var", min=0.0,
            help="Noise variance of that synthetic evidence (latency does not depend on it).",
        ),
        evidence_max_exam: float = typer.Option(
            50.0, "--evidence-max-exam", min=1e-9,
            help="Largest examination count of that synthetic evidence.",
        ),
    ) -> None:
        """Latency of on-device scoring, one thread: query encode (MiniLM in onnxruntime, as
        DeviceRanker does) + features + ONNX head, the head alone (ONNX and torch), and the
        torch MiniLM query encode for comparison; and the seen-query path (``seen_*``: a
        query the release memorised, encoded afresh, scored by the head + its evidence, the
        memorised products added to the candidates). Percentiles in milliseconds.

        Without ``--release`` a fresh head is exported with synthetic evidence (seeded counts
        over every catalog query's judged pool: the real shape, meaningless values)."""
        import json
        import tempfile
        import time
        from pathlib import Path

        import numpy as np
        import torch
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from shared_model.data import load_wands
        from shared_model.encoder import CachedEncoder
        from shared_model.features import FeatureBuilder
        from shared_model.ranker import HeadConfig, RankerHead
        from shared_model.release import read_manifest, write_release
        from shared_model.release_evidence import EVIDENCE_FILE, synthetic_evidence
        from shared_model.scoring import (
            DeviceRanker,
            candidate_features,
            encode_query,
            query_encoder_for,
            top_by_bm25,
        )

        torch.set_num_threads(1)
        builder = FeatureBuilder(load_wands(), CachedEncoder())
        ids = top_by_bm25(builder, query, num_candidates)
        query_encoder = query_encoder_for(builder)  # None: ONNX unavailable, torch encodes

        with tempfile.TemporaryDirectory(prefix="fedrank-bench-") as tmp:
            if release:
                release_dir = Path(release)
                # The release holds no torch weights: time a head of the same shape.
                head = RankerHead(HeadConfig(**read_manifest(release_dir).head_config))
                evidence_source = "release"
            else:
                head = RankerHead(HeadConfig())
                release_dir = write_release(
                    Path(tmp) / "release",
                    head=head,
                    version="bench",
                    round=0,
                    epsilon_per_node={},
                    metrics={},
                    signing_key=Ed25519PrivateKey.generate(),
                    evidence=synthetic_evidence(
                        builder.data, builder.product_ids, seed=evidence_seed,
                        noise_var=evidence_noise_var, max_exam=evidence_max_exam,
                    ),
                )
                evidence_source = "synthetic"
            ranker = DeviceRanker(release_dir, builder, query_encoder=(
                "torch" if query_encoder is None else query_encoder))
            scorer = ranker.scorer
            head.eval()
            seen_texts = [
                builder.data.queries[q].text for q in builder.data.query_ids
                if ranker.path(builder.data.queries[q].text) == "evidence"
            ]

            def encode_and_score(text: str) -> tuple[float, float, np.ndarray]:
                t0 = time.perf_counter()
                q = encode_query(builder, text, query_encoder)
                t1 = time.perf_counter()
                out = ranker.scores_for_vector(text, q, ids)
                return t1 - t0, time.perf_counter() - t1, out

            def fresh_encode(text: str) -> np.ndarray:
                # A seen query's text may be in the embedding cache: encode it afresh, as a
                # device that never saw it would.
                if query_encoder is None:
                    return builder.encoder.encoder.encode([text])[0]
                return query_encoder.encode([text])[0]

            seen_candidates = {
                t: list(dict.fromkeys([*top_by_bm25(builder, t, num_candidates),
                                       *ranker.memorised_products(t)]))
                for t in seen_texts
            }

            def seen_encode_and_score(text: str) -> tuple[float, float]:
                t0 = time.perf_counter()
                q = fresh_encode(text)
                cands = seen_candidates[text]
                ranker.scores_for_vector(text, q, cands)
                t1 = time.perf_counter()
                head_scores = scorer.scores(candidate_features(builder, text, q, cands))
                assert ranker.evidence is not None
                t2 = time.perf_counter()  # the evidence's part: lookup + shrink, alone
                entry = ranker.evidence.lookup(text)
                assert entry is not None
                ranker.evidence.apply(entry, builder.rows(cands), head_scores)
                return t1 - t0, time.perf_counter() - t2

            def torch_encode(text: str) -> float:
                t0 = time.perf_counter()
                encode_query(builder, text, None)
                return time.perf_counter() - t0

            # Warm up: loads both MiniLMs, the ORT sessions and torch's kernels.
            for i in range(5):
                encode_and_score(f"{query} warmup {i}")
                torch_encode(f"{query} warmup {i}")
            q = encode_query(builder, query, query_encoder)
            features = candidate_features(builder, query, q, ids)
            x = torch.from_numpy(features)

            full, encode_ms, rest_ms, torch_encode_ms = [], [], [], []
            seen_full, seen_extra = [], []
            for i in range(repeats):
                text = f"{query} {i}"  # a fresh text each time: nothing is cached
                t0 = time.perf_counter()
                enc, rest, _ = encode_and_score(text)
                full.append(time.perf_counter() - t0)
                encode_ms.append(enc)
                rest_ms.append(rest)
                # Interleaved, so both encoders see the same machine load.
                torch_encode_ms.append(torch_encode(text))
                if seen_texts:
                    total, extra = seen_encode_and_score(seen_texts[i % len(seen_texts)])
                    seen_full.append(total)
                    seen_extra.append(extra)

            head_s = []
            for _ in range(20):
                scorer.scores(features)
            for _ in range(repeats):
                t0 = time.perf_counter()
                scorer.scores(features)
                head_s.append(time.perf_counter() - t0)

            torch_s = []
            with torch.inference_mode():
                for _ in range(20):
                    head.relevance(x)
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    head.relevance(x).numpy()
                    torch_s.append(time.perf_counter() - t0)
            evidence_bytes = len(scorer.files.get(EVIDENCE_FILE, b""))
            evidence = ranker.evidence

        def pct(values: list[float], q: float) -> float:
            return round(float(np.percentile(np.asarray(values) * 1000.0, q)), 4)

        result = {
            "encode_and_score_p50_ms": pct(full, 50),
            "encode_and_score_p99_ms": pct(full, 99),
            "encode_p50_ms": pct(encode_ms, 50),
            "encode_p99_ms": pct(encode_ms, 99),
            "torch_encode_p50_ms": pct(torch_encode_ms, 50),
            "torch_encode_p99_ms": pct(torch_encode_ms, 99),
            "features_and_onnx_p50_ms": pct(rest_ms, 50),
            "head_p50_ms": pct(head_s, 50),
            "head_p99_ms": pct(head_s, 99),
            "torch_head_p50_ms": pct(torch_s, 50),
            "torch_head_p99_ms": pct(torch_s, 99),
            **({
                "seen_encode_and_score_p50_ms": pct(seen_full, 50),
                "seen_encode_and_score_p99_ms": pct(seen_full, 99),
                "seen_evidence_overhead_p50_ms": pct(seen_extra, 50),
                "seen_evidence_overhead_p99_ms": pct(seen_extra, 99),
            } if seen_full else {}),
            "evidence": evidence_source if evidence is not None else "none",
            "evidence_queries": len(evidence.queries) if evidence is not None else 0,
            "evidence_pairs": evidence.num_pairs if evidence is not None else 0,
            "evidence_bytes": evidence_bytes,
            "repeats": repeats,
            "candidates": len(ids),
            "threads": 1,
            "query_encoder": "torch" if query_encoder is None else "onnx",
        }
        if as_json:
            typer.echo(json.dumps(result))
        else:
            for name, value in result.items():
                typer.echo(f"{name:>26}  {value}")


def require_verified_release(public_key: str | None, *, unverified: bool, use: str) -> None:
    """One policy for every on-device command: a release is verified unless the user opts out.

    Exits 2 when neither ``--public-key`` nor ``--unverified`` is given; warns on opt-out.
    """
    if public_key is None and not unverified:
        typer.echo("error: refusing an unverified release: pass --public-key "
                   f"server-signing.pub (or --unverified to {use} anyway)", err=True)
        raise typer.Exit(code=2)
    if unverified and public_key is None:
        typer.echo("warning: release not verified (--unverified)", err=True)
