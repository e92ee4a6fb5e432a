"""`fedrank data import` on messy real files: encodings, conflicting text, bad rows, report.

The real rows come from tests/data/wands-excerpt (78 WANDS judgments in Home Depot CSV
style, MIT); the mess (Latin-1 bytes, a second title, a bad grade) is added per test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from shared_model import commands
from shared_model.data import (
    IMPORT_REPORT_FILE,
    CsvColumns,
    catalog_hash,
    import_csv,
    load_csv,
    load_judged_dir,
)
from shared_model.schema import DataError

EXCERPT = Path(__file__).resolve().parents[1] / "data" / "wands-excerpt" / "judged.csv"
COLUMNS = CsvColumns(
    query="search_term",
    title="product_title",
    relevance="relevance",
    product_id="product_uid",
    product_class="product_class",
    category="category_hierarchy",
)


def excerpt_lines() -> list[str]:
    return EXCERPT.read_text(encoding="utf-8").splitlines(keepends=True)


def with_second_title(lines: list[str], line: int, title: str) -> list[str]:
    """Repeat data line ``line`` (1-based, header = 1) at the end with another title."""
    fields = lines[line - 1].split(",")
    fields[2] = title
    return [*lines, ",".join(fields)]


def messy_latin1(tmp_path: Path) -> Path:
    """The excerpt (78 rows) in Latin-1, a second title for product 224, a bad grade."""
    lines = with_second_title(excerpt_lines(), 2, "sunflower spoon & fork wall décor set")
    lines[9] = lines[9].rsplit(",", 1)[0] + ",N/A\n"  # line 10: a grade that does not parse
    path = tmp_path / "messy.csv"
    path.write_bytes("".join(lines).encode("latin-1"))
    return path


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    bench_app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    commands.register(app, bench_app)
    return app


def import_args(csv_path: Path, out: Path, *extra: str) -> list[str]:
    return [
        "data",
        "import",
        "--csv",
        str(csv_path),
        "--query-col",
        "search_term",
        "--title-col",
        "product_title",
        "--relevance-col",
        "relevance",
        "--product-id-col",
        "product_uid",
        "--class-col",
        "product_class",
        "--category-col",
        "category_hierarchy",
        "--out",
        str(out),
        *extra,
    ]


def test_real_excerpt_imports_with_a_full_report() -> None:
    # Execute
    result = import_csv(EXCERPT, COLUMNS)
    # Assert: WANDS' repeated pairs are merged (max grade), nothing is dropped
    report = result.report
    assert (report["rows_read"], report["rows_kept"], report["rows_dropped"]) == (78, 78, 0)
    assert report["rows_merged"] == {
        "duplicate_pairs": 6,
        "product_text_conflicts": 0,
        "query_text_conflicts": 0,
    }
    assert (report["queries"], report["products"], report["judgments"]) == (6, 71, 72)
    assert report["relevance_scale"] == [1.0, 3.0]
    spoon = next(q for q in result.data.queries.values() if q.text.startswith("large spoon"))
    assert result.data.relevance(spoon.query_id, "34349") == 1.0  # Exact once, Partial twice
    assert result.data.products["226"].title == "napoleon wall décor"


def test_latin1_bytes_name_line_and_byte_and_suggest_latin1(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "latin1.csv"
    path.write_bytes(EXCERPT.read_text(encoding="utf-8").encode("latin-1"))
    # Execute
    with pytest.raises(DataError) as caught:
        import_csv(path, COLUMNS)
    loaded = load_csv(path, COLUMNS, encoding="latin-1")
    # Assert: line 2 is the first data row; "Wall D\xe9cor" starts at byte 64 of it
    assert caught.value.line == 2
    assert "not valid UTF-8: byte(s) e9" in caught.value.problem
    assert "byte 64 of line 2" in caught.value.problem
    assert "--encoding latin-1" in caught.value.problem
    assert loaded.products["224"].product_class == "Wall Décor"


def test_conflict_error_counts_and_lists_the_first_few(tmp_path: Path) -> None:
    # Prepare: seven products get a second title, one query id a second text
    lines = excerpt_lines()
    for line in range(2, 9):
        lines = with_second_title(lines, line, f"renamed product {line}")
    lines = [line.replace(",large spoon and fork wall decor,", ",spoon decor,") for line in lines]
    lines[0] = (
        "id,product_uid,product_title,product_class,category_hierarchy,search_term,relevance\n"
    )
    path = tmp_path / "conflicts.csv"
    path.write_text("".join(lines), encoding="utf-8")
    # Execute
    with pytest.raises(DataError) as caught:
        load_csv(path, COLUMNS)
    # Assert
    problem = caught.value.problem
    assert problem.startswith("7 product_id(s) have different text on different rows; first 5:")
    assert "product_id '224' has title 'renamed product 2' on line 80 (1 row(s)) but" in problem
    assert "'sunflower decorative spoon and fork wall decor set' on line 2" in problem
    assert problem.count("product_id '") == 5
    assert "--on-conflict first" in problem
    assert caught.value.line == 80


def test_on_conflict_first_and_most_common(tmp_path: Path) -> None:
    # Prepare: product 224 has its title on 2 rows (lines 2 and 45); "b" on 3 more
    lines = excerpt_lines()
    for _ in range(3):
        lines = with_second_title(lines, 2, "b")
    path = tmp_path / "c.csv"
    path.write_text("".join(lines), encoding="utf-8")
    # Execute
    first = import_csv(path, COLUMNS, on_conflict="first")
    common = import_csv(path, COLUMNS, on_conflict="most-common")
    # Assert
    assert first.data.products["224"].title.startswith("sunflower decorative")
    assert common.data.products["224"].title == "b"
    assert first.report["rows_merged"]["product_text_conflicts"] == 3  # type: ignore[index]
    assert common.report["rows_merged"]["product_text_conflicts"] == 2  # type: ignore[index]
    assert first.report["conflicts"]["product_ids"] == 1  # type: ignore[index]


def test_messy_file_imports_with_latin1_and_first(tmp_path: Path, cli: typer.Typer) -> None:
    # Prepare
    path = messy_latin1(tmp_path)
    out = tmp_path / "imported"
    # Execute
    result = CliRunner().invoke(
        cli, import_args(path, out, "--encoding", "latin-1", "--on-conflict", "first")
    )
    # Assert: the bad grade is reported with its line; the counts add up
    assert result.exit_code == 0, result.output
    report = json.loads((out / IMPORT_REPORT_FILE).read_text(encoding="utf-8"))
    assert report["rows_read"] == 79
    assert report["rows_read"] == report["rows_kept"] + report["rows_dropped"]
    assert report["dropped_by_reason"] == {"bad relevance": 1}
    assert report["dropped_rows"][0]["line"] == 10
    assert "relevance 'N/A' does not parse" in report["dropped_rows"][0]["detail"]
    assert report["conflicts"]["product_ids"] == 1
    assert report["judgments"] == report["rows_kept"] - report["rows_merged"]["duplicate_pairs"]
    assert report["encoding"] == "iso8859-1"
    assert "dropped: bad relevance 1" in result.stderr
    assert report["catalog_hash"] == catalog_hash(out)
    assert f"catalog hash {catalog_hash(out)}" in result.stdout
    loaded = load_judged_dir(out)
    assert len(loaded.judgments) == report["judgments"]
    assert loaded.products["224"].title == "sunflower decorative spoon and fork wall decor set"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "not valid UTF-8"),
        (("--encoding", "latin-1"), "1 product_id(s) have different text"),
        (("--encoding", "latin-1", "--on-conflict", "first", "--on-bad-row", "error"), ":10:"),
        (("--encoding", "klingon"), "--encoding: unknown encoding 'klingon'"),
        (("--on-conflict", "last"), "--on-conflict 'last': expected one of error, first"),
        (("--on-bad-row", "skip"), "--on-bad-row 'skip': expected drop or error"),
    ],
)
def test_bad_import_writes_nothing(
    tmp_path: Path, cli: typer.Typer, extra: tuple[str, ...], message: str
) -> None:
    # Prepare
    path = messy_latin1(tmp_path)
    out = tmp_path / "imported"
    # Execute
    result = CliRunner().invoke(cli, import_args(path, out, *extra))
    # Assert
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["messy.csv"]


def test_bad_rows_of_every_kind_are_dropped_and_counted(tmp_path: Path) -> None:
    # Prepare
    text = (
        "q,t,r\n"
        "bed,oak bed,3\n"
        ",pine bed,2\n"  # empty query
        "bed,,2\n"  # empty title
        "bed,elm bed,nan\n"  # NaN
        "bed,ash bed,E\n"  # label in a numeric file
        "bed,fir bed\n"  # too few fields
        "bed,yew bed,1\n"
    )
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    # Execute
    result = import_csv(path, CsvColumns(query="q", title="t", relevance="r"))
    # Assert
    report = result.report
    assert (report["rows_read"], report["rows_kept"], report["rows_dropped"]) == (7, 2, 5)
    assert report["dropped_by_reason"] == {
        "empty query": 1,
        "empty title": 1,
        "bad relevance": 1,
        "mixed relevance kinds": 1,
        "wrong number of fields": 1,
    }
    assert [row["line"] for row in report["dropped_rows"]] == [3, 4, 5, 6, 7]  # type: ignore[attr-defined]
    assert sorted(j.relevance for j in result.data.judgments) == [0.0, 1.0]


def test_no_usable_row_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("q,t,r\nbed,oak bed,x\n", encoding="utf-8")
    with pytest.raises(DataError, match="no usable rows: all 1 row"):
        import_csv(path, CsvColumns(query="q", title="t", relevance="r"))


def test_baseline_runs_on_the_messy_import(tmp_path: Path, cli: typer.Typer) -> None:
    # Prepare: the bar, imported with --encoding latin-1 --on-conflict first
    out = tmp_path / "imported"
    imported = CliRunner().invoke(
        cli,
        import_args(messy_latin1(tmp_path), out, "--encoding", "latin-1", "--on-conflict", "first"),
    )
    assert imported.exit_code == 0, imported.output
    # Execute
    result = CliRunner().invoke(
        cli, ["baseline", "--data", str(out), "--json", "--folds", "2", "--users", "200"]
    )
    # Assert
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["data"]["dir"] == str(out)
    assert report["data"]["catalog_hash"].startswith("sha256:")
    assert sum(report["split"]["fold_sizes"]) == 6
    assert 0.0 <= report["bm25"]["ndcg@10"] <= 1.0
