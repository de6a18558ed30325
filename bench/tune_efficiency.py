"""TPE + ASHA against random search (no early stopping): epochs spent to reach random search's best.

A fixed synthetic category problem (seeded), the SCCMRL search space over λ_center,
λ_label, temperature, K and lr, the same epochs per trial. Random search runs ``--trials``
trials to the end; TPE + ASHA may run ``--tpe-trials`` (default twice as many: a pruned
trial costs an epoch or two, and the comparison is per epoch spent, not per trial). Each arm
runs with several sampler seeds (default 3). Per seed, from each arm's own Optuna study
(``optuna.db``: one intermediate value per epoch, pruned trials PRUNED):

- random search's best validation mAP, and the epochs it spent to first reach it (trials in
  trial order, every epoch of an earlier trial counted);
- the epochs TPE + ASHA spent to first reach that same mAP (the same count), or "not
  reached" when none of its trials did.

Reported: the median over seeds of both counts, side by side, and of the best mAPs. Both
arms run in this one process on one local Ray, one sweep after another.

    RAY_AUTH_MODE=token python bench/tune_efficiency.py [--trials 10] [--tpe-trials 20] [--epochs 4] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import math
import statistics
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


def epochs_to_reach(study, target: float) -> float:
    """Epochs spent, trials in trial order (all epochs of earlier trials counted), until an
    epoch's validation value first reaches ``target``; inf when none does."""
    spent = 0
    for trial in sorted(study.trials, key=lambda t: t.number):
        values = trial.intermediate_values
        for epoch in sorted(values):
            if epoch >= 1:
                spent += 1
                if values[epoch] >= target - 1e-12:
                    return float(spent)
    return math.inf


def arm_figures(study, table) -> dict:
    finished = [t for t in study.trials if t.intermediate_values]
    best = max(max(v for e, v in t.intermediate_values.items() if e >= 1) for t in finished)
    states = [t.state.name for t in study.trials]
    return {"best_map": best, "epochs": int(table["epochs"].sum()), "trials": len(study.trials),
            "pruned": states.count("PRUNED"), "complete": states.count("COMPLETE"), "failed": states.count("FAIL")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="random search's trials")
    parser.add_argument("--tpe-trials", type=int, default=0, help="TPE + ASHA's trials (default 2 x --trials)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seeds", default="0,1,2", help="sampler seeds, one sweep per arm each")
    parser.add_argument("--quick", action="store_true", help="one seed, 6 trials x 3 epochs (a smoke run)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.trials, args.epochs, seeds = 6, 3, seeds[:1]
    args.tpe_trials = args.tpe_trials or 2 * args.trials
    import optuna
    import ray

    from xmr.config import load_config
    from xmr.data.sources.synth_category import SynthCategoryConfig, write_synth_category
    from xmr.tune.space import load_space
    from xmr.tune.sweep import SweepSettings, run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="xmr-bench-tune-"))
    data = str(tmp / "data")
    write_synth_category(data, SynthCategoryConfig(splits={"train": 600, "val": 200}, seed=3), progress=False)
    (tmp / "space.yaml").write_text(SPACE)
    overrides = [f"data.path={data}", f"optim.epochs={args.epochs}", "data.batch_size=64", "model.embed_dim=32",
                 "model.hidden_dim=64", f"storage.root={tmp / 'sweeps'}"]
    space = load_space(tmp / "space.yaml", base=load_config("sccmrl", overrides))
    per_seed = []
    t_all = time.perf_counter()
    for seed in seeds:
        row = {"seed": seed}
        studies = {}
        for arm, searcher, scheduler, n in (("random", "random", "none", args.trials),
                                           ("tpe_asha", "tpe", "asha", args.tpe_trials)):
            name = f"{arm}_s{seed}"
            settings = SweepSettings(name=name, trials=n, concurrency=args.concurrency, seed=seed,
                                     searcher=searcher, scheduler=scheduler, grace_period=1, reduction_factor=3)
            t0 = time.perf_counter()
            result = run_sweep(load_config("sccmrl", overrides), space, settings)
            study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp / 'sweeps' / name / 'optuna.db'}")
            studies[arm] = study
            row[arm] = {**arm_figures(study, result.table), "wall_s": time.perf_counter() - t0}
        target = row["random"]["best_map"]
        row["target_map"] = target
        row["random"]["epochs_to_target"] = epochs_to_reach(studies["random"], target)
        row["tpe_asha"]["epochs_to_target"] = epochs_to_reach(studies["tpe_asha"], target)
        per_seed.append(row)
    ray.shutdown()

    def med(arm: str, key: str) -> float:
        return float(statistics.median(r[arm][key] for r in per_seed))

    print(f"\nSCCMRL space (5 params), synthetic category data (600 train / 200 val), {args.epochs} epochs a trial at "
          f"most, {args.concurrency} at a time, sampler seeds {seeds}; random search {args.trials} trials, "
          f"TPE + ASHA up to {args.tpe_trials}")
    print("epochs to target: epochs spent (trials in order) until a validation mAP >= random search's best")
    print(f"{'seed':>4} {'arm':<9}{'trials':>7}{'best mAP':>10}{'epochs':>8}{'pruned':>8}{'to target':>12}{'wall s':>8}")
    for r in per_seed:
        for arm in ("random", "tpe_asha"):
            a = r[arm]
            to = "not reached" if math.isinf(a["epochs_to_target"]) else f"{a['epochs_to_target']:.0f}"
            print(f"{r['seed']:>4} {arm:<9}{a['trials']:>7}{a['best_map']:>10.4f}{a['epochs']:>8}{a['pruned']:>8}"
                  f"{to:>12}{a['wall_s']:>8.0f}")
    for arm in ("random", "tpe_asha"):
        to = med(arm, "epochs_to_target")
        print(f"{'med':>4} {arm:<9}{med(arm, 'trials'):>7.0f}{med(arm, 'best_map'):>10.4f}{med(arm, 'epochs'):>8.0f}"
              f"{med(arm, 'pruned'):>8.0f}{'not reached' if math.isinf(to) else f'{to:.0f}':>12}{med(arm, 'wall_s'):>8.0f}")
    reached = sum(not math.isinf(r["tpe_asha"]["epochs_to_target"]) for r in per_seed)
    tpe_to, rnd_to = med("tpe_asha", "epochs_to_target"), med("random", "epochs_to_target")
    fewer = sum(r["tpe_asha"]["epochs_to_target"] < r["random"]["epochs_to_target"] for r in per_seed)
    print(f"TPE + ASHA reached random search's best in {reached}/{len(per_seed)} seeds, with fewer epochs than random "
          f"search needed in {fewer}/{len(per_seed)}; median {'not reached' if math.isinf(tpe_to) else f'{tpe_to:.0f}'} vs {rnd_to:.0f} epochs "
          f"({time.perf_counter() - t_all:.0f} s in all)")
    finite = lambda v: None if math.isinf(v) else v  # noqa: E731  (JSON has no infinity: "not reached")
    for r in per_seed:
        for arm in ("random", "tpe_asha"):
            r[arm]["epochs_to_target"] = finite(r[arm]["epochs_to_target"])
    headline = {"seeds": len(per_seed), "tpe_asha_median_epochs_to_random_best": finite(tpe_to),
                "random_median_epochs_to_its_best": finite(rnd_to),
                "tpe_asha_fewer_epochs_seeds": fewer, "tpe_asha_reached_seeds": reached,
                "tpe_asha_median_best_map": med("tpe_asha", "best_map"), "random_median_best_map": med("random", "best_map"),
                "tpe_asha_median_epochs": med("tpe_asha", "epochs"), "random_median_epochs": med("random", "epochs")}
    write_results(__file__, {"per_seed": per_seed, "trials": args.trials, "tpe_trials": args.tpe_trials,
                             "epochs": args.epochs,
                             "concurrency": args.concurrency, "quick": args.quick,
                             "wall_s": time.perf_counter() - t_all}, headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
