"""Signed releases of the global head, every ``release-every`` rounds.

The server keeps an Ed25519 key in ``RUN_DIR/keys/`` (created on first use; the public half
beside it is what nodes pin) and writes ``RUN_DIR/releases/round-NNNN/``: the head as ONNX,
a manifest (version, round, ε per node, metrics, sha256 of each file) and its signature.
Nodes pick releases up from that folder (the documented file drop), verify them, and keep
the last good one (``client.node.install_latest_release``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from shared_model.ranker import HeadConfig, RankerHead
from shared_model.release import (
    generate_signing_key,
    load_signing_key,
    write_public_key,
    write_release,
)
from shared_model.state import load_head_state

log = logging.getLogger("fedrank.server")
SIGNING_KEY = "keys/server-signing.pem"
PUBLIC_KEY = "keys/server-signing.pub"


def public_key_path(run_dir: Path) -> Path:
    """Where the server's release-verification key lives in a run directory."""
    return Path(run_dir) / PUBLIC_KEY


class ReleasePublisher:
    """Writes a signed release every ``every`` rounds (0 = never)."""

    def __init__(self, run_dir: Path, *, every: int, head_config: HeadConfig) -> None:
        if every < 0:
            raise ValueError(f"release-every must be >= 0, got {every!r}")
        self.run_dir = Path(run_dir)
        self.every = every
        self.head_config = head_config
        key_path = self.run_dir / SIGNING_KEY
        if every:
            if key_path.exists():
                self.key = load_signing_key(key_path)
            else:
                self.key = generate_signing_key(key_path)
                write_public_key(self.key, public_key_path(self.run_dir))

    def maybe_publish(
        self,
        server_round: int,
        arrays: Mapping[str, np.ndarray],
        *,
        metrics: Mapping[str, float],
        epsilon_per_node: Mapping[str, float],
    ) -> Path | None:
        """Publish if this round is due; returns the release folder."""
        if not self.every or server_round % self.every:
            return None
        target = self.run_dir / "releases" / f"round-{server_round:04d}"
        if target.exists():
            return target  # resumed run: this round's release was already written
        head = RankerHead(self.head_config)
        load_head_state(head, arrays)
        write_release(
            target, head=head, version=f"round-{server_round:04d}", round=server_round,
            epsilon_per_node=dict(epsilon_per_node), metrics=dict(metrics),
            signing_key=self.key,
        )
        log.info("[fedrank] release %s written and signed", target.name)
        return target
