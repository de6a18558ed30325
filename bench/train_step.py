"""The training step, today's against an earlier one, side by side in one run.

QACLN, against the step before issue 14: the preset's configuration (d = 128, 32 videos a
batch, dropout 0.1) on the synthetic VCMR corpus (``xmr data synth vcmr`` defaults, 256
training videos). "Before" is the frozen copy of the model in ``tests/qacln_before.py`` (``nn.TransformerEncoderLayer`` and
``nn.MultiheadAttention``, the video-to-query scores computed though unused, the query-side
ones computed a second time) stepped by AdamW parameter by parameter, as then; "after" is
``xmr.models.qacln`` (packed, length-grouped layers, the CPU dropout, VVCL on the moment's
anchors) with the fused AdamW of ``xmr.train.step``. Both start from the same
weights; each round runs one step of each on the same batch, in rotated order; the speedup
is the median of the per-round ratios. The category step (SCCMRL preset on the synthetic
category set), against the step before issue 35: before = the supcon term with its four
forms (read from git history: ``losses.supcon_before_issue_35``), after = today's one form.

Before the timing, the two are checked to compute the same thing: in eval mode (dropout
off) every loss term and every parameter gradient of one batch, max abs difference.
One thread, timed in thread CPU time (a shared machine); the per-term gradient shares
(``tracking.grad_share_every``) are off in both, so the step itself is measured.

``--compile`` adds a third QACLN contestant to the same interleaved rounds: today's step with
every encoder layer under ``torch.compile`` (inductor, dynamic shapes: the packed row count
changes every batch), and reports its compile time (the warm-up over the 8 batches). It
answers whether kernel fusion is the way past the eager step; it is not the product's step.

    python bench/train_step.py [--quick] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the frozen QACLN the tests check against
from _common import write_results  # noqa: E402
from losses import supcon_before_issue_35  # noqa: E402
from qacln_before import QACLNBefore  # noqa: E402

from xmr.checks import resolve  # noqa: E402
from xmr.config import load_config  # noqa: E402
from xmr.data.reader import loader_for  # noqa: E402
from xmr.method import Method  # noqa: E402
from xmr.train.step import TrainStep, param_groups  # noqa: E402


def qacln_pair(data: str):
    """(before, after) Methods of the QACLN preset with identical weights."""
    cfg, _ = resolve(load_config("qacln", [f"data.path={data}", "tracking.grad_share_every=0"]))
    torch.manual_seed(0)
    after = Method(cfg)
    before = Method(cfg)
    before.model = QACLNBefore(cfg)
    before.load_state_dict(after.state_dict())  # same parameter names: the old layers' weights
    return cfg, before, after


def category_pair(data: str):
    cfg, _ = resolve(load_config("sccmrl", [f"data.path={data}", "tracking.grad_share_every=0"]))
    torch.manual_seed(0)
    after = Method(cfg)
    before = Method(cfg)
    before.load_state_dict(after.state_dict())
    before.objective.terms["supcon"] = supcon_before_issue_35()(cfg.loss.temperature, cfg.negatives.k,
                                                                cfg.negatives.strategy, cfg.negatives.gather,
                                                                cfg.loss.chunk_mb)
    return cfg, before, after


def same_computation(cfg, before: Method, after: Method, batch) -> dict[str, float]:
    """Max abs difference of every loss term and every gradient, eval mode (no dropout)."""
    diffs = {}
    results = []
    for m in (before, after):
        m.eval()
        m.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same uniform negatives (L_VR's K) for both
        out = m(batch)
        out["loss"].backward()
        results.append(({k: float(v.detach()) for k, v in out.items() if not k.startswith("_")},
                        {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
        m.zero_grad(set_to_none=True)
        m.train()
    (lb, gb), (la, ga) = results
    diffs["loss_max_abs_diff"] = max(abs(lb[k] - la[k]) for k in la)
    diffs["grad_max_abs_diff"] = max(float((gb[n] - ga[n]).abs().max()) for n in ga)
    diffs["grads_compared"] = len(ga)
    assert set(gb) == set(ga), sorted(set(gb) ^ set(ga))
    return diffs


def compiled_copy(cfg, after: Method) -> Method:
    """``after`` with the same weights, every encoder layer under ``torch.compile``."""
    from xmr.models.attention import EncoderLayer

    twin = Method(cfg)
    twin.load_state_dict(after.state_dict())
    for module in twin.modules():
        if isinstance(module, EncoderLayer):
            module.compile(dynamic=True)
    return twin


CATEGORY_ROUNDS_PER = 10  # the category step takes milliseconds: ten times the rounds, for a steadier median


def race(cfg, before: Method, after: Method, batches, rounds: int,
         compiled: Method | None = None) -> dict[str, float]:
    steps = {"before": TrainStep(before, cfg, total_steps=10_000), "after": TrainStep(after, cfg, total_steps=10_000)}
    # Today's step before issue 14 stepped AdamW parameter by parameter (not fused).
    old = steps["before"]
    old.optimizer = torch.optim.AdamW(param_groups(before, cfg), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    old.scheduler = torch.optim.lr_scheduler.LambdaLR(old.optimizer, old.scheduler.lr_lambdas[0])
    extra = {}
    if compiled is not None:
        steps["compiled"] = TrainStep(compiled, cfg, total_steps=10_000)
        t = time.perf_counter()
        for batch in batches:  # every batch shape once: the compile (and its recompiles) happen here
            steps["compiled"](batch)
        extra["compile_s"] = time.perf_counter() - t
    for name, step in steps.items():  # warm-up
        step(batches[0])
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names if n != "before"}
    for r in range(rounds):
        batch = batches[r % len(batches)]
        order = names[r % len(names):] + names[: r % len(names)]  # rotated each round
        took = {}
        for name in order:  # thread CPU time: one torch thread, on a shared machine (wall time waits for a core)
            t = time.thread_time()
            steps[name](batch)
            took[name] = time.thread_time() - t
            times[name].append(took[name] * 1000)
        for name in ratios:
            ratios[name].append(took["before"] / took[name])
    units = len(batches[0]["video_index"] if "video_index" in batches[0] else batches[0]["index"])
    out = {"before_ms": statistics.median(times["before"]), "after_ms": statistics.median(times["after"]),
           "speedup": statistics.median(ratios["after"]), "rounds": rounds, "batch": units,
           "before_per_s": units / (statistics.median(times["before"]) / 1000),
           "after_per_s": units / (statistics.median(times["after"]) / 1000), **extra}
    if compiled is not None:
        out.update(compiled_ms=statistics.median(times["compiled"]), compiled_speedup=statistics.median(ratios["compiled"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    parser.add_argument("--compile", action="store_true",
                        help="also time the QACLN step with its encoder layers under torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = 6 if args.quick else 21
    from xmr.data.sources.synth_category import SynthCategoryConfig, write_synth_category
    from xmr.data.sources.synth_vcmr import SynthVcmrConfig, write_synth_vcmr

    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_synth_vcmr(f"{tmp}/vcmr", SynthVcmrConfig(splits={"train": 256, "val": 32}), progress=False)
        write_synth_category(f"{tmp}/cat", SynthCategoryConfig(), progress=False)
        for name, make, data in (("qacln", qacln_pair, f"{tmp}/vcmr"), ("sccmrl", category_pair, f"{tmp}/cat")):
            cfg, before, after = make(data)
            batches = [b for _, b in zip(range(8), loader_for(cfg, "train", train=True))]
            check = same_computation(cfg, before, after, batches[0])
            compiled = compiled_copy(cfg, after) if args.compile and name == "qacln" else None
            timing = race(cfg, before, after, batches, rounds if name == "qacln" else CATEGORY_ROUNDS_PER * rounds, compiled)
            results[name] = {**check, **timing}
            unit = "videos" if name == "qacln" else "pairs"
            print(f"{name:7s} step: before {timing['before_ms']:7.1f} ms ({timing['before_per_s']:6.1f} {unit}/s)  "
                  f"after {timing['after_ms']:7.1f} ms ({timing['after_per_s']:6.1f} {unit}/s)  "
                  f"speedup x{timing['speedup']:.2f} (median of {timing['rounds']} interleaved rounds)  "
                  f"eval-mode max |Δloss| {check['loss_max_abs_diff']:.1e}, max |Δgrad| {check['grad_max_abs_diff']:.1e}")
            if compiled is not None:
                print(f"{'':7s} compiled encoder layers: {timing['compiled_ms']:7.1f} ms, speedup over before "
                      f"x{timing['compiled_speedup']:.2f}; compile (8 batch shapes) {timing['compile_s']:.0f} s")
    headline = {"qacln_step_speedup": results["qacln"]["speedup"],
                "qacln_videos_per_s_before": results["qacln"]["before_per_s"],
                "qacln_videos_per_s_after": results["qacln"]["after_per_s"],
                "category_step_speedup_over_before_issue_35": results["sccmrl"]["speedup"],
                "qacln_eval_grad_max_abs_diff": results["qacln"]["grad_max_abs_diff"],
                "wall_s": time.perf_counter() - t0}
    if args.compile:
        headline.update(qacln_compiled_step_speedup=results["qacln"]["compiled_speedup"],
                        qacln_compile_s=results["qacln"]["compile_s"])
    write_results(__file__, {"steps": results, "threads": 1, "quick": args.quick, "compile": args.compile}, headline)


if __name__ == "__main__":
    main()
