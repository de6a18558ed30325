"""Task families (category, pair, vcmr): the one boundary where a kind of retrieval
problem is named. See ``xmr.tasks.base.TaskFamily``."""

from __future__ import annotations

from xmr.tasks.base import TaskFamily
from xmr.tasks.category import CategoryFamily, PairFamily
from xmr.tasks.vcmr import VcmrFamily

FAMILIES: dict[str, TaskFamily] = {f.name: f for f in (CategoryFamily(), PairFamily(), VcmrFamily())}


def family(name: str) -> TaskFamily:
    if name not in FAMILIES:
        raise KeyError(f"task = {name!r}: unknown task family (known: {sorted(FAMILIES)})")
    return FAMILIES[name]


def family_of(cfg) -> TaskFamily:
    return family(cfg.task)


__all__ = ["FAMILIES", "TaskFamily", "family", "family_of"]
