"""The one registry of loss terms, the factory that builds them, and the objective.

The contract of a term, explicit:
- ``reads``: the config fields it takes, as ``{constructor keyword: dotted field}``;
  ``build_term`` passes exactly those, so a term never sees the whole config and the
  fields each term depends on can be listed (and tested for being live, not inert);
- ``needs``: the model outputs it reads beyond those every model returns (``phi_q2v``,
  ``reconstruction``; ``outputs(settings)`` when they depend on the term's settings). The
  model is asked for the union of the built terms' needs (``outputs_needed``) and computes
  nothing else, so a model never reads a loss weight to learn what to compute;
- ``families``: the task families it applies to; ``strategies``: the negative strategies
  it supports (empty: it takes no negatives); ``uses_bank``: whether it draws negatives
  from the memory bank. ``xmr.checks.check`` rejects configs that ask a term for
  something it cannot do, naming the term;
- ``per_anchor(out, batch, ctx)`` returns one loss per local anchor (``ctx``: the batch's
  relevance targets, computed by the task family, and the memory bank); the base class's
  ``forward`` applies the DDP-correct mean (``xmr.distributed.local_mean``), so no term
  can forget it. A term may ``self.report(name, value)`` diagnostics for the epoch row;
- optional: ``param_groups(lr)`` declares parameters the optimiser trains apart from the
  model's (their own learning rate), ``after_step(optimizer)`` runs extra updates after
  each optimiser step (both return values by name for the step's record), and
  ``validation_metric`` asks for the term's value on validation data as ``val_<term>``.
  The training step (``xmr.train.step``) calls them for every term and names none.

Presets and search spaces refer to terms by their registry name (``loss.lambdas.<name>``);
a term's own settings are the section of that name (``loss.vr_hinge.margin``). A term whose
λ is 0 is never built, so it costs nothing, and neither do the outputs only it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from xmr.distributed import local_mean

if TYPE_CHECKING:
    from xmr.config import Config
    from xmr.losses.negatives import BankView

_TERMS: dict[str, type["LossTerm"]] = {}


@dataclass
class TermContext:
    """What a term gets besides the model's outputs and the batch, and what the terms of
    one step share: ``shared(key, make)`` computes a value once per step (the gathered
    candidates, a similarity matrix) for every term that asks for it. A context lives for
    one step; ``Objective`` and ``LossTerm`` make a fresh one when none is given."""

    targets: torch.Tensor | None = None  # per-row relevance ids (the task family's ``targets``)
    bank: "BankView | None" = None  # memory-bank entries usable as extra negatives this step
    cache: dict = field(default_factory=dict, repr=False)

    def shared(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def similarity(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x @ yᵀ, once per step: a term (or direction) asking for y @ xᵀ gets its transpose."""
        key, flipped = ("sim", id(x), id(y)), ("sim", id(y), id(x))
        if flipped in self.cache and key not in self.cache:
            return self.cache[flipped].T
        return self.shared(key, lambda: x @ y.T)


class LossTerm(nn.Module):
    """Base class; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    reads: ClassVar[dict[str, str]] = {}
    needs: ClassVar[frozenset[str]] = frozenset()
    families: ClassVar[tuple[str, ...]] = ("category", "pair")
    strategies: ClassVar[tuple[str, ...]] = ()
    uses_bank: ClassVar[bool] = False
    label_kinds: ClassVar[tuple[str, ...]] = ("single", "hierarchical", "multi", "none")
    validation_metric: ClassVar[bool] = False  # also scored on validation data (``val_<term>``)

    def __init__(self) -> None:
        super().__init__()
        self.diagnostics: dict[str, torch.Tensor] = {}

    @classmethod
    def outputs(cls, settings: dict[str, Any]) -> frozenset[str]:
        """The model outputs this term reads, given its settings (the keywords ``reads``
        builds it with): ``needs`` unless a setting adds some."""
        return cls.needs

    def report(self, name: str, value: torch.Tensor | float) -> None:
        """A diagnostic for the epoch row (``train_<term>_<name>``), e.g. a discriminator's accuracy."""
        self.diagnostics[name] = torch.as_tensor(value).detach().float()

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser groups for this term's own parameters that do not train at ``lr``
        (``{"params": [...], "lr": ..., "name": ...}``); the rest train with the model."""
        return []

    def after_step(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Extra updates after the optimiser's step (values for the step's record, named
        without the term's prefix); none by default."""
        return {}

    def per_anchor(self, out: Any, batch: dict[str, Any], ctx: TermContext) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define per_anchor(out, batch, ctx)")

    def forward(self, out: Any, batch: dict[str, Any], ctx: TermContext | None = None) -> torch.Tensor:
        self.diagnostics = {}
        return local_mean(self.per_anchor(out, batch, ctx if ctx is not None else TermContext()))


def register_term(name: str) -> Callable[[type[LossTerm]], type[LossTerm]]:
    """Class decorator: make a term available as ``loss.lambdas.<name>``."""

    def wrap(cls: type[LossTerm]) -> type[LossTerm]:
        if name in _TERMS and _TERMS[name] is not cls:
            raise ValueError(f"loss term {name!r} registered twice ({_TERMS[name].__name__}, {cls.__name__})")
        cls.name = name
        _TERMS[name] = cls
        return cls

    return wrap


def known_terms() -> dict[str, type[LossTerm]]:
    """Every registered term. The built-in ones are registered by importing this package
    (``xmr.losses`` imports each term module), which importing this module already does."""
    return dict(_TERMS)


def get_term(name: str) -> type[LossTerm]:
    terms = known_terms()
    if name not in terms:
        raise KeyError(f"unknown loss term {name!r} (known terms: {sorted(terms)})")
    return terms[name]


def config_value(cfg: "Config", dotted: str) -> Any:
    """The value of a dotted config field (``loss.temperature``)."""
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def term_settings(cls: type[LossTerm], cfg: "Config") -> dict[str, Any]:
    """The keywords a term is built with: exactly the fields it declares."""
    return {kw: config_value(cfg, dotted) for kw, dotted in cls.reads.items()}


def build_term(name: str, cfg: "Config") -> LossTerm:
    """The one factory: the term built from exactly the fields it declares."""
    cls = get_term(name)
    return cls(**term_settings(cls, cfg))


def outputs_needed(cfg: "Config") -> dict[str, list[str]]:
    """{model output: [terms that read it]} over the terms that are built (λ > 0): what the
    model is asked to compute (``xmr.models.registry.build_model``)."""
    needed: dict[str, list[str]] = {}
    for name, weight in cfg.loss.lambdas.items():
        cls = _TERMS.get(name)  # an unknown name is ``xmr.checks.check``'s to report
        if weight > 0 and cls is not None:
            for output in sorted(cls.outputs(term_settings(cls, cfg))):
                needed.setdefault(output, []).append(name)
    return needed


class Objective(nn.Module):
    """Σ λ_i · term_i over the terms with λ_i > 0.

    Returns ``{"loss": total, "<term>": value, "<term>_<diagnostic>": value, ...}`` (all
    detached but the total) plus ``"_weighted"``: ``{term: λ·value}`` with their graphs, for
    per-term gradient norms (``xmr.train.step``).
    """

    def __init__(self, cfg: "Config") -> None:
        super().__init__()
        self.weights = {name: float(w) for name, w in cfg.loss.lambdas.items() if w > 0}
        self.terms = nn.ModuleDict({name: build_term(name, cfg) for name in self.weights})

    def forward(self, out: Any, batch: dict[str, Any], ctx: TermContext | None = None) -> dict[str, Any]:
        ctx = ctx if ctx is not None else TermContext()
        weighted = {name: self.weights[name] * term(out, batch, ctx) for name, term in self.terms.items()}
        result: dict[str, Any] = {"loss": sum(weighted.values())}
        for name, term in self.terms.items():
            result[name] = (weighted[name] / self.weights[name]).detach()
            result.update({f"{name}_{k}": v for k, v in term.diagnostics.items()})
        result["_weighted"] = weighted
        return result
