"""Comparison specs: which variants (preset + overrides, optionally with a pre-training
stage) to train on which dataset with how many seeds, and the orderings the papers claim.

    name: multineg_vs_triplet
    claim: Multi-negative losses beat the K = 1 triplet baseline on category retrieval.
    dataset: {path: data/avdigits}                 # or {path: ..., synth: {kind: category, ...}}
    metric: map_mean                                # main metric (plot, claims)
    seeds: 3
    common: [optim.epochs=10]                       # overrides for every variant
    variants:
      sccmrl: {preset: sccmrl}
      triplet: {preset: triplet_category}
      sccmrl_no_center: {preset: sccmrl, set: [loss.lambdas.center=0]}
      mixer: {preset: mixer_mae, pretrain: {preset: mixer_mae_pretrain}}
    expect: [sccmrl > triplet]                      # orderings of the main metric's means
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmr.config import Config, ConfigError, load_config, read_yaml_mapping, resolve_named_yaml

SPEC_DIR = Path(__file__).resolve().parent / "specs"
_EXPECT = re.compile(r"^\s*([\w.\-]+)\s*(>|<)\s*([\w.\-]+)\s*$")


class SpecError(ValueError):
    """A comparison spec problem; the message names the field."""


@dataclass
class Variant:
    name: str
    config: Config
    pretrain: Config | None = None
    overrides: list[str] = field(default_factory=list)


@dataclass
class ComparisonSpec:
    name: str
    claim: str
    dataset: dict[str, Any]
    metric: str
    seeds: list[int]
    variants: dict[str, Variant]
    expect: list[tuple[str, str, str]]
    split: str = "test"


def resolve_spec(name_or_path: str) -> Path:
    return resolve_named_yaml(name_or_path, SPEC_DIR, "comparison spec", SpecError)


def _variant_config(name: str, raw: Any, common: list[str], data_path: str, where: str) -> tuple[Config, list[str]]:
    if not isinstance(raw, dict) or "preset" not in raw:
        raise SpecError(f"{where}: expected a mapping with a 'preset' (and optional 'set', 'pretrain')")
    unknown = set(raw) - {"preset", "set", "pretrain"}
    if unknown:
        raise SpecError(f"{where}: unknown keys {sorted(unknown)}")
    overrides = [f"data.path={data_path}", *common, *(raw.get("set") or [])]
    try:
        return load_config(str(raw["preset"]), overrides), list(raw.get("set") or [])
    except ConfigError as exc:
        raise SpecError(f"{where}: {exc}") from None


def load_spec(name_or_path: str, data_path: str | None = None, seeds: int | None = None,
              extra: list[str] | None = None) -> ComparisonSpec:
    """Parse and validate a spec; every variant's config is built (and checked) here."""
    path = resolve_spec(name_or_path)
    raw = read_yaml_mapping(path, SpecError)
    unknown = set(raw) - {"name", "claim", "dataset", "metric", "seeds", "common", "variants", "expect", "split"}
    if unknown:
        raise SpecError(f"{path}: unknown keys {sorted(unknown)}")
    dataset = dict(raw.get("dataset") or {})
    if data_path:
        dataset = {"path": data_path}
    if "path" not in dataset:
        raise SpecError(f"{path}: dataset.path is required")
    common = [*(raw.get("common") or []), *(extra or [])]
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, dict) or len(variants_raw) < 1:
        raise SpecError(f"{path}: variants must be a non-empty mapping")
    variants = {}
    for name, v in variants_raw.items():
        cfg, overrides = _variant_config(name, v, common, dataset["path"], f"variants.{name}")
        pre = None
        if isinstance(v, dict) and v.get("pretrain") is not None:
            pre, _ = _variant_config(name, v["pretrain"], common, dataset["path"], f"variants.{name}.pretrain")
        variants[str(name)] = Variant(str(name), cfg, pre, overrides)
    expect = []
    for i, text in enumerate(raw.get("expect") or []):
        m = _EXPECT.match(str(text))
        if not m or m.group(1) not in variants or m.group(3) not in variants:
            raise SpecError(f"expect[{i}] = {text!r}: use '<variant> > <variant>' with variants {sorted(variants)}")
        expect.append((m.group(1), m.group(2), m.group(3)))
    n_seeds = seeds or int(raw.get("seeds", 3))
    if n_seeds < 1:
        raise SpecError(f"seeds = {n_seeds}: must be >= 1")
    metric = str(raw.get("metric") or "")
    if not metric:
        raise SpecError(f"{path}: metric is required (e.g. map_mean, r1_mean, vcmr_0.7_r10)")
    return ComparisonSpec(name=str(raw.get("name") or path.stem), claim=str(raw.get("claim", "")), dataset=dataset,
                          metric=metric, seeds=list(range(n_seeds)), variants=variants, expect=expect,
                          split=str(raw["split"]) if "split" in raw else next(iter(variants.values())).config.data.test_split)
