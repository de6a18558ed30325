"""Typed run configuration: dataclasses loaded from YAML with ``--set a.b=value`` overrides.

Why this shape: every entrypoint (train, tune, serve, compare) takes one ``Config``; the
resolved config is written next to every output and stored in every checkpoint, so a model
rebuilds from its checkpoint alone. Validation happens here, before any process starts,
and every error names the field path and the offending value.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from xmr.runtime import DEFAULT_PROGRESS_EVERY_S

PRESET_DIR = Path(__file__).resolve().parent / "presets"
# Safe defaults a user gets by setting only negatives.memory_bank, chosen on the digits'
# validation split (bench/results/preset_validation.json, study "bank"): 50 steps of warm-up,
# then a bank of the live encoder's embeddings (as cross-batch memory, Wang et al. 2020). Without
# the warm-up val mAP fell to 0.64; a MoCo key encoder (negatives.momentum = 0.99) scored 0.947, no bank 0.956.
DEFAULT_BANK_WARMUP = 50
DEFAULT_MOMENTUM = 0.0


class ConfigError(ValueError):
    """A configuration problem; the message names the field path and the value."""


# The other input errors live here too (raised by ``xmr.tune.space`` and ``xmr.compare.spec``),
# so ``xmr``'s command line can name them without importing what raises them (torch, for one):
# ``xmr --help`` answers in a fraction of a second.
class SpaceError(ValueError):
    """A search space problem; the message names the parameter."""


class SpecError(ValueError):
    """A comparison spec problem; the message names the field."""


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Where the shards are and how batches are formed."""

    path: str = "data/avdigits"  # dataset root: local dir or s3://bucket/prefix
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    batch_size: int = 64  # global batch (split across data-parallel ranks)
    eval_batch_size: int = 256
    num_workers: int = 0  # DataLoader workers per rank
    split_mode: Literal["shard", "sample"] = "shard"  # sample: world-size independent batches
    on_bad_sample: Literal["error", "skip"] = "error"
    max_clips: int = 128  # vcmr: clips kept per video
    max_query_tokens: int = 32  # vcmr: tokens kept per query
    # category: this fraction of the training split's samples carry a wrong label (each one
    # fixed by its sample index, the same in every epoch and seed). A handicap by
    # construction: the known positive of ``xmr compare``'s guards (a twin trained on
    # corrupted labels must lose to the original), never a setting to train with.
    label_noise: float = 0.0
    endpoint_url: str | None = None  # S3-compatible endpoint; default from AWS env/config


@dataclass
class ModelConfig:
    """Model family and sizes. ``dims`` and ``num_classes`` are filled from the manifest."""

    name: str = "dual_encoder"  # models registry key
    embed_dim: int = 128
    hidden_dim: int = 256
    encoder: Literal["mlp", "transformer"] = "mlp"
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.1
    # cross-modal mixer / masked autoencoder
    mask_ratio: float = 0.75
    decoder_layers: int = 1
    tokens_a: int = 0  # >0: reshape a vector input into this many tokens
    tokens_b: int = 0
    pretrained: str | None = None  # checkpoint whose encoder initialises this model
    # CDAML
    hierarchical: bool = False  # one metric sub-network per label level
    attention: bool = False  # self/cross-attention modules
    # QACLN
    query_layers: int = 2  # transformer layers of the query encoder (the paper: two)
    query_fusion: bool = True  # query-aware fusion (QCF); False = plain average of streams
    netvlad: bool = False
    netvlad_clusters: int = 8
    conv_kernel: int = 5
    max_moment_clips: int = 16  # length limit for span decoding
    top_videos: int = 100  # videos re-ranked by span scores at inference
    # filled from the dataset manifest when the config is resolved
    dims: dict[str, list[int]] = field(default_factory=dict)
    num_classes: list[int] = field(default_factory=list)
    label_kind: Literal["", "single", "hierarchical", "multi", "none"] = ""


# Each term's own settings, under the term's registry name (``loss.vr_hinge.margin``): a
# term reads its section and the shared fields below, nothing of another term's.


@dataclass
class VRHingeSettings:
    """``vr_hinge`` (QACLN L_VR)."""

    margin: float = 0.1  # Δ
    query_negatives: bool = False  # also K negative queries per video (XML / ReLoCLNet; not in the paper)


@dataclass
class VideoCLSettings:
    """``video_cl`` (QACLN L_VideoCL)."""

    k: int = 0  # negatives per anchor; 0 = every other video of the gathered batch


@dataclass
class PolynomialSettings:
    """``polynomial`` (CDAML): pair weight w(s) = Σ_q c_q s^q, per pair kind."""

    pos: list[float] = field(default_factory=lambda: [1.0, -1.0])  # w_p(s) = 1 - s
    neg: list[float] = field(default_factory=lambda: [1.0, 1.0])  # w_n(s) = 1 + s


@dataclass
class AdversarialSettings:
    """``adversarial``: the modality discriminator's game."""

    mode: Literal["grl", "flip"] = "grl"
    grl_scale: float = 1.0
    disc_lr: float | None = None  # discriminator learning rate; None = optim.lr
    disc_steps: int = 1  # discriminator updates per encoder step


@dataclass
class LabelSettings:
    """``label``: the cosine classifier."""

    scale: float = 16.0  # s (NormFace)
    level_weights: list[float] = field(default_factory=list)  # per label level, coarse -> fine; [] = 1 each


@dataclass
class LossConfig:
    """Loss term weights (λ) by registry name, the settings several terms share, and each
    term's own section."""

    lambdas: dict[str, float] = field(default_factory=lambda: {"supcon": 1.0})
    temperature: float = 0.1  # supcon, multineg
    margin: float = 0.2  # triplet, polynomial
    # Cross-modal terms compute their logits in row chunks (recomputed in backward) once the
    # full [anchors, candidates] matrix would pass this many MB: memory linear in the batch.
    # Same values and gradients; 0 = never chunk.
    chunk_mb: float = 64.0
    vr_hinge: VRHingeSettings = field(default_factory=VRHingeSettings)
    video_cl: VideoCLSettings = field(default_factory=VideoCLSettings)
    polynomial: PolynomialSettings = field(default_factory=PolynomialSettings)
    adversarial: AdversarialSettings = field(default_factory=AdversarialSettings)
    label: LabelSettings = field(default_factory=LabelSettings)


# Keys written before the terms' settings had sections (presets, --set, configs stored in
# checkpoints): ``loss.<old>`` still reads as ``loss.<term>.<field>``.
MOVED_LOSS_KEYS = {
    "vr_margin": ("vr_hinge", "margin"), "vr_query_negatives": ("vr_hinge", "query_negatives"),
    "video_cl_k": ("video_cl", "k"), "poly_pos": ("polynomial", "pos"), "poly_neg": ("polynomial", "neg"),
    "adversarial_mode": ("adversarial", "mode"), "grl_scale": ("adversarial", "grl_scale"),
    "disc_lr": ("adversarial", "disc_lr"), "disc_steps": ("adversarial", "disc_steps"),
    "label_scale": ("label", "scale"), "level_weights": ("label", "level_weights"),
}


def _move_loss_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A raw mapping with the old flat loss keys moved into their term's section; an old
    key and its new one both given, with different values, is an error naming both."""
    loss = data.get("loss")
    if not isinstance(loss, dict) or not any(k in MOVED_LOSS_KEYS for k in loss):
        return data
    data, loss = dict(data), dict(loss)
    for old, (term, key) in MOVED_LOSS_KEYS.items():
        if old not in loss:
            continue
        value = loss.pop(old)
        section = loss.get(term)
        section = dict(section) if isinstance(section, dict) else {}
        if key in section and section[key] != value:
            raise ConfigError(f"loss.{old} = {value!r} and loss.{term}.{key} = {section[key]!r}: the same setting "
                              f"twice (loss.{old} is the old name of loss.{term}.{key}; give only the new one)")
        section[key] = value
        loss[term] = section
    data["loss"] = loss
    return data


@dataclass
class NegativesConfig:
    """How many negatives each anchor sees (K) and how they are picked."""

    k: int = 16
    strategy: Literal["uniform", "hardest", "semi_hard", "class_aware"] = "uniform"
    gather: bool = True  # negatives from every rank's batch (False: each rank's own share only)
    memory_bank: int = 0  # FIFO bank size in embeddings; 0 = off
    # With a bank: steps before its entries are used (None: DEFAULT_BANK_WARMUP), and the
    # momentum of a key encoder that writes it (None: DEFAULT_MOMENTUM; 0 = the live encoder).
    bank_warmup_steps: int | None = None
    momentum: float | None = None

    def warmup(self) -> int:
        return DEFAULT_BANK_WARMUP if self.bank_warmup_steps is None else self.bank_warmup_steps

    def key_momentum(self) -> float:
        return DEFAULT_MOMENTUM if self.momentum is None else self.momentum


@dataclass
class OptimConfig:
    """Optimiser, schedule and how long to train."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 10
    warmup_steps: int = 0
    scheduler: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0  # 0 = off
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU only
    max_steps_per_epoch: int = 0  # 0 = the whole split
    patience: int = 0  # stop after this many epochs without a new best validation metric; 0 = all epochs


@dataclass
class ResourcesConfig:
    """Ray Train scaling."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    address: str | None = None  # Ray cluster address; None = RAY_ADDRESS or a local Ray


@dataclass
class StorageConfig:
    """Where runs, checkpoints and metrics go."""

    root: str = "runs"  # local dir or s3://bucket/prefix
    run_name: str = ""  # empty: <method>-<timestamp>
    keep_checkpoints: int = 2
    checkpoint_metric: str = ""  # empty: the task family's main metric
    checkpoint_mode: Literal["max", "min"] = "max"
    max_failures: int = 2


@dataclass
class TrackingConfig:
    """What each run records beyond its metrics."""

    grad_share_every: int = 10  # per-term gradient-norm shares every N steps; 0 = off
    progress_every_s: float = DEFAULT_PROGRESS_EVERY_S  # an in-epoch progress line every N seconds (rank 0); 0 = off
    enabled: bool = True  # MLflow tracking (xmr.train.tracking)
    uri: str = ""  # MLflow tracking URI; empty: MLFLOW_TRACKING_URI, else SQLite in the run folder
    folder: str = ""  # where the local store lives; empty: the run folder (a sweep sets its own)
    parent_run_id: str = ""  # MLflow parent run (set by sweeps and comparisons for their trials)


@dataclass
class Config:
    """One run of one method."""

    method: str = "sccmrl"
    task: Literal["category", "pair", "vcmr"] = "category"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# --------------------------------------------------------------------------- typed building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``path``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path} = {value!r}: must be one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path} = {value!r}: expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} = {value!r}: expected a mapping of {tp.__name__} fields")
        return _build(tp, value, path)
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} = {value!r}: expected a list")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path} = {value!r}: expected a mapping")
        return {_coerce(k, key_tp, path): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{path} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{path} = {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path} = {value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path} = {value!r}: expected a string")
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {path!r} (known keys in {prefix or 'the top level'}: {sorted(names)})")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def build_section(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """A dataclass from a mapping, every value type-checked (errors name the field): the
    machinery of ``Config``, for other typed settings (the endpoint's)."""
    return _build(cls, data, prefix)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected the form a.b=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def set_field(data: dict[str, Any], path: list[str], value: Any, what: str = "") -> None:
    """Set ``data[a][b]... = value`` in a raw config mapping, creating sections as needed
    (an old flat loss key, ``loss.vr_margin``, sets its new field, ``loss.vr_hinge.margin``)."""
    if len(path) == 2 and path[0] == "loss" and path[1] in MOVED_LOSS_KEYS:
        path = ["loss", *MOVED_LOSS_KEYS[path[1]]]
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what or '.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw config mapping (before typing); returns a copy."""
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        set_field(data, parts, value, what=f"override {text!r}")
    return data


def set_values(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A raw config mapping (before typing) with dotted fields set; returns a copy. A trial
    builds its config as a mapping and types it once (``from_dict``)."""
    data = copy.deepcopy(data)
    for dotted, value in values.items():
        set_field(data, dotted.split("."), value)
    return data


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A new, validated Config with dotted fields set (``{"loss.lambdas.center": 0.1}``)."""
    return from_dict(set_values(cfg.to_dict(), values))


def resolve_named_yaml(name_or_path: str, directory: Path, what: str, error: type[Exception] = ConfigError) -> Path:
    """A shipped file's name (``sccmrl`` -> ``<directory>/sccmrl.yaml``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise error(f"{what} file {str(path)!r} not found")
        return path
    candidate = directory / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in directory.glob("*.yaml"))
        raise error(f"unknown {what} {name_or_path!r} (shipped: {known}; or pass a .yaml path)")
    return candidate


def read_yaml_mapping(path: Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A YAML file whose top level must be a mapping (empty file: empty mapping)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping at the top level")
    return raw


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (``sccmrl``) or a path to a YAML file."""
    return resolve_named_yaml(name_or_path, PRESET_DIR, "preset")


def from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, _move_loss_keys(data))
    validate(cfg)
    return cfg


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset or YAML file, apply ``--set`` overrides, type-check and validate.

    Dataset paths are not touched here; call ``check_dataset(cfg)`` (or ``resolve``) before
    starting work so a missing dataset fails first.
    """
    raw: dict[str, Any] = {}
    if name_or_path:
        raw = _move_loss_keys(read_yaml_mapping(resolve_preset(name_or_path)))  # before the overrides, which win
    raw = apply_overrides(raw, overrides or [])
    return from_dict(raw)


# --------------------------------------------------------------------------- validation


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Ranges and relations that types alone cannot express. Checks against the registries
    (term and model names, what a term can do) are ``xmr.checks.check``."""
    for name, weight in cfg.loss.lambdas.items():
        _require(weight >= 0, f"loss.lambdas.{name} = {weight}: λ must be >= 0")
    _require(any(w > 0 for w in cfg.loss.lambdas.values()), f"loss.lambdas = {cfg.loss.lambdas}: at least one λ must be > 0")
    neg = cfg.negatives
    _require(neg.k >= 1, f"negatives.k = {neg.k}: K must be >= 1")
    _require(neg.memory_bank >= 0, f"negatives.memory_bank = {neg.memory_bank}: must be >= 0")
    _require(neg.bank_warmup_steps is None or neg.bank_warmup_steps >= 0,
             f"negatives.bank_warmup_steps = {neg.bank_warmup_steps}: must be >= 0")
    _require(neg.momentum is None or 0.0 <= neg.momentum < 1.0, f"negatives.momentum = {neg.momentum}: must be in [0, 1)")
    if neg.memory_bank == 0:
        for name in ("bank_warmup_steps", "momentum"):
            _require(getattr(neg, name) is None, f"negatives.{name} = {getattr(neg, name)}: only used with a memory bank "
                                                 "(set negatives.memory_bank > 0, or leave it unset)")
    loss = cfg.loss
    _require(loss.temperature > 0, f"loss.temperature = {loss.temperature}: must be > 0")
    _require(loss.margin >= 0, f"loss.margin = {loss.margin}: must be >= 0")
    _require(loss.chunk_mb >= 0, f"loss.chunk_mb = {loss.chunk_mb}: must be >= 0 (0 = never chunk the logits)")
    _require(loss.label.scale > 0, f"loss.label.scale = {loss.label.scale}: must be > 0")
    _require(all(w >= 0 for w in loss.label.level_weights),
             f"loss.label.level_weights = {loss.label.level_weights}: weights must be >= 0")
    adv = loss.adversarial
    _require(adv.disc_lr is None or adv.disc_lr > 0, f"loss.adversarial.disc_lr = {adv.disc_lr}: must be > 0 (or unset: optim.lr)")
    _require(adv.disc_steps >= 1, f"loss.adversarial.disc_steps = {adv.disc_steps}: must be >= 1")
    _require(loss.video_cl.k >= 0, f"loss.video_cl.k = {loss.video_cl.k}: must be >= 0 (0 = the whole batch)")
    _require(cfg.data.path != "", "data.path is empty: give a dataset root (local dir or s3://bucket/prefix)")
    for name in ("batch_size", "eval_batch_size"):
        value = getattr(cfg.data, name)
        _require(value >= 1, f"data.{name} = {value}: must be >= 1")
    _require(cfg.data.num_workers >= 0, f"data.num_workers = {cfg.data.num_workers}: must be >= 0")
    _require(0.0 <= cfg.data.label_noise < 1.0,
             f"data.label_noise = {cfg.data.label_noise}: a fraction of the training samples, in [0, 1)")
    _require(cfg.data.max_clips >= 1, f"data.max_clips = {cfg.data.max_clips}: must be >= 1")
    _require(cfg.data.max_query_tokens >= 1, f"data.max_query_tokens = {cfg.data.max_query_tokens}: must be >= 1")
    m = cfg.model
    _require(m.embed_dim >= 1, f"model.embed_dim = {m.embed_dim}: must be >= 1")
    _require(m.hidden_dim >= 1, f"model.hidden_dim = {m.hidden_dim}: must be >= 1")
    _require(m.num_layers >= 1, f"model.num_layers = {m.num_layers}: must be >= 1")
    _require(m.query_layers >= 1, f"model.query_layers = {m.query_layers}: must be >= 1")
    _require(m.num_heads >= 1, f"model.num_heads = {m.num_heads}: must be >= 1")
    _require(0.0 <= m.mask_ratio < 1.0, f"model.mask_ratio = {m.mask_ratio}: must be in [0, 1)")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout = {m.dropout}: must be in [0, 1)")
    _require(m.conv_kernel >= 1 and m.conv_kernel % 2 == 1, f"model.conv_kernel = {m.conv_kernel}: must be odd and >= 1")
    for name in ("max_moment_clips", "top_videos", "netvlad_clusters", "decoder_layers"):
        _require(getattr(m, name) >= 1, f"model.{name} = {getattr(m, name)}: must be >= 1")
    _require(cfg.optim.lr > 0, f"optim.lr = {cfg.optim.lr}: must be > 0")
    _require(cfg.optim.epochs >= 1, f"optim.epochs = {cfg.optim.epochs}: must be >= 1")
    _require(cfg.optim.warmup_steps >= 0, f"optim.warmup_steps = {cfg.optim.warmup_steps}: must be >= 0")
    _require(cfg.optim.grad_clip >= 0, f"optim.grad_clip = {cfg.optim.grad_clip}: must be >= 0 (0 = off)")
    _require(cfg.optim.patience >= 0, f"optim.patience = {cfg.optim.patience}: must be >= 0 (0 = off)")
    _require(cfg.optim.max_steps_per_epoch >= 0, f"optim.max_steps_per_epoch = {cfg.optim.max_steps_per_epoch}: must be >= 0")
    _require(cfg.resources.num_workers >= 1, f"resources.num_workers = {cfg.resources.num_workers}: must be >= 1")
    _require(cfg.resources.cpus_per_worker > 0, f"resources.cpus_per_worker = {cfg.resources.cpus_per_worker}: must be > 0")
    _require(cfg.resources.gpus_per_worker > 0, f"resources.gpus_per_worker = {cfg.resources.gpus_per_worker}: must be > 0")
    _require(cfg.resources.use_gpu or cfg.resources.gpus_per_worker == ResourcesConfig().gpus_per_worker,
             f"resources.gpus_per_worker = {cfg.resources.gpus_per_worker}: only used with resources.use_gpu = true")
    _require(cfg.storage.keep_checkpoints >= 1, f"storage.keep_checkpoints = {cfg.storage.keep_checkpoints}: must be >= 1")
    _require(cfg.storage.max_failures >= -1, f"storage.max_failures = {cfg.storage.max_failures}: must be >= -1 (-1 = retry forever)")
    _require(cfg.tracking.progress_every_s >= 0, f"tracking.progress_every_s = {cfg.tracking.progress_every_s}: must be >= 0")
    _require(cfg.tracking.grad_share_every >= 0, f"tracking.grad_share_every = {cfg.tracking.grad_share_every}: must be >= 0")
    _require(cfg.data.batch_size >= cfg.resources.num_workers,
             f"data.batch_size = {cfg.data.batch_size}: the global batch must hold at least one sample per worker "
             f"(resources.num_workers = {cfg.resources.num_workers})")
