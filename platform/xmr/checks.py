"""``check(cfg)``: the checks that need the registries, run once before any work starts.

``xmr.config`` holds the types and ranges and imports nothing of the library; this module
adds what only the registries know: that the terms and the model exist and fit the task
family and labels, that every negative strategy asked for is one each term supports, that
a memory bank is only asked of terms that use one, and that no setting is *inert*: a
loss, negatives, model or VCMR data field set away from its default that no part of the
method reads is rejected with the field, its value and who would read it. (A λ of 0
switches its term off, so its fields become inert too.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from xmr.config import Config, ConfigError
from xmr.data.manifest import Manifest, load_manifest
from xmr.losses.registry import config_value, known_terms, outputs_needed
from xmr.models.registry import check_outputs, known_models
from xmr.tasks import FAMILIES, family_of

# Fields every method reads whatever its terms and model (the trainer, loader, storage),
# except the data fields a task family alone reads (``TaskFamily.data_fields``).
_ALWAYS = ("data.", "optim.", "resources.", "storage.", "tracking.", "seed", "method", "task", "model.name",
           "model.dims", "model.num_classes", "model.label_kind", "model.pretrained", "loss.lambdas")
_FAMILY_ONLY = {f for fam in FAMILIES.values() for f in fam.data_fields}
_BANK_FIELDS = ("negatives.memory_bank", "negatives.bank_warmup_steps", "negatives.momentum")


def leaf_fields(obj: Any = None, prefix: str = "") -> list[str]:
    """Every leaf field of the config as a dotted name (``loss.temperature``)."""
    obj = Config() if obj is None else obj
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        out.extend(leaf_fields(value, f"{name}.") if dataclasses.is_dataclass(value) else [name])
    return out


def _fail(message: str) -> None:
    raise ConfigError(message)


def enabled_terms(cfg: Config) -> dict[str, type]:
    terms = known_terms()
    for name in cfg.loss.lambdas:
        if name not in terms:
            _fail(f"loss.lambdas.{name}: unknown loss term (known terms: {sorted(terms)})")
    return {name: terms[name] for name, w in cfg.loss.lambdas.items() if w > 0}


def fields_read(cfg: Config) -> dict[str, list[str]]:
    """{dotted field: [readers]} for this config's model and enabled terms (besides _ALWAYS)."""
    models = known_models()
    if cfg.model.name not in models:
        _fail(f"model.name = {cfg.model.name!r}: unknown model (known models: {sorted(models)})")
    readers: dict[str, list[str]] = {}
    for field in models[cfg.model.name].fields_read(cfg, check_outputs(cfg, outputs_needed(cfg))):
        readers.setdefault(field, []).append(f"model {cfg.model.name}")
    terms = enabled_terms(cfg)
    for name, cls in terms.items():
        for field in cls.reads.values():
            readers.setdefault(field, []).append(f"term {name}")
    if cfg.negatives.memory_bank > 0 and any(cls.uses_bank for cls in terms.values()):
        for field in _BANK_FIELDS:
            readers.setdefault(field, []).append("the memory bank")
    for field in family_of(cfg).data_fields:
        readers.setdefault(field, []).append(f"the {cfg.task} loader")
    return readers


def _who_reads(field: str) -> list[str]:
    """Every term that could read ``field`` (for the error message)."""
    return sorted(name for name, cls in known_terms().items() if field in cls.reads.values())


def check_dataset(cfg: Config) -> Manifest:
    """Fail early, naming ``data.path``, if the dataset is missing; return its manifest."""
    try:
        return load_manifest(cfg.data.path, endpoint_url=cfg.data.endpoint_url)
    except Exception as exc:  # the storage layer's message names the URL
        raise ConfigError(f"data.path = {cfg.data.path!r}: dataset not readable ({exc})") from None


def resolve(cfg: Config) -> tuple[Config, Manifest]:
    """Check the dataset and fill ``model.dims`` / ``num_classes`` / ``label_kind`` from its
    manifest. The task family must read the manifest's dataset format."""
    manifest = check_dataset(cfg)
    wanted = family_of(cfg).dataset_task
    if manifest.task != wanted:
        _fail(f"task = {cfg.task!r} needs a {wanted!r} dataset, but data.path = {cfg.data.path!r} holds {manifest.task!r}")
    for split in (cfg.data.train_split, cfg.data.val_split):
        if split not in manifest.splits:
            _fail(f"data: split {split!r} not in the dataset at {cfg.data.path!r} (splits: {sorted(manifest.splits)})")
    if not cfg.model.dims:
        cfg.model.dims = {role: list(spec.shape) for role, spec in manifest.modalities.items()}
    if not cfg.model.num_classes:
        cfg.model.num_classes = list(manifest.labels.num_classes)
    if not cfg.model.label_kind:
        cfg.model.label_kind = manifest.labels.kind
    if cfg.data.label_noise > 0 and manifest.labels.kind != "single":
        _fail(f"data.label_noise = {cfg.data.label_noise}: corrupts single labels only; the dataset at "
              f"{cfg.data.path!r} has {manifest.labels.kind!r} labels")
    return cfg, manifest


def check(cfg: Config) -> Config:
    """Raise ConfigError naming the field if the config asks for something its method cannot do."""
    terms = enabled_terms(cfg)
    model_cls = known_models().get(cfg.model.name)
    readers = fields_read(cfg)
    fam = family_of(cfg)
    if not fam.fits(model_cls.families):
        _fail(f"model.name = {cfg.model.name!r} is for task {list(model_cls.families)}, not task = {cfg.task!r}")
    for name, cls in terms.items():
        if not fam.fits(cls.families):
            _fail(f"loss.lambdas.{name}: the {name} term is for task {list(cls.families)}, not task = {cfg.task!r}")
        if cfg.model.label_kind and family_of(cfg).labelled and cfg.model.label_kind not in cls.label_kinds:
            _fail(f"loss.lambdas.{name}: the {name} term needs {list(cls.label_kinds)} labels, the data has "
                  f"{cfg.model.label_kind!r} labels")
        if cls.strategies and cfg.negatives.strategy not in cls.strategies and "negatives.strategy" in cls.reads.values():
            _fail(f"negatives.strategy = {cfg.negatives.strategy!r}: the {name} term supports {list(cls.strategies)}")
    if cfg.negatives.memory_bank > 0:
        takers = {n: c for n, c in terms.items() if c.strategies}
        for name, cls in takers.items():
            if not cls.uses_bank:
                _fail(f"negatives.memory_bank = {cfg.negatives.memory_bank}: the {name} term cannot draw negatives "
                      f"from a memory bank (terms that can: {sorted(n for n, c in known_terms().items() if c.uses_bank)})")
        if not takers:
            _fail(f"negatives.memory_bank = {cfg.negatives.memory_bank}: no enabled term takes negatives "
                  f"(enabled: {sorted(terms)})")
    default = Config()
    for field in leaf_fields(cfg):
        if field in readers or (field.startswith(_ALWAYS) and field not in _FAMILY_ONLY):
            continue
        value, base = config_value(cfg, field), config_value(default, field)
        if value != base:
            could = _who_reads(field)
            _fail(f"{field} = {value!r}: nothing in this method reads it (model {cfg.model.name!r}, terms "
                  f"{sorted(terms)})" + (f"; it is read by the terms {could}" if could else "")
                  + f". Remove it, or leave it at its default {base!r}")
    return cfg
