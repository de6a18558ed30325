"""Loss terms. Importing this package registers every built-in term (one module per term)."""

import importlib
import pkgutil

from xmr.losses.registry import LossTerm, Objective, get_term, known_terms, register_term  # noqa: F401

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
