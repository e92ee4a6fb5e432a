"""Deployment Engine runs shared by several e2e tests (one cluster, several behaviours).

A loopback cluster (TLS + SuperNode auth) costs a SuperLink, a gateway, one SuperNode and a
warm ClientApp runner per node, and every round starts one ClientApp process per node: on 2
cores that is most of the suite's wall time. So each run below starts ONE cluster and makes it
exercise several behaviours at once; the tests that check them ask for the run's result
through session fixtures (``tests/conftest.py``), so it runs once per session, whichever test
comes first, and only if a test that needs it is selected.

- :func:`faulty_run`: six registered nodes, each misbehaving in its own way (NaN arrays, a
  wrong shape, an extra metric, ``num-examples`` = 1e300 with an update of norm 50, a node
  pinned to another app) beside an honest node that records what it sends, plus an
  unregistered key and a plaintext node. Two rounds, a signed release after each
  (``release-every = 1``): node-0 and node-4 (:data:`RELEASE_NODES`) have only their own
  folders (click log, pinned server key, state; no ``release-dir``), so releases can reach
  them only inside Flower messages; node-4 alters round-0001 as it arrives (the
  ``tamper-release`` hook) and must refuse it. Checked by
  ``test_deployment.py::test_faulty_unregistered_and_plaintext_nodes_are_refused``,
  ``tests/server/test_faulty_node_e2e.py``,
  ``test_security.py::test_node_runs_only_the_app_it_pinned`` and
  ``test_release_transport.py``.
- :func:`crash_run`: three nodes, three rounds; node-2 is killed as round 2 starts, the
  server side (SuperLink, ServerApp, ``flwr run``) is killed once round 2 has ended, node-2 is
  restarted, the server is started again and resumes. Checked by
  ``test_deployment.py::test_node_killed_in_round_two_and_restarted`` and
  ``test_deployment.py::test_server_killed_mid_run_resumes_from_checkpoint``.

Each run stops every process it started (the cluster's tag) before it returns; the result
keeps the closed :class:`deploy_helpers.Cluster` (its files, lines and ledgers stay readable).
Ports: faulty 9400-9419, crash 9430-9444 (this suite's range is 9400-9499).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deploy_helpers import Cluster

from server.deploy import tagged_pids
from server.releases import ReleasePublisher
from shared_model.ranker import HeadConfig
from shared_model.release import PUBLIC_KEY_FILE, signing_key_dir
from shared_model.settings import RunSettings
from simulations.runner import prepare_run
from simulations.scenarios import get_scenario

FAULTY_PORT = 9400
CRASH_PORT = 9430
USERS_PER_NODE = 100  # a round is bounded by Flower's process start-up, not training
DATA_NODES = ("node-0", "node-1", "node-2")  # regional-3's click logs


def prepare(cluster: Cluster, rounds: int, *, users: int = USERS_PER_NODE,
            **overrides: Any) -> dict[str, Any]:
    """regional-3's click logs in the cluster's run dir, cut to ``users`` users per node;
    returns the run config to submit."""
    settings = prepare_run(
        get_scenario("regional-3"), run_dir=cluster.run_dir, rounds=rounds, epsilon=1.0,
        overrides={"batch-size": 64, **overrides},
    )
    for name in DATA_NODES:
        path = cluster.run_dir / "data" / name / "clicks.parquet"
        table = pq.read_table(path)
        kept = sorted(set(table.column("user_id").to_pylist()))[:users]
        pq.write_table(table.filter(pc.is_in(table.column("user_id"), pa.array(kept))), path)
    return settings.to_config()


def node_data(cluster: Cluster, name: str) -> Path:
    return cluster.run_dir / "data" / name


@dataclass
class FaultyRun:
    cluster: Cluster
    rc: int | None
    ids: dict[str, int]  # registered node name -> the Flower node id the server knows
    regions: dict[str, str]  # node name -> the region the server's config maps its id to
    faults: dict[str, str]  # node name -> what it does wrong
    rogue_rc: int | None  # the SuperNode with an unregistered key
    plain_rc: int | None  # the plaintext SuperNode
    record: Path  # node-0's outgoing-message record
    hidden_dim: int
    own_folders: dict[str, Path] = field(default_factory=dict)  # RELEASE_NODES' own folders
    node_args: dict[str, str] = field(default_factory=dict)  # RELEASE_NODES' command lines
    leftover: list[int] = field(default_factory=list)  # tagged pids alive after close
    error: str | None = None  # set when the run itself failed (the tests report it)


# node -> (fault, region); node-5 is pinned to another app (it refuses the run's ClientApp)
FAULTY_NODES: dict[str, tuple[str | None, str]] = {
    "node-0": (None, "eu-west"),
    "node-1": ("nan", "us-east"),
    "node-2": ("shape", "us-west"),
    "node-3": ("extra-metric", "sa-east"),
    "node-4": ("huge-weight", "ap-south"),
    "node-5": ("pinned-other-app", "af-south"),
}
ROGUE = "node-6"  # the cluster's spare key: never registered
OTHER_APP = ("0" * 64,)
# Nodes with only their own folders that take releases over Flower; node -> tampered round
RELEASE_NODES: dict[str, int | None] = {"node-0": None, "node-4": 1}
RELEASE_USERS = 60


def own_folder(cluster: Cluster, root: Path, name: str, data_node: str) -> tuple[Path, Path]:
    """A node's own copy of a click log and of the server's public key (pinned at set-up: an
    operator copies ``server-signing.pub`` once, out of band), outside every server folder."""
    own = root / name
    data = own / "data"
    data.mkdir(parents=True)
    table = pq.read_table(node_data(cluster, data_node) / "clicks.parquet")
    users = sorted(set(table.column("user_id").to_pylist()))[:RELEASE_USERS]
    pq.write_table(table.filter(pc.is_in(table.column("user_id"), pa.array(users))),
                   data / "clicks.parquet")
    key = own / "server-signing.pub"
    shutil.copy(signing_key_dir(cluster.run_dir) / PUBLIC_KEY_FILE, key)
    return data, key


def faulty_run(root: Path, *, rounds: int = 2) -> FaultyRun:
    names = list(FAULTY_NODES)
    cluster = Cluster(root, port=FAULTY_PORT, nodes=len(names))
    ids: dict[str, int] = {}
    rc = rogue_rc = plain_rc = None
    error = None
    record = root / "node-0-messages.jsonl"
    hidden_dim = 0
    folders: dict[str, Path] = {}
    args: dict[str, str] = {}
    try:
        config = prepare(cluster, rounds, **{"min-train-nodes": len(names), "release-every": 1})
        hidden_dim = RunSettings.from_config(config).hidden_dim
        # the server's signing key exists before the release nodes pin a copy of it
        ReleasePublisher(cluster.run_dir, every=1, head_config=HeadConfig(hidden_dim=hidden_dim))
        cluster.deployment.start_superlink()
        for name in names:
            text = cluster.deployment.register(cluster.certs.node_keys[name][1], name=name)
            ids[name] = int(re.findall(r"SuperNode (\d+) registered", text)[0])
        # The server names nodes by their registered ids (node-regions), not by claims.
        config["node-regions"] = ",".join(f"{ids[n]}={FAULTY_NODES[n][1]}" for n in names)
        for i, name in enumerate(names):
            fault = FAULTY_NODES[name][0]
            data = node_data(cluster, DATA_NODES[i % len(DATA_NODES)])
            extra: dict[str, str] = {}
            if name in RELEASE_NODES:
                data, key = own_folder(cluster, root / "node-files", name,
                                       DATA_NODES[i % len(DATA_NODES)])
                folders[name] = key.parent
                extra["release-key"] = str(key)
                if RELEASE_NODES[name] is not None:
                    extra["tamper-release"] = str(RELEASE_NODES[name])
            if name == "node-0":
                extra["record-messages"] = str(record)
            if fault == "pinned-other-app":
                proc = cluster.start_node(name, data=data, app_hashes=OTHER_APP)
            else:
                if fault is not None:
                    extra["fault"] = fault
                proc = cluster.start_node(name, data=data, extra=extra)
            if name in RELEASE_NODES:
                argv = proc.args if isinstance(proc.args, list) else [str(proc.args)]
                args[name] = " ".join(map(str, argv))
        rogue = cluster.start_node(ROGUE, data=node_data(cluster, "node-0"), max_wait_time=30)
        plain = cluster.start_node("plain", insecure=True, data=node_data(cluster, "node-0"),
                                   max_wait_time=20)
        cluster.submit(config)
        rc = cluster.wait_run(420)
        rogue_rc = rogue.wait(timeout=60)
        plain_rc = plain.wait(timeout=60)
    except Exception as exc:  # noqa: BLE001 - each test that asks reports it
        error = f"{type(exc).__name__}: {exc}\n{cluster.tail()}"
    finally:
        cluster.close()
    return FaultyRun(
        cluster=cluster, rc=rc, ids=ids, regions={n: r for n, (_, r) in FAULTY_NODES.items()},
        faults={n: f for n, (f, _) in FAULTY_NODES.items() if f is not None},
        rogue_rc=rogue_rc, plain_rc=plain_rc, record=record, hidden_dim=hidden_dim,
        own_folders=folders, node_args=args, leftover=tagged_pids(cluster.tag), error=error,
    )


@dataclass
class CrashRun:
    cluster: Cluster
    rc: int | None
    first_lines: list[str]  # the run stream before the server was killed
    eps_before_node_kill: float | None  # node-2's ε just after it was killed
    checkpoint_at_kill: dict[str, Any]  # checkpoints/latest.json when the server died
    eps_at_server_kill: float | None  # metrics.json's last epsilon_max then
    leftover: list[int] = field(default_factory=list)
    error: str | None = None


CRASH_NODES = ["node-0", "node-1", "node-2"]


def crash_run(root: Path) -> CrashRun:
    cluster = Cluster(root, port=CRASH_PORT, nodes=len(CRASH_NODES))
    rc = eps_node = eps_server = None
    checkpoint: dict[str, Any] = {}
    first: list[str] = []
    error = None
    try:
        # min-train-nodes = 3: round 3 (after the restarts) waits for node-2 to be back
        config = prepare(cluster, 3, **{"min-train-nodes": len(CRASH_NODES)})
        cluster.start_server(register=CRASH_NODES)
        for name in CRASH_NODES:
            cluster.start_node(name, data=node_data(cluster, name))
        cluster.submit(config)
        # kill node-2 as round 2 starts: round 2 ends without it
        cluster.wait_for(lambda: cluster.has_line("[ROUND 2/3]"), 240, "round 2")
        time.sleep(3)  # its round-2 ClientApp is starting/training
        cluster.kill_node("node-2")
        ledger = cluster.ledger("node-2")
        eps_node = ledger[-1]["epsilon_after"] if ledger else None
        cluster.wait_for(lambda: cluster.has_line("[fedrank] round 2/3"), 240, "round 2 to end")
        # crash the server side (SuperLink, ServerApp, flwr run)
        cluster.kill_server()
        checkpoint = json.loads((cluster.run_dir / "checkpoints" / "latest.json").read_text())
        eps_server = json.loads((cluster.run_dir / "metrics.json").read_text())["rounds"][-1][
            "epsilon_max"]
        first = list(cluster.lines)
        cluster.lines.clear()
        # the server starts again (its database keeps the registrations); node-2 comes back
        cluster.start_server(register=[])
        cluster.start_node("node-2", data=node_data(cluster, "node-2"))
        cluster.submit(config)
        rc = cluster.wait_run(360)
    except Exception as exc:  # noqa: BLE001 - each test that asks reports it
        error = f"{type(exc).__name__}: {exc}\n{cluster.tail()}"
    finally:
        cluster.close()
    return CrashRun(
        cluster=cluster, rc=rc, first_lines=first, eps_before_node_kill=eps_node,
        checkpoint_at_kill=checkpoint, eps_at_server_kill=eps_server,
        leftover=tagged_pids(cluster.tag), error=error,
    )
