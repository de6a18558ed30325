"""A task family: what a kind of retrieval problem owns, so no layer branches on its name.

The trainer, ``xmr eval``, ``xmr compare`` and the endpoint all go through a family
object (``xmr.tasks.family_of(cfg)``): its main metric, the dataset format and loader
units it reads, what decides relevance inside a batch, its evaluation (the one every
caller uses), its gallery and how that gallery is searched, saved and loaded. Adding a
family (say text-to-audio moment retrieval) is one module here and one line in
``xmr/tasks/__init__.py``; see docs/design.md.
"""

from __future__ import annotations

import abc
from pathlib import Path
from collections.abc import Mapping
from typing import Any, ClassVar

import torch


class TaskFamily(abc.ABC):
    name: ClassVar[str]
    dataset_task: ClassVar[str]  # the manifest task it reads ("category" or "vcmr" shards)
    main_metric: ClassVar[str]  # what checkpoints and sweeps select by (higher is better)
    route: ClassVar[str]  # the endpoint that serves it ("search" or "moments")
    title: ClassVar[str]  # how messages name its models
    train_unit: ClassVar[str | None] = None  # the loader unit a training step reads (None: the format's default)
    indexed_units: ClassVar[bool] = True  # training units are numbered 0..N-1 (exactly-once accounting)
    labelled: ClassVar[bool] = False  # items carry class labels (loss terms check their label kind)
    extends: ClassVar[tuple[str, ...]] = ()  # families whose models and loss terms also fit this one
    data_fields: ClassVar[tuple[str, ...]] = ()  # data.* fields only this family's loader reads
    output_files: ClassVar[tuple[str, ...]] = ()  # what ``outputs`` writes beside metrics.json

    def fits(self, families: tuple[str, ...]) -> bool:
        """Whether a model or loss term declared for ``families`` applies to this family."""
        return self.name in families or any(f in families for f in self.extends)

    # ------------------------------------------------------------------ training
    def targets(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Per-row ids that decide which rows of a batch are relevant to each other (None:
        the family's terms find their positives themselves)."""
        return None

    def bank_targets(self, cfg) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of one row's ``targets`` (what a memory bank stores beside a key)."""
        raise ValueError(f"the {self.name} family has no memory bank (negatives.memory_bank must be 0)")

    # ------------------------------------------------------------------ evaluation
    @abc.abstractmethod
    def score_share(self, model, cfg, manifest, split: str, detailed: bool = False, nms: float | None = None) -> Any:
        """This rank's part of the evaluation (plain Python / tensors, gathered to rank 0);
        ``detailed`` keeps what ``outputs`` needs for per-query files."""
        ...

    @abc.abstractmethod
    def score(self, shares: list[Any], cfg) -> dict[str, float]:
        """The metrics of the whole split from every rank's share (on rank 0)."""
        ...

    def outputs(self, shares: list[Any], cfg, manifest, nms: float | None = None) -> tuple[dict, dict[str, str]]:
        """``xmr eval``: (metrics, {file name: text}) from detailed shares; by default the
        metrics alone."""
        return self.score(shares, cfg), {}

    # ------------------------------------------------------------------ serving
    @abc.abstractmethod
    def build_gallery(self, model, cfg, manifest, root: str, split: str, endpoint_url: str | None = None,
                      approx: str = "auto", ann=None, part: tuple[int, int] = (0, 1)):
        """The gallery a replica searches. ``approx`` (auto / on / off) and ``ann`` (an
        ``xmr.tasks.ann.AnnConfig``) concern families with an approximate index; others ignore
        them. ``part`` (i, n): only the i-th of n contiguous parts of the split, in order (one
        shard of a sharded index; the parts concatenate to the whole gallery)."""
        ...

    @abc.abstractmethod
    def save_gallery(self, gallery, out: Path) -> None:
        ...

    @abc.abstractmethod
    def load_gallery(self, path: Path, arrays: Mapping[str, Any], items: dict):
        ...
