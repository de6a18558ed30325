"""The reader's contract: every unit exactly once per epoch across ranks and loader workers,
the same number of steps on every rank, seeded orders, and the batch layout of design.md."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_tiny_category
from xmr.data.decode import load_npy
from xmr.data.manifest import load_manifest
from xmr.data.plan import PlanError, make_plan
from xmr.data.reader import make_loader
from xmr.metrics.vcmr import moment_to_clips

pytestmark = pytest.mark.timeout(120)

CASES = {  # dataset fixture, unit, the field that identifies a unit, units in train
    "category": ("tiny_category_dataset", None, "index"),
    "vcmr-query": ("tiny_vcmr_dataset", "query", "desc_id"),
    "vcmr-video": ("tiny_vcmr_dataset", "video", "index"),
}


def _epoch(root: Path, *, world_size: int, num_workers: int, local_batch_size: int, **kw) -> list[list[dict]]:
    """All batches of one epoch, per rank."""
    return [list(make_loader(str(root), "train", local_batch_size=local_batch_size, rank=r,
                             world_size=world_size, num_workers=num_workers, **kw))
            for r in range(world_size)]


def _expected_ids(root: Path, unit: str | None, field: str) -> list[int]:
    loader = make_loader(str(root), "train", local_batch_size=1000, shuffle=False, unit=unit)
    return sorted(i for b in loader for i in b[field].tolist())


@pytest.mark.parametrize("mode", ["shard", "sample"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_exactly_once_two_ranks_two_workers(request: pytest.FixtureRequest, case: str, mode: str) -> None:
    fixture, unit, field = CASES[case]
    root: Path = request.getfixturevalue(fixture)
    expected = _expected_ids(root, unit, field)
    assert len(expected) == len(set(expected)) > 10
    orders = {}
    for seed, epoch in [(0, 0), (0, 1), (0, 0), (5, 0)]:
        per_rank = _epoch(root, world_size=2, num_workers=2, local_batch_size=3, seed=seed, epoch=epoch,
                          mode=mode, unit=unit)
        seen = [i for batches in per_rank for b in batches for i in b[field].tolist()]
        assert sorted(seen) == expected, f"{case}/{mode}: not every unit exactly once"
        steps = {len(b) for b in per_rank}
        assert len(steps) == 1, f"ranks took different step counts {steps}"
        sizes = [len(b["key"]) for batches in per_rank for b in batches]
        assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 3
        assert all(b["n_skipped"] == 0 for batches in per_rank for b in batches)
        orders.setdefault((seed, epoch), []).append([b[field].tolist() for bs in per_rank for b in bs])
    assert orders[(0, 0)][0] == orders[(0, 0)][1], "same seed and epoch must give the same order"
    assert orders[(0, 0)][0] != orders[(0, 1)][0], "epochs must differ"
    assert orders[(0, 0)][0] != orders[(5, 0)][0], "seeds must differ"


@pytest.mark.parametrize("case", ["category", "vcmr-query"])
def test_sample_mode_global_batches_do_not_depend_on_world_size(request: pytest.FixtureRequest, case: str) -> None:
    fixture, unit, field = CASES[case]
    root: Path = request.getfixturevalue(fixture)
    one = _epoch(root, world_size=1, num_workers=0, local_batch_size=8, mode="sample", unit=unit, seed=1)[0]
    two = _epoch(root, world_size=2, num_workers=2, local_batch_size=4, mode="sample", unit=unit, seed=1)
    assert len(one) == len(two[0]) == len(two[1])
    for j, batch in enumerate(one):
        merged = two[0][j][field].tolist() + two[1][j][field].tolist()
        assert merged == batch[field].tolist(), f"global batch {j} differs between world sizes"


def test_eval_order_is_manifest_order(tiny_category_dataset: Path) -> None:
    loader = make_loader(str(tiny_category_dataset), "val", local_batch_size=4, shuffle=False)
    batches = list(loader)
    assert loader.steps == len(batches) == math.ceil(13 / 4) and loader.num_samples == 13
    assert [i for b in batches for i in b["index"].tolist()] == list(range(13))
    assert [len(b["key"]) for b in batches] == [4, 3, 3, 3]
    assert batches[0]["key"][0] == "val_00000"


def test_set_epoch_replans(tiny_category_dataset: Path) -> None:
    loader = make_loader(str(tiny_category_dataset), "train", local_batch_size=6, seed=2, num_workers=2)
    first = [i for b in loader for i in b["index"].tolist()]
    loader.set_epoch(1)
    again = [i for b in loader for i in b["index"].tolist()]
    fresh = make_loader(str(tiny_category_dataset), "train", local_batch_size=6, seed=2, num_workers=2, epoch=1)
    assert again == [i for b in fresh for i in b["index"].tolist()] != first
    assert sorted(again) == sorted(first) == list(range(50)) and len(loader) == loader.steps == 9


def test_category_batch_layout_and_values(tmp_path: Path) -> None:
    root = write_tiny_category(tmp_path / "h", splits={"train": 10}, kind="hierarchical", seed=4)
    batch = next(iter(make_loader(str(root), "train", local_batch_size=10, shuffle=False)))
    assert batch["a"].dtype == torch.float32 and tuple(batch["a"].shape) == (10, 8)
    assert tuple(batch["b"].shape) == (10, 2, 4) and tuple(batch["label"].shape) == (10, 2)
    assert (batch["label"][:, 0] == batch["label"][:, 1] // 2).all()
    # float16 on disk -> exactly the float16 values as float32
    rng = np.random.default_rng(4)
    c = int(rng.integers(4))
    a0 = rng.normal(size=8).astype(np.float16).astype(np.float32)
    assert batch["label"][0].tolist() == [c // 2, c] and np.array_equal(batch["a"][0].numpy(), a0)
    root_m = write_tiny_category(tmp_path / "m", splits={"train": 6}, kind="multi")
    multi = next(iter(make_loader(str(root_m), "train", local_batch_size=6)))
    assert tuple(multi["label"].shape) == (6, 4) and multi["label"].dtype == torch.float32
    assert set(multi["label"].sum(1).tolist()) <= {1.0, 2.0}


def test_vcmr_query_batch_layout(tiny_vcmr_dataset: Path) -> None:
    m = load_manifest(str(tiny_vcmr_dataset))
    loader = make_loader(str(tiny_vcmr_dataset), "train", local_batch_size=6, shuffle=False, max_query_tokens=3)
    assert loader.num_samples == m.splits["train"].num_queries
    for b in loader:
        n = len(b["key"])
        bsz, n_clips, dv = b["visual"].shape
        assert (bsz, dv) == (n, 6) and b["subtitle"].shape == (n, n_clips, 5)
        assert b["q_tokens"].shape[0] == n and b["q_tokens"].shape[1] <= 3 and b["q_tokens"].shape[2] == 4
        for f in ("q_mask", "sub_mask", "clip_mask"):
            assert b[f].dtype == torch.bool
        assert not (b["sub_mask"] & ~b["clip_mask"]).any()
        assert (b["visual"][~b["clip_mask"]] == 0).all()
        valid = b["clip_mask"].sum(1)
        for i in range(n):
            st_i, ed_i = moment_to_clips(b["ts"][i].tolist(), int(valid[i]), 1.5)
            assert (b["st"][i].item(), b["ed"][i].item()) == (st_i, ed_i)
            assert 0 <= st_i <= ed_i < valid[i]
        assert b["type"] == ["vt"] * n and b["video_index"].min() >= 1000


def test_vcmr_video_unit_and_max_clips(tiny_vcmr_dataset: Path) -> None:
    loader = make_loader(str(tiny_vcmr_dataset), "val", unit="video", local_batch_size=7, shuffle=False,
                         max_clips=4)
    (batch,) = list(loader)
    assert batch["index"].tolist() == list(range(7)) and batch["visual"].shape[1] <= 4
    assert len(batch["desc_id"]) == 7 and all(isinstance(q, list) for q in batch["ts"])
    assert batch["vid_name"][0] == "val_video_0"


def test_clip_labels_are_inclusive_as_in_the_paper() -> None:
    """QACLN §2.1: a moment is clips i_s..i_e, both inclusive: ed = ceil(t_e/1.5) - 1."""
    assert moment_to_clips([0.0, 1.5], 10, 1.5) == (0, 0)      # one whole clip
    assert moment_to_clips([1.6, 2.9], 10, 1.5) == (1, 1)      # inside clip 1
    assert moment_to_clips([1.0, 2.0], 10, 1.5) == (0, 1)      # spans a boundary
    assert moment_to_clips([3.0, 99.0], 10, 1.5) == (2, 9)     # end clipped to n_clips-1
    assert moment_to_clips([20.0, 30.0], 4, 1.5) == (3, 3)     # start never after end


def test_plan_errors_name_split_and_sizes() -> None:
    with pytest.raises(PlanError, match=r"split 'train': 1 non-empty shard\(s\), 2 unit\(s\), world_size=3, "
                                        r"num_workers=2: rank\(s\) \[2\] get \[0\] unit\(s\)"):
        make_plan([2], split="train", local_batch_size=4, world_size=3, num_workers=2)
    # 3 units on 2 ranks at batch 1: rank 0 needs 2 steps, rank 1 has 1 unit.
    with pytest.raises(PlanError, match=r"rank\(s\) \[1\] get \[1\] unit\(s\), fewer than the 2 steps"):
        make_plan([2, 0, 1], split="train", local_batch_size=1, world_size=2)
    with pytest.raises(PlanError, match="cannot give each of 4 ranks"):
        make_plan([3], split="val", local_batch_size=1, world_size=4, mode="sample")
    with pytest.raises(PlanError, match="nothing to read"):
        make_plan([0, 0], split="val", local_batch_size=1)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=12), world_size=st.integers(1, 4),
       num_workers=st.integers(0, 3), batch=st.integers(1, 16), seed=st.integers(0, 3), epoch=st.integers(0, 3),
       mode=st.sampled_from(["shard", "sample"]))
def test_plan_covers_every_unit_once(counts: list[int], world_size: int, num_workers: int, batch: int, seed: int,
                                     epoch: int, mode: str) -> None:
    try:
        plans = [make_plan(counts, split="s", local_batch_size=batch, rank=r, world_size=world_size,
                           num_workers=num_workers, seed=seed, epoch=epoch, mode=mode) for r in range(world_size)]
    except PlanError:
        return
    assert len({p.steps for p in plans}) == 1
    covered: collections.Counter = collections.Counter()
    kept_sizes = []
    for p in plans:
        assert sum(w.num_batches for w in p.workers) == p.steps
        for w in p.workers:
            stream = [(j.shard, pos) for j in w.jobs for pos in range(j.lo, j.hi)]
            assert sum(c.size for c in w.chunks) <= len(stream)
            start = 0
            for c in w.chunks:
                if c.keep_hi > c.keep_lo:
                    kept_sizes.append(c.keep_hi - c.keep_lo)
                    covered.update(stream[start + c.keep_lo:start + c.keep_hi])
                start += c.size
    assert sorted(covered) == sorted((s, i) for s, n in enumerate(counts) for i in range(n))
    assert set(covered.values()) == {1}
    assert max(kept_sizes) - min(kept_sizes) <= 1 and max(kept_sizes) <= batch


@pytest.mark.parametrize("array", [np.arange(6, dtype=np.float16).reshape(2, 3), np.zeros((0, 4), np.float32),
                                   np.ones(5, np.uint8), np.asfortranarray(np.eye(3, dtype=np.float32)),
                                   np.float32(2.5)])
def test_load_npy_matches_np_load(array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    for _ in range(2):  # the second call takes the cached-header path
        got = load_npy(buf.getvalue())
        assert got.dtype == array.dtype and got.shape == array.shape and np.array_equal(got, array)
    with pytest.raises(ValueError):
        load_npy(buf.getvalue()[:-1] if array.size else buf.getvalue() + b"x")


def test_corrupt_labels_changes_a_fixed_share_to_another_class():
    """``data.label_noise``: about that share of samples get a wrong label, never their own,
    and the same samples in every call (a corrupted dataset, not fresh noise each epoch)."""
    import torch

    from xmr.data.reader import corrupt_labels

    index = torch.arange(20_000)
    label = index % 6
    batch = {"index": index, "label": label, "a": torch.zeros(20_000, 1)}
    for fraction in (0.3, 0.5):
        out = corrupt_labels(batch, fraction, [6])
        wrong = out["label"] != label
        assert abs(float(wrong.float().mean()) - fraction) < 0.02
        assert (out["label"] >= 0).all() and (out["label"] < 6).all()
        assert torch.equal(corrupt_labels(batch, fraction, [6])["label"], out["label"])  # fixed per sample
        counts = torch.bincount(out["label"][wrong], minlength=6)
        assert (counts > 0).all()  # wrong labels spread over the other classes
    assert torch.equal(corrupt_labels(batch, 0.0, [6])["label"], label)
