"""Each method before and after the fixes of issue 11, measured side by side.

For every method, a short run of its preset on the same data and seeds, once with the code
of a baseline commit (``--before``, default the commit before the fixes) and once with
this checkout. Each version trains with its own training loop (the baseline's: AdamW,
cosine schedule, clipping, as its Ray worker did; this checkout's: ``xmr.train.step``), keeps
its best-on-validation epoch by its own checkpoint metric, and is scored on the test split
by its own evaluation. Jobs of both versions are interleaved over 2 processes, one thread
each. The data are written once, by this checkout, and read by both.

    python bench/method_fixes.py [--before REV] [--seeds 3] [--only sccmrl,qacln]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

BEFORE = "c1d9956"  # the last commit before issue 11's fixes
AV = str(REPO / "data" / "avdigits")
NO_GAN = ["loss.lambdas.adversarial=0", "loss.lambdas.label=0", "negatives.strategy=uniform", "negatives.k=255"]
# name: (preset, dataset, overrides, metric keys reported). The overrides are the ones the
# review used; everything else is each version's preset.
RUNS = {
    "sccmrl": ("sccmrl", "av", [], ["map_mean", "train_label"]),
    "mnsgan": ("mnsgan", "av", [], ["map_mean", "train_adversarial_disc_loss", "train_adversarial_disc_acc"]),
    "triplet": ("triplet_category", "av", [], ["map_mean"]),
    "k255_no_bank": ("mnsgan", "av", NO_GAN, ["map_mean"]),
    "k255_bank1024": ("mnsgan", "av", [*NO_GAN, "negatives.memory_bank=1024"], ["map_mean"]),
    "cdaml": ("cdaml", "hier", ["model.embed_dim=32", "model.hidden_dim=64"], ["map_mean", "map_mean_coarse", "train_label"]),
    "mixer_pretrained": ("mixer_mae", "pair", ["model.embed_dim=32", "model.hidden_dim=32", "model.num_layers=1"],
                         ["r1_mean", "r5_mean"]),
    "qacln": ("qacln", "vcmr", ["model.embed_dim=32", "optim.lr=1.0e-3", "optim.epochs=12", "model.top_videos=10"],
              ["vcmr_0.7_r10", "vcmr_0.5_r10", "vr_r10", "svmr_0.7_r1", "train_moment"]),
}


def write_data(root: Path) -> dict[str, str]:
    from xmr.data.sources.synth_category import SynthCategoryConfig, write_synth_category
    from xmr.data.sources.synth_vcmr import SynthVcmrConfig, write_synth_vcmr

    paths = {"av": AV, "hier": str(root / "hier"), "pair": str(root / "pair"), "vcmr": str(root / "vcmr")}
    write_synth_category(paths["hier"], SynthCategoryConfig(n_classes=12, hierarchy=4, seed=5,
                                                            splits={"train": 640, "val": 160, "test": 160}),
                         progress=False)
    write_synth_category(paths["pair"], SynthCategoryConfig(n_classes=8, seq_len_a=6, seq_len_b=6, instance_scale=1.2,
                                                            seed=4, splits={"train": 640, "val": 160, "test": 160}),
                         progress=False)
    write_synth_vcmr(paths["vcmr"], SynthVcmrConfig(splits={"train": 240, "val": 40, "test": 60}, max_duration=45.0,
                                                    seed=2), progress=False)
    return paths


# --------------------------------------------------------------------------- one run, either version


def _train(cfg, new: bool):
    """Train ``cfg`` with the version's own loop; returns (method, best state, train row)."""
    import copy

    import torch

    from xmr.data.manifest import load_manifest
    from xmr.data.reader import make_loader
    from xmr.method import Method

    manifest = load_manifest(cfg.data.path)
    metric = cfg.storage.checkpoint_metric or {"category": "map_mean", "pair": "r1_mean", "vcmr": "vcmr_0.7_r10"}[cfg.task]
    sign = -1.0 if cfg.storage.checkpoint_mode == "min" else 1.0
    torch.manual_seed(cfg.seed)
    method = Method(cfg)
    if cfg.model.pretrained:
        if new:
            from xmr.train.pretrained import load_pretrained
        else:
            from xmr.models.registry import load_pretrained
        load_pretrained(method.model, cfg.model.pretrained)
    loader = make_loader(cfg.data.path, cfg.data.train_split, local_batch_size=cfg.data.batch_size, seed=cfg.seed,
                         max_clips=cfg.data.max_clips, max_query_tokens=cfg.data.max_query_tokens, manifest=manifest)
    total = loader.steps * cfg.optim.epochs
    if new:
        from xmr.tasks.evaluate import evaluate as evaluate_split
    else:
        from xmr.train.evaluate import evaluate_split

    if new:
        from xmr.train.step import TrainStep

        step = TrainStep(method, cfg, total_steps=total)
        evaluate = lambda: evaluate_split(method, cfg, manifest, cfg.data.val_split)  # noqa: E731
    else:
        from xmr.train.loop import lr_factor, make_optimizer

        opt = make_optimizer(cfg, method.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.optim.warmup_steps,
                                                                           cfg.optim.scheduler))
        evaluate = lambda: evaluate_split(method.model, cfg, manifest, cfg.data.val_split)  # noqa: E731
    best, best_state, row = None, None, {}
    for epoch in range(cfg.optim.epochs):
        loader.set_epoch(epoch)
        method.train()
        sums: dict[str, float] = {}
        n = 0
        for batch in loader:
            if new:
                record = step(batch)
            else:
                out = method(batch)
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.grad_clip)
                opt.step()
                sched.step()
                record = {k: float(v.detach()) for k, v in out.items()}
            for k, v in record.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        val = evaluate()
        if best is None or sign * val[metric] >= sign * best:  # ties to the later epoch, as the runs do
            best, best_state = val[metric], copy.deepcopy(method.state_dict())
            row = {f"train_{k}": v / n for k, v in sums.items()}
            row["best_epoch"] = epoch + 1
    method.load_state_dict(best_state)
    return method, row


def _test_metrics(method, cfg, new: bool) -> dict[str, float]:
    from xmr.data.manifest import load_manifest

    if new:
        from xmr.tasks.evaluate import evaluate as evaluate_split
    else:
        from xmr.train.evaluate import evaluate_split
    manifest = load_manifest(cfg.data.path)
    out = evaluate_split(method if new else method.model, cfg, manifest, cfg.data.test_split)
    if cfg.task == "category" and "map_mean_coarse" not in out and cfg.model.num_classes and len(cfg.model.num_classes) > 1:
        out.update(_coarse_map(method.model, cfg))  # the baseline has no per-level metric: the same formula here
    return out


def _coarse_map(model, cfg) -> dict[str, float]:
    import torch

    from xmr.data.reader import make_loader
    from xmr.metrics.retrieval import cross_modal_map

    model.eval()
    parts = {"a": [], "b": [], "y": []}
    with torch.no_grad():
        for b in make_loader(cfg.data.path, cfg.data.test_split, local_batch_size=256, shuffle=False):
            parts["a"].append(model.encode("a", b["a"]))
            parts["b"].append(model.encode("b", b["b"]))
            parts["y"].append(b["label"][:, 0])
    a, b, y = (torch.cat(parts[k]) for k in ("a", "b", "y"))
    return {"map_mean_coarse": cross_modal_map(a, b, y, y, label_kind="single")["mean"]}


def run_one(job: dict) -> dict:
    """In a fresh process with ``job["code"]`` first on the path."""
    import torch

    torch.set_num_threads(1)
    from xmr.config import load_config

    try:
        from xmr.checks import resolve
    except ImportError:  # the baseline kept it in xmr.config
        from xmr.config import resolve

    new = (Path(job["code"]) / "xmr" / "train" / "step.py").exists()
    preset, dataset, overrides, keys = RUNS[job["name"]]
    t0 = time.perf_counter()
    sets = [f"data.path={job['data'][dataset]}", f"seed={job['seed']}", *overrides]
    pre_epochs = None
    if job["name"] == "mixer_pretrained":  # stage 1: pre-training, selected by the version's own metric
        pre = load_config("mixer_mae_pretrain", sets)
        pre, _ = resolve(pre)
        pre_method, _ = _train(pre, new)
        ckpt = Path(job["tmp"]) / f"pre-{'new' if new else 'old'}-{job['seed']}"
        from xmr.checkpoint import save_checkpoint

        save_checkpoint(ckpt, pre_method, pre)
        sets.append(f"model.pretrained={ckpt}")
        pre_epochs = pre.optim.epochs
    cfg = load_config(preset, sets)
    cfg, _ = resolve(cfg)
    method, row = _train(cfg, new)
    test = _test_metrics(method, cfg, new)
    out = {k: test[k] for k in keys if k in test}
    out.update({k: row[k] for k in keys if k in row})
    out["best_epoch"] = row["best_epoch"]
    if pre_epochs:
        out["pretrain_epochs"] = pre_epochs
    return {"name": job["name"], "version": "after" if new else "before", "seed": job["seed"], "metrics": out,
            "wall_s": time.perf_counter() - t0}


def _spawn(job: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=job["code"], OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True,
                          env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"{job['name']} ({job['code']}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=BEFORE, help="baseline commit (default: the one before the fixes)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(run_one(json.loads(args.job))))
        return
    sys.path.insert(0, str(REPO / "platform"))
    from _common import write_results

    names = [n for n in RUNS if not args.only or n in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="xmr-fixes-") as tmp:
        base = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            data = write_data(Path(tmp))
            codes = {"before": str(base / "platform"), "after": str(REPO / "platform")}
            jobs = [{"name": n, "seed": s, "code": codes[v], "data": data, "tmp": tmp}
                    for n in names for s in range(args.seeds) for v in ("before", "after")]  # interleaved
            t0 = time.perf_counter()
            results = []
            with ProcessPoolExecutor(2) as pool:
                for r in pool.map(_spawn, jobs):
                    print(f"{r['name']:18s} {r['version']:6s} seed {r['seed']}  "
                          + "  ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items()), flush=True)
                    results.append(r)
            wall = time.perf_counter() - t0
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, capture_output=True)
    table, headline = {}, {}
    for n in names:
        for v in ("before", "after"):
            rows = [r["metrics"] for r in results if r["name"] == n and r["version"] == v]
            keys = sorted({k for row in rows for k in row})
            table.setdefault(n, {})[v] = {k: [row.get(k) for row in rows] for k in keys}
        main_key = RUNS[n][3][0]
        for v in ("before", "after"):
            vals = [x for x in table[n][v].get(main_key, []) if x is not None]
            headline[f"{n}_{main_key}_{v}"] = sum(vals) / len(vals) if vals else None
    print(f"\n{'run':18s} {'metric':28s} {'before (seeds)':>30s} {'after (seeds)':>30s}")
    for n in names:
        for k in sorted(set(table[n]["before"]) | set(table[n]["after"])):
            cell = {v: table[n][v].get(k) for v in ("before", "after")}
            fmt = lambda xs: "–" if not xs else " ".join("–" if x is None else f"{x:.3f}" for x in xs)  # noqa: E731
            print(f"{n:18s} {k:28s} {fmt(cell['before']):>30s} {fmt(cell['after']):>30s}")
    write_results(__file__, {"before_commit": args.before, "seeds": args.seeds, "wall_s": wall, "runs": table,
                             "raw": results}, headline)


if __name__ == "__main__":
    main()
