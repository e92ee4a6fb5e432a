"""CLI for on-device personalization: `fedrank recommend` and `fedrank bench personal`."""

from __future__ import annotations

import typer

from shared_model.release_commands import DEFAULT_BENCH_QUERY


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Attach `recommend` to ``app`` and `personal` to ``bench_app``."""

    @app.command("recommend")
    def recommend(
        release: str = typer.Option(..., "--release", help="Release directory (head.onnx ...)."),
        history: str = typer.Option(
            ..., "--history", help="The user's own click log (Parquet); it stays on this device."
        ),
        user: int | None = typer.Option(
            None, "--user", help="User id in --history (when the log holds several users)."
        ),
        top: int = typer.Option(10, "--top", min=1, help="How many products to print."),
        public_key: str | None = typer.Option(
            None, "--public-key",
            help="The server's release public key (PEM): the release is verified before use.",
        ),
        unverified: bool = typer.Option(
            False, "--unverified", help="Use an unverified release (no --public-key; unsafe)."
        ),
        state_out: str | None = typer.Option(
            None, "--save-state", help="Also write the learned user state here (0600)."
        ),
        data_dir: str | None = typer.Option(
            None, "--data", help="Catalog directory (default: the bundled WANDS subset)."
        ),
    ) -> None:
        """"For you": next-click recommendations from the user's history, without a query."""
        from pathlib import Path

        from shared_model.data import DEFAULT_WANDS_DIR, load_judged_dir
        from shared_model.encoder import CachedEncoder
        from shared_model.features import FeatureBuilder
        from shared_model.personal import learn_state, read_history
        from shared_model.recommend import Recommender
        from shared_model.release import ReleaseError, load_public_key
        from shared_model.release_commands import require_verified_release
        from shared_model.schema import DataError
        from shared_model.scoring import DeviceRanker

        require_verified_release(public_key, unverified=unverified, use="use it")
        try:
            key = load_public_key(Path(public_key)) if public_key else None
            data = load_judged_dir(Path(data_dir) if data_dir else DEFAULT_WANDS_DIR)
            builder = FeatureBuilder(data, CachedEncoder())
            ranker = DeviceRanker(Path(release), builder, key)
            state = learn_state(read_history(Path(history), data, user=user), builder)
            ranked = Recommender(builder, ranker.scores).recommend(state, top=top)
            if state_out:
                state.save(Path(state_out))
        except (ReleaseError, DataError, OSError, KeyError, ValueError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code=2) from None
        if not ranked:
            typer.echo("no recommendations: the history has no sessions", err=True)
        typer.echo(f"{'rank':>4}  {'p(next)':>9}  {'product_id':<12}  title")
        for rank, (pid, value) in enumerate(ranked, start=1):
            typer.echo(f"{rank:>4}  {value:>9.4f}  {pid:<12}  {data.products[pid].title}")

    @bench_app.command("personal")
    def bench_personal(
        as_json: bool = typer.Option(False, "--json", help="Print only JSON on stdout."),
        repeats: int = typer.Option(
            300, "--repeats", min=1, help="Timed requests per round and path."
        ),
        rounds: int = typer.Option(
            3, "--rounds", min=1, help="Rounds of --repeats; figures are medians over rounds."
        ),
        query: str = typer.Option(DEFAULT_BENCH_QUERY, "--query", help="Query text."),
        num_candidates: int = typer.Option(
            100, "--candidates", min=1, help="Candidates per query (BM25 top of the catalog)."
        ),
    ) -> None:
        """`bench score`'s encode + features + ONNX head, with and without personalization
        (interleaved, one thread; medians over rounds of the per-round percentiles and p99
        ratio), and the recommender; milliseconds."""
        import json

        from shared_model.personal_bench import bench_personal as run

        result = run(
            repeats=repeats, rounds=rounds, query=query, num_candidates=num_candidates
        )
        if as_json:
            typer.echo(json.dumps(result))
        else:
            for name, value in result.items():
                typer.echo(f"{name:>34}  {value}")
