"""Search spaces: shipped files validate, conditional parameters only appear when their
condition holds, and a bad space fails before any trial, naming the parameter."""

from pathlib import Path

import optuna
import pytest
import yaml

from xmr.config import load_config
from xmr.tune.space import SpaceError, load_space

pytestmark = pytest.mark.timeout(120)

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_spaces_validate_and_sample(path):
    space = load_space(path)
    assert space.preset == path.stem
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    base = load_config(space.preset)
    for _ in range(20):
        trial = study.ask()
        sampled = space.suggest(trial)
        cfg = space.apply(base, sampled)  # every sample is a valid config
        for dotted, value in sampled.items():
            node = cfg.to_dict()
            for part in dotted.split("."):
                node = node[part]
            assert node == value
        study.tell(trial, 0.0)


def write(tmp_path, params, **top):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"preset": "sccmrl", "params": params, **top}))
    return path


def test_conditional_parameter_only_with_its_condition(tmp_path):
    space = load_space(write(tmp_path, {
        "negatives.strategy": {"type": "categorical", "choices": ["uniform", "hardest"]},
        "negatives.memory_bank": {"type": "int", "low": 16, "high": 1024, "log": True,
                                  "when": {"negatives.strategy": "hardest"}},
    }))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=1))
    seen = {"uniform": 0, "hardest": 0}
    for _ in range(40):
        trial = study.ask()
        sampled = space.suggest(trial)
        seen[sampled["negatives.strategy"]] += 1
        assert ("negatives.memory_bank" in sampled) == (sampled["negatives.strategy"] == "hardest")
        if "negatives.memory_bank" in sampled:
            assert 16 <= sampled["negatives.memory_bank"] <= 1024
        study.tell(trial, float(len(sampled)))
    assert seen["uniform"] and seen["hardest"]


@pytest.mark.parametrize("params, message", [
    ({"loss.lambdas.nope": {"type": "loguniform", "low": 0.1, "high": 1}}, "params.loss.lambdas.nope"),
    ({"optim.lrr": {"type": "loguniform", "low": 0.1, "high": 1}}, "params.optim.lrr"),
    ({"optim.lr": {"type": "loguniform", "low": 0, "high": 1}}, "params.optim.lr.low = 0.0: a log-scale parameter needs low > 0"),
    ({"optim.lr": {"type": "uniform", "low": 1, "high": 0.1}}, "params.optim.lr: low (1.0) must be < high (0.1)"),
    ({"optim.lr": {"type": "gaussian", "low": 1, "high": 2}}, "params.optim.lr.type = 'gaussian'"),
    ({"negatives.k": {"type": "int", "low": 0, "high": 8}}, "params.negatives.k: value 0 does not fit the config"),
    ({"negatives.k": {"type": "int", "low": 1.5, "high": 8}}, "params.negatives.k: an int parameter needs integer bounds"),
    ({"negatives.strategy": {"type": "categorical", "choices": ["uniform", "random"]}}, "params.negatives.strategy: value 'random'"),
    ({"negatives.strategy": {"type": "categorical", "choices": []}}, "params.negatives.strategy.choices"),
    ({"negatives.memory_bank": {"type": "int", "low": 1, "high": 8, "when": {"negatives.strategy": "hardest"}}},
     "params.negatives.memory_bank.when: 'negatives.strategy' is not a parameter of this space"),
        ({"optim.lr": {"type": "uniform", "low": 0.1, "high": 1, "when": {"optim.weight_decay": 0.1}},
          "optim.weight_decay": {"type": "categorical", "choices": [0.1], "when": {"optim.lr": 0.5}}},
         "circular condition"),
    ({"negatives.strategy": {"type": "categorical", "choices": ["uniform"]},
      "negatives.memory_bank": {"type": "int", "low": 1, "high": 8, "when": {"negatives.strategy": "hardest"}}},
     "params.negatives.memory_bank.when.negatives.strategy: ['hardest'] not among its choices"),
    ({"optim.lr": {"type": "uniform", "low": 0.1, "high": 1, "lo": 3}}, "params.optim.lr: unknown keys ['lo']"),
])
def test_bad_spaces_name_the_parameter(tmp_path, params, message):
    with pytest.raises(SpaceError) as err:
        load_space(write(tmp_path, params))
    assert message in str(err.value)


def test_bad_top_level(tmp_path):
    with pytest.raises(SpaceError, match="unknown keys \\['metrics'\\]"):
        load_space(write(tmp_path, {"optim.lr": {"type": "uniform", "low": 0.1, "high": 1}}, metrics="x"))
    with pytest.raises(SpaceError, match="not found"):
        load_space(tmp_path / "missing.yaml")
    with pytest.raises(SpaceError, match="preset 'nope'"):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({"preset": "nope", "params": {"optim.lr": {"type": "uniform", "low": 0.1, "high": 1}}}))
        load_space(path)


def test_spaces_are_found_by_name_from_the_package_and_ship_with_it():
    """The package's resolver sees exactly the top-level search_spaces/ folder, and the
    installed package carries it (package data), as presets and comparison specs."""
    import tomllib

    from xmr.tune.space import SPACE_DIR, resolve_space

    assert sorted(p.name for p in SPACE_DIR.glob("*.yaml")) == sorted(p.name for p in SPACES.glob("*.yaml"))
    assert resolve_space("sccmrl").resolve() == (SPACES / "sccmrl.yaml").resolve()
    with pytest.raises(SpaceError, match="shipped"):
        resolve_space("no_such_space")
    pyproject = tomllib.loads((SPACES.parent / "pyproject.toml").read_text())
    assert "search_spaces/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["xmr"]
