"""CLI commands that drive `shared_model`: data import, baselines, scoring."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Attach this package's commands to the `fedrank` app."""
    data_app = typer.Typer(no_args_is_help=True, help="Import and inspect judged-search data.")
    app.add_typer(data_app, name="data")

    # --- data import / data stats (shared_model.data) ---------------------------------
    @data_app.command("import")
    def data_import(
        csv_file: str = typer.Option(..., "--csv", help="CSV file, one judgment per row."),
        query_col: str = typer.Option(..., "--query-col", help="Column with the query text."),
        title_col: str = typer.Option(..., "--title-col", help="Column with the product title."),
        relevance_col: str = typer.Option(
            ..., "--relevance-col", help="Column with the relevance (number or E/S/C/I)."
        ),
        out: str = typer.Option(..., "--out", help="Directory to write the import format to."),
        product_id_col: str | None = typer.Option(None, "--product-id-col"),
        query_id_col: str | None = typer.Option(None, "--query-id-col"),
        class_col: str | None = typer.Option(None, "--class-col"),
        category_col: str | None = typer.Option(None, "--category-col"),
        description_col: str | None = typer.Option(None, "--description-col"),
        delimiter: str = typer.Option(
            ",", "--delimiter", help="Field separator ('tab' or \\t ok)."
        ),
        encoding: str = typer.Option(
            "utf-8", "--encoding", help="The file's encoding (utf-8, latin-1, cp1252, ...)."
        ),
        on_conflict: str = typer.Option(
            "error",
            "--on-conflict",
            help="A product or query id with different text on different rows: error (list "
            "them), first (keep the first text) or most-common (keep the text on most rows).",
        ),
        on_bad_row: str = typer.Option(
            "drop",
            "--on-bad-row",
            help="drop (skip and report in import-report.json) or error (stop at the first).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the import report as JSON."),
    ) -> None:
        """Import a judged-search CSV (ESCI / Home Depot style) into the import format.

        Writes queries.tsv, products.tsv, labels.tsv and import-report.json (rows read,
        kept, merged and dropped, with reasons and counts) into OUT, atomically.
        """
        import json
        from pathlib import Path

        from shared_model.data import (
            IMPORT_REPORT_FILE,
            ON_CONFLICT,
            CsvColumns,
            check_encoding,
            import_csv,
            save_judged,
        )
        from shared_model.schema import DataError

        def fail(message: str) -> typer.Exit:
            typer.echo(f"error: {message}", err=True)
            return typer.Exit(code=2)

        if on_conflict not in ON_CONFLICT:
            raise fail(f"--on-conflict {on_conflict!r}: expected one of {', '.join(ON_CONFLICT)}")
        if on_bad_row not in ("drop", "error"):
            raise fail(f"--on-bad-row {on_bad_row!r}: expected drop or error")
        try:
            check_encoding(encoding)
        except ValueError as exc:
            raise fail(f"--encoding: {exc}") from None
        sep = "\t" if delimiter in ("tab", "\\t") else delimiter
        columns = CsvColumns(
            query=query_col,
            title=title_col,
            relevance=relevance_col,
            product_id=product_id_col,
            query_id=query_id_col,
            product_class=class_col,
            category=category_col,
            description=description_col,
        )
        from fedrank.progress import progress

        try:
            with progress(2, f"reading {csv_file}", quiet=as_json) as bar:
                result = import_csv(
                    Path(csv_file),
                    columns,
                    delimiter=sep,
                    encoding=encoding,
                    on_conflict=on_conflict,
                    on_bad_row=on_bad_row,
                )
                bar.update(completed=1, description=f"writing {out}")
                save_judged(result.data, Path(out), report=result.report)
                bar.update(completed=2)
        except (DataError, OSError) as exc:
            raise fail(str(exc)) from None
        report_file = Path(out) / IMPORT_REPORT_FILE
        report = json.loads(report_file.read_text(encoding="utf-8"))  # with its catalog_hash
        if as_json:
            typer.echo(json.dumps(report, indent=2))
            return
        merged = report["rows_merged"]
        assert isinstance(merged, dict)
        typer.echo(
            f"imported {report['queries']} queries, {report['products']} products, "
            f"{report['judgments']} judgments from {csv_file} into {out}"
        )
        typer.echo(
            f"rows: {report['rows_read']} read, {report['rows_kept']} kept "
            f"({merged['duplicate_pairs']} merged into an earlier judgment of the same pair), "
            f"{report['rows_dropped']} dropped"
        )
        reasons = report["dropped_by_reason"]
        assert isinstance(reasons, dict)
        if reasons:
            typer.echo(
                "dropped: " + ", ".join(f"{reason} {count}" for reason, count in reasons.items()),
                err=True,
            )
        conflicts = report["conflicts"]
        assert isinstance(conflicts, dict)
        if conflicts["product_ids"] or conflicts["query_ids"]:
            typer.echo(
                f"conflicts ({on_conflict}): {conflicts['product_ids']} product id(s), "
                f"{conflicts['query_ids']} query id(s) had different text on different rows",
                err=True,
            )
        typer.echo(f"catalog hash {report['catalog_hash']}; report: {report_file}")

    @data_app.command("stats")
    def data_stats(
        data_dir: str | None = typer.Option(
            None, "--data", help="Import-format or WANDS directory (default: bundled WANDS)."
        ),
    ) -> None:
        """Print counts of a judged-search directory as JSON."""
        import json
        from collections import Counter
        from pathlib import Path

        from shared_model.data import DEFAULT_WANDS_DIR, catalog_hash, load_judged_dir
        from shared_model.schema import DataError

        try:
            folder = Path(data_dir) if data_dir else DEFAULT_WANDS_DIR
            data = load_judged_dir(folder)
            data_hash = catalog_hash(folder)
        except DataError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        grades = Counter(j.relevance for j in data.judgments)
        stats = {
            "source": data.source,
            "queries": len(data.queries),
            "judged_queries": len(data.query_ids),
            "products": len(data.products),
            "judgments": len(data.judgments),
            "grades": {str(g): grades[g] for g in sorted(grades)},
            "catalog_hash": data_hash,
        }
        typer.echo(json.dumps(stats, indent=2))

    @data_app.command("import-clicks")
    def data_import_clicks(
        csv_file: str | None = typer.Option(None, "--csv", help="Click log as CSV."),
        jsonl_file: str | None = typer.Option(None, "--jsonl", help="Click log as JSON Lines."),
        parquet_file: str | None = typer.Option(None, "--parquet", help="Click log as Parquet."),
        catalog: str = typer.Option(
            ..., "--catalog", help="Imported judged-search directory (fedrank data import)."
        ),
        out: str = typer.Option(..., "--out", help="Click-log Parquet file to write."),
        user_col: str = typer.Option("user", "--user-col"),
        session_col: str = typer.Option(
            "session",
            "--session-col",
            help="Absent from the input: each (user, query, timestamp) is one session.",
        ),
        query_col: str = typer.Option(
            "query", "--query-col", help="A query_id of the catalog, or a query text of it."
        ),
        product_col: str = typer.Option("product", "--product-col"),
        rank_col: str = typer.Option("position", "--rank-col", help="1-based rank shown."),
        clicked_col: str = typer.Option("clicked", "--clicked-col"),
        timestamp_col: str = typer.Option(
            "timestamp", "--timestamp-col", help="Unix seconds or ISO 8601 (no offset = UTC)."
        ),
        region_col: str = typer.Option(
            "region", "--region-col", help="Absent from the input: every row gets --region."
        ),
        exploration_col: str = typer.Option(
            "exploration", "--exploration-col", help="Absent from the input: false."
        ),
        region: int = typer.Option(0, "--region", min=0, help="Region id without a column."),
        encoding: str = typer.Option("utf-8", "--encoding", help="Of a CSV or JSON Lines log."),
        delimiter: str = typer.Option(",", "--delimiter", help="CSV separator ('tab' ok)."),
        batch_rows: int = typer.Option(
            100_000, "--batch-rows", min=1, help="Rows read and written at a time."
        ),
        quarantine: str | None = typer.Option(
            None, "--quarantine", help="Bad rows' CSV (default: OUT with .quarantine.csv)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    ) -> None:
        """Convert a real click log to the click-log format; bad rows go to a quarantine file.

        Reads in batches (logs larger than memory), writes OUT, OUT's .quarantine.csv (line,
        reason, raw cells of every bad row) and .report.json, atomically.
        """
        import json
        from pathlib import Path

        from shared_model.clicklog_import import ClickColumns, import_click_log
        from shared_model.schema import DataError

        sources = [
            (fmt, path)
            for fmt, path in (("csv", csv_file), ("jsonl", jsonl_file), ("parquet", parquet_file))
            if path
        ]
        if len(sources) != 1:
            typer.echo("error: give exactly one of --csv, --jsonl, --parquet", err=True)
            raise typer.Exit(code=2)
        fmt, source = sources[0]
        columns = ClickColumns(
            user=user_col,
            session=session_col,
            query=query_col,
            product=product_col,
            rank=rank_col,
            clicked=clicked_col,
            timestamp=timestamp_col,
            region=region_col,
            exploration=exploration_col,
        )
        try:
            report = import_click_log(
                Path(source),
                Path(catalog),
                Path(out),
                fmt=fmt,
                columns=columns,
                region=region,
                encoding=encoding,
                delimiter="\t" if delimiter in ("tab", "\\t") else delimiter,
                batch_rows=batch_rows,
                quarantine=Path(quarantine) if quarantine else None,
            )
        except (DataError, OSError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        if as_json:
            keys = ("rows_in", "rows_kept", "rows_quarantined", "quarantine_file")
            typer.echo(json.dumps({key: report[key] for key in keys} | report, indent=2))
            return
        typer.echo(
            f"{report['rows_in']} rows in, {report['rows_kept']} kept into {out}, "
            f"{report['rows_quarantined']} quarantined in {report['quarantine_file']}"
        )
        reasons = report["quarantined_by_reason"]
        assert isinstance(reasons, dict)
        for reason, count in reasons.items():
            typer.echo(f"  {reason}: {count}", err=True)

    # --- simulated clicks and the OBD position-bias check (shared_model.clicks / .obd) ---
    @data_app.command("simulate-clicks")
    def simulate_clicks(
        out: str = typer.Option(..., "--out", help="Directory for clicks.parquet and nodes/."),
        users: int = typer.Option(10_000, "--users", min=1, help="Number of simulated users."),
        regions: int = typer.Option(5, "--regions", min=1, help="Number of regions (nodes)."),
        sessions_per_user: float = typer.Option(
            5.0, "--sessions-per-user", min=0.001, help="Poisson mean of sessions per user."
        ),
        top_k: int = typer.Option(10, "--top-k", min=1, help="Results shown per session."),
        seed: int = typer.Option(0, "--seed", help="Seed for population and sessions."),
    ) -> None:
        """Simulate PBM clicks on WANDS (BM25 logging ranker); write the log and regional nodes.

        Writes OUT/clicks.parquet and OUT/nodes/node-<region>/clicks.parquet; prints JSON.
        """
        import json as _json
        from pathlib import Path as _Path

        from shared_model.bm25 import Bm25Ranker
        from shared_model.clicklog import write_click_log
        from shared_model.clicks import (
            PositionBasedClickModel,
            click_through_by_rank,
            make_population,
            simulate_sessions,
        )
        from shared_model.data import load_wands
        from shared_model.partition import partition_regional, write_partitions

        data = load_wands()
        model = PositionBasedClickModel()
        population = make_population(num_users=users, num_regions=regions, seed=seed, data=data)
        table = simulate_sessions(
            data,
            population,
            click_model=model,
            logging_ranker=Bm25Ranker(data),
            sessions_per_user_mean=sessions_per_user,
            top_k=top_k,
            seed=seed,
        )
        out_dir = _Path(out)
        log_path = write_click_log(table, out_dir / "clicks.parquet")
        nodes = write_partitions(partition_regional(table), out_dir / "nodes", prefix="node")
        ctr = click_through_by_rank(table)
        ctr1, ctr5 = ctr.get(1), ctr.get(5)
        summary = {
            "click_log": str(log_path),
            "nodes": {str(k): str(v) for k, v in nodes.items()},
            "users": users,
            "regions": regions,
            "sessions": int(table.column("session_id").to_numpy()[-1]) + 1,
            "rows": table.num_rows,
            "clicks": int(table.column("clicked").to_numpy(zero_copy_only=False).sum()),
            "click_model": {
                "eta": model.eta,
                "noise_floor": model.noise_floor,
                "alpha_max": model.alpha_max,
            },
            "ctr_by_rank": {str(k): round(v, 6) for k, v in ctr.items()},
            "ctr_at_1": ctr1,
            "ctr_at_5": ctr5,
            "ctr_ratio_1_over_5": (ctr1 / ctr5) if ctr1 is not None and ctr5 else None,
            "seed": seed,
        }
        typer.echo(_json.dumps(summary, indent=2))

    @data_app.command("obd-check")
    def obd_check(
        obd_dir: str = typer.Option(
            "", "--dir", help="OBD random-policy directory (default: data/obd/random)."
        ),
    ) -> None:
        """CTR per position on real OBD uniform-random clicks, and the fitted eta (JSON)."""
        import json as _json

        from shared_model.clicks import DEFAULT_ETA
        from shared_model.obd import (
            DEFAULT_OBD_DIR,
            fit_eta,
            fit_eta_interval,
            obd_ctr_by_position,
        )

        ctr = obd_ctr_by_position(obd_dir or DEFAULT_OBD_DIR)
        eta = fit_eta({p: c for p, (c, _, _) in ctr.items()})
        lo, hi = fit_eta_interval(ctr)
        typer.echo(
            _json.dumps(
                {
                    "obd_dir": str(obd_dir or DEFAULT_OBD_DIR),
                    "ctr_by_position": {
                        str(p): {"ctr": c, "clicks": k, "impressions": n}
                        for p, (c, k, n) in ctr.items()
                    },
                    "fitted_eta": eta,
                    "fitted_eta_95ci": [lo, hi],
                    "model_default_eta": DEFAULT_ETA,
                },
                indent=2,
            )
        )

    # --- baseline (shared_model.baseline) -------------------------------------------------
    @app.command("baseline")
    def baseline(
        as_json: bool = typer.Option(False, "--json", help="Print only JSON on stdout."),
        folds: int = typer.Option(5, "--folds", min=2, help="Folds of the k-fold-by-query split."),
        seed: int = typer.Option(0, "--seed", help="Seed for the click log and the folds."),
        users: int = typer.Option(10_000, "--users", min=1, help="Simulated users."),
        data_dir: str | None = typer.Option(
            None, "--data", help="Judged-search directory (fedrank data import); default WANDS."
        ),
    ) -> None:
        """BM25, zero-shot MiniLM and the central head on held-out queries (WANDS or --data).

        Simulates the click log (WorldConfig with --users and --seed), trains the central
        head on the training folds' clicks and reports NDCG@10, MRR and AUC per model (mean,
        std and per-fold values) plus the log's click-through rate by rank.
        """
        import contextlib
        import json as _json
        import sys
        import time
        from pathlib import Path

        from fedrank.progress import progress

        bar = progress(folds + 4, "baseline", quiet=as_json)  # 4 log lines + one per fold

        def log(message: str) -> None:
            bar.echo(message, err=True)
            bar.update(advance=1)

        started = time.perf_counter()
        # Anything a library prints while we work (progress bars, model-load reports) goes to
        # stderr, so stdout carries the result alone.
        with contextlib.redirect_stdout(sys.stderr), bar:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

            from shared_model.baseline import run_baselines
            from shared_model.clicks import click_through_by_rank
            from shared_model.data import DEFAULT_WANDS_DIR, catalog_hash, load_judged_dir
            from shared_model.encoder import CachedEncoder
            from shared_model.features import FeatureBuilder
            from shared_model.schema import DataError
            from shared_model.world import WorldConfig, simulate_click_log

            folder = Path(data_dir) if data_dir else DEFAULT_WANDS_DIR
            try:
                data = load_judged_dir(folder)
                data_hash = catalog_hash(folder)
            except DataError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(code=2) from None
            if len(data.query_ids) < folds:
                typer.echo(
                    f"error: {folder} has {len(data.query_ids)} judged queries, fewer than "
                    f"--folds {folds}",
                    err=True,
                )
                raise typer.Exit(code=2)
            log(
                f"loaded {folder}: {len(data.query_ids)} judged queries, "
                f"{len(data.products)} products"
            )
            builder = FeatureBuilder(data, CachedEncoder())
            log(f"features ready ({time.perf_counter() - started:.1f}s)")
            clicks = simulate_click_log(data, WorldConfig(num_users=users, seed=seed))
            log(f"simulated {clicks.num_rows} impressions from {users} users")
            result = run_baselines(builder, clicks, num_folds=folds, seed=seed,
                                   on_fold=lambda i: bar.update(advance=1))
            ctr = click_through_by_rank(clicks)
            ctr1, ctr5 = ctr.get(1), ctr.get(5)
            result["data"] = {"dir": str(folder), "catalog_hash": data_hash}
            result["clicks"] = {
                "ctr_at_rank": {r: round(v, 6) for r, v in ctr.items()},
                "ctr1_over_ctr5": (ctr1 / ctr5) if ctr1 is not None and ctr5 else None,
            }
            log(f"done in {time.perf_counter() - started:.1f}s")
        if as_json:
            typer.echo(_json.dumps(result, indent=2))
            return
        models = [
            m
            for m in ("bm25", "minilm_zero_shot", "central_head", "central_head_naive")
            if m in result
        ]
        metrics = ("ndcg@10", "mrr", "auc")
        width = max(len(m) for m in models)
        has_seen = all("seen" in result[m] for m in models)
        header = f"{'model':<{width}}  " + "  ".join(f"{m:>17}" for m in metrics)
        if has_seen:  # the same models on each fold's training queries
            header += f"  {'seen ndcg@10':>17}"
        lines = [header, "-" * len(header)]
        for model in models:
            cells = [
                f"{result[model][m]:.4f} ± {result[model][m + '_std']:.4f}".rjust(17)
                for m in metrics
            ]
            if has_seen:
                seen = result[model]["seen"]
                cells.append(f"{seen['ndcg@10']:.4f} ± {seen['ndcg@10_std']:.4f}".rjust(17))
            lines.append(f"{model:<{width}}  " + "  ".join(cells))
        split = result["split"]
        lines.append(
            f"{split['num_folds']}-fold by query, fold sizes {split['fold_sizes']}, "
            f"seed {split['seed']}, {split['clicks_rows']} click-log rows"
        )
        ratio = result["clicks"]["ctr1_over_ctr5"]
        if ratio is not None:
            lines.append(f"CTR@1 / CTR@5 = {ratio:.2f}")
        typer.echo("\n".join(lines))
