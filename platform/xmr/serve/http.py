"""The endpoint's HTTP surface: the FastAPI app the gateway serves, every error in one
shape (``{"error": ...}``, a status that says whose fault it is), the body-deadline and
bearer-token middlewares, and the one-pass JSON response."""

# no `from __future__ import annotations`: FastAPI reads handler signatures at run time

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from xmr.serve.contract import openapi_document
from xmr.serve.middleware import BearerToken, BoundedBody, error_response as _error
from xmr.serve.requests import RequestError, error_text

ROUTES = "POST /search, POST /moments, GET /healthz, GET /info, GET /docs"

api = FastAPI(title="xmr retrieval", version="1",
              description="Cross-modal retrieval and video corpus moment retrieval from an xmr checkpoint. "
                          "Bodies: JSON, or application/x-npy with k / modality / video as query parameters.")


# Serve's replica logger (its log file): a client's error is one WARNING line, no traceback
LOG = logging.getLogger("ray.serve")


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    LOG.warning("%d %s %r: %r", exc.status, request.method, request.url.path[:200], exc.message[:300])
    return _error(exc.status, exc.message, {"Retry-After": "1"} if exc.status == 503 else None)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message = error_text(exc.errors())
    LOG.warning("422 %s %r: %r", request.method, request.url.path[:200], message[:300])
    return _error(422, message)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}: this endpoint serves {ROUTES}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}: this endpoint serves {ROUTES}"
    else:
        message = str(exc.detail)
    if exc.status_code < 500:
        LOG.warning("%d %s %r: %r", exc.status_code, request.method, request.url.path[:200], message[:300])
    # Starlette's 405 carries the route's methods in Allow (RFC 9110 requires it): kept
    return _error(exc.status_code, message, dict(exc.headers) if exc.headers else None)


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    return _error(500, f"internal error ({type(exc).__name__}); the request may be retried")


def _openapi() -> dict[str, Any]:
    """The served checkpoint's document (``xmr.serve.contract``), from FastAPI's."""
    return openapi_document(FastAPI.openapi(api))


api.openapi = _openapi  # FastAPI's documented way to change the document /openapi.json serves

api.add_middleware(BoundedBody)
api.add_middleware(BearerToken)


class JSONBytes(Response):
    """A JSON response serialised once with the standard encoder. Handlers return it
    directly, which skips FastAPI's per-field re-encoding of the result; the declared
    ``response_model`` still documents the shape in the OpenAPI schema."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":"), allow_nan=False).encode()
