"""The one way an xmr command reaches Ray: attach to a cluster or start a local Ray, with one
sizing policy for the local Ray (``local_cpus``) and the code and environment every Ray
process xmr starts needs (``code_runtime_env``).

``xmr train`` / ``tune`` / ``compare`` / ``eval`` / ``serve`` / ``index build`` all start
here; each names what its work needs at once (``need_cpus``), never a CPU count of its own.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from xmr.ray.compat import (check_version, keep_out_of_ray, process_env, quiet_failure_handler, set_driver_env,
                            started_cluster_address)
from xmr.runtime import Runtime

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # platform/xmr

LOCAL = "local"  # Ray's own convention (ray.init(address="local")): start a new local Ray here

# Logical CPUs beyond what the command's work reserves: a trainer's controller, a trial's
# driver, Serve's controller and proxy.
HEADROOM_CPUS = 2


def local_cpus(need: float = 0.0, *, compute_bound: bool = False) -> int:
    """The one sizing policy of a local Ray xmr starts (embedded, or ``--address local``).

    ``need``: what the command's work reserves at once (a trainer's workers with their
    loader workers, two trials of a sweep, a deployment's replicas). Such work mostly waits
    on itself (controllers, loaders, replicas between requests), so the Ray gets logical
    CPUs beyond the cores: two per core, at least 4, and ``need`` plus ``HEADROOM_CPUS``.
    ``compute_bound``: work that computes all the time in its own process (a comparison's
    in-process runs) gets one logical CPU per core, so its runs never share a core and their
    times stay comparable, and never fewer than ``need`` (or the largest would never start).
    """
    cores = os.cpu_count() or 1
    if compute_bound:
        return int(max(cores, math.ceil(need)))
    return int(max(4, 2 * cores, math.ceil(need) + HEADROOM_CPUS))


def is_local(address: str | None) -> bool:
    """``--address local`` / ``RAY_ADDRESS=local``: a new local Ray, never an address to attach to."""
    return (address or "").strip().lower() == LOCAL


def code_runtime_env(extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Ship the xmr package to every worker (``py_modules``), so a cluster runs this checkout's
    code whether or not the package is installed there, with the variables its processes
    need (``xmr.ray.compat.process_env``: Ray's, the S3 endpoint's). xmr's own settings reach
    workers as arguments (``Runtime.to_dict``), not through here."""
    env = process_env()
    env.update(extra_env or {})
    return {"py_modules": [str(PACKAGE_DIR)], "excludes": ["__pycache__", "*.pyc"], "env_vars": env}


def ensure_ray(address: str | None = None, *, runtime: Runtime | None = None, need_cpus: float = 0.0,
               compute_bound: bool = False, num_cpus: int | None = None, quiet: bool = False,
               extra_env: dict[str, str] | None = None, dashboard: bool = True,
               driver_logs: bool | None = None) -> str:
    """Attach to whatever Ray is there, or start one (idempotent); returns how.

    ``address`` (else ``runtime.ray_address``: ``--address`` / ``RAY_ADDRESS``) -> that
    cluster, except ``local`` (Ray's convention: a new local Ray here, sized and set up as
    the embedded default, and said so); else a cluster already running on this machine
    (``ray start``) -> attach to it; else start an embedded local Ray of ``local_cpus(need_cpus,
    compute_bound=...)`` logical CPUs (``num_cpus``: an exact count, for tests and benches).
    Start-only arguments are never passed when attaching (Ray refuses them).
    ``driver_logs=False``: the Ray processes' own lines (workers, raylet, GCS) stay in Ray's
    log files instead of streaming to this console (``log_to_driver``; default: on).
    """
    runtime = runtime or Runtime()
    set_driver_env()  # before Ray is imported: it reads the auth mode then
    import ray

    check_version()
    if ray.is_initialized():
        return "already connected"
    env = code_runtime_env(extra_env)
    address = address or runtime.ray_address
    local = is_local(address)
    # The endpoint's key must not reach the Ray processes started from here; nor may
    # RAY_ADDRESS=local, which is not an address, be read as one by them.
    keep_out_of_ray(("XMR_API_KEY", "RAY_ADDRESS") if local else ("XMR_API_KEY",))
    if local:
        address = None
    logs = True if driver_logs is None else driver_logs
    level = logging.INFO if runtime.verbose else logging.WARNING  # Ray's "Connecting to ..." lines
    if address:
        with quiet_failure_handler(runtime.verbose):
            ray.init(address=address, runtime_env=env, logging_level=level, log_to_driver=logs)
        how = f"attached to the Ray cluster at {address}"
    else:
        how = "" if local else _attach_started(env, level, logs, runtime.verbose)
        if not how:
            cpus = num_cpus or local_cpus(need_cpus, compute_bound=compute_bound)
            _start_local(env, cpus, dashboard, logs, runtime.verbose)
            how = (f"started a new local Ray (--address local) with {cpus} logical CPUs" if local
                   else "started an embedded local Ray")
    if not quiet and (local or not how.startswith("started")):
        print(f"[xmr] {how}", flush=True)
    return how


def _attach_started(env: dict[str, Any], level: int, logs: bool, verbose: bool) -> str:
    """Attach to the cluster ``ray start`` left running on this machine; "" if there is none."""
    import ray

    started = started_cluster_address()
    if not started:
        return ""
    try:
        with quiet_failure_handler(verbose):
            ray.init(address=started, runtime_env=env, logging_level=level, log_to_driver=logs)
    except ConnectionError:  # it went between the check and here
        return ""
    return "attached to the Ray cluster running on this machine (set RAY_ADDRESS or --address for another)"


def _start_local(env: dict[str, Any], cpus: int, dashboard: bool, logs: bool, verbose: bool) -> None:
    """A new local Ray in this process.

    The dashboard (bound to 127.0.0.1) serves Ray's state API, which Ray Train uses to
    release a stopped run's placement group (e.g. a trial ASHA ends early); work with no Ray
    Train in it (a sweep of one-worker trials) goes without: the dashboard's start-up and
    agent cost a 6-trial sweep on 2 cores ~7 s (57 -> 50 s, measured twice, interleaved). A
    local Ray is never preempted: Ray Train's preemption watcher (for spot nodes) only adds
    an error line about its constructor arguments, so it is off here."""
    import ray

    local_env = {**env, "env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", **env["env_vars"]}}
    # address="local": a new Ray whatever address file `ray start` left on the machine
    with quiet_failure_handler(verbose):
        ray.init(address="local", num_cpus=cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 runtime_env=local_env, configure_logging=False, log_to_driver=logs)
