"""The Ray Serve application: one deployment with a FastAPI ingress.

- ``POST /search``: category / pair retrieval (feature array, or a WAV file where the
  dataset has an audio featuriser) -> top-k items of the other modality.
- ``POST /moments``: video corpus moment retrieval (token features) -> top-k (video, start,
  end, score); ``video`` restricts it to one video (SVMR).
- ``GET /healthz``, ``GET /info``.

Queries are batched with ``@serve.batch`` and scored by one matrix product against the
gallery (or a FAISS index past a size threshold). The checkpoint and gallery are the
deployment's ``user_config``: deploying a new one loads it beside the old in a thread and
swaps it in when ready, so requests keep being answered throughout.
"""

# no `from __future__ import annotations`: FastAPI reads the request models from real annotations

import asyncio
import json
import os
import time
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve

from xmr.serve.featurise import audio_featuriser
from xmr.tasks import FAMILIES
from xmr.serve.gallery import Loaded, load_for_serving
from xmr.serve.requests import (MAX_BODY_BYTES, MomentsRequest, MomentsResponse, RequestError, SearchRequest,
                                SearchResponse, as_array, decode_wav_base64, error_text, tokens_array)
from xmr.serve.search import moments_items, search_items, svmr_one

BATCH_SIZE = int(os.environ.get("XMR_SERVE_BATCH", "32"))
# How long a batch waits to fill when other requests are already in flight; a lone request
# never waits (its latency is the search itself).
BATCH_WAIT_S = float(os.environ.get("XMR_SERVE_BATCH_WAIT_S", "0.01"))

INLINE_LONE = os.environ.get("XMR_SERVE_INLINE_LONE", "1") == "1"

api = FastAPI(title="xmr retrieval", version="1",
              description="Cross-modal retrieval and video corpus moment retrieval from an xmr checkpoint.")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


@api.exception_handler(RequestError)
async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
    return _error(exc.status, exc.message)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(422, error_text(exc.errors()))


class BoundedBody:
    """Pure ASGI middleware: oversized or unsized POST bodies are refused before they are
    read. (Starlette's ``@app.middleware("http")`` wraps every request in a task group and
    memory streams, a visible share of a few-millisecond request.)"""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            problem = _body_problem(dict(scope["headers"]).get(b"content-length"))
            if problem is not None:
                await _error(*problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _body_problem(length: bytes | None) -> tuple[int, str] | None:
    if length is None:
        return 411, "a Content-Length header is required"
    if not length.isdigit():
        return 400, f"invalid Content-Length {length[:32].decode('latin-1')!r}"
    if int(length) > MAX_BODY_BYTES:
        return 413, f"request body of {int(length)} bytes exceeds the {MAX_BODY_BYTES}-byte limit"
    return None


api.add_middleware(BoundedBody)


class JSONBytes(Response):
    """A JSON response serialised once with the standard encoder. Handlers return it
    directly, which skips FastAPI's per-field re-encoding of the result; the declared
    ``response_model`` still documents the shape in the OpenAPI schema."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":"), allow_nan=False).encode()


# No per-request access log by default: at a few ms per request it is a visible share of
# the endpoint's own cost (XMR_SERVE_ACCESS_LOG=1 turns it on).
@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1},
                  logging_config={"enable_access_log": os.environ.get("XMR_SERVE_ACCESS_LOG") == "1"})
@serve.ingress(api)
class Retriever:
    def __init__(self) -> None:
        self.state: "Loaded | None" = None
        self.featurise: Any = None
        self.loading: str | None = None
        # [batches, queries, compute seconds] per endpoint: is batching paying, and how much
        # of a request is the search itself?
        self.batches = {"search": [0, 0, 0.0], "moments": [0, 0, 0.0]}
        self.inflight = 0  # requests inside a handler now

    def _batch_wait(self, batched) -> None:
        batched.set_batch_wait_timeout_s(BATCH_WAIT_S if self.inflight > 1 else 0.0)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the configured checkpoint and gallery off the event loop, then swap."""
        self.loading = str(user_config.get("checkpoint"))
        loaded = await asyncio.to_thread(load_for_serving, **user_config)
        featurise = audio_featuriser(loaded.manifest)  # None unless the dataset was built from audio
        self.state, self.featurise, self.loading = loaded, featurise, None

    def _ready(self, route: str) -> Loaded:
        st = self.state
        if st is None:
            raise RequestError(503, "the model is still loading")
        if st.family.route != route:
            serves = " / ".join(f.title for f in FAMILIES.values() if f.route == route)
            raise RequestError(404, f"/{route} serves {serves} models; this checkpoint is a {st.family.title} model "
                                    f"(use /{st.family.route})")
        return st

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        if self.state is None:
            raise RequestError(503, "loading")
        return {"status": "ok"}

    @api.get("/info")
    async def info(self) -> dict[str, Any]:
        st = self.state
        if st is None:
            raise RequestError(503, "the model is still loading")
        batching = {k: {"batches": b, "queries": n, "mean_batch": round(n / b, 2) if b else 0.0,
                        "compute_ms_per_batch": round(1000 * sec / b, 3) if b else 0.0, "compute_s": sec}
                    for k, (b, n, sec) in self.batches.items()}
        return {**st.info, "loading": self.loading, "batch_size": BATCH_SIZE, "batching": batching,
                "torch_threads": torch.get_num_threads(),
                "featurisers": ["audio_wav_base64"] if self.featurise else []}

    @api.post("/search", response_model=SearchResponse)
    async def search(self, req: SearchRequest) -> Response:
        st = self._ready("search")
        if (req.query is None) == (req.audio_wav_base64 is None):
            raise RequestError(422, "give exactly one of query (features) or audio_wav_base64")
        if req.audio_wav_base64 is not None:
            if self.featurise is None:
                raise RequestError(422, "audio_wav_base64: this gallery's dataset has no audio featuriser; send features")
            role, featurise = self.featurise
            if req.modality not in (None, role):
                raise RequestError(422, f"modality = {req.modality!r}: audio queries are modality {role!r}")
            vec = featurise(decode_wav_base64(req.audio_wav_base64))
        else:
            role = req.modality or "a"
            vec = as_array(req.query, st.cfg.model.dims[role], "query")
        g = st.gallery
        if req.k > g.size:
            raise RequestError(422, f"k = {req.k}: the gallery holds {g.size} items")
        other = "b" if role == "a" else "a"
        self.inflight += 1
        try:
            self._batch_wait(self._search_batched)
            hits = await self._search_batched((st, role, vec, req.k))
        finally:
            self.inflight -= 1
        return JSONBytes({"modality": other, "k": req.k, "results": hits})

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=0.0)
    async def _search_batched(self, items: list[tuple]) -> list[list[dict[str, Any]]]:
        return await self._timed("search", search_items, items)

    async def _timed(self, endpoint: str, compute, items: list[tuple]) -> list[list[dict[str, Any]]]:
        """Run one batch off the event loop, which keeps accepting the next batch's requests;
        a lone request runs inline (no other request waits on the loop, and a thread hop
        costs it a visible share of a few-millisecond search)."""
        t0 = time.perf_counter()
        if len(items) == 1 and self.inflight <= 1 and INLINE_LONE:
            out = compute(items)
        else:
            out = await asyncio.to_thread(compute, items)
        counters = self.batches[endpoint]
        counters[0] += 1
        counters[1] += len(items)
        counters[2] += time.perf_counter() - t0
        return out

    @api.post("/moments", response_model=MomentsResponse)
    async def moments(self, req: MomentsRequest) -> Response:
        st = self._ready("moments")
        if req.text is not None:
            raise RequestError(422, "text: this dataset's query features come from no text encoder available "
                                    "offline; send token features in 'query'")
        if req.query is None:
            raise RequestError(422, "query: required (token features [T, d_query])")
        q = tokens_array(req.query, st.cfg.model.dims["query"][-1], st.cfg.data.max_query_tokens)
        corpus = st.gallery
        if req.video is not None:
            try:
                position = corpus.ids.index(req.video)
            except ValueError:
                raise RequestError(404, f"video {req.video[:80]!r}: not in the served corpus") from None
            hits = await asyncio.to_thread(svmr_one, st, q, position, req.k)
            return JSONBytes({"k": req.k, "video": req.video, "results": hits})
        self.inflight += 1
        try:
            self._batch_wait(self._moments_batched)
            hits = await self._moments_batched((st, q, req.k))
        finally:
            self.inflight -= 1
        return JSONBytes({"k": req.k, "results": hits})

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=0.0)
    async def _moments_batched(self, items: list[tuple]) -> list[list[dict[str, Any]]]:
        return await self._timed("moments", moments_items, items)


def build_app(args: dict[str, Any]):
    """Serve application builder (``serve run serving.app:app_builder checkpoint=... gallery=...``).

    args: checkpoint (dir, run dir or s3://; required), gallery (dataset root; default the
    checkpoint's data.path), split (default test), index (a saved ``xmr index build`` dir),
    approx (auto|on|off), replicas, batch options via XMR_SERVE_BATCH / XMR_SERVE_BATCH_WAIT_S.
    """
    known = {"checkpoint", "gallery", "split", "index", "approx", "endpoint_url", "replicas", "max_ongoing_requests"}
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)} (known: {sorted(known)})")
    if not args.get("checkpoint"):
        raise ValueError("the 'checkpoint' arg is required (a checkpoint dir, a run dir, or s3://...)")
    user_config = {k: args[k] for k in ("checkpoint", "gallery", "split", "index", "approx", "endpoint_url")
                   if args.get(k) is not None}
    for key in ("checkpoint", "gallery", "index"):  # replicas do not run in this process's directory
        if key in user_config and not str(user_config[key]).startswith("s3://"):
            user_config[key] = os.path.abspath(str(user_config[key]))
    max_ongoing = int(args.get("max_ongoing_requests", 64))
    if max_ongoing < BATCH_SIZE:
        raise ValueError(f"max_ongoing_requests = {max_ongoing} must be >= the batch size {BATCH_SIZE}, "
                         "or batches can never fill")
    return Retriever.options(user_config=user_config, num_replicas=int(args.get("replicas", 1)),
                             max_ongoing_requests=max_ongoing).bind()
