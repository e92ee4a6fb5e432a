"""The privacy audit of a run: ``RUN_DIR/audit.json`` and a self-contained ``RUN_DIR/audit.html``.

:func:`build_audit` gathers, from the run directory alone (``config.json``, ``metrics.json``,
``ledger/*.jsonl``): epsilon per node and round against the budget, NDCG@10 per round, the DP
parameters of each node, the unit of privacy and neighbouring relation in words, the code
version, a hash of the configuration, the result of :func:`privacy.verify.verify_run` and the
caveats that apply. :func:`write_audit` writes it as JSON and as one offline HTML page (inline
CSS, plots as base64 PNG data URIs, no scripts, no external links).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import html
import io
import json
import math
import subprocess
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from privacy.verify import (
    EventRow,
    VerifyReport,
    config_budget,
    load_json,
    to_jsonable,
    verify_run,
)

__all__ = [
    "AUDIT_HTML",
    "AUDIT_JSON",
    "CANARIES_JSON",
    "CAVEAT_CLIENT_LEVEL",
    "CAVEAT_EVALUATION",
    "CAVEAT_RDP_UPPER_BOUND",
    "CAVEAT_SECAGG",
    "CAVEAT_SECURE_MODE",
    "CAVEAT_UNPINNED_KEYS",
    "THREAT_MODEL",
    "build_audit",
    "per_user_epsilon",
    "code_version",
    "config_hash",
    "render_html",
    "write_audit",
]

AUDIT_JSON = "audit.json"
AUDIT_HTML = "audit.html"

CAVEAT_SECURE_MODE = (
    "Opacus secure_mode is off (PyPI has no torchcsprng): DP-SGD noise is drawn by torch's "
    "generator, seeded on the node from the OS CSPRNG afresh per node and round, so it is "
    "unpredictable from anything public, but the generator itself is not cryptographic."
)
CAVEAT_EVALUATION = "ε accounts only for the training clicks; evaluation uses public judgments."
CAVEAT_RDP_UPPER_BOUND = (
    "RDP accounting is an upper bound: the true ε of the mechanism is at most the reported value."
)
_PLD_NOTE = " The PLD reference ε in the table is a tighter bound for the same mechanism."
CAVEAT_SECAGG = (
    "SecAgg+ hides individual updates from the server; the adaptive-clipping bit per client "
    "is sent in the clear (outside SecAgg+), and the server sees the clipped sum before it "
    "adds the noise: client-level DP protects the released model, not the sum, from the server."
)
CAVEAT_NO_SECAGG = (
    "SecAgg+ is off in this run: the server sees each client's clipped update before adding "
    "noise, so client-level DP protects the released model, not the updates, from the server."
)
CAVEAT_CLIENT_LEVEL = (
    "Client-level ε is stated under the sampling and neighbouring relation on each ledger line; "
    "under fixed-size sampling without replacement and replace-one, replacing a client moves "
    "the clipped sum by 2C, so it is accounted (and recomputed) with noise multiplier z/2. "
    "A replace-one ε is not directly comparable with an add/remove-one ε."
)
CAVEAT_UNPINNED_KEYS = (
    "Ledger signatures were checked against the keys published in the run directory, not "
    "against keys pinned by the auditor (fedrank audit verify RUN_DIR --trusted-keys DIR): "
    "they show that each ledger has one writer, not who that writer is."
)
CAVEAT_TRUNCATION = (
    "The hash chain shows edited, deleted, inserted or reordered ledger lines, but not lines "
    "cut off the end of a ledger: compare each ledger's head hash with a copy kept elsewhere."
)
CAVEAT_NON_PRIVATE = "This run is non-private (ε = ∞): no differential-privacy guarantee."
CAVEAT_REFUSALS = (
    "Refused rounds were not trained: the node (or, for region caps, the server) skipped them "
    "because they would have taken ε past its budget; they cost no privacy."
)


THREAT_MODEL: tuple[tuple[str, str], ...] = (
    (
        "The server",
        "Regional shape: receives each node's head after DP-SGD on the node (per-user "
        "clipping, Gaussian noise σC on every step), plus only public or DP-protected values: "
        "steps (a function of the plan and of ceil(n/B)), the node's ε, its release round and "
        "a name claim; num-examples is the constant 1. What it can learn about one user is "
        "bounded by that user's node's (ε, δ), whatever model and run config it sends: a run "
        "config weaker than the node's pinned settings is refused, and a node never passes its "
        "budget. Device shape: the server adds the noise itself (central DP). With SecAgg+ it "
        "sees only the sum of the sampled devices' clipped updates, but before noise, plus "
        "each device's clipped-count bit in the clear; without SecAgg+ it sees every clipped "
        "update. Against the server, the device shape protects individual updates only "
        "through SecAgg+, not through DP.",
    ),
    (
        "A node",
        "Holds its own users' raw clicks (it is trusted with them) and receives the global "
        "model each round: an aggregate of the other nodes' DP-protected heads, so what it "
        "learns about another node's users is bounded by that node's ε. It cannot read other "
        "nodes' ledgers' keys or noise.",
    ),
    (
        "Other nodes and devices",
        "See the global model (post-processing of DP outputs) and, in the device shape, "
        "SecAgg+ masked shares, which reveal nothing unless at least the reconstruction "
        "threshold of its peers collude with the server.",
    ),
    (
        "Someone holding a release",
        "A release is post-processing of the DP training: it reveals about one user at most "
        "the per-user ε of this audit (see 'Per-user ε'). Releases are signed by the server's "
        "Ed25519 key, which proves origin and integrity, not privacy.",
    ),
    (
        "The auditor",
        "Sees config.json, the nodes' plans and signed ledgers: σ, q = 1/ceil(n/B) (so each "
        "node's user count to within a batch), steps, clip, δ and ε; no user data and no user "
        "ids.",
    ),
    (
        "Trusted",
        "(1) Each node's code and host: noise and Poisson sampling are drawn on the node from "
        "generators seeded from the OS CSPRNG, fresh per node and round (never from run "
        "config). (2) Node-pinned privacy settings (ε budget, δ, clip norm, sessions per user, "
        "privacy shape) in the node's own configuration; the effective budget is "
        "min(node's, run's). (3) Replies carry only DP-protected or public values. (4) Device "
        "shape: the server adds the noise; Flower's SecAgg+ hides individual updates from it, "
        "but the clipped-count bit per device travels outside SecAgg+. (5) Each writer's "
        "ledger signing key (0600, in a 0700 folder) and, for the audit to identify writers, "
        "keys pinned out of band. (6) The server's release signing key; nodes install only "
        "releases verified with its pinned public key. (7) Opacus' RDP accountant on nodes, "
        "re-checked here with Google's dp_accounting.",
    ),
    (
        "A device's personal state",
        "Personalization (issue 14) keeps, on the user's device only, a state learned from the "
        "user's own clicks (shared_model/personal.py): click mass per product category, a user "
        "vector (float16 decayed sum of clicked products' embeddings), up to 64 query texts "
        "with per-query click/skip memory and the last 32 clicked product ids; JSON, at most "
        "64 KiB, in memory or a 0600 file. It never enters a model update, a reply or any "
        "other message: no node or server code imports it, and a node's reply with a personal "
        "state present holds exactly the contract's keys and none of its content (both "
        "tested). It is not DP-protected; it is protected by never leaving the device.",
    ),
    (
        "Not defended",
        "A node misusing its own users' data; a server publishing a wrong model (integrity of "
        "training); ledger lines cut off the end without an external head hash; timing and "
        "participation metadata (which nodes take part in which round).",
    ),
)
"""What each party can learn and what is trusted (also README.md, "Threat model")."""

PARTITION_ONE_NODE = (
    "Every user's clicks live at one node: the regional partition splits the click log by "
    "region_id (shared_model/partition.py) and the simulator gives each user one home region "
    "for all of their sessions (shared_model/clicks.py). A user's ε is then their node's, so "
    "the maximum over nodes bounds every user. A user with data at several nodes (possible in "
    "a deployment where users move between regions; the ledgers carry no user ids, so the "
    "audit cannot see it) pays the sum of those nodes' ε and δ (basic composition), at most "
    "the sum over all nodes, reported beside it."
)
PARTITION_DEVICE = (
    "Device shape: one user is one device (the device partition is by user_id), so the "
    "server's client-level ε is the per-user ε."
)

_UNIT_WORDS = {
    "user": (
        "User-level differential privacy at each node (region): neighbouring datasets differ "
        "by adding or removing one user's whole click history at a node; every user's clicks "
        "live at one node, so each node's ε bounds what the run reveals about any one user."
    ),
    "client": (
        "Client-level differential privacy (device shape): neighbouring populations differ by "
        "replacing one client (device) — all of its data — with another; clients are sampled "
        "without replacement each round and the server clips and noises the aggregate."
    ),
}


# --------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------
def code_version() -> dict[str, str]:
    """``{"git_commit": ..., "fedrank_version": ...}`` (``"unknown"`` where unavailable)."""
    commit = "unknown"
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if result.returncode == 0 and result.stdout.strip():
            commit = result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    version = "unknown"
    with contextlib.suppress(PackageNotFoundError):
        version = package_version("fedrank")
    return {"git_commit": commit, "fedrank_version": version}


def config_hash(config: Any) -> str:
    """sha256 hex of the canonical JSON of the config (sorted keys, no spaces, strict JSON:
    non-finite floats as the strings ``"inf"``/``"-inf"``/``"nan"``, as in the ledger)."""
    text = json.dumps(to_jsonable(config), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# the audit dict
# --------------------------------------------------------------------------------------------
def _distinct(values: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out and not (isinstance(v, float) and math.isnan(v)):
            out.append(v)
    return out


def _one_or_many(values: Sequence[Any]) -> Any:
    distinct = _distinct(values)
    if not distinct:
        return None
    return distinct[0] if len(distinct) == 1 else distinct


# Server-ledger lines that record what aggregation did to a node's update (issue 11:
# rejected, clipped, down-weighted by the robust rule; ``server.validation.aggregation_events``).
# They are ``refusal`` lines (no steps, no ε spent: verify checks them as chain-only) whose
# detail starts with this prefix; the audit lists them in their own section.
AGGREGATION_DETAIL_PREFIX = "aggregation: "


def is_aggregation_action(row: EventRow) -> bool:
    """Whether a ledger row records an aggregation action (not a node's refused round)."""
    return row.mechanism == "refusal" and (row.detail or "").startswith(
        AGGREGATION_DETAIL_PREFIX)


def aggregation_actions(report: VerifyReport) -> list[dict[str, Any]]:
    """Per round, the nodes whose update the server rejected, clipped or down-weighted."""
    return [
        {"round": r.round, "node": r.node,
         "action": (r.detail or "")[len(AGGREGATION_DETAIL_PREFIX):], "file": r.file,
         "line": r.line}
        for r in report.rows if is_aggregation_action(r)
    ]


def _node_table(report: VerifyReport) -> list[dict[str, Any]]:
    by_node: dict[str, list[EventRow]] = {}
    for row in report.rows:
        if is_aggregation_action(row):
            continue  # listed under "Updates rejected, clipped or down-weighted"
        by_node.setdefault(row.node, []).append(row)
    table = []
    for node in sorted(by_node):
        rows = by_node[node]
        spent = [r for r in rows if r.mechanism != "refusal"]
        refusals = [r for r in rows if r.mechanism == "refusal"]
        steps_per_round: dict[int, int] = {}
        for r in spent:
            steps_per_round[r.round] = steps_per_round.get(r.round, 0) + r.steps
        # epsilon after each round = the last event of that round
        series: dict[int, float] = {}
        recomputed: dict[int, float | None] = {}
        for r in spent:
            series[r.round] = r.claimed_epsilon
            recomputed[r.round] = r.recomputed_epsilon
        final = spent[-1] if spent else None
        table.append(
            {
                "node": node,
                "files": _distinct([r.file for r in rows]),
                "mechanism": _one_or_many([r.mechanism for r in spent]) or "refusal",
                "unit_of_privacy": _one_or_many([r.unit_of_privacy for r in rows]),
                "noise_multiplier": _one_or_many([r.noise_multiplier for r in spent]),
                "sample_rate": _one_or_many([r.sample_rate for r in spent]),
                "steps_per_round": _one_or_many(list(steps_per_round.values())),
                "clip_norm": _one_or_many([r.clip_norm for r in spent]),
                "delta": _one_or_many([r.delta for r in rows]),
                "accountant": _one_or_many([r.accountant for r in spent]),
                "rounds": sorted(steps_per_round),
                "epsilon_per_round": [[k, v] for k, v in sorted(series.items())],
                "recomputed_epsilon_per_round": [[k, v] for k, v in sorted(recomputed.items())],
                "final_epsilon": final.claimed_epsilon if final else None,
                "final_recomputed_epsilon": final.recomputed_epsilon if final else None,
                "recompute_method": final.method if final else None,
                "pld_reference_epsilon": report.reference_epsilon.get(node),
                "refusals": len(refusals),
                "refused_rounds": sorted({r.round for r in refusals}),
            }
        )
    return table


def _metrics_rounds(metrics: Any) -> list[dict[str, Any]]:
    if not isinstance(metrics, dict) or not isinstance(metrics.get("rounds"), list):
        return []
    return [r for r in metrics["rounds"] if isinstance(r, dict)]


def _caveats(report: VerifyReport, config: dict[str, Any], budget: float | None) -> list[str]:
    mechanisms = {r.mechanism for r in report.rows}
    accountants = {r.accountant for r in report.rows if r.mechanism != "refusal"}
    device = config.get("privacy-shape") == "device" or "client-level-gaussian" in mechanisms
    caveats: list[str] = []
    if budget is not None and math.isinf(budget):
        caveats.append(CAVEAT_NON_PRIVATE)
    if "dp-sgd" in mechanisms or not device:
        caveats.append(CAVEAT_SECURE_MODE)
    caveats.append(CAVEAT_EVALUATION)
    if mechanisms - {"refusal"} or accountants:
        caveats.append(CAVEAT_RDP_UPPER_BOUND + (_PLD_NOTE if report.reference_epsilon else ""))
    if device:
        secagg = config.get("secagg")
        caveats.append(CAVEAT_SECAGG if secagg in (True, "true", 1) else CAVEAT_NO_SECAGG)
        if "rdp-wor" in accountants:
            caveats.append(CAVEAT_CLIENT_LEVEL)
    if "refusal" in mechanisms:
        caveats.append(CAVEAT_REFUSALS)
    if report.files:
        caveats.append(CAVEAT_TRUNCATION)
    if any(k.get("source") == "published" for k in report.keys.values()):
        caveats.append(CAVEAT_UNPINNED_KEYS)
    return caveats


def per_user_epsilon(nodes: Sequence[dict[str, Any]], report: VerifyReport) -> dict[str, Any]:
    """Per-user ε across nodes, with the partition it assumes (issue 15, item 7).

    Each node's final ε is the larger of its claim and the recomputation. User-level nodes:
    ``epsilon`` is the maximum over nodes (one node per user, the documented partition);
    ``sum_over_nodes`` / ``sum_delta`` bound a user with data at every node. Client-level
    (device shape): the server's ε.
    """
    by_node: dict[str, float] = {}
    deltas: dict[str, float] = {}
    units: set[str] = set()
    for node in nodes:
        values = [
            float(v)
            for v in (node["final_epsilon"], node["final_recomputed_epsilon"])
            if isinstance(v, (int, float))
        ]
        if not values:
            continue
        by_node[node["node"]] = max(values)
        delta = node["delta"]
        deltas[node["node"]] = float(delta) if isinstance(delta, (int, float)) else math.nan
        units.add(str(node["unit_of_privacy"]))
    device = units == {"client"}
    if not by_node:
        return {"partition": None, "epsilon": None, "statement": "No ε was spent."}
    worst = max(by_node.values())
    total = math.fsum(by_node.values())
    delta_max = max(deltas.values())
    return {
        "partition": "device: one user per client" if device else "one node per user",
        "epsilon": worst,
        "delta": delta_max,
        "max_over_nodes": worst,
        "sum_over_nodes": total,
        "sum_delta": math.fsum(deltas.values()),
        "nodes": len(by_node),
        "per_node": dict(sorted(by_node.items())),
        "statement": PARTITION_DEVICE if device else PARTITION_ONE_NODE,
        "verified": report.ok,
    }


def build_audit(run_dir: Path | str, *, report: VerifyReport | None = None) -> dict[str, Any]:
    """Gather the audit of a run as a JSON-safe dict.

    Parameters
    ----------
    run_dir : path
        The run directory.
    report : VerifyReport, optional
        A verification already run on ``run_dir`` (default: run :func:`verify_run`).

    Returns
    -------
    dict
        Keys ``run_dir``, ``generated_at``, ``code_version``, ``config``, ``config_hash``,
        ``privacy_shape``, ``budget_epsilon``, ``delta``, ``units_of_privacy`` (unit ->
        neighbouring relation in words), ``nodes`` (DP parameters and ε per round, per node),
        ``metrics`` (per round), ``per_user_epsilon`` (:func:`per_user_epsilon`), ``verify``
        (:meth:`VerifyReport.to_dict`), ``threat_model`` and ``caveats``.
        Non-finite floats are the strings ``"inf"``/``"-inf"``/``"nan"``.
    """
    run_path = Path(run_dir)
    if report is None:
        report = verify_run(run_path)
    try:
        config = load_json(run_path / "config.json")
    except (OSError, ValueError):
        config = None
    config = config if isinstance(config, dict) else {}
    try:
        metrics = load_json(run_path / "metrics.json")
    except (OSError, ValueError):
        metrics = None
    budget = config_budget(config)
    nodes = _node_table(report)
    units = sorted({r.unit_of_privacy for r in report.rows})
    if not units:
        units = ["client"] if config.get("privacy-shape") == "device" else ["user"]
    audit = {
        "run_dir": str(run_path),
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "config": config,
        "config_hash": config_hash(config),
        "privacy_shape": config.get("privacy-shape"),
        "budget_epsilon": budget,
        "delta": config.get("delta"),
        "units_of_privacy": {u: _UNIT_WORDS.get(u, u) for u in units},
        "nodes": nodes,
        "metrics": {
            "rounds": _metrics_rounds(metrics),
            "final": metrics.get("final") if isinstance(metrics, dict) else None,
        },
        "per_user_epsilon": per_user_epsilon(nodes, report),
        "aggregation_actions": aggregation_actions(report),
        "verify": report.to_dict(),
        "canaries": _canary_result(run_path),
        "threat_model": [{"party": who, "text": text} for who, text in THREAT_MODEL],
        "caveats": _caveats(report, config, budget),
    }
    return to_jsonable(audit)


CANARIES_JSON = "canaries.json"
"""Where ``fedrank audit canaries ... --json RUN_DIR/canaries.json`` leaves its result for the
audit page to show."""
_CANARY_KEYS = (
    "result", "claimed_epsilon", "epsilon_lower_bound", "confidence", "correct", "guesses",
    "canaries", "runs", "rounds", "positive_control_epsilon_lower_bound", "scenario",
)  # fmt: skip


def _canary_result(run_path: Path) -> dict[str, Any] | None:
    """The canary audit's result (a few public figures) from ``RUN_DIR/canaries.json``."""
    try:
        data = load_json(run_path / CANARIES_JSON)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {k: data[k] for k in _CANARY_KEYS if k in data}


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _as_float(value: Any) -> float:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return float(value) if isinstance(value, (int, float)) else math.nan


def _png_data_uri(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"data:image/png;base64,{encoded}"


def _plots(audit: dict[str, Any]) -> dict[str, str | None]:
    # No pyplot: no global state and no GUI backend; each figure gets its own Agg canvas.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plots: dict[str, str | None] = {"epsilon": None, "ndcg": None}

    series = [n for n in audit["nodes"] if n["epsilon_per_round"]]
    if series:
        fig = Figure(figsize=(7, 3.6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for node in series:
            xs = [p[0] for p in node["epsilon_per_round"]]
            ys = [_as_float(p[1]) for p in node["epsilon_per_round"]]
            ax.plot(xs, ys, marker="o", label=node["node"])
        budget = _as_float(audit["budget_epsilon"])
        if math.isfinite(budget):
            ax.axhline(budget, linestyle="--", color="black", label=f"budget ε = {budget:g}")
        ax.set_xlabel("round")
        ax.set_ylabel("ε (cumulative)")
        ax.set_title("ε per node over rounds")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        plots["epsilon"] = _png_data_uri(fig)

    rounds = [r for r in audit["metrics"]["rounds"] if math.isfinite(_as_float(r.get("ndcg@10")))]
    if rounds:
        fig = Figure(figsize=(7, 3.2))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(
            [r.get("round") for r in rounds],
            [_as_float(r["ndcg@10"]) for r in rounds],
            marker="o",
            color="tab:green",
        )
        ax.set_xlabel("round")
        ax.set_ylabel("NDCG@10")
        ax.set_title("NDCG@10 per round")
        ax.grid(alpha=0.3)
        plots["ndcg"] = _png_data_uri(fig)
    return plots


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .85em; max-width: 100%; }
th, td { border: 1px solid #bbb; padding: .25em .5em; text-align: left;
         overflow-wrap: anywhere; }
img { max-width: 100%; height: auto; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; }
details { margin: .3em 0; } summary { cursor: pointer; }
.summary { border: 1px solid #bbb; padding: .4em 1em; margin: 1em 0; background: #fafafa; }
.summary p { margin: .3em 0; }
.inconclusive { color: #8a5a00; font-weight: bold; }
th { background: #eee; }
code { background: #f4f4f4; padding: 0 .2em; }
.pass { color: #176117; font-weight: bold; } .fail { color: #a11; font-weight: bold; }
.muted { color: #666; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return ", ".join(_num(v, digits) for v in value)
    if isinstance(value, str):
        return {"inf": "∞", "-inf": "-∞"}.get(value, _esc(value))
    if isinstance(value, bool):
        return _esc(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3g}"
        return f"{value:.{digits}f}"
    return _esc(value)


def _eps(value: Any) -> str:
    return _num(value, 4)


_SHOWN_PROBLEMS = 10


def _outcome_box(audit: dict[str, Any]) -> list[str]:
    """The verification outcome and the canary audit's result, first thing on the page."""
    verify = audit["verify"]
    verdict = "pass" if verify["ok"] else "fail"
    out = [
        '<div class="summary" id="outcome">',
        f'<p>Verification: <span class="{verdict}">{_esc(verify["summary"])}</span> '
        '<a href="#verification">details</a></p>',
    ]
    canary = audit.get("canaries")
    if canary:
        result = str(canary.get("result", "unknown"))
        cls = {"pass": "pass", "fail": "fail"}.get(result, "inconclusive")
        out.append(
            f'<p>Canary audit: <span class="{cls}">{_esc(result.upper())}</span> — empirical '
            f"lower bound ε ≥ {_eps(canary.get('epsilon_lower_bound'))} against the claimed "
            f"{_eps(canary.get('claimed_epsilon'))} ({_esc(canary.get('correct', '–'))}/"
            f"{_esc(canary.get('guesses', '–'))} guesses correct; positive control σ=0: "
            f"{_eps(canary.get('positive_control_epsilon_lower_bound'))})</p>"
        )
    else:
        out.append(
            '<p class="muted">Canary audit: none in this run directory (run '
            "<code>fedrank audit canaries SCENARIO --epsilon E --json "
            f"RUN_DIR/{CANARIES_JSON}</code>, then the audit again).</p>"
        )
    out.append("</div>")
    return out


def render_html(audit: dict[str, Any]) -> str:
    """The audit as one self-contained HTML page (inline CSS and images, no scripts/links)."""
    plots = _plots(audit)
    verify = audit["verify"]
    code = audit["code_version"]
    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>fedrank privacy audit — {_esc(audit['run_dir'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Privacy audit of <code>{_esc(audit['run_dir'])}</code></h1>",
        '<table class="meta">',
        f"<tr><th>generated</th><td>{_esc(audit['generated_at'])}</td></tr>",
        f"<tr><th>code version</th><td>git <code>{_esc(code['git_commit'])}</code>, "
        f"fedrank {_esc(code['fedrank_version'])}</td></tr>",
        f"<tr><th>config hash (sha256)</th><td><code>{_esc(audit['config_hash'])}</code></td></tr>",
        f"<tr><th>privacy shape</th><td>{_esc(audit['privacy_shape'] or 'unknown')}</td></tr>",
        f"<tr><th>budget ε per node</th><td>{_eps(audit['budget_epsilon'])}</td></tr>",
        f"<tr><th>δ</th><td>{_num(audit['delta'])}</td></tr>",
        "</table>",
    ]
    parts += _outcome_box(audit)

    verdict = "pass" if verify["ok"] else "fail"
    parts += [
        '<h2 id="verification">Verification</h2>',
        f'<p class="{verdict}">{_esc(verify["summary"])}</p>',
        '<p class="muted">Hash chains re-walked; every line\'s Ed25519 signature checked '
        "against its writer's key; every line cross-checked against config.json and the "
        "node's privacy plan (σ, clip, δ, q = 1/k and steps = local-epochs × k, budget, "
        "rounds); every claimed ε recomputed from the ledger parameters with Google's "
        "dp_accounting (not the accountant used in training); a claim more than "
        f"{verify['tolerance']:.0%} below the recomputation fails.</p>",
    ]
    if verify["problems"]:
        problems = [f"<li><code>{_esc(p['text'])}</code></li>" for p in verify["problems"]]
        parts += ["<ul>", *problems[:_SHOWN_PROBLEMS], "</ul>"]
        if len(problems) > _SHOWN_PROBLEMS:
            parts += [f"<details><summary>{len(problems) - _SHOWN_PROBLEMS} more "
                      "problem(s)</summary><ul>", *problems[_SHOWN_PROBLEMS:], "</ul></details>"]
    keys = verify.get("keys") or {}
    if keys:
        parts.append("<table><tr><th>ledger</th><th>writer</th><th>key id</th><th>key</th></tr>")
        for file, key in keys.items():
            key_id = key.get("key_id")
            parts.append(
                f"<tr><td><code>{_esc(file)}</code></td><td>{_esc(key.get('writer'))}</td>"
                f"<td><code>{_esc(key_id[:16] + '…' if key_id else '–')}</code></td>"
                f"<td>{_esc(key.get('source'))}</td></tr>"
            )
        parts.append("</table>")
    for note in verify.get("notes") or []:
        parts.append(f'<p class="muted">{_esc(note)}</p>')

    parts.append("<h2>Unit of privacy and neighbouring relation</h2><ul>")
    parts += [
        f"<li><b>{_esc(unit)}</b>: {_esc(words)}</li>"
        for unit, words in audit["units_of_privacy"].items()
    ]
    parts.append("</ul>")

    parts.append("<h2>ε per node</h2>")
    if plots["epsilon"]:
        parts.append(f'<img alt="epsilon per node over rounds" src="{plots["epsilon"]}">')
    else:
        parts.append('<p class="muted">No ε was spent (no DP events in the ledgers).</p>')

    parts += [
        "<h2>DP parameters per node</h2>",
        "<table><tr><th>node</th><th>mechanism</th><th>unit</th><th>σ (noise multiplier)</th>"
        "<th>q (sample rate)</th><th>steps/round</th><th>clip</th><th>δ</th>"
        "<th>accountant</th><th>rounds</th><th>final ε (claimed)</th><th>final ε (recomputed)"
        "</th><th>PLD reference ε</th><th>refusals</th></tr>",
    ]
    for node in audit["nodes"]:
        refused = node["refused_rounds"]
        refusals = f"{node['refusals']}" + (
            f" (rounds {', '.join(str(r) for r in refused)})" if refused else ""
        )
        parts.append(
            "<tr>"
            f"<td>{_esc(node['node'])}</td><td>{_esc(node['mechanism'])}</td>"
            f"<td>{_esc(node['unit_of_privacy'])}</td>"
            f"<td>{_num(node['noise_multiplier'])}</td><td>{_num(node['sample_rate'])}</td>"
            f"<td>{_num(node['steps_per_round'])}</td><td>{_num(node['clip_norm'])}</td>"
            f"<td>{_num(node['delta'])}</td><td>{_esc(node['accountant'] or '–')}</td>"
            f"<td>{len(node['rounds'])}</td>"
            f"<td>{_eps(node['final_epsilon'])}</td>"
            f"<td>{_eps(node['final_recomputed_epsilon'])}</td>"
            f"<td>{_eps(node['pld_reference_epsilon'])}</td>"
            f"<td>{_esc(refusals)}</td></tr>"
        )
    parts.append("</table>")

    per_user = audit.get("per_user_epsilon") or {}
    parts.append('<h2 id="per-user-epsilon">Per-user ε</h2>')
    if per_user.get("epsilon") is None:
        parts.append(f'<p class="muted">{_esc(per_user.get("statement", "–"))}</p>')
    else:
        parts += [
            "<table>",
            f"<tr><th>partition</th><td>{_esc(per_user['partition'])}</td></tr>",
            f"<tr><th>per-user ε (this partition)</th><td>{_eps(per_user['epsilon'])} "
            f"at δ = {_num(per_user['delta'])}</td></tr>",
            f"<tr><th>max over nodes</th><td>{_eps(per_user['max_over_nodes'])}</td></tr>",
            f"<tr><th>sum over nodes (a user at every node)</th>"
            f"<td>{_eps(per_user['sum_over_nodes'])} at δ = {_num(per_user['sum_delta'])}"
            "</td></tr>",
            "</table>",
            f"<p>{_esc(per_user['statement'])}</p>",
        ]

    actions = audit.get("aggregation_actions") or []
    parts.append('<h2 id="aggregation-actions">Updates rejected, clipped or down-weighted</h2>')
    if actions:
        parts.append("<table><tr><th>round</th><th>node</th><th>what the server did</th></tr>")
        parts += [f"<tr><td>{_esc(a['round'])}</td><td>{_esc(a['node'])}</td>"
                  f"<td>{_esc(a['action'])}</td></tr>" for a in actions]
        parts.append("</table>")
    else:
        parts.append('<p class="muted">None recorded in the server ledger: every update was '
                     "used as sent.</p>")

    parts.append('<h2 id="epsilon-per-round">ε per round</h2>'
                 '<p class="muted">One entry per node; click it for its rounds.</p>')
    for node in audit["nodes"]:
        recomputed = {k: v for k, v in node["recomputed_epsilon_per_round"]}
        rows = node["epsilon_per_round"]
        parts.append(
            f"<details><summary><b>{_esc(node['node'])}</b>: {len(rows)} round(s), final ε "
            f"{_eps(node['final_epsilon'])} claimed, {_eps(node['final_recomputed_epsilon'])} "
            "recomputed</summary>"
            "<table><tr><th>round</th><th>ε claimed</th><th>ε recomputed</th></tr>"
        )
        for round_, eps in rows:
            parts.append(
                f"<tr><td>{round_}</td><td>{_eps(eps)}</td>"
                f"<td>{_eps(recomputed.get(round_))}</td></tr>"
            )
        parts.append("</table></details>")

    parts.append("<h2>Ranking quality</h2>")
    if plots["ndcg"]:
        parts.append(f'<img alt="NDCG@10 per round" src="{plots["ndcg"]}">')
    else:
        parts.append('<p class="muted">No per-round NDCG@10 in metrics.json.</p>')
    final = audit["metrics"].get("final")
    if isinstance(final, dict) and final:
        parts.append("<table><tr>")
        parts += [f"<th>{_esc(k)}</th>" for k in final]
        parts.append("</tr><tr>")
        parts += [f"<td>{_num(v)}</td>" for v in final.values()]
        parts.append("</tr></table>")

    parts.append('<h2 id="threat-model">Threat model</h2><dl>')
    for item in audit.get("threat_model") or []:
        parts.append(f"<dt><b>{_esc(item['party'])}</b></dt><dd>{_esc(item['text'])}</dd>")
    parts.append("</dl>")

    parts.append("<h2>Caveats</h2><ul>")
    parts += [f"<li>{_esc(c)}</li>" for c in audit["caveats"]]
    parts.append("</ul>")

    parts += [
        "<h2>Configuration</h2>",
        f"<pre>{_esc(json.dumps(audit['config'], indent=1, sort_keys=True))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_audit(run_dir: Path | str, *, report: VerifyReport | None = None) -> tuple[Path, Path]:
    """Write ``RUN_DIR/audit.html`` and ``RUN_DIR/audit.json``.

    Parameters
    ----------
    run_dir : path
        The run directory.
    report : VerifyReport, optional
        A verification already run on ``run_dir`` (default: run :func:`verify_run`).

    Returns
    -------
    tuple of Path
        ``(html_path, json_path)``.
    """
    run_path = Path(run_dir)
    audit = build_audit(run_path, report=report)
    json_path = run_path / AUDIT_JSON
    html_path = run_path / AUDIT_HTML
    json_path.write_text(
        json.dumps(audit, indent=1, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8"
    )
    html_path.write_text(render_html(audit), encoding="utf-8")
    return html_path, json_path
