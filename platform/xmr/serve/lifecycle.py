"""How ``xmr serve`` ends: SIGTERM / SIGINT recorded at any moment (``Signals``), and the
one-line exits: stopped during start-up (``stopped_starting``), drained and stopped once
serving (``shutdown``), or cleaned up after a failed start (``stop_ray``)."""

from __future__ import annotations

import sys
import threading
import time

from xmr.ray.serve import delete_app


class Signals:
    """xmr serve's SIGTERM / SIGINT handling, installed before any Ray starts and again once
    ``ray.init`` has returned (its core worker installs handlers of its own). A signal is
    only recorded (``received``); the main thread polls for it (``wait_started``,
    ``wait_signal``) and acts on it. The handler never raises, as an exception raised inside
    a Ray call (``ray.get`` in Cython) leaves Ray's state half-unwound and prints a chained
    SystemError, and it takes no lock: Python runs it in the main thread between two
    bytecodes, and setting an ``Event`` there deadlocks whenever the main thread is inside
    that Event's ``wait`` holding its lock (a SIGTERM then hung ``xmr serve`` forever)."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.wake = threading.Event()

    def install(self) -> None:
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:  # replaces Ray's handler, which dumps a C++ stack
        import signal

        self.received.append(signal.Signals(signum).name)  # a list append: no lock taken

    def wait_started(self) -> None:
        """Until the start-up thread has finished (it sets ``wake``) or a signal arrived. In
        slices: a signal the kernel hands to another thread (Ray's) runs its Python handler only
        when the main thread next runs Python."""
        while not self.received and not self.wake.wait(0.25):
            pass

    def wait_signal(self) -> None:
        """Until SIGTERM or SIGINT (polled every 0.25 s, for the same reason)."""
        while not self.received:
            time.sleep(0.25)


def stop_ray(embedded: bool, delete: str | None = None, serve_started: bool = False) -> None:
    """After a failed or interrupted start: delete the application ``delete`` (on a cluster
    that keeps running: nothing of it is left behind), or stop the embedded Ray (Serve first
    where it was started, so that an HAProxy it started goes with it)."""
    import ray

    if not ray.is_initialized():
        return
    try:
        from ray import serve

        if embedded:
            if serve_started:
                serve.shutdown()
            ray.shutdown()
        elif delete:
            delete_app(delete)
    except Exception as exc:  # noqa: BLE001 - report and still exit: the process is going away
        print(f"[xmr] warning: clean-up incomplete ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)


def stopped_starting(why: str, embedded: bool, deployed: bool, name: str = "xmr") -> int:
    """SIGTERM / Ctrl-C during start-up: whatever was deployed removed (or the embedded Ray
    stopped), one line, exit 0."""
    stop_ray(embedded, delete=name if deployed else None, serve_started=deployed)
    where = ("embedded Ray stopped" if embedded
             else "the application removed; the cluster keeps running" if deployed else "the cluster keeps running")
    print(f"[xmr] {why} during start-up: stopped before serving; {where}", flush=True)
    return 0


def shutdown(embedded: bool, why: str, name: str = "xmr") -> int:
    """Stop taking requests, let the ones in flight finish (Serve's graceful shutdown, at most
    the deployments' ``graceful_shutdown_timeout_s``: ``--drain-s``), delete the application,
    stop the embedded Ray; one line, exit 0."""
    import ray
    from ray import serve

    t0 = time.perf_counter()
    try:
        delete_app(name)
        if embedded:
            serve.shutdown()
            ray.shutdown()
    except Exception as exc:  # noqa: BLE001 - report and still exit: the process is going away
        print(f"[xmr] warning: shutdown incomplete ({type(exc).__name__}: {exc})", file=sys.stderr)
    where = "embedded Ray stopped" if embedded else "the cluster keeps running"
    print(f"[xmr] {why}: stopped serving after draining in-flight requests ({time.perf_counter() - t0:.1f} s); "
          f"{where}", flush=True)
    return 0
