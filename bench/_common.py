"""Shared by the bench scripts: machine facts and the results file."""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the checkout's xmr
from xmr.ray.compat import use_token_auth  # noqa: E402

use_token_auth()  # before any bench imports Ray (Ray reads the mode at import)

RESULTS = Path(__file__).resolve().parent / "results"
TVR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tvr"


def tvr_val_corpus(model) -> tuple[dict, list[str], list[float], float]:
    """The 2,179 TVR validation videos at their real durations (1.5 s clips, at most 100),
    random 1024-d visual and 768-d subtitle features encoded by a QACLN ``model``:
    (clip encodings, video names, durations in s, seconds spent encoding)."""
    import time

    import torch

    video2dur = json.loads((TVR / "tvr_video2dur_idx.json").read_text())["val"]
    names = list(video2dur)
    durations = [float(video2dur[v][0]) for v in names]
    n_clips = [min(100, max(1, int(-(-dur // 1.5)))) for dur in durations]
    g = torch.Generator().manual_seed(0)
    n_max = max(n_clips)
    mask = torch.arange(n_max)[None, :] < torch.tensor(n_clips)[:, None]
    t0 = time.perf_counter()
    parts = []
    with torch.no_grad():
        for lo in range(0, len(n_clips), 128):
            m = mask[lo:lo + 128]
            parts.append(model.encode_videos(torch.randn(len(m), n_max, 1024, generator=g),
                                             torch.randn(len(m), n_max, 768, generator=g), m, m))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, names, durations, time.perf_counter() - t0


def fake_manifest(task: str, dims: dict[str, list[int]], n: int, clip_len: float | None = None,
                  queries: int | None = None) -> dict:
    """A valid manifest describing the benchmark's in-memory gallery (no shards are read)."""
    q = {"num_queries": queries} if task == "vcmr" else {}
    return {"schema_version": 1, "name": f"bench-{task}", "task": task, "created": "",
            "modalities": {r: {"name": r, "shape": s, "dtype": "float16"} for r, s in dims.items()},
            "labels": {"kind": "none", "num_classes": []}, "clip_len": clip_len, "source": {"kind": "bench"},
            "splits": {"test": {"num_samples": n, **q, "shards": [{"path": "none.tar", "num_samples": n, **q,
                                                                   "sha256": "0" * 64, "bytes": 1}]}}}


def machine() -> dict:
    """``xmr.machine.machine()`` and the commit the figures were measured at."""
    from xmr.machine import machine as facts

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS.parent).stdout.strip()
    except OSError:
        commit = ""
    return {**facts(), "commit": commit}


def write_results(script: str, figures: dict, headline: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{Path(script).stem}.json"
    payload = {"machine": machine(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "figures": figures, "headline": headline}
    path.write_text(json.dumps(payload, indent=2, default=float))
    print(f"wrote {path}")
    return path
