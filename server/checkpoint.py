"""Checkpoints and metrics: the run directory the operator hands around.

Each round writes ``checkpoints/round-NNNN.npz`` (global weights and strategy state arrays)
with a JSON sidecar (round, strategy name, RNG state, config, weights hash), moves the
``checkpoints/latest.json`` pointer last (so a crash mid-write leaves the previous checkpoint
intact), and rewrites ``metrics.json`` atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STRATEGY_PREFIX = "strategy/"


def weights_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over keys, shapes, dtypes and bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{arr.shape}|{arr.dtype}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(fh.name, path)


@dataclass
class Checkpoint:
    """A restored checkpoint."""

    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]
    rng_state: dict[str, Any]
    metrics_rounds: list[dict[str, Any]] = field(default_factory=list)
    weights_sha256: str = ""


class RunDirectory:
    """Reads and writes one run directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"

    def write_config(self, config: dict[str, Any]) -> None:
        """``config.json``: the run settings (first write wins on resume checks)."""
        _atomic_write(self.root / "config.json", json.dumps(config, indent=2).encode())

    def save(
        self,
        *,
        round: int,
        arrays: dict[str, np.ndarray],
        strategy_state: dict[str, np.ndarray],
        rng_state: dict[str, Any],
        config: dict[str, Any],
        metrics: dict[str, Any],
    ) -> str:
        """Write round ``round``'s checkpoint and metrics; returns the weights hash."""
        digest = weights_hash(arrays)
        payload = {k: v for k, v in arrays.items()}
        payload.update({STRATEGY_PREFIX + k: v for k, v in strategy_state.items()})
        npz = self.checkpoints / f"round-{round:04d}.npz"
        npz.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=npz.parent, suffix=".npz", delete=False) as fh:
            np.savez(fh, **payload)  # type: ignore[arg-type]
        os.replace(fh.name, npz)
        meta = {
            "round": round,
            "weights": npz.name,
            "weights_sha256": digest,
            "rng_state": rng_state,
            "config": config,
        }
        _atomic_write(self.root / "metrics.json", json.dumps(metrics, indent=2).encode())
        _atomic_write(self.checkpoints / "latest.json", json.dumps(meta, indent=2).encode())
        return digest

    def load_latest(self) -> Checkpoint | None:
        """The last complete checkpoint, or ``None`` for a fresh run directory."""
        pointer = self.checkpoints / "latest.json"
        if not pointer.exists():
            return None
        meta = json.loads(pointer.read_text())
        with np.load(self.checkpoints / meta["weights"]) as npz:
            arrays = {k: npz[k] for k in npz.files if not k.startswith(STRATEGY_PREFIX)}
            strategy = {
                k.removeprefix(STRATEGY_PREFIX): npz[k]
                for k in npz.files
                if k.startswith(STRATEGY_PREFIX)
            }
        if weights_hash(arrays) != meta["weights_sha256"]:
            raise ValueError(f"checkpoint {meta['weights']} does not match its recorded hash")
        rounds: list[dict[str, Any]] = []
        metrics_path = self.root / "metrics.json"
        if metrics_path.exists():
            rounds = [
                r for r in json.loads(metrics_path.read_text()).get("rounds", [])
                if r["round"] <= meta["round"]
            ]
        return Checkpoint(
            round=int(meta["round"]),
            arrays=arrays,
            strategy_state=strategy,
            rng_state=meta["rng_state"],
            metrics_rounds=rounds,
            weights_sha256=meta["weights_sha256"],
        )
