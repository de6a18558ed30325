"""The Ray Serve deployments: a light HTTP gateway composed with the retriever.

- ``Gateway`` (FastAPI ingress): bounds and parses bodies (JSON lists, base64 float32, or an
  ``application/x-npy`` body), checks the bearer token when one is configured, checks each
  query once against what the endpoint serves (``xmr.serve.queries``: route, shape, k, a
  WAV featurised here) and sends the retriever, or every shard, the parsed arrays through a
  deployment handle; every error reaches the client as ``{"error": ...}``. Searches are
  idempotent, so a call that dies with its replica (SIGKILL, a node lost) is sent again to
  another one; only when no replica answers within the retry budget does the client get 503
  with ``Retry-After``.
- ``Retriever``: the checkpoint's model and gallery (or one shard's, its id in its
  settings), queries batched with ``@serve.batch`` and scored by one matrix product (or a
  FAISS index past a size threshold). Its settings (``RetrieverSettings``) are its
  ``user_config``, typed on the replica: deploying a new checkpoint loads it beside the old
  in a thread and swaps it in when ready, so requests keep being answered throughout.
- ``TextFeaturiser`` (only where the served dataset's query tokens came from a text encoder,
  ``xmr data synth vcmr --text-encoder``): ``"text"`` -> token features with that encoder,
  a deployment of its own composed with the retriever through the gateway.

One error type crosses them: a replica returns a client's ``RequestError`` as a value
(``errors_returned``), and the gateway raises it again.

Routes: ``POST /search`` (category / pair: a feature array or, where the dataset has an
audio featuriser, a WAV file), ``POST /moments`` (VCMR: token features, or ``text`` where
the dataset has a text encoder; ``video`` restricts it to one video, SVMR), ``GET
/healthz``, ``GET /info``, OpenAPI at ``/docs``.
"""

# no `from __future__ import annotations`: FastAPI reads the request models from real annotations

import asyncio
import dataclasses
import functools
import logging
import time
from typing import Any

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import Response
from ray import serve

from xmr.ray.serve import GATEWAY_ACTOR_OPTIONS
from xmr.serve.contract import set_contract
from xmr.serve.fanout import IN_FLIGHT, ShardBatcher
from xmr.serve.featurise import audio_featuriser, audio_spec
from xmr.serve.gallery import Loaded, load_for_serving, text_encoder_of
from xmr.serve.http import JSONBytes, api
from xmr.serve.middleware import key_configured, set_body_timeout, set_key_digest
from xmr.serve.queries import (MomentsQuery, SearchQuery, moments_query, search_query, search_role, search_vector,
                               served_route)
from xmr.serve.requests import (MomentsRequest, MomentsResponse, RequestError, SearchRequest, SearchResponse,
                                body_schema, decode_wav_base64, errors_returned, parse_request)
from xmr.serve.search import moments_items, search_items, svmr_one
from xmr.serve.settings import GatewaySettings, RetrieverSettings, ServeSettings, parsed
from xmr.serve.shards import merge_hits, merge_moments, moments_across
from xmr.tasks import FAMILIES

logger = logging.getLogger("xmr.serve")
FEATURISE_TIMEOUT_S = 5.0
BATCH_SIZE = ServeSettings.batch_size  # until reconfigure sizes the batches from the app's settings
SWAPPING = "the served checkpoint is being replaced; retry shortly"


# --------------------------------------------------------------------------- the retriever


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class Retriever:
    """The model and gallery of one checkpoint (or one shard of a sharded index), searched for
    queries the gateway has already checked (``xmr.serve.queries``)."""

    def __init__(self) -> None:
        self.settings: RetrieverSettings | None = None  # typed from the app's user_config by reconfigure
        self.state: "Loaded | None" = None
        self.text_encoder: dict[str, Any] | None = None  # the dataset's, when its query tokens came from text
        self.featurisers: list[str] = []  # raw query forms the dataset has (the gateway featurises them)
        self.loading: str | None = None
        # [batches, queries, compute seconds] per endpoint: is batching paying, and how much
        # of a request is the search itself?
        self.batches = {"search": [0, 0, 0.0], "moments": [0, 0, 0.0]}
        self.inflight = 0  # requests inside a method now
        self.loaded_from: dict[str, Any] | None = None  # the load args of the state held

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batching and threads from the app's settings; then the configured checkpoint and
        gallery, loaded off the event loop and swapped in."""
        s = self.settings = parsed(RetrieverSettings, user_config)
        for batched in (self._search_batched, self._moments_batched, self._moments_videos_batched):
            batched.set_max_batch_size(s.batch_size)
        if s.threads > 0:
            torch.set_num_threads(s.threads)
        load = s.load_args()
        if self.state is not None and load == self.loaded_from:  # a settings-only change: nothing to reload
            return
        self.loading = s.checkpoint
        loaded = await asyncio.to_thread(load_for_serving, **load)
        self.loaded_from = load
        self.state, self.loading = loaded, None
        self.text_encoder = text_encoder_of(loaded.manifest)
        self.featurisers = (["audio_wav_base64"] if audio_spec(loaded.manifest) else []) + \
            (["text"] if self.text_encoder else [])

    def _ready(self, route: str) -> Loaded:
        st = self.state
        if st is None:
            raise RequestError(503, "the model is still loading")
        if st.family.route != route:  # the gateway checked the route: this replica's checkpoint is changing
            serves = " / ".join(f.title for f in FAMILIES.values() if f.route == route)
            raise RequestError(404, f"/{route} serves {serves} models; this checkpoint is a {st.family.title} model "
                                    f"(use /{st.family.route})")
        return st

    @errors_returned
    def healthy(self) -> bool:
        if self.state is None:
            raise RequestError(503, "loading")
        return True

    @errors_returned
    def info(self) -> dict[str, Any]:
        st = self.state
        if st is None:
            raise RequestError(503, "the model is still loading")
        batching = {k: {"batches": b, "queries": n, "mean_batch": round(n / b, 2) if b else 0.0,
                        "compute_ms_per_batch": round(1000 * sec / b, 3) if b else 0.0, "compute_s": sec}
                    for k, (b, n, sec) in self.batches.items()}
        return {**st.info, "loading": self.loading, "batch_size": self.settings.batch_size, "batching": batching,
                "torch_threads": torch.get_num_threads(), "replica": serve.get_replica_context().replica_tag,
                "featurisers": self.featurisers, "text_encoder": self.text_encoder}

    @errors_returned
    async def search(self, query: SearchQuery) -> list[dict[str, Any]]:
        """The top-k items of the other modality (an unsharded index: one query a call)."""
        st = self._ready("search")
        return await self._admitted(self._search_batched, self._search_item(st, query))

    @errors_returned
    async def search_many(self, queries: list[SearchQuery]) -> list[Any]:
        """Several queries in one call (what the gateway sends a shard: ``xmr.serve.fanout``),
        searched as one batch; each answer is its hits or that query's ``RequestError``."""
        st = self._ready("search")
        out: list[Any] = [None] * len(queries)
        items: list[tuple[int, tuple]] = []
        for i, query in enumerate(queries):
            try:
                items.append((i, self._search_item(st, query)))
            except RequestError as exc:
                out[i] = exc
        if items:
            self.inflight += 1
            try:
                hits = await self._timed("search", search_items, [item for _, item in items])
            finally:
                self.inflight -= 1
            for (i, _), h in zip(items, hits):
                out[i] = h
        return out

    def _search_item(self, st: Loaded, query: SearchQuery) -> tuple:
        """A query as ``search_items`` takes it. A shard answers up to its own size (the gateway
        checked k against the whole gallery); the whole gallery refuses a k past it."""
        if list(query.vector.shape) != list(st.cfg.model.dims.get(query.role, ())):
            raise RequestError(503, SWAPPING)
        k = query.k
        if self.settings.shard is not None:
            k = min(k, st.gallery.size)
        elif k > st.gallery.size:
            raise RequestError(422, f"k = {k}: the gallery holds {st.gallery.size} items")
        return st, query.role, query.vector, k

    @errors_returned
    async def moments(self, query: MomentsQuery) -> list[dict[str, Any]]:
        """The top-k moments over the corpus (this replica's: the whole, or its shard's)."""
        return await self._admitted(self._moments_batched, self._moments_item(query))

    @errors_returned
    async def moments_videos(self, query: MomentsQuery) -> dict[str, Any]:
        """The top-k moments and the videos they were ranked within, with their scores
        (``{"results", "videos"}``): what the gateway merges across shards. A method of its
        own, so that each method's answer has one shape whatever the replica serves."""
        return await self._admitted(self._moments_videos_batched, self._moments_item(query))

    def _moments_item(self, query: MomentsQuery) -> tuple:
        st = self._ready("moments")
        if query.tokens.shape[1] != st.cfg.model.dims["query"][-1]:
            raise RequestError(503, SWAPPING)
        return st, query.tokens, query.k

    @errors_returned
    async def svmr(self, query: MomentsQuery) -> list[dict[str, Any]]:
        """The top-k spans within ``query.video`` (404 where this corpus, or shard, lacks it)."""
        st = self._ready("moments")
        try:
            position = st.gallery.ids.index(query.video)
        except ValueError:
            raise RequestError(404, f"video {query.video[:80]!r}: not in the served corpus") from None
        return await asyncio.to_thread(svmr_one, st, query.tokens, position, query.k)

    async def _admitted(self, batched, item: tuple):
        self.inflight += 1
        try:
            batched.set_batch_wait_timeout_s(self.settings.batch_wait_s if self.inflight > 1 else 0.0)
            return await batched(item)
        finally:
            self.inflight -= 1

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=0.0)  # sized by reconfigure
    async def _search_batched(self, items: list[tuple]) -> list[list[dict[str, Any]]]:
        return await self._timed("search", search_items, items)

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=0.0)
    async def _moments_batched(self, items: list[tuple]) -> list[list[dict[str, Any]]]:
        return await self._timed("moments", moments_items, items)

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=0.0)
    async def _moments_videos_batched(self, items: list[tuple]) -> list[dict[str, Any]]:
        return await self._timed("moments", functools.partial(moments_items, with_videos=True), items)

    async def _timed(self, endpoint: str, compute, items: list[tuple]) -> list[Any]:
        """Run one batch off the event loop, which keeps accepting the next batch's requests;
        a lone request runs inline (no other request waits on the loop, and a thread hop
        costs it a visible share of a few-millisecond search)."""
        t0 = time.perf_counter()
        if len(items) == 1 and self.inflight <= 1 and self.settings.inline_lone:
            out = compute(items)
        else:
            out = await asyncio.to_thread(compute, items)
        counters = self.batches[endpoint]
        counters[0] += 1
        counters[1] += len(items)
        counters[2] += time.perf_counter() - t0
        return out


# --------------------------------------------------------------------------- the text featuriser


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
class TextFeaturiser:
    """Text -> query token features with the encoder the dataset was built with (all-MiniLM-L6-v2
    from the ``[text]`` extra, loaded from the package's files). Its own deployment, so it
    scales apart from the retriever (text encoding and search cost differently); texts that
    arrive together are encoded as one batch."""

    def __init__(self, name: str, expected: dict[str, Any], cache_dir: str | None) -> None:
        from xmr.data.text_encoder import load_text_encoder

        # its files cached in the app's ``cache_dir`` (``ServeSettings``; None: the default)
        self.encoder = load_text_encoder(name, cache=cache_dir)
        got = self.encoder.info.get("package_version")
        if got != expected.get("package_version"):  # a different model version: other features
            raise RuntimeError(f"text encoder {name}: the dataset was built with {expected.get('package')} "
                               f"{expected.get('package_version')}, this replica has {got}")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def __call__(self, texts: list[str]) -> list[np.ndarray]:
        return await asyncio.to_thread(self.encoder.tokens, texts)


# --------------------------------------------------------------------------- the gateway


def _retryable() -> tuple[type[BaseException], ...]:
    """The errors of a call whose replica went away (not of the request itself)."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    names = [getattr(rex, n, None) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError")]
    names += [getattr(sex, n, None) for n in ("ReplicaUnavailableError", "DeploymentUnavailableError")]
    return tuple(n for n in names if n is not None)


def _as_request_error(exc: BaseException) -> RequestError | None:
    """A RequestError raised in a replica arrives wrapped (RayTaskError); unwrap it."""
    for e in (exc, getattr(exc, "cause", None), exc.__cause__):
        if isinstance(e, RequestError) and hasattr(e, "status"):
            return RequestError(e.status, e.message)
    return None


# A gateway request that waits on its client (a slow body, at most the body deadline) costs a
# coroutine, not a thread: a high cap keeps /healthz and real queries answered while many
# clients stall (the body deadline frees their slots). Its process's environment:
# ``xmr.ray.serve.GATEWAY_ENV``.
@serve.deployment(max_ongoing_requests=2048, ray_actor_options=GATEWAY_ACTOR_OPTIONS)
@serve.ingress(api)
class Gateway:
    """The HTTP front: every query checked once here (``xmr.serve.queries``) and sent on
    parsed. Over a sharded index (``shards``: one retriever deployment per shard) every query
    goes to all shards and their answers are merged (``xmr.serve.shards``); a shard that has
    not answered by ``shard_deadline_s`` (its dead replicas retried meanwhile) is left out and
    named in the response's ``missing_shards``, never silently."""

    def __init__(self, retriever, featuriser=None, shards=None) -> None:
        self.retriever = retriever
        self.featuriser = featuriser  # TextFeaturiser, bound when the dataset's queries came from text
        self.shards = list(shards) if shards else None  # retriever handles, one per shard, in shard order
        self.settings: GatewaySettings | None = None  # typed from the app's user_config by reconfigure
        self.audio = None  # (role, featurise) where the dataset was built from audio
        self.retryable = _retryable()
        self.retried = 0  # calls sent again after their replica died
        self.partial = 0  # answers given without every shard
        self.missing_counts = [0] * len(self.shards or ())  # per shard: answers it was missing from
        self.batchers: list[ShardBatcher] = []  # per shard: its search calls, batched (made on first use)

    def reconfigure(self, config: dict[str, Any]) -> None:
        s = self.settings = parsed(GatewaySettings, config)
        set_key_digest(s.api_key_sha256)
        set_body_timeout(s.body_timeout_s)
        set_contract(s.contract)  # what /openapi.json documents and queries are checked against
        self.audio = audio_featuriser(s.audio)
        self.batchers = []  # made again with these settings (calls in flight finish on the old ones)

    async def _call(self, method: str, *args, handle=None, budget_s: float | None = None):
        """A retriever call, sent again (backing off) when its replica died, ``retries`` times
        within ``retry_budget_s`` (or ``budget_s``)."""
        deadline, delay = time.monotonic() + (budget_s or self.settings.retry_budget_s), 0.05
        target = self.retriever if handle is None else handle
        for attempt in range(self.settings.retries + 1):
            try:
                out = await (getattr(target, method) if method else target).remote(*args)
            except self.retryable:
                if attempt == self.settings.retries or time.monotonic() + delay > deadline:
                    break
                self.retried += 1
                await asyncio.sleep(delay)
                delay = min(1.0, 2 * delay)
                continue
            except Exception as exc:  # noqa: BLE001 - the request's own error, or an internal one
                mapped = _as_request_error(exc)
                if mapped is not None:
                    raise mapped from None
                raise
            if isinstance(out, RequestError):  # the client's error, as the retriever returned it
                raise out
            return out
        raise RequestError(503, "no retriever replica is ready (restarting or scaling); retry shortly")

    # ------------------------------------------------------------------ queries, checked once

    async def _search_query(self, req, binary) -> SearchQuery:
        served = served_route(self.settings.contract, "search")
        role = search_role(req, binary, served, self.audio and self.audio[0])
        if req.audio_wav_base64 is not None:
            vector = await self._featurised(self.audio[1], decode_wav_base64(req.audio_wav_base64))
        else:
            vector = search_vector(req, binary, role, served)
        return search_query(req, role, vector, served)

    async def _moments_query(self, req, binary) -> MomentsQuery:
        served = served_route(self.settings.contract, "moments")
        tokens = None
        if req.text is not None and self.featuriser is not None and req.query is None and binary is None:
            tokens = await self._call("", req.text, handle=self.featuriser)
        return moments_query(req, binary, tokens, served, self.featuriser is not None)

    async def _featurised(self, featurise, wav: bytes) -> np.ndarray:
        """A WAV's features off the event loop (other queries keep being answered), within a
        time limit; the WAV's rate, channels and length are bounded before any work."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(featurise, wav), FEATURISE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RequestError(422, f"audio_wav_base64: featurising took longer than {FEATURISE_TIMEOUT_S:g} s; "
                                    f"send a shorter file") from None

    # ------------------------------------------------------------------ scatter-gather

    def _batcher(self, s: int) -> ShardBatcher:
        """Shard ``s``'s search calls (made on first use, after ``reconfigure`` has typed the
        settings, and again after each ``reconfigure``). Autoscaled retrievers get a call per
        query: Serve's autoscaler counts requests, and a batch would hide its queries."""
        if not self.batchers:
            st = self.settings
            budget = st.shard_deadline_s
            size, slots = (st.batch_size, IN_FLIGHT) if st.shard_batching else (1, 2 ** 31)
            self.batchers = [ShardBatcher(functools.partial(self._call, "search_many", handle=h, budget_s=budget),
                                          max_batch=size, in_flight=slots, call_timeout_s=budget)
                             for h in self.shards]
        return self.batchers[s]

    async def _scatter(self, method: str, *args, only: list[int] | None = None,
                       deadline: float | None = None, args_of=None, batched: bool = False) -> list[Any]:
        """``method`` on every shard (or the shards ``only`` names) at once; a shard's answer,
        or None when it had none by the deadline (dead replicas are retried until then). A
        client error from any shard is the request's error. ``batched``: a search, sent in its
        shard's next batched call (``xmr.serve.fanout``) rather than a call of its own."""
        budget = self.settings.shard_deadline_s
        deadline = deadline or time.monotonic() + budget
        which = list(range(len(self.shards))) if only is None else only
        if batched:
            tasks = {s: self._batcher(s).submit(args[0]) for s in which}
        else:
            tasks = {s: asyncio.ensure_future(self._call(method, *(args_of(s) if args_of else args),
                                                         handle=self.shards[s], budget_s=budget))
                     for s in which}
        try:
            await asyncio.wait(tasks.values(), timeout=max(0.0, deadline - time.monotonic()))
        finally:  # past the deadline, or this request cancelled (its client gone): nobody waits for the rest
            for t in tasks.values():
                if not t.done():
                    t.cancel()
        out: list[Any] = [None] * len(self.shards)
        ended = {s: t.exception() for s, t in tasks.items() if t.done() and not t.cancelled()}  # each read once
        for s, exc in ended.items():
            if isinstance(exc, RequestError) and 400 <= exc.status < 500:
                raise exc  # the client's error: the same from every shard
        for s, exc in ended.items():
            if exc is None:
                out[s] = tasks[s].result()
            elif not isinstance(exc, RequestError):  # a shard's own fault: that shard is missing, not the query
                logger.warning("shard %d failed: %s: %s", s, type(exc).__name__, str(exc)[:300])
        return out

    def _missing(self, missing: list[int]) -> None:
        if missing:
            self.partial += 1
            for s in missing:
                self.missing_counts[s] += 1

    def _flagged(self, body: dict[str, Any], per_shard: list[Any]) -> dict[str, Any]:
        """The merged answer with which shards it lacks: counted, and never silent."""
        missing = [s for s, ans in enumerate(per_shard) if ans is None]
        if len(missing) == len(per_shard):
            raise RequestError(503, "no shard of the index answered in time (replicas restarting or overloaded); "
                                    "retry shortly")
        self._missing(missing)
        return {**body, "shards": len(per_shard), "missing_shards": missing, "partial": bool(missing)}

    async def _search_shards(self, query: SearchQuery) -> dict[str, Any]:
        per_shard = await self._scatter("search", query, batched=True)
        hits = merge_hits(per_shard, query.k)
        return self._flagged({"modality": query.other, "k": query.k, "results": hits}, per_shard)

    async def _moments_shards(self, query: MomentsQuery) -> dict[str, Any]:
        deadline = time.monotonic() + self.settings.shard_deadline_s
        if query.video is not None:  # SVMR: the one shard that holds the video answers
            return await self._svmr_shards(query, deadline)
        rounds: list[int] = []

        async def ask(shards: list[int], ks: list[int]) -> list[Any]:
            """One round: the first has the deadline; a second round goes only to shards that
            answered the first (alive), so it gets a deadline of its own rather than the
            first round's remainder (spent waiting on a stalled shard)."""
            k_of = dict(zip(shards, ks))
            limit = deadline if not rounds else time.monotonic() + self.settings.shard_deadline_s
            rounds.append(len(shards))
            out = await self._scatter("moments_videos", only=shards, deadline=limit,
                                      args_of=lambda s: (dataclasses.replace(query, k=k_of[s]),))
            return [out[s] for s in shards]

        top = self.settings.top_videos
        per_shard = await moments_across(ask, len(self.shards), query.k, top)
        return self._flagged({"k": query.k, "results": merge_moments(per_shard, query.k, top)}, per_shard)

    async def _svmr_shards(self, query: MomentsQuery, deadline: float) -> dict[str, Any]:
        """The shard that holds the video answers (the others say 404): its answer is
        returned as soon as it arrives."""
        tasks = {asyncio.ensure_future(self._call("svmr", query, handle=h, budget_s=self.settings.shard_deadline_s)): s
                 for s, h in enumerate(self.shards)}
        pending, answered = set(tasks), set()
        try:
            while pending:
                done, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()),
                                                   return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break
                for t in done:
                    exc = t.exception()
                    if exc is None:
                        return {"k": query.k, "video": query.video, "results": t.result(), "shards": len(tasks),
                                "missing_shards": [], "partial": False}
                    if isinstance(exc, RequestError) and exc.status == 404:
                        answered.add(tasks[t])
                    elif isinstance(exc, RequestError) and 400 <= exc.status < 500:
                        raise exc
        finally:
            for t in pending:
                t.cancel()
        missing = sorted(set(tasks.values()) - answered)
        if missing:
            self._missing(missing)
            raise RequestError(503, f"video {query.video[:80]!r} is in none of the shards that answered; shard(s) "
                                    f"{missing} did not answer in time: retry shortly")
        raise RequestError(404, f"video {query.video[:80]!r}: not in the served corpus")

    # ------------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        if self.shards:  # degraded (some shards down) still answers, flagged: it is up to the probe
            per_shard = await self._scatter("healthy")
            down = [s for s, ok in enumerate(per_shard) if ok is None]
            if len(down) == len(per_shard):
                raise RequestError(503, "no shard has a ready replica")
            return {"status": "degraded" if down else "ok", "shards": len(per_shard), "missing_shards": down}
        await self._call("healthy")
        return {"status": "ok"}

    @api.get("/info")
    async def info(self) -> dict[str, Any]:
        common = {"retried_calls": self.retried, "auth": key_configured()}
        if not self.shards:
            return {**await self._call("info"), **common}
        per_shard = await self._scatter("info")
        first = next((i for i in per_shard if i is not None), None)
        if first is None:
            raise RequestError(503, "no shard of the index answered in time; retry shortly")
        items = self.settings.shard_items
        shards = [{"shard": s, "items": items[s], "answering": i is not None,
                   "missing_from_answers": self.missing_counts[s],
                   "gateway_calls": self.batchers[s].stats() if self.batchers else None,
                   **({k: i[k] for k in ("replica", "search", "gallery", "batching")} if i else {})}
                  for s, i in enumerate(per_shard)]
        return {**{k: v for k, v in first.items() if k not in ("replica", "gallery", "batching")},
                "gallery_size": sum(items), "gallery": "sharded", "shards": shards,
                "partial_answers": self.partial, **common}

    @api.post("/search", response_model=SearchResponse, openapi_extra=body_schema(SearchRequest))
    async def search(self, request: Request) -> Response:
        req, binary = await parse_request(request, SearchRequest)
        query = await self._search_query(req, binary)
        if self.shards:
            return JSONBytes(await self._search_shards(query))
        return JSONBytes({"modality": query.other, "k": query.k, "results": await self._call("search", query)})

    @api.post("/moments", response_model=MomentsResponse, openapi_extra=body_schema(MomentsRequest))
    async def moments(self, request: Request) -> Response:
        req, binary = await parse_request(request, MomentsRequest)
        query = await self._moments_query(req, binary)
        if self.shards:
            return JSONBytes(await self._moments_shards(query))
        if query.video is not None:
            return JSONBytes({"k": query.k, "video": query.video, "results": await self._call("svmr", query)})
        return JSONBytes({"k": query.k, "results": await self._call("moments", query)})
