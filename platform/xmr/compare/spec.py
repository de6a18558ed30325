"""Comparison specs: which variants (preset + overrides, optionally with a pre-training
stage) to train on which data, how long, with what tuning budget, how many seeds, and the
orderings the papers claim. A spec with ``map`` is a *claim map*: the same comparison at
several levels of one property of the (synthetic) data.

    name: multineg_vs_triplet
    claim: Multi-negative losses beat the K = 1 triplet baseline on category retrieval.
    dataset: {path: data/avdigits}          # or {path: ..., synth: {kind: category, ...}}
    metric: map_mean                        # the metric claims are judged by (on the test split)
    seeds: 5                                # replicates: training seed r and tuning draw r each
    common: [model.embed_dim=64]            # overrides for every variant
    training: {max_epochs: 30, patience: 3, extend: 2, min_gain: 0.001}
                                            # optim.epochs (the cap) and optim.patience, every variant
                                            # (not a pre-training stage: it keeps its preset's and its
                                            # own set); extend: how often a level whose chosen runs
                                            # still improved at the cap is rerun, every variant, at
                                            # twice the cap; min_gain: the improvement of the last
                                            # epoch over every earlier one that counts as "still
                                            # improving" (a tie does not)
    tuning:                                 # per replicate, every variant is offered the same draw
      trials: 4                             # candidates per replicate and variant
      seed: 1000
      widen: 1                              # times a range whose winners sit at its edge is widened
      halving: {eta: 3, first_rung: 5}      # successive halving inside each replicate's tuning (the
                                            # default; ``off``: every candidate to the cap):
                                            # xmr.compare.halving says how and why
      params: {optim.lr: {type: loguniform, low: 3.0e-4, high: 3.0e-3, paper: 1.0e-3}}
                                            # paper: the paper's own setting, always a candidate
    equivalence_margin: {value: 0.01, reason: the smallest gain the paper's table reports}
    variants:
      sccmrl: {preset: sccmrl, tune: {loss.temperature: {type: loguniform, low: 0.05, high: 0.3}}}
      triplet: {preset: triplet_category, tune: {loss.margin: {type: uniform, low: 0.1, high: 0.5}}}
      mixer: {preset: mixer_mae, pretrain: {preset: mixer_mae_pretrain}}
      again: {preset: sccmrl, tuning_seed: 7}   # its own tuning draws (an A/A across draws)
    claims: [sccmrl > triplet]
    data_from: real images (sklearn's digits) cut in two halves; nothing planted   # optional, in words
    not_testable: the real benchmark's features are not on this machine   # optional: what cannot be tested here
    map:                                    # optional: a claim map
      property: offset_scale                # a key of dataset.synth (dotted for nested keys)
      levels: [0.0, 1.0, 3.0]
      label: modality gap (offset scale)
      trend: increasing                     # optional: the claims' difference grows along the levels
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmr.checks import check
from xmr.config import Config, ConfigError, SpecError, load_config, read_yaml_mapping, resolve_named_yaml, with_values
from xmr.compare.halving import Halving
from xmr.compare.stats import DEFAULT_EQUIVALENCE_MARGIN
from xmr.tune.space import Param, SpaceError, parse_param

SPEC_DIR = Path(__file__).resolve().parent / "specs"
_CLAIM = re.compile(r"^\s*([\w.\-]+)\s*(>|<)\s*([\w.\-]+)\s*$")
_KEYS = {"name", "claim", "premise", "dataset", "metric", "seeds", "common", "variants", "claims", "expect", "split",
         "training", "tuning", "map", "equivalence_margin", "cannot_separate", "data_from", "not_testable"}
TRENDS = ("increasing", "decreasing")
DEFAULT_MIN_GAIN = 0.001  # metric units: a last epoch this much better than every earlier one is "still improving"
# Every level of a claim map tunes in every replicate: a choice made at one level and reused
# at the others would make each verdict conditional on it (the old "middle_level").
TUNING_AT = ("every_level",)
REAL_KINDS = ("digits_views",)  # dataset.synth kinds that cut real data rather than generate it


@dataclass
class Variant:
    name: str
    config: Config
    pretrain: Config | None = None
    overrides: list[str] = field(default_factory=list)
    tune: list[Param] = field(default_factory=list)  # the spec's common tuning parameters and its own
    paper: dict[str, Any] = field(default_factory=dict)  # tuned path -> the paper's own setting (a candidate)
    tuning_seed: int | None = None  # its own tuning draws (default: the spec's)


@dataclass
class ClaimMap:
    property: str
    levels: list[Any]
    label: str
    trend: str = ""  # "increasing" / "decreasing": the claims' paired difference along the levels


@dataclass
class ComparisonSpec:
    name: str
    claim: str
    dataset: dict[str, Any]
    metric: str
    seeds: list[int]
    variants: dict[str, Variant]
    claims: list[tuple[str, str, str]]
    split: str = "test"
    max_epochs: int | None = None
    patience: int = 0
    tuning_trials: int = 0
    tuning_seed: int = 1000
    extend: int = 2  # doublings of a variant's epoch cap while its runs peak at the cap
    equivalence_margin: float = DEFAULT_EQUIVALENCE_MARGIN
    margin_reason: str = "the default δ: the spec names no reason"
    min_gain: float = DEFAULT_MIN_GAIN
    widen: int = 1  # times a level's range may be widened on a side whose winners sit at its edge
    # Successive halving inside each (level, replicate, variant)'s tuning; None: every
    # candidate trains to the cap (xmr.compare.halving).
    halving: Halving | None = field(default_factory=Halving)
    map: ClaimMap | None = None
    source: str = ""
    # What the (synthetic) data was built to make true, said beside the claim it serves: a
    # verdict on data generated so that the claim's premise holds shows the method can use
    # that structure, not that real data has it.
    premise: str = ""
    # Where the data cannot separate the variants whatever they do (e.g. every objective at the
    # ceiling), said before any run: verdicts there measure the ceiling, not the methods.
    cannot_separate: str = ""
    # Where the data come from (real, generated, or part of each) in words, and what part of
    # the claim this machine's data cannot test and why (e.g. it needs features it lacks).
    data_from: str = ""
    not_testable: str = ""

    @property
    def data_kind(self) -> str:
        """``real`` (a real dataset cut or sized, nothing planted), ``generated`` (a synthetic
        recipe) or ``shipped`` (a dataset on disk: its ``data_from`` says what it is)."""
        synth = self.dataset.get("synth")
        if not synth:
            return "shipped"
        return "real" if synth.get("kind") in REAL_KINDS else "generated"

    def tuning_seed_of(self, variant: str) -> int:
        own = self.variants[variant].tuning_seed
        return self.tuning_seed if own is None else own

    @property
    def levels(self) -> list[Any]:
        """The claim map's levels; [None] without a map."""
        return list(self.map.levels) if self.map is not None else [None]

    def dataset_at(self, level: Any) -> dict[str, Any]:
        """The dataset recipe at one level of the claim map (a path of its own per level)."""
        if self.map is None:
            return self.dataset
        recipe = copy.deepcopy(self.dataset)
        node = recipe["synth"]
        *parents, last = self.map.property.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = level
        recipe["path"] = f"{self.dataset['path']}-{_slug(self.map.property)}-{_slug(str(level))}"
        return recipe


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def resolve_spec(name_or_path: str) -> Path:
    return resolve_named_yaml(name_or_path, SPEC_DIR, "comparison spec", SpecError)


def _params(raw: Any, where: str) -> tuple[list[Param], dict[str, Any]]:
    """The tuned parameters and the paper's own setting of those that give one (``paper``:
    a value inside the range, offered as a candidate in every replicate)."""
    if raw is None:
        return [], {}
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping of config path -> distribution")
    params, paper = [], {}
    for path, spec in raw.items():
        spec = dict(spec) if isinstance(spec, dict) else spec
        value = spec.pop("paper", None) if isinstance(spec, dict) else None
        try:
            p = parse_param(str(path), spec)
        except SpaceError as exc:
            raise SpecError(f"{where}: {exc}") from None
        if value is not None:
            inside = value in p.choices if p.kind == "categorical" else (
                not isinstance(value, bool) and isinstance(value, (int, float)) and p.low <= value <= p.high)
            if not inside:
                raise SpecError(f"{where}.{path}.paper = {value!r}: the paper's setting must lie in the range "
                                f"({p.choices if p.kind == 'categorical' else [p.low, p.high]})")
            paper[p.path] = value
        params.append(p)
    return params, paper


def _variant_config(raw: Any, overrides: list[str], where: str) -> tuple[Config, list[str]]:
    if not isinstance(raw, dict) or "preset" not in raw:
        raise SpecError(f"{where}: expected a mapping with a 'preset' (and optional 'set', 'pretrain', 'tune')")
    unknown = set(raw) - {"preset", "set", "pretrain", "tune", "tuning_seed"}
    if unknown:
        raise SpecError(f"{where}: unknown keys {sorted(unknown)}")
    own = list(raw.get("set") or [])
    try:
        return check(load_config(str(raw["preset"]), [*overrides, *own])), own
    except ConfigError as exc:
        raise SpecError(f"{where}: {exc}") from None


def _int(raw: dict, key: str, default: int, where: str, minimum: int = 0) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{where}.{key} = {value!r}: expected an integer >= {minimum}")
    return value


def load_spec(name_or_path: str, data_path: str | None = None, seeds: int | None = None,
              extra: list[str] | None = None, tuning_seed: int | None = None) -> ComparisonSpec:
    """Parse and validate a spec; every variant's config (and every tuning parameter's
    range) is built and checked here, before anything runs."""
    path = resolve_spec(name_or_path)
    raw = read_yaml_mapping(path, SpecError)
    unknown = set(raw) - _KEYS
    if unknown:
        raise SpecError(f"{path}: unknown keys {sorted(unknown)} (known: {sorted(_KEYS)})")
    dataset = dict(raw.get("dataset") or {})
    if data_path:
        dataset = {"path": data_path}
    if "path" not in dataset:
        raise SpecError(f"{path}: dataset.path is required")
    training = raw.get("training") or {}
    if not isinstance(training, dict) or set(training) - {"max_epochs", "patience", "extend", "min_gain"}:
        raise SpecError(f"{path}: training must be a mapping with max_epochs, patience, extend and/or min_gain")
    min_gain = training.get("min_gain", DEFAULT_MIN_GAIN)
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or min_gain < 0:
        raise SpecError(f"{path}: training.min_gain = {min_gain!r}: expected a number >= 0 (in the metric's units)")
    max_epochs = _int(training, "max_epochs", 0, "training", 0) or None
    patience = _int(training, "patience", 0, "training", 0)
    schedule = ([f"optim.epochs={max_epochs}"] if max_epochs else []) + ([f"optim.patience={patience}"] if patience else [])
    base = [f"data.path={dataset['path']}", *(raw.get("common") or [])]
    common = [*base, *schedule, *(extra or [])]
    tuning = raw.get("tuning") or {}
    if not isinstance(tuning, dict) or set(tuning) - {"trials", "seed", "params", "at", "widen", "halving"}:
        raise SpecError(f"{path}: tuning must be a mapping with trials, seed, at, widen, halving and params")
    tuning_at = str(tuning.get("at", "every_level"))
    if tuning_at not in TUNING_AT:
        raise SpecError(f"{path}: tuning.at = {tuning_at!r}: use one of {list(TUNING_AT)}")
    margin, reason = _margin(raw.get("equivalence_margin", DEFAULT_EQUIVALENCE_MARGIN), path)
    shared, shared_paper = _params(tuning.get("params"), "tuning.params")
    variants = _variants(raw.get("variants"), common, [*base, *(extra or [])], shared, shared_paper, path)
    claims = []
    texts = raw.get("claims", raw.get("expect")) or []
    for i, text in enumerate(texts):
        m = _CLAIM.match(str(text))
        if not m or m.group(1) not in variants or m.group(3) not in variants:
            raise SpecError(f"claims[{i}] = {text!r}: use '<variant> > <variant>' with variants {sorted(variants)}")
        claims.append((m.group(1), m.group(2), m.group(3)))
    n_seeds = seeds or _int(raw, "seeds", 5, "seeds", 1)
    metric = str(raw.get("metric") or "")
    if not metric:
        raise SpecError(f"{path}: metric is required (e.g. map_mean, r1_mean, vcmr_0.7_r10)")
    claim_map = _claim_map(raw.get("map"), dataset, path)
    first = next(iter(variants.values())).config
    return ComparisonSpec(name=str(raw.get("name") or path.stem), claim=" ".join(str(raw.get("claim", "")).split()),
                          dataset=dataset, metric=metric, seeds=list(range(n_seeds)), variants=variants,
                          claims=claims, split=str(raw.get("split") or first.data.test_split), max_epochs=max_epochs,
                          patience=patience, tuning_trials=_int(tuning, "trials", 0, "tuning"),
                          tuning_seed=tuning_seed if tuning_seed is not None else _int(tuning, "seed", 1000, "tuning"),
                          extend=_int(training, "extend", 2, "training"), equivalence_margin=margin,
                          margin_reason=reason, min_gain=float(min_gain), widen=_int(tuning, "widen", 1, "tuning"),
                          halving=_halving(tuning.get("halving", {}), path),
                          map=claim_map, source=str(path), premise=" ".join(str(raw.get("premise") or "").split()),
                          cannot_separate=" ".join(str(raw.get("cannot_separate") or "").split()),
                          data_from=" ".join(str(raw.get("data_from") or "").split()),
                          not_testable=" ".join(str(raw.get("not_testable") or "").split()))


def _halving(raw: Any, path: Path) -> Halving | None:
    """``tuning.halving``: ``{eta: 3, first_rung: 5}`` (either may be left out: the defaults,
    ``xmr.compare.halving`` says why), or ``off`` (YAML's false) for every candidate to the cap."""
    if raw is False or raw == "off":
        return None
    if not isinstance(raw, dict) or set(raw) - {"eta", "first_rung"}:
        raise SpecError(f"{path}: tuning.halving = {raw!r}: give {{eta: <int >= 2>, first_rung: <epochs >= 1>}} "
                        "or off")
    return Halving(eta=_int(raw, "eta", Halving.eta, "tuning.halving", 2),
                   first_rung=_int(raw, "first_rung", Halving.first_rung, "tuning.halving", 1))


def _margin(raw: Any, path: Path) -> tuple[float, str]:
    """δ and its reason: ``equivalence_margin: {value: 0.01, reason: ...}`` (a bare number
    is accepted for a user's spec; the page then says no reason was given)."""
    reason = "the default δ: the spec names no reason"
    if isinstance(raw, dict):
        if set(raw) - {"value", "reason"} or "value" not in raw or not str(raw.get("reason") or "").strip():
            raise SpecError(f"{path}: equivalence_margin: give {{value: <number>, reason: <why this δ>}}")
        raw, reason = raw["value"], " ".join(str(raw["reason"]).split())
    elif raw != DEFAULT_EQUIVALENCE_MARGIN:
        reason = "set by the spec without a reason"
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not raw > 0:
        raise SpecError(f"{path}: equivalence_margin = {raw!r}: expected a number > 0 (in the metric's units)")
    return float(raw), reason


def _variants(variants_raw: Any, common: list[str], pre_common: list[str], shared: list[Param],
              shared_paper: dict[str, Any], path: Path) -> dict[str, Variant]:
    """Every variant's config built and checked, with its tuned parameters (the spec's shared
    ones and its own), the paper's settings and its own tuning seed; every tuned value's
    bounds must fit the variant's config."""
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise SpecError(f"{path}: variants must be a non-empty mapping")
    variants = {}
    for name, v in variants_raw.items():
        where = f"variants.{name}"
        cfg, own = _variant_config(v, common, where)
        pre = None
        if v.get("pretrain") is not None:  # its own schedule: the preset's epochs and its own set
            pre, _ = _variant_config(v["pretrain"], pre_common, f"{where}.pretrain")
        own_params, own_paper = _params(v.get("tune"), f"{where}.tune")
        params = shared + own_params
        own_seed = v.get("tuning_seed")
        if own_seed is not None and (isinstance(own_seed, bool) or not isinstance(own_seed, int)):
            raise SpecError(f"{where}.tuning_seed = {own_seed!r}: expected an integer")
        for p in params:  # every tuned value must fit this variant's config
            probes = p.choices if p.kind == "categorical" else [p.low, p.high]
            for value in probes:
                try:
                    check(with_values(cfg, {p.path: int(value) if p.kind == "int" else value}))
                except ConfigError as exc:
                    raise SpecError(f"{where}: tuning {p.path} = {value!r} does not fit ({exc})") from None
        variants[str(name)] = Variant(str(name), cfg, pre, own, params, {**shared_paper, **own_paper}, own_seed)
    return variants


def _claim_map(m: Any, dataset: dict[str, Any], path: Path) -> ClaimMap | None:
    if m is None:
        return None
    if not isinstance(m, dict) or set(m) - {"property", "levels", "label", "trend"} or "property" not in m:
        raise SpecError(f"{path}: map needs property and levels (and an optional label and trend)")
    if m.get("trend", "") not in ("", *TRENDS):
        raise SpecError(f"{path}: map.trend = {m['trend']!r}: use one of {list(TRENDS)}")
    levels = m.get("levels")
    if not isinstance(levels, list) or len(levels) < 2:
        raise SpecError(f"{path}: map.levels must list at least 2 values")
    if "synth" not in dataset:
        raise SpecError(f"{path}: a claim map varies the generated data: dataset.synth is required")
    claim_map = ClaimMap(str(m["property"]), levels, str(m.get("label") or m["property"]), str(m.get("trend", "")))
    return claim_map
