"""Evidence canary audit (simulations.evidence_canaries): control catches σ = 0, DP stays below."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from client.evidence_release import catalog_index
from shared_model.data import DEFAULT_WANDS_DIR, load_judged_dir
from shared_model.schema import JudgedSearchData
from simulations.evidence_canaries import (
    EvidenceCanaryResult,
    canary_log,
    release_canaries,
    run_evidence_canary_audit,
    untouched_pairs,
)


@pytest.fixture(scope="module")
def world() -> tuple[JudgedSearchData, pa.Table]:
    data = load_judged_dir(DEFAULT_WANDS_DIR.resolve())
    index = catalog_index(data)
    q = index.query_ids[0]
    pids = index.products[q][:3]
    # Two real users, one session each, on the first query's first three products.
    log = pa.table({
        "session_id": pa.array([1, 1, 1, 2, 2, 2], pa.int64()),
        "user_id": pa.array([7, 7, 7, 8, 8, 8], pa.int64()),
        "region_id": pa.array([0] * 6, pa.int32()),
        "timestamp": pa.array([100] * 6, pa.int64()),
        "query_id": [q] * 6,
        "product_id": pids + pids,
        "rank": pa.array([1, 2, 3, 1, 2, 3], pa.int16()),
        "clicked": [True, False, False, False, True, False],
        "exploration": [False] * 6,
    })
    return data, log


def test_canaries_land_on_their_own_untouched_pairs(
    world: tuple[JudgedSearchData, pa.Table],
) -> None:
    data, log = world
    index = catalog_index(data)
    free = untouched_pairs(log, index, max_sessions_per_user=2)
    assert len(free) == index.num_pairs - 3
    pairs = free[:5]
    included = np.array([True, False, True, True, False])
    both = pa.concat_tables([log, canary_log(index, pairs, included, like=log, first_user=9,
                                             first_session=3)])
    clicks, exam = release_canaries(log=both, index=index, noise_multiplier=0.0, clip_norm=3.0,
                                    max_sessions_per_user=2, delta=1e-5, node_epsilon=math.inf)
    np.testing.assert_allclose(clicks[pairs], included.astype(float))
    np.testing.assert_allclose(exam[pairs], included.astype(float))
    assert clicks.sum() == pytest.approx(2.0 + included.sum())  # real clicks untouched


def _audit(world: tuple[JudgedSearchData, pa.Table], epsilon: float) -> EvidenceCanaryResult:
    data, log = world
    return run_evidence_canary_audit(
        data=data, log=log, epsilon=epsilon, delta=1e-5, evidence_share=0.75, clip_norm=3.0,
        max_sessions_per_user=2, canaries=400, seed=3, scenario="test",
        noise_rng=np.random.default_rng(11),
    )


def test_sigma_zero_control_is_caught_and_dp_release_stays_below_claim(
    world: tuple[JudgedSearchData, pa.Table],
) -> None:
    private = _audit(world, 1.0)
    assert private.claimed_epsilon == pytest.approx(0.75)
    assert private.noise_multiplier > 1.0
    assert private.epsilon_lower_bound <= private.claimed_epsilon
    assert private.positive_control_epsilon_lower_bound >= 2.0
    assert private.positive_control_correct == private.positive_control_guesses == 80
    assert private.result == "pass"
    assert private.to_dict()["mechanism"] == "evidence"

    open_ = _audit(world, math.inf)
    assert open_.noise_multiplier == 0.0
    assert open_.epsilon_lower_bound >= 2.0
    assert open_.result == "inconclusive"
    assert open_.to_dict()["claimed_epsilon"] == "inf"


def test_cli_mechanism_evidence_writes_the_json_contract(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from privacy import commands as privacy_commands
    from simulations import canary_commands

    app, bench = typer.Typer(), typer.Typer()
    privacy_commands.register(app, bench)
    canary_commands.register(app, bench)
    path = tmp_path / "evidence.json"
    out = CliRunner().invoke(app, [
        "audit", "canaries", "regional-3", "--epsilon", "1", "--mechanism", "evidence",
        "--canaries", "300", "--json", str(path),
    ])

    assert out.exit_code == 0, out.output
    report = json.loads(path.read_text())
    assert report["mechanism"] == "evidence" and report["canaries"] == 300
    assert report["claimed_epsilon"] == pytest.approx(0.75)
    assert report["epsilon_lower_bound"] <= report["claimed_epsilon"]
    assert report["positive_control_epsilon_lower_bound"] >= 2.0
    assert report["result"] == "pass"
    bad = CliRunner().invoke(app, ["audit", "canaries", "regional-3", "--epsilon", "1",
                                   "--mechanism", "nope"])
    assert bad.exit_code == 2
