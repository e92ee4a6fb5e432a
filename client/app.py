"""The fedrank ClientApp: unpack the message, call `client.node`, pack the reply.

One ClientApp serves both privacy shapes:
- regional: new Message API content ``{"arrays", "config"}`` from FedAvg/FedAdam; the node
  trains with DP-SGD and replies ``{"arrays", "metrics", "node"}`` (metrics: exactly
  ``client.node.REPLY_METRICS``), or an error reply when it refuses (budget spent, or a run
  config weaker than its pinned privacy) or fails (a fixed reason; details stay in the
  node's log). The server logs the reason and carries on without it;
- device: legacy fit content (``fitins.*``) from the SecAgg+ workflow; the update is clipped
  by ``adaptiveclipping_mod`` and masked by ``secaggplus_mod`` before it leaves the node.

Signed releases arrive over Flower (``client.releases``): in a regional train message's
``release`` record (installed before training, so the reply's ``release-round`` reports it),
and, for a run's final release, in a ``query.install_release`` message answered with
``{"metrics": {"release-round": R}}``.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import adaptiveclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.device_mods import (  # poison mods: simulated attackers only (inert otherwise)
    bypass_poison_mod,
    compact_masked_mod,
    compliant_poison_mod,
    dropout_mod,
)
from client.faults import corrupt, fault_mod, fault_of, recording_mod  # test hooks (inert)
from client.node import BudgetRefusal, NodeSettings, torch_threads, train_round
from client.releases import (
    INSTALL_ACTION,
    RELEASE_RECORD,
    install_received_release,
    tamper_spec,
)
from shared_model.settings import RunSettings

log = logging.getLogger("fedrank.node")

# Error codes (Flower reserves small codes for its own errors): a refusal (budget spent, or
# a run config weaker than the node's pinned privacy), and any other failure (fixed reason).
BUDGET_EXHAUSTED = 4001
NODE_FAILED = 4002
LEGACY_FIT_PARAMS = "fitins.parameters"
LEGACY_FIT_CONFIG = "fitins.config"
ROUND_OFFSET = "round-offset"
NODE_RECORD = "node"

# recording_mod: test hook (client/faults.py), a pass-through unless the node config sets
# `record-messages`; app-wide so it sees every reply exactly as it leaves the node.
app = ClientApp(mods=[recording_mod, fault_mod])


def _secaggplus_if_legacy(msg: Message, ctxt: Context, call_next):  # type: ignore[no-untyped-def]
    # Only the legacy SecAgg+ workflow's messages carry its config record.
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def _adaptiveclipping_if_legacy(msg: Message, ctxt: Context, call_next):  # type: ignore[no-untyped-def]
    cfg = msg.content.config_records.get(LEGACY_FIT_CONFIG)
    if cfg is not None and "clipping_norm" in cfg:
        return adaptiveclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


# Order matters: SecAgg+ (outer) must mask the *clipped* update; a simulated device may
# vanish once it has the model (dropout_mod); the masked upload goes out as uint32. A
# simulated malicious device (issue 11) poisons its update after the clip (bypass: its own
# code) or before it (compliant: stock software); both are pass-throughs on any other node.
@app.train(mods=[dropout_mod, compact_masked_mod, _secaggplus_if_legacy, bypass_poison_mod,
                 _adaptiveclipping_if_legacy, compliant_poison_mod])
def train(msg: Message, context: Context) -> Message:
    """Train on this node's clicks and reply with weights + public/DP-protected metrics.

    A refusal (budget, pinned privacy, no new clicks) is an error reply with code
    :data:`BUDGET_EXHAUSTED` and the node's reason. Any other failure is logged here in full
    and answered with :data:`NODE_FAILED` and a fixed reason naming only the exception
    type: exception text can quote file content or paths, which must not leave the node.
    """
    torch_threads(1)
    name = "node"
    try:
        run = RunSettings.from_config(context.run_config)
        node = NodeSettings.from_node_config(context.node_config, run)
        name = node.name
        if LEGACY_FIT_PARAMS in msg.content.array_records:
            return _train_legacy(msg, run, node)
        _receive_release(msg, context, node)
        return _train_regional(msg, context, run, node)
    except BudgetRefusal as refusal:
        return Message(Error(code=BUDGET_EXHAUSTED, reason=str(refusal)), reply_to=msg)
    except Exception as exc:
        log.exception("node %s failed to train", name)
        reason = f"node {name} could not train: {type(exc).__name__} (details in the node's log)"
        return Message(Error(code=NODE_FAILED, reason=reason), reply_to=msg)


def _receive_release(msg: Message, context: Context, node: NodeSettings) -> float | None:
    """Install the release a message carries (``None``: it carries none)."""
    if RELEASE_RECORD not in msg.content:
        return None
    return install_received_release(
        msg.content[RELEASE_RECORD], release_key=node.release_key, state_dir=node.state_dir,
        node_name=node.name, tamper_round=tamper_spec(context.node_config),
    )


@app.query(INSTALL_ACTION)
def install_release(msg: Message, context: Context) -> Message:
    """The run's final release: verify with the pinned key, install, reply the node's round.

    The reply is ``{"metrics": {"release-round": R}}`` (R = the node's current release after
    the attempt; a refused release leaves it where it was and the node's log says why). A
    message without a release record, or a failure, is answered with :data:`NODE_FAILED`
    and a fixed reason.
    """
    name = "node"
    try:
        run = RunSettings.from_config(context.run_config)
        node = NodeSettings.from_node_config(context.node_config, run)
        name = node.name
        installed = _receive_release(msg, context, node)
        if installed is None:
            raise ValueError(f"message has no {RELEASE_RECORD!r} record")
    except Exception as exc:
        log.exception("node %s failed to take a release", name)
        reason = (f"node {name} could not take the release: {type(exc).__name__} (details in "
                  "the node's log)")
        return Message(Error(code=NODE_FAILED, reason=reason), reply_to=msg)
    content = RecordDict({"metrics": MetricRecord({"release-round": installed})})
    return Message(content=content, reply_to=msg)


def _train_regional(
    msg: Message, context: Context, run: RunSettings, node: NodeSettings
) -> Message:
    config = msg.content.config_records["config"]
    server_round = _as_int(config["server-round"]) + _as_int(config.get(ROUND_OFFSET, 0))
    record = msg.content.array_records["arrays"]
    state = record.to_numpy_ndarrays()
    keys = list(record.keys())
    outcome = train_round(
        run=run, node=node, global_state=dict(zip(keys, state, strict=True)),
        server_round=server_round,
    )
    reply_state = outcome.state
    # Test hook (client/faults.py): corrupts the reply only if the node config sets `fault`.
    fault = fault_of(context.node_config)
    if fault is not None:
        reply_state = corrupt(reply_state, fault)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in reply_state.items()}),
            "metrics": MetricRecord(_metric_values(outcome.metrics)),
            # The node's operator-chosen name: a claim only (the server maps Flower node ids).
            NODE_RECORD: ConfigRecord({"name": node.name}),
        }
    )
    return Message(content=content, reply_to=msg)


def _train_legacy(msg: Message, run: RunSettings, node: NodeSettings) -> Message:
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    # Flower's server-side DP noise arrives as float64; the model is float32.
    arrays = [np.asarray(a, dtype=np.float32) for a in parameters_to_ndarrays(fitins.parameters)]
    keys = str(fitins.config.get("keys", "")).split(",")
    server_round = int(fitins.config.get("server-round", 0))
    outcome = train_round(
        run=run, node=node, global_state=dict(zip(keys, arrays, strict=True)),
        server_round=server_round,
    )
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters([outcome.state[k] for k in keys]),
        # Uniform weights: client-level DP's sensitivity (clip / sampled clients) assumes it.
        num_examples=1,
        # No per-client metrics: FitRes metrics are not masked by SecAgg+.
        metrics={},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected an integer in the train config, got {value!r}")
    return int(value)


def _metric_values(metrics: dict[str, float]) -> dict[str, int | float | list[int] | list[float]]:
    return dict(metrics)
