"""What a sweep or ablation leaves behind: the trials table (CSV), the best config (YAML),
a best-checkpoint pointer (``best.json``, so ``xmr serve --checkpoint <sweep>`` serves it),
and Optuna's plots (HTML and PNG)."""

from __future__ import annotations

import io
import json
import math
import warnings
from typing import Any

import pandas as pd

from xmr.checkpoint import BEST
from xmr.config import Config
from xmr.train.runfs import RunDir
from xmr.tune.trials import SweepResult, read_trial_best


def _sorted(table: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    return table.sort_values(metric, ascending=(mode == "min"), na_position="last").reset_index(drop=True)


def _with_checkpoints(cfg: Config, name: str, table: pd.DataFrame) -> pd.DataFrame:
    from xmr.data import storage

    bests = read_trial_best(storage.join(cfg.storage.root, name, "trials"), cfg.data.endpoint_url)
    table = table.copy()
    table["checkpoint"] = [bests.get(t, {}).get("checkpoint") for t in table["trial"]]
    return table


def write_sweep_report(cfg: Config, settings, space, table: pd.DataFrame, metric: str, mode: str,
                       wall_s: float):
    from xmr.data import storage

    out = RunDir(cfg.storage.root, settings.name, cfg.data.endpoint_url)
    table = _sorted(_with_checkpoints(cfg, settings.name, table), metric, mode)
    out.write_text("trials.csv", table.to_csv(index=False))
    files = {"trials": out.uri("trials.csv")}
    ok = table[table["error"].isna() & table[metric].notna() & table["checkpoint"].notna()]
    best = None
    if len(ok):
        top = ok.iloc[0]
        trial_run = RunDir(storage.join(cfg.storage.root, settings.name, "trials"), str(top["trial"]), cfg.data.endpoint_url)
        best_cfg = trial_run.read_text("config.yaml")
        if best_cfg:
            out.write_text("best_config.yaml", best_cfg)
            files["best_config"] = out.uri("best_config.yaml")
        best = {"checkpoint": top["checkpoint"], "metric": metric, "value": float(top[metric]),
                "trial": str(top["trial"]), "params": {p.path: _plain(top.get(p.path)) for p in space.params}}
        out.write_text(BEST, json.dumps(best, indent=2) + "\n")
        files["best"] = out.uri(BEST)
    files.update(write_plots(out, space, table, metric, mode))
    if settings.multi_objective:
        files.update(write_pareto(out, table, metric, mode))
    shown = [c for c in ["trial", *[p.path for p in space.params], metric, "epochs", "pruned", "error"] if c in table]
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    n_pruned = int(table["pruned"].sum())
    print(f"[xmr] sweep {settings.name}: {len(table)} trials ({n_pruned} stopped early by ASHA, "
          f"{int(table['error'].notna().sum())} failed), {table['epochs'].sum()} epochs in {wall_s:.0f} s")
    if best:
        print(f"[xmr] best {metric} = {best['value']:.4f} (trial {best['trial']}): {best['checkpoint']}")
        print(f"[xmr] serve it:  xmr serve --checkpoint {out.uri()}")
    return SweepResult(out.uri(), metric, mode, table, best, files)


def _plain(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


def study_from_table(space, table: pd.DataFrame, metric: str, mode: str):
    """An Optuna study holding the sweep's trials (their best metric), for Optuna's plots."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = {}
    for p in space.params:
        if p.kind == "categorical":
            dists[p.path] = CategoricalDistribution(p.choices)
        elif p.kind == "int":
            dists[p.path] = IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            dists[p.path] = FloatDistribution(p.low, p.high, log=p.log or p.kind == "loguniform")
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for _, row in table.iterrows():
        if row.get("error") is not None and not pd.isna(row.get("error")) or pd.isna(row[metric]):
            continue
        params = {k: _plain(row[k]) for k in dists if k in row and _plain(row[k]) is not None}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=float(row[metric])))
    return study


def write_plots(out: RunDir, space, table: pd.DataFrame, metric: str, mode: str) -> dict[str, str]:
    """Optimisation history, parameter importances and a contour of two λ, as HTML and PNG.
    A plot that cannot be drawn (too few trials) is skipped with its reason in plots.txt."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    optuna_logging_quiet()
    study = study_from_table(space, table, metric, mode)
    numeric = [p.path for p in space.params if p.kind != "categorical"]
    lambdas = [p for p in numeric if p.startswith("loss.lambdas.")]
    pair = (lambdas + [p for p in numeric if p not in lambdas])[:2]
    plots = {"history": (vis.plot_optimization_history, vis_mpl.plot_optimization_history, {}),
             "importances": (vis.plot_param_importances, vis_mpl.plot_param_importances, {}),
             "contour": (vis.plot_contour, vis_mpl.plot_contour, {"params": pair})}
    files, notes = {}, []
    for name, (html_fn, png_fn, kw) in plots.items():
        if name == "contour" and len(pair) < 2:
            notes.append("contour: the space has fewer than two numeric parameters")
            continue
        try:
            out.write_text(f"plot_{name}.html", html_fn(study, **kw).to_html(include_plotlyjs="cdn"))
            with warnings.catch_warnings():  # optuna marks its matplotlib backend experimental
                warnings.simplefilter("ignore")
                ax = png_fn(study, **kw)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(fig)
            out.write_bytes(f"plot_{name}.png", buf.getvalue())
            files[f"plot_{name}"] = out.uri(f"plot_{name}.png")
        except Exception as exc:  # optuna refuses e.g. importances with one completed trial
            notes.append(f"{name}: not drawn ({type(exc).__name__}: {exc})")
    if notes:
        out.write_text("plots.txt", "\n".join(notes) + "\n")
    return files


def pareto_front(table: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Trials no other trial beats on both the metric and the training time per epoch."""
    ok = table[table["error"].isna() & table[metric].notna() & table["train_s_per_epoch"].notna()]
    sign = 1.0 if mode == "max" else -1.0
    front = []
    for i, r in ok.iterrows():
        dominated = any((sign * o[metric] >= sign * r[metric]) and (o["train_s_per_epoch"] <= r["train_s_per_epoch"])
                        and ((sign * o[metric] > sign * r[metric]) or (o["train_s_per_epoch"] < r["train_s_per_epoch"]))
                        for j, o in ok.iterrows() if j != i)
        if not dominated:
            front.append(i)
    return ok.loc[front].sort_values("train_s_per_epoch")


def write_pareto(out: RunDir, table: pd.DataFrame, metric: str, mode: str) -> dict[str, str]:
    """The (metric, seconds per epoch) Pareto front as CSV and a PNG over all trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(table, metric, mode)
    out.write_text("pareto.csv", front.to_csv(index=False))
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter(table["train_s_per_epoch"], table[metric], color="#9aa5b1", label="trials")
    ax.plot(front["train_s_per_epoch"], front[metric], "o-", color="#1f5fa8", label="Pareto front")
    ax.set_xlabel("training seconds per epoch")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    out.write_bytes("pareto.png", buf.getvalue())
    print(f"[xmr] Pareto front ({metric} vs seconds per epoch): {len(front)} of {len(table)} trials")
    print(front[[c for c in front.columns if c in ("trial", metric, "train_s_per_epoch") or "." in c]]
          .to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return {"pareto": out.uri("pareto.csv"), "pareto_plot": out.uri("pareto.png")}


def optuna_logging_quiet() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def write_ablation_report(cfg: Config, settings, table: pd.DataFrame, metric: str, mode: str,
                          variants: dict[str, list[str]], wall_s: float):
    """Mean ± std over seeds per variant, and the change against the full method."""

    out = RunDir(cfg.storage.root, settings.name, cfg.data.endpoint_url)
    table = _with_checkpoints(cfg, settings.name, table)
    out.write_text("trials.csv", table.to_csv(index=False))
    finals = [c for c in table.columns if c.startswith("final_")]
    summary = table.groupby("variant", sort=False)[finals].agg(["mean", "std", "count"])
    order = [v for v in variants if v in summary.index]
    summary = summary.loc[order]
    lines = ["| variant | overrides | " + " | ".join(c[len("final_"):] for c in finals) + " |",
             "|---|---|" + "---|" * len(finals)]
    full = summary.loc["full"] if "full" in summary.index else None
    for name in order:
        cells = []
        for c in finals:
            mean, std = summary.loc[name, (c, "mean")], summary.loc[name, (c, "std")]
            cell = f"{mean:.4f}" + ("" if pd.isna(std) else f" ± {std:.4f}")
            if full is not None and name != "full":
                cell += f" ({mean - full[(c, 'mean')]:+.4f})"
            cells.append(cell)
        lines.append(f"| {name} | {' '.join(variants[name]) or '-'} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    out.write_text("ablation.md", markdown)
    print(markdown)
    print(f"[xmr] ablation {settings.name}: {len(table)} runs ({len(order)} variants x "
          f"{int(table['seed'].nunique())} seeds) in {wall_s:.0f} s; mean ± std over seeds, (change vs full)")
    return SweepResult(out.uri(), metric, mode, table, None, {"table": out.uri("ablation.md")})
