"""Tests for shared_model.data: WANDS, CSV import, the import format and `fedrank data`."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from shared_model import commands
from shared_model import data as data_module
from shared_model.data import (
    DEFAULT_WANDS_DIR,
    CsvColumns,
    load_csv,
    load_judged_dir,
    load_wands,
    save_judged,
)
from shared_model.schema import DataError, JudgedSearchData, Judgment

QUERIES = "query_id\tquery\tquery_class\n1\tking bed\tBeds\n2\tbar stool\t\n"
PRODUCTS = (
    "product_id\tproduct_name\tproduct_class\tcategory_hierarchy\n"
    "10\ttufted bed\tBeds\tFurniture / Beds\n"
    '11\toak stool\tBar Stools\t"Furniture / Bar (28""-33"") Stools"\n'
    "12\tlamp\t\t\n"
)
LABELS = (
    "query_id\tproduct_id\tlabel\n1\t10\tExact\n1\t12\tIrrelevant\n2\t11\tPartial\n2\t11\tExact\n"
)


def write_wands(directory: Path, **overrides: str | bytes) -> Path:
    """A small valid WANDS-layout folder; ``overrides`` replaces a file's content."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str | bytes] = {
        "queries.tsv": QUERIES,
        "products.tsv": PRODUCTS,
        "labels.tsv": LABELS,
    }
    files.update({name.replace("_", ".", 1): content for name, content in overrides.items()})
    for name, content in files.items():
        path = directory / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return directory


def same_content(a: JudgedSearchData, b: JudgedSearchData) -> bool:
    return (
        dict(a.queries) == dict(b.queries)
        and dict(a.products) == dict(b.products)
        and a.judgments == b.judgments
    )


# ---------------------------------------------------------------------------------------
# The bundled WANDS subset
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wands() -> JudgedSearchData:
    return load_wands()


def test_wands_counts(wands: JudgedSearchData) -> None:
    # Execute: (fixture) / Assert
    assert len(wands.queries) == 40
    assert len(wands.products) == 6482
    assert len(wands.judgments) == 6890
    assert len(wands.query_ids) == 40
    assert {j.relevance for j in wands.judgments} == {0.0, 0.5, 1.0}


def test_wands_duplicates_resolved_to_max(wands: JudgedSearchData) -> None:
    # Prepare: find the duplicated pairs straight from the file
    grade = {"Exact": 1.0, "Partial": 0.5, "Irrelevant": 0.0}
    seen: dict[tuple[str, str], list[float]] = {}
    with (DEFAULT_WANDS_DIR / "labels.tsv").open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            seen.setdefault((row["query_id"], row["product_id"]), []).append(grade[row["label"]])
    duplicated = {pair: gs for pair, gs in seen.items() if len(gs) > 1}
    conflicting = {pair: gs for pair, gs in duplicated.items() if len(set(gs)) > 1}

    # Assert
    assert len(duplicated) == 84
    assert len(conflicting) == 2
    for (query_id, product_id), grades in duplicated.items():
        assert wands.relevance(query_id, product_id) == max(grades)
    pairs = [(j.query_id, j.product_id) for j in wands.judgments]
    assert len(pairs) == len(set(pairs))


def test_wands_quoted_category_read_intact(wands: JudgedSearchData) -> None:
    # Execute
    product = wands.products["14116"]
    # Assert
    assert '"' in product.category_path
    assert product.category_path.endswith('Bar (28"-33") Bar Stools & Counter Stools')
    assert sum('"' in p.category_path for p in wands.products.values()) == 3
    assert product.top_category == "Furniture"


def test_wands_ids_are_strings(wands: JudgedSearchData) -> None:
    assert all(isinstance(q, str) for q in wands.queries)
    assert wands.queries["10"].text == "king poster bed"
    assert wands.relevance("10", "454") == 1.0


def test_load_judged_dir_reads_wands(wands: JudgedSearchData) -> None:
    # Execute
    loaded = load_judged_dir(DEFAULT_WANDS_DIR)
    # Assert
    assert same_content(loaded, wands)


def test_wands_round_trip(tmp_path: Path, wands: JudgedSearchData) -> None:
    # Execute
    save_judged(wands, tmp_path / "out")
    loaded = load_judged_dir(tmp_path / "out")
    # Assert
    assert same_content(loaded, wands)
    header = (tmp_path / "out" / "labels.tsv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "query_id\tproduct_id\trelevance"


# ---------------------------------------------------------------------------------------
# Bad input in the WANDS layout
# ---------------------------------------------------------------------------------------


def test_small_valid_folder_loads(tmp_path: Path) -> None:
    # Prepare
    folder = write_wands(tmp_path / "d")
    # Execute
    loaded = load_wands(folder)
    # Assert: the duplicate (2, 11) pair is resolved to Exact, not an error
    assert loaded.judgments == (
        Judgment("1", "10", 1.0),
        Judgment("1", "12", 0.0),
        Judgment("2", "11", 1.0),
    )
    assert loaded.products["11"].category_path == 'Furniture / Bar (28"-33") Stools'


BAD_CASES: dict[str, tuple[dict[str, str | bytes], str, int | None, str]] = {
    "missing column": (
        {"labels_tsv": "query_id\tproduct_id\tgrade\n1\t10\tExact\n"},
        "labels.tsv",
        None,
        "missing column 'label'; columns found: 'query_id', 'product_id', 'grade'",
    ),
    "unknown query id": (
        {"labels_tsv": "query_id\tproduct_id\tlabel\n1\t10\tExact\n99\t10\tExact\n"},
        "labels.tsv",
        3,
        "unknown query_id '99'",
    ),
    "unknown product id": (
        {"labels_tsv": "query_id\tproduct_id\tlabel\n1\t10\tExact\n1\t77\tExact\n"},
        "labels.tsv",
        3,
        "unknown product_id '77'",
    ),
    "non-utf8": (
        {"products_tsv": PRODUCTS.encode() + b"13\tcaf\xe9 table\t\t\n"},
        "products.tsv",
        5,
        "not valid UTF-8",
    ),
    "empty file": ({"queries_tsv": ""}, "queries.tsv", None, "empty file"),
    "header only": (
        {"labels_tsv": "query_id\tproduct_id\tlabel\n"},
        "labels.tsv",
        None,
        "no data rows",
    ),
    "duplicate query id": (
        {"queries_tsv": QUERIES + "1\tqueen bed\tBeds\n"},
        "queries.tsv",
        4,
        "duplicate query_id '1' (first on line 2)",
    ),
    "duplicate product id": (
        {"products_tsv": PRODUCTS + "10\tother bed\tBeds\t\n"},
        "products.tsv",
        5,
        "duplicate product_id '10' (first on line 2)",
    ),
    "bad label": (
        {"labels_tsv": "query_id\tproduct_id\tlabel\n1\t10\tExcat\n"},
        "labels.tsv",
        2,
        "relevance 'Excat' does not parse",
    ),
    "numeric label in WANDS": (
        {"labels_tsv": "query_id\tproduct_id\tlabel\n1\t10\t0.5\n"},
        "labels.tsv",
        2,
        "relevance '0.5' does not parse",
    ),
    "wrong field count": (
        {"queries_tsv": QUERIES + "3\tlamp\n"},
        "queries.tsv",
        4,
        "expected 3 tab-separated fields, found 2",
    ),
    "unterminated quote": (
        {"products_tsv": PRODUCTS + '13\t"lamp\t\t\n'},
        "products.tsv",
        5,
        "malformed quoting",
    ),
    "empty id": (
        {"labels_tsv": "query_id\tproduct_id\tlabel\n1\t\tExact\n"},
        "labels.tsv",
        2,
        "empty product_id",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_wands_input_raises_data_error(tmp_path: Path, case: str) -> None:
    # Prepare
    overrides, file_name, line, problem = BAD_CASES[case]
    folder = write_wands(tmp_path / "d", **overrides)

    # Execute
    with pytest.raises(DataError) as caught:
        load_wands(folder)

    # Assert
    error = caught.value
    assert error.path == str(folder / file_name)
    assert error.line == line
    assert problem in error.problem
    where = f"{folder / file_name}:{line}" if line is not None else str(folder / file_name)
    assert str(error).startswith(f"{where}: ")


def test_missing_file(tmp_path: Path) -> None:
    # Prepare
    folder = write_wands(tmp_path / "d")
    (folder / "labels.tsv").unlink()
    # Execute
    with pytest.raises(DataError) as caught:
        load_wands(folder)
    # Assert
    assert caught.value.path == str(folder / "labels.tsv")
    assert caught.value.line is None
    assert caught.value.problem == "file not found"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("nan", "relevance 'nan' is NaN"),
        ("1.5", "relevance '1.5' is outside [0, 1]"),
        ("high", "relevance 'high' does not parse"),
        ("inf", "is not finite"),
    ],
)
def test_bad_numeric_relevance_in_import_format(tmp_path: Path, value: str, problem: str) -> None:
    # Prepare
    labels = f"query_id\tproduct_id\trelevance\n1\t10\t0.25\n2\t11\t{value}\n"
    folder = write_wands(tmp_path / "d", labels_tsv=labels)
    # Execute
    with pytest.raises(DataError) as caught:
        load_judged_dir(folder)
    # Assert
    assert caught.value.path == str(folder / "labels.tsv")
    assert caught.value.line == 3
    assert problem in caught.value.problem


def test_import_format_accepts_labels_and_numbers(tmp_path: Path) -> None:
    # Prepare
    labels = "query_id\tproduct_id\tlabel\n1\t10\t0.25\n1\t12\tPartial\n"
    folder = write_wands(tmp_path / "d", labels_tsv=labels)
    # Execute
    loaded = load_judged_dir(folder)
    # Assert
    assert loaded.relevance("1", "10") == 0.25
    assert loaded.relevance("1", "12") == 0.5


# ---------------------------------------------------------------------------------------
# CSV import
# ---------------------------------------------------------------------------------------

HOME_DEPOT = (
    "id,product_uid,product_title,search_term,relevance\n"
    "2,100001,Simpson Strong-Tie 12-Gauge Angle,angle bracket,3\n"
    "3,100001,Simpson Strong-Tie 12-Gauge Angle,l bracket,2.5\n"
    '9,100002,"BEHR 1 gal. ""Ultra"" Paint",deck over,1\n'
    "16,100005,Delta Vero 1-Handle Shower Faucet,rain shower head,2\n"
)
HD_COLUMNS = CsvColumns(
    query="search_term", title="product_title", relevance="relevance", product_id="product_uid"
)


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_load_csv_home_depot_scales_inferred_range(tmp_path: Path) -> None:
    # Prepare
    path = write(tmp_path / "hd.csv", HOME_DEPOT)
    # Execute
    loaded = load_csv(path, HD_COLUMNS)
    # Assert
    by_query = {loaded.queries[j.query_id].text: j for j in loaded.judgments}
    assert by_query["angle bracket"].relevance == 1.0
    assert by_query["l bracket"].relevance == 0.75
    assert by_query["deck over"].relevance == 0.0
    assert by_query["rain shower head"].relevance == 0.5
    assert len(loaded.products) == 3
    assert loaded.products["100002"].title == 'BEHR 1 gal. "Ultra" Paint'
    assert loaded.queries[by_query["l bracket"].query_id].query_id.startswith("q")


def test_load_csv_given_scale_and_derived_ids(tmp_path: Path) -> None:
    # Prepare
    path = write(tmp_path / "hd.csv", HOME_DEPOT)
    columns = CsvColumns(query="search_term", title="product_title", relevance="relevance")
    # Execute
    first = load_csv(path, columns, relevance_scale=(0.0, 4.0))
    second = load_csv(path, columns, relevance_scale=(0.0, 4.0))
    # Assert: same ids each time, "q"/"p" + 12 hex digits
    assert same_content(first, second)
    assert sorted(j.relevance for j in first.judgments) == [0.25, 0.5, 0.625, 0.75]
    for ident in list(first.queries) + list(first.products):
        assert ident[0] in "qp" and len(ident) == 13
        int(ident[1:], 16)


def test_load_csv_value_outside_given_scale(tmp_path: Path) -> None:
    path = write(tmp_path / "hd.csv", HOME_DEPOT)
    with pytest.raises(DataError) as caught:
        load_csv(path, HD_COLUMNS, relevance_scale=(1.0, 2.5))
    assert caught.value.line == 2
    assert "relevance '3' is outside the scale [1, 2.5]" in str(caught.value)


def test_load_csv_esci_labels(tmp_path: Path) -> None:
    # Prepare
    text = (
        "query_id\tquery\tproduct_id\tproduct_title\tesci_label\tproduct_description\n"
        "7\tusb cable\tB01\tUSB-C cable 1m\tE\tbraided\n"
        "7\tusb cable\tB02\tLightning cable\tS\t\n"
        "7\tusb cable\tB03\tUSB charger\tc\t\n"
        "7\tusb cable\tB04\tGarden hose\tIrrelevant\t\n"
    )
    path = write(tmp_path / "esci.tsv", text)
    columns = CsvColumns(
        query="query",
        title="product_title",
        relevance="esci_label",
        product_id="product_id",
        query_id="query_id",
        description="product_description",
    )
    # Execute
    loaded = load_csv(path, columns, delimiter="\t")
    # Assert
    assert [j.relevance for j in loaded.judgments] == [1.0, 0.5, 0.2, 0.0]
    assert loaded.products["B01"].description == "braided"
    assert list(loaded.queries) == ["7"]


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("q,t,r\nbed,oak bed,E\nbed,pine bed,2\n", 3, "do not mix the two"),
        ("q,t,r\nbed,oak bed,1\nbed,pine bed,lots\n", 3, "relevance 'lots' does not parse"),
        ("q,t,r\nbed,oak bed,1\nbed,pine bed,nan\n", 3, "is NaN"),
        ("q,t,r\nbed,oak bed,1\nbed,pine bed\n", 3, "expected 3 ','-separated fields, found 2"),
        ("q,t,r\nbed,oak bed,1\n,pine bed,2\n", 3, "empty query"),
        ("q,t,r\nbed,oak bed,2\nbed,pine bed,2\n", None, "cannot infer a relevance scale"),
        ("q,t\nbed,oak bed\n", None, "missing column 'r'; columns found: 'q', 't'"),
        ("", None, "empty file"),
        (b"q,t,r\nbed,oak bed,1\nbed,pine \xff bed,2\n", 3, "not valid UTF-8"),
    ],
)
def test_load_csv_bad_input(
    tmp_path: Path, text: str | bytes, line: int | None, problem: str
) -> None:
    # Prepare
    path = write(tmp_path / "bad.csv", text)
    # Execute
    with pytest.raises(DataError) as caught:
        load_csv(path, CsvColumns(query="q", title="t", relevance="r"))
    # Assert
    assert caught.value.path == str(path)
    assert caught.value.line == line
    assert problem in caught.value.problem


def test_load_csv_conflicting_product(tmp_path: Path) -> None:
    # Prepare
    text = "pid,q,t,r\n1,bed,oak bed,1\n1,chair,pine bed,2\n"
    path = write(tmp_path / "c.csv", text)
    # Execute
    with pytest.raises(DataError) as caught:
        load_csv(path, CsvColumns(query="q", title="t", relevance="r", product_id="pid"))
    # Assert
    assert caught.value.line == 3
    assert caught.value.problem.startswith("1 product_id(s) have different text")
    assert "product_id '1' has title 'pine bed' on line 3 (1 row(s)) but 'oak bed' on line 2" in (
        caught.value.problem
    )


def test_load_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_csv(tmp_path / "nope.csv", HD_COLUMNS)
    assert (caught.value.line, caught.value.problem) == (None, "file not found")


def test_load_csv_duplicate_pairs_keep_max(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "q,t,r\nbed,oak bed,1\nbed,oak bed,3\nbed,pine bed,2\n")
    loaded = load_csv(path, CsvColumns(query="q", title="t", relevance="r"))
    assert [j.relevance for j in loaded.judgments] == [1.0, 0.5]


def test_csv_round_trip(tmp_path: Path) -> None:
    # Prepare
    text = (
        "search_term,product_title,relevance,cls,cat,desc\n"
        'angle bracket,"Angle, 12-Gauge",3,Brackets,"Hardware / ""Angles""",zinc\n'
        "angle bracket,Tab\tTitle,1,,,\n"
        "deck paint,BEHR Deck Over,2.33,Paint,Paint / Exterior,\n"
    )
    path = write(tmp_path / "in.csv", text)
    columns = CsvColumns(
        query="search_term",
        title="product_title",
        relevance="relevance",
        product_class="cls",
        category="cat",
        description="desc",
    )
    loaded = load_csv(path, columns)

    # Execute
    out = save_judged(loaded, tmp_path / "imported")
    again = load_judged_dir(out)

    # Assert
    assert same_content(again, loaded)
    assert again.products[next(iter(loaded.products))].category_path == 'Hardware / "Angles"'
    header = (out / "products.tsv").read_text(encoding="utf-8").splitlines()[0]
    assert header.endswith("\tproduct_description")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported", "in.csv"]


# ---------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------


def failing_after(calls: int) -> Callable[..., None]:
    """A stand-in for _write_tsv that writes ``calls`` files, then fails."""
    real = data_module._write_tsv
    count = {"n": 0}

    def write_tsv(*args: object, **kwargs: object) -> None:
        count["n"] += 1
        if count["n"] > calls:
            raise OSError("disk full")
        real(*args, **kwargs)  # type: ignore[arg-type]

    return write_tsv


def test_failed_save_leaves_no_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    loaded = load_wands(write_wands(tmp_path / "src"))
    monkeypatch.setattr(data_module, "_write_tsv", failing_after(2))
    target = tmp_path / "out" / "imported"
    # Execute
    with pytest.raises(OSError, match="disk full"):
        save_judged(loaded, target)
    # Assert
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_failed_overwrite_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    loaded = load_wands(write_wands(tmp_path / "src"))
    target = save_judged(loaded, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    monkeypatch.setattr(data_module, "_write_tsv", failing_after(1))
    # Execute
    with pytest.raises(OSError, match="disk full"):
        save_judged(loaded, target)
    # Assert
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_save_overwrites_existing(tmp_path: Path) -> None:
    # Prepare
    loaded = load_wands(write_wands(tmp_path / "src"))
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old", encoding="utf-8")
    # Execute
    save_judged(loaded, target)
    # Assert
    assert sorted(p.name for p in target.iterdir()) == ["labels.tsv", "products.tsv", "queries.tsv"]
    assert same_content(load_judged_dir(target), loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    bench_app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    commands.register(app, bench_app)
    return app


def test_cli_data_import(tmp_path: Path, cli: typer.Typer) -> None:
    # Prepare
    csv_path = write(tmp_path / "hd.csv", HOME_DEPOT)
    out = tmp_path / "imported"
    args = ["data", "import", "--csv", str(csv_path), "--query-col", "search_term"]
    args += ["--title-col", "product_title", "--relevance-col", "relevance"]
    args += ["--product-id-col", "product_uid", "--out", str(out)]

    # Execute
    result = CliRunner().invoke(cli, args)

    # Assert
    assert result.exit_code == 0, result.output
    assert "imported 4 queries, 3 products, 4 judgments" in result.stdout
    assert (
        "rows: 4 read, 4 kept (0 merged into an earlier judgment of the same pair), 0 dropped"
        in (result.stdout)
    )
    assert same_content(load_judged_dir(out), load_csv(csv_path, HD_COLUMNS))


def test_cli_data_import_bad_csv(tmp_path: Path, cli: typer.Typer) -> None:
    # Prepare
    csv_path = write(tmp_path / "bad.csv", "q,t,r\nbed,oak bed,1\nbed,pine bed,lots\n")
    out = tmp_path / "imported"
    args = ["data", "import", "--csv", str(csv_path), "--query-col", "q", "--title-col", "t"]
    args += ["--relevance-col", "r", "--out", str(out), "--on-bad-row", "error"]

    # Execute
    result = CliRunner().invoke(cli, args)

    # Assert
    assert result.exit_code == 2
    assert f"{csv_path}:3: relevance 'lots' does not parse" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_cli_data_stats(tmp_path: Path, cli: typer.Typer) -> None:
    # Prepare
    folder = write_wands(tmp_path / "d")
    # Execute
    result = CliRunner().invoke(cli, ["data", "stats", "--data", str(folder)])
    # Assert
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert (stats["queries"], stats["products"], stats["judgments"]) == (2, 3, 3)
    assert stats["grades"] == {"0.0": 1, "1.0": 2}
    assert stats["catalog_hash"].startswith("sha256:") and len(stats["catalog_hash"]) == 71


def test_cli_data_stats_bad_dir(tmp_path: Path, cli: typer.Typer) -> None:
    result = CliRunner().invoke(cli, ["data", "stats", "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert "queries.tsv: file not found" in result.stderr
