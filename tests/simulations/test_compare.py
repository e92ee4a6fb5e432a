"""simulations.compare: the privacy–utility table (seen/unseen by scenario and ε) and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from simulations.compare import compare_runs

BASELINE = {
    name: {f"{m}_per_fold": [value, 0.0] for m in ("ndcg@10", "mrr", "auc")}
    for name, value in (("bm25", 0.80), ("minilm_zero_shot", 0.85), ("central_head", 0.86))
}


def fake_run(root: Path, name: str, *, scenario: str, epsilon: str, seen: float,
             unseen: float, spent: float | str) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(
        {"scenario": scenario, "epsilon": epsilon, "eval-fold": 0}))
    views = {"seen": {"ndcg@10": seen, "mrr": 0.5, "auc": 0.6},
             "unseen": {"ndcg@10": unseen, "mrr": 0.5, "auc": 0.6}}
    rounds = [{"round": r, "ndcg@10": unseen - 0.01 * (2 - r),
               "seen": {"ndcg@10": seen - 0.01 * (2 - r)}} for r in (1, 2)]
    zero = {v: {"ndcg@10": z, "mrr": 0.5, "auc": 0.6} for v, z in (("seen", 0.72),
                                                                   ("unseen", 0.85))}
    metrics = {"rounds": rounds, "final": {"round": 2, "ndcg@10": unseen, "mrr": 0.5,
                                           "auc": 0.6, "epsilon_max": spent, **views},
               "baselines": {"zero_shot": zero, "bm25": zero}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_privacy_utility_table_and_plots(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(BASELINE))
    runs = [
        fake_run(tmp_path, "b-inf", scenario="regional-5-100k", epsilon="inf", seen=0.98,
                 unseen=0.84, spent="inf"),
        fake_run(tmp_path, "b-1", scenario="regional-5-100k", epsilon="1", seen=0.80,
                 unseen=0.85, spent=0.99),
        fake_run(tmp_path, "a-8", scenario="regional-5", epsilon="8", seen=0.86,
                 unseen=0.85, spent=7.9),
    ]
    out = compare_runs(runs, baseline_json=baseline, plot_path=tmp_path / "c.png")
    pu = out["privacy_utility"]
    # Sorted by scenario, then ε with inf last.
    assert [(r["scenario"], r["epsilon_budget"]) for r in pu["rows"]] == [
        ("regional-5", 8.0), ("regional-5-100k", 1.0), ("regional-5-100k", math.inf)]
    first = pu["rows"][0]
    assert first["seen"] == 0.86 and first["unseen"] == 0.85 and first["epsilon"] == 7.9
    assert first["zero_shot_seen"] == 0.72 and first["zero_shot_unseen"] == 0.85
    assert pu["rows"][2]["epsilon"] == math.inf
    assert pu["plot"] == str(tmp_path / "c-privacy.png")
    for png in (tmp_path / "c.png", tmp_path / "c-privacy.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The per-run rows keep both views too.
    run_rows = {r["name"]: r for r in out["rows"]}
    assert run_rows["b-1"]["seen"]["ndcg@10"] == 0.80 and run_rows["b-1"]["ndcg@10"] == 0.85
    assert run_rows["b-1"]["lift_over_zero_shot_seen"] == pytest.approx(0.08)


def test_compare_refuses_mixed_folds(tmp_path: Path) -> None:
    a = fake_run(tmp_path, "a", scenario="s", epsilon="1", seen=0.8, unseen=0.8, spent=1.0)
    b = fake_run(tmp_path, "b", scenario="s", epsilon="1", seen=0.8, unseen=0.8, spent=1.0)
    (b / "config.json").write_text(json.dumps({"scenario": "s", "epsilon": "1",
                                               "eval-fold": 1}))
    with pytest.raises(ValueError, match="different folds"):
        compare_runs([a, b], baseline_json=None, plot_path=tmp_path / "c.png")
