"""Run directory checkpoints: atomic, hash-checked, resumable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.checkpoint import RunDirectory, weights_hash


def _save(run: RunDirectory, rnd: int, value: float) -> str:
    arrays = {"w": np.full((2, 2), value, np.float32)}
    return run.save(
        round=rnd, arrays=arrays, strategy_state={"m_t/w": np.ones((2, 2))},
        rng_state={"numpy_seed": rnd}, config={"epsilon": "1.0"},
        metrics={"rounds": [{"round": r, "ndcg@10": 0.5} for r in range(1, rnd + 1)]},
    )


def test_latest_checkpoint_round_trips(tmp_path: Path) -> None:
    # Prepare
    run = RunDirectory(tmp_path)
    _save(run, 1, 1.0)
    digest = _save(run, 2, 2.0)
    # Execute
    ckpt = run.load_latest()
    # Assert
    assert ckpt is not None and ckpt.round == 2
    assert ckpt.weights_sha256 == digest == weights_hash(ckpt.arrays)
    assert np.all(ckpt.arrays["w"] == 2.0)
    assert set(ckpt.strategy_state) == {"m_t/w"}
    assert [r["round"] for r in ckpt.metrics_rounds] == [1, 2]


def test_fresh_directory_has_no_checkpoint(tmp_path: Path) -> None:
    assert RunDirectory(tmp_path).load_latest() is None


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    _save(run, 1, 1.0)
    np.savez(tmp_path / "checkpoints" / "round-0001.npz", w=np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="round-0001.npz does not match its recorded hash"):
        run.load_latest()
