"""digits_views: scikit-learn's handwritten digits as two views of each image.

Real data that installs offline with scikit-learn (``load_digits``: 1,797 8x8 images of 10
digits). Each image is cut in two: ``left_right`` gives modality ``a`` the left four columns
and ``b`` the right four, ``top_bottom`` the top and bottom four rows; each view is stored
flat (32 pixel values scaled to [0, 1], row-major, so ``model.tokens_*`` can read it as
rows). The label is the digit. Why two halves of one image: it is the one paired, labelled
real dataset every machine here has, and a pair of halves has a real partner (the other
half of the same image) for pair matching and real classes for category retrieval. It is a
*same-modality proxy* — both views are pixels — not audio-visual data, and the generator
plants nothing: no modality gap, no hierarchy, no planted structure for any claim. The only
choice made for the comparisons is how many training images each digit has
(``train_per_class``), picked on validation so that retrieval is off its ceiling.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from xmr.data.manifest import LabelSpec, Manifest, ModalitySpec
from xmr.data.writer import DatasetWriter
from xmr.data.sources.configs import DIGITS_VIEWS, DigitsViewsConfig  # noqa: F401 (re-exported)

N_CLASSES = 10


def split_views(images: np.ndarray, views: str) -> tuple[np.ndarray, np.ndarray]:
    """``[N, 64]`` images -> the two views ``[N, 32]`` each (row-major within the view)."""
    grid = images.reshape(-1, 8, 8)
    if views == "left_right":
        a, b = grid[:, :, :4], grid[:, :, 4:]
    elif views == "top_bottom":
        a, b = grid[:, :4, :], grid[:, 4:, :]
    else:
        raise ValueError(f"views must be one of {DIGITS_VIEWS}, got {views!r}")
    return a.reshape(len(grid), 32).copy(), b.reshape(len(grid), 32).copy()


def choose_rows(target: np.ndarray, cfg: DigitsViewsConfig) -> dict[str, np.ndarray]:
    """Row indices per split: per digit, a seeded permutation cut into test, val and train
    (in that order, so changing ``train_per_class`` never changes the val or test images)."""
    rng = np.random.default_rng(cfg.seed)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in range(N_CLASSES):
        idx = rng.permutation(np.nonzero(target == c)[0])
        n_test, n_val = cfg.test_per_class, cfg.val_per_class
        parts["test"] += idx[:n_test].tolist()
        parts["val"] += idx[n_test:n_test + n_val].tolist()
        rest = idx[n_test + n_val:]
        parts["train"] += rest[: cfg.train_per_class].tolist() if cfg.train_per_class else rest.tolist()
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in parts.items()}


def generate_digits_views(cfg: DigitsViewsConfig) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per split: (sklearn row indices, view a, view b, labels), deterministic in ``cfg.seed``."""
    from sklearn.datasets import load_digits

    cfg.validate()
    digits = load_digits()
    images, target = digits.data.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    out = {}
    for split, rows in choose_rows(target, cfg).items():
        a, b = split_views(images[rows], cfg.views)
        out[split] = (rows, a, b, target[rows])
    return out


def write_digits_views(out: str, cfg: DigitsViewsConfig | None = None, *, name: str = "digits-views",
                       samples_per_shard: int = 512, overwrite: bool = False, endpoint_url: str | None = None,
                       progress: bool = True) -> Manifest:
    """Build the dataset at ``out``; the config and the data's provenance are in ``source.details``."""
    del progress  # a few hundred rows: nothing to show
    cfg = cfg or DigitsViewsConfig()
    data = generate_digits_views(cfg)
    details = {**asdict(cfg), "from": "sklearn.datasets.load_digits (1,797 real 8x8 handwritten digits)",
               "views_are": "two halves of one image: a same-modality proxy, nothing planted",
               "sample_id": "digits-NNNN = row NNNN of sklearn load_digits"}
    w = DatasetWriter(out, name=name, task="category",
                      modalities={"a": ModalitySpec(f"digit_{cfg.views.split('_')[0]}", [32], cfg.dtype),
                                  "b": ModalitySpec(f"digit_{cfg.views.split('_')[1]}", [32], cfg.dtype)},
                      labels=LabelSpec("single", [N_CLASSES], names=[[str(c) for c in range(N_CLASSES)]]),
                      source={"kind": "digits-views", "details": details}, samples_per_shard=samples_per_shard,
                      overwrite=overwrite, endpoint_url=endpoint_url)
    for split, (rows, a, b, labels) in data.items():
        with w.split(split) as s:
            for i in range(rows.size):
                s.write(f"{split}-{i:06d}", arrays={"a": a[i], "b": b[i]},
                        meta={"index": i, "id": f"digits-{int(rows[i]):04d}", "label": int(labels[i])})
    return w.finish()
