"""Model families. Importing this package registers every built-in model (one module per family)."""

import importlib
import pkgutil

from xmr.models.registry import build_model, known_models, register_model  # noqa: F401

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
