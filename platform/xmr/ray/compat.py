"""Every place xmr leans on something Ray does not promise, each with why, and the variables
Ray reads from the environment of the processes it starts.

Importing this module does not import Ray (``use_token_auth`` must run before Ray is
imported). Outside ``xmr.ray`` xmr uses Ray's public API only; ``tests/test_import_structure.py``
checks that no other module names a private Ray symbol (``ray._private``, ``_get_global_client``),
passes an underscore keyword to Ray, or names Ray's internal actor classes.

When Ray is upgraded: change ``PINNED_RAY`` with ``pyproject.toml``, run the suite, and
revisit each function below (its docstring says what would let it go).
"""

from __future__ import annotations

import contextlib
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
    workarounds below and ``xmr.ray.tune_state`` read this version's formats)."""
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


# Ray's C++ core installs Abseil's failure signal handler in every process it starts and in
# the driver (when ``ray.init`` connects): on SIGTERM it dumps a stack ("*** SIGTERM received
# at time=... PC: @ ... clock_nanosleep", logging.cc lines) before dying. A command that exits
# on SIGTERM / Ctrl-C with a line of its own keeps it off in its own process. Ray reads this
# variable (not part of its documented API) when a process's core worker starts.
FAILURE_HANDLER_ENV = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"


@contextlib.contextmanager
def quiet_failure_handler(verbose: bool = False):
    """For the ``ray.init`` inside it, the driver process (this one) gets no Abseil failure
    signal handler (``FAILURE_HANDLER_ENV``): xmr's own SIGTERM / SIGINT handlers decide how it
    exits, with one line. A local Ray started inside it inherits the variable (its processes
    are started from here and read it then): they, too, stop on SIGTERM without a stack dump in
    their log files; a crash (SIGSEGV) in them then has no C++ stack in its log. ``verbose``
    (``--verbose``) keeps Ray's handler everywhere. The caller's own setting wins. Goes when Ray
    offers a public switch, or stops handling SIGTERM as a failure."""
    if verbose or FAILURE_HANDLER_ENV in os.environ:
        yield
        return
    os.environ[FAILURE_HANDLER_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(FAILURE_HANDLER_ENV, None)


# The driver threads through which Ray prints what its processes report: the GCS's error
# messages for this job ("(raylet) Task ServeController.graceful_shutdown failed ...", "A
# worker died ...") and, with ``log_to_driver``, its workers' lines. Ray's thread names, not
# an API: where they change, those lines simply reach the console again.
RAY_CONSOLE_THREADS = ("ray_listen_error_messages", "ray_print_logs")


class _ByThread:
    """A text stream that sends what Ray's console threads write to ``log`` and everything
    else to ``console``."""

    def __init__(self, console, log) -> None:
        self._console, self._log = console, log

    def write(self, text: str) -> int:
        import threading

        if threading.current_thread().name in RAY_CONSOLE_THREADS:
            self._log.write(text)
            self._log.flush()
            return len(text)
        return self._console.write(text)

    def flush(self) -> None:
        self._console.flush()

    def __getattr__(self, name: str):  # fileno, isatty, encoding, ...: the console's
        return getattr(self._console, name)


def divert_ray_console(command: str, verbose: bool = False) -> str | None:
    """Ray's own lines out of a command's console into a log file, for a command that
    promises its own lines only (``xmr serve``, ``xmr index build`` without ``--verbose``):

    - Ray's C++ core writes its ERROR lines (``core_worker.cc ... has constructor arguments
      in the object store``, failures to reach a stopping cluster) to file descriptor 2,
      whatever Python's logging says, and Ray has no switch for the driver's console alone
      (``RAY_BACKEND_LOG_LEVEL`` also reaches the log files of every process a local Ray
      starts). Descriptor 2 goes to the log file; Python's ``sys.stderr`` keeps the terminal
      (a duplicate of the old descriptor), so xmr's error lines and any traceback still
      reach the user.
    - What Ray's console threads print (``RAY_CONSOLE_THREADS``: the job's error messages,
      printed to ``sys.stdout`` with a ``(raylet)`` prefix even without ``log_to_driver``)
      goes to the log file too.

    Returns the log file's path (removed at exit when nothing was written to it); None with
    ``verbose`` (nothing diverted). Call before Ray starts. Goes when Ray's driver keeps its
    native lines and the GCS's error messages in its session's files."""
    import atexit
    import sys
    import tempfile

    if verbose:
        return None
    path = os.path.join(tempfile.gettempdir(), f"xmr-{command}-{os.getpid()}.log")
    try:
        sys.stderr.flush()
        keep = os.dup(2)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:  # no descriptor 2 to move, or nowhere to write: leave the console as it is
        return None
    os.dup2(fd, 2)
    os.close(fd)
    console_err = os.fdopen(keep, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                            errors="backslashreplace")
    log = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    sys.stderr = _ByThread(console_err, log)
    sys.stdout = _ByThread(sys.stdout, log)

    def tidy() -> None:
        try:
            if os.path.getsize(path) == 0:
                os.remove(path)
        except OSError:
            pass

    atexit.register(tidy)
    return path


# The S3 settings (not the keys: those come from the cluster's own credentials) and the
# MLflow server every process of a run needs, to reach the same storage as the driver.
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI")


def process_env() -> dict[str, str]:
    """The environment variables every Ray process xmr starts needs: the auth mode, Ray
    Train's controller poll interval (``TRAIN_POLL_INTERVAL_S``) and the driver's storage
    settings (``STORAGE_ENV``), handed on in the runtime environment."""
    env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                                               TRAIN_POLL_INTERVAL_S)}
    env.update({name: os.environ[name] for name in STORAGE_ENV if os.environ.get(name)})
    return env


def set_driver_env() -> None:
    """Ray Train hands the driver's poll interval to the controllers it starts from it."""
    use_token_auth()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_INTERVAL_S)


def quiet_ray_train(verbose: bool = False) -> None:
    """xmr prints its own epoch lines; Ray Train V2 also logs every report (a full metrics
    dict) through a logger named by its file path, which ``LoggingConfig`` does not reach.
    Quieted unless ``verbose`` (``--verbose``). Goes when Ray Train's logging config
    reaches that logger. A private module: on another Ray its logs simply stay."""
    if verbose:
        return
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def keep_out_of_ray(names: tuple[str, ...]) -> None:
    """A Ray started from this process inherits its environment: ``names`` (the endpoint's key,
    read by ``xmr serve`` before Ray starts; ``RAY_ADDRESS=local``, which no process started
    from here may read as an address) must not reach the raylet, workers or replicas."""
    for name in names:
        os.environ.pop(name, None)


def set_ray_env(values: dict[str, str], *, override: bool = False) -> None:
    """Variables Ray reads from the environment of the process that starts it (and its
    processes inherit), for settings Ray offers no argument for. The operator's own settings
    win unless ``override``."""
    for name, value in values.items():
        if override:
            os.environ[name] = value
        else:
            os.environ.setdefault(name, value)


def quiet_tune_output() -> None:
    """Tune's new output engine prints its experiment box and paths even at ``verbose=0``;
    the old one (chosen by this variable, read when a ``Tuner`` fits) prints nothing there.
    Goes when ``verbose=0`` quiets the new engine."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


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


def optuna_search_records(search):
    """Tune's ``OptunaSearch``: its Optuna study, its live Optuna trials by Tune trial id, and
    the Tune trial ids it has told the study about. ``xmr.tune.study.StudySearch`` records
    pruned trials as PRUNED with one intermediate value per epoch, which Ray's class does
    not; Ray keeps these as private attributes. Goes when OptunaSearch records a stopped trial
    as pruned itself."""
    return search._ot_study, search._ot_trials, search._completed_trials


def ray_setting(name: str, default: str | None = None) -> str | None:
    """A variable Ray reads when it starts, as this process's environment holds it (the
    operator's own setting: ``xmr serve`` checks the ports its HAProxy ingress would bind)."""
    return os.environ.get(name, default)
