"""Config loading, overrides and validation errors that name the field and the value."""

from pathlib import Path

import pytest
import yaml

from xmr.checks import check
from xmr.config import Config, ConfigError, apply_overrides, load_config
from xmr.checks import resolve

pytestmark = pytest.mark.timeout(60)


def write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


BASE = {"method": "t", "loss": {"lambdas": {"supcon": 1.0}}}


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["optim.lr=1e-4", "negatives.k=32", "data.path=s3://b/p",
                                                "loss.lambdas.center=0.5", "resources.use_gpu=true"])
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string: coerced
    assert cfg.negatives.k == 32
    assert cfg.data.path == "s3://b/p"
    assert cfg.loss.lambdas == {"supcon": 1.0, "center": 0.5}
    assert cfg.resources.use_gpu is True


@pytest.mark.parametrize("override, message", [
    (["data.bach_size=3"], "unknown key 'data.bach_size'"),
    (["nonsense=1"], "unknown key 'nonsense'"),
    (["data.batch_size=abc"], "data.batch_size = 'abc': expected an integer"),
    (["data.batch_size=2.5"], "data.batch_size = 2.5: expected an integer"),
    (["resources.use_gpu=maybe"], "resources.use_gpu = 'maybe': expected true or false"),
    (["loss.lambdas.supcon=-1"], "loss.lambdas.supcon = -1.0: λ must be >= 0"),
    (["loss.lambdas.nope=1"], "loss.lambdas.nope: unknown loss term"),
    (["negatives.k=0"], "negatives.k = 0: K must be >= 1"),
    (["negatives.strategy=random"], "negatives.strategy = 'random': must be one of"),
    (["task=detection"], "task = 'detection': must be one of"),
    (["optim.lr=0"], "optim.lr = 0.0: must be > 0"),
    (["loss.temperature=0"], "loss.temperature = 0.0: must be > 0"),
    (["data=3"], "data = 3: expected a mapping"),
    (["loss.lambdas.supcon=0"], "at least one λ must be > 0"),
    (["data.batch_size=1", "resources.num_workers=2"], "data.batch_size = 1"),
    (["oops"], "expected the form a.b=value"),
])
def test_validation_errors_name_field_and_value(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        check(load_config(write(tmp_path, BASE), override))
    assert message in str(err.value)


def test_missing_dataset_fails_before_start(tmp_path):
    cfg = load_config(write(tmp_path, BASE), [f"data.path={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError) as err:
        resolve(cfg)
    assert "data.path" in str(err.value) and "nowhere" in str(err.value)


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["model.dims={a: [4], b: [2, 3]}", "model.num_classes=[5]"])
    again = load_config(write(tmp_path, yaml.safe_load(cfg.to_yaml())))
    assert again == cfg
    assert again.model.dims == {"a": [4], "b": [2, 3]}


def test_overrides_do_not_mutate_input():
    raw = {"loss": {"lambdas": {"supcon": 1.0}}}
    apply_overrides(raw, ["loss.lambdas.supcon=2"])
    assert raw["loss"]["lambdas"]["supcon"] == 1.0
