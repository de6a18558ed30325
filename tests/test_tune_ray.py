"""Ray Tune + Optuna sweeps on a real local Ray: a 6-trial sweep 3 at a time with ASHA, an
interrupted multi-objective sweep that resumes without redoing finished trials, ablations,
and a bad space that fails before any trial starts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from xmr.config import load_config
from xmr.data.sources.synth_category import SynthCategoryConfig, write_synth_category
from train_helpers import kill_an_actor_after

pytestmark = [pytest.mark.timeout(480), pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
SMALL = ["optim.epochs=4", "data.batch_size=32", "model.embed_dim=16", "model.hidden_dim=32"]
SPACE = {"preset": "sccmrl", "params": {
    "loss.lambdas.center": {"type": "loguniform", "low": 1e-4, "high": 1.0},
    "loss.lambdas.label": {"type": "loguniform", "low": 1e-3, "high": 3.0},
    "negatives.strategy": {"type": "categorical", "choices": ["uniform", "hardest"]},
    "negatives.memory_bank": {"type": "int", "low": 16, "high": 256, "log": True,
                              "when": {"negatives.strategy": "hardest"}},
    "optim.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2}}}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tune") / "synth")
    write_synth_category(out, SynthCategoryConfig(splits={"train": 200, "val": 60}), progress=False)
    return out


@pytest.fixture(scope="module")
def space_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    return path


def xmr(*args, **kw) -> subprocess.Popen:
    env = dict(os.environ, RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "xmr.cli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def test_bad_space_fails_before_any_trial(tmp_path, synth):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"preset": "sccmrl", "params": {"loss.lambdas.nope": {"type": "loguniform",
                                                                                        "low": 0.1, "high": 1}}}))
    proc = xmr("tune", "--config", "sccmrl", "--space", str(bad), "--trials", "2", "--storage", str(tmp_path / "sw"),
               "--name", "bad", "--set", f"data.path={synth}")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "params.loss.lambdas.nope" in out and "unknown loss term" in out
    assert not (tmp_path / "sw").exists() and "Started a local Ray instance" not in out


def _finished_trials(root: Path, epochs: int) -> dict[str, float]:
    """Trial run folders whose last epoch is written -> the mtime of their metrics.csv."""
    done = {}
    for csv in root.glob("trial_*/metrics.csv"):
        try:
            if pd.read_csv(csv)["epoch"].max() >= epochs:
                done[csv.parent.name] = csv.stat().st_mtime
        except (pd.errors.EmptyDataError, KeyError):
            pass
    return done


def _recorded_finished(sweep: Path) -> set[str]:
    """Tune trial ids of the trials Tune's saved experiment state lists as finished (a trial's
    run folder is ``trial_<number>_<id>``)."""
    out = set()
    for state in sweep.glob("experiment_state-*.json"):
        try:
            entries = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError, OSError):  # being written
            continue
        out |= {trial["trial_id"] for trial in (json.loads(e[0]) for e in entries)
                if trial["status"] == "TERMINATED"}
    return out


def test_interrupted_multi_objective_sweep_resumes_without_redoing_trials(tmp_path, synth, space_file, monkeypatch):
    """``xmr tune --multi-objective`` killed (SIGKILL, the driver and all it started) after
    its first trial finished, then relaunched: finished trials are not trained again, the
    SQLite Optuna study is resumed, and the Pareto front covers every trial."""
    # Tune saves its experiment state every ~10 s by default; these trials take seconds, so the
    # sweep would end before a state listing a finished trial exists to be killed after
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")
    monkeypatch.setenv("XMR_PROGRESS_EVERY_S", "1")  # the status line, printed each second in a log
    n = 6  # trials train in their own processes, a few seconds each: enough of them to cut the sweep short
    args = ["tune", "--config", "sccmrl", "--space", str(space_file), "--trials", str(n), "--concurrency", "1",
            "--no-asha", "--multi-objective", "--confirm-top", "0", "--storage", str(tmp_path / "sw"), "--name", "resumable",
            "--set", f"data.path={synth}", *[x for s in SMALL for x in ("--set", s)], "--set", "optim.epochs=2"]
    proc = xmr(*args)
    sweep = tmp_path / "sw" / "resumable"
    deadline = time.time() + 300
    while not _recorded_finished(sweep) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait(timeout=30)
    # finished as Tune saved it: a trial whose run folder completed in the moment before the
    # kill, but which Tune's saved state does not list as finished, is sampled again
    before = {k: v for k, v in _finished_trials(sweep / "trials", 2).items()
              if k.rsplit("_", 1)[-1] in _recorded_finished(sweep)}
    assert before, f"no trial finished before the kill:\n{proc.stdout.read()[-3000:]}"
    assert not (sweep / "trials.csv").exists()  # it really was cut short

    again = xmr(*args)
    out, _ = again.communicate(timeout=400)
    assert again.returncode == 0, out[-4000:]
    assert "resuming sweep resumable" in out
    table = pd.read_csv(sweep / "trials.csv")
    assert len(table) == n and table["error"].isna().all() and (table["epochs"] == 2).all()
    after = _finished_trials(sweep / "trials", 2)
    for name, mtime in before.items():
        assert after[name] == mtime, f"{name} was trained again"
    assert set(before) <= set(table["trial"])
    # the Optuna study lives in the sweep folder and was resumed, not started again
    import optuna

    study = optuna.load_study(study_name="resumable", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == n
    assert (sweep / "plot_history.png").is_file()  # drawn from that study (its first objective)
    assert "Reporting training result" not in out
    assert "Configuration for experiment" not in out
    # xmr's lines only: no trial's epoch lines with Ray's (trial_driver pid=...) prefix, no
    # "[repeated 2x across cluster]"; a line per finished trial and the status line instead
    assert "pid=" not in out and "repeated" not in out and "] epoch 1/2" not in out, out[-3000:]
    assert re.search(r"\[xmr\] sweep \d/6 ", out) and re.search(r"\[xmr\] sweep: \d running, \d/6 done", out), out
    assert "confirm" not in out  # --confirm-top 0: none
    # multi-objective: (metric, seconds per epoch) for every trial, and the non-dominated ones
    assert table["train_s_per_epoch"].gt(0).all()
    front = pd.read_csv(sweep / "pareto.csv")
    assert 1 <= len(front) <= n and set(front["trial"]) <= set(table["trial"])
    assert (sweep / "pareto.png").is_file()


@pytest.fixture(scope="module")
def one_ray():
    """The in-process sweep and ablation below share one embedded Ray, started here with the
    dashboard (the trial-kill test finds the trial's process through Ray's state API; a sweep
    of one-worker trials would start Ray without it); down after the last."""
    import ray

    from xmr.ray.session import ensure_ray

    ensure_ray(None, num_cpus=4, dashboard=True)
    yield
    ray.shutdown()


def plotly_traces(html_file: Path) -> list[dict]:
    """The traces of a figure Optuna / plotly wrote as HTML (the JSON handed to Plotly.newPlot)."""
    import re

    html = html_file.read_text()
    start = re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*', html)
    assert start, f"no figure in {html_file}"
    traces, _ = json.JSONDecoder().raw_decode(html, start.end())
    return traces


def test_sweep_six_trials_asha_study_confirmed_winner(tmp_path, synth, space_file, one_ray):
    """Six trials, three at a time, ASHA pruning, then the top two confirmed with two new seeds:
    the study in optuna.db records what happened (pruned trials PRUNED with one value per
    epoch, finished ones COMPLETE with their best epoch), the history plot is that study in
    trial order, and best.json follows the confirmed winner (the best mean over its seeds)."""
    import optuna

    from xmr.checkpoint import fetch_checkpoint
    from xmr.method import Method
    from xmr.data.reader import make_loader
    from xmr.tasks.category import evaluate_category
    from xmr.tune.space import load_space
    from xmr.tune.sweep import SweepSettings, run_sweep

    cfg = load_config("sccmrl", [f"data.path={synth}", f"storage.root={tmp_path / 'sw'}", *SMALL])
    space = load_space(space_file, base=cfg)
    settings = SweepSettings(name="six", trials=6, concurrency=3, seed=0, reduction_factor=3, confirm_top=2,
                             confirm_seeds=2)
    result = run_sweep(cfg, space, settings)
    table = result.table
    assert len(table) == 6 and table["error"].isna().all()
    assert table["pruned"].sum() >= 1 and (table.loc[table["pruned"], "epochs"] < 4).all()
    assert (table.loc[~table["pruned"], "epochs"] == 4).all()
    # the conditional parameter exists exactly when its condition holds
    assert (table["negatives.memory_bank"].notna() == (table["negatives.strategy"] == "hardest")).all()
    sweep = tmp_path / "sw" / "six"
    for name in ("trials.csv", "best_config.yaml", "best.json", "confirm.csv", "plot_history.html", "plot_history.png",
                 "plot_importances.png", "plot_contour.png", "plot_intermediate.html", "plot_intermediate.png"):
        assert (sweep / name).is_file(), name

    # the study is the record: every trial in it, in the state it ended in, with its epochs
    study = optuna.load_study(study_name="six", storage=f"sqlite:///{sweep}/optuna.db")
    assert len(study.trials) == 6
    by_number = {t.number: t for t in study.trials}
    for _, row in table.iterrows():
        trial = by_number[int(row["number"])]
        assert trial.state.name == row["state"] == ("PRUNED" if row["pruned"] else "COMPLETE"), row["trial"]
        # one intermediate value per trained epoch, step = epoch (a stopped trial may have
        # trained on into the epoch after its stop: that one never reaches Tune)
        assert sorted(trial.intermediate_values) == list(range(1, int(row["epochs"]) + 1)), row["trial"]
        history = pd.read_csv(sweep / "trials" / row["trial"] / "metrics.csv").set_index("epoch")
        for epoch, value in trial.intermediate_values.items():
            assert value == pytest.approx(history.loc[epoch, "map_mean"]), (row["trial"], epoch)
        if row["pruned"]:  # its value is the epoch it was stopped at, not a final one
            assert trial.value == pytest.approx(trial.intermediate_values[int(row["epochs"])])
        else:  # its best epoch, what its best checkpoint scores
            assert trial.value == pytest.approx(max(trial.intermediate_values.values()))
            assert trial.value == pytest.approx(row["map_mean"])
    # the history plot is that study in trial order: x the trial numbers, rising; y their values
    (points,) = [t for t in plotly_traces(sweep / "plot_history.html") if t.get("mode") == "markers" and t.get("x")]
    complete = sorted((t.number, t.value) for t in study.trials if t.state.name == "COMPLETE")
    assert points["x"] == [n for n, _ in complete] and points["y"] == pytest.approx([v for _, v in complete])
    # the learning curves mark the pruned trials
    curves = {t["name"]: t for t in plotly_traces(sweep / "plot_intermediate.html")}
    pruned_numbers = {t.number for t in study.trials if t.state.name == "PRUNED"}
    assert {n for n in curves if n.endswith("(pruned)")} == {f"trial {n} (pruned)" for n in pruned_numbers}
    # Tune's trial folders and the run folders: trial_<number>_<id>, not Ray's long names
    for folder in [*sweep.glob("trial_*"), *(sweep / "trials").iterdir()]:
        assert re.fullmatch(r"trial_\d{3}_[0-9a-f]{5,8}", folder.name), folder.name
    assert {p.name for p in sweep.glob("trial_*")} == set(table["trial"])

    # the confirmation: the top two finished trials, two new seeds each (not the search's seed 0)
    finished = table[~table["pruned"]].sort_values("map_mean", ascending=False)
    confirm = pd.read_csv(sweep / "confirm.csv")
    assert set(confirm["candidate"]) == set(finished["trial"].head(2))
    seeds = confirm[["seed_1", "seed_2"]]
    assert confirm["mean"].tolist() == pytest.approx(seeds.mean(axis=1).tolist())
    winner = confirm.loc[confirm["mean"].idxmax()]
    best = result.best
    assert best["confirmed"]["search_trial"] == winner["candidate"] == result.confirmation.winner
    assert best["confirmed"]["seeds"] == [1, 2]
    assert best["value"] == pytest.approx(max(winner["seed_1"], winner["seed_2"]))  # its best confirmation run
    assert "/confirm/trials/" in best["checkpoint"]
    runs = pd.read_csv(sweep / "confirm_runs.csv")
    assert sorted(zip(runs["candidate"], runs["seed"])) == sorted((c, s) for c in confirm["candidate"] for s in (1, 2))
    assert (runs["epochs"] == 4).all() and runs["error"].isna().all()
    searched = table.set_index("trial").loc[winner["candidate"]]
    for path, value in best["params"].items():
        assert (value is None and pd.isna(searched[path])) or value == pytest.approx(searched[path])
    method = Method.from_checkpoint(fetch_checkpoint(str(sweep)))  # "the best of this sweep": the confirmed winner
    assert method.cfg.seed in (1, 2)
    for path, value in best["params"].items():
        if value is not None:
            node = method.cfg.to_dict()
            for part in path.split("."):
                node = node[part]
            assert node == pytest.approx(value)
    val = make_loader(synth, "val", local_batch_size=64, shuffle=False)
    assert evaluate_category(method.model, val, "category")["map_mean"] == pytest.approx(best["value"], abs=1e-5)
    # tracking: one MLflow parent for the sweep, a child per trial and confirmation run
    from mlflow.tracking import MlflowClient

    from train_helpers import mlflow_runs

    uri = f"sqlite:///{sweep}/mlflow.db"
    mlruns = mlflow_runs(uri)
    (parent,) = [r for r in mlruns if r.data.tags.get("xmr.parent") == "true"]
    children = [r for r in mlruns if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(mlruns) == 11 and len(children) == 10
    assert {r.info.run_name for r in children} >= set(table["trial"])
    client = MlflowClient(uri)
    for child in children:
        if child.info.run_name not in set(table["trial"]):
            continue
        row = table.loc[table["trial"] == child.info.run_name].iloc[0]
        assert child.data.params["optim.lr"] == str(row["optim.lr"]) or \
            float(child.data.params["optim.lr"]) == pytest.approx(row["optim.lr"])
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "map_mean"))
        # epoch 0 (before training) onwards, one point per epoch; a trial ASHA stops may log the
        # epoch it was already running when the stop reached it, never fewer than Tune saw
        assert steps == list(range(len(steps))) and len(steps) >= row["epochs"] + 1
        if not row["pruned"]:
            assert len(steps) == row["epochs"] + 1


def test_a_killed_trial_is_retried_from_its_run_folder(tmp_path, synth, one_ray):
    """A one-worker trial trains in its Tune trial's own process: killed after epoch 2, Tune
    retries it (``storage.max_failures``) and the loop resumes from the trial's run folder:
    every epoch once, the ones after the kill in attempt 2."""
    import threading

    from xmr.tune.sweep import SweepSettings, run_ablation

    data = str(tmp_path / "data")  # epochs of a few seconds: the kill lands mid-run
    write_synth_category(data, SynthCategoryConfig(splits={"train": 2000, "val": 60}), progress=False)
    cfg = load_config("sccmrl", [f"data.path={data}", f"storage.root={tmp_path / 'ft'}", "optim.epochs=4",
                                 "data.batch_size=32", "storage.max_failures=2"])
    killed: list = []
    killer = threading.Thread(target=kill_an_actor_after, args=((tmp_path / "ft" / "ft" / "trials", "*/metrics.csv"), 2,
                                                              "ImplicitFunc", killed, 0), daemon=True)
    killer.start()
    result = run_ablation(cfg, {"full": []}, SweepSettings(name="ft", concurrency=1), seeds=[0])
    killer.join(timeout=5)
    assert killed and isinstance(killed[0], int), f"the trial was never killed: {killed!r}"
    table = result.table
    assert len(table) == 1 and table["error"].isna().all() and table["epochs"].item() == 4
    (trial,) = (tmp_path / "ft" / "ft" / "trials").iterdir()
    h = pd.read_csv(trial / "metrics.csv").set_index("epoch")
    assert h.index.tolist() == [0, 1, 2, 3, 4]  # nothing redone, nothing lost
    assert h.loc[1, "attempt"] == 1 and h.loc[4, "attempt"] == 2
    assert h.loc[1:, "train_exactly_once"].all()


def test_ablation_one_command(tmp_path, synth, one_ray):
    from xmr.tune.sweep import SweepSettings, run_ablation

    cfg = load_config("sccmrl", [f"data.path={synth}", f"storage.root={tmp_path / 'ab'}", *SMALL,
                                 "optim.epochs=2"])
    variants = {"full": [], "w/o center": ["loss.lambdas.center=0"]}
    result = run_ablation(cfg, variants, SweepSettings(name="ab", concurrency=2), seeds=[0])
    table = result.table
    assert sorted(table["variant"]) == ["full", "w/o center"] and table["error"].isna().all()
    assert (table["epochs"] == 2).all()
    md = (tmp_path / "ab" / "ab" / "ablation.md").read_text()
    assert "| w/o center | loss.lambdas.center=0 |" in md and "map_mean" in md
    # the ablated run really had the term off: its run config says so
    run = table.loc[table["variant"] == "w/o center", "trial"].item()
    saved = yaml.safe_load((tmp_path / "ab" / "ab" / "trials" / run / "config.yaml").read_text())
    assert saved["loss"]["lambdas"]["center"] == 0



def _tear(root: Path, name: str, *, list_ahead: bool = False) -> str:
    """Give the killed experiment the files a driver killed mid-sync leaves on storage: by
    default a trial list saved before its second trial started, beside a generator and
    searcher saved after (what CI caught: the resumed sweep ran one trial of two);
    ``list_ahead``: the list saved after, the generator and searcher before. Returns the
    second trial's id."""
    import ray.cloudpickle as cloudpickle

    folder = root / name
    (state_file,) = folder.glob("experiment_state-*.json")
    state = json.loads(state_file.read_text())
    second = json.loads(state["trial_data"][1][0])["trial_id"]
    if not list_ahead:
        state["trial_data"] = state["trial_data"][:1]
        state_file.write_text(json.dumps(state))
        return second
    (gen_file,) = folder.glob("search_gen_state-*.json")
    (searcher_file,) = folder.glob("searcher-state-*.pkl")
    gen, searcher = (cloudpickle.loads(f.read_bytes()) for f in (gen_file, searcher_file))
    # as saved when only the first trial existed (and had finished), whichever save these were
    gen["counter"] = 1
    gen["name:ConcurrencyLimiter"]["live_trials"] = set()
    gen["name:ConcurrencyLimiter"]["num_unfinished_live_trials"] = 0
    searcher["_ot_trials"].pop(second, None)
    gen_file.write_bytes(cloudpickle.dumps(gen))
    searcher_file.write_bytes(cloudpickle.dumps(searcher))
    return second


def test_experiment_killed_mid_save_resumes_every_trial(tmp_path, one_ray, capsys):
    """An Optuna sweep and a grid (``make_tuner``, one trial at a time) killed while their
    second trial runs, their saved files torn the ways an interrupted copy leaves them, then
    resumed: every trial of the experiment runs, the finished first one is not run again,
    and the Optuna study closes the lost trial as FAIL."""
    import optuna
    import ray
    import tune_interrupt_helpers as helpers

    from xmr.ray.session import ensure_ray

    ensure_ray(None, num_cpus=4)  # the module's Ray (already up after the sweep above)
    root, markers = tmp_path / "root", tmp_path / "markers"
    env = dict(os.environ, RAY_AUTH_MODE="token", PYTHONPATH=os.pathsep.join(
        [str(REPO / "tests"), str(REPO / "platform"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", "import tune_interrupt_helpers as h; "
                             f"h.interrupt({ray.get_runtime_context().gcs_address!r}, {str(root)!r}, {str(markers)!r})"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "ready":
                break
        assert lines and lines[-1].strip() == "ready", "".join(lines[-40:])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    for name, kind in helpers.EXPERIMENTS.items():
        second = _tear(root, name, list_ahead=name == "search_ahead")
        grid = helpers.tuner(name, str(root), str(markers), block=False).fit()
        out = capsys.readouterr().out
        assert f"resuming sweep {name}" in out and "[xmr] " in out.split("resuming sweep", 1)[1], out
        assert f"sweep {helpers.SAMPLES}/{helpers.SAMPLES} " in out and "sweep 1/" not in out, out  # goes on counting
        assert len(grid) == helpers.SAMPLES and not grid.errors, (name, out)
        # one start per trial id: the finished first trial was not run again, the lost second
        # one not continued; two new trials took the slots left
        starts = [p.name.split(".")[0] for p in (markers / name).iterdir()]
        reported = {r.metrics["trial_id"] for r in grid}
        assert len(starts) == len(set(starts)) == helpers.SAMPLES + 1, starts
        assert second not in reported and reported < set(starts), (reported, starts)
        if kind == "grid":  # every cell once
            assert sorted(r.config["cell"] for r in grid) == list(range(helpers.SAMPLES))
        else:  # the study holds the three trials, and the lost one closed as FAIL
            study = optuna.load_study(study_name=name, storage=f"sqlite:///{root / name}.db")
            states = [t.state.name for t in study.trials]
            assert sorted(states) == ["COMPLETE"] * helpers.SAMPLES + ["FAIL"], states

def test_pareto_front_is_the_non_dominated_set():
    from xmr.tune.report import pareto_front

    table = pd.DataFrame({"trial": list("abcde"), "map_mean": [0.5, 0.6, 0.4, 0.6, 0.7],
                          "train_s_per_epoch": [1.0, 2.0, 0.5, 3.0, 5.0], "error": [None] * 5})
    front = pareto_front(table, "map_mean", "max")
    assert front["trial"].tolist() == ["c", "a", "b", "e"]  # d is beaten by b (same mAP, faster)
