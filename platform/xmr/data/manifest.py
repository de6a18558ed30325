"""The dataset manifest (docs/shard-format.md) as typed dataclasses.

Every reader starts from the manifest: it fixes the task family, the feature shapes a model
is built with, and every shard with its sample count and sha256, so work can be split
exactly and shards verified. ``Manifest.from_dict`` validates everything and names the
offending field in its error, because a bad manifest otherwise fails far away (in a worker,
mid-epoch) with an unhelpful message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 1
TASKS = ("category", "vcmr")
DTYPES = ("float16", "float32")
LABEL_KINDS = ("single", "hierarchical", "multi", "none")
ROLES = {"category": ("a", "b"), "vcmr": ("visual", "subtitle", "query")}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest that does not follow docs/shard-format.md; the message names the field."""


def _req(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object, got {type(d).__name__} {d!r:.80}")
    if key not in d:
        raise ManifestError(f"{where}.{key}: missing (present: {sorted(d)})")
    return d[key]


def _int(v: Any, where: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ManifestError(f"{where}: expected an int >= {minimum}, got {v!r}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise ManifestError(f"{where}: expected a non-empty string, got {v!r}")
    return v


@dataclass
class ModalitySpec:
    """One modality: ``shape`` of one sample (category) or of one clip/token row (vcmr)."""

    name: str
    shape: list[int]
    dtype: str

    def validate(self, where: str) -> None:
        _str(self.name, f"{where}.name")
        if not isinstance(self.shape, list) or not self.shape:
            raise ManifestError(f"{where}.shape: expected a non-empty list of ints, got {self.shape!r}")
        for i, s in enumerate(self.shape):
            _int(s, f"{where}.shape[{i}]", minimum=1)
        if self.dtype not in DTYPES:
            raise ManifestError(f"{where}.dtype: expected one of {DTYPES}, got {self.dtype!r}")


@dataclass
class LabelSpec:
    """Label kind and class count per level (coarse -> fine); ``names`` optional per level."""

    kind: str
    num_classes: list[int]
    names: list[list[str]] | None = None

    def validate(self, where: str) -> None:
        if self.kind not in LABEL_KINDS:
            raise ManifestError(f"{where}.kind: expected one of {LABEL_KINDS}, got {self.kind!r}")
        if not isinstance(self.num_classes, list):
            raise ManifestError(f"{where}.num_classes: expected a list of ints, got {self.num_classes!r}")
        expected_levels = {"single": 1, "multi": 1, "none": 0}.get(self.kind)
        if expected_levels is not None and len(self.num_classes) != expected_levels:
            raise ManifestError(
                f"{where}.num_classes: kind {self.kind!r} needs {expected_levels} level(s), "
                f"got {self.num_classes!r}")
        if self.kind == "hierarchical" and len(self.num_classes) < 1:
            raise ManifestError(f"{where}.num_classes: kind 'hierarchical' needs >= 1 level, got []")
        for i, c in enumerate(self.num_classes):
            _int(c, f"{where}.num_classes[{i}]", minimum=1)
        if self.names is not None:
            if not isinstance(self.names, list) or len(self.names) != len(self.num_classes):
                raise ManifestError(
                    f"{where}.names: expected one list per level ({len(self.num_classes)}), got {self.names!r:.120}")
            for i, (level, n) in enumerate(zip(self.names, self.num_classes)):
                if not isinstance(level, list) or len(level) != n or not all(isinstance(s, str) for s in level):
                    raise ManifestError(f"{where}.names[{i}]: expected {n} strings, got {level!r:.120}")


@dataclass
class ShardInfo:
    """One tar shard; ``path`` is relative to the dataset root."""

    path: str
    num_samples: int
    sha256: str
    bytes: int
    num_queries: int | None = None

    def validate(self, where: str, task: str) -> None:
        _str(self.path, f"{where}.path")
        if self.path.startswith("/") or ".." in self.path.split("/") or "://" in self.path:
            raise ManifestError(f"{where}.path: must be relative to the dataset root, got {self.path!r}")
        _int(self.num_samples, f"{where}.num_samples", minimum=1)
        if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256):
            raise ManifestError(f"{where}.sha256: expected 64 lowercase hex chars, got {self.sha256!r}")
        _int(self.bytes, f"{where}.bytes", minimum=1)
        if task == "vcmr":
            _int(self.num_queries, f"{where}.num_queries", minimum=0)
        elif self.num_queries is not None:
            raise ManifestError(f"{where}.num_queries: only vcmr shards count queries, got {self.num_queries!r}")


@dataclass
class SplitInfo:
    """A split: its shards, and totals that must equal the sums over shards."""

    num_samples: int
    shards: list[ShardInfo]
    num_queries: int | None = None

    def validate(self, where: str, task: str) -> None:
        if not self.shards:
            raise ManifestError(f"{where}.shards: a split needs at least one shard")
        paths = set()
        for i, s in enumerate(self.shards):
            s.validate(f"{where}.shards[{i}]", task)
            if s.path in paths:
                raise ManifestError(f"{where}.shards[{i}].path: duplicate shard {s.path!r}")
            paths.add(s.path)
        total = sum(s.num_samples for s in self.shards)
        if self.num_samples != total:
            raise ManifestError(f"{where}.num_samples: {self.num_samples!r} != sum over shards {total}")
        if task == "vcmr":
            q = sum(int(s.num_queries or 0) for s in self.shards)
            if self.num_queries != q:
                raise ManifestError(f"{where}.num_queries: {self.num_queries!r} != sum over shards {q}")
        elif self.num_queries is not None:
            raise ManifestError(f"{where}.num_queries: only vcmr splits count queries, got {self.num_queries!r}")


@dataclass
class Manifest:
    """The whole ``manifest.json``."""

    name: str
    task: str
    modalities: dict[str, ModalitySpec]
    labels: LabelSpec
    splits: dict[str, SplitInfo]
    source: dict
    clip_len: float | None = None
    schema_version: int = SCHEMA_VERSION
    created: str = ""

    def validate(self) -> None:
        """Raise ManifestError naming the first field that breaks the format."""
        w = "manifest"
        if self.schema_version != SCHEMA_VERSION:
            raise ManifestError(f"{w}.schema_version: this xmr reads {SCHEMA_VERSION}, got {self.schema_version!r}")
        _str(self.name, f"{w}.name")
        if self.task not in TASKS:
            raise ManifestError(f"{w}.task: expected one of {TASKS}, got {self.task!r}")
        roles = ROLES[self.task]
        if not isinstance(self.modalities, dict) or sorted(self.modalities) != sorted(roles):
            got = sorted(self.modalities) if isinstance(self.modalities, dict) else self.modalities
            raise ManifestError(f"{w}.modalities: task {self.task!r} needs roles {list(roles)}, got {got!r}")
        for role, spec in self.modalities.items():
            spec.validate(f"{w}.modalities.{role}")
            if self.task == "vcmr" and len(spec.shape) != 1:
                raise ManifestError(f"{w}.modalities.{role}.shape: vcmr shapes are [D], got {spec.shape!r}")
        self.labels.validate(f"{w}.labels")
        if self.task == "vcmr":
            if self.labels.kind != "none":
                raise ManifestError(f"{w}.labels.kind: vcmr datasets have kind 'none', got {self.labels.kind!r}")
            if isinstance(self.clip_len, bool) or not isinstance(self.clip_len, (int, float)) or self.clip_len <= 0:
                raise ManifestError(f"{w}.clip_len: vcmr needs seconds per clip > 0, got {self.clip_len!r}")
        elif self.clip_len is not None:
            raise ManifestError(f"{w}.clip_len: only vcmr datasets have a clip length, got {self.clip_len!r}")
        if not isinstance(self.splits, dict) or not self.splits:
            raise ManifestError(f"{w}.splits: expected at least one split, got {self.splits!r:.80}")
        for name, split in self.splits.items():
            _str(name, f"{w}.splits key")
            split.validate(f"{w}.splits.{name}", self.task)
        if not isinstance(self.source, dict) or not isinstance(self.source.get("kind"), str):
            raise ManifestError(f"{w}.source: expected an object with a string 'kind', got {self.source!r:.120}")
        if not isinstance(self.created, str):
            raise ManifestError(f"{w}.created: expected an ISO time string, got {self.created!r}")

    def split(self, name: str) -> SplitInfo:
        """The named split, or an error that lists the ones there are."""
        if name not in self.splits:
            raise KeyError(f"dataset {self.name!r} has no split {name!r} (splits: {sorted(self.splits)})")
        return self.splits[name]

    def to_dict(self) -> dict:
        """JSON-ready dict in the key order of docs/shard-format.md."""
        def shard(s: ShardInfo) -> dict:
            d: dict[str, Any] = {"path": s.path, "num_samples": s.num_samples, "sha256": s.sha256, "bytes": s.bytes}
            if s.num_queries is not None:
                d["num_queries"] = s.num_queries
            return d

        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "task": self.task,
            "modalities": {r: {"name": m.name, "shape": list(m.shape), "dtype": m.dtype}
                           for r, m in self.modalities.items()},
            "labels": {"kind": self.labels.kind, "num_classes": list(self.labels.num_classes),
                       "names": self.labels.names},
            "clip_len": self.clip_len,
            "splits": {n: {"num_samples": s.num_samples, "num_queries": s.num_queries,
                           "shards": [shard(x) for x in s.shards]} for n, s in self.splits.items()},
            "source": self.source,
            "created": self.created,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        """Parse and validate; errors name the field (``manifest.splits.train.shards[3].sha256``)."""
        w = "manifest"
        _req(d, "schema_version", w)
        mods = _req(d, "modalities", w)
        if not isinstance(mods, dict):
            raise ManifestError(f"{w}.modalities: expected an object, got {mods!r:.80}")
        modalities = {}
        for role, m in mods.items():
            where = f"{w}.modalities.{role}"
            modalities[role] = ModalitySpec(name=_req(m, "name", where), shape=_req(m, "shape", where),
                                            dtype=_req(m, "dtype", where))
        lab = _req(d, "labels", w)
        labels = LabelSpec(kind=_req(lab, "kind", f"{w}.labels"),
                           num_classes=_req(lab, "num_classes", f"{w}.labels"), names=lab.get("names"))
        spl = _req(d, "splits", w)
        if not isinstance(spl, dict):
            raise ManifestError(f"{w}.splits: expected an object, got {spl!r:.80}")
        splits = {}
        for name, s in spl.items():
            where = f"{w}.splits.{name}"
            shards_raw = _req(s, "shards", where)
            if not isinstance(shards_raw, list):
                raise ManifestError(f"{where}.shards: expected a list, got {shards_raw!r:.80}")
            shards = []
            for i, x in enumerate(shards_raw):
                sw = f"{where}.shards[{i}]"
                shards.append(ShardInfo(path=_req(x, "path", sw), num_samples=_req(x, "num_samples", sw),
                                        sha256=_req(x, "sha256", sw), bytes=_req(x, "bytes", sw),
                                        num_queries=x.get("num_queries")))
            splits[name] = SplitInfo(num_samples=_req(s, "num_samples", where), shards=shards,
                                     num_queries=s.get("num_queries"))
        m = cls(name=_req(d, "name", w), task=_req(d, "task", w), modalities=modalities, labels=labels,
                splits=splits, source=_req(d, "source", w), clip_len=d.get("clip_len"),
                schema_version=d["schema_version"], created=d.get("created", ""))
        m.validate()
        return m

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest.json") -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(d)
        except ManifestError as e:
            raise ManifestError(f"{where}: {e}") from e


def manifest_url(root: str) -> str:
    """``<root>/manifest.json`` for a local directory or an ``s3://`` prefix."""
    from xmr.data.storage import join

    return join(root, "manifest.json")


def load_manifest(root: str, *, endpoint_url: str | None = None) -> Manifest:
    """Read and validate ``<root>/manifest.json`` (local dir or ``s3://bucket/prefix``)."""
    from xmr.data.storage import StorageError, read_bytes

    url = manifest_url(root)
    try:
        data = read_bytes(url, endpoint_url=endpoint_url)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: no manifest.json, so {root!r} is not an xmr dataset root") from e
    except StorageError as e:
        raise StorageError(f"{url}: cannot read the manifest ({e})") from e
    return Manifest.from_json(data, where=url)
