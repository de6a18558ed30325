"""Do a spec's verdicts survive another tuning seed? (issues 23 and 34, guard 5c)

Runs each spec twice as a user would (``xmr compare --spec NAME``), once with its own
``tuning.seed`` and once with ``--tuning-seed`` set to another value, and tabulates every
(claim, level) verdict side by side. A verdict that changes with the candidates was decided
by the draw, not by the variants; the two runs share nothing but the data and the seeds.
The spec's own seed reuses what ``xmr compare`` left in ``--default-storage`` (a stored run
is reused only if it is this job's: ``compare.runner.check_stored``).

    .venv/bin/python bench/compare_reseed.py        # the specs whose verdicts moved at stop 32
    .venv/bin/python bench/compare_reseed.py --spec cdaml_hierarchy --other-seed 2024
    .venv/bin/python bench/compare_reseed.py --all  # every shipped spec (hours on 2 cores)

Since issue 34 every replicate tunes on its own draw, so each interval already covers the
tuning choice: another tuning seed should move an estimate outside its own interval about
as often as the interval's 5% says, and should never turn a verdict into its contradiction
(held vs reversed, or held / reversed vs equivalent).

Writes bench/results/compare_reseed.json; ``headline``: specs, tests, verdicts_agree, share,
contradictions, outside_own_interval. Rows of the protocol before issue 34 are not mixed in.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine  # noqa: E402



PROTOCOL = "replicate-tuning"  # issue 34: every replicate tunes on its own draw
MOVED = ("map_center_modality_gap", "map_cdaml_samples_per_class", "k_sweep")  # verdicts that moved at stop 32


def contradicts(a: str, b: str) -> bool:
    """Held vs reversed, or held / reversed vs equivalent: one run says the opposite of the other."""
    decided = {"held", "reversed"}
    return ({a, b} == decided) or (a in decided and b == "equivalent") or (b in decided and a == "equivalent")


def main() -> int:
    from xmr.compare.runner import run_comparison
    from xmr.compare.spec import SPEC_DIR, load_spec

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", action="append", default=[],
                   help="spec name (repeatable; default: " + ", ".join(MOVED) + ")")
    p.add_argument("--all", action="store_true", help="every shipped spec")
    p.add_argument("--other-seed", type=int, default=2024, help="the second run's tuning seed (default 2024)")
    p.add_argument("--storage", default="runs/compare_reseed", help="where the other seed's runs go (resumable)")
    p.add_argument("--default-storage", default="runs/compare",
                   help="where the spec's own tuning seed runs go (default: where `xmr compare` puts them, so a "
                        "finished `xmr compare --all` is reused, not retrained)")
    args = p.parse_args()
    names = sorted(x.stem for x in SPEC_DIR.glob("*.yaml")) if args.all else (args.spec or list(MOVED))
    t0 = time.perf_counter()
    for name in names:  # each spec's rows are written as soon as it finishes: an interrupted run keeps them
        default_seed = load_spec(name).tuning_seed
        runs = {}
        for seed in (default_seed, args.other_seed):
            spec = load_spec(name, tuning_seed=seed)
            root = args.default_storage if seed == default_seed else f"{args.storage}/tuning-seed-{seed}"
            runs[seed] = run_comparison(spec, root)
        write(name, spec_rows(name, runs[default_seed], runs[args.other_seed]), [default_seed, args.other_seed], t0)
    return 0


def spec_rows(name: str, a, b) -> list[dict]:
    rows = []
    for ca, cb in zip(a.claims, b.claims):
        assert (ca["claim"], str(ca["level"])) == (cb["claim"], str(cb["level"]))
        rows.append({"spec": name, "claim": ca["claim"], "level": ca["level"], "protocol": PROTOCOL,
                     "verdict": ca["verdict"], "diff": ca["mean"], "low": ca["low"], "high": ca["high"],
                     "verdict_other": cb["verdict"], "diff_other": cb["mean"], "low_other": cb["low"],
                     "high_other": cb["high"], "agree": ca["verdict"] == cb["verdict"],
                     "contradiction": contradicts(ca["verdict"], cb["verdict"]),
                     "outside": not (ca["low"] <= cb["mean"] <= ca["high"] and cb["low"] <= ca["mean"] <= cb["high"]),
                     "wall_min": a.wall_s / 60, "wall_min_other": b.wall_s / 60})
    for ta, tb in zip(a.trends, b.trends):  # a claim map's trend test, under both seeds
        rows.append({"spec": name, "claim": f"trend ({ta['trend']}): {ta['claim']}", "level": None,
                     "protocol": PROTOCOL, "verdict": ta["verdict"], "diff": ta["slope"], "low": ta["low"],
                     "high": ta["high"], "verdict_other": tb["verdict"], "diff_other": tb["slope"],
                     "low_other": tb["low"], "high_other": tb["high"], "agree": ta["verdict"] == tb["verdict"],
                     "contradiction": contradicts(ta["verdict"], tb["verdict"]),
                     "outside": not (ta["low"] <= tb["slope"] <= ta["high"] and tb["low"] <= ta["slope"] <= tb["high"]),
                     "wall_min": 0.0, "wall_min_other": 0.0})
    return rows


def write(name: str, new: list[dict], seeds: list[int], t0: float) -> None:
    """Merge ``name``'s rows into the results file (other specs' rows of the same seeds and
    protocol are kept, so specs can be run one at a time), print the table and the headline."""
    previous = RESULTS / "compare_reseed.json"
    rows = new
    if previous.is_file():
        old = json.loads(previous.read_text())
        if old.get("seeds") == seeds:
            rows = [r for r in old["rows"] if r["spec"] != name and r.get("protocol") == PROTOCOL] + new
    rows.sort(key=lambda r: r["spec"])
    print(f"| spec | claim | level | spec's tuning seed ({seeds[0]}) | seed {seeds[1]} | agree |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['spec']} | `{r['claim']}` | {r['level'] if r['level'] is not None else ''} | "
              f"{r['verdict']} ({r['diff']:+.4f}) | {r['verdict_other']} ({r['diff_other']:+.4f}) | "
              f"{'yes' if r['agree'] else ('**contradiction**' if r['contradiction'] else '**no**')} |")
    agree = sum(r["agree"] for r in rows)
    tests = [r for r in rows if not r["claim"].startswith("trend")]
    headline = {"specs": len({r["spec"] for r in rows}), "tests": len(rows), "verdicts_agree": agree,
                "share": agree / len(rows) if rows else float("nan"),
                "contradictions": sum(r["contradiction"] for r in rows),
                "outside_own_interval": sum(r["outside"] for r in tests),
                "difference_tests": len(tests),
                "wall_min_per_spec": {n: round(max(r["wall_min"] + r["wall_min_other"] for r in rows if r["spec"] == n), 1)
                                      for n in sorted({r["spec"] for r in rows})},
                "wall_min_this_invocation": round((time.perf_counter() - t0) / 60, 1)}
    print("headline:", headline)
    RESULTS.mkdir(exist_ok=True)
    previous.write_text(json.dumps(
        {"machine": machine(), "date": dt.datetime.now().isoformat(timespec="minutes"),
         "seeds": seeds, "rows": rows, "headline": headline}, indent=2, default=str))

if __name__ == "__main__":
    sys.exit(main())
