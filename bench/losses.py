"""Cost of one forward + backward of each multi-negative term, peak memory, and VCMR
inference per query. One thread throughout.

Part 1: supcon / multineg / triplet at B in {64, 256, 1024, 4096} x K in {1, 16, 255, all},
d = 256, uniform negatives, interleaved with (a) pytorch-metric-learning computing the same
loss where it has one (K = all: SupConLoss; SupConLoss with pair labels for multineg, which
is NT-Xent; TripletMarginLoss for triplet on the pair task) and (b) a minimal reference (one
similarity matmul + logsumexp + backward): median of 7 rounds (5 at B = 4096), in a new
random order each round; 31 rounds at B <= 256. Achieved GFLOP/s counts the three matmuls (forward and backward) beside
the machine's own matmul GFLOP/s at that shape. Beside supcon at K = all (B <= 1,024), a
textbook exact SupCon (dense masks, ten lines) in the same rounds: how far above the
reference the plainest exact form of the loss already is. Beside every supcon cell, the term
as it was before issue 35 (four forms: dense, per-class sums, masks, K drawn as columns;
read from git history, ``supcon_before_issue_35``) in the same rounds: ``vs_before`` is today's time over
its, and at K = all (and at B = 64, where both draw K by the same masks) the values' max |diff|.
The presets train at B = 64 (d = 64); the larger sizes are beyond every preset, spec and space.
Part 2: peak extra resident memory of supcon at B = 1024 .. 4096, row-chunked (the default
``loss.chunk_mb``) and not, each in a fresh process.
Part 3: QACLN VCMR inference at TVR validation scale: 2,179 videos with their real
durations (1.5 s clips, capped at 100), d = 384, random weights and features; video
encodings once, then per query: encode, score every video, top-100 videos, span decoding,
top-100 moments. Median ms per query over batched chunks.
Part ``presets`` (``--part presets``, its own date and commit in ``figures.presets``, merged
into the results file; a full run keeps it): today's supcon against the one before issue 35
at exactly the sizes the shipped presets, specs and search space reach (``PRESET_TRAIN``,
``SEARCH_SPACE_KS``): every cell's two forms run in one random order each round, many
rounds; per cell the median of the paired per-round ratios (today / before) and its 95%
bootstrap interval, and the values' and gradients' max |diff|.

    python bench/losses.py [--quick] [--part all|presets] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TVR, tvr_val_corpus  # noqa: E402

from xmr.config import Config, load_config  # noqa: E402
from xmr.losses.registry import TermContext, build_term  # noqa: E402
from xmr.outputs import PairOutputs  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median ms of ``repeats`` calls after a warm-up (used where nothing is interleaved),
    in thread CPU time as ``interleaved``."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        times.append((time.thread_time() - t) * 1000)
    return statistics.median(times)


def interleaved(steps: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median ms per step, the steps run in turn, in a new random order every round: a noisy
    neighbour slows them alike, and no step always runs right after the same one (a rotated
    order kept each step's neighbour, so one form always found the caches its twin had just
    warmed). One warm-up call each. The clock is the thread's CPU time
    (``time.thread_time``): with one torch thread every step's work runs in this thread, and
    on a shared machine (a load of 30 on 2 cores while these figures were taken) wall time
    mostly measures how long the process waited for a core."""
    for fn in steps.values():
        fn()
    names, times = list(steps), {n: [] for n in steps}
    order = torch.Generator().manual_seed(0)
    for _ in range(repeats):
        for i in torch.randperm(len(names), generator=order).tolist():
            n = names[i]
            t = time.thread_time()
            steps[n]()
            times[n].append((time.thread_time() - t) * 1000)
    return {n: statistics.median(v) for n, v in times.items()}


def _inputs(b: int, d: int, task: str, n_classes: int = 32):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(b, d, generator=g, requires_grad=True)
    bb = torch.randn(b, d, generator=g, requires_grad=True)
    labels = torch.randint(0, n_classes, (b,), generator=g) if task == "category" else torch.arange(b)
    return a, bb, labels


def _term(name: str, task: str, k: int | None, d: int, chunk_mb: float = 64.0, strategy: str = "uniform"):
    """xmr's term as the grid configures it: uniform negatives unless told (K = None: every
    negative), τ = 0.1."""
    cfg = Config()
    cfg.task, cfg.model.embed_dim, cfg.model.num_classes = task, d, [32]
    cfg.negatives.k, cfg.negatives.strategy = (k if k is not None else 10**9), strategy
    cfg.loss.chunk_mb, cfg.loss.temperature, cfg.loss.margin = chunk_mb, 0.1, 0.2
    return build_term(name, cfg)


def term_step(name: str, task: str, b: int, k: int, d: int, chunk_mb: float = 64.0):
    """xmr's term, forward + backward, on L2-normalised embeddings (K = None: every negative)."""
    term = _term(name, task, k, d, chunk_mb)
    a, bb, labels = _inputs(b, d, task)
    batch = {"label": labels, "index": torch.arange(b)}

    def step():
        loss = term(PairOutputs(F.normalize(a, dim=1), F.normalize(bb, dim=1)), batch, TermContext(targets=labels))
        loss.backward()

    return step


BEFORE_ISSUE_35 = "2718fdf413e7d8c5940cd80a48776b3abc819eec"  # the last commit with supcon's four forms


def supcon_before_issue_35() -> type:
    """The supcon term class as it was at ``BEFORE_ISSUE_35``, its module and the negative
    sampler's of then read from git history (no copy kept in the tree), with today's
    ``_pairs`` and registry, which issue 35 left as that code used them."""
    import importlib.util
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def module(name: str, path: str, edit=lambda text: text):
        text = subprocess.run(["git", "-C", str(root), "show", f"{BEFORE_ISSUE_35}:{path}"], capture_output=True,
                              text=True, check=True).stdout
        mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
        sys.modules[name] = mod  # dataclasses look their module up
        exec(compile(edit(text), f"{path}@{BEFORE_ISSUE_35[:7]}", "exec"), mod.__dict__)
        return mod

    module("negatives_before_issue_35", "platform/xmr/losses/negatives.py")
    return module("supcon_before_issue_35", "platform/xmr/losses/supcon.py", lambda text: text.replace(
        "from xmr.losses.negatives import", "from negatives_before_issue_35 import").replace(
        '@register_term("supcon")\n', "")).SupervisedContrastive


def before_step(b: int, k: int | None, d: int):
    """The supcon term before issue 35, forward + backward, on the same inputs."""
    term = supcon_before_issue_35()(0.1, k if k is not None else 10**9, "uniform", True)
    a, bb, labels = _inputs(b, d, "category")

    def step():
        term(PairOutputs(F.normalize(a, dim=1), F.normalize(bb, dim=1)), {}, TermContext(targets=labels)).backward()

    step.term = term
    return step


def term_value(name: str, task: str, b: int, k: int | None, d: int, term=None) -> float:
    """A term's loss on ``_inputs`` (no backward; xmr's unless ``term`` is given), to check a
    comparison computes the same. Seeded: uniform negatives are drawn alike."""
    a, bb, labels = _inputs(b, d, task)
    term = term if term is not None else _term(name, task, k, d)
    torch.manual_seed(7)
    with torch.no_grad():
        return float(term(PairOutputs(F.normalize(a, dim=1), F.normalize(bb, dim=1)),
                          {"label": labels, "index": torch.arange(b)}, TermContext(targets=labels)))


def pml_step(name: str, task: str, b: int, d: int):
    """pytorch-metric-learning on the same inputs, computing the same loss as xmr's term at
    K = all: SupConLoss (supcon), SupConLoss with pair labels (multineg: NT-Xent, the
    partner the only positive, every other item in the denominator; PML's NTXentLoss itself
    builds a [pairs x pairs] mask, 34 GB at B = 1024), TripletMarginLoss with cosine
    similarity, every triplet, mean reduction, a -> b and b -> a against ``ref_emb``
    (triplet, pair task: every anchor has B - 1 negatives, so the means agree)."""
    from pytorch_metric_learning import distances, losses, reducers

    a, bb, labels = _inputs(b, d, task)
    if name in ("supcon", "multineg"):
        fn = losses.SupConLoss(temperature=0.1)

        def step():
            fn(torch.cat([a, bb]), torch.cat([labels, labels])).backward()
    else:
        fn = losses.TripletMarginLoss(margin=0.2, distance=distances.CosineSimilarity(), reducer=reducers.MeanReducer())

        def step():
            ((fn(a, labels, ref_emb=bb, ref_labels=labels.clone())
              + fn(bb, labels, ref_emb=a, ref_labels=labels.clone())) / 2).backward()
    return step


def reference_step(b: int, d: int, cross: bool = False):
    """The floor: one similarity matmul, a logsumexp and the backward of both; over both
    modalities pooled ([2B, 2B], as supcon and multineg) or across them ([B, B], triplet)."""
    a, bb, _ = _inputs(b, d, "pair")

    def step():
        if cross:
            x, y = F.normalize(a, dim=1), F.normalize(bb, dim=1)
        else:
            x = y = F.normalize(torch.cat([a, bb]), dim=1)
        torch.logsumexp(x @ y.T / 0.1, dim=1).mean().backward()

    return step


REFERENCE = {"supcon": "reference", "multineg": "reference", "triplet": "reference_cross"}


def textbook_supcon(b: int, d: int):
    """Exact SupCon as a textbook writes it (the same loss as xmr's term at K = all): the
    pooled logits with the self-similarity masked, a dense positive mask, logsumexp, the
    positives' mean log-probability; ten lines, no chunking. Where it is not much above the
    reference, the reference is a floor no exact SupCon reaches: this says by how much."""
    a, bb, labels = _inputs(b, d, "category")

    def loss() -> torch.Tensor:
        e = torch.cat([F.normalize(a, dim=1), F.normalize(bb, dim=1)])
        y = torch.cat([labels, labels])
        self_pair = torch.eye(len(e), dtype=torch.bool)
        logits = (e @ e.T / 0.1).masked_fill(self_pair, float("-inf"))
        pos = (y[:, None] == y[None, :]) & ~self_pair
        return (torch.logsumexp(logits, dim=1) - logits.masked_fill(~pos, 0.0).sum(dim=1) / pos.sum(dim=1)).mean()

    def step():
        loss().backward()

    step.loss = loss
    return step


TEXTBOOK_MAX_B = 1024  # its dense [2B, 2B] masks and logits: 1.3 GB at B = 4,096


def matmul_gflops(b: int, d: int, repeats: int) -> float:
    x = torch.randn(2 * b, d)
    ms = timed(lambda: x @ x.T, repeats)
    return 2 * (2 * b) ** 2 * d / (ms / 1000) / 1e9


PML_SAME = {"supcon": "category", "multineg": "pair", "triplet": "pair"}  # task where PML has the same loss


# PML's TripletMarginLoss enumerates every (anchor, positive, negative) triple: B³ of them,
# 5.4 s a step at B = 1,024 here and 64x the time and memory (68 G triples) at B = 4,096,
# which this machine cannot hold; it is not run past this size.
PML_TRIPLET_MAX_B = 1024


SMALL_B_REPEATS = 31  # rounds at B <= 256 (milliseconds a step): the presets' size, where "no slower" is asked


def bench_terms(sizes, ks, repeats, d=256, small_repeats=SMALL_B_REPEATS) -> list[dict]:
    rows = []
    for b in sizes:
        reps = small_repeats if b <= 256 else repeats if b < 4096 else max(3, repeats - 2)
        steps = {"reference": reference_step(b, d), "reference_cross": reference_step(b, d, cross=True)}
        for name, task in PML_SAME.items():
            for k in ks:
                steps[f"{name}|{k}"] = term_step(name, task, b, k, d)
                if name == "supcon":
                    steps[f"before|{k}"] = before_step(b, k, d)
            if name != "triplet" or b <= PML_TRIPLET_MAX_B:
                steps[f"pml|{name}"] = pml_step(name, task, b, d)
        if b <= TEXTBOOK_MAX_B:
            steps["textbook|supcon"] = textbook_supcon(b, d)
            ours = term_value("supcon", "category", b, None, d)
            with torch.no_grad():
                textbook = float(steps["textbook|supcon"].loss())
            assert abs(ours - textbook) < 1e-4, (b, ours, textbook)  # the same loss, or the row means nothing
        ms = interleaved(steps, reps)
        gemm = matmul_gflops(b, d, reps)
        for name in PML_SAME:
            rows_of_sim = b if name == "triplet" else 2 * b  # triplet: a·bᵀ once, b -> a its transpose
            flops = 3 * 2 * rows_of_sim ** 2 * d  # the forward matmul and the two of its backward
            ref = ms[REFERENCE[name]]
            for k in ks:
                t = ms[f"{name}|{k}"]
                row = {"term": name, "task": PML_SAME[name], "B": b, "K": "all" if k is None else k, "d": d, "ms": t,
                       "reference_ms": ref, "vs_reference": t / ref,
                       "gflops": flops / (t / 1000) / 1e9, "matmul_gflops": gemm, "repeats": reps}
                if k is None and f"pml|{name}" in ms:  # PML computes this same loss
                    row.update(pml_ms=ms[f"pml|{name}"], vs_pml=t / ms[f"pml|{name}"])
                if name == "supcon":
                    row.update(before_ms=ms[f"before|{k}"], vs_before=t / ms[f"before|{k}"])
                    if k is None or b == 64:  # the same values (K = all; at B = 64 the same masked draws)
                        row["before_abs_diff"] = abs(term_value(name, "category", b, k, d)
                                                     - term_value(name, "category", b, k, d, steps[f"before|{k}"].term))
                if k is None and f"textbook|{name}" in ms:
                    row.update(textbook_ms=ms[f"textbook|{name}"], textbook_vs_reference=ms[f"textbook|{name}"] / ref)
                rows.append(row)
                print(f"{name:9s} B={b:5d} K={row['K']!s:>4}  {t:9.2f} ms  x{row['vs_reference']:4.2f} of reference"
                      f"  {row['gflops']:5.1f} GFLOP/s (matmul {gemm:5.1f})"
                      + (f"   PML {row['pml_ms']:9.2f} ms  ours/PML {row['vs_pml']:4.2f}" if "pml_ms" in row else "")
                      + (f"   textbook x{row['textbook_vs_reference']:4.2f}" if "textbook_ms" in row else "")
                      + (f"   before {row['before_ms']:9.2f} ms  now/before {row['vs_before']:4.2f}" if "before_ms" in row else "")
                      + (f" |diff| {row['before_abs_diff']:.1e}" if "before_abs_diff" in row else ""))
    return rows


def peak_memory(sizes, d=256) -> list[dict]:
    """Peak extra resident memory of one supcon forward + backward (K = all), chunked (the
    default ``loss.chunk_mb``) and not, each in a fresh process: resident set size sampled
    every 0.5 ms during the step, over its value before (after a warm-up step)."""
    import json as _json
    import subprocess

    code = """
import json, sys, threading, time, torch
sys.path.insert(0, {bench!r}); sys.path.insert(0, {platform!r})
torch.set_num_threads(1)
from losses import term_step
page = 4096
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
step = term_step("supcon", "category", {b}, None, {d}, chunk_mb={chunk})
step()  # warm-up: the allocator's pools, the autograd engine
base, peak, done = rss(), [0], [False]
def watch():
    while not done[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
w = threading.Thread(target=watch); w.start()
step()
done[0] = True; w.join()
print(json.dumps(max(0, peak[0] - base) / 2**20))
"""
    rows = []
    here = str(Path(__file__).resolve().parent)
    plat = str(Path(__file__).resolve().parents[1] / "platform")
    for b in sizes:
        row = {"B": b, "logits_mb": (2 * b) ** 2 * 4 / 2**20}
        for label, chunk in (("chunked_mb", 64.0), ("unchunked_mb", 0.0)):
            # a fixed mmap threshold: every large tensor is its own mapping, returned when freed,
            # so the resident set follows what is alive (glibc's adaptive threshold hides it)
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
            out = subprocess.run([sys.executable, "-c", code.format(bench=here, platform=plat, b=b, d=d, chunk=chunk)],
                                 capture_output=True, text=True, check=True, env=env)
            row[label] = _json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"supcon peak extra memory B={b:5d}: chunked {row['chunked_mb']:7.1f} MB, unchunked "
              f"{row['unchunked_mb']:7.1f} MB (the logits alone: {row['logits_mb']:.0f} MB)")
    return rows


def bench_vcmr(n_queries: int, chunk: int) -> dict:
    from xmr.tasks.vcmr import rank_queries
    from xmr.method import Method

    n_val_queries = sum(1 for _ in open(TVR / "tvr_val_release.jsonl"))
    cfg = load_config("qacln", ["model.embed_dim=384", "model.num_heads=8"])
    cfg.model.dims = {"visual": [1024], "subtitle": [768], "query": [768]}
    model = Method(cfg).model.eval()
    corpus, _, _, encode_s = tvr_val_corpus(model)
    n_clips = corpus["clip_mask"].sum(dim=1).tolist()
    n_max = corpus["clip_mask"].shape[1]
    g = torch.Generator().manual_seed(1)
    per_query = []
    with torch.no_grad():
        for lo in range(0, n_queries, chunk):
            n = min(chunk, n_queries - lo)
            tokens = torch.randn(n, 20, 768, generator=g)
            t = time.thread_time()
            q = model.encode_queries(tokens, torch.ones(n, 20, dtype=torch.bool))
            rank_queries(model, q, corpus, top_videos=100, max_len=16, top_k=100)
            per_query.append((time.thread_time() - t) * 1000 / n)
    with torch.no_grad():  # one query alone: latency rather than throughput
        single = []
        for _ in range(5):
            t = time.thread_time()
            q = model.encode_queries(torch.randn(1, 20, 768, generator=g), torch.ones(1, 20, dtype=torch.bool))
            rank_queries(model, q, corpus, top_videos=100, max_len=16, top_k=100)
            single.append((time.thread_time() - t) * 1000)
    result = {"videos": len(n_clips), "max_clips": n_max, "mean_clips": sum(n_clips) / len(n_clips), "d": 384,
              "queries_timed": n_queries, "val_queries": n_val_queries, "chunk": chunk,
              "video_encode_s": encode_s, "ms_per_query_median": statistics.median(per_query),
              "ms_per_query_mean": statistics.mean(per_query), "single_query_ms_median": statistics.median(single)}
    print(f"VCMR inference: {len(n_clips)} videos (mean {result['mean_clips']:.1f} clips), d=384, "
          f"{n_queries} of {n_val_queries} val queries in chunks of {chunk}: "
          f"{result['ms_per_query_median']:.2f} ms/query median, single query {result['single_query_ms_median']:.1f} ms; "
          f"video encoding {encode_s:.1f} s once")
    return result


# Part presets. supcon is the sccmrl preset's term; every spec that runs it (sccmrl variants)
# and the sccmrl search space keep the preset's data.batch_size = 64 and change at most
# model.embed_dim (32 on the synthetic specs), negatives.k and negatives.strategy. The loader
# splits a split into ceil(n / 64) near-equal batches (xmr.data.plan.near_equal), so the
# batches a run really sees are these (train pairs / batches); every data set has 10 classes.
PRESET_TRAIN = (  # (name, train pairs, embed_dim, who trains on it)
    ("avdigits", 620, 64, "sccmrl preset, multineg_vs_triplet, search_spaces/sccmrl.yaml"),
    ("digits_views_30", 300, 64, "digits_sccmrl_terms"),
    ("synth category 400", 400, 32, "synth_sccmrl_label, map_center_modality_gap"),
)
PRESET_CLASSES = 10
PRESET_BATCH = 64  # data.batch_size of the preset (never overridden for a supcon run)
PRESET_K = 255  # the preset's negatives.k: above every batch's candidates, exact SupCon
# The search space's negatives.k (int, 1 .. 255, log) and its three strategies, on the
# preset's own data (avdigits, B = 62, d = 64); K = 255 class_aware is the one strategy
# whose K = 255 is not the exact path (uniform and hardest cover every candidate there).
SEARCH_SPACE_KS = (1, 4, 16, 64)
SEARCH_SPACE_STRATEGIES = ("uniform", "hardest", "class_aware")


def preset_cells() -> list[dict]:
    """Every (B, d, K, strategy) the shipped presets, specs and search space reach, once."""
    from xmr.data.plan import near_equal

    cells = [{"B": PRESET_BATCH, "d": 64, "K": PRESET_K, "strategy": "uniform",
              "where": "sccmrl preset as configured (data.batch_size, model.embed_dim)"}]
    for name, n, d, who in PRESET_TRAIN:
        sizes = near_equal(n, -(-n // PRESET_BATCH))
        cells.append({"B": statistics.mode(sizes), "d": d, "K": PRESET_K, "strategy": "uniform",  # most batches' size
                      "where": f"{name}: {n} train pairs in {len(sizes)} batches; {who}"})
    b = cells[1]["B"]  # avdigits, where the search space tunes
    for strategy in SEARCH_SPACE_STRATEGIES:
        for k in SEARCH_SPACE_KS + ((PRESET_K,) if strategy == "class_aware" else ()):
            cells.append({"B": b, "d": 64, "K": k, "strategy": strategy, "where": "search_spaces/sccmrl.yaml on avdigits"})
    return cells


def _supcon_now(cell: dict):
    return _term("supcon", "category", cell["K"], cell["d"], strategy=cell["strategy"])


def _supcon_before(cell: dict):
    return supcon_before_issue_35()(0.1, cell["K"], cell["strategy"], True)


def _preset_step(term, cell: dict):
    """One forward + backward of ``term`` on the cell's inputs (10 classes)."""
    a, bb, labels = _inputs(cell["B"], cell["d"], "category", PRESET_CLASSES)
    batch = {"label": labels, "index": torch.arange(cell["B"])}

    def step():
        term(PairOutputs(F.normalize(a, dim=1), F.normalize(bb, dim=1)), batch, TermContext(targets=labels)).backward()

    return step


def _value_and_grads(term, cell: dict) -> tuple[float, torch.Tensor]:
    """The loss and the gradient of both modalities' embeddings, the random draws seeded."""
    a, bb, labels = _inputs(cell["B"], cell["d"], "category", PRESET_CLASSES)
    torch.manual_seed(7)
    loss = term(PairOutputs(F.normalize(a, dim=1), F.normalize(bb, dim=1)),
                {"label": labels, "index": torch.arange(cell["B"])}, TermContext(targets=labels))
    loss.backward()
    return float(loss.detach()), torch.cat([a.grad, bb.grad])


def paired_rounds(pairs: dict, rounds: int) -> dict:
    """Per pair, each round's (now, before) seconds of thread CPU time: every step of every
    pair in one new random order a round (``interleaved``'s reasons), so a round's two forms
    of a cell share whatever load that round had. One warm-up call each."""
    steps = {(n, i): fn for n, both in pairs.items() for i, fn in enumerate(both)}
    for fn in steps.values():
        fn()
    keys, times = list(steps), {n: [] for n in pairs}
    order = torch.Generator().manual_seed(1)
    for _ in range(rounds):
        took = {}
        for i in torch.randperm(len(keys), generator=order).tolist():
            t = time.thread_time()
            steps[keys[i]]()
            took[keys[i]] = time.thread_time() - t
        for n in pairs:
            times[n].append((took[(n, 0)], took[(n, 1)]))
    return times


def bootstrap_median(x: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """The median of ``x`` and its 95% percentile bootstrap interval (rounds resampled)."""
    import numpy as np

    v = np.asarray(x)
    idx = np.random.default_rng(0).integers(0, len(v), (resamples, len(v)))
    lo, hi = np.percentile(np.median(v[idx], axis=1), [2.5, 97.5])
    return float(np.median(v)), float(lo), float(hi)


def bench_presets(rounds: int) -> list[dict]:
    cells = preset_cells()
    terms = {i: (_supcon_now(c), _supcon_before(c)) for i, c in enumerate(cells)}
    pairs = {i: tuple(_preset_step(t, cells[i]) for t in both) for i, both in terms.items()}
    times = paired_rounds(pairs, rounds)
    rows = []
    for i, cell in enumerate(cells):
        now, before = zip(*times[i])
        ratio, lo, hi = bootstrap_median([n / b for n, b in times[i]])
        (v_now, g_now), (v_before, g_before) = (_value_and_grads(t, cell) for t in terms[i])
        row = {**cell, "rounds": rounds, "ms": statistics.median(now) * 1000, "before_ms": statistics.median(before) * 1000,
               "vs_before_median": ratio, "vs_before_ci95": [lo, hi],
               "vs_before_of_medians": statistics.median(now) / statistics.median(before),
               "value_abs_diff": abs(v_now - v_before), "grad_max_abs_diff": float((g_now - g_before).abs().max())}
        rows.append(row)
    print(f"| B | d | K | strategy | now ms | before ms | now/before (median of paired) [95% CI] | |value diff| | "
          f"max |grad diff| | where |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['d']} | {r['K']} | {r['strategy']} | {r['ms']:.3f} | {r['before_ms']:.3f} | "
              f"{r['vs_before_median']:.3f} [{r['vs_before_ci95'][0]:.3f}, {r['vs_before_ci95'][1]:.3f}] | "
              f"{r['value_abs_diff']:.1e} | {r['grad_max_abs_diff']:.1e} | {r['where']} |")
    return rows


def presets_headline(rows: list[dict]) -> dict:
    """The preset as it trains (its own data, K = 255) and the worst cell, each with its interval."""
    shipped = next(r for r in rows if r["where"].startswith("avdigits") and r["K"] == PRESET_K)
    worst = max(rows, key=lambda r: r["vs_before_median"])
    label = lambda r: f"B={r['B']} d={r['d']} K={r['K']} {r['strategy']}"  # noqa: E731
    return {"supcon_vs_before_presets_median": shipped["vs_before_median"],
            "supcon_vs_before_presets_median_ci95_lo": shipped["vs_before_ci95"][0],
            "supcon_vs_before_presets_median_ci95_hi": shipped["vs_before_ci95"][1],
            "supcon_vs_before_presets_median_cell": label(shipped),
            "supcon_vs_before_presets_worst": worst["vs_before_median"],
            "supcon_vs_before_presets_worst_ci95_lo": worst["vs_before_ci95"][0],
            "supcon_vs_before_presets_worst_ci95_hi": worst["vs_before_ci95"][1],
            "supcon_vs_before_presets_worst_cell": label(worst),
            "supcon_vs_before_presets_cells_above_1_05": sum(r["vs_before_ci95"][0] > 1.05 for r in rows),
            "supcon_vs_before_presets_max_value_abs_diff": max(r["value_abs_diff"] for r in rows),
            "supcon_vs_before_presets_max_grad_abs_diff": max(r["grad_max_abs_diff"] for r in rows)}


PRESETS_PART = "presets"


def write_merged(figures: dict, headline: dict, part: str | None = None) -> None:
    """Write the results file keeping what the other part measured: a full run keeps the
    presets part's figures and headline keys, the presets part keeps everything else."""
    import datetime as dt
    import json

    from _common import RESULTS, machine

    path = RESULTS / "losses.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    mine = lambda k: k.startswith("supcon_vs_before_presets")  # noqa: E731
    if part == PRESETS_PART:
        out = {**old, "figures": {**old.get("figures", {}), PRESETS_PART: figures},
               "headline": {**{k: v for k, v in old.get("headline", {}).items() if not mine(k)}, **headline}}
        out.setdefault("machine", machine())
    else:
        kept = {PRESETS_PART: old["figures"][PRESETS_PART]} if PRESETS_PART in old.get("figures", {}) else {}
        out = {"machine": machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "figures": {**figures, **kept},
               "headline": {**headline, **{k: v for k, v in old.get("headline", {}).items() if mine(k)}}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=float))
    print(f"wrote {path}")


def run_presets(rounds: int) -> None:
    import datetime as dt
    import subprocess

    from _common import machine

    root = Path(__file__).resolve().parents[1]
    clean = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "platform/xmr/losses"]).returncode == 0
    load0, t0 = os.getloadavg(), time.perf_counter()
    rows = bench_presets(rounds)
    headline = presets_headline(rows)
    print("headline:", headline)
    figures = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": machine()["commit"],
               "losses_code_as_committed": clean, "nice": os.nice(0), "load_average_start": load0,
               "load_average_end": os.getloadavg(), "threads": 1, "clock": "thread CPU time",
               "classes": PRESET_CLASSES, "before_commit": BEFORE_ISSUE_35, "wall_s": time.perf_counter() - t0,
               "rows": rows}
    write_merged(figures, headline, PRESETS_PART)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller grid, for a smoke run")
    parser.add_argument("--part", choices=["all", PRESETS_PART], default="all",
                        help="all: parts 1-3 (the presets part's figures kept); presets: that part alone")
    parser.add_argument("--rounds", type=int, default=2000, help="paired rounds of the presets part")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread, as the issue's figures
    if args.part == PRESETS_PART:
        return run_presets(args.rounds)
    sizes, ks, repeats = ([64, 256], [1, 16, None], 3) if args.quick else ([64, 256, 1024, 4096], [1, 16, 255, None], 7)
    t0 = time.perf_counter()
    rows = bench_terms(sizes, ks, repeats, small_repeats=repeats if args.quick else SMALL_B_REPEATS)
    memory = peak_memory([1024, 2048] if args.quick else [1024, 2048, 4096])
    vcmr = bench_vcmr(n_queries=256 if args.quick else 1024, chunk=64)
    by = {(r["term"], r["B"], r["K"]): r for r in rows}
    mem = {m["B"]: m for m in memory}
    big = 1024 if 1024 in sizes else max(sizes)
    pml_rows = [r for r in rows if "vs_pml" in r]
    headline = {
        f"supcon_vs_pml_b{big}": by[("supcon", big, "all")]["vs_pml"],
        f"multineg_vs_pml_b{big}": by[("multineg", big, "all")]["vs_pml"],
        f"triplet_vs_pml_b{big}": by[("triplet", big, "all")]["vs_pml"],
        "worst_vs_pml": max(r["vs_pml"] for r in pml_rows),
        "worst_vs_reference": max(r["vs_reference"] for r in rows),
        "worst_vs_reference_k_all": max(r["vs_reference"] for r in rows if r["K"] == "all"),
        "textbook_supcon_vs_reference_b64": by[("supcon", 64, "all")].get("textbook_vs_reference"),
        "supcon_vs_before_b64_k_all": by[("supcon", 64, "all")]["vs_before"],
        "supcon_worst_vs_before_b64": max(r["vs_before"] for r in rows if r["term"] == "supcon" and r["B"] == 64),
        "supcon_worst_vs_before": max(r["vs_before"] for r in rows if r["term"] == "supcon"),
        "supcon_max_abs_diff_vs_before": max(r["before_abs_diff"] for r in rows if "before_abs_diff" in r),
        f"peak_mb_b{max(mem)}": mem[max(mem)]["chunked_mb"],
        f"peak_mb_b{max(mem)}_unchunked": mem[max(mem)]["unchunked_mb"],
        "vcmr_ms_per_query_median": vcmr["ms_per_query_median"],
        "wall_s": time.perf_counter() - t0,
    }
    write_merged({"terms": rows, "peak_memory": memory, "vcmr_inference": vcmr, "quick": args.quick,
                  "threads": 1, "clock": "thread CPU time"}, headline)


if __name__ == "__main__":
    main()
