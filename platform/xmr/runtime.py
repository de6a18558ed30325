"""How this xmr process runs, as opposed to what it trains: verbosity, the cache folder, the
progress interval, where Ray is. Built once where a command starts (``Runtime.from_env``:
the command's flags over the environment) and passed down as an argument; a Ray worker gets
it in its job's payload or its actor's arguments (``to_dict`` / ``from_dict``).

This is the one module that reads xmr's own environment variables, so that what a command
does follows from its arguments: nothing in xmr writes the environment to tell another part
of itself something (``--verbose`` once became ``XMR_VERBOSE=1`` in ``os.environ``, read back
at six places). Credentials (S3, MLflow, the endpoint's key) are read where they are taken
in (``xmr.data.storage``, ``xmr.train.tracking``, serve's key intake), and the variables Ray
itself reads are set in ``xmr.ray.compat``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The folder xmr caches in (fetched checkpoints, built indexes, the text encoder, MLflow's
# empty store, an S3 sweep's local study): one default, named once.
DEFAULT_CACHE = str(Path.home() / ".cache" / "xmr")
# A progress line every N seconds: in training epochs (``tracking.progress_every_s``) and in the
# long loops outside training (the runtime's ``progress_every_s``); one default for both.
DEFAULT_PROGRESS_EVERY_S = 30.0
DEFAULT_SERVE_HOST = "127.0.0.1"

# variable -> (field, parser); ``XMR_VERBOSE=1`` is the same as ``--verbose``
ENVIRONMENT = {
    "XMR_VERBOSE": ("verbose", lambda text: text.strip() == "1"),
    "XMR_CACHE": ("cache", str),
    "XMR_PROGRESS_EVERY_S": ("progress_every_s", float),
    "XMR_STUDY_CACHE": ("study_cache", str),
    "XMR_SERVE_HOST": ("serve_host", str),
    "RAY_ADDRESS": ("ray_address", str),
}


@dataclass(frozen=True)
class Runtime:
    """One command's runtime settings. The defaults are what a command gets with no flag and
    no variable set; a test builds one with exactly what it needs."""

    verbose: bool = False  # Ray's own lines beside xmr's (--verbose, XMR_VERBOSE=1)
    cache: str = DEFAULT_CACHE  # XMR_CACHE
    progress_every_s: float = DEFAULT_PROGRESS_EVERY_S  # a progress line every N s outside training; 0 off
    study_cache: str | None = None  # an S3 sweep's local Optuna database (default <cache>/studies)
    serve_host: str = DEFAULT_SERVE_HOST  # the address xmr serve binds (XMR_SERVE_HOST)
    ray_address: str | None = None  # --address, else RAY_ADDRESS; None: a running local Ray or an embedded one

    def __post_init__(self) -> None:
        if not self.progress_every_s >= 0:
            raise ValueError(f"progress_every_s = {self.progress_every_s}: must be >= 0 (XMR_PROGRESS_EVERY_S)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **flags: Any) -> "Runtime":
        """The environment's settings (``ENVIRONMENT``), then the command's flags over them;
        a flag given as None (or ``verbose=False``: the flag not given) leaves the variable's
        value."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, (field, parse) in ENVIRONMENT.items():
            text = environ.get(name)
            if text:
                try:
                    values[field] = parse(text)
                except ValueError:
                    raise ValueError(f"{name}={text!r}: not a valid {field}") from None
        unknown = set(flags) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown runtime settings: {sorted(unknown)}")
        values.update({k: v for k, v in flags.items() if v is not None and not (k == "verbose" and v is False)})
        return cls(**values)

    def replace(self, **changes: Any) -> "Runtime":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """What a Ray worker's payload carries (plain values)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Runtime":
        return cls(**dict(data or {}))

    @property
    def checkpoints(self) -> Path:
        """Fetched S3 checkpoints."""
        return Path(self.cache) / "checkpoints"

    @property
    def indexes(self) -> Path:
        """Built serving indexes."""
        return Path(self.cache) / "indexes"

    @property
    def mlflow(self) -> Path:
        """MLflow's empty, migrated store (copied for each new run's store)."""
        return Path(self.cache) / "mlflow"

    @property
    def studies(self) -> Path:
        """An S3 sweep's local Optuna databases."""
        return Path(self.study_cache) if self.study_cache else Path(self.cache) / "studies"


def keep_hub_offline() -> None:
    """The Hugging Face libraries read these when they load a model: xmr's text encoder ships
    in a package and must never reach a hub, even by accident. The caller's own setting wins."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def quiet_mlflow_uploads() -> None:
    """MLflow reads this when it uploads an artifact: a progress bar per checkpoint would fill
    a run's log. The caller's own setting wins."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def variables_set(names: "Mapping[str, Any] | tuple[str, ...]") -> list[str]:
    """Which of ``names`` the environment sets: variables xmr no longer reads fail by name
    where their setting moved (``xmr.serve.settings.RETIRED_ENV``), never silently ignored."""
    return sorted(name for name in names if name in os.environ)
