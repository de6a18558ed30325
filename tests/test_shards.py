"""Sharded indexes (issue 25): the parts of a split concatenate to the whole gallery; the
merge of shards' answers is the answer of one index (category top-k, and VCMR moments,
whose shards are asked again when their lists may miss a moment); over real HTTP on a real
Ray Serve, a 3-shard index built by ``xmr index build --shards 3`` (a Ray Data job) answers
exactly as the whole gallery does, an interrupted build resumes with only the missing
shard, and a stalled or killed shard gives a flagged partial answer, never an error or a
silent gap."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from conftest import write_tiny_vcmr
from train_helpers import preset_cfg, processes_titled, wait_healthy
from xmr.data.manifest import load_manifest
from xmr.method import Method
from xmr.serve.shards import merge_hits, merge_moments, moments_across, needs_more
from xmr.tasks import family_of
from xmr.tasks.category import CategoryGallery, search_category
from xmr.tasks.topk import topk_scores
from xmr.tasks.vcmr import moments_batch

AVDIGITS = str(Path(__file__).resolve().parents[1] / "data" / "avdigits")


def _hits(g: CategoryGallery, scores, top, k: int):
    return [{"id": g.ids[j], "score": float(s)} for j, s in zip(top[:k].tolist(), scores[:k].tolist())]


def test_category_merge_is_one_index_answer():
    """3 contiguous shards of a random unit gallery (past the float16 pre-scan threshold, so
    the certified path runs in each shard): the merged top-k has the whole gallery's ids in
    its order, and equal scores keep their global order."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(30_000, 32, generator=gen), dim=1)
    emb[20_001] = emb[3]  # an exact tie across shards: the earlier position must come first
    queries = torch.nn.functional.normalize(torch.randn(40, 32, generator=gen), dim=1)
    queries[0] = emb[3]
    ids = [f"i{n}" for n in range(len(emb))]
    whole = CategoryGallery({"a": emb, "b": emb}, ids, [None] * len(ids))
    bounds = [0, 10_000, 20_000, 30_000]
    parts = [CategoryGallery({"a": emb[lo:hi], "b": emb[lo:hi]}, ids[lo:hi], [None] * (hi - lo))
             for lo, hi in zip(bounds, bounds[1:])]
    assert all(p.half for p in parts)  # the float16 pre-scan is exercised in every shard
    k = 25
    ws, wt = topk_scores(queries, whole.emb["b"], whole.half.get("b"), k)
    shard_answers = [topk_scores(queries, p.emb["b"], p.half.get("b"), k) for p in parts]
    for row in range(len(queries)):
        expect = _hits(whole, ws[row], wt[row], k)
        got = merge_hits([_hits(p, s[row], t[row], k) for p, (s, t) in zip(parts, shard_answers)], k)
        assert [h["id"] for h in got] == [h["id"] for h in expect]
        np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in expect], atol=1e-6)
    first = merge_hits([_hits(p, s[0], t[0], k) for p, (s, t) in zip(parts, shard_answers)], k)
    assert [h["id"] for h in first[:2]] == ["i3", "i20001"]


def test_merge_moments_by_hand():
    """A hand-made case: shard 1's best list is full of a video outside the global top 2, so
    its list misses an eligible moment until it is asked for more."""
    a = {"results": [{"video": "v1", "start": 0.0, "end": 1.0, "score": 0.9}],
         "videos": [["v1", 0.95], ["v2", 0.2]]}
    b = {"results": [{"video": "w9", "start": 0.0, "end": 1.0, "score": 0.5},
                     {"video": "w9", "start": 1.0, "end": 2.0, "score": 0.45}],
         "videos": [["w1", 0.9], ["w9", 0.1]]}
    # top 2 videos: v1, w1; shard 1 listed only w9 moments (k = 2, a full list) -> ask again
    assert needs_more([a, b], [2, 2], 2, 2) == [1]
    b2 = {**b, "results": b["results"] + [{"video": "w1", "start": 3.0, "end": 4.0, "score": 0.3}]}
    assert needs_more([a, b2], [2, 4], 2, 2) == []  # it ran out (3 of 4): nothing more to get
    merged = merge_moments([a, b2], 2, 2)
    assert [(m["video"], m["score"]) for m in merged] == [("v1", 0.9), ("w1", 0.3)]
    assert merge_moments([a, None], 2, 2) == a["results"]  # a missing shard: the others' answer


@pytest.fixture(scope="module")
def vcmr_model(tmp_path_factory):
    """An untrained QACLN on a 24-video corpus, ranking moments within each query's top 3
    videos (so most of a shard's top videos are outside the global top 3)."""
    data = write_tiny_vcmr(tmp_path_factory.mktemp("shards_vcmr"), splits={"train": 4, "val": 24})
    cfg = preset_cfg("qacln", str(data), "model.embed_dim=16", "model.num_heads=2", "model.top_videos=3")
    torch.manual_seed(0)
    return Method(cfg).eval().model, cfg, str(data)


def test_vcmr_shards_merge_to_one_corpus_answer(vcmr_model):
    """Moments from 3 shards, asked again while a list may miss one, merge to exactly the
    whole corpus's moments (ids, spans, order; scores to 1e-6); the re-asking is exercised."""
    model, cfg, data = vcmr_model
    fam, manifest = family_of(cfg), load_manifest(data)
    whole = fam.build_gallery(model, cfg, manifest, data, "val")
    parts = [fam.build_gallery(model, cfg, manifest, data, "val", part=(i, 3)) for i in range(3)]
    assert sum((p.ids for p in parts), []) == whole.ids
    for p, lo in zip(parts, (0, 8, 16)):
        np.testing.assert_allclose(p.enc["h_v"][:, : p.enc["h_v"].shape[1]],
                                   whole.enc["h_v"][lo:lo + 8, : p.enc["h_v"].shape[1]], atol=1e-6)
    clip_len = manifest.clip_len or 1.0
    rng = np.random.default_rng(1)
    asked_again = 0
    for n in range(30):
        tokens, k = rng.standard_normal((3, cfg.model.dims["query"][-1])).astype(np.float32), 20
        expect = moments_batch(model, whole, cfg, clip_len, [(tokens, k)])[0]

        async def ask(shards, ks):
            nonlocal asked_again
            asked_again += len(ks) < 3
            return [moments_batch(model, parts[s], cfg, clip_len, [(tokens, kk)], with_videos=True)[0]
                    for s, kk in zip(shards, ks)]

        got = merge_moments(asyncio.run(moments_across(ask, 3, k, 3)), k, 3)
        assert [(m["video"], m["start"], m["end"]) for m in got] == [(m["video"], m["start"], m["end"]) for m in expect]
        np.testing.assert_allclose([m["score"] for m in got], [m["score"] for m in expect], atol=1e-6)
    assert asked_again > 0  # the case the second round exists for did occur


# --------------------------------------------------------------------------- over real HTTP

RAY = [pytest.mark.ray, pytest.mark.serve, pytest.mark.timeout(420)]


def _post(url: str, body) -> requests.Response:
    return requests.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=60)


@pytest.fixture(scope="module")
def sharded(checkpoints, tmp_path_factory, s3_endpoint):
    """One Ray (started after the S3 endpoint's variables are set, so its workers reach it):
    3-shard indexes built with ``xmr index build --shards 3`` (category: the digits' test
    split; VCMR: a 24-video corpus), each served beside the whole gallery."""
    import ray
    from ray import serve

    from xmr.cli import main
    from xmr.serve.startup import start

    from xmr.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("sharded")
    vdata = write_tiny_vcmr(root / "vcmr", splits={"train": 4, "val": 24})
    # moments ranked within each query's top 3 videos: most of a shard's own top videos fall
    # outside the global top 3, so the gateway's second round is exercised over HTTP too
    vcfg = preset_cfg("qacln", str(vdata), "model.embed_dim=16", "model.num_heads=2", "model.top_videos=3")
    torch.manual_seed(0)
    vckpt = str(save_checkpoint(root / "qacln3", Method(vcfg).eval(), vcfg))
    ray.init(num_cpus=20, include_dashboard=False)
    port = 8000 + os.getpid() % 1000
    cat_idx, v_idx = str(root / "cat3"), str(root / "v3")
    assert main(["index", "build", "--checkpoint", checkpoints["cat0"], "--gallery", AVDIGITS, "--split", "test",
                 "--shards", "3", "--out", cat_idx]) == 0
    assert main(["index", "build", "--checkpoint", vckpt, "--gallery", str(vdata), "--split", "val",
                 "--shards", "3", "--out", v_idx]) == 0
    urls = {
        "cat1": start({"checkpoint": checkpoints["cat0"], "gallery": AVDIGITS, "split": "test"}, port=port,
                      name="cat1", route_prefix="/cat1"),
        "cat3": start({"checkpoint": checkpoints["cat0"], "index": cat_idx, "shard_deadline_s": 2.0}, port=port,
                      name="cat3", route_prefix="/cat3"),
        "v1": start({"checkpoint": vckpt, "gallery": str(vdata), "split": "val"}, port=port,
                    name="v1", route_prefix="/v1"),
        "v3": start({"checkpoint": vckpt, "index": v_idx, "shard_deadline_s": 2.0}, port=port, name="v3",
                    route_prefix="/v3"),
    }
    for url in urls.values():
        wait_healthy(url, 180.0)
    yield {**urls, "cat_idx": cat_idx, "v_idx": v_idx, "checkpoints": checkpoints, "vdata": str(vdata),
           "port": port}
    serve.shutdown()
    ray.shutdown()


@pytest.mark.usefixtures("sharded")
class TestOverHttp:
    pytestmark = RAY

    def test_category_shards_answer_as_the_whole(self, sharded):
        info1, info3 = (requests.get(f"{sharded[n]}/info", timeout=30).json() for n in ("cat1", "cat3"))
        assert info3["gallery_size"] == info1["gallery_size"] == 140
        assert [s["items"] for s in info3["shards"]] == [47, 47, 46]
        rng = np.random.default_rng(0)
        for role in ("a", "b"):
            for _ in range(8):
                q = rng.standard_normal(info1["input_dims"][role]).astype(np.float32).tolist()
                body = {"query": q, "modality": role, "k": 60}  # more than any shard holds
                one, three = _post(f"{sharded['cat1']}/search", body), _post(f"{sharded['cat3']}/search", body)
                assert one.status_code == three.status_code == 200, three.text
                a, b = one.json(), three.json()
                assert [h["id"] for h in b["results"]] == [h["id"] for h in a["results"]]
                np.testing.assert_allclose([h["score"] for h in b["results"]], [h["score"] for h in a["results"]],
                                           atol=1e-6)
                assert (b["shards"], b["missing_shards"], b["partial"], b["modality"]) == (3, [], False, a["modality"])
        too_many = _post(f"{sharded['cat3']}/search", {"query": q, "modality": "b", "k": 141})
        assert too_many.status_code == 422 and "140 items" in too_many.json()["error"]

    def test_vcmr_shards_answer_as_the_whole(self, sharded):
        info = requests.get(f"{sharded['v1']}/info", timeout=30).json()
        d = info["input_dims"]["query"][-1]
        rng = np.random.default_rng(2)
        for _ in range(10):
            body = {"query": rng.standard_normal((4, d)).astype(np.float32).tolist(), "k": 30}
            a, b = _post(f"{sharded['v1']}/moments", body).json(), _post(f"{sharded['v3']}/moments", body).json()
            assert [(m["video"], m["start"], m["end"]) for m in b["results"]] == \
                   [(m["video"], m["start"], m["end"]) for m in a["results"]]
            assert b["missing_shards"] == []
        last = requests.get(f"{sharded['v3']}/info", timeout=30).json()["shards"][2]
        video = json.loads((Path(sharded["v_idx"]) / "shard-002" / "items.json").read_text())["ids"][0]
        svmr = {"query": body["query"], "k": 5, "video": video}
        a, b = _post(f"{sharded['v1']}/moments", svmr).json(), _post(f"{sharded['v3']}/moments", svmr).json()
        assert b["results"] == a["results"] and last["items"] == 8
        nowhere = _post(f"{sharded['v3']}/moments", {**svmr, "video": "no-such-video"})
        assert nowhere.status_code == 404 and "not in the served corpus" in nowhere.json()["error"]

    def test_stalled_and_killed_shard_answers_are_flagged(self, sharded):
        """Shard 1's replica stopped (SIGSTOP): after the 2 s deadline the answer is the other
        shards' merge, with missing_shards [1], counted in /info; resumed, answers are whole
        again. Killed (SIGKILL) under queries: every answer is 200, complete or flagged."""
        url = sharded["cat3"]
        info = requests.get(f"{url}/info", timeout=30).json()
        q = np.random.default_rng(5).standard_normal(info["input_dims"]["a"]).astype(np.float32).tolist()
        body = {"query": q, "k": 140}
        full = _post(f"{url}/search", body).json()
        shard1 = set(json.loads((Path(sharded["cat_idx"]) / "shard-001" / "items.json").read_text())["ids"])
        vurl, vinfo = sharded["v3"], requests.get(f"{sharded['v3']}/info", timeout=30).json()
        vq = np.random.default_rng(6).standard_normal((4, vinfo["input_dims"]["query"][-1])).astype(np.float32).tolist()
        vfull = _post(f"{vurl}/moments", {"query": vq, "k": 30}).json()
        vid0, vid1 = (json.loads((Path(sharded["v_idx"]) / f"shard-00{i}" / "items.json").read_text())["ids"][0]
                      for i in (0, 1))
        pids = processes_titled("ray::ServeReplica:cat3:Retriever001")
        vpids = processes_titled("ray::ServeReplica:v3:Retriever001")
        assert len(pids) == len(vpids) == 1, (pids, vpids)
        for pid in pids + vpids:
            os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            part = _post(f"{url}/search", body)
            waited = time.perf_counter() - t0
            health = requests.get(f"{url}/healthz", timeout=30)
            info_now = requests.get(f"{url}/info", timeout=30).json()
            moments = _post(f"{vurl}/moments", {"query": vq, "k": 30})
            t0 = time.perf_counter()
            svmr_here = _post(f"{vurl}/moments", {"query": vq, "k": 3, "video": vid0})
            svmr_wait = time.perf_counter() - t0
            svmr_there = _post(f"{vurl}/moments", {"query": vq, "k": 3, "video": vid1})
        finally:
            for pid in pids + vpids:
                os.kill(pid, signal.SIGCONT)
        assert part.status_code == 200, part.text
        got = part.json()
        assert (got["missing_shards"], got["partial"]) == ([1], True) and waited >= 2.0
        assert [h["id"] for h in got["results"]] == [h["id"] for h in full["results"] if h["id"] not in shard1][:140]
        # degraded, not down: the gateway still answers (flagged); the stalled shard is named
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["missing_shards"] == [1] and info_now["shards"][1]["answering"] is False
        assert moments.status_code == 200 and moments.json()["missing_shards"] == [1]
        vids1 = set(json.loads((Path(sharded["v_idx"]) / "shard-001" / "items.json").read_text())["ids"])
        res = moments.json()["results"]  # the other shards' merge: none of the stalled shard's videos
        assert res and all(m["video"] not in vids1 for m in res) and any(m["video"] in vids1 for m in vfull["results"])
        assert svmr_here.status_code == 200 and svmr_wait < 2.0  # its shard answered: no wait for the stalled one
        assert svmr_there.status_code == 503 and "[1]" in svmr_there.json()["error"]
        after = requests.get(f"{url}/info", timeout=30).json()
        assert after["partial_answers"] >= 1 and after["shards"][1]["missing_from_answers"] >= 1
        assert _post(f"{url}/search", body).json()["missing_shards"] == []
        os.kill(pids[0], signal.SIGKILL)
        answers = [_post(f"{url}/search", body) for _ in range(6)]
        assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
        for r in answers:
            got = r.json()
            assert got["missing_shards"] in ([], [1])
            if not got["missing_shards"]:
                assert [h["id"] for h in got["results"]] == [h["id"] for h in full["results"]]
        wait_healthy(url, 180.0)

    def test_interrupted_build_resumes_with_the_missing_shard(self, sharded, capsys):
        from xmr.cli import main

        out = Path(sharded["cat_idx"]).with_name("cat3-resumed")
        shutil.copytree(sharded["cat_idx"], out)
        before = (out / "shard-001" / "embeddings.safetensors").read_bytes()
        shutil.rmtree(out / "shard-001")
        (out / "shards.json").unlink()
        capsys.readouterr()
        assert main(["index", "build", "--checkpoint", sharded["checkpoints"]["cat0"], "--gallery", AVDIGITS,
                     "--split", "test", "--shards", "3", "--out", str(out)]) == 0
        said = capsys.readouterr().out
        assert "2 already built, resuming" in said and "shard 2/3" in said and "shard 1/3" not in said
        assert (out / "shard-001" / "embeddings.safetensors").read_bytes() == before
        assert json.loads((out / "shards.json").read_text())["items"] == 140
        # finishing it with another checkpoint would mix two models in one index: refused
        shutil.rmtree(out / "shard-002")
        (out / "shards.json").unlink()
        capsys.readouterr()
        assert main(["index", "build", "--checkpoint", sharded["checkpoints"]["cat1"], "--gallery", AVDIGITS,
                     "--split", "test", "--shards", "3", "--out", str(out)]) == 2
        assert "belongs to another build (checkpoint was" in capsys.readouterr().err

    def test_a_sharded_index_on_s3_builds_and_serves(self, sharded, s3_bucket, s3_endpoint):
        """Built to s3:// (each shard uploaded, its index.json last) and served from there
        (each shard's replicas download only their shard): the same answers."""
        from xmr.cli import main
        from xmr.serve.startup import start

        uri = f"s3://{s3_bucket}/indexes/cat2"
        assert main(["index", "build", "--checkpoint", sharded["checkpoints"]["cat0"], "--gallery", AVDIGITS,
                     "--split", "test", "--shards", "2", "--out", uri]) == 0
        url = start({"checkpoint": sharded["checkpoints"]["cat0"], "index": uri, "endpoint_url": s3_endpoint},
                    port=sharded["port"], name="cat2s3", route_prefix="/cat2s3")
        wait_healthy(url, 180.0)
        info = requests.get(f"{url}/info", timeout=30).json()
        assert [s["items"] for s in info["shards"]] == [70, 70]
        assert all(s["gallery"].startswith(uri) for s in info["shards"])
        rng = np.random.default_rng(9)
        for _ in range(5):
            body = {"query": rng.standard_normal(info["input_dims"]["a"]).astype(np.float32).tolist(), "k": 20}
            a, b = _post(f"{sharded['cat1']}/search", body).json(), _post(f"{url}/search", body).json()
            assert [h["id"] for h in b["results"]] == [h["id"] for h in a["results"]]
