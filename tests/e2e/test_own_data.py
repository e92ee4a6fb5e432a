"""End to end on an imported catalog: `fedrank simulate regional-3 --data DIR` (issue 10's bar)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared_model.data import catalog_hash

pytestmark = pytest.mark.e2e

EXCERPT = Path(__file__).resolve().parents[1] / "data" / "wands-excerpt" / "judged.csv"


def messy_latin1(tmp_path: Path) -> Path:
    """The real excerpt in Latin-1, with a second title for product 224 and a bad grade."""
    lines = EXCERPT.read_text(encoding="utf-8").splitlines(keepends=True)
    fields = lines[1].split(",")
    fields[2] = "sunflower spoon & fork wall décor set"
    lines.append(",".join(fields))
    lines[9] = lines[9].rsplit(",", 1)[0] + ",N/A\n"
    path = tmp_path / "messy.csv"
    path.write_bytes("".join(lines).encode("latin-1"))
    return path


def _fedrank(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedrank.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_simulate_on_a_messy_import_records_its_hash(tmp_path: Path) -> None:
    # Prepare: latin-1, two titles for one product, one bad grade
    data = tmp_path / "shop"
    args = ["data", "import", "--csv", str(messy_latin1(tmp_path)), "--out", str(data)]
    args += ["--query-col", "search_term", "--title-col", "product_title"]
    args += ["--relevance-col", "relevance", "--product-id-col", "product_uid"]
    imported = _fedrank(*args, "--encoding", "latin-1", "--on-conflict", "first")
    assert imported.returncode == 0, imported.stderr
    run_dir = tmp_path / "run"
    # Execute
    result = _fedrank(
        "simulate", "regional-3", "--data", str(data), "--rounds", "1", "--run-dir", str(run_dir)
    )
    # Assert: the run finished on the imported catalog and records its content hash
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[fedrank] round 1/1" in result.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["catalog-dir"] == str(data.resolve())
    assert config["catalog-hash"] == catalog_hash(data)
    prepared = json.loads((run_dir / "data" / "prepared.json").read_text())
    assert prepared["train_queries"] + len(prepared["held_out_queries"]) == 6
