"""Signed releases of the global head, every ``release-every`` rounds.

The server keeps an Ed25519 signing key *outside* the run directory (the run directory is
handed around and is the nodes' drop folder): in ``shared_model.release.signing_key_dir``,
``$FEDRANK_KEY_DIR`` (``fedrank server start`` sets it from ``[keys] dir``) or the sibling
folder ``RUN_DIR.keys``, created 0700 on first use with the key written 0600
(``O_CREAT|O_EXCL``); a reused key is refused if group/world can read it. The public half
beside it (``server-signing.pub``) is what each node pins at set-up (``--release-key``).
Releases go to ``RUN_DIR/releases/round-NNNN/``: the head as ONNX, a manifest (version,
round, ε per node, metrics, sha256 of each file) and its signature. Nodes pick releases up
from their own copy of that folder, verify them with their pinned key, and keep the last
good one (``client.releases.install_latest_release``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from shared_model.ranker import HeadConfig, RankerHead
from shared_model.release import (
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    default_public_key_path,
    generate_signing_key,
    load_signing_key,
    signing_key_dir,
    write_public_key,
    write_release,
)
from shared_model.release_evidence import ReleaseEvidence
from shared_model.state import load_head_state

log = logging.getLogger("fedrank.server")


def public_key_path(run_dir: Path) -> Path:
    """Where the server's release-verification key is written for a run (outside it)."""
    return default_public_key_path(run_dir)


class ReleasePublisher:
    """Writes a signed release every ``every`` rounds (0 = never) and after ``final_round``.

    The final global model is always released (when ``final_round`` is given): a run ends
    the way the product is used, with a signed release nodes and devices can score with.
    """

    def __init__(
        self, run_dir: Path, *, every: int, head_config: HeadConfig,
        final_round: int | None = None,
    ) -> None:
        if every < 0:
            raise ValueError(f"release-every must be >= 0, got {every!r}")
        if final_round is not None and final_round < 1:
            raise ValueError(f"final_round must be >= 1, got {final_round!r}")
        self.run_dir = Path(run_dir)
        self.every = every
        self.final_round = final_round
        self.head_config = head_config
        key_dir = signing_key_dir(self.run_dir)
        key_path = key_dir / SIGNING_KEY_FILE
        if every or final_round is not None:
            if key_path.exists() or key_path.is_symlink():
                self.key = load_signing_key(key_path)  # refuses a group/world-readable key
            else:
                self.key = generate_signing_key(key_path)
            if not (key_dir / PUBLIC_KEY_FILE).exists():
                write_public_key(self.key, key_dir / PUBLIC_KEY_FILE)

    def maybe_publish(
        self,
        server_round: int,
        arrays: Mapping[str, np.ndarray],
        *,
        metrics: Mapping[str, float],
        epsilon_per_node: Mapping[str, float],
        evidence: Callable[[], ReleaseEvidence | None] | None = None,
    ) -> Path | None:
        """Publish if this round is due; returns the release folder.

        ``evidence`` builds the memorised click evidence the release carries (called only
        when a release is due).
        """
        due = bool(self.every) and server_round % self.every == 0
        if not due and server_round != self.final_round:
            return None
        target = self.run_dir / "releases" / f"round-{server_round:04d}"
        if target.exists():
            return target  # resumed run: this round's release was already written
        head = RankerHead(self.head_config)
        load_head_state(head, arrays)
        write_release(
            target, head=head, version=f"round-{server_round:04d}", round=server_round,
            epsilon_per_node=dict(epsilon_per_node), metrics=dict(metrics),
            signing_key=self.key, evidence=evidence() if evidence is not None else None,
        )
        log.info("[fedrank] release %s written and signed", target.name)
        return target
