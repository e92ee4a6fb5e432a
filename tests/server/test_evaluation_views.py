"""Seen/unseen views in the server's evaluation and metrics.json; compare and the fold mean."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.checkpoint import RunDirectory
from server.recorder import RoundRecorder
from simulations.compare import final_with_zero_shot, mean_views


class _FakeEvaluate:
    baselines = {
        "zero_shot": {"seen": {"ndcg@10": 0.72, "mrr": 0.8, "auc": 0.7},
                      "unseen": {"ndcg@10": 0.85, "mrr": 0.9, "auc": 0.8}},
        "bm25": {"seen": {"ndcg@10": 0.6, "mrr": 0.7, "auc": 0.6},
                 "unseen": {"ndcg@10": 0.7, "mrr": 0.8, "auc": 0.7}},
    }

    def __call__(self, arrays):
        return {"ndcg@10": 0.86, "mrr": 0.91, "auc": 0.81,
                "seen-ndcg@10": 0.9, "seen-mrr": 0.95, "seen-auc": 0.85}


def test_metrics_json_has_both_views_and_baselines(tmp_path):
    recorder = RoundRecorder(
        RunDirectory(tmp_path), evaluate=_FakeEvaluate(), strategy_state=dict,
        config={"epsilon": 1.0}, total_rounds=1,
    )
    arrays = {"w": np.zeros(2, np.float32)}
    recorder(0, arrays)
    flat = recorder(1, arrays)
    assert flat["seen-ndcg@10"] == 0.9  # Flower's MetricRecord gets flat numbers
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    final = metrics["final"]
    assert final["seen"] == {"ndcg@10": 0.9, "mrr": 0.95, "auc": 0.85}
    assert final["unseen"] == {"ndcg@10": 0.86, "mrr": 0.91, "auc": 0.81}
    assert final["ndcg@10"] == 0.86  # the flat keys stay the unseen view
    assert "seen-ndcg@10" not in final
    assert metrics["baselines"]["zero_shot"]["seen"]["ndcg@10"] == 0.72
    assert metrics["initial"]["seen"]["ndcg@10"] == 0.9
    with_zs = final_with_zero_shot(metrics)
    assert with_zs["zero_shot"] == {"seen": 0.72, "unseen": 0.85}
    mean = mean_views([with_zs, with_zs])
    assert mean["seen"]["ndcg@10"] == pytest.approx(0.9)
    assert mean["zero_shot"] == {"seen": pytest.approx(0.72), "unseen": pytest.approx(0.85)}


def test_central_evaluator_views_and_evidence(wands_builder, tmp_path):
    from server.evaluator import CentralEvaluator
    from shared_model.evidence import EVIDENCE_CLICKS, EvidenceIndex, empty_evidence
    from shared_model.ranker import RankerHead
    from shared_model.settings import RunSettings
    from shared_model.state import head_state

    settings = RunSettings.from_config({"run-dir": str(tmp_path), "eval-fold": 0})
    evaluator = CentralEvaluator(settings)
    assert len(evaluator.seen_queries) + len(evaluator.test_queries) == 40
    assert not set(evaluator.seen_queries) & set(evaluator.test_queries)
    head = head_state(RankerHead())
    untrained = evaluator(head)
    zs = evaluator.baselines["zero_shot"]
    # The untrained head is zero-shot cosine: same numbers on both views.
    assert untrained["seen-ndcg@10"] == pytest.approx(zs["seen"]["ndcg@10"])
    assert untrained["ndcg@10"] == pytest.approx(zs["unseen"]["ndcg@10"])
    # Empty evidence changes nothing; evidence that clicks the judged-relevant items helps seen.
    index = EvidenceIndex(wands_builder.data)
    assert evaluator({**head, **empty_evidence(index)}) == pytest.approx(untrained)
    data = wands_builder.data
    rel = np.array([
        {j.product_id: j.relevance for j in data.judged(q)}[p]
        for q in index.query_ids for p in index.products[q]
    ])
    evidence = empty_evidence(index)
    seen_pairs = np.zeros(index.num_pairs, bool)
    for q in evaluator.seen_queries:
        seen_pairs[index.offsets[q]: index.offsets[q] + len(index.products[q])] = True
    evidence["evidence/exam"] = np.where(seen_pairs, 100.0, 0.0).astype(np.float32)
    evidence[EVIDENCE_CLICKS] = np.where(seen_pairs, 100.0 * (0.05 + 0.85 * rel), 0.0).astype(
        np.float32
    )
    learnt = evaluator({**head, **evidence})
    assert learnt["seen-ndcg@10"] > zs["seen"]["ndcg@10"] + 0.2
    assert learnt["ndcg@10"] == pytest.approx(zs["unseen"]["ndcg@10"])


def test_compare_shows_seen_beside_zero_shot(tmp_path):
    from simulations.compare import compare_runs

    run = tmp_path / "run-a"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"eval-fold": 0, "epsilon": "1.0"}))
    final = {"round": 2, "ndcg@10": 0.86, "mrr": 0.9, "auc": 0.8, "epsilon_max": 0.9,
             "seen": {"ndcg@10": 0.8, "mrr": 0.8, "auc": 0.7},
             "unseen": {"ndcg@10": 0.86, "mrr": 0.9, "auc": 0.8}}
    (run / "metrics.json").write_text(json.dumps({
        "rounds": [{**final, "round": 1}, final], "final": final,
        "baselines": _FakeEvaluate.baselines,
    }))
    per_fold = {m: 0.5 for m in ("ndcg@10", "mrr", "auc")}
    baseline = {name: {f"{m}_per_fold": [v] for m, v in per_fold.items()}
                for name in ("bm25", "minilm_zero_shot", "central_head")}
    (tmp_path / "b.json").write_text(json.dumps(baseline))
    table = compare_runs([run], baseline_json=tmp_path / "b.json", plot_path=tmp_path / "p.png")
    rows = {r["name"]: r for r in table["rows"]}
    assert rows["minilm_zero_shot"]["seen"]["ndcg@10"] == 0.72
    assert rows["run-a"]["seen"]["ndcg@10"] == 0.8
    assert rows["run-a"]["lift_over_zero_shot_seen"] == pytest.approx(0.08)
    assert (tmp_path / "p.png").exists()
