"""``fedrank dashboard RUN_DIR``: a read-only live page over a run directory.

:func:`collect_state` reads only aggregate, public files of a run directory — ``config.json``
(a few whitelisted keys), ``metrics.json`` (per-round quality, seen/unseen views, baselines,
the server's per-round reply summary), ``ledger/*.jsonl`` (ε per node and round, refusals),
``releases/round-*/manifest.json`` (+ signature check against the server's public key) and,
for runs whose metrics do not carry reply summaries, the server's warnings in ``flower.log``.
It never opens node data (``data/``), node state (``nodes/``) or checkpoints, so the page
shows no click data and no per-user value. Every string that came from a file is bounded
here and rendered by the page as text (``textContent``), never as markup.

:func:`build_app` serves the page (Starlette): ``/`` (HTML), ``/api/state`` (JSON),
``/static/*`` (the page's script and style, and plotly.js from the ``plotly`` package — no
CDN). The page polls ``/api/state`` and redraws with ``Plotly.react``.

Access: bound to a loopback address the page needs no token (unless one is given), and the
``Host`` header must name a loopback host (no DNS rebinding). Bound to any other address
every request needs the token — as ``?token=`` (which also sets an HttpOnly, SameSite=Strict
cookie for the page's own requests), a ``fedrank_dashboard`` cookie or
``Authorization: Bearer`` — loopback requests included; anything else gets 401.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "COOKIE",
    "DEFAULT_PORT",
    "build_app",
    "collect_state",
    "dashboard_url",
    "is_loopback",
    "key_fingerprint",
    "make_server",
]

DEFAULT_PORT = 8050
COOKIE = "fedrank_dashboard"
MAX_NAME = 64
MAX_TEXT = 300
MAX_REPLIES = 200
MAX_NODES = 1000
LOG_TAIL_BYTES = 2 << 20
NON_PRIVATE_EPS = 1e9  # a node reporting this (or more) is non-private (contract)
METRICS = ("ndcg@10", "mrr", "auc")
VIEWS = ("unseen", "seen")
CONFIG_KEYS = (
    "scenario", "privacy-shape", "strategy", "num-server-rounds", "epsilon", "delta",
    "clip-norm", "max-sessions-per-user", "region-epsilon-caps", "release-every", "secagg",
    "online", "eval-fold",
)  # fmt: skip
_LOG_REJECTED = re.compile(
    r"round (\d+): rejected reply from node (\S+?)(?: \(([^)]{0,200})\))?: (.*)$"
)
_LOG_NO_UPDATE = re.compile(
    r"round (\d+): node (\S+?)(?: \(([^)]{0,200})\))? sent no update: (.*)$"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# --------------------------------------------------------------------------------------------
# reading the run directory
# --------------------------------------------------------------------------------------------
def _text(value: Any, limit: int = MAX_TEXT) -> str:
    """A bounded, single-line string (control characters replaced)."""
    text = _CONTROL.sub("?", str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(value: Any) -> float | str | None:
    """A finite float, ``"inf"`` for +∞ (or a non-private ε), or ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, int | float):
        return None
    value = float(value)
    if math.isnan(value):
        return None
    if math.isinf(value) or value >= NON_PRIVATE_EPS:
        return "inf" if value > 0 else None
    return value


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _metric_map(obj: Any) -> dict[str, float]:
    if not isinstance(obj, Mapping):
        return {}
    out = {}
    for metric in METRICS:
        value = _num(obj.get(metric))
        if isinstance(value, float):
            out[metric] = value
    return out


def _round_row(row: Mapping[str, Any]) -> dict[str, Any] | None:
    rnd = row.get("round")
    if not isinstance(rnd, int) or isinstance(rnd, bool):
        return None
    out: dict[str, Any] = {"round": rnd, **_metric_map(row)}
    for key in ("epsilon_max", "seconds"):
        value = _num(row.get(key))
        if value is not None:
            out[key] = value
    views = {v: _metric_map(row.get(v)) for v in VIEWS if isinstance(row.get(v), Mapping)}
    if views:
        out["views"] = views
    return out


def _baselines(obj: Any) -> dict[str, dict[str, dict[str, float]]]:
    """``{name: {view: {metric: value}}}``; a flat ``{name: {metric: value}}`` is the unseen
    view (the flat metrics are the held-out queries)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    if not isinstance(obj, Mapping):
        return out
    for name, value in list(obj.items())[:20]:
        if not isinstance(value, Mapping):
            continue
        views = {v: _metric_map(value[v]) for v in VIEWS if isinstance(value.get(v), Mapping)}
        if not views and _metric_map(value):
            views = {"unseen": _metric_map(value)}
        if views:
            out[_text(name, MAX_NAME)] = views
    return out


def _reply_reason(kind: str, item: Mapping[str, Any]) -> str:
    """One line on what the server did with a reply (metrics.json ``replies`` entries)."""
    if kind == "clipped":
        norm = _num(item.get("norm"))
        return f"update norm {norm:.4g} clipped" if isinstance(norm, float) else ""
    if kind == "downweighted":
        share = _num(item.get("kept_share"))
        kept = f"{100 * share:.0f}%" if isinstance(share, float) else "?"
        return f"{item.get('rule', 'robust rule')} kept {kept} of the update"
    if kind == "evidence":
        return (f"evidence clicks capped to the other nodes' rates on "
                f"{item.get('pairs', '?')} pair(s)")
    return str(item.get("reason", ""))


def _replies_from_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for row in rows:
        replies = row.get("replies")
        rnd = row.get("round")
        if not isinstance(replies, Mapping) or not isinstance(rnd, int):
            continue
        for kind in ("rejected", "refused", "clipped", "downweighted", "evidence"):
            items = replies.get(kind)
            if not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, Mapping):
                    continue
                if kind == "evidence" and item.get("action") != "rate-clamped":
                    continue  # bounded / dropped evidence: shown in the audit report
                node = item.get("node") or f"node-{item.get('node_id', '?')}"
                reason = _reply_reason(kind, item)
                out.append({"round": rnd, "kind": kind, "node": _text(node, MAX_NAME),
                            "reason": _text(reason)})  # fmt: skip
    return out


def _replies_from_log(path: Path) -> list[dict[str, Any]]:
    """The server's "rejected reply" / "sent no update" warnings (older metrics files)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - LOG_TAIL_BYTES))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    out = []
    for line in data.splitlines():
        for pattern, kind in ((_LOG_REJECTED, "rejected"), (_LOG_NO_UPDATE, "refused")):
            match = pattern.search(line)
            if match:
                rnd, node, name, reason = match.groups()
                out.append({"round": int(rnd), "kind": kind, "node": _text(name or node, MAX_NAME),
                            "reason": _text(reason)})  # fmt: skip
                break
    return out


def _ledger_events(ledger_dir: Path) -> list[dict[str, Any]]:
    """Every readable ledger line (a line being written, or a broken one, is skipped: the
    dashboard is a view; ``fedrank audit verify`` is the check)."""
    events: list[dict[str, Any]] = []
    if not ledger_dir.is_dir():
        return events
    for path in sorted(ledger_dir.glob("*.jsonl")):
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("node"), str):
                events.append(record)
    return events


def _caps(text: Any) -> dict[str, float]:
    caps: dict[str, float] = {}
    for item in str(text or "").split(","):
        name, sep, value = item.strip().partition("=")
        cap = _num(value) if sep else None
        if name.strip() and isinstance(cap, float):
            caps[name.strip()] = cap
    return caps


def _min_eps(a: float | str | None, b: float | str | None) -> float | str | None:
    values = [v for v in (a, b) if isinstance(v, float)]
    if values:
        return min(values)
    return "inf" if "inf" in (a, b) else None


def _nodes(
    events: list[dict[str, Any]],
    replies: list[dict[str, Any]],
    *,
    budget: float | str | None,
    caps: Mapping[str, float],
    rounds_done: int,
) -> list[dict[str, Any]]:
    nodes: dict[str, dict[str, Any]] = {}

    def node(name: str) -> dict[str, Any]:
        key = _text(name, MAX_NAME)
        if key not in nodes and len(nodes) < MAX_NODES:
            nodes[key] = {
                "name": key, "epsilon": [], "refusals": [], "epsilon_now": None,
                "budget": _min_eps(budget, caps.get(name)), "cap": caps.get(name),
                "last": None,
            }  # fmt: skip
        return nodes.get(key, {"epsilon": [], "refusals": [], "last": None})

    for name in caps:
        node(name)
    for event in sorted(events, key=lambda e: (e.get("round", 0), e.get("seq", 0))):
        rnd = event.get("round")
        if not isinstance(rnd, int):
            continue
        entry = node(event["node"])
        eps = _num(event.get("epsilon_after"))
        mechanism = _text(event.get("mechanism", ""), 40)
        if mechanism == "refusal":
            detail = _text(event.get("detail") or "refused")
            entry["refusals"].append({"round": rnd, "detail": detail})
            last = {"round": rnd, "kind": "refused", "detail": detail}
        else:
            if eps is not None:
                entry["epsilon"].append([rnd, eps])
                entry["epsilon_now"] = eps
            last = {"round": rnd, "kind": "trained", "detail": mechanism}
        if entry["last"] is None or rnd >= entry["last"]["round"]:
            entry["last"] = last
    for reply in replies:
        entry = node(reply["node"])
        if reply["kind"] in ("clipped", "downweighted", "evidence"):
            continue  # the node replied and trained; the server bounded what it sent
        if entry["last"] is None or reply["round"] >= entry["last"]["round"]:
            kind = "reply rejected" if reply["kind"] == "rejected" else "refused"
            entry["last"] = {"round": reply["round"], "kind": kind, "detail": reply["reason"]}
    out = []
    for entry in nodes.values():
        out.append({**entry, "status": _status(entry, rounds_done)})
    return sorted(out, key=lambda e: e["name"])


def _status(entry: Mapping[str, Any], rounds_done: int) -> str:
    last = entry.get("last")
    eps, budget = entry.get("epsilon_now"), entry.get("budget")
    spent = isinstance(eps, float) and isinstance(budget, float) and eps >= budget * 0.999
    if last is None:
        return "no reply yet"
    if last["kind"] == "refused":
        detail = str(last.get("detail", "")).lower()
        if "cap" in detail and "schedul" in detail:
            return "not scheduled (region cap)"
        if "budget" in detail or "would reach" in detail or spent:
            return "out of budget"
        return "refused"
    if last["kind"] == "reply rejected":
        return "reply rejected"
    if spent:
        return "budget spent"
    if rounds_done and last["round"] < rounds_done:
        return f"behind (last round {last['round']})"
    return "training"


def key_fingerprint(public_key_pem: bytes) -> str:
    """``SHA256:<hex>`` of the raw 32-byte Ed25519 public key in ``public_key_pem``."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_key_pem)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + hashlib.sha256(raw).hexdigest()


def _default_key_path(run_dir: Path) -> Path:
    # The same place shared_model.release.default_public_key_path looks (without torch).
    env = os.environ.get("FEDRANK_KEY_DIR")
    root = Path(env) if env else run_dir.resolve().parent / f"{run_dir.resolve().name}.keys"
    return root / "server-signing.pub"


def _releases(run_dir: Path, key_path: Path | None) -> tuple[list[dict[str, Any]], dict | None]:
    folder = run_dir / "releases"
    if not folder.is_dir():
        return [], None
    key_info: dict[str, Any] | None = None
    verifier = None
    path = key_path or _default_key_path(run_dir)
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        pem = path.read_bytes()[:10_000]
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        key = serialization.load_pem_public_key(pem)
        if isinstance(key, Ed25519PublicKey):
            verifier = key
            key_info = {"path": _text(path), "fingerprint": key_fingerprint(pem)}
    out = []
    for release in sorted(folder.glob("round-*"))[-200:]:
        try:
            manifest_bytes = (release / "manifest.json").read_bytes()[:1_000_000]
            manifest = json.loads(manifest_bytes)
        except (OSError, ValueError):
            continue
        if not isinstance(manifest, dict):
            continue
        try:
            signature = (release / "manifest.sig").read_bytes()[:1024]
        except OSError:
            signature = b""
        if not signature:
            check = "unsigned"
        elif verifier is None:
            check = "not checked (no public key)"
        else:
            try:
                verifier.verify(signature, manifest_bytes)
                check = "valid"
            except Exception:  # cryptography's InvalidSignature, or a malformed signature
                check = "INVALID"
        eps = manifest.get("epsilon_per_node")
        eps_values = [_num(v) for v in eps.values()] if isinstance(eps, Mapping) else []
        finite = [v for v in eps_values if isinstance(v, float)]
        out.append({
            "name": _text(release.name, MAX_NAME),
            "round": manifest.get("round") if isinstance(manifest.get("round"), int) else None,
            "version": _text(manifest.get("version", ""), MAX_NAME),
            "created_at": _text(manifest.get("created_at", ""), MAX_NAME),
            "epsilon_max": "inf" if "inf" in eps_values else (max(finite) if finite else None),
            "metrics": _metric_map(manifest.get("metrics")),
            "signature": check,
            "signature_sha256": hashlib.sha256(signature).hexdigest() if signature else None,
            "key_fingerprint": key_info["fingerprint"] if key_info and check == "valid" else None,
        })  # fmt: skip
    return out, key_info


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def collect_state(run_dir: Path, *, release_key: Path | None = None) -> dict[str, Any]:
    """Everything the page shows, from the run directory's aggregate files (JSON-safe)."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    config = config if isinstance(config, dict) else {}
    metrics = _read_json(run_dir / "metrics.json")
    metrics = metrics if isinstance(metrics, dict) else {}
    raw_rows: list[Any] = metrics["rounds"] if isinstance(metrics.get("rounds"), list) else []
    rows = [r for r in (_round_row(x) for x in raw_rows if isinstance(x, Mapping)) if r]
    rows.sort(key=lambda r: r["round"])
    planned = config.get("num-server-rounds")
    planned = planned if isinstance(planned, int) and not isinstance(planned, bool) else None
    done = rows[-1]["round"] if rows else 0
    budget = _num(config.get("epsilon"))
    caps = _caps(config.get("region-epsilon-caps"))
    replies = _replies_from_rows(x for x in raw_rows if isinstance(x, Mapping))
    if not any("replies" in x for x in raw_rows if isinstance(x, Mapping)):
        replies = _replies_from_log(run_dir / "flower.log")
    replies = replies[-MAX_REPLIES:]
    events = _ledger_events(run_dir / "ledger")
    nodes = _nodes(events, replies, budget=budget, caps=caps, rounds_done=done)
    releases, key_info = _releases(run_dir, release_key)
    initial = _round_row({"round": 0, **metrics["initial"]}) if isinstance(
        metrics.get("initial"), Mapping) else None
    if not config and not metrics:
        status = "not started"
    elif planned is not None and done >= planned:
        status = "finished"
    else:
        status = "running"
    newest = max(
        [_mtime(run_dir / n) for n in ("config.json", "metrics.json", "flower.log")]
        + [_mtime(p) for p in (run_dir / "ledger").glob("*.jsonl")]
        + [_mtime(run_dir / "releases")]
    )
    return {
        "run": {
            "name": _text(run_dir.resolve().name, MAX_NAME),
            "status": status,
            "rounds_done": done,
            "rounds_planned": planned,
            "epsilon_budget": budget,
            "config": {k: _text(config[k], MAX_NAME) for k in CONFIG_KEYS if k in config},
            "wall_seconds": _num(metrics.get("wall_seconds")),
            "updated": (
                _dt.datetime.fromtimestamp(newest, _dt.UTC).isoformat(timespec="seconds")
                if newest else None
            ),
        },
        "initial": initial,
        "rounds": rows,
        "baselines": _baselines(metrics.get("baselines")),
        "nodes": nodes,
        "replies": replies,
        "releases": releases,
        "release_key": key_info,
        "audit": (run_dir / "audit.html").is_file(),
    }


# --------------------------------------------------------------------------------------------
# the web app
# --------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _static(name: str) -> bytes:
    return resources.files("fedrank").joinpath("dashboard_static", name).read_bytes()


def _plotly_js() -> Path:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.js not found in the plotly package ({path})")
    return path


_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def build_app(
    run_dir: Path,
    *,
    token: str | None = None,
    loopback_only: bool = True,
    refresh_seconds: float = 2.0,
    release_key: Path | None = None,
) -> Any:
    """The Starlette app. ``token`` (when set) is required on every request;
    ``loopback_only`` also requires a loopback ``Host`` header (set for loopback binds)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    run_dir = Path(run_dir)
    plotly_path = _plotly_js()
    page = _static("index.html").replace(
        b"__REFRESH_MS__", str(max(200, int(refresh_seconds * 1000))).encode()
    )

    def denied(request: Request) -> Response | None:
        if loopback_only:
            host = request.headers.get("host", "")
            hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0]
            if not is_loopback(hostname.strip("[]")):
                return PlainTextResponse("forbidden host", status_code=403, headers=_HEADERS)
        if token is None:
            return None
        offered = (
            request.query_params.get("token")
            or request.cookies.get(COOKIE)
            or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        )
        if offered and hmac.compare_digest(offered.encode(), token.encode()):
            return None
        return PlainTextResponse(
            "a token is required (open the URL `fedrank dashboard` printed)",
            status_code=401, headers={**_HEADERS, "WWW-Authenticate": "Bearer"},
        )

    def guarded(handler: Callable[[Request], Response]) -> Callable[..., Any]:
        async def endpoint(request: Request) -> Response:
            refusal = denied(request)
            if refusal is not None:
                return refusal
            response = handler(request)
            response.headers.update(_HEADERS)
            if token is not None and request.query_params.get("token"):
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
            return response

        return endpoint

    def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store"})  # fmt: skip

    def state(request: Request) -> Response:
        return JSONResponse(
            _json_safe(collect_state(run_dir, release_key=release_key)),
            headers={"Cache-Control": "no-store"},
        )

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name == "plotly.min.js":
            return FileResponse(plotly_path, media_type="text/javascript",
                                headers={"Cache-Control": "max-age=3600"})  # fmt: skip
        if name not in ("dashboard.js", "dashboard.css"):
            return PlainTextResponse("not found", status_code=404)
        media = "text/javascript" if name.endswith(".js") else "text/css"
        return Response(_static(name), media_type=media, headers={"Cache-Control": "no-cache"})

    return Starlette(routes=[
        Route("/", guarded(index)),
        Route("/api/state", guarded(state)),
        Route("/static/{name}", guarded(static)),
    ])  # fmt: skip


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def dashboard_url(host: str, port: int, token: str | None = None) -> str:
    """The URL to open (with ``?token=`` when one is needed)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("localhost" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def make_server(
    run_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = None,
    refresh_seconds: float = 2.0,
    release_key: Path | None = None,
) -> tuple[Any, socket.socket, str | None]:
    """``(uvicorn.Server, bound socket, token)``; run it with ``server.run(sockets=[sock])``.

    A non-loopback ``host`` always gets a token (``token`` or a fresh random one)."""
    import uvicorn

    loopback = is_loopback(host)
    if not loopback and not token:
        token = secrets.token_urlsafe(24)
    app = build_app(run_dir, token=token or None, loopback_only=loopback,
                    refresh_seconds=refresh_seconds, release_key=release_key)  # fmt: skip
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    sock.set_inheritable(True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    return uvicorn.Server(config), sock, token or None


def url_hint(run_dir: Path) -> str:
    """The line ``simulate`` / ``server start`` print: how to watch this run live."""
    url = dashboard_url("127.0.0.1", DEFAULT_PORT)
    return f"[fedrank] watch it live: fedrank dashboard {run_dir}   (then open {url})"
