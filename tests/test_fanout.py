"""The gateway's batched shard calls (``xmr.serve.fanout``): what is sent together, that every
query gets its own answer, and that a query that gives up is neither sent nor held."""

from __future__ import annotations

import asyncio

import pytest

from xmr.serve.fanout import ShardBatcher


class Shard:
    """A shard whose calls wait until released: what each call carried, in order."""

    def __init__(self, fail: set[int] = frozenset()) -> None:
        self.calls: list[list[int]] = []
        self.gates: list[asyncio.Event] = []
        self.fail = fail  # queries answered with their own error

    async def send(self, queries: list[int]) -> list[object]:
        self.calls.append(list(queries))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if "boom" in queries:
            raise ConnectionError("the replica died")
        return [ValueError(f"bad {q}") if q in self.fail else q * 10 for q in queries]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_queries_that_arrive_while_calls_are_in_flight_leave_together():
    async def go():
        shard = Shard()
        b = ShardBatcher(shard.send, max_batch=3, in_flight=2)
        futs = [b.submit(q) for q in range(7)]
        await _settle()
        assert shard.calls == [[0], [1]]  # two slots: the first two go at once, alone
        shard.gates[0].set()
        await _settle()
        assert shard.calls[2] == [2, 3, 4]  # a slot freed: the queue leaves, max_batch at a time
        shard.gates[1].set()
        await _settle()
        assert shard.calls[3] == [5, 6]
        for g in shard.gates[2:]:
            g.set()
        assert await asyncio.gather(*futs) == [q * 10 for q in range(7)]
        assert b.stats() == {"calls": 4, "queries": 7, "mean_batch": 1.75}

    asyncio.run(go())


def test_a_lone_query_waits_for_nothing():
    async def go():
        shard = Shard()
        b = ShardBatcher(shard.send, max_batch=32)
        fut = b.submit(4)
        await _settle()
        assert shard.calls == [[4]]
        shard.gates[0].set()
        assert await fut == 40

    asyncio.run(go())


def test_each_query_gets_its_own_error_and_a_failed_call_fails_its_batch_only():
    async def go():
        shard = Shard(fail={2})
        b = ShardBatcher(shard.send, max_batch=8, in_flight=1)
        first = b.submit(1)
        batch = [b.submit(q) for q in (2, 3, "boom")]
        after = b.submit(5)
        await _settle()
        shard.gates[0].set()
        assert await first == 10
        await _settle()
        assert shard.calls[1] == [2, 3, "boom", 5]
        shard.gates[1].set()
        done = await asyncio.gather(*batch, after, return_exceptions=True)
        assert all(isinstance(x, ConnectionError) for x in done)  # the whole call failed
        shard2 = Shard(fail={2})
        b2 = ShardBatcher(shard2.send, max_batch=8, in_flight=1)
        futs = [b2.submit(q) for q in (1, 2, 3)]
        await _settle()
        for _ in range(2):
            for g in shard2.gates:
                g.set()
            await _settle()
        got = await asyncio.gather(*futs, return_exceptions=True)
        assert got[0] == 10 and isinstance(got[1], ValueError) and str(got[1]) == "bad 2" and got[2] == 30

    asyncio.run(go())


def test_a_query_that_gave_up_is_not_sent_and_a_stalled_shard_holds_no_one():
    """A stalled call: the queries behind it wait only as long as they choose (their deadline,
    as the gateway's asyncio.wait gives them); those that gave up are dropped from the queue,
    and when the shard comes back the rest are sent and answered."""

    async def go():
        shard = Shard()
        b = ShardBatcher(shard.send, max_batch=8, in_flight=1)
        stalled = b.submit(0)
        waiting = [b.submit(q) for q in (1, 2, 3)]
        done, pending = await asyncio.wait(waiting, timeout=0.05)
        assert not done  # the shard is stalled: nobody answered, but the wait ended on time
        pending_list = list(pending)
        for f in waiting[:2]:  # two give up at their deadline
            f.cancel()
        shard.gates[0].set()  # the shard comes back
        assert await stalled == 0
        await _settle()
        assert shard.calls == [[0], [3]]  # the two that gave up were not sent
        shard.gates[1].set()
        assert await waiting[2] == 30 and len(pending_list) == 3

    asyncio.run(go())


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="max_batch = 0"):
        ShardBatcher(lambda qs: qs, max_batch=0)


def test_a_hung_call_frees_its_slot_when_its_queries_give_up_and_the_queue_keeps_only_waiting_queries():
    """A replica that never answers: once every query of a call has given up, the call is
    cancelled (the next query gets a call of its own, which Serve may route elsewhere);
    queries that give up while queued leave the queue at once (no growth during a stall)."""

    async def go():
        shard = Shard()
        b = ShardBatcher(shard.send, max_batch=4, in_flight=2)
        hung = [b.submit(q) for q in (0, 1)]  # both slots taken by calls that never return
        await _settle()
        queued = [b.submit(q) for q in range(100, 1100)]
        await _settle()
        assert len(shard.calls) == 2 and len(b.queue) == 1000
        for f in queued:
            f.cancel()
        await _settle()
        assert len(b.queue) == 0  # the abandoned queries are gone, not held
        for f in hung:
            f.cancel()
        await _settle()
        assert len(b.running) == 0  # both hung calls cancelled: their slots are free
        fresh = b.submit(7)
        await _settle()
        assert shard.calls[-1] == [7]
        shard.gates[-1].set()
        assert await fresh == 70

    asyncio.run(go())


def test_a_call_lives_at_most_its_timeout():
    async def go():
        shard = Shard()
        b = ShardBatcher(shard.send, max_batch=4, in_flight=1, call_timeout_s=0.05)
        fut = b.submit(1)
        with pytest.raises(asyncio.TimeoutError):
            await fut
        await _settle()
        assert len(b.running) == 0
        nxt = b.submit(2)
        await _settle()
        shard.gates[-1].set()
        assert await nxt == 20 and shard.calls == [[1], [2]]

    asyncio.run(go())


def test_a_call_per_query_when_batching_is_off():
    """Autoscaled retrievers: max_batch 1 and no cap on calls, so Serve sees every query."""

    async def go():
        shard = Shard()
        b = ShardBatcher(shard.send, max_batch=1, in_flight=2 ** 31)
        futs = [b.submit(q) for q in range(5)]
        await _settle()
        assert shard.calls == [[q] for q in range(5)]
        for g in shard.gates:
            g.set()
        assert await asyncio.gather(*futs) == [0, 10, 20, 30, 40]

    asyncio.run(go())
