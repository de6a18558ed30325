"""Across 2 gloo processes: gathered multi-negative losses equal the single-process loss on
the concatenated batch, in value and in gradient (after DDP's average over ranks); without
gathering each rank contrasts with its own share; and whole training steps under DDP, with
a memory bank written by a momentum encoder and per-term gradient shares on, keep every
rank's weights, key encoder and bank identical and equal to single-process training."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from losses_helpers import ctx, embeddings, make_cfg, pair, term, unit

pytestmark = pytest.mark.timeout(180)

SIZES = [5, 7]  # different local batch sizes on purpose
CASES = {
    "supcon": dict(task="category", k=10_000, strategy="uniform", lambdas={"supcon": 1.0}),
    "supcon_hardest_k3": dict(task="category", k=3, strategy="hardest", lambdas={"supcon": 1.0}),
    "multineg_pair": dict(task="pair", k=10_000, strategy="uniform", lambdas={"multineg": 1.0}),
    "multineg_class_aware": dict(task="category", k=2, strategy="class_aware", lambdas={"multineg": 1.0}),
    "triplet": dict(task="category", k=1, strategy="hardest", lambdas={"triplet": 1.0}),
    "triplet_semi_hard": dict(task="category", k=1, strategy="semi_hard", lambdas={"triplet": 1.0}),
    "polynomial": dict(task="category", k=10_000, strategy="hardest", lambdas={"polynomial": 1.0}),
}


def compute(case, a_raw, b_raw, y, idx, gather=True):
    cfg = make_cfg(**CASES[case])
    cfg.negatives.gather = gather
    targets = idx if cfg.task == "pair" else y
    return term(next(iter(cfg.loss.lambdas)), cfg)(pair(unit(a_raw), unit(b_raw)), {"label": y, "index": idx},
                                                   ctx(targets))


def step_cfg():
    cfg = make_cfg(k=10_000, lambdas={"supcon": 1.0, "center": 0.1, "label": 0.5})
    cfg.model.dropout = 0.0  # the same forward on one process and on two
    cfg.negatives.memory_bank, cfg.negatives.momentum, cfg.negatives.bank_warmup_steps = 48, 0.9, 1
    cfg.tracking.grad_share_every = 1
    return cfg


def step_batches():
    g = torch.Generator().manual_seed(11)
    n = sum(SIZES)
    return [{"a": torch.randn(n, 8, generator=g), "b": torch.randn(n, 6, generator=g),
             "label": torch.randint(0, 5, (n,), generator=g), "index": torch.arange(n)} for _ in range(4)]


def train_steps(batches, module=None, method=None):
    from xmr.method import Method
    from xmr.train.step import TrainStep

    cfg = step_cfg()
    if method is None:
        torch.manual_seed(0)
        method = Method(cfg)
    step = TrainStep(method, cfg, total_steps=len(batches), module=module(method) if module else None)
    records = [step(b) for b in batches]
    return method, records


def worker(rank, out_dir):
    # A file rendezvous (no port to race for), and a barrier before tearing down: a rank
    # leaving while its peer still talks aborts gloo ("terminate called without an active
    # exception"), seen once on a loaded 2-core CI run. One thread per rank: two ranks of two
    # threads each on the 2-core machine fought each other and the machine's other work (the
    # workers' part of this fixture: 10-11 s -> 2.5-4.6 s under load, back to back).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    try:
        a, b, y = embeddings(n=sum(SIZES), classes=4, seed=7)
        lo = sum(SIZES[:rank])
        sl = slice(lo, lo + SIZES[rank])
        results = {}
        for case in CASES:
            for gather in (True, False):
                a_r = a.detach()[sl].clone().requires_grad_()
                b_r = b.detach()[sl].clone().requires_grad_()
                loss = compute(case, a_r, b_r, y[sl], torch.arange(sum(SIZES))[sl], gather)
                ga, gb = torch.autograd.grad(loss, (a_r, b_r))
                results[(case, gather)] = {"loss": loss.detach(), "ga": ga, "gb": gb}
        from torch.nn.parallel import DistributedDataParallel

        local = [{k: v[sl] for k, v in batch.items()} for batch in step_batches()]
        method, records = train_steps(local, module=lambda m: DistributedDataParallel(
            m, static_graph=True, broadcast_buffers=False))
        results["steps"] = {"state": {k: v.clone() for k, v in method.state_dict().items()},
                            "shares": [r.get("grad_share_supcon") for r in records]}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def start_ranks(fn, args: tuple, nprocs: int) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes, joined. Forked from multiprocessing's fork
    server, which imports torch, xmr and this module once and is then shared by every start
    in the pytest process (the other gloo tests' too): a process spawned from scratch imports
    them again, and on the 2-core machine under load this module's setup took 8-26 s with
    spawned ranks and 3-7 s forked (test_eval_sharded.py's 3 ranks: 6-12 s of spawning, 3-4 s
    forked, the server's start included). A forked rank skips the interpreter's teardown too. The server is a fresh process, not a
    fork of pytest's threads."""
    import multiprocessing

    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "xmr.method", "xmr.tasks", __name__])
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    start_ranks(worker, (str(out),), 2)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_gathered_loss_equals_single_process(distributed_results, case):
    a, b, y = embeddings(n=sum(SIZES), classes=4, seed=7)
    full = compute(case, a, b, y, torch.arange(sum(SIZES)))
    ga, gb = torch.autograd.grad(full, (a, b))
    ranks = [r[(case, True)] for r in distributed_results]
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), full.detach(), atol=1e-5)
    # DDP averages gradients over the 2 ranks.
    assert torch.allclose(torch.cat([r["ga"] for r in ranks]) / 2, ga, atol=1e-5)
    assert torch.allclose(torch.cat([r["gb"] for r in ranks]) / 2, gb, atol=1e-5)


@pytest.mark.parametrize("case", ["supcon", "multineg_pair", "triplet"])
def test_without_gather_each_rank_contrasts_with_its_own_share(distributed_results, case):
    """negatives.gather = false: each anchor is scored against its own rank's share only; the
    loss is still the global mean over anchors (a rank's value is its share of it, scaled for
    DDP's average: own mean × n_local × world / n_global)."""
    a, b, y = embeddings(n=sum(SIZES), classes=4, seed=7)
    for rank, r in enumerate(distributed_results):
        lo = sum(SIZES[:rank])
        sl = slice(lo, lo + SIZES[rank])
        own = compute(case, a.detach()[sl], b.detach()[sl], y[sl], torch.arange(sum(SIZES))[sl])
        assert torch.allclose(r[(case, False)]["loss"], own * SIZES[rank] * 2 / sum(SIZES), atol=1e-5)
        assert not torch.allclose(r[(case, False)]["loss"], r[(case, True)]["loss"], atol=1e-4)


def test_ddp_steps_with_bank_and_momentum_encoder_match_one_process(distributed_results):
    states = [r["steps"]["state"] for r in distributed_results]
    for name in states[0]:  # every rank: the same weights, key encoder and bank
        assert torch.equal(states[0][name], states[1][name]), name
    method, records = train_steps(step_batches())
    single = method.state_dict()
    for name, value in states[0].items():
        assert torch.allclose(value.float(), single[name].float(), atol=1e-5), name
    assert int(single["bank.writes"]) == 4 and int(single["bank.filled"]) == 48
    shares = distributed_results[0]["steps"]["shares"]
    assert shares[0] is None and all(0 < s < 1 for s in shares[1:])  # never on the first step under DDP
