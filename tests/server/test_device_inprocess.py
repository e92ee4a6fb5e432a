"""The device shape's whole round trip in one process, without Ray: Flower's SecAgg+ workflow,
fedrank's ClientApp (clipping, masking, uint32 upload, simulated drop-outs) and the server's
noise and accounting, over a Grid that hands each message straight to the node's ClientApp."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict

from shared_model.world import WorldConfig
from simulations.runner import prepare_run
from simulations.scenarios import Scenario, get_scenario


def _wire(msg: Message) -> Message:
    """A copy as it arrives at the other end (serialized and parsed)."""
    from flwr.common.serde import message_from_proto, message_to_proto

    return message_from_proto(message_to_proto(msg))


class InProcessGrid:
    """A Grid whose nodes are ClientApp calls in this process (each node keeps its Context)."""

    def __init__(self, num_nodes: int, run_config: dict[str, Any]) -> None:
        from client.app import app

        self.app = app
        self.run = SimpleNamespace(run_id=1)
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config={"partition-id": nid - 1},
                         state=RecordDict(), run_config=dict(run_config))
            for nid in range(1, num_nodes + 1)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.__dict__["_src_node_id"] = 0
            nid = msg.metadata.dst_node_id
            # As over the wire: the node gets its own copy (the mods mutate what they get).
            reply = self.app(_wire(msg), self.contexts[nid])
            replies.append(_wire(reply))
        return replies


@pytest.fixture
def task_identity() -> Any:
    from flwr.supercore.task_identity import TaskIdentity

    previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous


def test_secagg_rounds_complete_with_dropouts_and_count_bytes(
    tmp_path: Path, task_identity: Any,
) -> None:
    # Prepare: 16 devices, all sampled each round (SecAgg+ 15 shares, threshold 6), each
    # vanishing with probability 0.2 once it has the model (P(a round cannot be unmasked)
    # ~ 1e-5 per device, P(no drop-out at all in 48 draws) ~ 2e-5).
    from server.device import run_device
    from shared_model.settings import RunSettings

    base = get_scenario("device-1000")
    scenario = Scenario(
        name="device-1000", partition="device", rounds=2,
        world=WorldConfig(num_users=16, num_regions=2, sessions_per_user=8.0, seed=0),
        run_config={**base.run_config, "fraction-train": 1.0},
    )
    settings = prepare_run(scenario, run_dir=tmp_path / "run", rounds=3, epsilon=1.0,
                           dropout=0.2)
    grid = InProcessGrid(scenario.num_nodes, settings.to_config())
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=settings.to_config())
    # Execute
    run_device(grid, context, RunSettings.from_config(settings.to_config()))  # type: ignore[arg-type]
    # Assert
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rows = metrics["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["clients_sampled"] == 16 for r in rows)
    params = metrics["final"]["trainable_params"]
    for row in rows:
        up, down = row["bytes_up_per_client"], row["bytes_down_per_client"]
        assert 4 * params < up < 4 * params + 20_000
        assert 4 * params < down
        # the model part of the upload: uint32, 4 bytes per parameter + a .npy header per array
        assert 4 * params < row["bytes_up_model_per_client"] <= 4 * params + 3 * 200
    assert sum(r["clients_dropped"] for r in rows) > 0
    ledger = [json.loads(line) for line in
              (tmp_path / "run" / "ledger" / "server.jsonl").read_text().splitlines()]
    assert [e["round"] for e in ledger] == [1, 2, 3]
    assert all(e["mechanism"] == "client-level-gaussian" for e in ledger)
