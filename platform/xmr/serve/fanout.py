"""The gateway's calls to one shard, batched: queries that arrive while a shard's calls are
in flight go to it together in its next call.

Why: over a sharded index every query is a call to every shard, and on a small machine a
Ray Serve call costs far more CPU than the search it carries (an IVF-PQ search of a 1M-item
shard is ~0.1 ms; a handle call and its replica's request handling are milliseconds). At
eight clients over four shards, 5 calls a query (the ingress's and four shard calls) held the
sharded index to 4.7x the QPS of exact search (38.9 against 8.3 QPS; commit 831b14a's message);
batched, 5.9x (``bench/results/serve_shards.json``). Batching the shard calls divides their count by the batch.

Why not ``@serve.batch`` on the gateway: a batch is one coroutine, so a shard that stalls
holds every query of the batch (and, at ``max_concurrent_batches``, the queries behind it)
until the shard deadline. Here each query waits on its own future with its own deadline: a
query still answers from the other shards when its deadline passes, and leaves a stalled
shard's queue at once.

The policy: at most ``in_flight`` calls to a shard at once; a query that finds a slot free is
sent at once (a lone query waits for nothing); the rest queue and leave together, up to
``max_batch`` a call, when a call returns.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from typing import Any, Awaitable, Callable

# Calls in flight to one shard: two keep a shard busy (one computed while the next is sent
# and its answer returned) and leave the rest of the queue to form the next batch.
IN_FLIGHT = 2


class ShardBatcher:
    """One shard's queue. ``send(queries) -> answers`` (in order; an answer may be an
    exception, that query's own error) is the shard call; its failure is every query's.

    A call lives at most ``call_timeout_s`` (the gateway's shard deadline: no query it carries
    waits longer, having been queued before it was sent), and is cancelled as soon as every
    query it carries has given up, so a hung replica frees its slot and the next call can go
    to another replica. A query that gives up while queued leaves the queue at once: the
    queue holds only queries still waiting (at most the arrival rate times their deadline).
    ``max_batch=1`` and a large ``in_flight`` make it a call per query (what Serve's
    autoscaler needs to see each query as a request)."""

    def __init__(self, send: Callable[[list[Any]], Awaitable[list[Any]]], max_batch: int,
                 in_flight: int = IN_FLIGHT, call_timeout_s: float | None = None) -> None:
        if max_batch < 1 or in_flight < 1:
            raise ValueError(f"max_batch = {max_batch}, in_flight = {in_flight}: both at least 1")
        self.send, self.max_batch, self.in_flight = send, max_batch, in_flight
        self.call_timeout_s = call_timeout_s
        self.queue: dict[asyncio.Future, Any] = {}  # waiting queries, in arrival order
        self.running: set[asyncio.Task] = set()  # the calls in flight (held: asyncio keeps tasks weakly)
        self.calls = 0  # shard calls made
        self.sent = 0  # queries they carried

    def submit(self, query: Any) -> asyncio.Future:
        """The query's answer, as a future its caller may abandon (cancel) at its deadline."""
        fut = asyncio.get_running_loop().create_future()
        self.queue[fut] = query
        fut.add_done_callback(self._left)
        self._pump()
        return fut

    def _left(self, fut: asyncio.Future) -> None:
        self.queue.pop(fut, None)  # gave up while queued: never sent

    def _pump(self) -> None:
        while self.queue and len(self.running) < self.in_flight:
            batch = [(self.queue.pop(fut), fut) for fut in list(itertools.islice(self.queue, self.max_batch))]
            self.calls += 1
            self.sent += len(batch)
            task = asyncio.ensure_future(self._run(batch))
            self.running.add(task)
            task.add_done_callback(self._finished)
            for _, fut in batch:
                fut.add_done_callback(functools.partial(self._abandoned, task, batch))

    def _finished(self, task: asyncio.Task) -> None:
        self.running.discard(task)
        self._pump()

    @staticmethod
    def _abandoned(task: asyncio.Task, batch: list[tuple[Any, asyncio.Future]], _fut: asyncio.Future) -> None:
        if not task.done() and all(f.done() for _, f in batch):
            task.cancel()  # nobody waits for this call any more

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            answers = await asyncio.wait_for(self.send([q for q, _ in batch]), self.call_timeout_s)
            if len(answers) != len(batch):
                raise RuntimeError(f"a shard answered {len(answers)} queries of {len(batch)}")
        except asyncio.CancelledError:
            for _, fut in batch:
                fut.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - the call's failure (a timeout too) is each query's
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
        else:
            for (_, fut), answer in zip(batch, answers):
                if fut.done():
                    continue
                if isinstance(answer, BaseException):
                    fut.set_exception(answer)
                else:
                    fut.set_result(answer)

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls, "queries": self.sent,
                "mean_batch": round(self.sent / self.calls, 2) if self.calls else 0.0}
