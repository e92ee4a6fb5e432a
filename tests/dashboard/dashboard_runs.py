"""Synthetic run directories for the dashboard tests: the files a run writes (config,
metrics with seen/unseen views, baselines and reply summaries, hash-chained ledgers written
with the real Ledger, a signed release), with made-up numbers; no training."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.ledger import Ledger, LedgerEvent

DELTA = 1e-5
BUDGET = 2.0
NODES = ("north", "south")


def node_epsilon(node_index: int, round_: int) -> float:
    """The ε a node's ledger states after ``round_`` (made up, increasing)."""
    return round(0.3 * round_ + 0.05 * node_index, 4)


def metrics_row(round_: int) -> dict[str, Any]:
    return {
        "round": round_, "ndcg@10": 0.50 + 0.01 * round_, "mrr": 0.4, "auc": 0.60 + 0.01 * round_,
        "epsilon_max": node_epsilon(len(NODES) - 1, round_), "seconds": 1.5,
        "seen": {"ndcg@10": 0.55 + 0.01 * round_, "mrr": 0.45, "auc": 0.65},
        "unseen": {"ndcg@10": 0.50 + 0.01 * round_, "mrr": 0.4, "auc": 0.60 + 0.01 * round_},
        "replies": {"rejected": [], "clipped": [], "refused": []},
    }  # fmt: skip


def write_metrics(run: Path, rounds: int) -> None:
    metrics: dict[str, Any] = {
        "rounds": [metrics_row(r) for r in range(1, rounds + 1)],
        "initial": {"ndcg@10": 0.45, "mrr": 0.35, "auc": 0.55},
        "baselines": {
            "zero_shot": {"seen": {"ndcg@10": 0.47, "auc": 0.57},
                          "unseen": {"ndcg@10": 0.46, "auc": 0.56}},
            "bm25": {"seen": {"ndcg@10": 0.40, "auc": 0.52},
                     "unseen": {"ndcg@10": 0.41, "auc": 0.53}},
        },
    }  # fmt: skip
    metrics["final"] = metrics["rounds"][-1] if rounds else {}
    tmp = run / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(run / "metrics.json")


def append_round(run: Path, round_: int, *, nodes: tuple[str, ...] = NODES) -> None:
    """Each node's ledger line for ``round_`` (and metrics.json up to it)."""
    for i, node in enumerate(nodes):
        Ledger(run / "ledger" / f"{_safe(node)}.jsonl").append(LedgerEvent(
            node=node, round=round_, mechanism="dp-sgd", unit_of_privacy="user",
            noise_multiplier=1.0, sample_rate=0.02, steps=10, clip_norm=1.0, delta=DELTA,
            accountant="rdp", epsilon_after=node_epsilon(i, round_),
        ))  # fmt: skip
    write_metrics(run, round_)


def _safe(name: str) -> str:
    plain = name.replace("-", "").replace("_", "").isalnum()
    return name if plain else hashlib.sha256(name.encode()).hexdigest()[:12]


def make_run(root: Path, *, rounds: int = 3, planned: int = 5,
             nodes: tuple[str, ...] = NODES) -> Path:
    """A regional run ``rounds`` rounds into ``planned``."""
    run = root / "run"
    (run / "ledger").mkdir(parents=True)
    config = {"scenario": "regional-2", "privacy-shape": "regional", "strategy": "fedavg",
              "num-server-rounds": planned, "epsilon": str(BUDGET), "delta": DELTA,
              "region-epsilon-caps": f"{nodes[0]}=1.5", "data-dir": "/secret/path"}
    (run / "config.json").write_text(json.dumps(config, indent=2))
    for r in range(1, rounds + 1):
        append_round(run, r, nodes=nodes)
    return run


def add_refusal(run: Path, node: str, round_: int, eps: float) -> None:
    Ledger(run / "ledger" / f"{_safe(node)}.jsonl").append(LedgerEvent(
        node=node, round=round_, mechanism="refusal", unit_of_privacy="user",
        noise_multiplier=1.0, sample_rate=0.02, steps=0, clip_norm=1.0, delta=DELTA,
        accountant="rdp", epsilon_after=eps,
        detail=f"node {node} refuses round {round_}: ε would reach 2.1, past its budget 2",
    ))  # fmt: skip


def add_release(run: Path, round_: int, *, tamper: bool = False) -> str:
    """A signed release folder (manifest + signature; the key's public half where the
    server writes it, ``RUN_DIR.keys``). Returns the key's fingerprint."""
    key_dir = run.parent / f"{run.name}.keys"
    key_dir.mkdir(exist_ok=True)
    pub_path = key_dir / "server-signing.pub"
    priv_path = key_dir / "test-signing.raw"
    if priv_path.exists():
        key = Ed25519PrivateKey.from_private_bytes(priv_path.read_bytes())
    else:
        key = Ed25519PrivateKey.generate()
        priv_path.write_bytes(key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption()))  # fmt: skip
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        pub_path.write_bytes(pem)
    folder = run / "releases" / f"round-{round_:04d}"
    folder.mkdir(parents=True)
    onnx = b"not really onnx"
    (folder / "head.onnx").write_bytes(onnx)
    manifest = {
        "version": f"round-{round_:04d}", "round": round_,
        "epsilon_per_node": {n: node_epsilon(i, round_) for i, n in enumerate(NODES)},
        "metrics": {"ndcg@10": 0.5 + 0.01 * round_}, "feature_names": ["f"],
        "head_config": {}, "created_at": "2026-01-01T00:00:00+00:00",
        "files": {"head.onnx": hashlib.sha256(onnx).hexdigest()}, "format": 1,
    }  # fmt: skip
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (folder / "manifest.sig").write_bytes(key.sign(data))
    (folder / "manifest.json").write_bytes(data.replace(b"0.5", b"0.9") if tamper else data)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + hashlib.sha256(raw).hexdigest()
