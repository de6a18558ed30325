"""The gateway's pure ASGI middleware: a bound on request bodies and an optional bearer token.

Pure ASGI (not Starlette's ``@app.middleware("http")``, which wraps every request in a task
group and memory streams, a visible share of a few-millisecond request). They live in their
own importable module for a Serve reason: a ``@serve.deployment`` class is shipped to its
replica by value, module globals it touches included, so state the deployment sets for the
middleware must sit in a module both import by name (``set_key_digest``), not in a global of
the deployment's own module (it would set a copy)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

from fastapi.responses import JSONResponse

from xmr.serve.requests import MAX_BODY_BYTES

OPEN_PATHS = ("/healthz",)  # load balancers probe it without a token

_KEY_DIGEST: list[bytes | None] = [None]  # this process's configured key digest
# How long a client may take to send a body once its headers arrived (slowloris: a
# connection that trickles or stalls its body would otherwise hold a gateway slot for ever).
BODY_TIMEOUT_S: list[float] = [10.0]


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error the endpoint gives has this one shape: ``{"error": "..."}``."""
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


def set_key_digest(hex_digest: str | None) -> None:
    """The key's SHA-256 (hex), or None for no key; called from the deployment's config."""
    _KEY_DIGEST[0] = bytes.fromhex(hex_digest) if hex_digest else None


def set_body_timeout(seconds: float | None) -> None:
    """The body-read deadline, from the deployment's config (default 10 s)."""
    BODY_TIMEOUT_S[0] = float(seconds) if seconds else 10.0


def key_configured() -> bool:
    return _KEY_DIGEST[0] is not None


class BoundedBody:
    """Oversized or unsized POST bodies are refused before they are read, and a body must
    arrive whole within ``BODY_TIMEOUT_S`` (else 408): the middleware reads it under that
    deadline and hands the application the buffered body."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            problem = _body_problem(dict(scope["headers"]).get(b"content-length"))
            if problem is not None:
                await error_response(*problem)(scope, receive, send)
                return
            try:
                body = await asyncio.wait_for(_read_body(receive), BODY_TIMEOUT_S[0])
            except asyncio.TimeoutError:
                await error_response(408, f"the request body did not arrive within {BODY_TIMEOUT_S[0]:g} s: send "
                                          f"it in one go", {"Connection": "close"})(scope, receive, send)
                return
            if body is None:  # the client went away
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)


async def _read_body(receive) -> bytes | None:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive):
    """A ``receive`` that gives the buffered body once, then the connection's own messages."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def _body_problem(length: bytes | None) -> tuple[int, str] | None:
    if length is None:
        return 411, "a Content-Length header is required"
    if not length.isdigit():
        return 400, f"invalid Content-Length {length[:32].decode('latin-1')!r}"
    if int(length) > MAX_BODY_BYTES:
        return 413, f"request body of {int(length)} bytes exceeds the {MAX_BODY_BYTES}-byte limit"
    return None


def _route(scope) -> str:
    """The path below the application's route prefix (Serve passes it as ``root_path``):
    the exemption is for exactly ``<prefix>/healthz``, not any path that ends with it."""
    path, prefix = scope["path"], scope.get("root_path", "").rstrip("/")
    return path[len(prefix):] if prefix and path.startswith(prefix + "/") else path


def _local(scope) -> bool:
    """Whether the request came from this machine (a loopback peer; no peer: in-process)."""
    import ipaddress

    client = scope.get("client")
    if not client:
        return True
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return client[0] == "localhost"
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (a dual-stack "::" bind)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


class BearerToken:
    """With a key configured, every request but ``/healthz`` needs
    ``Authorization: Bearer <key>``. Without one, only requests from this machine are
    answered (a 403 says why), whatever address the proxy binds. The replica holds only the key's SHA-256 (the key never
    reaches Serve's config, logs or ``/info``); the comparison is constant-time. The digest
    is set from the deployment's config before the replica takes its first request."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        digest = _KEY_DIGEST[0]
        if scope["type"] == "http" and digest is None and _route(scope) not in OPEN_PATHS and not _local(scope):
            # bound beyond loopback (serve's http_options, a RayService) but started without a
            # key: refuse rather than serve the model to the network unauthenticated
            await error_response(403, "this endpoint has no API key and answers only requests from its own "
                                      "machine: deploy it with api_key_sha256 (xmr serve: XMR_API_KEY or "
                                      "--api-key-file) to serve other hosts")(scope, receive, send)
            return
        if scope["type"] == "http" and digest is not None and _route(scope) not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            token = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(hashlib.sha256(token).digest(), digest):
                why = "missing" if not token else "wrong"
                message = (f"{why} bearer token: send the header 'Authorization: Bearer <key>' "
                           f"(the key the endpoint was started with)")
                await error_response(401, message, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


