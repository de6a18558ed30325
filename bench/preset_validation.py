"""The validation sweeps behind the presets' defaults (issue 11), on validation data only.

Each choice is a small grid, 3 seeds per cell, trained in process with the workers' own
step (``xmr.train.fit.fit_in_process``) at the preset's schedule and scored on the
*validation* split (test data are never looked at). The cell with the best mean wins;
the presets' comments quote this file's result.

- memory bank defaults (``negatives.bank_warmup_steps``, ``negatives.momentum``) at K = 255
  past the batch; K = every in-batch candidate without a bank is the control (the digits);
- the triplet baselines' negative strategy and margin (the digits; paired token sequences;
  synthetic VCMR);
- MNS-GAN's sampler (the digits);
- QACLN's VR hinge: the paper's negative videos only, or also negative queries (synthetic VCMR).

    python bench/preset_validation.py [--only bank,triplet,mnsgan,qacln] [--seeds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "platform"))
sys.path.insert(0, str(HERE))

AV = str(HERE.parent / "data" / "avdigits")
K255 = ["loss.lambdas.adversarial=0", "loss.lambdas.label=0", "negatives.strategy=uniform", "negatives.k=255"]
BANK = "negatives.memory_bank=1024"


def grids(vcmr: str, pair: str) -> dict[str, dict]:
    """{study: {"preset", "data", "metric", "cells": {name: overrides}}}."""
    return {
        "bank": {"preset": "mnsgan", "data": AV, "metric": "map_mean", "control": "no bank", "cells": {
            "no bank": K255,
            "warmup 0, momentum 0.99": [*K255, BANK, "negatives.bank_warmup_steps=0", "negatives.momentum=0.99"],
            "warmup 20, momentum 0.99": [*K255, BANK, "negatives.bank_warmup_steps=20", "negatives.momentum=0.99"],
            "warmup 20, momentum 0.999": [*K255, BANK, "negatives.bank_warmup_steps=20", "negatives.momentum=0.999"],
            "warmup 50, momentum 0 (live encoder)": [*K255, BANK, "negatives.bank_warmup_steps=50", "negatives.momentum=0"],
            "warmup 50, momentum 0.99": [*K255, BANK, "negatives.bank_warmup_steps=50", "negatives.momentum=0.99"],
            "warmup 0, momentum 0 (live encoder)": [*K255, BANK, "negatives.bank_warmup_steps=0", "negatives.momentum=0"],
        }},
        "triplet": {"preset": "triplet_category", "data": AV, "metric": "map_mean", "cells": {
            f"{s}, margin {m}": [f"negatives.strategy={s}", f"loss.margin={m}"]
            for s in ("hardest", "semi_hard", "uniform") for m in (0.1, 0.2, 0.3)}},
        "triplet_pair": {"preset": "triplet_pair", "data": pair, "metric": "r1_mean", "cells": {
            f"{s}, margin {m}": [f"negatives.strategy={s}", f"loss.margin={m}"]
            for s in ("hardest", "semi_hard", "uniform") for m in (0.1, 0.2, 0.3)}},
        "triplet_vcmr": {"preset": "triplet_vcmr", "data": vcmr, "metric": "vcmr_0.7_r10", "cells": {
            f"{s}": [f"negatives.strategy={s}", "model.embed_dim=32", "optim.lr=1.0e-3", "optim.epochs=12",
                     "model.top_videos=10"] for s in ("hardest", "semi_hard", "uniform")}},
        "mnsgan": {"preset": "mnsgan", "data": AV, "metric": "map_mean", "cells": {
            "class_aware, K 16 (one per other class)": ["negatives.strategy=class_aware", "negatives.k=16"],
            "uniform, K 16": ["negatives.strategy=uniform", "negatives.k=16"],
            "hardest, K 16": ["negatives.strategy=hardest", "negatives.k=16"],
            "uniform, K 255 (every in-batch candidate)": ["negatives.strategy=uniform", "negatives.k=255"],
        }},
        "qacln": {"preset": "qacln", "data": vcmr, "metric": "vcmr_0.7_r10", "cells": {
            f"query negatives {q}": ["model.embed_dim=32", "optim.lr=1.0e-3", "optim.epochs=12", "model.top_videos=10",
                                     f"loss.vr_hinge.query_negatives={q}"] for q in ("false", "true")}},
    }


def run_cell(job: tuple) -> tuple:
    study, cell, preset, data, sets, metric, seed = job
    import torch

    torch.set_num_threads(1)
    from xmr.config import load_config
    from xmr.checks import resolve
    from xmr.train.fit import fit_in_process

    cfg, _ = resolve(load_config(preset, [f"data.path={data}", f"seed={seed}", *sets]))
    t0 = time.perf_counter()
    last = fit_in_process(cfg).history[-1]
    extra = {k: last[k] for k in last if k.startswith(("train_adversarial_disc", "train_label", "train_moment_ce"))}
    return study, cell, seed, float(last[metric]), extra, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    from _common import write_results
    from xmr.data.sources.synth_category import SynthCategoryConfig, write_synth_category
    from xmr.data.sources.synth_vcmr import SynthVcmrConfig, write_synth_vcmr

    with tempfile.TemporaryDirectory(prefix="xmr-presets-") as tmp:
        vcmr = str(Path(tmp) / "vcmr")
        write_synth_vcmr(vcmr, SynthVcmrConfig(splits={"train": 240, "val": 40, "test": 60}, max_duration=45.0, seed=2),
                         progress=False)
        pair = str(Path(tmp) / "pair")  # the mixer comparison's paired token sequences
        write_synth_category(pair, SynthCategoryConfig(n_classes=8, seq_len_a=6, seq_len_b=6, instance_scale=1.2, seed=4,
                                                       splits={"train": 640, "val": 160, "test": 160}), progress=False)
        studies = {k: v for k, v in grids(vcmr, pair).items() if not args.only or k in args.only.split(",")}
        jobs = [(s, c, g["preset"], g["data"], sets, g["metric"], seed) for s, g in studies.items()
                for c, sets in g["cells"].items() for seed in range(args.seeds)]
        t0 = time.perf_counter()
        results: dict = {}
        with ProcessPoolExecutor(2) as pool:
            for study, cell, seed, value, extra, wall in pool.map(run_cell, jobs):
                results.setdefault(study, {}).setdefault(cell, []).append({"seed": seed, "value": value, **extra})
                print(f"{study:8s} {cell:42s} seed {seed}  {value:.4f}  ({wall:.0f} s)", flush=True)
    figures, headline = {"wall_s": time.perf_counter() - t0, "seeds": args.seeds, "studies": {}}, {}
    print()
    for study, cells in results.items():
        metric = studies[study]["metric"]
        means = {c: sum(r["value"] for r in rows) / len(rows) for c, rows in cells.items()}
        control = studies[study].get("control")  # a reference cell, never a candidate
        best = max((c for c in means if c != control), key=means.get)
        figures["studies"][study] = {"preset": studies[study]["preset"], "metric": f"val {metric}", "chosen": best,
                                     "cells": {c: {"mean": means[c], "runs": cells[c]} for c in cells}}
        headline[f"{study}_chosen"] = best
        headline[f"{study}_best_val"] = means[best]
        print(f"{study} (val {metric}, mean of {args.seeds} seeds):")
        for c in cells:
            print(f"  {'*' if c == best else ' '} {c:42s} {means[c]:.4f}   "
                  + " ".join(f"{r['value']:.4f}" for r in sorted(cells[c], key=lambda r: r["seed"])))
    write_results(__file__, figures, headline)


if __name__ == "__main__":
    main()
