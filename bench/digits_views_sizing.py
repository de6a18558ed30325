"""How many training images per digit keep digits_views off its ceiling? Chosen on the
VALIDATION split only, before any comparison runs on these data (issue 39).

For each candidate size (training images per digit; val 30 and test 50 per digit stay the
same images at every size) and two training seeds, train for a fixed 15 epochs and record
the validation score after every epoch:

- category retrieval: the ``sccmrl`` preset as shipped, val mAP (view a <-> view b);
- pair matching: ``digits_mixer_vs_dual``'s ``dual_encoder`` and ``mixer_scratch`` variants
  (the spec's own configs, at their preset learning rates), val Recall@1 (and @10).

The category specs use the size whose mAP is clearly below 0.9 and above chance (0.1); the
pair spec the size and recall cut-off that are clearly above chance (1/300 for R@1).

    .venv/bin/python bench/digits_views_sizing.py                  # ~20-40 min on 2 shared cores
    .venv/bin/python bench/digits_views_sizing.py --tasks pair     # one task; the other's rows kept

Writes bench/results/digits_views_sizing.json; headline: the best val score per size and
task (mean over the seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402

SIZES = (10, 30, None)  # None: every image left after val and test (94-124 per digit)


def _fit(cfg, metric: str, also: tuple[str, ...] = ()) -> dict:
    from xmr.checks import resolve
    from xmr.config import with_values
    from xmr.train.fit import fit

    cfg, _ = resolve(with_values(cfg, {"optim.epochs": 15, "tracking.enabled": False}))
    t = time.perf_counter()
    r = fit(cfg, score_untrained=False)
    curve = [float(h[metric]) for h in r.history if h.get(metric) is not None]
    extra = {f"curve_{m}": [float(h[m]) for h in r.history if h.get(m) is not None] for m in also}
    return {"curve": curve, "best": max(curve), **extra, "seconds": round(time.perf_counter() - t, 1)}


def cca_reference(path: str, components: int = 16) -> dict:
    """A linear reference for pair matching: CCA fitted on the training halves, val R@1 and
    R@10 by cosine in its space (how much pairing signal a linear map finds at this size)."""
    import numpy as np
    from sklearn.cross_decomposition import CCA

    from xmr.data.sources.digits_views import DigitsViewsConfig, generate_digits_views

    n = int(path.rsplit("_", 1)[1]) if not path.endswith("_all") else None
    d = generate_digits_views(DigitsViewsConfig(train_per_class=n))
    (_, a, b, _), (_, va, vb, _) = d["train"], d["val"]
    za, zb = CCA(n_components=components, max_iter=2000).fit(a, b).transform(va, vb)
    za, zb = za / np.linalg.norm(za, axis=1, keepdims=True), zb / np.linalg.norm(zb, axis=1, keepdims=True)
    rank = (-(za @ zb.T)).argsort(axis=1)
    hit = rank == np.arange(len(rank))[:, None]
    return {"best": float(hit[:, :1].any(axis=1).mean()), "r10": float(hit[:, :10].any(axis=1).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--tasks", default="category,pair",
                    help="which to run; the stored rows of the others are kept in the results file")
    a = ap.parse_args()
    tasks = set(a.tasks.split(","))
    from xmr.compare.spec import load_spec
    from xmr.config import load_config, with_values
    from xmr.data.sources.digits_views import DigitsViewsConfig, write_digits_views

    pair = load_spec("digits_mixer_vs_dual")
    stored = RESULTS / "digits_views_sizing.json"
    rows = [r for r in json.loads(stored.read_text())["figures"]["runs"] if r["task"] not in tasks] \
        if stored.is_file() else []
    with tempfile.TemporaryDirectory(prefix="xmr-digits-sizing-") as tmp:
        for n in SIZES:
            path = f"{tmp}/digits_views_{n or 'all'}"
            write_digits_views(path, DigitsViewsConfig(train_per_class=n), progress=False)
            runs = [("category", "sccmrl", load_config("sccmrl", [f"data.path={path}"]), "map_mean")]
            runs += [("pair", v, with_values(pair.variants[v].config, {"data.path": path}), "r1_mean")
                     for v in ("dual_encoder", "mixer_scratch")]
            if "pair" in tasks:
                ref = cca_reference(path)
                rows.append({"train_per_class": n or "all", "task": "pair", "variant": "linear CCA (16)", "seed": 0,
                             "metric": "val r1_mean (one direction, a -> b)", **ref})
                print(f"{n or 'all':>4} pair      linear CCA: val R@1 {ref['best']:.3f}, R@10 {ref['r10']:.3f}")
            for task, what, cfg, metric in [r for r in runs if r[0] in tasks]:
                for seed in range(a.seeds):
                    r = _fit(with_values(cfg, {"seed": seed}), metric, ("r10_mean",) if task == "pair" else ())
                    rows.append({"train_per_class": n or "all", "task": task, "variant": what, "seed": seed,
                                 "metric": f"val {metric}", **r})
                    print(f"{n or 'all':>4} {task:<9} {what:<14} seed {seed}: best val {metric} {r['best']:.3f} "
                          f"(last {r['curve'][-1]:.3f}, {r['seconds']:.0f} s)", flush=True)
    headline = {}
    for row in rows:
        key = f"{row['task']}_{row['variant']}_{row['train_per_class']}"
        headline.setdefault(key, []).append(row["best"])
    headline = {k: round(sum(v) / len(v), 4) for k, v in headline.items()}
    print("\n".join(f"{k:<40} {v:.3f}" for k, v in headline.items()))
    write_results(__file__, {"epochs": 15, "val_per_class": 30, "test_per_class": 50, "runs": rows}, headline)


if __name__ == "__main__":
    main()
