"""Approximate gallery indexes (xmr.tasks.ann): exact top 10 against numpy, each kind's
chosen setting reaching the recall target on queries it was not chosen on, a save and
reload that searches the same, and the CLI's report. Small galleries; the million lives
in bench/serve_latency.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xmr.tasks.ann import AnnConfig, AnnIndex, build_ann, exact_top10, recall_at_10

pytestmark = pytest.mark.timeout(120)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered():
    """4,000 items around 60 centres in 32-d, and queries drawn the same way."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((60, 32))
    def draw(n):
        return unit(centres[rng.integers(0, 60, n)] + 0.6 * rng.standard_normal((n, 32)))
    return draw(4000), draw(800), draw(300)


def test_exact_top10_matches_numpy(clustered):
    gallery, probes, _ = clustered
    want = np.argsort(-(probes[:50] @ gallery.T), axis=1, kind="stable")[:, :10]
    got = exact_top10(gallery, probes[:50], chunk=1000)  # several chunks merged
    assert recall_at_10(got, want) == 1.0


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq", "ivf"])
def test_each_kind_reaches_the_target_on_new_queries(clustered, kind):
    gallery, probes, fresh = clustered
    a = build_ann(gallery, probes, AnnConfig(kind=kind, recall_target=0.95, pq_m=8, build_threads=1))
    assert a.met_target and a.recall_at_10 >= 0.95 and a.search_params
    assert a.bytes_per_item > 0 and a.build_s > 0
    # queries neither the choice nor the reported figure saw
    _, found = a.search(fresh, 10)
    assert recall_at_10(found, exact_top10(gallery, fresh)) >= 0.93
    if kind == "ivfpq":  # the codes re-ranked with the full vectors: scores are exact inner products
        scores, found = a.search(fresh[:5], 3)
        assert np.allclose(scores, np.take_along_axis(fresh[:5] @ gallery.T, found, 1), atol=1e-5)


def test_an_unreachable_target_is_reported_not_hidden(clustered, monkeypatch):
    import xmr.tasks.ann as ann

    gallery, probes, _ = clustered
    monkeypatch.setattr(ann, "_settings", lambda kind, nlist: [{"efSearch": 10}])  # one shallow setting only
    a = build_ann(gallery, probes, AnnConfig(kind="hnsw", recall_target=0.999, hnsw_m=2, hnsw_ef_construction=4,
                                             build_threads=1))
    assert not a.met_target and a.recall_at_10 < 0.999 and a.search_params == {"efSearch": 10}


def test_save_and_reload_search_the_same(tmp_path, clustered):
    gallery, probes, fresh = clustered
    a = build_ann(gallery, probes, AnnConfig(kind="hnsw", build_threads=1))
    meta = a.save(str(tmp_path / "faiss.index"))
    back = AnnIndex.load(str(tmp_path / "faiss.index"), json.loads(json.dumps(meta)))
    assert back.search_params == a.search_params and back.recall_at_10 == a.recall_at_10
    assert np.array_equal(back.search(fresh, 10)[1], a.search(fresh, 10)[1])


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq", "ivf"])
def test_the_vectors_an_index_keeps_are_the_gallery_in_order(tmp_path, clustered, kind):
    """ivfpq's re-ranking copy and HNSW's storage are the gallery's rows in order (a served
    table is a view of them, not a second copy); ivf keeps them by list: None. After a save
    and reload too (what a replica holds)."""
    gallery, probes, _ = clustered
    a = build_ann(gallery, probes, AnnConfig(kind=kind, pq_m=8, build_threads=1))
    back = AnnIndex.load(a.save(str(tmp_path / "f.index")) and str(tmp_path / "f.index"), a.describe())
    for idx in (a, back):
        v = idx.vectors()
        if kind == "ivf":
            assert v is None
        else:
            assert v.shape == gallery.shape and np.array_equal(v, gallery)
            assert not v.flags.owndata  # the index's own memory
    if kind != "ivf":  # a table made from the view keeps its index alive when the index is dropped
        import gc

        table = torch.from_numpy(a.vectors())
        del a, back, idx, v
        gc.collect()
        _ = [np.random.default_rng(i).random(gallery.shape, dtype=np.float32) for i in range(40)]  # reuse freed memory
        assert torch.equal(table, torch.from_numpy(gallery))


@pytest.mark.parametrize("field,value", [("kind", "lsh"), ("recall_target", 0.0), ("hnsw_m", 0), ("ivf_nlist", -1),
                                         ("pq_m", -1)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"ann.{field}"):
        AnnConfig(**{field: value})


def test_index_build_reports_and_serves_the_saved_index(tmp_path, capsys):
    """`xmr index build --ann-kind ivfpq` prints build time, recall, bytes per item and the
    parameters; the endpoint's search through the reloaded index finds what exact search finds."""
    from conftest import write_tiny_category
    from train_helpers import preset_cfg
    from xmr.checkpoint import save_checkpoint
    from xmr.cli import main
    from xmr.method import Method
    from xmr.serve.gallery import load_for_serving
    from xmr.serve.search import search_items

    data = write_tiny_category(tmp_path / "data", splits={"train": 20, "val": 8, "test": 2000})
    cfg = preset_cfg("sccmrl", str(data), "model.embed_dim=16", "model.hidden_dim=16")
    torch.manual_seed(0)
    ckpt = str(save_checkpoint(tmp_path / "ck", Method(cfg).eval(), cfg))
    assert main(["index", "build", "--checkpoint", ckpt, "--gallery", str(data), "--out", str(tmp_path / "idx"),
                 "--approx", "on", "--ann-kind", "ivfpq", "--pq-m", "4", "--nlist", "16"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "modality b" in ln)
    assert "ivfpq" in line and "'nlist': 16" in line and "'pq_m': 4" in line and "'nprobe'" in line
    assert "bytes per item" in line and "built in" in line and "recall@10 vs exact search = " in line
    saved = load_for_serving(ckpt, index=str(tmp_path / "idx"))
    assert saved.info["search"] == "approximate (ivfpq)" and saved.gallery.approx["b"].search_params
    exact = load_for_serving(ckpt, str(data), "test", approx="off")
    for role in ("a", "b"):  # each table held once: a view of its index's vectors, no float16 copy
        view = saved.gallery.approx[role].vectors()
        assert saved.gallery.emb[role].data_ptr() == view.ctypes.data and role not in saved.gallery.half
        assert torch.allclose(saved.gallery.emb[role], exact.gallery.emb[role], atol=1e-5)
    queries = [np.random.default_rng(i).standard_normal(8).astype(np.float32) for i in range(30)]
    want = search_items([(exact, "a", q, 10) for q in queries])
    got = search_items([(saved, "a", q, 10) for q in queries])
    overlap = np.mean([len({h["id"] for h in w} & {h["id"] for h in g}) / 10 for w, g in zip(want, got)])
    assert overlap >= 0.85  # the index's own held-out figure is >= 0.95 on the gallery's other side


def test_the_default_kind_builds_at_any_embedding_size():
    """ivfpq is the default (the measured choice at 1M x 256): its sub-quantiser count is the
    largest divisor of d up to 32, so a small or odd d builds too (32 at d = 256)."""
    from xmr.tasks.ann import default_pq_m

    assert [default_pq_m(d) for d in (8, 12, 37, 48, 256, 384)] == [8, 12, 1, 24, 32, 32]
    rng = np.random.default_rng(1)
    x = unit(rng.standard_normal((1000, 12)))
    a = build_ann(x, x[:100], AnnConfig(build_threads=1, probes=100))
    assert a.kind == "ivfpq" and a.build["pq_m"] == 12, a.build
    for n in (5, 15):  # fewer items than 16 codes: the code book shrinks to the gallery
        x = unit(rng.standard_normal((n, 8)))
        a = build_ann(x, x, AnnConfig(build_threads=1))
        assert a.search(x[:1], n)[1][0][0] == 0  # an item's own nearest is itself
