"""Every place xmr leans on something Ray does not promise, in one module, each with why.

Importing this module does not import Ray (``use_token_auth`` must run before Ray is
imported). The rest of xmr uses Ray's public API only; ``tests/test_import_structure.py``
checks that no other module imports a private Ray module (``ray.*._internal``,
``ray.*._private``) or passes Serve's ``_internal``.

When Ray is upgraded: change ``PINNED_RAY`` with ``pyproject.toml``, run the suite, and
revisit each function below (its docstring says what would let it go).
"""

from __future__ import annotations

import logging
import os

PINNED_RAY = "2.60.0"  # the version pyproject.toml pins; the formats below are this version's

# How often Ray Train's controller polls its workers (Ray's default 2 s). The controller
# notices a started, finished or failed worker group up to one interval late, several times
# a run: measured on a 2-core machine, a 2-epoch ``xmr train`` took 41.5 s at 2 s and 34.7 s
# at 0.5 s (two runs each, interleaved). A poll is one small call per worker. A value the
# user sets wins.
TRAIN_POLL_INTERVAL_S = "0.5"


def use_token_auth() -> None:
    """Ray 2.60 turns token authentication on by default and reads the mode when it is
    imported; the CLI, the jobs and every process they start must agree on it. The caller's
    own ``RAY_AUTH_MODE`` wins."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")


def check_version() -> None:
    """A different Ray than the pinned one fails here, by name, not deep inside a run (the
    workarounds below and ``xmr.tune.snapshot`` read this version's formats)."""
    import ray

    if ray.__version__ != PINNED_RAY:
        raise RuntimeError(f"xmr is built and tested against Ray {PINNED_RAY}; this environment has Ray "
                           f"{ray.__version__} (install the pinned version: make setup)")


def started_cluster_address() -> str | None:
    """The address of the cluster ``ray start`` last started on this machine (its bootstrap
    file), or None. xmr attaches only to such a cluster: ``ray.init(address="auto")`` also
    attaches to any GCS it finds among the machine's processes, including the embedded,
    private Ray of another xmr command, so an ``xmr serve`` started while ``xmr compare``
    ran deployed into the comparison's Ray and would have died with it. Ray reads this file
    for ``ray.init()`` with no address but offers no public way to ask for it alone; goes
    when it does. None too when nothing listens at that address any more."""
    import socket

    from ray._private.utils import read_ray_address

    address = read_ray_address() or None
    if address:  # a file that outlived its cluster (no `ray stop`): Ray would retry it for ~20 s
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
        except (OSError, ValueError):
            return None
    return address


def process_env() -> dict[str, str]:
    """The environment variables every Ray process xmr starts needs: the auth mode and Ray
    Train's controller poll interval (``TRAIN_POLL_INTERVAL_S``)."""
    return {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                                                TRAIN_POLL_INTERVAL_S)}


def set_driver_env() -> None:
    """Ray Train hands the driver's poll interval to the controllers it starts from it."""
    use_token_auth()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_INTERVAL_S)


def quiet_ray_train() -> None:
    """xmr prints its own epoch lines; Ray Train V2 also logs every report (a full metrics
    dict) through a logger named by its file path, which ``LoggingConfig`` does not reach.
    Quieted unless ``XMR_VERBOSE=1`` (``--verbose``). Goes when Ray Train's logging config
    reaches that logger. A private module: on another Ray its logs simply stay."""
    if os.environ.get("XMR_VERBOSE") == "1":
        return
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def with_version(deployment, version: str):
    """A Serve deployment with a version of xmr's choosing (``xmr.serve.app`` derives it from
    the code and the init arguments, so redeploying a new checkpoint reconfigures live
    replicas instead of replacing them). Serve 2.60 keeps ``version`` for internal use and
    accepts it only with ``_internal=True``; goes when Serve offers a public version again."""
    return deployment.options(version=version, _internal=True)


def validate_cluster_config(config: dict) -> None:
    """The cluster launcher's own schema check of a ``cluster.yaml`` (raises
    ``jsonschema.ValidationError``). Ray exposes it only from a private module."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))
