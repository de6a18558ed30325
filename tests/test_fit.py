"""The one training loop without Ray (``xmr.train.fit.fit`` with ``LocalHooks``): a run
folder like a Ray Train run's (checkpoints kept as Ray keeps them, metrics.csv, best.json),
resumed from that folder, and the same numbers as the in-memory path; a relaunch with
another config is refused, naming the fields."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from conftest import write_tiny_category
from xmr.checks import resolve
from xmr.config import ConfigError, load_config
from xmr.train.driver import open_run, prepare
from xmr.train.fit import LocalHooks, _complete_on_storage, fit, fit_in_process

pytestmark = pytest.mark.timeout(180)


def _cfg(data, root, *extra):
    cfg = load_config("sccmrl", [f"data.path={data}", f"storage.root={root}", "storage.run_name=local",
                                 "data.batch_size=16", "storage.keep_checkpoints=1", "tracking.enabled=false",
                                 *extra])
    cfg, _, _ = prepare(cfg)
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_category(tmp_path_factory.mktemp("fit_data"), splits={"train": 48, "val": 16})


def test_run_folder_keeps_the_best_and_the_newest_and_resumes_without_retraining(data, tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg(data, tmp_path, "optim.epochs=3")
    run = open_run(cfg, verbose=False)
    first = fit(cfg, LocalHooks(verbose=False), run=run)
    kept = sorted(epoch for epoch, _ in _complete_on_storage(run))
    best = json.loads((tmp_path / "local" / "best.json").read_text())
    assert kept == sorted({best["epoch"], 3})  # keep_checkpoints = 1: the best, and the newest
    assert (tmp_path / "local" / f"checkpoint_epoch{best['epoch']:04d}" / "model.safetensors").is_file()
    table = pd.read_csv(tmp_path / "local" / "metrics.csv")
    assert table["epoch"].tolist() == [0, 1, 2, 3] and not list(tmp_path.glob("local/*.partial"))
    # relaunched for one more epoch: the three done are read back, not trained again
    again_cfg = _cfg(data, tmp_path, "optim.epochs=4")
    again = fit(again_cfg, LocalHooks(verbose=False), run=open_run(again_cfg, verbose=False))
    assert [r["epoch"] for r in again.history] == [0, 1, 2, 3, 4]
    assert again.history[3]["map_mean"] == first.history[3]["map_mean"] and again.history[4]["attempt"] == 2
    # the same loop in memory gives the same numbers (nothing written)
    same = fit_in_process(_cfg(data, tmp_path / "mem", "optim.epochs=3"))
    assert [r["map_mean"] for r in same.history] == pytest.approx([r["map_mean"] for r in first.history])
    assert not (tmp_path / "mem" / "local" / "metrics.csv").exists()


def test_a_relaunch_with_another_config_names_the_fields(data, tmp_path):
    open_run(_cfg(data, tmp_path, "optim.epochs=1"), verbose=False)
    open_run(_cfg(data, tmp_path, "optim.epochs=5", "resources.cpus_per_worker=2"), verbose=False)  # may change
    with pytest.raises(ConfigError, match=r"loss\.temperature: 0\.1 -> 0\.5.*--force"):
        open_run(_cfg(data, tmp_path, "loss.temperature=0.5"), verbose=False)
    open_run(_cfg(data, tmp_path, "loss.temperature=0.5"), verbose=False, force=True)
    assert "temperature: 0.5" in (tmp_path / "local" / "config.yaml").read_text()


def test_keep_best_in_memory_holds_the_best_epochs_weights(data, tmp_path):
    cfg, _ = resolve(_cfg(data, tmp_path, "optim.epochs=3", "optim.lr=0.05"))
    run = fit_in_process(cfg, keep_best=True, evaluate_untrained=False)
    from xmr.data.manifest import load_manifest
    from xmr.tasks.evaluate import evaluate

    scored = evaluate(run.method, cfg, load_manifest(cfg.data.path), cfg.data.val_split)["map_mean"]
    assert scored == pytest.approx(max(r["map_mean"] for r in run.history))


def test_a_trial_checks_its_config_once_and_types_it_once(data, tmp_path, monkeypatch):
    """A trial's config is built as a mapping, typed once (``from_dict``) and checked once
    (``prepare`` in ``run_trial``): not again by the loop or the Method it builds."""
    import xmr.checks
    import xmr.config
    import xmr.method
    import xmr.train.driver
    import xmr.tune.sweep
    from xmr.tune.sweep import trial_config
    from xmr.tune.trials import run_trial

    checks, typings = [], []
    real_check, real_from_dict = xmr.checks.check, xmr.config.from_dict
    counted = lambda cfg: checks.append(1) or real_check(cfg)  # noqa: E731
    for module in (xmr.train.driver, xmr.method):  # every module that calls check by name
        monkeypatch.setattr(module, "check", counted)
    monkeypatch.setattr(xmr.tune.sweep, "from_dict", lambda d: typings.append(1) or real_from_dict(d))
    base = _cfg(data, tmp_path, "optim.epochs=1").to_dict()
    checks.clear()
    raw = trial_config({"loss.temperature": 0.2, "seed": 3}, base)  # a sampled value and the trial's seed
    assert (raw["loss"]["temperature"], raw["seed"]) == (0.2, 3) and base["loss"]["temperature"] != 0.2
    cfg = xmr.tune.sweep.from_dict(raw)
    cfg.storage.run_name = "trial"
    result = run_trial(cfg, verbose=False, report=False)
    assert (len(typings), len(checks)) == (1, 1) and len(result.history) == 2
