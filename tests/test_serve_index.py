"""Saved gallery indexes (``xmr index build``): a round trip gives the same search results,
the FAISS index's recall@10 is measured against exact search, and a mismatched index fails
clearly. In process: the endpoint's compute without Ray."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import write_tiny_category, write_tiny_vcmr
from train_helpers import preset_cfg
from xmr.checkpoint import save_checkpoint
from xmr.method import Method
from xmr.serve.gallery import load_for_serving, save_index
from xmr.tasks.category import add_approx
from xmr.serve.search import moments_items, search_items

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def category_ckpt(tmp_path):
    data = write_tiny_category(tmp_path / "data", splits={"train": 20, "val": 8, "test": 300})
    cfg = preset_cfg("sccmrl", str(data), "model.embed_dim=8", "model.hidden_dim=16")
    torch.manual_seed(0)
    return str(save_checkpoint(tmp_path / "ck", Method(cfg).eval(), cfg)), str(data)


def test_category_index_round_trip_and_faiss_recall(tmp_path, category_ckpt, capsys):
    from xmr.cli import main

    ckpt, data = category_ckpt
    assert main(["index", "build", "--checkpoint", ckpt, "--gallery", data, "--split", "test",
                 "--out", str(tmp_path / "idx"), "--approx", "on"]) == 0
    out = capsys.readouterr().out
    assert "index of 300 items" in out and "recall@10 vs exact search" in out
    exact = load_for_serving(ckpt, data, "test", approx="off")
    saved = load_for_serving(ckpt, index=str(tmp_path / "idx"))
    assert saved.gallery.ids == exact.gallery.ids and set(saved.gallery.approx) == {"a", "b"}
    rng = np.random.default_rng(0)
    queries = [(rng.standard_normal(8).astype(np.float32)) for _ in range(20)]
    got_exact = search_items([(exact, "a", q, 10) for q in queries])
    got_approx = search_items([(saved, "a", q, 10) for q in queries])
    overlap = np.mean([len({h["id"] for h in e} & {h["id"] for h in a}) / 10 for e, a in zip(got_exact, got_approx)])
    recalls = add_approx(exact.gallery, "on")
    assert 0.0 < recalls["a"] <= 1.0 and overlap > 0.5  # IVF with nprobe 32 of ~69 lists on 300 items
    # exact search through a saved index (approx off) equals the freshly encoded gallery
    save_index(tmp_path / "exact", exact, {})
    again = load_for_serving(ckpt, index=str(tmp_path / "exact"))
    assert search_items([(again, "b", np.ones((2, 4), np.float32), 5)]) == \
        search_items([(exact, "b", np.ones((2, 4), np.float32), 5)])


def test_vcmr_index_round_trip(tmp_path):
    data = write_tiny_vcmr(tmp_path / "vcmr", splits={"train": 4, "val": 6})
    cfg = preset_cfg("qacln", str(data), "model.embed_dim=16", "model.num_heads=2")
    torch.manual_seed(0)
    ckpt = str(save_checkpoint(tmp_path / "ck", Method(cfg).eval(), cfg))
    fresh = load_for_serving(ckpt, str(data), "val")
    save_index(tmp_path / "idx", fresh, {})
    saved = load_for_serving(ckpt, index=str(tmp_path / "idx"))
    q = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    assert moments_items([(saved, q, 5)]) == moments_items([(fresh, q, 5)])


def test_index_of_another_model_is_refused(tmp_path, category_ckpt):
    ckpt, data = category_ckpt
    save_index(tmp_path / "idx", load_for_serving(ckpt, data, "test"), {})
    cfg = preset_cfg("sccmrl", data, "model.embed_dim=12", "model.hidden_dim=16")
    other = str(save_checkpoint(tmp_path / "other", Method(cfg), cfg))
    with pytest.raises(ValueError, match="does not fit"):
        load_for_serving(other, index=str(tmp_path / "idx"))
    with pytest.raises(ValueError, match="not a readable xmr index"):
        load_for_serving(ckpt, index=os.fspath(tmp_path))


def test_the_app_builder_serves_an_index_without_its_checkpoint(tmp_path):
    """An index records what the application builder needs (``xmr.serve.served``: task,
    shapes, query-token limit, top videos, the dataset's manifest): it is read with the
    checkpoint gone, so nothing fetches it; an index without that record falls back to the
    checkpoint's config, read once."""
    import json
    import shutil

    from xmr.serve.served import served
    from xmr.serve.settings import serve_settings

    data = write_tiny_vcmr(tmp_path / "vcmr", splits={"train": 4, "val": 6})
    cfg = preset_cfg("qacln", str(data), "model.embed_dim=16", "model.num_heads=2", "model.top_videos=7")
    torch.manual_seed(0)
    ckpt = str(save_checkpoint(tmp_path / "ck", Method(cfg).eval(), cfg))
    save_index(tmp_path / "idx", load_for_serving(ckpt, str(data), "val"), {})
    shutil.copytree(tmp_path / "ck", tmp_path / "ck_kept")
    shutil.rmtree(tmp_path / "ck")
    what = served(serve_settings({"checkpoint": ckpt, "index": str(tmp_path / "idx")}))
    assert (what.route, what.top_videos, what.max_query_tokens) == ("moments", 7, cfg.data.max_query_tokens)
    assert what.gallery_size == 6 and what.dims == cfg.model.dims and what.manifest.splits["val"].num_samples == 6
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["serving"] == {"max_query_tokens": cfg.data.max_query_tokens, "top_videos": 7}
    del meta["serving"]  # an index built before the record: the checkpoint's config instead
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="ck"):
        served(serve_settings({"checkpoint": ckpt, "index": str(tmp_path / "idx")}))
    kept = str(tmp_path / "ck_kept")
    s = serve_settings({"checkpoint": kept, "index": str(tmp_path / "idx")})
    what = served(s)
    assert what.top_videos == 7
    # what is served, read once, is all the app needs: composed with the index and checkpoint gone
    # (``xmr serve`` reads it before Ray starts and hands it over; nothing is read twice)
    from xmr.serve.app import application, replica_needs

    shutil.rmtree(tmp_path / "idx")
    shutil.rmtree(tmp_path / "ck_kept")
    app = application(s, what)
    assert type(app).__name__ == "Application" and set(replica_needs(what)) == {"Gateway", "Retriever"}
