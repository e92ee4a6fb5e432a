"""The node gateway: the only address nodes (and the internet) can reach.

In flwr 1.42 one HTTPS port of ``flower-superlink`` serves three APIs: Fleet
(``/v1/fleet/*``, SuperNodes; every call but registration is signed with a registered node
key), Control (``/v1/control/*``: register node keys, start and stop runs, read logs) and
Runtime (``/v1/runtime/*``: the ServerApp's own channel). Control has no authentication in
this distribution (account authentication is an OIDC plug-in that is not shipped), so that
port must never be reachable from outside the server host.

``fedrank server start`` therefore binds the SuperLink to ``127.0.0.1:CONTROL_PORT`` and runs
this gateway on the public ``HOST:PORT``: it terminates TLS with the same server certificate,
forwards ``POST /v1/fleet/<method>`` for the Fleet methods a SuperNode calls, and answers
everything else with 404 without contacting the SuperLink. Request bodies are capped.

Run as ``python -m server.gateway --listen HOST:PORT --upstream 127.0.0.1:PORT --certfile
... --keyfile ... --ca ...``. Uses Flower's own dependencies (uvicorn, starlette, httpx).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("fedrank.gateway")

# The Fleet methods a SuperNode calls (flwr/supernode/fleet_http_client.py, flwr 1.42).
FLEET_METHODS = frozenset({
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received",
})
FLEET_PREFIX = "/v1/fleet/"
DEFAULT_MAX_BODY = 256 * 1024 * 1024
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
})


def allowed(method: str, path: str) -> bool:
    """Whether the gateway forwards this request (Fleet API calls only)."""
    if method != "POST" or not path.startswith(FLEET_PREFIX):
        return False
    name = path[len(FLEET_PREFIX):]
    return name in FLEET_METHODS


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(upstream: str, *, ca: str, max_body: int = DEFAULT_MAX_BODY) -> Starlette:
    """The gateway ASGI app forwarding Fleet calls to ``https://upstream``."""
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        state["client"] = httpx.AsyncClient(
            base_url=f"https://{upstream}", verify=ca, timeout=httpx.Timeout(60.0, read=None),
        )
        try:
            yield
        finally:
            await state.pop("client").aclose()

    async def handle(request: Request) -> Response:
        path = request.url.path
        if not allowed(request.method, path):
            return JSONResponse(
                {"detail": "not found: this address serves the Fleet API only"}, status_code=404
            )
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body):
            return JSONResponse({"detail": "request body too large"}, status_code=413)
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_body:
                return JSONResponse({"detail": "request body too large"}, status_code=413)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            upstream_response = await state["client"].post(
                path, content=bytes(body), headers=headers
            )
        except httpx.HTTPError as exc:
            log.warning("gateway: upstream %s failed: %s", path, type(exc).__name__)
            return JSONResponse({"detail": "SuperLink unavailable"}, status_code=503)
        out_headers = {
            k: v for k, v in upstream_response.headers.items()
            if k.lower() not in _HOP_BY_HOP and k.lower() != "content-encoding"
        }
        return Response(upstream_response.content, status_code=upstream_response.status_code,
                        headers=out_headers)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(
        routes=[Route("/{path:path}", handle, methods=methods)],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedrank node gateway (Fleet API only)")
    parser.add_argument("--listen", required=True, help="HOST:PORT nodes connect to")
    parser.add_argument("--upstream", required=True, help="SuperLink 127.0.0.1:PORT")
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--keyfile", required=True)
    parser.add_argument("--ca", required=True, help="CA that signed the SuperLink certificate")
    parser.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    up_host = args.upstream.rpartition(":")[0]
    if not is_loopback(up_host):
        parser.error(f"--upstream must be a loopback address, got {args.upstream!r}")
    import uvicorn

    uvicorn.run(
        create_app(args.upstream, ca=args.ca, max_body=args.max_body),
        host=host.strip("[]"), port=int(port), ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile, log_level="warning", access_log=False,
    )


if __name__ == "__main__":
    main()
