"""Search spaces: which config fields a sweep varies, and how.

A space file (``search_spaces/<method>.yaml``) names each parameter by its config path
and gives it a distribution; a parameter may exist only when other parameters took
given values (``when``; circular conditions are rejected). Spaces are checked against the ``Config`` dataclasses before any
trial starts, so a typo fails with the parameter's name instead of a crashed trial.

    preset: qacln
    metric: vcmr_0.7_r10          # optional: default is the task's main metric
    mode: max
    params:
      loss.lambdas.frame_cl: {type: loguniform, low: 1.0e-3, high: 0.3}
      negatives.k:           {type: int, low: 1, high: 64, log: true}
      negatives.strategy:    {type: categorical, choices: [uniform, hardest]}
      negatives.memory_bank: {type: int, low: 256, high: 4096, log: true,
                              when: {negatives.strategy: hardest}}

Sampling is define-by-run (``suggest(trial)``), the form Optuna needs for conditional
parameters and that Ray Tune's ``OptunaSearch`` accepts as its space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from xmr.checks import check
from xmr.config import (Config, ConfigError, SpaceError, apply_overrides, from_dict, load_config, read_yaml_mapping,
                        resolve_named_yaml, with_values)

SPACE_DIR = Path(__file__).resolve().parents[1] / "search_spaces"  # xmr/search_spaces: the top-level folder, linked
KINDS = ("uniform", "loguniform", "int", "categorical")


@dataclass
class Param:
    path: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)
    when: dict[str, list[Any]] = field(default_factory=dict)

    def active(self, sampled: dict[str, Any]) -> bool:
        """True when every ``when`` condition holds for the values sampled so far."""
        return all(path in sampled and sampled[path] in allowed for path, allowed in self.when.items())

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_float(self.path, self.low, self.high, log=self.kind == "loguniform" or self.log,
                                   step=self.step)


@dataclass
class SearchSpace:
    preset: str
    params: list[Param]
    metric: str = ""
    mode: str = "max"
    source: str = ""
    ablations: dict[str, list[str]] = field(default_factory=dict)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Define-by-run sampling: only parameters whose conditions hold are suggested."""
        sampled: dict[str, Any] = {}
        for param in self.params:
            if param.active(sampled):
                sampled[param.path] = param.suggest(trial)
        return sampled

    def typed(self, values: dict[str, Any]) -> dict[str, Any]:
        """Values read back from a table (pandas turns an int column with gaps into floats,
        NaN for an inactive parameter) as the space samples them: ints as int, a categorical
        as its own choice, inactive ones as None."""
        out: dict[str, Any] = {}
        for param in self.params:
            v = values.get(param.path)
            v = v.item() if hasattr(v, "item") else v
            if v is None or (isinstance(v, float) and v != v):
                out[param.path] = None
            elif param.kind == "int":
                out[param.path] = int(round(float(v)))
            elif param.kind == "categorical":
                out[param.path] = next((c for c in param.choices if c == v or str(c) == str(v)), v)
            else:
                out[param.path] = float(v)
        return out

    def apply(self, cfg: Config, sampled: dict[str, Any]) -> Config:
        """A new Config with the sampled values set (validated like any config)."""
        return with_values(cfg, sampled)

    def ablation_variants(self, cfg: Config) -> dict[str, list[str]]:
        """Named variants for ``xmr tune --ablate``: the space's ``ablations``, or else each
        weighted loss term but the first switched off in turn; "full" is the preset itself."""
        if self.ablations:
            return {"full": [], **self.ablations}
        terms = [name for name, w in cfg.loss.lambdas.items() if w > 0]
        return {"full": [], **{f"w/o {t}": [f"loss.lambdas.{t}=0"] for t in terms[1:]}}


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SpaceError(f"{where} = {value!r}: expected a number")
    try:
        return float(value)
    except ValueError:
        raise SpaceError(f"{where} = {value!r}: expected a number") from None


def parse_param(path: str, spec: Any) -> Param:
    where = f"params.{path}"
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: expected a mapping with 'type', got {spec!r}")
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices", "when"}
    if unknown:
        raise SpaceError(f"{where}: unknown keys {sorted(unknown)}")
    kind = spec.get("type")
    if kind not in KINDS:
        raise SpaceError(f"{where}.type = {kind!r}: must be one of {list(KINDS)}")
    param = Param(path=path, kind=kind, log=bool(spec.get("log", False)))
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}.choices: a non-empty list is required for a categorical parameter")
        param.choices = choices
    else:
        for bound in ("low", "high"):
            if bound not in spec:
                raise SpaceError(f"{where}.{bound}: required for a {kind} parameter")
        param.low, param.high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
        if not param.low < param.high:
            raise SpaceError(f"{where}: low ({param.low}) must be < high ({param.high})")
        if (kind == "loguniform" or param.log) and param.low <= 0:
            raise SpaceError(f"{where}.low = {param.low}: a log-scale parameter needs low > 0")
        if kind == "int" and not (float(param.low).is_integer() and float(param.high).is_integer()):
            raise SpaceError(f"{where}: an int parameter needs integer bounds, got {param.low}..{param.high}")
        if "step" in spec:
            param.step = _number(spec["step"], f"{where}.step")
            if param.step <= 0 or (param.log or kind == "loguniform"):
                raise SpaceError(f"{where}.step = {param.step}: needs step > 0 and a linear scale")
    when = spec.get("when", {})
    if not isinstance(when, dict):
        raise SpaceError(f"{where}.when: expected a mapping of parameter -> value(s)")
    param.when = {str(other): (values if isinstance(values, list) else [values]) for other, values in when.items()}
    return param


def _resolve_conditions(params: dict[str, Param]) -> list[Param]:
    """Check every ``when`` and order parameters so each comes after those it depends on
    (YAML writers may sort keys, so file order cannot be relied on)."""
    for param in params.values():
        where = f"params.{param.path}"
        for other, allowed in param.when.items():
            if other not in params:
                raise SpaceError(f"{where}.when: {other!r} is not a parameter of this space")
            parent = params[other]
            if parent.kind == "categorical":
                bad = [v for v in allowed if v not in parent.choices]
                if bad:
                    raise SpaceError(f"{where}.when.{other}: {bad} not among its choices {parent.choices}")
    ordered: list[Param] = []
    state: dict[str, str] = {}

    def visit(path: str, chain: tuple[str, ...]) -> None:
        if state.get(path) == "done":
            return
        if state.get(path) == "visiting":
            raise SpaceError(f"params.{path}.when: circular condition {' -> '.join(chain + (path,))}")
        state[path] = "visiting"
        for other in params[path].when:
            visit(other, chain + (path,))
        state[path] = "done"
        ordered.append(params[path])

    for path in params:
        visit(path, ())
    return ordered


def _check_against_config(space: SearchSpace, base: Config) -> None:
    """Every parameter must be a real config field and every value a valid one."""
    for param in space.params:
        probes = param.choices if param.kind == "categorical" else [param.low, param.high]
        if param.kind == "int":
            probes = [int(v) for v in probes]
        for value in probes:
            try:
                check(space.apply(base, {param.path: value}))
            except ConfigError as exc:
                raise SpaceError(f"params.{param.path}: value {value!r} does not fit the config ({exc})") from None


def resolve_space(name_or_path: str) -> Path:
    """A shipped space's name (``sccmrl``: ``search_spaces/sccmrl.yaml``) or a YAML path."""
    return resolve_named_yaml(name_or_path, SPACE_DIR, "search space", SpaceError)


def load_space(path: str | Path, base: Config | None = None) -> SearchSpace:
    """Parse and validate a space file (a path, or a shipped space's name); ``base``
    defaults to the space's preset."""
    path = resolve_space(str(path))
    raw = read_yaml_mapping(path, SpaceError)
    unknown = set(raw) - {"preset", "metric", "mode", "params", "ablations"}
    if unknown:
        raise SpaceError(f"{path}: unknown keys {sorted(unknown)} (known: preset, metric, mode, params, ablations)")
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise SpaceError(f"{path}: 'params' must be a non-empty mapping of config path -> distribution")
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise SpaceError(f"{path}: mode = {mode!r}: must be max or min")
    declared = {str(name): parse_param(str(name), spec) for name, spec in params_raw.items()}
    space = SearchSpace(preset=str(raw.get("preset", "")), params=_resolve_conditions(declared),
                        metric=str(raw.get("metric", "") or ""), mode=mode, source=str(path))
    try:
        base = base or load_config(space.preset or None)
    except ConfigError as exc:
        raise SpaceError(f"{path}: preset {space.preset!r}: {exc}") from None
    _check_against_config(space, base)
    space.ablations = _parse_ablations(raw.get("ablations") or {}, base, path)
    return space


def _parse_ablations(raw: Any, base: Config, path: Path) -> dict[str, list[str]]:
    """``ablations: {name: [a.b=value, ...]}``; each variant must give a valid config."""
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: ablations must be a mapping of variant name -> list of a.b=value overrides")
    out: dict[str, list[str]] = {}
    for name, overrides in raw.items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise SpaceError(f"ablations.{name}: expected a list of 'a.b=value' strings, got {overrides!r}")
        try:
            check(from_dict(apply_overrides(base.to_dict(), overrides)))
        except ConfigError as exc:
            raise SpaceError(f"ablations.{name}: {exc}") from None
        out[str(name)] = overrides
    return out
