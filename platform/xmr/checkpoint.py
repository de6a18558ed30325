"""Checkpoints that rebuild their model from the config stored beside the weights.

Layout of a checkpoint directory::

    model.safetensors   Method state_dict (keys "model.*", "objective.*", and with a memory bank
                        "bank.*" and "key_model.*"), no pickled code
    config.yaml         the resolved Config (dims and class counts included)
    meta.json           metrics and free-form facts (step, epoch, ...), plain JSON
    train_state.pt      (training checkpoints only) optimiser and scheduler state, loaded
                        with ``torch.load(weights_only=True)``: tensors and plain values only

Safetensors holds tensors only, so loading can never run code; a truncated or corrupt
file fails with an error that names it. Safetensors also refuses two names for one tensor,
which a tied parameter has (CDAML's shared attention memory is ``model.memory`` and each
trunk's ``memory``): the file holds it once, under its first name, and lists the other names
in its own metadata (``xmr.aliases``), which loading restores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from xmr.config import Config, ConfigError, from_dict
from xmr.data import storage
from xmr.runtime import DEFAULT_CACHE

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
META = "meta.json"
TRAIN_STATE = "train_state.pt"
BEST = "best.json"  # in a run directory: which checkpoint is the best
CHECKPOINT_PREFIX = "checkpoint_epoch"  # a training checkpoint's folder: checkpoint_epochNNNN
CHECKPOINT_FILES = (WEIGHTS, CONFIG, META, TRAIN_STATE)  # what a complete training checkpoint holds
ALIASES = "xmr.aliases"  # the weights file's metadata key: {other name: stored name} of tied tensors


def dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state with each tied tensor once (its first name) and {other name: first name}.
    Tensors that only overlap part of another's memory (views) are copied, not aliased."""
    first: dict[tuple, str] = {}
    seen: set[int] = set()
    out, aliases = {}, {}
    for key, value in state.items():
        if not value.numel():
            out[key] = value
            continue
        ptr = value.untyped_storage().data_ptr()
        ident = (ptr, value.storage_offset(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if ident in first:
            aliases[key] = first[ident]
            continue
        first[ident] = key
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out, aliases


def _aliases(weights: Path, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """The tied names ``save_checkpoint`` listed in the weights file, checked."""
    with safe_open(str(weights), "pt") as f:
        raw = (f.metadata() or {}).get(ALIASES)
    if raw is None:
        return {}
    try:
        aliases = json.loads(raw)
    except ValueError:
        aliases = None
    if not (isinstance(aliases, dict) and all(isinstance(k, str) and isinstance(v, str) and v in state
                                              and k not in state for k, v in aliases.items())):
        raise CheckpointError(f"{weights}: its {ALIASES} metadata is not a map of new names to stored tensors")
    return aliases


def checkpoint_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def checkpoint_epoch(name: str) -> int | None:
    """The epoch of a ``checkpoint_epochNNNN`` folder name, else None."""
    rest = name[len(CHECKPOINT_PREFIX):] if name.startswith(CHECKPOINT_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or does not fit its config."""


def save_checkpoint(directory: str | Path, method: torch.nn.Module, cfg: Config,
                    metrics: dict[str, Any] | None = None, **meta: Any) -> Path:
    """Write weights, resolved config and metadata; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, aliases = dedupe_tied({k: v.detach().contiguous().cpu() for k, v in method.state_dict().items()})
    # Write to temporary names and rename, so a crash never leaves a half-written checkpoint.
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={ALIASES: json.dumps(aliases)} if aliases else None)
    tmp.replace(directory / WEIGHTS)
    (directory / CONFIG).write_text(cfg.to_yaml())
    (directory / META).write_text(json.dumps({"metrics": metrics or {}, **meta}, indent=2, default=float))
    return directory


def load_checkpoint(directory: str | Path) -> tuple[Config, dict[str, torch.Tensor], dict[str, Any]]:
    """Return (config, state_dict, meta) without unpickling anything."""
    directory = Path(directory)
    weights, config = directory / WEIGHTS, directory / CONFIG
    for path in (weights, config):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (is {directory} an xmr checkpoint directory?)")
    try:
        cfg = from_dict(yaml.safe_load(config.read_text()) or {})
    except (ConfigError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{config}: invalid checkpoint config ({exc})") from None
    try:
        state = load_file(str(weights))
        aliases = _aliases(weights, state)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable or truncated weights file ({exc})") from None
    state.update({alias: state[key] for alias, key in aliases.items()})
    meta_path = directory / META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return cfg, state, meta


def save_train_state(directory: str | Path, state: dict[str, Any]) -> None:
    """Optimiser / scheduler / RNG state beside the weights (plain values and tensors only)."""
    directory = Path(directory)
    tmp = directory / (TRAIN_STATE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(directory / TRAIN_STATE)


def load_train_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a model-only checkpoint cannot resume training)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, or an object weights_only refuses to unpickle
        raise CheckpointError(f"{path}: unreadable or truncated training state ({exc})") from None


def fetch_checkpoint(uri: str, *, endpoint_url: str | None = None, cache_dir: str | None = None,
                     _via: str | None = None) -> Path:
    """A local checkpoint directory for ``uri``: a checkpoint directory or a run directory
    (whose ``best.json`` names its best checkpoint), on local disk or ``s3://``. S3
    checkpoints are downloaded once into a cache keyed by their URI, under ``cache_dir`` (the
    runtime's ``cache``; default ``xmr.runtime.DEFAULT_CACHE``). A ``best.json`` is
    followed once: one that points at a run directory (its own included) is an error."""
    best = storage.join(uri, BEST)
    if storage.exists(best, endpoint_url=endpoint_url):
        if _via is not None:
            raise CheckpointError(f"{_via}: points at {uri}, a run directory, not a checkpoint directory")
        try:
            target = json.loads(storage.read_bytes(best, endpoint_url=endpoint_url))["checkpoint"]
            if not isinstance(target, str) or not target:
                raise TypeError(f"checkpoint = {target!r}")
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{best}: not a valid best-checkpoint pointer ({exc})") from None
        return fetch_checkpoint(target, endpoint_url=endpoint_url, cache_dir=cache_dir, _via=best)
    if not storage.is_s3(uri):
        path = Path(uri)
        if not (path / WEIGHTS).is_file():
            raise CheckpointError(f"{uri}: neither a checkpoint directory ({WEIGHTS}) nor a run directory ({BEST})")
        return path
    cache = Path(cache_dir or DEFAULT_CACHE) / "checkpoints"
    local = cache / hashlib.sha1(uri.encode()).hexdigest()[:16]
    if not (local / WEIGHTS).is_file():
        part = local.with_name(f"{local.name}.part-{os.getpid()}")
        try:
            storage.download_dir(uri, str(part), endpoint_url=endpoint_url, progress=False)
        except FileNotFoundError:
            raise CheckpointError(f"{uri}: nothing there (no checkpoint or run directory)") from None
        if not (part / WEIGHTS).is_file():
            raise CheckpointError(f"{uri}: no {WEIGHTS} there (not an xmr checkpoint)")
        if local.exists():  # a concurrent download finished first
            shutil.rmtree(part, ignore_errors=True)
        else:
            part.replace(local)
    return local
