"""`fedrank data import-clicks`: a real click log into the click-log format, in batches."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from shared_model import commands
from shared_model.clicklog import read_click_log
from shared_model.clicklog_import import ClickColumns, import_click_log
from shared_model.schema import DataError

QUERIES = "query_id\tquery\tquery_class\n10\tking poster bed\tBeds\n12\tspoon wall decor\t\n"
PRODUCTS = (
    "product_id\tproduct_name\tproduct_class\tcategory_hierarchy\n"
    "13\tking tufted bed\tBeds\tFurniture / Beds\n"
    "224\tsunflower spoon and fork wall decor set\tWall Décor\tDécor & Pillows\n"
    "454\tposter bed\tBeds\t\n"
)
LABELS = "query_id\tproduct_id\tlabel\n10\t13\tExact\n10\t454\tPartial\n12\t224\tExact\n"
HEADER = "user,session,query,product,position,clicked,timestamp\n"
GOOD = (
    "alice,s-1,king poster bed,13,1,1,2024-05-01T12:00:00Z\n"  # line 2: query by text
    "alice,s-1,10,454,2,0,1714564800\n"  # line 3
    "42,7,12,224,1,true,2024-05-01 14:00:00+02:00\n"  # line 4: numeric ids kept
)
BAD = (
    "alice,s-1,10,454,2,0,1714564800\n"  # line 5: duplicate of line 3
    "bob,s-2,10,999,1,0,1714564800\n"  # line 6: unknown product
    "bob,s-2,sofa,13,1,0,1714564800\n"  # line 7: unknown query
    "bob,s-2,10,13,0,0,1714564800\n"  # line 8: rank 0
    "bob,s-2,10,13,3,maybe,1714564800\n"  # line 9: clicked
    "bob,s-2,10,13,4,1,yesterday\n"  # line 10: timestamp
    "bob,s-2,10,13\n"  # line 11: too few fields
    ",s-3,10,13,5,1,1714564800\n"  # line 12: empty user
)


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    folder = tmp_path / "catalog"
    folder.mkdir()
    for name, text in (("queries", QUERIES), ("products", PRODUCTS), ("labels", LABELS)):
        (folder / f"{name}.tsv").write_text(text, encoding="utf-8")
    return folder


def write_log(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_every_bad_row_is_quarantined_with_line_and_reason(tmp_path: Path, catalog: Path) -> None:
    # Prepare
    log = write_log(tmp_path / "log.csv", HEADER + GOOD + BAD)
    out = tmp_path / "node" / "clicks.parquet"
    # Execute
    report = import_click_log(log, catalog, out)
    # Assert: counts add up, each bad row is in the quarantine file with its line and reason
    assert (report["rows_in"], report["rows_kept"], report["rows_quarantined"]) == (11, 3, 8)
    with (tmp_path / "node" / "clicks.quarantine.csv").open(encoding="utf-8") as handle:
        quarantined = [(int(row["line"]), row["reason"]) for row in csv.DictReader(handle)]
    assert quarantined == [
        (5, "duplicate: another row has the same session and rank"),
        (6, "unknown product"),
        (7, "unknown query"),
        (8, "rank is not an integer in 1..32767"),
        (9, "clicked is not a boolean (1/0, true/false, yes/no)"),
        (10, "unparsable timestamp"),
        (11, "malformed row: expected 7 fields"),
        (12, "empty user"),
    ]
    assert json.loads((tmp_path / "node" / "clicks.report.json").read_text()) == report
    table = read_click_log(out)
    assert table.column("query_id").to_pylist() == ["10", "10", "12"]
    assert table.column("product_id").to_pylist() == ["13", "454", "224"]
    assert table.column("rank").to_pylist() == [1, 2, 1]
    assert table.column("clicked").to_pylist() == [True, False, True]
    assert table.column("timestamp").to_pylist() == [1714564800, 1714564800, 1714564800]
    assert table.column("user_id").to_pylist()[2] == 42
    assert table.column("session_id").to_pylist()[2] == 7
    users = table.column("user_id").to_pylist()
    assert users[0] == users[1] != 42 and users[0] >= 0  # "alice" hashed, stably
    assert table.column("region_id").to_pylist() == [0, 0, 0]
    assert report["defaults"] == {"session": None, "region": 0, "exploration": False}


def generated_log(path: Path, rows: int) -> Path:
    """``rows`` good rows (3 per session) and, at the end, a repeat of the first row."""
    with path.open("w", encoding="utf-8") as handle:
        handle.write(HEADER)
        for index in range(rows):
            session, rank = divmod(index, 3)
            product = ("13", "454", "224")[rank]
            query = "12" if product == "224" else "10"
            handle.write(f"{session % 97},{session},{query},{product},{rank + 1},")
            handle.write(f"{int(index % 7 == 0)},{1714564800 + index}\n")
        handle.write(f"0,0,10,13,1,1,{1714564800}\n")
    return path


def test_large_log_streams_in_bounded_batches(tmp_path: Path, catalog: Path) -> None:
    # Prepare
    log = generated_log(tmp_path / "log.csv", 5_000)
    # Execute
    streamed = import_click_log(log, catalog, tmp_path / "a.parquet", batch_rows=512)
    whole = import_click_log(log, catalog, tmp_path / "b.parquet", batch_rows=100_000)
    # Assert: 10 batches of at most 512 rows, one row group each; same rows as in one batch;
    # the repeat on the last line is caught against the first batch
    assert streamed["batches"] == 10
    assert pq.ParquetFile(tmp_path / "a.parquet").metadata.num_row_groups == 10
    assert (streamed["rows_in"], streamed["rows_kept"], streamed["rows_quarantined"]) == (
        5_001,
        5_000,
        1,
    )
    assert streamed["quarantine_examples"] == [
        {"line": 5_002, "reason": "duplicate: another row has the same session and rank"}
    ]
    assert read_click_log(tmp_path / "a.parquet").equals(read_click_log(tmp_path / "b.parquet"))
    assert whole["rows_kept"] == 5_000


def test_duplicates_across_batches_with_text_sessions(tmp_path: Path, catalog: Path) -> None:
    # Prepare: text session ids (hashed), a repeat inside batch 1 and two in later batches
    rows = [f"u,sess-{i},10,13,1,0,1714564800\n" for i in range(6)]
    rows[1] = rows[0]  # line 3: repeats line 2 in the same batch
    rows += [rows[0], rows[5]]  # lines 8 and 9: repeat line 2 and line 7 in later batches
    log = write_log(tmp_path / "log.csv", HEADER + "".join(rows))
    # Execute
    report = import_click_log(log, catalog, tmp_path / "c.parquet", batch_rows=3)
    # Assert
    assert [e["line"] for e in report["quarantine_examples"]] == [3, 8, 9]  # type: ignore[attr-defined]
    assert report["rows_kept"] == 5


def test_jsonl_and_parquet_inputs_match_csv(tmp_path: Path, catalog: Path) -> None:
    # Prepare
    log = write_log(tmp_path / "log.csv", HEADER + GOOD)
    rows = list(csv.DictReader(log.open(encoding="utf-8")))
    jsonl = tmp_path / "log.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({**r, "position": int(r["position"])}) for r in rows) + "\n",
        encoding="utf-8",
    )
    parquet = tmp_path / "log.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    # Execute
    import_click_log(log, catalog, tmp_path / "csv.parquet")
    import_click_log(jsonl, catalog, tmp_path / "jsonl.parquet")
    import_click_log(parquet, catalog, tmp_path / "pq.parquet")
    # Assert
    expected = read_click_log(tmp_path / "csv.parquet")
    assert expected.num_rows == 3
    assert read_click_log(tmp_path / "jsonl.parquet").equals(expected)
    assert read_click_log(tmp_path / "pq.parquet").equals(expected)


def test_renamed_columns_and_defaults(tmp_path: Path, catalog: Path) -> None:
    # Prepare: OBD-like names, no session column, a region given on the command line
    text = "uid,item_id,q,pos,click,ts\n"
    text += "u1,13,10,1,1,2024-05-01 00:00:00\nu1,454,10,2,0,2024-05-01 00:00:00\n"
    log = write_log(tmp_path / "log.csv", text)
    columns = ClickColumns(
        user="uid", product="item_id", query="q", rank="pos", clicked="click", timestamp="ts"
    )
    # Execute
    report = import_click_log(log, catalog, tmp_path / "c.parquet", columns=columns, region=3)
    # Assert: both rows are one search, so one session
    table = read_click_log(tmp_path / "c.parquet")
    assert len(set(table.column("session_id").to_pylist())) == 1
    assert table.column("region_id").to_pylist() == [3, 3]
    assert report["defaults"]["session"] == "one session per (user, query, timestamp)"  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "encoding", "problem"),
    [
        ("user,query,product,position,clicked\n", "utf-8", "missing column(s) 'timestamp'"),
        (
            HEADER + "bob,s,10,13,1,1,1\nbob,s,10,13,2,1,1\nbob,s,spoon décor,13,3,1,1\n",
            "latin-1",
            "not valid UTF-8: byte(s) e9 at byte 14 of line 4; if the file is Latin-1",
        ),
        ("", "utf-8", "empty file or empty header line"),
    ],
)
def test_whole_file_problems_write_nothing(
    tmp_path: Path, catalog: Path, text: str, encoding: str, problem: str
) -> None:
    # Prepare
    log = write_log(tmp_path / "log.csv", text, encoding)
    # Execute
    with pytest.raises(DataError) as caught:
        import_click_log(log, catalog, tmp_path / "out" / "clicks.parquet", batch_rows=2)
    # Assert
    assert problem in str(caught.value)
    assert sorted(p.name for p in tmp_path.rglob("*") if "out" in p.parts) in ([], ["out"])


def test_quoted_header_and_cells(tmp_path: Path, catalog: Path) -> None:
    # Prepare: a quoted column name holding the delimiter, and a quoted query text
    text = '"user","session","query","product","position","clicked","timestamp","a,b"\n'
    text += 'u,s,"king poster bed",13,1,1,1714564800,x\n'
    log = write_log(tmp_path / "log.csv", text)
    # Execute
    report = import_click_log(log, catalog, tmp_path / "c.parquet")
    # Assert
    assert (report["rows_kept"], report["rows_quarantined"]) == (1, 0)


def test_latin1_log_with_encoding(tmp_path: Path, catalog: Path) -> None:
    text = HEADER + "bøb,s,spoon wall decor,224,1,1,1714564800\n"
    log = write_log(tmp_path / "log.csv", text, "latin-1")
    report = import_click_log(log, catalog, tmp_path / "c.parquet", encoding="latin-1")
    assert report["rows_kept"] == 1


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    bench_app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    commands.register(app, bench_app)
    return app


def test_cli_import_clicks_json(tmp_path: Path, catalog: Path, cli: typer.Typer) -> None:
    # Prepare
    log = write_log(tmp_path / "log.csv", HEADER + GOOD + BAD)
    out = tmp_path / "clicks.parquet"
    args = ["data", "import-clicks", "--csv", str(log), "--catalog", str(catalog)]
    args += ["--out", str(out), "--json", "--batch-rows", "4"]
    # Execute
    result = CliRunner().invoke(cli, args)
    # Assert
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report)[:4] == ["rows_in", "rows_kept", "rows_quarantined", "quarantine_file"]
    assert (report["rows_in"], report["rows_kept"], report["rows_quarantined"]) == (11, 3, 8)
    assert report["quarantine_file"] == str(tmp_path / "clicks.quarantine.csv")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give exactly one of --csv, --jsonl, --parquet"),
        (["--csv", "nope.csv"], "nope.csv: file not found"),
        (["--csv", "log.csv", "--encoding", "klingon"], "unknown encoding 'klingon'"),
        (["--csv", "log.csv", "--out", "."], "is a directory; give a file such as"),
    ],
)
def test_cli_import_clicks_errors(
    tmp_path: Path, catalog: Path, cli: typer.Typer, extra: list[str], message: str
) -> None:
    # Prepare
    write_log(tmp_path / "log.csv", HEADER + GOOD)
    extra = [str(tmp_path / e) if e.endswith(".csv") or e == "." else e for e in extra]
    args = ["data", "import-clicks", "--catalog", str(catalog)]
    args += ["--out", str(tmp_path / "out" / "c.parquet"), *extra]
    # Execute
    result = CliRunner().invoke(cli, args)
    # Assert
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
