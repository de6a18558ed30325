"""VCMR evaluation with the corpus sharded by video across gloo ranks (issue 25): each rank
keeps only its share of the clip encodings and ranks every query against it; the merged
candidates give the one-process evaluation exactly (the prediction file's VR / VCMR / SVMR
lists; metrics equal), with 2 and 3 ranks, and the file scores to the same metrics under
the standalone TVR evaluation. ``model.top_videos`` is small so that most of a rank's own
top videos fall outside the global top and the ranks' agreement on it is what is tested."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import write_tiny_vcmr
from train_helpers import preset_cfg

pytestmark = pytest.mark.timeout(300)


def _setup(data: str):
    from xmr.data.manifest import load_manifest
    from xmr.method import Method

    cfg = preset_cfg("qacln", data, "model.embed_dim=16", "model.num_heads=2", "model.top_videos=4",
                     "data.eval_batch_size=5")
    torch.manual_seed(0)
    return Method(cfg).eval().model, cfg, load_manifest(data)


def _predictions(shares, cfg, manifest):
    from xmr.tasks import family_of

    metrics, files = family_of(cfg).outputs(shares, cfg, manifest)
    return metrics, json.loads(files["predictions.json"])


def worker(rank: int, worlds: tuple[int, ...], data: str, out: str) -> None:
    """One process per rank of the largest world, each evaluating in every world it belongs
    to (ranks 0..world-1), one process group after another: the processes start once
    (``start_ranks``). One thread per rank: 3 ranks of 2 threads each on 2 cores only fight."""
    from xmr.distributed import all_gather_objects
    from xmr.tasks import family_of

    torch.set_num_threads(1)
    model, cfg, manifest = _setup(data)
    for world in worlds:
        if rank >= world:
            continue
        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous{world}", rank=rank, world_size=world)
        try:
            share = family_of(cfg).score_share(model, cfg, manifest, "val", detailed=True)
            shares = all_gather_objects(share)
            if rank == 0:
                metrics, sub = _predictions(shares, cfg, manifest)
                with open(f"{out}/world{world}.json", "w") as f:
                    json.dump({"metrics": {k: v for k, v in metrics.items() if k != "by_type"}, "sub": sub}, f)
            dist.barrier()
        finally:
            dist.destroy_process_group()


def start_ranks(fn, args: tuple, nprocs: int) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes, joined. Forked from multiprocessing's fork
    server, which imports torch, xmr and this module once and is then shared by every start
    in the pytest process (the other gloo tests' too): a process spawned from scratch imports
    them again, and 3 ranks doing so at once on the 2-core machine took 6-12 s of this
    module's setup under load (the fork server: 3-4 s, of which the ranks' own work 1 s). A
    forked rank skips the interpreter's teardown too. The server is a fresh process, not a
    fork of pytest's threads."""
    import multiprocessing

    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "xmr.method", "xmr.tasks", __name__])
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_sharded")
    data = str(write_tiny_vcmr(root / "vcmr", splits={"train": 4, "val": 24}))
    model, cfg, manifest = _setup(data)
    from xmr.tasks import family_of

    metrics, sub = _predictions([family_of(cfg).score_share(model, cfg, manifest, "val", detailed=True)], cfg,
                                manifest)
    out = {1: {"metrics": {k: v for k, v in metrics.items() if k != "by_type"}, "sub": sub}}
    start_ranks(worker, ((3, 2), data, str(root)), 3)
    for world in (2, 3):
        out[world] = json.loads((root / f"world{world}.json").read_text())
    return out, data


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_evaluation_equals_one_process(runs, world):
    out, _ = runs
    one, many = out[1], out[world]
    assert one["sub"]["video2idx"] == many["sub"]["video2idx"]
    for task in ("VR", "VCMR", "SVMR"):
        a, b = one["sub"][task], many["sub"][task]
        assert [e["desc_id"] for e in a] == [e["desc_id"] for e in b]
        assert sum(len(e["predictions"]) for e in a) > 0
        for ea, eb in zip(a, b):
            # the same videos and spans in the same order; scores to float32 rounding
            assert [p[:3] for p in ea["predictions"]] == [p[:3] for p in eb["predictions"]], task
            np.testing.assert_allclose([p[3] for p in ea["predictions"]], [p[3] for p in eb["predictions"]],
                                       rtol=1e-5, atol=1e-7)
    for key, value in one["metrics"].items():
        assert many["metrics"][key] == pytest.approx(value, abs=1e-9), key


def test_sharded_prediction_file_scores_to_its_metrics(runs):
    from xmr.data.reader import make_loader
    from xmr.metrics.tvr import evaluate_tvr

    out, data = runs
    gt = []
    for b in make_loader(data, "val", local_batch_size=64, shuffle=False, unit="query"):
        gt += [{"desc_id": int(d), "vid_name": v, "ts": t.tolist(), "type": ty}
               for d, v, t, ty in zip(b["desc_id"], b["vid_name"], b["ts"], b["type"])]
    public, saved = evaluate_tvr(out[3]["sub"], gt), out[3]["metrics"]
    for k in (1, 10):
        assert public["VR"][f"r{k}"] == pytest.approx(100 * saved[f"vr_r{k}"], abs=0.006)
        for iou in (0.5, 0.7):
            assert public["VCMR"][f"{iou}-r{k}"] == pytest.approx(100 * saved[f"vcmr_{iou}_r{k}"], abs=0.006)
