"""One progress line every N seconds for long loops outside training (evaluation's corpus
encoding and query ranking, ``xmr eval``, ``xmr index build``): what is done of how much,
the rate and an ETA. Quiet for loops shorter than N seconds (the default 30 s; the runtime's
``progress_every_s``, from ``XMR_PROGRESS_EVERY_S``; 0 turns it off); only rank 0 of a
data-parallel group speaks.

The interval reaches the loops deep inside evaluation and gallery encoding through
``progress_every``, opened from the runtime (``xmr.runtime.Runtime``) where a process's work
starts: ``fit``, ``xmr eval`` and its workers, a comparison's jobs, ``xmr index build`` and its
shard workers, the ``xmr data`` writers; not threaded through every call between (the families'
``evaluate`` / ``build_gallery`` and the loaders know nothing of it). A context variable, so
concurrent work in one process (a sweep's trials) each keeps its own. Outside every block the
default (``DEFAULT_PROGRESS_EVERY_S``) holds: a process that starts work without opening one
ignores ``XMR_PROGRESS_EVERY_S``.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from xmr.runtime import DEFAULT_PROGRESS_EVERY_S

T = TypeVar("T")

_EVERY_S: contextvars.ContextVar[float] = contextvars.ContextVar("xmr_progress_every_s",
                                                                  default=DEFAULT_PROGRESS_EVERY_S)


@contextlib.contextmanager
def progress_every(seconds: float):
    """Within this block, ``with_progress`` prints every ``seconds`` (0: never)."""
    token = _EVERY_S.set(float(seconds))
    try:
        yield
    finally:
        _EVERY_S.reset(token)


def every_s() -> float:
    return _EVERY_S.get()


def _duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def with_progress(items: Iterable[T], what: str, total: int | None, unit: str,
                  count: Callable[[T], int] = lambda _: 1, speak: bool = True) -> Iterator[T]:
    """Yield ``items``; every ``every_s()`` seconds print ``[xmr] <what>: done/total <unit>
    (rate/s, ETA)``. ``count(item)`` is how many units an item holds (a batch's size)."""
    period = every_s()
    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += count(item)
        now = time.perf_counter()
        if speak and period > 0 and now - last >= period:
            last = now
            rate = done / max(now - start, 1e-9)
            of = f"/{total}" if total else ""
            eta = f", ETA {_duration((total - done) / rate)}" if total and rate > 0 and total > done else ""
            print(f"[xmr] {what}: {done}{of} {unit} ({rate:.0f}/s{eta})", flush=True)


def units_in(batch: Any) -> int:
    """How many samples a batch holds (its ``index`` length)."""
    return len(batch["index"]) if isinstance(batch, dict) and "index" in batch else 1
