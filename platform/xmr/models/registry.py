"""Registry of model families; a model is rebuilt from the config stored with its weights.

A model class declares ``provides``: the optional outputs it can compute on request (QACLN's
cross-video scores, the mixer's reconstruction). ``build_model`` passes it the ones the
loss terms need (``xmr.losses.registry.outputs_needed``); it computes those and no others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

from torch import nn

from xmr.config import ConfigError

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


def model_class(cfg: "Config") -> type[nn.Module]:
    models = known_models()
    if cfg.model.name not in models:
        raise KeyError(f"model.name = {cfg.model.name!r}: unknown model (known models: {sorted(models)})")
    return models[cfg.model.name]


def check_outputs(cfg: "Config", outputs: Mapping[str, list[str]]) -> frozenset[str]:
    """The requested outputs ({output: [terms that read it]}) as a set, or ConfigError naming
    the term whose output the model cannot compute."""
    cls = model_class(cfg)
    provides = getattr(cls, "provides", frozenset())
    for output, terms in outputs.items():
        if output not in provides:
            makers = sorted(n for n, c in known_models().items() if output in getattr(c, "provides", ()))
            raise ConfigError(f"model.name = {cfg.model.name!r} does not compute {output!r}, which the loss term "
                              f"{terms[0]!r} reads (models that do: {makers}; or switch the term off)")
    return frozenset(outputs)


def build_model(cfg: "Config", outputs: Mapping[str, list[str]] | None = None) -> nn.Module:
    """Instantiate ``cfg.model.name``, computing ``outputs`` ({output: [terms that read it]},
    ``xmr.losses.registry.outputs_needed``) besides what it always returns; needs
    ``cfg.model.dims`` (see ``xmr.checks.resolve``)."""
    cls = model_class(cfg)
    wanted = check_outputs(cfg, outputs or {})
    if not cfg.model.dims:
        raise ValueError("model.dims is empty: resolve the config against the dataset manifest first "
                         "(xmr.checks.resolve) or load it from a checkpoint")
    return cls(cfg, wanted)
