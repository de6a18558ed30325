"""``xmr train`` as a user runs it (a subprocess with an embedded local Ray): its output is
xmr's own lines, none of Ray Train's per-report dumps, and it leaves an MLflow run in the
run folder that ``mlflow.search_runs`` finds with the resolved config and per-epoch metrics.
(A resumed run continuing the same MLflow run is checked in test_train_ray; a sweep's parent
and children, and its SQLite Optuna study, in test_tune_ray.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xmr.config import load_config
from xmr.train.tracking import RUN_ID_FILE, flat_params, tracking_uri

pytestmark = [pytest.mark.timeout(300), pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.embed_dim=16", "model.hidden_dim=32", "data.batch_size=10", "optim.epochs=2",
         "tracking.progress_every_s=0.001"]


@pytest.fixture(scope="module")
def trained(tiny_category_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "XMR_VERBOSE")}
    env.update(RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1")
    args = ["train", "--config", "sccmrl", "--storage", str(root), "--run-name", "tracked",
            "--set", f"data.path={tiny_category_dataset}", *[x for s in SMALL for x in ("--set", s)]]
    proc = subprocess.run([sys.executable, "-m", "xmr.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "tracked", proc.stdout + proc.stderr


WORKER_PREFIX = re.compile(r"^(\x1b\[\d+m)?\((RayTrainWorker|TrainController)[^)]*\)(\x1b\[0m)? ?")
# A Ray C++ component's warning or error in its log format ("[2026-12-07 19:32:24,609 E 11744 11759]"),
# e.g. the raylet's disk-almost-full line: a warning the user should see, as a Python one is.
RAY_LEVEL_WE = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+ [EW] \d+ \d+\]")


def test_default_output_is_xmrs_own_lines(trained):
    """Every line is xmr's: the driver's, rank 0's (which Ray prefixes with the worker's pid),
    or the closing epoch table; none of Ray Train's own report dumps or controller chatter."""
    _, out = trained
    assert "[xmr] epoch 2/2" in out, out[-3000:]
    for noise in ("Reporting training result", "TrainingReport(", "PreemptionWatcher", "TrainController pid=",
                  "Configuration for experiment", "Started training worker group"):
        assert noise not in out, f"{noise!r} in the default output:\n{out[-3000:]}"
    lines = [WORKER_PREFIX.sub("", line) for line in out.splitlines() if line.strip()]
    table = [i for i, line in enumerate(lines) if line.split()[:2] == ["epoch", "train_loss"]]
    assert len(table) == 1, out[-3000:]
    rows = lines[table[0] + 1: table[0] + 4]
    assert [row.split()[0] for row in rows] == ["0", "1", "2"], out[-3000:]
    others = [line for i, line in enumerate(lines)
              if not line.startswith("[xmr]") and not table[0] <= i < table[0] + 4]
    assert all("warn" in line.lower() or "error" in line.lower() or RAY_LEVEL_WE.search(line)
               for line in others), others


def test_mlflow_run_has_the_config_and_every_epoch(trained):
    import mlflow
    from mlflow.tracking import MlflowClient

    from train_helpers import mlflow_runs

    run_dir, out = trained
    cfg = load_config("sccmrl", ["data.path=unused", *SMALL])
    uri = tracking_uri(cfg, str(run_dir))
    assert uri == f"sqlite:///{run_dir}/mlflow.db" and (run_dir / "mlflow.db").is_file()
    runs = mlflow_runs(uri)
    assert len(runs) == 1 and runs[0].info.run_id == (run_dir / RUN_ID_FILE).read_text().strip()
    run = runs[0]
    assert run.info.status == "FINISHED"
    saved = flat_params(load_config(str(run_dir / "config.yaml")))
    assert run.data.params == saved  # the resolved config, every field
    assert run.data.params["optim.epochs"] == "2" and run.data.params["method"] == "sccmrl"
    client = MlflowClient(uri)
    rows = {int(r["epoch"]): r for r in _csv_rows(run_dir / "metrics.csv")}
    for name in ("map_mean", "train_loss", "train_supcon", "train_center"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        expected = {e: float(r[name]) for e, r in rows.items() if r.get(name) not in ("", None)}
        assert history.keys() == expected.keys() and history == pytest.approx(expected, rel=1e-6), name
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "map_mean")}) == [0, 1, 2]
    assert client.get_metric_history(run.info.run_id, "progress_samples_per_s")  # in-epoch progress figures
    best = json.loads((run_dir / "best.json").read_text())
    assert run.data.tags["xmr.best_checkpoint"] == best["checkpoint"]
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="best.json", tracking_uri=uri)
    assert json.loads(Path(local).read_text()) == best


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))
