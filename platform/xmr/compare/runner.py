"""Train every variant of a comparison with every seed as concurrent Ray Tune trials (each a
Ray Train run sized by its config), score the best checkpoint of each on the test split,
and summarise: a table per run, mean / std / 95% t-interval per variant and metric, a plot
of the main metric, and the spec's claimed orderings checked."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from xmr.compare.spec import ComparisonSpec
from xmr.machine import describe
from xmr.compare.stats import t_interval
from xmr.train.runfs import RunDir

TEST_METRICS = "test_metrics.json"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "variant"


def ensure_dataset(dataset: dict[str, Any]) -> str:
    """The spec's dataset path; a missing synthetic dataset is generated from its ``synth`` recipe."""
    from xmr.data import storage

    path = dataset["path"]
    if storage.exists(storage.join(path, "manifest.json")):
        return path
    recipe = dict(dataset.get("synth") or {})
    if not recipe:
        raise FileNotFoundError(f"dataset {path!r} not found and the spec gives no synth recipe to build it")
    kind = recipe.pop("kind", "category")
    if kind == "category":
        from xmr.data.sources.synth_category import SynthCategoryConfig, write_synth_category

        write_synth_category(path, SynthCategoryConfig(**recipe), progress=False)
    elif kind == "vcmr":
        from xmr.data.sources.synth_vcmr import SynthVcmrConfig, write_synth_vcmr

        write_synth_vcmr(path, SynthVcmrConfig(**recipe), progress=False)
    else:
        raise ValueError(f"dataset.synth.kind = {kind!r}: use category or vcmr")
    return path


def compare_trial(config: dict[str, Any], variants: dict[str, dict[str, Any]], runs_root: str, split: str) -> None:
    """One (variant, seed): optional pre-training run, the training run (its epochs reported
    to Tune), then the best checkpoint scored on ``split`` into the run folder."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from xmr.checkpoint import fetch_checkpoint
    from xmr.config import from_dict
    from xmr.method import evaluate_checkpoint
    from xmr.train.driver import run_training

    name, seed = config["variant"], int(config["seed"])
    spec = variants[name]
    cfg = from_dict(spec["config"])
    cfg.seed, cfg.storage.root, cfg.storage.max_failures = seed, runs_root, 0
    run_name = f"{slug(name)}-seed{seed}"
    if spec.get("pretrain"):
        pre = from_dict(spec["pretrain"])
        pre.seed, pre.storage.root, pre.storage.max_failures = seed, runs_root, 0
        pre_result = run_training(pre, run_name=f"{run_name}-pretrain", start_ray=False, verbose=False)
        cfg.model.pretrained = pre_result.run_uri
    result = run_training(cfg, run_name=run_name, callbacks=[TuneReportCallback()], start_ray=False, verbose=False)
    metrics = evaluate_checkpoint(str(fetch_checkpoint(result.run_uri, endpoint_url=cfg.data.endpoint_url)), split)
    RunDir(runs_root, run_name, cfg.data.endpoint_url).write_text(
        TEST_METRICS, json.dumps({"variant": name, "seed": seed, "split": split, "metrics": metrics,
                                  "best_epoch": result.best["epoch"] if result.best else None}, indent=2))


@dataclass
class Comparison:
    spec: ComparisonSpec
    runs: pd.DataFrame  # one row per (variant, seed): status, error, test metrics
    summary: pd.DataFrame  # one row per variant: mean, std, ci_low, ci_high per metric
    claims: list[dict[str, Any]]
    wall_s: float
    out: str


def run_comparison(spec: ComparisonSpec, root: str, concurrency: int = 0, address: str | None = None) -> Comparison:
    from ray import tune

    from xmr.train.driver import ensure_ray, prepare

    ensure_dataset(spec.dataset)
    prepared: dict[str, dict[str, Any]] = {}
    for name, v in spec.variants.items():  # resolve paths/dims in the driver: fail before any trial
        cfg, _, _ = prepare(v.config, run_name=slug(name))
        entry: dict[str, Any] = {"config": cfg.to_dict()}
        if v.pretrain is not None:
            entry["pretrain"] = prepare(v.pretrain, run_name=f"{slug(name)}-pretrain")[0].to_dict()
        prepared[name] = entry
    first = next(iter(spec.variants.values())).config
    ensure_ray(address, num_cpus=max(4, 2 * (os.cpu_count() or 1)))
    out = RunDir(root, spec.name)
    runs_root = out.uri("runs")
    per_trial = 0.25 + first.resources.num_workers * first.resources.cpus_per_worker
    import ray

    n = len(spec.variants) * len(spec.seeds)
    limit = concurrency or max(1, int(float(ray.cluster_resources().get("CPU", 1)) // per_trial))
    trainable = tune.with_resources(tune.with_parameters(compare_trial, variants=prepared, runs_root=runs_root,
                                                         split=spec.split), {"CPU": 0.25})
    from xmr.train.runfs import filesystem

    fs, base = filesystem(root)
    t0 = time.perf_counter()
    grid = tune.Tuner(trainable,
                      param_space={"variant": tune.grid_search(list(spec.variants)), "seed": tune.grid_search(spec.seeds)},
                      tune_config=tune.TuneConfig(max_concurrent_trials=min(n, limit)),
                      run_config=tune.RunConfig(name=f"{spec.name}-tune-{int(time.time())}", storage_path=base,
                                                storage_filesystem=fs)).fit()
    wall = time.perf_counter() - t0
    rows = []
    for result in grid:
        name, seed = result.config["variant"], int(result.config["seed"])
        row: dict[str, Any] = {"variant": name, "seed": seed, "status": "ok" if result.error is None else "failed",
                               "error": None if result.error is None else _error_text(result.error)}
        text = RunDir(runs_root, f"{slug(name)}-seed{seed}").read_text(TEST_METRICS)
        if text and result.error is None:
            row.update(json.loads(text)["metrics"])
        rows.append(row)
    runs = pd.DataFrame(rows).sort_values(["variant", "seed"], key=lambda s: s.map(
        {v: i for i, v in enumerate(spec.variants)}) if s.name == "variant" else s).reset_index(drop=True)
    summary = summarise(spec, runs)
    claims = check_claims(spec, summary)
    comparison = Comparison(spec, runs, summary, claims, wall, out.uri())
    write_outputs(comparison, out)
    return comparison


def _error_text(error: BaseException) -> str:
    """The root cause's last line (Tune wraps the trial's exception)."""
    text = str(error).strip().splitlines()
    lines = [line for line in text if line.strip()]
    cause = next((line for line in reversed(lines) if "Error" in line or "Exception" in line), lines[-1] if lines else "")
    return f"{type(error).__name__}: {cause.strip()}"[:400]


def metric_columns(runs: pd.DataFrame) -> list[str]:
    skip = {"variant", "seed", "status", "error", "n_no_relevant"}
    return [c for c in runs.columns if c not in skip and pd.api.types.is_numeric_dtype(runs[c])]


def summarise(spec: ComparisonSpec, runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for name in spec.variants:
        sub = runs[(runs["variant"] == name) & (runs["status"] == "ok")]
        failed = runs[(runs["variant"] == name) & (runs["status"] == "failed")]
        row: dict[str, Any] = {"variant": name, "n_ok": len(sub), "n_failed": len(failed),
                               "error": failed["error"].iloc[0] if len(failed) else None}
        for col in metric_columns(runs):
            mean, std, low, high = t_interval(sub[col].tolist())
            row.update({f"{col}_mean": mean, f"{col}_std": std, f"{col}_ci_low": low, f"{col}_ci_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def check_claims(spec: ComparisonSpec, summary: pd.DataFrame) -> list[dict[str, Any]]:
    """Each expected ordering of the main metric's means: held or not, by how much, and
    whether the 95% intervals separate."""
    by = summary.set_index("variant")
    m = spec.metric
    out = []
    for left, op, right in spec.expect:
        if f"{m}_mean" not in by.columns or by.loc[[left, right], "n_ok"].min() == 0:
            out.append({"claim": f"{left} {op} {right}", "status": "not measured (runs failed)"})
            continue
        a, b = by.loc[left], by.loc[right]
        diff = a[f"{m}_mean"] - b[f"{m}_mean"]
        held = diff > 0 if op == ">" else diff < 0
        separated = (a[f"{m}_ci_low"] > b[f"{m}_ci_high"]) or (a[f"{m}_ci_high"] < b[f"{m}_ci_low"])
        out.append({"claim": f"{left} {op} {right}", "status": "held" if held else "did not hold",
                    "left": float(a[f"{m}_mean"]), "right": float(b[f"{m}_mean"]), "difference": float(diff),
                    "intervals_separate": bool(separated)})
    return out


def _fmt(mean: float, std: float, low: float, high: float) -> str:
    if pd.isna(mean):
        return "–"
    if pd.isna(low):
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {std:.4f} [{low:.4f}, {high:.4f}]"


def markdown(c: Comparison, machine: str | None = None) -> str:
    spec, m = c.spec, c.spec.metric
    metrics = [col for col in metric_columns(c.runs) if col == m] + \
              [col for col in metric_columns(c.runs) if col != m][:3]
    lines = [f"## {spec.name}", "", f"**Claim.** {spec.claim}", "",
             f"Data `{spec.dataset['path']}`, split `{spec.split}`, {len(spec.seeds)} seeds per variant; "
             f"mean ± std [95% t-interval]. Wall time {c.wall_s / 60:.1f} min"
             + (f" on {machine}" if machine else "") + ".", "",
             "| variant | " + " | ".join(metrics) + " | runs |", "|---|" + "---|" * (len(metrics) + 1)]
    for _, r in c.summary.iterrows():
        cells = [_fmt(r.get(f"{x}_mean"), r.get(f"{x}_std"), r.get(f"{x}_ci_low"), r.get(f"{x}_ci_high"))
                 for x in metrics]
        runs = f"{int(r['n_ok'])} ok" + (f", {int(r['n_failed'])} failed: {r['error']}" if r["n_failed"] else "")
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {runs} |")
    if c.claims:
        lines += ["", "Orderings of the main metric:", ""]
        for cl in c.claims:
            if "difference" in cl:
                sep = "the 95% intervals separate" if cl["intervals_separate"] else "the 95% intervals overlap"
                lines.append(f"- `{cl['claim']}`: **{cl['status']}** ({cl['left']:.4f} vs {cl['right']:.4f}, "
                             f"difference {cl['difference']:+.4f}; {sep})")
            else:
                lines.append(f"- `{cl['claim']}`: {cl['status']}")
    return "\n".join(lines) + "\n"


def plot(c: Comparison, path_png: str | None = None) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = c.spec.metric
    s = c.summary
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(s), 3.6))
    means = s[f"{m}_mean"] if f"{m}_mean" in s else pd.Series([float("nan")] * len(s))
    lows = s[f"{m}_ci_low"] if f"{m}_ci_low" in s else means
    highs = s[f"{m}_ci_high"] if f"{m}_ci_high" in s else means
    err = [(means - lows).fillna(0).clip(lower=0), (highs - means).fillna(0).clip(lower=0)]
    ax.errorbar(range(len(s)), means, yerr=err, fmt="o", capsize=5, color="#1f5fa8")
    for i, r in s.iterrows():
        if r["n_ok"] == 0:
            ax.annotate("failed", (i, 0), ha="center", color="#b22222")
    ax.set_xticks(range(len(s)), s["variant"], rotation=20, ha="right")
    ax.set_ylabel(m)
    ax.set_title(f"{c.spec.name}: {m} (mean, 95% CI, {len(c.spec.seeds)} seeds)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_outputs(c: Comparison, out: RunDir) -> None:
    out.write_text("runs.csv", c.runs.to_csv(index=False))
    out.write_text("summary.csv", c.summary.to_csv(index=False))
    out.write_text("summary.md", markdown(c, describe()))
    out.write_text("claims.json", json.dumps(c.claims, indent=2))
    out.write_bytes(f"{c.spec.metric}.png", plot(c))


def update_report(report: str | Path, c: Comparison) -> None:
    """Replace (or append) this comparison's section of a results page, keeping the others."""
    report = Path(report)
    text = report.read_text() if report.is_file() else (
        "# Results: do the seeds' claims reproduce?\n\nGenerated by `xmr compare --report docs/results.md` from "
        "the latest comparison runs; each section says which orderings held and which did not.\n\n")
    start, end = f"<!-- xmr-compare:{c.spec.name}:start -->", f"<!-- xmr-compare:{c.spec.name}:end -->"
    section = f"{start}\n{markdown(c, describe())}\n![{c.spec.name}]({c.spec.name}.png)\n{end}\n"
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    report.write_text(text)
    (report.parent / f"{c.spec.name}.png").write_bytes(plot(c))
