"""What a sweep or ablation leaves behind: the trials table (CSV), the confirmation of the
top configurations over new seeds (``confirm.csv``), the best config (YAML), a
best-checkpoint pointer (``best.json``, so ``xmr serve --checkpoint <sweep>`` serves it;
the confirmed winner when there was a confirmation), and Optuna's plots (HTML and PNG)
drawn from the study the sweep ran, in trial order: history, importances, contour and the
learning curves (one intermediate value per epoch, pruned trials marked)."""

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
from xmr.tune.confirm import Confirmation, pareto_front, summarize
from xmr.tune.trials import SweepResult, read_trial_best

__all__ = ["pareto_front", "write_sweep_report", "write_ablation_report", "write_plots"]


def _sorted(table: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    return table.sort_values(metric, ascending=(mode == "min"), na_position="last").reset_index(drop=True)


def _with_checkpoints(cfg: Config, name: str, table: pd.DataFrame, folder: str = "trials") -> pd.DataFrame:
    from xmr.data import storage

    bests = read_trial_best(storage.join(cfg.storage.root, name, *folder.split("/")), cfg.data.endpoint_url)
    table = table.copy()
    table["checkpoint"] = [bests.get(t, {}).get("checkpoint") for t in table["trial"]]
    return table


def write_sweep_report(cfg: Config, settings, space, table: pd.DataFrame, metric: str, mode: str,
                       wall_s: float, study=None, confirmation: dict[str, Any] | None = None):
    """``study``: the sweep's own Optuna study (the plots' source); ``confirmation``: what
    ``run_confirmation`` trained (its runs), summarized here; best.json then follows the
    confirmed winner's best confirmation run."""
    from xmr.data import storage

    out = RunDir(cfg.storage.root, settings.name, cfg.data.endpoint_url)
    table = _sorted(_with_checkpoints(cfg, settings.name, table), metric, mode)
    out.write_text("trials.csv", table.to_csv(index=False))
    files = {"trials": out.uri("trials.csv")}
    params = [p.path for p in space.params]
    shown = [c for c in ["trial", "number", *params, metric, "epochs", "state", "error"] if c in table]
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    n_pruned = int(table["pruned"].sum())
    print(f"[xmr] sweep {settings.name}: {len(table)} trials ({n_pruned} pruned by ASHA, "
          f"{int(table['error'].notna().sum())} failed), {table['epochs'].sum()} epochs in {wall_s:.0f} s")
    ok = table[table["error"].isna() & table[metric].notna() & table["checkpoint"].notna()]
    best, pick, folder = None, None, "trials"
    if len(ok):
        top = ok.iloc[0]
        pick = {"trial": str(top["trial"]), "value": float(top[metric]), "checkpoint": top["checkpoint"],
                "params": space.typed(top.to_dict())}
    confirmed = None
    if confirmation is not None:
        runs = _with_checkpoints(cfg, settings.name, confirmation["runs"], "confirm/trials")
        search = dict(zip(table["trial"].astype(str), table[metric]))
        confirmed = summarize(runs, confirmation["names"], metric, mode, search)
        files.update(_write_confirmation(out, confirmed, runs, confirmation, metric))
        if confirmed.winner is not None:
            w = confirmed.summary.set_index("candidate").loc[confirmed.winner]
            if w["checkpoint"] is not None and not pd.isna(w["checkpoint"]):
                pick = {"trial": str(w["best_run"]), "value": float(w["best_run_value"]), "checkpoint": w["checkpoint"],
                        "params": {p: _plain(v) for p, v in confirmation["params"][confirmed.winner].items()}}
                folder = "confirm/trials"
    if pick:
        trial_run = RunDir(storage.join(cfg.storage.root, settings.name, *folder.split("/")), pick["trial"],
                           cfg.data.endpoint_url)
        best_cfg = trial_run.read_text("config.yaml")
        if best_cfg:
            out.write_text("best_config.yaml", best_cfg)
            files["best_config"] = out.uri("best_config.yaml")
        best = {"checkpoint": pick["checkpoint"], "metric": metric, "value": pick["value"], "trial": pick["trial"],
                "params": pick["params"]}
        if folder != "trials" and confirmed is not None:
            w = confirmed.summary.set_index("candidate").loc[confirmed.winner]
            best["confirmed"] = {"search_trial": confirmed.winner, "search_value": _plain(w["search_value"]),
                                 "seeds": sorted(confirmed.values[confirmed.winner]),
                                 "values": [confirmed.values[confirmed.winner][s]
                                            for s in sorted(confirmed.values[confirmed.winner])],
                                 "mean": _plain(w["mean"]), "low": _plain(w["low"]), "high": _plain(w["high"]),
                                 "runner_up": confirmed.runner_up, "told_apart": confirmed.told_apart,
                                 "difference": {k: _plain(v) if not isinstance(v, list) else v
                                                for k, v in (confirmed.difference or {}).items()} or None}
        out.write_text(BEST, json.dumps(best, indent=2) + "\n")
        files["best"] = out.uri(BEST)
    if study is not None:
        files.update(write_plots(out, space, study, metric, settings.multi_objective))
    if settings.multi_objective:
        files.update(write_pareto(out, table, metric, mode))
    if best:
        what = "confirmed winner" if folder != "trials" else "best"
        print(f"[xmr] {what}: {metric} {best['value']:.4f} (run {best['trial']}): {best['checkpoint']}")
        print(f"[xmr] serve it:  xmr serve --checkpoint {out.uri()}")
    return SweepResult(out.uri(), metric, mode, table, best, files, confirmed)


def _write_confirmation(out: RunDir, confirmed: Confirmation, runs: pd.DataFrame, confirmation: dict[str, Any],
                        metric: str) -> dict[str, str]:
    """confirm.csv (a row per candidate, best mean first: search score, mean, interval, each
    seed's value, its best run) and confirm_runs.csv (a row per run); the table and verdict on the console."""
    summary = confirmed.summary
    for p in sorted({k for v in confirmation["params"].values() for k in v}):
        summary[p] = [confirmation["params"].get(c, {}).get(p) for c in summary["candidate"]]
    out.write_text("confirm.csv", summary.to_csv(index=False))
    out.write_text("confirm_runs.csv", runs.to_csv(index=False))
    cols = ["candidate", "search_value", *[c for c in summary.columns if c.startswith("seed_")], "mean", "low", "high"]
    shown = summary[[c for c in cols if c in summary]].rename(columns={"search_value": f"search {metric}"})
    print(f"[xmr] confirmation: {len(runs)} runs in {confirmation.get('wall_s', 0):.0f} s; {metric} of each "
          f"configuration over its new seeds (mean, 95% t-interval), best mean first")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for line in confirmed.lines():
        print(line, flush=True)
    return {"confirm": out.uri("confirm.csv"), "confirm_runs": out.uri("confirm_runs.csv")}


def _plain(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


def write_plots(out: RunDir, space, study, metric: str, multi_objective: bool = False) -> dict[str, str]:
    """From the sweep's own study (trial order, each trial's state): optimisation history,
    parameter importances (finished trials), a contour of two λ, and the learning curves
    (intermediate values per epoch; pruned trials dotted, a cross where ASHA stopped them),
    as HTML and PNG. A plot that cannot be drawn (too few trials) is skipped with its reason
    in plots.txt."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    optuna_logging_quiet()
    numeric = [p.path for p in space.params if p.kind != "categorical"]
    lambdas = [p for p in numeric if p.startswith("loss.lambdas.")]
    pair = (lambdas + [p for p in numeric if p not in lambdas])[:2]
    target = {"target": (lambda t: t.values[0]), "target_name": metric} if multi_objective else {"target_name": metric}
    plots = {"history": (vis.plot_optimization_history, vis_mpl.plot_optimization_history, dict(target)),
             "importances": (vis.plot_param_importances, vis_mpl.plot_param_importances, dict(target)),
             "contour": (vis.plot_contour, vis_mpl.plot_contour, {"params": pair, **target}),
             "intermediate": (learning_curves, learning_curves_png, {"metric": metric})}
    files, notes = {}, []
    for name, (html_fn, png_fn, kw) in plots.items():
        if name == "contour" and len(pair) < 2:
            notes.append("contour: the space has fewer than two numeric parameters")
            continue
        if name == "intermediate" and multi_objective:
            notes.append("intermediate: Optuna keeps no per-epoch values for several objectives")
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


def _curves(study):
    """(number, state name, epochs, values) of every trial with intermediate values, in trial order."""
    out = []
    for t in sorted(study.trials, key=lambda t: t.number):
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            out.append((t.number, t.state.name, steps, [t.intermediate_values[s] for s in steps]))
    return out


def learning_curves(study, metric: str):
    """Each trial's validation metric per epoch (plotly): finished trials solid, pruned ones
    dotted and ended with a cross at the epoch ASHA stopped them."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for number, state, steps, values in _curves(study):
        pruned = state == "PRUNED"
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=f"trial {number} ({state.lower()})",
                                 line={"dash": "dot" if pruned else "solid"},
                                 marker={"symbol": ["circle"] * (len(steps) - 1) + ["x" if pruned else "circle"],
                                         "size": [6] * (len(steps) - 1) + [12 if pruned else 6]}))
    fig.update_layout(title="Learning curves (pruned trials dotted, x where stopped)", xaxis_title="epoch",
                      yaxis_title=metric)
    return fig


def learning_curves_png(study, metric: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for number, state, steps, values in _curves(study):
        pruned = state == "PRUNED"
        (line,) = ax.plot(steps, values, ":" if pruned else "-", marker="o", markersize=3,
                          label=f"trial {number}" + (" (pruned)" if pruned else ""))
        if pruned:
            ax.plot(steps[-1], values[-1], "x", color=line.get_color(), markersize=9, markeredgewidth=2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title("Learning curves (pruned: dotted, x where stopped)", fontsize=9)
    if ax.lines:
        ax.legend(fontsize=6, ncol=2)
    return ax


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
