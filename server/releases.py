"""Signed releases of the global head, every ``release-every`` rounds.

The server keeps an Ed25519 signing key *outside* the run directory (the run directory is
handed around and is the nodes' drop folder): in ``shared_model.release.signing_key_dir``,
``$FEDRANK_KEY_DIR`` (``fedrank server start`` sets it from ``[keys] dir``) or the sibling
folder ``RUN_DIR.keys``, created 0700 on first use with the key written 0600
(``O_CREAT|O_EXCL``); a reused key is refused if group/world can read it. The public half
beside it (``server-signing.pub``) is what each node pins at set-up (``--release-key``).
Releases go to ``RUN_DIR/releases/round-NNNN/``: the head as ONNX, a manifest (version,
round, ε per node, metrics, sha256 of each file) and its signature.

**Delivery: inside Flower messages** (a node needs no access to the server's disk).
:class:`ReleaseCarrier` attaches the newest release (read back and verified with the
server's own public key first) to the train message of every node whose last reported
``release-round`` is older, as the ConfigRecord ``release`` (``client.releases`` defines the
format and installs it); a node that refused it (it reports its old round) gets it again next
round. After the last round :func:`deliver_release` sends the final release in one
``query.install_release`` message to each connected node that lacks it. Nodes verify every
release against the key they pinned at set-up and keep the last good one. A node whose
operator also configures ``release-dir`` still installs from that folder (the file drop is
optional). The device shape (``server.device``, SecAgg+ legacy workflow) is not carried:
its devices use the file drop.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from client.releases import INSTALL_ACTION, RELEASE_BLOBS, RELEASE_NAMES, RELEASE_RECORD
from server.validation import escape
from server.wrapping import DelegatingStrategy
from shared_model.ranker import HeadConfig, RankerHead
from shared_model.release import (
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    Manifest,
    ReleaseError,
    default_public_key_path,
    generate_signing_key,
    load_signing_key,
    load_verified_release,
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
        # Newest release folder (a resumed run starts from what is on disk).
        self.latest: Path | None = newest_release_dir(self.run_dir / "releases")
        self._packed: tuple[Path, tuple[Manifest, ConfigRecord]] | None = None
        self.key: Ed25519PrivateKey | None = None
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
            self._note_latest(target)
            return target  # resumed run: this round's release was already written
        if self.key is None:
            raise ReleaseError("release publisher has no signing key (release-every = 0 and no "
                               "final round)")
        head = RankerHead(self.head_config)
        load_head_state(head, arrays)
        write_release(
            target, head=head, version=f"round-{server_round:04d}", round=server_round,
            epsilon_per_node=dict(epsilon_per_node), metrics=dict(metrics),
            signing_key=self.key, evidence=evidence() if evidence is not None else None,
        )
        log.info("[fedrank] release %s written and signed", target.name)
        self._note_latest(target)
        return target

    def _note_latest(self, target: Path) -> None:
        if self.latest is None or _round_of(target) >= _round_of(self.latest):
            self.latest = target

    def newest(self) -> tuple[Manifest, ConfigRecord] | None:
        """The newest release as a message record (``None``: none yet, or it does not verify).

        The files are read back once (no symlinks, size-capped) and verified with the
        server's own public key before they are sent: a release folder altered on the
        server's disk is never shipped (logged instead).
        """
        if self.latest is None or self.key is None:
            return None
        if self._packed is not None and self._packed[0] == self.latest:
            return self._packed[1]
        try:
            packed = release_record(self.latest, self.key.public_key())
        except (ReleaseError, OSError) as exc:
            log.warning("[fedrank] release %s does not verify on the server; not sent: %s",
                        self.latest.name, exc)
            return None
        self._packed = (self.latest, packed)
        return packed


_ROUND_DIR = re.compile(r"round-(\d{4,9})")


def _round_of(path: Path) -> int:
    match = _ROUND_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def newest_release_dir(releases: Path) -> Path | None:
    """The ``round-NNNN`` folder with the highest round under ``releases`` (``None``: none)."""
    try:
        found = [p for p in releases.iterdir()
                 if _ROUND_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return None
    return max(found, key=_round_of, default=None)


def release_record(
    directory: Path, public_key: Ed25519PublicKey
) -> tuple[Manifest, ConfigRecord]:
    """A verified release folder as the ``release`` ConfigRecord nodes install
    (``client.releases.unpack_release_record`` reads it): ``{"names": [...], "blobs": [...]}``,
    every file of the release, manifest and signature included."""
    manifest, files = load_verified_release(directory, public_key)
    names = sorted(files)
    return manifest, ConfigRecord(
        {RELEASE_NAMES: names, RELEASE_BLOBS: [files[n] for n in names]}
    )


def record_bytes(record: ConfigRecord) -> int:
    """Payload bytes of a release record (the files; Flower's framing comes on top)."""
    blobs = record[RELEASE_BLOBS]
    if not isinstance(blobs, list):
        return 0
    return sum(len(b) for b in blobs if isinstance(b, bytes))


def _reported_round(msg: Message) -> float | None:
    """The ``release-round`` a reply reports (``None``: none, or not a finite number >= 0)."""
    if msg.has_error():
        return None
    for record in msg.content.metric_records.values():
        value = record.get("release-round")
        if (type(value) in (int, float) and math.isfinite(float(value))  # type: ignore[arg-type]
                and float(value) >= 0):  # type: ignore[arg-type]
            return float(value)  # type: ignore[arg-type]
    return None


class ReleaseCarrier(DelegatingStrategy):
    """Wraps the aggregation strategy: the newest release rides on train messages.

    Sits inside reply validation (``server.validation.ValidatingStrategy``), so the
    ``release-round`` it reads comes from replies that passed the reply checks. A node's last
    reported round is kept per Flower node id (in memory: after a server restart every node
    is sent the newest release once more). ``deliveries`` lists what was attached per round.
    """

    def __init__(self, inner: Strategy, publisher: ReleasePublisher) -> None:
        self.inner = inner
        self.publisher = publisher
        self.node_round: dict[int, float] = {}  # last release-round each node reported
        self._pending: dict[int, int] = {}  # node id -> round of the release sent this round
        self.deliveries: list[dict[str, object]] = []
        self.round_offset = 0  # a resumed run's rounds already done (for the log and deliveries)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._pending = {}
        newest = self.publisher.newest()
        if newest is None:
            return messages
        manifest, record = newest
        for msg in messages:
            node = msg.metadata.dst_node_id
            if self.node_round.get(node, 0.0) >= manifest.round:
                continue
            # Flower's strategies share one RecordDict between messages: give this one its own.
            content = RecordDict(dict(msg.content.items()))
            content[RELEASE_RECORD] = record
            msg.content = content
            self._pending[node] = manifest.round
        if self._pending:
            size = record_bytes(record)
            rnd = server_round + self.round_offset
            self.deliveries.append({"round": rnd, "release": manifest.version,
                                    "nodes": sorted(self._pending), "bytes_per_node": size})
            log.info("[fedrank] round %s: release %s attached for %d node(s), %d bytes each",
                     rnd, manifest.version, len(self._pending), size)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            reported = _reported_round(msg)
            if reported is not None:
                self.note(msg.metadata.src_node_id, reported,
                          server_round=server_round + self.round_offset)
        return self.inner.aggregate_train(server_round, replies)

    def note(self, node: int, reported: float, *, server_round: int | str) -> None:
        """Record a node's reported release round; log when it did not take what it was sent."""
        self.node_round[node] = reported
        sent = self._pending.pop(node, None)
        if sent is not None and reported < sent:
            log.warning("round %s: node %s did not install release round-%04d (it reports "
                        "release round %d; refused or failed: see the node's log); it is "
                        "sent again", server_round, node, sent, int(reported))



# How long the final delivery waits for nodes' answers (a deployment message takes seconds:
# a fresh ClientApp process per message, a SuperNode polling every few seconds).
DELIVERY_TIMEOUT_S = 120.0


def deliver_release(
    grid: Grid, carrier: ReleaseCarrier, *, timeout: float = DELIVERY_TIMEOUT_S
) -> dict[int, float]:
    """Send the newest release to each connected node that has not reported it installed.

    One ``query.install_release`` message per such node; returns ``{node id: release round
    it reports}`` for the nodes that answered (a node that refused keeps its old round, and
    the server logs which nodes lack the release).
    """
    newest = carrier.publisher.newest()
    if newest is None:
        return {}
    manifest, record = newest
    targets = sorted(n for n in grid.get_node_ids()
                     if carrier.node_round.get(n, 0.0) < manifest.round)
    if not targets:
        return {}
    messages = [
        Message(RecordDict({RELEASE_RECORD: record}), dst_node_id=node,
                message_type=f"query.{INSTALL_ACTION}")
        for node in targets
    ]
    size = record_bytes(record)
    carrier.deliveries.append({"round": "final", "release": manifest.version,
                               "nodes": targets, "bytes_per_node": size})
    log.info("[fedrank] final release %s sent to %d node(s), %d bytes each", manifest.version,
             len(targets), size)
    carrier._pending = {node: manifest.round for node in targets}
    answered: dict[int, float] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        reported = _reported_round(reply)
        if reported is None:
            reason = reply.error.reason if reply.has_error() else "no release-round"
            log.warning("final release: node %s answered without installing it: %s", node,
                        escape(reason))
            continue
        carrier.note(node, reported, server_round="final")
        answered[node] = reported
    installed = sorted(n for n, r in answered.items() if r >= manifest.round)
    missing = sorted(set(targets) - set(installed))
    log.info("[fedrank] final release %s installed on %d/%d node(s)%s", manifest.version,
             len(installed), len(targets), f"; not on {missing}" if missing else "")
    return answered
