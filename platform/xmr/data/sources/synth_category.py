"""Synthetic paired (category / pair-matching) data with a planted ground truth.

Generative model, per pair i with class c (fine class; coarse class g = c // per_coarse):

    z_i    = class_mean[c] + instance_scale * e_i                 (shared by both modalities)
    x_m,i  = W_m z_i + offset_m + noise_m * n_m,i                 (m in {a, b})

``class_mean[c] = coarse_mean[g] + fine_scale * u_c`` with a hierarchy, so coarse classes
are clusters of fine ones. Each modality has its own fixed random map ``W_m`` and offset:
raw features of a and b are not comparable (a modality gap a model must learn to close),
while the class (and, through ``e_i``, the individual pair) stays linearly recoverable.
With ``seq_len`` a modality is ``[T, D]``: every token is ``W_m (z_i + token noise)`` plus a
fixed per-position pattern, so a sequence model has to pool. Multi-label samples draw 1-3
classes and use the mean of their class means.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from xmr.data.manifest import LabelSpec, Manifest, ModalitySpec
from xmr.data.writer import DatasetWriter
from xmr.data.sources.configs import SynthCategoryConfig  # noqa: F401 (re-exported)


@dataclass
class CategorySplit:
    """One generated split. ``labels``: int [N] (single), int [N, 2] coarse->fine, or lists."""

    a: np.ndarray
    b: np.ndarray
    labels: np.ndarray | list[list[int]]


def _split_seed(seed: int, split: str) -> int:
    """Per-split stream so adding a split never changes the others."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{split}".encode()).digest()[:8], "little")


class _Planted:
    """The fixed parts of the generative model (class means, maps, offsets, positions)."""

    def __init__(self, cfg: SynthCategoryConfig) -> None:
        rng = np.random.default_rng(cfg.seed)
        k = cfg.latent_dim
        if cfg.hierarchy:
            per = cfg.n_classes // cfg.hierarchy
            coarse = rng.normal(0, cfg.class_scale, (cfg.hierarchy, k))
            self.coarse_of = np.arange(cfg.n_classes) // per
            self.means = coarse[self.coarse_of] + rng.normal(0, cfg.fine_scale, (cfg.n_classes, k))
        else:
            self.coarse_of = None
            self.means = rng.normal(0, cfg.class_scale, (cfg.n_classes, k))
        self.maps, self.offsets, self.positions = {}, {}, {}
        for m, d, t in (("a", cfg.dim_a, cfg.seq_len_a), ("b", cfg.dim_b, cfg.seq_len_b)):
            self.maps[m] = rng.normal(0, 1 / np.sqrt(k), (d, k))
            self.offsets[m] = rng.normal(0, cfg.offset_scale, d)
            self.positions[m] = rng.normal(0, 0.5, (t, d)) if t else None


def _labels(cfg: SynthCategoryConfig, planted: _Planted, n: int, rng: np.random.Generator):
    """Class labels and the latent class component for ``n`` samples."""
    if cfg.multi_label:
        sets, comp = [], np.zeros((n, cfg.latent_dim))
        for i in range(n):
            s = sorted(rng.choice(cfg.n_classes, size=int(rng.integers(1, cfg.max_labels + 1)), replace=False))
            sets.append([int(c) for c in s])
            comp[i] = planted.means[s].mean(axis=0)
        return sets, comp
    fine = rng.integers(0, cfg.n_classes, n)
    comp = planted.means[fine]
    if planted.coarse_of is not None:
        return np.stack([planted.coarse_of[fine], fine], axis=1).astype(np.int64), comp
    return fine.astype(np.int64), comp


def _modality(cfg: SynthCategoryConfig, planted: _Planted, m: str, z: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    noise = cfg.noise_a if m == "a" else cfg.noise_b
    w, off, pos = planted.maps[m], planted.offsets[m], planted.positions[m]
    if pos is None:
        return z @ w.T + off + rng.normal(0, noise, (z.shape[0], w.shape[0]))
    t = pos.shape[0]
    zt = z[:, None, :] + rng.normal(0, cfg.token_noise, (z.shape[0], t, z.shape[1]))
    return zt @ w.T + off + pos[None] + rng.normal(0, noise, (z.shape[0], t, w.shape[0]))


def generate_category(cfg: SynthCategoryConfig) -> dict[str, CategorySplit]:
    """All splits as arrays (float32), deterministic in ``cfg.seed``."""
    cfg.validate()
    planted = _Planted(cfg)
    out = {}
    for split, n in cfg.splits.items():
        rng = np.random.default_rng(_split_seed(cfg.seed, split))
        labels, comp = _labels(cfg, planted, n, rng)
        z = comp + rng.normal(0, cfg.instance_scale, comp.shape)
        out[split] = CategorySplit(a=_modality(cfg, planted, "a", z, rng).astype(np.float32),
                                   b=_modality(cfg, planted, "b", z, rng).astype(np.float32),
                                   labels=labels)
    return out


def label_spec(cfg: SynthCategoryConfig) -> LabelSpec:
    if cfg.hierarchy:
        return LabelSpec("hierarchical", [cfg.hierarchy, cfg.n_classes])
    return LabelSpec("multi" if cfg.multi_label else "single", [cfg.n_classes])


def _shape(dim: int, seq: int | None) -> list[int]:
    return [seq, dim] if seq else [dim]


def write_synth_category(out: str, cfg: SynthCategoryConfig, *, name: str = "synth-category",
                         samples_per_shard: int = 256, overwrite: bool = False,
                         endpoint_url: str | None = None, progress: bool = True) -> Manifest:
    """Generate and write the dataset; the config is recorded in ``source.details``."""
    data = generate_category(cfg)
    w = DatasetWriter(out, name=name, task="category",
                      modalities={"a": ModalitySpec("synth_a", _shape(cfg.dim_a, cfg.seq_len_a), cfg.dtype),
                                  "b": ModalitySpec("synth_b", _shape(cfg.dim_b, cfg.seq_len_b), cfg.dtype)},
                      labels=label_spec(cfg), source={"kind": "synth-category", "details": asdict(cfg)},
                      samples_per_shard=samples_per_shard, overwrite=overwrite, endpoint_url=endpoint_url)
    for split, d in data.items():
        with w.split(split) as s:
            for i in tqdm(range(d.a.shape[0]), desc=f"synth category {split}", disable=not progress):
                meta: dict = {"index": i, "id": f"{split}-{i:06d}"}
                if cfg.multi_label:
                    meta["label_set"] = d.labels[i]
                elif cfg.hierarchy:
                    meta["label_path"] = [int(x) for x in d.labels[i]]
                else:
                    meta["label"] = int(d.labels[i])
                s.write(f"{split}-{i:06d}", arrays={"a": d.a[i], "b": d.b[i]}, meta=meta)
    return w.finish()
