"""bench/gpu_check.py, the script a lent GPU runs, dry-run on the CPU so that it cannot rot
between the sessions that have a GPU: every preset trains and evaluates with finite losses and
gradients, the /moments timing runs, the JSON has the fields the closing notes quote, and it
needs none of Ray, webdataset, Optuna, boto3 or MLflow (the GPU image has none of them).

The dry run is the GPU run's code at its smallest sizes (``--batch 8``, 2 steps, 2 queries, 48
videos) on one thread: on the shared 2-core machine two threads fought other work (51 s for
this test under load, 10-14 s with one thread and about 7 s with the small batches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABSENT = ["ray", "webdataset", "optuna", "boto3", "botocore", "pyarrow", "mlflow", "fsspec", "sklearn", "scipy",
          "matplotlib"]
RUN = """
import runpy, sys
for name in {absent!r}:
    sys.modules[name] = None  # as if not installed: import raises, find_spec says absent
sys.argv = ["gpu_check.py", *{argv!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_dry_run_on_cpu_without_ray_or_data_libraries(tmp_path):
    out = tmp_path / "gpu_check.json"
    argv = ["--device", "cpu", "--steps", "2", "--queries", "2", "--videos", "48", "--batch", "8", "--out", str(out)]
    code = RUN.format(absent=ABSENT, argv=argv, script=str(REPO / "bench" / "gpu_check.py"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    presets = {row["preset"]: row for row in result["figures"]["presets"]}
    assert set(presets) == {"sccmrl", "mnsgan", "triplet_category", "cdaml", "mixer_mae_pretrain", "mixer_mae",
                            "triplet_pair", "qacln", "triplet_vcmr"}
    assert all(row["finite_losses"] and row["finite_grads"] and row["step_ms_median"] > 0 for row in presets.values())
    assert all(row["batch"] == 8 and row["steps"] == 2 for row in presets.values())
    search = result["figures"]["moments_search"]
    assert search["videos"] == 48 and search["ms_per_query_single_p50"] > 0
    assert set(result["headline"]) >= {"device", "all_finite", "moments_ms_per_query", "qacln_step_ms"}
    assert result["headline"]["device"] == "cpu" and result["headline"]["all_finite"] is True


def test_without_cuda_it_says_so_and_writes_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("CUDA is present here: the no-GPU message is for machines without one")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "no GPU here" in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "x.json").exists()
