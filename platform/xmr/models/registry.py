"""Registry of model families; a model is rebuilt from the config stored with its weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from torch import nn

if TYPE_CHECKING:
    from xmr.config import Config

_MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a model available as ``model.name: <name>``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model {name!r} registered twice ({_MODELS[name].__name__}, {cls.__name__})")
        _MODELS[name] = cls
        return cls

    return wrap


def known_models() -> dict[str, type[nn.Module]]:
    import xmr.models  # noqa: F401  (registers the built-in models)

    return dict(_MODELS)


def build_model(cfg: "Config") -> nn.Module:
    """Instantiate ``cfg.model.name``; needs ``cfg.model.dims`` (see ``xmr.config.resolve``)."""
    models = known_models()
    if cfg.model.name not in models:
        raise KeyError(f"model.name = {cfg.model.name!r}: unknown model (known models: {sorted(models)})")
    if not cfg.model.dims:
        raise ValueError("model.dims is empty: resolve the config against the dataset manifest first "
                         "(xmr.config.resolve) or load it from a checkpoint")
    return models[cfg.model.name](cfg)


def load_pretrained(model: nn.Module, checkpoint_dir: str) -> None:
    """Initialise ``model`` from another run's checkpoint (e.g. mixer-MAE pre-training).

    Called by the training entry points for a fresh run, never by ``build_model``: a
    fine-tuned checkpoint must rebuild without the pre-training files being present.
    """
    from xmr.checkpoint import load_checkpoint

    _, state, _ = load_checkpoint(checkpoint_dir)
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    own = model.state_dict()
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
                  if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(weights))
    if mismatched or missing:
        raise ValueError(f"model.pretrained = {checkpoint_dir!r} does not fit this model: "
                         f"shape mismatches {mismatched[:5]}, missing {missing[:5]}")
    model.load_state_dict(weights, strict=False)
