"""What a person watching a run reads: one line per epoch and a final summary table."""

from __future__ import annotations

import sys
import time
from typing import Any

import pandas as pd


def say(message: str) -> None:
    """One progress line from a Train worker. Not ``print``: Ray Train patches ``print`` in
    workers to also go through its logger, which shows every line twice on the driver."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class EpochProgress:
    """A progress line within a long epoch, at most every ``every_s`` seconds (rank 0 only):
    ``epoch 3/10  step 120/400  1830 samples/s  loss 1.234  epoch ETA 2m30s``. The loss is
    the running mean since the epoch began."""

    def __init__(self, steps: int, every_s: float, *, enabled: bool, epoch: int, epochs: int) -> None:
        self.steps, self.every_s, self.enabled = steps, every_s, enabled and every_s > 0
        self.epoch, self.epochs = epoch, epochs
        self.t0 = self.last = time.perf_counter()
        self.samples, self.loss_sum, self.n = 0, 0.0, 0

    @classmethod
    def for_run(cls, cfg, steps: int, epoch: int, enabled: bool) -> "EpochProgress":
        return cls(steps, cfg.tracking.progress_every_s, enabled=enabled, epoch=epoch + 1, epochs=cfg.optim.epochs)

    def update(self, step: int, samples: int, loss: float) -> dict[str, float] | None:
        """Prints a line when one is due; returns its figures then (for tracking), else None."""
        self.samples += samples
        self.loss_sum += loss
        self.n += 1
        now = time.perf_counter()
        if not self.enabled or now - self.last < self.every_s or step >= self.steps:
            return None
        self.last = now
        elapsed = now - self.t0
        figures = {"samples_per_s": self.samples / max(elapsed, 1e-9), "running_loss": self.loss_sum / self.n,
                   "epoch_eta_s": elapsed / step * (self.steps - step)}
        say(f"[xmr] epoch {self.epoch}/{self.epochs}  step {step}/{self.steps}  "
            f"{figures['samples_per_s']:.0f} samples/s  loss {figures['running_loss']:.4f}  "
            f"epoch ETA {_duration(figures['epoch_eta_s'])}")
        return figures


def epoch_line(row: dict[str, Any], epochs: int, metric: str, eta_s: float) -> str:
    """``epoch 3/10  loss 1.234 (supcon 1.1 center 0.3)  map_mean 0.812  1234 samples/s  ETA 2m10s``."""
    terms = [(k[len("train_"):], v) for k, v in row.items() if k.startswith("train_")
             and k not in ("train_loss", "train_s", "train_samples", "train_exactly_once")
             and not k.startswith("train_grad_share_")]
    shares = [(k[len("train_grad_share_"):], v) for k, v in row.items() if k.startswith("train_grad_share_")]
    term_text = " ".join(f"{k} {v:.4g}" for k, v in terms)
    shown = [metric] + [k for k in ("map_mean_coarse", "r1_mean", "vr_r10", "svmr_0.7_r1", "val_reconstruction")
                        if k in row and k != metric]
    metric_text = "  ".join(f"{k} {row[k]:.4f}" for k in shown if k in row)
    share_text = " ".join(f"{k} {100 * v:.1f}%" for k, v in shares)
    return (f"[xmr] epoch {row['epoch']}/{epochs}  loss {row.get('train_loss', float('nan')):.4f}"
            + (f" ({term_text})" if term_text else "") + (f"  grad shares ({share_text})" if share_text else "")
            + f"  {metric_text}  "
            f"{row.get('samples_per_s', 0):.0f} samples/s  train {row.get('train_s', 0):.1f}s eval {row.get('eval_s', 0):.1f}s"
            f"  ETA {_duration(eta_s)}")


def summary_table(history: list[dict[str, Any]], metric: str, mode: str = "max") -> str:
    """Per-epoch loss, the checkpoint metric, throughput; the best epoch marked."""
    if not history:
        return "(no epochs recorded)"
    df = pd.DataFrame(history)
    cols = [c for c in ("epoch", "train_loss", metric, "samples_per_s", "train_s", "eval_s") if c in df.columns]
    df = df[cols].copy()
    if metric in df.columns:
        scored = df[df["epoch"] > 0][metric] if "epoch" in df.columns else df[metric]
        best = (scored.idxmax() if mode == "max" else scored.idxmin()) if scored.notna().any() else None
        df["best"] = ["*" if i == best else "" for i in df.index]
    return df.to_string(index=False, float_format=lambda v: f"{v:.4f}")
