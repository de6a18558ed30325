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
    """Every registered model (importing this package registers the built-in ones)."""
    return dict(_MODELS)


def build_model(cfg: "Config") -> nn.Module:
    """Instantiate ``cfg.model.name``; needs ``cfg.model.dims`` (see ``xmr.checks.resolve``)."""
    models = known_models()
    if cfg.model.name not in models:
        raise KeyError(f"model.name = {cfg.model.name!r}: unknown model (known models: {sorted(models)})")
    if not cfg.model.dims:
        raise ValueError("model.dims is empty: resolve the config against the dataset manifest first "
                         "(xmr.checks.resolve) or load it from a checkpoint")
    return models[cfg.model.name](cfg)
