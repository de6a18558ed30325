"""Decode one raw WebDataset sample (bytes per file) into checked numpy *units*.

A unit is what a batch row is made of: a category pair, a vcmr video, or one vcmr query
with (a reference to) its video. Every check names the shard URL and sample key, because
a bad sample deep in a multi-terabyte dataset is otherwise hard to find.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from xmr.data.manifest import Manifest
from xmr.metrics.vcmr import moment_to_clips


class BadSampleError(ValueError):
    """A sample that cannot be used; the message names the shard URL, the key and the problem."""


@dataclass(frozen=True)
class DecodeSpec:
    """What the decoder needs from the manifest and the loader options (picklable)."""

    task: str
    unit: str                      # "pair" | "video" | "query"
    shapes: dict[str, tuple[int, ...]]
    label_kind: str
    num_classes: tuple[int, ...]
    clip_len: float | None
    max_clips: int | None = None
    max_query_tokens: int | None = None

    @classmethod
    def from_manifest(cls, m: Manifest, unit: str, max_clips: int | None = None,
                      max_query_tokens: int | None = None) -> "DecodeSpec":
        return cls(task=m.task, unit=unit, shapes={r: tuple(s.shape) for r, s in m.modalities.items()},
                   label_kind=m.labels.kind, num_classes=tuple(m.labels.num_classes), clip_len=m.clip_len,
                   max_clips=max_clips, max_query_tokens=max_query_tokens)


def _fail(raw: dict, what: str) -> BadSampleError:
    return BadSampleError(f"{raw.get('__url__')}: sample {raw.get('__key__')!r}: {what}")


def load_meta(raw: dict) -> dict:
    """The sample's ``.json`` as a dict (cheap: the reader uses it to count units)."""
    if "json" not in raw:
        raise _fail(raw, f"missing {raw.get('__key__')}.json (files: {_files(raw)})")
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(raw, f"{raw.get('__key__')}.json is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("index"), int):
        raise _fail(raw, f"{raw.get('__key__')}.json needs an int 'index', got {str(meta)[:80]}")
    return meta


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """``np.load(io.BytesIO(data), allow_pickle=False)``, with the parsed header cached.

    Shards hold many small arrays with identical headers, and numpy parses each header
    with ``ast.literal_eval``; caching it makes decoding ~2x faster for small features.
    Anything unusual (Fortran order, object dtype, unknown version) takes the np.load path.
    """
    if len(data) >= 10 and data[:6] == b"\x93NUMPY" and data[6] == 1:
        end = 10 + int.from_bytes(data[8:10], "little")
        header = data[:end]
        hit = _NPY_HEADERS.get(header)
        if hit is None:
            f = io.BytesIO(data)
            np.lib.format.read_magic(f)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            if not fortran and not dtype.hasobject and f.tell() == end and len(_NPY_HEADERS) < 1024:
                hit = _NPY_HEADERS[header] = (dtype, tuple(shape), end)
        if hit is not None:
            dtype, shape, offset = hit
            count = int(np.prod(shape, dtype=np.int64))
            if len(data) - offset != count * dtype.itemsize:
                raise ValueError(f"npy data is {len(data) - offset} bytes, header says {count * dtype.itemsize}")
            return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _files(raw: dict) -> list[str]:
    return sorted(k for k in raw if not k.startswith("__"))


def _array(raw: dict, name: str, shape: tuple[int | None, ...], floating: bool = True) -> np.ndarray:
    """Load ``<key>.<name>.npy``, check its shape (None = any) and finiteness, float -> float32."""
    ext = f"{name}.npy"
    if ext not in raw:
        raise _fail(raw, f"missing {raw.get('__key__')}.{ext} (files: {_files(raw)})")
    try:
        a = load_npy(raw[ext])
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for broken .npy
        raise _fail(raw, f"{ext} is not a readable .npy ({type(e).__name__}: {e})") from e
    if a.ndim != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape)):
        want_s = [("*" if s is None else s) for s in shape]
        raise _fail(raw, f"{ext} has shape {list(a.shape)}, manifest expects {want_s}")
    if floating:
        if a.dtype not in (np.float16, np.float32):
            raise _fail(raw, f"{ext} has dtype {a.dtype}, expected float16/float32")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise _fail(raw, f"{ext} has {int((~np.isfinite(a)).sum())} NaN/Inf value(s)")
    return a


def unit_count(spec: DecodeSpec, meta: dict) -> int:
    """How many units a sample contributes (queries for unit='query', else 1)."""
    if spec.unit != "query":
        return 1
    queries = meta.get("queries")
    return len(queries) if isinstance(queries, list) else 0


def _label(raw: dict, spec: DecodeSpec, meta: dict) -> Any:
    kind, nc = spec.label_kind, spec.num_classes
    if kind == "single":
        v = meta.get("label")
        if not isinstance(v, int) or not 0 <= v < nc[0]:
            raise _fail(raw, f"json label must be an int in [0, {nc[0]}), got {v!r}")
        return v
    if kind == "hierarchical":
        v = meta.get("label_path")
        if not isinstance(v, list) or len(v) != len(nc) or not all(
                isinstance(x, int) and 0 <= x < c for x, c in zip(v, nc)):
            raise _fail(raw, f"json label_path must be {len(nc)} ints below {list(nc)}, got {v!r}")
        return v
    if kind == "multi":
        v = meta.get("label_set")
        if not isinstance(v, list) or not all(isinstance(x, int) and 0 <= x < nc[0] for x in v):
            raise _fail(raw, f"json label_set must be ints in [0, {nc[0]}), got {v!r}")
        return v
    return None


def decode(raw: dict, spec: DecodeSpec, meta: dict) -> list[dict]:
    """The units of one sample (checked, float32); raises BadSampleError."""
    key = raw.get("__key__")
    if spec.task == "category":
        return [{"a": _array(raw, "a", spec.shapes["a"]), "b": _array(raw, "b", spec.shapes["b"]),
                 "label": _label(raw, spec, meta), "index": meta["index"], "key": key}]
    n = meta.get("n_clips")
    if not isinstance(n, int) or n < 1:
        raise _fail(raw, f"json n_clips must be an int >= 1, got {n!r}")
    video = {"visual": _array(raw, "visual", (n, spec.shapes["visual"][0])),
             "subtitle": _array(raw, "subtitle", (n, spec.shapes["subtitle"][0])),
             "sub_mask": _array(raw, "sub_mask", (n,), floating=False).astype(bool),
             "index": meta["index"], "key": key, "vid_name": meta.get("vid_name"),
             "duration": float(meta.get("duration", 0.0)), "video_index": int(meta.get("video_index", -1)),
             "queries": meta.get("queries", [])}
    if spec.max_clips is not None and n > spec.max_clips:
        for f in ("visual", "subtitle", "sub_mask"):
            video[f] = video[f][:spec.max_clips]
    n_eff = video["visual"].shape[0]
    queries = video["queries"]
    tokens = _array(raw, "query_tokens", (None, spec.shapes["query"][0]))
    lengths = [q.get("n_tokens") if isinstance(q, dict) else None for q in queries]
    if not all(isinstance(x, int) and x >= 1 for x in lengths) or sum(lengths) != tokens.shape[0]:
        raise _fail(raw, f"query n_tokens {lengths} do not add up to query_tokens rows {tokens.shape[0]}")
    if spec.unit == "video":
        return [video]
    units, offset = [], 0
    for q, length in zip(queries, lengths):
        ts = q.get("ts")
        if not isinstance(ts, list) or len(ts) != 2 or not all(isinstance(t, (int, float)) for t in ts):
            raise _fail(raw, f"query desc_id={q.get('desc_id')!r} has bad ts {ts!r}")
        try:
            st, ed = moment_to_clips([float(ts[0]), float(ts[1])], n_eff, float(spec.clip_len or 1.0))
        except ValueError as e:
            raise _fail(raw, f"query desc_id={q.get('desc_id')!r}: {e}") from None
        q_tok = tokens[offset:offset + length]
        if spec.max_query_tokens is not None:
            q_tok = q_tok[:spec.max_query_tokens]
        offset += length
        units.append({"video": video, "q_tokens": q_tok, "st": st, "ed": ed, "ts": [float(ts[0]), float(ts[1])],
                      "desc_id": int(q.get("desc_id", -1)), "type": str(q.get("type", "")),
                      "desc": str(q.get("desc", "")), "key": key})
    return units
