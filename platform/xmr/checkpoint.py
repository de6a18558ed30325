"""Checkpoints that rebuild their model from the config stored beside the weights.

Layout of a checkpoint directory::

    model.safetensors   Method state_dict (keys "model.*" and "objective.*"), no pickled code
    config.yaml         the resolved Config (dims and class counts included)
    meta.json           metrics and free-form facts (step, epoch, ...), plain JSON

Safetensors holds tensors only, so loading can never run code; a truncated or corrupt
file fails with an error that names it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from xmr.config import Config, ConfigError, from_dict

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or does not fit its config."""


def save_checkpoint(directory: str | Path, method: torch.nn.Module, cfg: Config,
                    metrics: dict[str, Any] | None = None, **meta: Any) -> Path:
    """Write weights, resolved config and metadata; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in method.state_dict().items()}
    # Write to temporary names and rename, so a crash never leaves a half-written checkpoint.
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
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
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable or truncated weights file ({exc})") from None
    meta_path = directory / META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return cfg, state, meta


def load_method(directory: str | Path):
    """Rebuild the Method (model + loss terms) from a checkpoint alone and load its weights."""
    from xmr.method import Method

    cfg, state, _ = load_checkpoint(directory)
    method = Method(cfg)
    try:
        method.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: weights do not fit the model built from its config ({exc})") from None
    return method
