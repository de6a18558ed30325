"""The gateway's calls to one shard, batched: queries that arrive while a shard's calls are
in flight go to it together in its next call.

Why: over a sharded index every query is a call to every shard, and on a small machine a
Ray Serve call costs far more CPU than the search it carries (an IVF-PQ search of a 1M-item
shard is ~0.1 ms; a handle call and its replica's request handling are milliseconds). At
eight clients over four shards, 5 calls a query (the ingress's and four shard calls) held the
sharded index to 4.7x the QPS of exact search (``bench/results/serve_shards.json`` before
this module). Batching the shard calls divides their count by the batch.

Why not ``@serve.batch`` on the gateway: a batch is one coroutine, so a shard that stalls
holds every query of the batch (and, at ``max_concurrent_batches``, the queries behind it)
until the shard deadline. Here each query waits on its own future with its own deadline: a
stalled shard's queue grows, but a query still answers from the other shards when its
deadline passes, and a query that gave up is dropped from the queue before it is sent.

The policy: at most ``in_flight`` calls to a shard at once; a query that finds a slot free is
sent at once (a lone query waits for nothing); the rest queue and leave together, up to
``max_batch`` a call, when a call returns.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

# Calls in flight to one shard: two keep a shard busy (one computed while the next is sent
# and its answer returned) and leave the rest of the queue to form the next batch.
IN_FLIGHT = 2


class ShardBatcher:
    """One shard's queue. ``send(queries) -> answers`` (in order; an answer may be an
    exception, that query's own error) is the shard call; its failure is every query's."""

    def __init__(self, send: Callable[[list[Any]], Awaitable[list[Any]]], max_batch: int,
                 in_flight: int = IN_FLIGHT) -> None:
        if max_batch < 1 or in_flight < 1:
            raise ValueError(f"max_batch = {max_batch}, in_flight = {in_flight}: both at least 1")
        self.send, self.max_batch, self.in_flight = send, max_batch, in_flight
        self.queue: list[tuple[Any, asyncio.Future]] = []
        self.running = 0
        self.calls = 0  # shard calls made
        self.sent = 0  # queries they carried

    def submit(self, query: Any) -> asyncio.Future:
        """The query's answer, as a future its caller may abandon (cancel) at its deadline."""
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((query, fut))
        self._pump()
        return fut

    def _pump(self) -> None:
        while self.running < self.in_flight:
            self.queue = [(q, f) for q, f in self.queue if not f.done()]  # abandoned: not sent
            if not self.queue:
                return
            batch, self.queue = self.queue[:self.max_batch], self.queue[self.max_batch:]
            self.running += 1
            self.calls += 1
            self.sent += len(batch)
            asyncio.ensure_future(self._run(batch))

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            answers = await self.send([q for q, _ in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"a shard answered {len(answers)} queries of {len(batch)}")
        except BaseException as exc:  # noqa: BLE001 - the call's failure is each query's
            for _, fut in batch:
                if not fut.done():
                    if isinstance(exc, asyncio.CancelledError):
                        fut.cancel()
                    else:
                        fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, fut), answer in zip(batch, answers):
                if fut.done():
                    continue
                if isinstance(answer, BaseException):
                    fut.set_exception(answer)
                else:
                    fut.set_result(answer)
        finally:
            self.running -= 1
            self._pump()

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls, "queries": self.sent,
                "mean_batch": round(self.sent / self.calls, 2) if self.calls else 0.0}
