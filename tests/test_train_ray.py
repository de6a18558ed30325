"""Ray Train end to end on a real 2-node local cluster (ray.cluster_utils.Cluster) reading
shards from a real S3 endpoint (moto over HTTP): exactly-once consumption, results that do
not depend on the number of workers, recovery from a killed worker, and resumption of a
relaunched run. The xmr code reaches the workers through the runtime_env (py_modules)."""

from __future__ import annotations

import threading

import pandas as pd
import pytest

from conftest import write_tiny_category
from xmr.checkpoint import fetch_checkpoint
from xmr.method import Method
from xmr.config import load_config
from xmr.data import storage
from xmr.ray.session import code_runtime_env
from xmr.train.driver import run_training
from train_helpers import kill_an_actor_after

pytestmark = [pytest.mark.timeout(420), pytest.mark.ray]

SMALL = ["model.embed_dim=16", "model.hidden_dim=32", "model.dropout=0.0", "negatives.k=255",
         "data.batch_size=10", "data.split_mode=sample", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """Head + one worker node, 2 logical CPUs each; started after the S3 env is set, so every
    node's processes talk to the moto endpoint."""
    import ray
    from ray.cluster_utils import Cluster

    # the dashboard (on 127.0.0.1) serves Ray's state API, which the kill test uses to find a worker's PID
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                      "dashboard_host": "127.0.0.1"})
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env=code_runtime_env(), log_to_driver=True)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def s3_data(cluster, s3_endpoint, tmp_path_factory):
    import boto3

    bucket = "xmr-train-test"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    local = write_tiny_category(tmp_path_factory.mktemp("cat") / "tiny", splits={"train": 60, "val": 24})
    storage.upload_dir(str(local), f"s3://{bucket}/tiny", progress=False)
    return bucket


def cfg_for(*overrides):
    return load_config("sccmrl", [*SMALL, *overrides])


def history(result):
    return pd.DataFrame(result.history).set_index("epoch")


def test_two_nodes_from_s3_exactly_once_and_same_metrics_as_one_worker(s3_data, tmp_path):
    two = run_training(cfg_for(f"data.path=s3://{s3_data}/tiny", "optim.epochs=2", "resources.num_workers=2",
                               "resources.placement_strategy=STRICT_SPREAD", f"storage.root=s3://{s3_data}/runs"),
                       run_name="two-workers")
    h2 = history(two)
    trained = h2.loc[[1, 2]]
    assert (trained["num_nodes"] == 2).all() and (trained["num_workers"] == 2).all()
    assert (trained["train_samples"] == 60).all() and trained["train_exactly_once"].all()
    assert h2.loc[2, "train_loss"] < h2.loc[1, "train_loss"]
    # the run folder, best pointer and checkpoints are on S3, and the best checkpoint serves offline
    assert two.run_uri == f"s3://{s3_data}/runs/two-workers"
    assert two.best_checkpoint.startswith(f"s3://{s3_data}/runs/two-workers/checkpoint_epoch")
    local = fetch_checkpoint(two.run_uri, cache_dir=str(tmp_path / "cache"))
    method = Method.from_checkpoint(local)
    assert method.cfg.storage.run_name == "two-workers"

    one = run_training(cfg_for(f"data.path=s3://{s3_data}/tiny", "optim.epochs=2", "resources.num_workers=1",
                               f"storage.root={tmp_path / 'runs'}"), run_name="one-worker")
    h1 = history(one)
    for col in ("map_mean", "map_a2b", "map_b2a", "train_loss", "train_supcon", "train_center"):
        assert h1[col].dropna().tolist() == pytest.approx(h2[col].dropna().tolist(), rel=1e-4, abs=1e-5), col


def test_killed_worker_resumes_from_last_checkpoint(cluster, tmp_path):
    data = write_tiny_category(tmp_path / "data", splits={"train": 1500, "val": 40}, samples_per_shard=150)
    root = tmp_path / "runs"
    killed: list[int] = []
    killer = threading.Thread(target=kill_an_actor_after, args=((root / "killed", "metrics.csv"), 2, "RayTrainWorker",
                                                              killed), daemon=True)
    killer.start()
    result = run_training(cfg_for(f"data.path={data}", "optim.epochs=3", "resources.num_workers=2",
                                  "storage.max_failures=2", f"storage.root={root}"), run_name="killed")
    killer.join(timeout=5)
    assert killed, "the worker was never killed (did the run finish before epoch 2 was written?)"
    assert isinstance(killed[0], int), f"state API failed: {killed[0]!r}"
    h = history(result)
    assert h.index.tolist() == [0, 1, 2, 3]  # every epoch once: nothing redone, nothing lost
    assert h.loc[3, "attempt"] == 2 and h.loc[1, "attempt"] == 1
    assert h["step"].diff().dropna().nunique() == 1  # steps continue from the checkpoint
    assert h.loc[1:, "train_exactly_once"].all()


def test_relaunch_with_same_run_name_resumes(cluster, tmp_path):
    data = write_tiny_category(tmp_path / "data", splits={"train": 40, "val": 16})
    args = [f"data.path={data}", f"storage.root={tmp_path / 'runs'}", "resources.num_workers=1"]
    first = run_training(cfg_for(*args, "optim.epochs=1"), run_name="again")
    second = run_training(cfg_for(*args, "optim.epochs=2"), run_name="again")
    h1, h2 = history(first), history(second)
    assert h1.index.tolist() == [0, 1] and h2.index.tolist() == [0, 1, 2]
    assert h2.loc[1, "map_mean"] == h1.loc[1, "map_mean"]  # epoch 1 was not trained again
    assert h2.loc[2, "attempt"] == 2 and h2.loc[2, "step"] == 2 * h2.loc[1, "step"]
    assert (tmp_path / "runs" / "again" / "config.yaml").is_file()
    # the relaunch continued the same MLflow run: one run, every epoch once, and it is finished
    from mlflow.tracking import MlflowClient

    from train_helpers import mlflow_runs

    run_dir = tmp_path / "runs" / "again"
    uri = f"sqlite:///{run_dir}/mlflow.db"
    (run,) = mlflow_runs(uri)
    assert run.info.run_id == (run_dir / "mlflow_run_id").read_text().strip() and run.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "map_mean")]
    assert sorted(steps) == [0, 1, 2]
