"""What a comparison produced (shared by the runner that fills it and the report that writes it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from xmr.compare.spec import ComparisonSpec

NOT_METRICS = {"variant", "seed", "level", "status", "error", "phase", "trial", "best_epoch", "epochs", "wall_s",
               "finished_at", "n_no_relevant", "pretrain_epochs", "cap", "extended", "peaked_at_cap", "round", "candidate",
               "val_score", "last_gain"}


@dataclass
class Comparison:
    spec: ComparisonSpec
    runs: pd.DataFrame  # one row per (level, variant, seed): status, error, test metrics
    tuning: pd.DataFrame  # one row per tuning trial: variant, values, validation metric
    # variant -> the tuned values its seeds ran with (a claim map: variant -> {level: values})
    chosen: dict[str, dict[str, Any]]
    summary: pd.DataFrame  # one row per (level, variant): n, mean, std, 95% interval per metric
    claims: list[dict[str, Any]]  # per (claim, level): paired difference, interval, verdict
    wall_s: float
    out: str
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. in-batch negatives per anchor, per-level caps
    trends: list[dict[str, Any]] = field(default_factory=list)  # per claim: slope over the map's levels


def metric_columns(runs: pd.DataFrame) -> list[str]:
    return [c for c in runs.columns if c not in NOT_METRICS and pd.api.types.is_numeric_dtype(runs[c])]


