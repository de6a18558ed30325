"""What machine a figure was measured on (benchmarks and comparison reports name it)."""

from __future__ import annotations

import os
import platform as _platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return _platform.machine()


def machine() -> dict:
    """Host, CPU model and cores, GPU (if any), Python and torch versions."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host": _platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu,
            "python": _platform.python_version(), "torch": torch.__version__}


def describe(facts: dict | None = None) -> str:
    """One line: ``2 cores (AMD EPYC 7B13)``, with the GPU where there is one."""
    facts = facts or machine()
    return f"{facts['cores']} cores ({facts['cpu']})" + (f", {facts['gpu']}" if facts.get("gpu") else "")
