"""Write a dataset: WebDataset tar shards plus ``manifest.json`` (docs/shard-format.md).

Every source (synthetic generators, TVR converter, feature matrices) writes through this
one class, so every dataset is validated the same way at write time: shapes and dtypes
against the modality specs, finite values, well-formed metadata. Shards are byte-for-byte
deterministic (sorted members, fixed mtime/uid/mode), so the same data gives the same
sha256 and re-running a converter is a no-op for verification.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from xmr.data import storage
from xmr.data.manifest import LabelSpec, Manifest, ModalitySpec, ShardInfo, SplitInfo

_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")   # webdataset splits names at the first '.'
_SPLIT = re.compile(r"^[A-Za-z0-9_\-]+$")
VCMR_ARRAYS = ("visual", "subtitle", "sub_mask", "query_tokens")
QUERY_TYPES = ("v", "t", "vt")


class SampleError(ValueError):
    """A sample handed to the writer breaks the format; the message names key and field."""


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


class SplitWriter:
    """Writes one split's samples into rotating shards; use as a context manager."""

    def __init__(self, parent: "DatasetWriter", split: str) -> None:
        self.parent = parent
        self.split = split
        self.shards: list[ShardInfo] = []
        self.keys: set[str] = set()
        self.indices: list[int] = []
        self.num_queries = 0
        self._tar: tarfile.TarFile | None = None
        self._tar_path = ""
        self._in_shard = 0
        self._queries_in_shard = 0
        self._closed = False

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.close()
        else:
            self._abort()

    # -- validation -------------------------------------------------------------------
    def _where(self, key: str) -> str:
        return f"{self.parent.name}/{self.split} sample {key!r}"

    def _check_array(self, key: str, field: str, a: Any, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """Check shape, cast floats to the manifest dtype, and reject NaN/Inf (after the cast,
        so float32 values that overflow float16 are caught too)."""
        w = self._where(key)
        if not isinstance(a, np.ndarray):
            raise SampleError(f"{w}: {field} must be a numpy array, got {type(a).__name__}")
        if tuple(a.shape) != shape:
            raise SampleError(f"{w}: {field} has shape {list(a.shape)}, manifest expects {list(shape)}")
        if dtype == "uint8":
            if a.dtype not in (np.bool_, np.uint8) or (a.dtype == np.uint8 and a.size and a.max() > 1):
                raise SampleError(f"{w}: {field} must be a 0/1 mask (bool or uint8), got {a.dtype}")
            return a.astype(np.uint8)
        if not np.issubdtype(a.dtype, np.floating):
            raise SampleError(f"{w}: {field} must be floating point ({dtype}), got {a.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, naming the sample
            out = a.astype(dtype, copy=False)
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).sum())
            raise SampleError(f"{w}: {field} has {bad} NaN/Inf value(s) (as {dtype})")
        return out

    def _check_labels(self, key: str, meta: dict) -> None:
        lab: LabelSpec = self.parent.labels
        w = self._where(key)
        if lab.kind == "single":
            v = meta.get("label")
            if not _is_int(v) or not 0 <= v < lab.num_classes[0]:
                raise SampleError(f"{w}: meta.label must be an int in [0, {lab.num_classes[0]}), got {v!r}")
        elif lab.kind == "hierarchical":
            v = meta.get("label_path")
            if (not isinstance(v, list) or len(v) != len(lab.num_classes)
                    or not all(_is_int(x) and 0 <= x < c for x, c in zip(v, lab.num_classes))):
                raise SampleError(
                    f"{w}: meta.label_path must be {len(lab.num_classes)} ints below {lab.num_classes}, got {v!r}")
        elif lab.kind == "multi":
            v = meta.get("label_set")
            if (not isinstance(v, list) or not v or len(set(v)) != len(v)
                    or not all(_is_int(x) and 0 <= x < lab.num_classes[0] for x in v)):
                raise SampleError(
                    f"{w}: meta.label_set must be distinct ints in [0, {lab.num_classes[0]}), got {v!r}")

    def _check_category(self, key: str, arrays: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
        if sorted(arrays) != ["a", "b"]:
            raise SampleError(f"{self._where(key)}: category samples need arrays 'a' and 'b', got {sorted(arrays)}")
        self._check_labels(key, meta)
        mods = self.parent.modalities
        return {r: self._check_array(key, r, arrays[r], tuple(mods[r].shape), mods[r].dtype) for r in ("a", "b")}

    def _check_vcmr(self, key: str, arrays: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
        w = self._where(key)
        if sorted(arrays) != sorted(VCMR_ARRAYS):
            raise SampleError(f"{w}: vcmr samples need arrays {list(VCMR_ARRAYS)}, got {sorted(arrays)}")
        n = meta.get("n_clips")
        if not _is_int(n) or n < 1:
            raise SampleError(f"{w}: meta.n_clips must be an int >= 1, got {n!r}")
        for f, typ in (("vid_name", str), ("duration", (int, float)), ("video_index", (int, np.integer))):
            if not isinstance(meta.get(f), typ) or isinstance(meta.get(f), bool):
                raise SampleError(f"{w}: meta.{f} must be {getattr(typ, '__name__', typ)}, got {meta.get(f)!r}")
        queries = meta.get("queries")
        if not isinstance(queries, list):
            raise SampleError(f"{w}: meta.queries must be a list, got {queries!r:.80}")
        total_tokens = 0
        for i, q in enumerate(queries):
            qw = f"{w}: meta.queries[{i}]"
            if not isinstance(q, dict):
                raise SampleError(f"{qw} must be an object, got {q!r:.80}")
            if not _is_int(q.get("desc_id")):
                raise SampleError(f"{qw}.desc_id must be an int, got {q.get('desc_id')!r}")
            if not isinstance(q.get("desc"), str):
                raise SampleError(f"{qw}.desc must be a string, got {q.get('desc')!r}")
            if q.get("type") not in QUERY_TYPES:
                raise SampleError(f"{qw}.type must be one of {QUERY_TYPES}, got {q.get('type')!r}")
            ts = q.get("ts")
            if (not isinstance(ts, list) or len(ts) != 2 or not all(isinstance(t, (int, float)) for t in ts)
                    or not 0 <= ts[0] <= ts[1] or not all(np.isfinite(ts))):
                raise SampleError(f"{qw}.ts must be [t_s, t_e] with 0 <= t_s <= t_e, got {ts!r}")
            nt = q.get("n_tokens")
            if not _is_int(nt) or nt < 1:
                raise SampleError(f"{qw}.n_tokens must be an int >= 1, got {nt!r}")
            total_tokens += int(nt)
        mods = self.parent.modalities
        return {
            "visual": self._check_array(key, "visual", arrays["visual"], (n, mods["visual"].shape[0]),
                                        mods["visual"].dtype),
            "subtitle": self._check_array(key, "subtitle", arrays["subtitle"], (n, mods["subtitle"].shape[0]),
                                          mods["subtitle"].dtype),
            "sub_mask": self._check_array(key, "sub_mask", arrays["sub_mask"], (n,), "uint8"),
            "query_tokens": self._check_array(key, "query_tokens", arrays["query_tokens"],
                                              (total_tokens, mods["query"].shape[0]), mods["query"].dtype),
        }

    # -- writing ----------------------------------------------------------------------
    def write(self, key: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Validate and append one sample. ``meta['index']`` defaults to the sample's position."""
        if self._closed:
            raise RuntimeError(f"{self._where(key)}: split writer already closed")
        if not isinstance(key, str) or not _KEY.match(key):
            raise SampleError(f"{self.parent.name}/{self.split}: key {key!r} must match {_KEY.pattern} "
                              "(no dots: webdataset splits file names at the first '.')")
        if key in self.keys:
            raise SampleError(f"{self._where(key)}: duplicate key in split")
        if not isinstance(meta, dict):
            raise SampleError(f"{self._where(key)}: meta must be a dict, got {type(meta).__name__}")
        meta = dict(meta)
        meta.setdefault("index", len(self.indices))
        if not _is_int(meta["index"]) or meta["index"] < 0:
            raise SampleError(f"{self._where(key)}: meta.index must be an int >= 0, got {meta['index']!r}")
        checked = (self._check_vcmr if self.parent.task == "vcmr" else self._check_category)(key, arrays, meta)
        try:
            meta_bytes = json.dumps(meta, sort_keys=True, allow_nan=False, default=_json_default).encode()
        except (TypeError, ValueError) as e:
            raise SampleError(f"{self._where(key)}: meta is not plain JSON ({e})") from e
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        members = {f"{key}.{name}.npy": npy_bytes(a) for name, a in checked.items()}
        members[f"{key}.json"] = meta_bytes
        for name in sorted(members):
            _add(self._tar, name, members[name])
        self.keys.add(key)
        self.indices.append(int(meta["index"]))
        self._in_shard += 1
        if self.parent.task == "vcmr":
            self._queries_in_shard += len(meta["queries"])
        if self._in_shard >= self.parent.samples_per_shard:
            self._close_shard()

    def _open_shard(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tar_path = os.path.join(self.parent.staging, name)
        self._tar = tarfile.open(self._tar_path, "w", format=tarfile.USTAR_FORMAT)

    def _close_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        h = hashlib.sha256()
        with open(self._tar_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        vcmr = self.parent.task == "vcmr"
        self.shards.append(ShardInfo(path=os.path.basename(self._tar_path), num_samples=self._in_shard,
                                     sha256=h.hexdigest(), bytes=os.path.getsize(self._tar_path),
                                     num_queries=self._queries_in_shard if vcmr else None))
        self.num_queries += self._queries_in_shard
        self._in_shard = self._queries_in_shard = 0

    def close(self) -> None:
        """Finish the last shard and register the split with the dataset writer."""
        if self._closed:
            return
        if self._tar is not None:
            self._close_shard()
        self._closed = True
        n = len(self.indices)
        if n == 0:
            raise SampleError(f"{self.parent.name}/{self.split}: split has no samples")
        if sorted(self.indices) != list(range(n)):
            dup_or_gap = sorted(set(range(n)).symmetric_difference(self.indices))[:5]
            raise SampleError(f"{self.parent.name}/{self.split}: meta.index values must be 0..{n - 1} "
                              f"exactly once (first offenders: {dup_or_gap})")
        vcmr = self.parent.task == "vcmr"
        self.parent._register(self.split, SplitInfo(num_samples=n, shards=self.shards,
                                                    num_queries=self.num_queries if vcmr else None))

    def _abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        self._closed = True


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


class DatasetWriter:
    """Writes shards + manifest.json. root may be local or s3:// (stage locally, upload on finish)."""

    def __init__(self, root: str, *, name: str, task: str, modalities: dict[str, ModalitySpec], labels: LabelSpec,
                 source: dict, clip_len: float | None = None, samples_per_shard: int = 256,
                 overwrite: bool = False, endpoint_url: str | None = None) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.root = root
        self.name = name
        self.task = task
        self.modalities = modalities
        self.labels = labels
        self.source = source
        self.clip_len = clip_len
        self.samples_per_shard = samples_per_shard
        self.endpoint_url = endpoint_url
        self.splits: dict[str, SplitInfo] = {}
        self._open_splits: set[str] = set()
        # Validate the dataset-level fields now, not after hours of conversion.
        probe = SplitInfo(num_samples=1, shards=[ShardInfo("x.tar", 1, "0" * 64, 1, 0 if task == "vcmr" else None)],
                          num_queries=0 if task == "vcmr" else None)
        self._manifest({"probe": probe}).validate()
        manifest_url = storage.join(root, "manifest.json")
        if storage.exists(manifest_url, endpoint_url=endpoint_url) and not overwrite:
            raise FileExistsError(f"{manifest_url}: a dataset already exists here (pass overwrite=True to replace it)")
        if storage.is_s3(root):
            self.staging = tempfile.mkdtemp(prefix="xmr-dataset-")
            self._own_staging = True
        else:
            Path(root).mkdir(parents=True, exist_ok=True)
            if overwrite:
                for old in list(Path(root).glob("*.tar")) + [Path(manifest_url)]:
                    old.unlink(missing_ok=True)
            self.staging = root
            self._own_staging = False

    def _manifest(self, splits: dict[str, SplitInfo]) -> Manifest:
        return Manifest(name=self.name, task=self.task, modalities=self.modalities, labels=self.labels,
                        splits=splits, source=self.source, clip_len=self.clip_len,
                        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def split(self, split: str) -> SplitWriter:
        """A writer for one split (each split is written once)."""
        if not _SPLIT.match(split):
            raise ValueError(f"split name {split!r} must match {_SPLIT.pattern}")
        if split in self.splits or split in self._open_splits:
            raise ValueError(f"{self.root}: split {split!r} was already written")
        self._open_splits.add(split)
        return SplitWriter(self, split)

    def _register(self, split: str, info: SplitInfo) -> None:
        self.splits[split] = info

    def finish(self) -> Manifest:
        """Write manifest.json (validated) and, for s3:// roots, upload shards then manifest."""
        if not self.splits:
            raise ValueError(f"{self.root}: no split was written")
        unclosed = self._open_splits - set(self.splits)
        if unclosed:
            raise ValueError(f"{self.root}: split(s) {sorted(unclosed)} were opened but not closed")
        m = self._manifest(dict(self.splits))
        m.validate()
        Path(self.staging, "manifest.json").write_text(m.to_json())
        if storage.is_s3(self.root):
            try:
                tars = [s.path for sp in m.splits.values() for s in sp.shards]
                storage.upload_dir(self.staging, self.root, files=tars, endpoint_url=self.endpoint_url,
                                   progress=False)
                # Manifest last: a reader never sees a manifest whose shards are not there yet.
                storage.write_bytes(storage.join(self.root, "manifest.json"), m.to_json().encode(),
                                    endpoint_url=self.endpoint_url)
            finally:
                if self._own_staging:
                    shutil.rmtree(self.staging, ignore_errors=True)
        return m
