"""Convert paired feature matrices (as cross-modal benchmarks ship them) into category shards.

Public benchmarks (Wikipedia, NUS-WIDE, XMediaNet, ...) ship pre-extracted image and text
features with label arrays in ``.npz``, ``.mat`` (v5 via scipy; v7.3 is HDF5 and stored
column-major, so every matrix is transposed back) or ``.h5`` files under varying names.
This module finds the arrays (``--keys`` or auto-detection of common names), normalises the
labels (integer, 0/1-based detected; one-hot -> int; multi-hot -> label_set) and writes a
category dataset, optionally carving a seeded validation split from train.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xmr.data.manifest import LabelSpec, Manifest, ModalitySpec
from xmr.data.writer import DatasetWriter

ROLES = ("a", "b", "label")
SPLITS = ("train", "val", "test")
_ROLE_WORDS = {"a": ("i", "img", "image", "images", "imgs", "vis", "visual"),
               "b": ("t", "txt", "text", "texts", "tag", "tags"),
               "label": ("l", "lab", "label", "labels", "y", "gt")}
_SPLIT_WORDS = {"train": ("tr", "train", "training"), "val": ("va", "val", "valid", "validation"),
                "test": ("te", "test", "testing")}


class FeatureInputError(ValueError):
    """The feature file lacks an array or holds inconsistent ones; names file, key and shape."""


@dataclass
class FeaturesReport:
    """What the conversion found; printed by the CLI and kept in ``source.details``."""

    keys: dict[str, str] = field(default_factory=dict)       # "a_train" -> array name in the file
    label_format: str = ""                                   # "int" | "one-hot" | "multi-hot"
    label_base: int | None = None                            # 0 or 1 for integer labels
    num_classes: int = 0
    samples: dict[str, int] = field(default_factory=dict)


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every numeric array in an ``.npz``, ``.mat`` (v5 or v7.3) or ``.h5``/``.hdf5`` file."""
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such feature file")
    if suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if suffix == ".mat":
        import scipy.io

        import h5py

        if h5py.is_hdf5(p):              # MATLAB v7.3 (scipy: "Please use HDF reader ...")
            return _read_h5(p, transpose=True)
        d = scipy.io.loadmat(p)
        return {k: v for k, v in d.items() if not k.startswith("__") and isinstance(v, np.ndarray)
                and v.dtype.kind in "biuf"}
    if suffix in (".h5", ".hdf5"):
        return _read_h5(p, transpose=False)
    raise FeatureInputError(f"{p}: unknown feature file type {suffix!r} (expected .npz, .mat, .h5 or .hdf5)")


def _read_h5(p: Path, transpose: bool) -> dict[str, np.ndarray]:
    """Numeric datasets by path; MATLAB v7.3 files store matrices transposed (column-major)."""
    import h5py

    out: dict[str, np.ndarray] = {}

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "biuf" and not name.startswith("#"):
            a = obj[()]
            out[name] = a.T if transpose and a.ndim >= 2 else a

    with h5py.File(p, "r") as f:
        f.visititems(visit)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _candidates(role: str, split: str) -> set[str]:
    return {_norm(f"{r}_{s}") for r in _ROLE_WORDS[role] for s in _SPLIT_WORDS[split]} | \
           {_norm(f"{s}_{r}") for r in _ROLE_WORDS[role] for s in _SPLIT_WORDS[split]}


def resolve_keys(arrays: dict[str, np.ndarray], keys: dict[str, str] | None, path: str) -> dict[str, str]:
    """Map ``a_train``, ``b_train``, ``label_train``, ... (train and test required, val optional)
    to array names: explicit ``keys`` first, then unambiguous common names."""
    keys = dict(keys or {})
    valid = {f"{r}_{s}" for r in ROLES for s in SPLITS}
    for k, v in keys.items():
        if k not in valid:
            raise FeatureInputError(f"--keys: unknown name {k!r} (use {sorted(valid)})")
        if v not in arrays:
            raise FeatureInputError(f"{path}: no array {v!r} for {k} (arrays: {sorted(arrays)})")
    by_norm: dict[str, list[str]] = {}
    for name in arrays:   # an HDF5 path matches by its full path ("train/img") or its last part
        for form in {_norm(name), _norm(name.rsplit("/", 1)[-1])}:
            by_norm.setdefault(form, []).append(name)
    for split in SPLITS:
        for role in ROLES:
            k = f"{role}_{split}"
            if k in keys:
                continue
            hits = sorted({n for c in _candidates(role, split) for n in by_norm.get(c, [])})
            if len(hits) > 1:
                raise FeatureInputError(f"{path}: {k} is ambiguous ({hits}); pass --keys {k}=NAME")
            if hits:
                keys[k] = hits[0]
    for split in ("train", "test"):
        missing = [f"{r}_{split}" for r in ROLES if f"{r}_{split}" not in keys]
        if missing:
            raise FeatureInputError(f"{path}: cannot find {missing} among arrays {sorted(arrays)}; "
                                    f"pass --keys, e.g. {missing[0]}=NAME")
    partial = [f"{r}_val" for r in ROLES if f"{r}_val" in keys]
    if partial and len(partial) != len(ROLES):
        raise FeatureInputError(f"{path}: val split needs a, b and label arrays, found only {partial}")
    return keys


def _label_matrix(lab: np.ndarray, n: int, where: str) -> np.ndarray:
    """Labels as ``[n]`` (integers) or ``[n, C]`` (indicator), undoing ``[1, n]``/``[C, n]``."""
    lab = np.asarray(lab)
    if lab.ndim == 2 and 1 in lab.shape and lab.size == n:
        lab = lab.reshape(n)
    if lab.ndim == 2 and lab.shape[0] != n and lab.shape[1] == n:
        lab = lab.T
    if lab.shape[0] != n or lab.ndim > 2:
        raise FeatureInputError(f"{where}: labels have shape {list(lab.shape)}, expected {n} rows to match "
                                "the features")
    if not np.all(np.isfinite(lab)) or not np.all(lab == np.round(lab)):
        raise FeatureInputError(f"{where}: labels must be integers (or 0/1 indicators)")
    return lab.astype(np.int64)


def normalise_labels(labels: dict[str, np.ndarray], where: dict[str, str]) -> tuple[dict, FeaturesReport]:
    """Per split: int array (single) or list of label lists (multi); detects format and base."""
    rep = FeaturesReport()
    mats = [v for v in labels.values() if v.ndim == 2]
    if mats and len(mats) != len(labels):
        raise FeatureInputError(f"label arrays mix integer and indicator formats: {where}")
    if mats:
        for s, v in labels.items():
            if not np.isin(v, (0, 1)).all():
                raise FeatureInputError(f"{where[s]}: indicator labels must be 0/1")
            empty = np.nonzero(v.sum(axis=1) == 0)[0]
            if empty.size:
                raise FeatureInputError(f"{where[s]}: {empty.size} row(s) have no label (first: {empty[:5].tolist()})")
        c = {v.shape[1] for v in labels.values()}
        if len(c) != 1:
            raise FeatureInputError(f"indicator label arrays disagree on the class count {sorted(c)}: {where}")
        rep.num_classes = c.pop()
        if all((v.sum(axis=1) == 1).all() for v in labels.values()):
            rep.label_format = "one-hot"
            return {s: v.argmax(axis=1) for s, v in labels.items()}, rep
        rep.label_format = "multi-hot"
        return {s: [np.nonzero(row)[0].tolist() for row in v] for s, v in labels.items()}, rep
    lo = min(int(v.min()) for v in labels.values())
    hi = max(int(v.max()) for v in labels.values())
    if lo not in (0, 1):
        raise FeatureInputError(f"integer labels must start at 0 or 1, smallest is {lo}: {where}")
    rep.label_format, rep.label_base, rep.num_classes = "int", lo, hi - lo + 1
    return {s: v - lo for s, v in labels.items()}, rep


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Seeded split of indices keeping class proportions; the first name takes the remainder."""
    rng = np.random.default_rng(seed)
    names = list(fractions)
    out: dict[str, list[int]] = {n: [] for n in names}
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        start = 0
        for n in names[1:]:
            take = int(np.floor(fractions[n] * idx.size + 0.5))   # half up, not banker's
            out[n].extend(idx[start: start + take].tolist())
            start += take
        out[names[0]].extend(idx[start:].tolist())
    return {n: np.array(sorted(v), dtype=np.int64) for n, v in out.items()}


def _carve_val(data: dict, val_fraction: float, seed: int, single: bool) -> None:
    """Move a seeded (stratified when single-label) fraction of train into ``val``."""
    a, b, lab = data["train"]
    n = a.shape[0]
    if single:
        idx = stratified_split(np.asarray(lab), {"train": 1 - val_fraction, "val": val_fraction}, seed)
    else:
        perm = np.random.default_rng(seed).permutation(n)
        k = int(round(val_fraction * n))
        idx = {"val": np.sort(perm[:k]), "train": np.sort(perm[k:])}
    if idx["val"].size == 0 or idx["train"].size == 0:
        raise FeatureInputError(f"--val-fraction {val_fraction} leaves an empty split of {n} train samples")
    pick = (lambda L, ix: [L[i] for i in ix]) if isinstance(lab, list) else (lambda L, ix: L[ix])
    data["val"] = (a[idx["val"]], b[idx["val"]], pick(lab, idx["val"]))
    data["train"] = (a[idx["train"]], b[idx["train"]], pick(lab, idx["train"]))


def convert_features(path: str, out: str, *, keys: dict[str, str] | None = None, val_fraction: float = 0.0,
                     seed: int = 0, name: str | None = None, a_name: str = "image", b_name: str = "text",
                     dtype: str = "float16", samples_per_shard: int = 256, overwrite: bool = False,
                     endpoint_url: str | None = None, progress: bool = True) -> tuple[Manifest, FeaturesReport]:
    """Read ``path``, normalise labels, and write a category dataset at ``out``."""
    arrays = load_arrays(path)
    resolved = resolve_keys(arrays, keys, str(path))
    splits = [s for s in SPLITS if f"a_{s}" in resolved]
    if val_fraction and "val" in splits:
        raise FeatureInputError(f"{path}: the file has a val split ({resolved['a_val']}); drop --val-fraction")
    if not 0 <= val_fraction < 1:
        raise FeatureInputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    raw_labels, where = {}, {}
    for s in splits:
        a, b = arrays[resolved[f"a_{s}"]], arrays[resolved[f"b_{s}"]]
        if a.shape[0] != b.shape[0]:
            raise FeatureInputError(f"{path}: {resolved[f'a_{s}']} has {a.shape[0]} rows but {resolved[f'b_{s}']} "
                                    f"has {b.shape[0]} (a_{s} and b_{s} must pair row by row)")
        feats[s] = (a.astype(np.float32), b.astype(np.float32))
        where[s] = f"{path}:{resolved[f'label_{s}']}"
        raw_labels[s] = _label_matrix(arrays[resolved[f"label_{s}"]], a.shape[0], where[s])
    for role in ("a", "b"):
        shapes = {tuple(feats[s][0 if role == "a" else 1].shape[1:]) for s in splits}
        if len(shapes) != 1:
            raise FeatureInputError(f"{path}: modality {role} has different feature shapes across splits {shapes}")
    labels, rep = normalise_labels(raw_labels, where)
    rep.keys = resolved
    data = {s: (feats[s][0], feats[s][1], labels[s]) for s in splits}
    if val_fraction:
        _carve_val(data, val_fraction, seed, rep.label_format != "multi-hot")
    multi = rep.label_format == "multi-hot"
    details = {"file": str(path), "val_fraction": val_fraction, "seed": seed, **asdict(rep)}
    w = DatasetWriter(out, name=name or Path(path).stem, task="category",
                      modalities={"a": ModalitySpec(a_name, list(data["train"][0].shape[1:]), dtype),
                                  "b": ModalitySpec(b_name, list(data["train"][1].shape[1:]), dtype)},
                      labels=LabelSpec("multi" if multi else "single", [rep.num_classes]),
                      source={"kind": "features", "details": details},
                      samples_per_shard=samples_per_shard, overwrite=overwrite, endpoint_url=endpoint_url)
    for s in [x for x in SPLITS if x in data]:
        a, b, lab = data[s]
        rep.samples[s] = int(a.shape[0])
        with w.split(s) as sw:
            for i in tqdm(range(a.shape[0]), desc=f"features {s}", disable=not progress):
                meta = {"index": i, "id": f"{s}-{i:06d}"}
                meta.update({"label_set": lab[i]} if multi else {"label": int(lab[i])})
                sw.write(f"{s}-{i:06d}", arrays={"a": a[i], "b": b[i]}, meta=meta)
    details["samples"] = dict(rep.samples)
    return w.finish(), rep
