"""Shared by the bench scripts: machine facts and the results file."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform as _platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS.parent).stdout.strip()
    except OSError:
        commit = ""
    return {"host": _platform.node(), "cpu": cpu, "cores": os.cpu_count(), "gpu": gpu,
            "python": _platform.python_version(), "torch": torch.__version__, "commit": commit}


def write_results(script: str, figures: dict, headline: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{Path(script).stem}.json"
    payload = {"machine": machine(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "figures": figures, "headline": headline}
    path.write_text(json.dumps(payload, indent=2, default=float))
    print(f"wrote {path}")
    return path
