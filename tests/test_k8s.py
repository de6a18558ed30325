"""The KubeRay manifests in k8s/ hold together: they parse; the RayCluster has cluster.yaml's
node types (a CPU head that runs nothing, on-demand and spot GPU workers); the RayJobs run
scripts that exist in the image the Dockerfile builds; the RayService's serve config passes
Ray Serve's own schema and is the application of serving/config.yaml; and every image and
Ray version matches the pins in pyproject.toml. (No Kubernetes here: applying them is the
README's instructions, not a test.)"""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"


def _load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def _pins() -> tuple[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray = next(re.match(r"ray\[.*\]==(.+)", d).group(1) for d in project["dependencies"] if d.startswith("ray["))
    return ray, project["version"]


def _dockerfile() -> tuple[str, str]:
    """(base image, WORKDIR) of k8s/Dockerfile."""
    text = (K8S / "Dockerfile").read_text()
    return re.search(r"^FROM (\S+)", text, re.M).group(1), re.search(r"^WORKDIR (\S+)", text, re.M).group(1)


def _cluster_specs():
    """Every RayCluster spec in the folder: the RayCluster itself and the RayService's own."""
    yield "raycluster.yaml", _load("raycluster.yaml")["spec"]
    yield "rayservice.yaml", _load("rayservice.yaml")["spec"]["rayClusterConfig"]
    yield "rayservice-sharded.yaml", _load("rayservice-sharded.yaml")["spec"]["rayClusterConfig"]


def _containers(spec: dict):
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for group in groups:
        yield from group["template"]["spec"]["containers"]


def test_every_manifest_parses_with_kind_and_version():
    kinds = {p.name: yaml.safe_load(p.read_text()) for p in sorted(K8S.glob("*.yaml"))}
    assert {n: d["kind"] for n, d in kinds.items()} == {"raycluster.yaml": "RayCluster", "rayjob-train.yaml": "RayJob",
                                                         "rayjob-tune.yaml": "RayJob", "rayservice.yaml": "RayService",
                                                         "rayservice-sharded.yaml": "RayService"}
    assert all(d["apiVersion"] == "ray.io/v1" and d["metadata"]["name"] for d in kinds.values())


def test_images_and_ray_versions_match_the_pins():
    ray, version = _pins()
    base, _ = _dockerfile()
    assert base.startswith(f"rayproject/ray:{ray}-") and "gpu" in base  # CUDA image of the pinned Ray
    for name, spec in _cluster_specs():
        assert spec["rayVersion"] == ray, name
        assert spec["authOptions"]["mode"] == "token", name  # Ray's token auth, as everywhere else
        images = {c["image"] for c in _containers(spec)}
        assert images == {f"xmr:{version}"}, (name, images)  # the image k8s/Dockerfile builds


def test_raycluster_has_cluster_yamls_node_types():
    launcher = yaml.safe_load((REPO / "cluster.yaml").read_text())
    spec = _load("raycluster.yaml")["spec"]
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    workers = {n: t for n, t in launcher["available_node_types"].items() if n != launcher["head_node_type"]}
    assert len(groups) == len(workers) == 2
    for launcher_name, group_name in (("gpu_ondemand", "gpu-ondemand"), ("gpu_spot", "gpu-spot")):
        node, group = workers[launcher_name], groups[group_name]
        assert (group["minReplicas"], group["maxReplicas"]) == (node["min_workers"], node["max_workers"])
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1" and limits["cpu"] == "8"  # g5.2xlarge: 1 GPU, 8 vCPU
    assert "InstanceMarketOptions" in workers["gpu_spot"]["node_config"]
    assert groups["gpu-spot"]["template"]["spec"]["tolerations"]  # scheduled on spot capacity only


@pytest.mark.parametrize("manifest,script", [("rayjob-train.yaml", "jobs/train.py"), ("rayjob-tune.yaml", "jobs/tune.py")])
def test_rayjob_entrypoints_exist_in_the_image(manifest, script):
    _, workdir = _dockerfile()
    job = _load(manifest)["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": _load("raycluster.yaml")["metadata"]["name"]}
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "python" and argv[1] == f"{workdir}/{script}" and (REPO / script).is_file()
    for arg in argv:  # every file the entrypoint names is in the checkout the image copies
        if arg.startswith(workdir + "/"):
            assert (REPO / arg[len(workdir) + 1:]).is_file(), arg
    copied = re.findall(r"^COPY \S* ?(\S+) ", (K8S / "Dockerfile").read_text(), re.M)
    assert script.split("/")[0] in " ".join(copied)
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert env["env_vars"]["RAY_AUTH_MODE"] == "token"
    # the options it passes are options the command takes
    from xmr.cli import build_parser

    command = "train" if script.endswith("train.py") else "tune"
    build_parser().parse_args([command, *argv[2:]])


def test_rayservice_serve_config_passes_serves_schema_and_is_serving_config():
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_config)  # raises on anything Serve would refuse
    local = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(local)
    (app,), (ours,) = schema.applications, local["applications"]
    assert (app.name, app.route_prefix, app.import_path) == (ours["name"], ours["route_prefix"], ours["import_path"])
    assert set(app.args) == set(ours["args"])  # same arguments; the paths point at S3
    assert all(str(app.args[k]).startswith("s3://") for k in ("checkpoint", "gallery"))
    assert app.runtime_env["env_vars"] == ours["runtime_env"]["env_vars"]
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))  # the installed library's builder
    # inside a pod the Service reaches the proxy on the pod IP; locally it stays on 127.0.0.1
    assert serve_config["http_options"]["host"] == "0.0.0.0" and local["http_options"]["host"] == "127.0.0.1"


def test_sharded_rayservice_is_the_same_application_over_a_sharded_s3_index():
    from ray.serve.schema import ServeDeploySchema

    from xmr.serve.settings import serve_settings

    config = yaml.safe_load(_load("rayservice-sharded.yaml")["spec"]["serveConfigV2"])
    (app,) = ServeDeploySchema.model_validate(config).applications
    (plain,) = ServeDeploySchema.model_validate(yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])).applications
    assert app.import_path == plain.import_path and app.runtime_env == plain.runtime_env
    s = serve_settings(app.args)  # typed and range-checked as xmr serve checks them
    assert s.index.startswith("s3://") and s.gallery is None and s.replicas >= 2 and s.shard_deadline_s > 0
