"""TPE + ASHA against random search (no early stopping) with the same trial budget.

A fixed synthetic category problem (seeded), the SCCMRL search space over λ_center,
λ_label, temperature, K and lr, the same number of trials and epochs per trial for both
arms. Reported per arm: the best validation mAP reached, total training epochs spent, and
wall time. Both arms run in this one process on the same local Ray, one after the other.

    RAY_AUTH_MODE=token python bench/tune_efficiency.py [--trials 12] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402

SPACE = """preset: sccmrl
params:
  loss.lambdas.center:   {type: loguniform, low: 1.0e-4, high: 1.0}
  loss.lambdas.label:    {type: loguniform, low: 1.0e-3, high: 3.0}
  loss.temperature:      {type: loguniform, low: 0.03, high: 1.0}
  negatives.k:           {type: int, low: 1, high: 63, log: true}
  optim.lr:              {type: loguniform, low: 1.0e-5, high: 1.0e-2}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs = 6, 3
    import ray

    from xmr.config import load_config
    from xmr.data.sources.synth_category import SynthCategoryConfig, write_synth_category
    from xmr.tune.space import load_space
    from xmr.tune.sweep import SweepSettings, run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="xmr-bench-tune-"))
    data = str(tmp / "data")
    write_synth_category(data, SynthCategoryConfig(splits={"train": 600, "val": 200}, seed=3), progress=False)
    (tmp / "space.yaml").write_text(SPACE)
    cfg = load_config("sccmrl", [f"data.path={data}", f"optim.epochs={args.epochs}", "data.batch_size=64",
                                 "model.embed_dim=32", "model.hidden_dim=64", f"storage.root={tmp / 'sweeps'}"])
    space = load_space(tmp / "space.yaml", base=cfg)
    arms = {"tpe_asha": SweepSettings(name="tpe_asha", trials=args.trials, concurrency=args.concurrency, seed=0,
                                      searcher="tpe", scheduler="asha", grace_period=1, reduction_factor=3),
            "random": SweepSettings(name="random", trials=args.trials, concurrency=args.concurrency, seed=0,
                                    searcher="random", scheduler="none")}
    rows = {}
    for name, settings in arms.items():
        t0 = time.perf_counter()
        result = run_sweep(load_config("sccmrl", [f"data.path={data}", f"optim.epochs={args.epochs}",
                                                  "data.batch_size=64", "model.embed_dim=32", "model.hidden_dim=64",
                                                  f"storage.root={tmp / 'sweeps'}"]), space, settings)
        t = result.table
        rows[name] = {"best_map": float(t["map_mean"].max()), "median_map": float(t["map_mean"].median()),
                      "epochs": int(t["epochs"].sum()), "pruned": int(t["pruned"].sum()),
                      "failed": int(t["error"].notna().sum()), "wall_s": time.perf_counter() - t0}
    ray.shutdown()
    print(f"\nSCCMRL space (5 params), synthetic category data (600 train / 200 val), {args.trials} trials x "
          f"{args.epochs} epochs max, {args.concurrency} at a time")
    print(f"{'arm':<10}{'best mAP':>10}{'median mAP':>12}{'epochs':>8}{'pruned':>8}{'wall s':>9}")
    for name, r in rows.items():
        print(f"{name:<10}{r['best_map']:>10.4f}{r['median_map']:>12.4f}{r['epochs']:>8}{r['pruned']:>8}"
              f"{r['wall_s']:>9.0f}")
    headline = {"tpe_asha_best_map": rows["tpe_asha"]["best_map"], "random_best_map": rows["random"]["best_map"],
                "tpe_asha_epochs": rows["tpe_asha"]["epochs"], "random_epochs": rows["random"]["epochs"],
                "epochs_saved_fraction": 1 - rows["tpe_asha"]["epochs"] / max(1, rows["random"]["epochs"])}
    write_results(__file__, {"rows": rows, "trials": args.trials, "epochs": args.epochs,
                             "concurrency": args.concurrency, "quick": args.quick}, headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
