"""The one registry of loss terms, and the objective that sums them.

A term is a small ``nn.Module`` that reads the model's output dict and the batch and
returns one scalar. Presets and search spaces refer to terms by their registry name
(``loss.lambdas.<name>``). A term whose λ is 0 is never built, so it costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from xmr.config import Config

_TERMS: dict[str, type["LossTerm"]] = {}


class LossTerm(nn.Module):
    """Base class: ``__init__(cfg)``, ``forward(out, batch) -> scalar``."""

    name: str = ""

    def __init__(self, cfg: "Config") -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:  # pragma: no cover
        raise TypeError(f"{type(self).__name__} must define forward(out, batch)")


def register_term(name: str) -> Callable[[type[LossTerm]], type[LossTerm]]:
    """Class decorator: make a term available as ``loss.lambdas.<name>``."""

    def wrap(cls: type[LossTerm]) -> type[LossTerm]:
        if name in _TERMS and _TERMS[name] is not cls:
            raise ValueError(f"loss term {name!r} registered twice ({_TERMS[name].__name__}, {cls.__name__})")
        cls.name = name
        _TERMS[name] = cls
        return cls

    return wrap


def _load_builtin_terms() -> None:
    # Importing the package registers every built-in term (each module uses @register_term).
    import xmr.losses  # noqa: F401


def known_terms() -> dict[str, type[LossTerm]]:
    _load_builtin_terms()
    return dict(_TERMS)


def get_term(name: str) -> type[LossTerm]:
    terms = known_terms()
    if name not in terms:
        raise KeyError(f"unknown loss term {name!r} (known terms: {sorted(terms)})")
    return terms[name]


class Objective(nn.Module):
    """Σ λ_i · term_i over the terms with λ_i > 0; returns every term by name for logging."""

    def __init__(self, cfg: "Config") -> None:
        super().__init__()
        self.weights = {name: float(w) for name, w in cfg.loss.lambdas.items() if w > 0}
        self.terms = nn.ModuleDict({name: get_term(name)(cfg) for name in self.weights})

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        values = {name: term(out, batch) for name, term in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in values.items())
        result = {"loss": total}
        result.update({name: value.detach() for name, value in values.items()})
        return result
