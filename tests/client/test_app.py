"""The ClientApp's replies: exactly the public metric keys, refusals with their reason, and
failures that never carry exception text (file content, paths) to the server."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client.app import BUDGET_EXHAUSTED, NODE_FAILED, train
from client.node import REPLY_METRICS
from shared_model.clicklog import write_click_log
from shared_model.data import DEFAULT_WANDS_DIR
from shared_model.ranker import RankerHead
from shared_model.settings import RunSettings
from shared_model.state import head_state
from shared_model.world import WorldConfig, simulate_click_log


def _message() -> Message:
    arrays = ArrayRecord({k: Array(v) for k, v in head_state(RankerHead()).items()})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train",
    )
    # As a SuperNode hands it over (metadata set): the typed overloads omit this form.
    return Message(content, metadata=metadata)  # type: ignore[call-overload]


def _context(node_config: dict[str, Any], run: RunSettings) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=run.to_config())


def _node_config(tmp_path: Path, data: Path, **privacy: str) -> dict[str, Any]:
    return {
        "node-name": "region-x", "data-path": str(data), "state-dir": str(tmp_path / "state"),
        "catalog-dir": str(DEFAULT_WANDS_DIR), **privacy,
    }


def test_failure_reply_carries_no_file_content_or_path(tmp_path: Path) -> None:
    # Prepare: a "click log" that is not Parquet and holds something secret.
    data = tmp_path / "secret-folder" / "clicks.parquet"
    data.parent.mkdir()
    data.write_text("user 42 searched for SECRET-DIAGNOSIS\n" * 20)
    run = RunSettings(run_dir=str(tmp_path / "run"))
    # Execute
    reply = train(_message(), _context(_node_config(tmp_path, data), run))
    # Assert
    assert reply.has_error() and reply.error.code == NODE_FAILED
    reason = reply.error.reason or ""
    assert "SECRET" not in reason and "secret-folder" not in reason
    assert reason.startswith("node region-x could not train: ")


def test_weaker_run_config_is_refused_with_its_reason(tmp_path: Path) -> None:
    # Prepare: a node pinned to ε ≤ 1 (the default); the server asks for no DP at all.
    run = RunSettings(epsilon=math.inf, run_dir=str(tmp_path / "run"))
    # Execute
    reply = train(_message(), _context(_node_config(tmp_path, tmp_path / "none"), run))
    # Assert
    assert reply.has_error() and reply.error.code == BUDGET_EXHAUSTED
    reason = reply.error.reason or ""
    assert "epsilon=inf" in reason and str(tmp_path) not in reason


def test_reply_metrics_are_exactly_the_contract_keys(tmp_path: Path) -> None:
    # Prepare: a non-private node and run (fast: no σ calibration).
    from shared_model.catalog import cached_feature_builder

    data = tmp_path / "clicks.parquet"
    builder = cached_feature_builder(str(DEFAULT_WANDS_DIR))
    write_click_log(
        simulate_click_log(builder.data, WorldConfig(num_users=40, num_regions=1, seed=1)), data
    )
    run = RunSettings(epsilon=math.inf, run_dir=str(tmp_path / "run"))
    config = _node_config(tmp_path, data, **{"epsilon-budget": "inf"})
    # Execute
    reply = train(_message(), _context(config, run))
    # Assert
    assert not reply.has_error()
    assert set(reply.content) == {"arrays", "metrics", "node"}
    metrics = reply.content.metric_records["metrics"]
    assert tuple(metrics) == REPLY_METRICS
    assert metrics["num-examples"] == 1.0 and metrics["epsilon"] == 1e9
