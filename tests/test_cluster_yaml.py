"""cluster.yaml is valid against Ray's own cluster-config schema (with Ray's AWS defaults filled in)."""

import copy
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load():
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_ray_schema():
    from xmr.ray.compat import validate_cluster_config

    validate_cluster_config(load())


def test_schema_check_really_rejects_bad_configs():
    import jsonschema
    from xmr.ray.compat import validate_cluster_config

    bad = copy.deepcopy(load())
    bad["available_node_types"]["gpu_spot"]["unexpected_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_cluster_config(bad)


def test_head_is_cpu_workers_autoscale_with_spot_and_dashboard_is_local():
    cfg = load()
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in types["gpu_ondemand"]["node_config"]
    assert all(t.get("min_workers", 0) == 0 for n, t in types.items() if n != cfg["head_node_type"])
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def test_the_haproxy_recipe_names_what_xmr_serve_sets():
    """cluster.yaml's `ray start` recipe for `xmr serve --ingress haproxy` names each variable
    xmr sets for an embedded Ray, with the same value (a cluster reads them when Ray starts)."""
    from xmr.ray.serve import HAPROXY_ENV

    text = (Path(__file__).resolve().parents[1] / "cluster.yaml").read_text()
    for name, value in HAPROXY_ENV.items():
        assert f"{name}={value}" in text or f"{name}='{value}'" in text, name
