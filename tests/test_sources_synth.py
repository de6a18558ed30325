"""Synthetic generators: deterministic in the seed, valid shards, and the planted structure
is really there (class structure, learnable pair matching, per-type moment signal)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from xmr.data.manifest import load_manifest
from xmr.data.sources.synth_category import SynthCategoryConfig, generate_category, write_synth_category
from xmr.data.sources.synth_vcmr import SynthVcmrConfig, generate_vcmr, moment_clips, write_synth_vcmr

pytestmark = pytest.mark.timeout(120)

TVR_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "tvr" / "tvr_val_release.jsonl"


def _shas(m) -> dict[str, list[str]]:
    return {n: [s.sha256 for s in sp.shards] for n, sp in m.splits.items()}


def _samples(root: Path, shard: str) -> dict[str, dict]:
    """``key -> {member suffix: array or meta}`` of one written shard."""
    out: dict[str, dict] = {}
    with tarfile.open(root / shard) as t:
        for mem in t.getmembers():
            key, rest = mem.name.split(".", 1)
            data = t.extractfile(mem).read()
            out.setdefault(key, {})[rest] = (json.loads(data) if rest == "json"
                                             else np.load(io.BytesIO(data), allow_pickle=False))
    return out


# -- category ---------------------------------------------------------------------------

def test_category_same_seed_same_shards_other_seed_differs(tmp_path: Path) -> None:
    cfg = SynthCategoryConfig(splits={"train": 40, "test": 20})
    m1 = write_synth_category(str(tmp_path / "one"), cfg, samples_per_shard=16, progress=False)
    m2 = write_synth_category(str(tmp_path / "two"), cfg, samples_per_shard=16, progress=False)
    m3 = write_synth_category(str(tmp_path / "three"), SynthCategoryConfig(splits={"train": 40, "test": 20}, seed=1),
                              samples_per_shard=16, progress=False)
    assert _shas(m1) == _shas(m2)
    assert _shas(m1)["train"] != _shas(m3)["train"]
    assert [s.num_samples for s in m1.splits["train"].shards] == [16, 16, 8]
    assert m1.modalities["a"].shape == [32] and m1.modalities["b"].dtype == "float16"
    assert load_manifest(str(tmp_path / "one")).source["details"]["seed"] == 0


def test_category_class_structure_and_pair_matching_are_learnable() -> None:
    cfg = SynthCategoryConfig(dim_a=32, dim_b=32)
    d = generate_category(cfg)
    tr, te = d["train"], d["test"]
    # Nearest class mean on modality a: far above chance (10%).
    means = np.stack([tr.a[tr.labels == c].mean(axis=0) for c in range(cfg.n_classes)])
    pred = ((te.a[:, None, :] - means[None]) ** 2).sum(-1).argmin(axis=1)
    assert (pred == te.labels).mean() > 0.5
    # Raw cross-modal comparison fails (modality gap), a linear map learnt on train works.
    def r_at_1(x: np.ndarray, y: np.ndarray) -> float:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
        return float(((x @ y.T).argmax(axis=1) == np.arange(len(x))).mean())
    raw = r_at_1(te.a, te.b)
    xa = np.c_[tr.a, np.ones(len(tr.a))]
    w, *_ = np.linalg.lstsq(xa, tr.b, rcond=None)
    mapped = r_at_1(np.c_[te.a, np.ones(len(te.a))] @ w - tr.b.mean(0), te.b - tr.b.mean(0))
    assert raw < 0.1 and mapped > 0.25, (raw, mapped)


def test_category_hierarchy_labels_and_coarse_structure(tmp_path: Path) -> None:
    cfg = SynthCategoryConfig(n_classes=12, hierarchy=3, splits={"train": 300, "val": 30})
    d = generate_category(cfg)
    lab = d["train"].labels
    assert lab.shape == (300, 2) and np.array_equal(lab[:, 0], lab[:, 1] // 4)
    means = np.stack([d["train"].a[lab[:, 1] == c].mean(axis=0) for c in range(12)])
    dist = ((means[:, None] - means[None]) ** 2).sum(-1)
    coarse = np.arange(12) // 4
    same = coarse[:, None] == coarse[None]
    off_diag = ~np.eye(12, dtype=bool)
    assert dist[same & off_diag].mean() < 0.6 * dist[~same].mean()
    m = write_synth_category(str(tmp_path), cfg, progress=False)
    assert m.labels.kind == "hierarchical" and m.labels.num_classes == [3, 12]
    meta = next(iter(_samples(tmp_path, m.splits["val"].shards[0].path).values()))["json"]
    assert len(meta["label_path"]) == 2 and meta["label_path"][0] == meta["label_path"][1] // 4


def test_category_multi_label_and_sequences(tmp_path: Path) -> None:
    cfg = SynthCategoryConfig(multi_label=True, seq_len_a=5, seq_len_b=3, splits={"train": 30})
    m = write_synth_category(str(tmp_path), cfg, progress=False)
    assert m.labels.kind == "multi" and m.modalities["a"].shape == [5, 32] and m.modalities["b"].shape == [3, 48]
    samples = _samples(tmp_path, m.splits["train"].shards[0].path)
    for s in samples.values():
        assert s["a.npy"].shape == (5, 32) and s["a.npy"].dtype == np.float16
        ls = s["json"]["label_set"]
        assert 1 <= len(ls) <= 3 and ls == sorted(set(ls))


def test_category_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="hierarchy"):
        generate_category(SynthCategoryConfig(n_classes=10, hierarchy=3))
    with pytest.raises(ValueError, match="multi_label"):
        generate_category(SynthCategoryConfig(n_classes=10, hierarchy=5, multi_label=True))


def test_category_writes_to_s3(s3_bucket: str, s3_endpoint: str) -> None:
    cfg = SynthCategoryConfig(splits={"train": 10})
    root = f"s3://{s3_bucket}/synth"
    m = write_synth_category(root, cfg, endpoint_url=s3_endpoint, progress=False)
    assert load_manifest(root, endpoint_url=s3_endpoint).splits["train"].shards[0].sha256 == \
        m.splits["train"].shards[0].sha256


# -- vcmr -------------------------------------------------------------------------------

def test_vcmr_deterministic_and_layout(tmp_path: Path) -> None:
    cfg = SynthVcmrConfig(splits={"train": 12, "val": 6})
    m1 = write_synth_vcmr(str(tmp_path / "one"), cfg, samples_per_shard=5, progress=False)
    m2 = write_synth_vcmr(str(tmp_path / "two"), cfg, samples_per_shard=5, progress=False)
    assert _shas(m1) == _shas(m2)
    assert m1.clip_len == 1.5 and m1.task == "vcmr"
    seen_index, seen_desc = set(), set()
    for shard in m1.splits["train"].shards:
        for s in _samples(tmp_path / "one", shard.path).values():
            meta = s["json"]
            n = meta["n_clips"]
            assert n == math.ceil(meta["duration"] / 1.5)
            assert s["visual.npy"].shape == (n, 32) and s["sub_mask.npy"].shape == (n,)
            assert not s["subtitle.npy"][s["sub_mask.npy"] == 0].any(), "missing subtitles must be zero rows"
            assert s["query_tokens.npy"].shape[0] == sum(q["n_tokens"] for q in meta["queries"])
            seen_index.add(meta["video_index"])
            seen_desc.update(q["desc_id"] for q in meta["queries"])
    assert len(seen_index) == 12
    assert sum(len(s["json"]["queries"]) for sh in m1.splits["train"].shards
               for s in _samples(tmp_path / "one", sh.path).values()) == len(seen_desc)


def _query_latents(data, v):
    """Each query's tokens read back into latents through its vocabulary: {stream: m_hat}."""
    pinv = {s: np.linalg.pinv(w) for s, w in data.maps.items()}
    start, out = 0, []
    for q in v.meta["queries"]:
        tok = v.arrays["query_tokens"][start: start + q["n_tokens"]]
        start += q["n_tokens"]
        named = [s for s, letter in (("visual", "v"), ("subtitle", "t")) if letter in q["type"]]
        m = {}
        for i, stream in enumerate(named):  # a vt query's tokens alternate between the two vocabularies
            vocab = {"visual": "query_v", "subtitle": "query_t"}[stream]
            rows = tok[i::len(named)]
            m[stream] = pinv[vocab] @ (rows.mean(axis=0) - data.offsets[vocab])
        out.append((q, tok, m))
    return out, pinv


def test_vcmr_planted_signal_follows_query_type() -> None:
    cfg = SynthVcmrConfig(splits={"train": 80}, distractors_per_video=0, cross_stream_distractors=0.0)
    data = generate_vcmr(cfg)
    cos: dict[tuple[str, str], list[float]] = {}
    edges = 0
    lengths = set()
    for v in data.videos["train"]:
        n = v.meta["n_clips"]
        lengths.add(n)
        queries, pinv = _query_latents(data, v)
        for q, _, m in queries:
            inside = np.zeros(n, bool)
            clips = moment_clips(q["ts"], n, cfg.clip_len)
            inside[clips.start:clips.stop] = True
            edges += q["ts"][0] == 0 or q["ts"][1] == v.meta["duration"]
            m_hat = next(iter(m.values()))
            for stream in ("visual", "subtitle"):
                ok = np.ones(n, bool) if stream == "visual" else v.arrays["sub_mask"].astype(bool)
                if not (ok & inside).any() or not (ok & ~inside).any():
                    continue
                probe = m.get(stream, m_hat)  # the stream's own latent where the type names it
                lat = (v.arrays[stream] - data.offsets[stream]) @ pinv[stream].T
                diff = lat[ok & inside].mean(0) - lat[ok & ~inside].mean(0)
                c = float(diff @ probe / (np.linalg.norm(diff) * np.linalg.norm(probe) + 1e-9))
                cos.setdefault((q["type"], stream), []).append(c)
    mean = {k: float(np.mean(v)) for k, v in cos.items()}
    assert mean[("v", "visual")] > 0.5 and mean[("vt", "visual")] > 0.5, mean
    assert mean[("t", "subtitle")] > 0.5 and mean[("vt", "subtitle")] > 0.5, mean
    assert abs(mean[("v", "subtitle")]) < 0.25 and abs(mean[("t", "visual")]) < 0.25, mean
    assert edges > 0 and len(lengths) > 10, "moments at the edges and varied video lengths are expected"


def test_vcmr_query_tokens_tell_the_query_type() -> None:
    """A linear probe of a query's mean token predicts v / t / vt on held-out videos: the
    tokens carry which stream holds the moment, so query-aware fusion has something to learn."""
    from sklearn.linear_model import LogisticRegression

    data = generate_vcmr(SynthVcmrConfig(splits={"train": 150, "test": 60}, seed=3))

    def xy(split):
        x, y = [], []
        for v in data.videos[split]:
            start = 0
            for q in v.meta["queries"]:
                tok = v.arrays["query_tokens"][start: start + q["n_tokens"]]
                start += q["n_tokens"]
                x.append(tok.mean(axis=0))
                y.append(q["type"])
        return np.stack(x), np.array(y)

    probe = LogisticRegression(max_iter=2000).fit(*xy("train"))
    x, y = xy("test")
    accuracy = float((probe.predict(x) == y).mean())
    print(f"\nlinear probe of the query type: accuracy {accuracy:.3f} on {len(y)} held-out queries (chance 0.33)")
    assert accuracy > 0.9


def test_vcmr_moment_clips_are_closer_to_their_query_than_other_clips() -> None:
    """In the named stream's latent space, the moment's clips score higher against the
    query than the video's other clips (ROC AUC over clips, averaged over queries)."""
    from sklearn.metrics import roc_auc_score

    cfg = SynthVcmrConfig(splits={"train": 60}, seed=4)
    data = generate_vcmr(cfg)
    aucs = []
    for v in data.videos["train"]:
        n = v.meta["n_clips"]
        queries, pinv = _query_latents(data, v)
        for q, _, m in queries:
            inside = np.zeros(n, bool)
            clips = moment_clips(q["ts"], n, cfg.clip_len)
            inside[clips.start:clips.stop] = True
            for stream, m_hat in m.items():
                ok = np.ones(n, bool) if stream == "visual" else v.arrays["sub_mask"].astype(bool)
                if not (ok & inside).any() or not (ok & ~inside).any():
                    continue
                lat = (v.arrays[stream][ok] - data.offsets[stream]) @ pinv[stream].T
                scores = lat @ m_hat / (np.linalg.norm(lat, axis=1) * np.linalg.norm(m_hat) + 1e-9)
                aucs.append(roc_auc_score(inside[ok], scores))
    print(f"\nmoment clips vs other clips: mean AUC {np.mean(aucs):.3f} over {len(aucs)} (query, stream) pairs")
    assert np.mean(aucs) > 0.85


def test_vcmr_cross_stream_distractors_put_a_querys_content_elsewhere() -> None:
    """With cross_stream_distractors = 1 every query's latent also lies in the *other* stream
    of some other video; with 0 it does not."""
    def best_elsewhere(p):
        cfg = SynthVcmrConfig(splits={"train": 30}, distractors_per_video=0, cross_stream_distractors=p, seed=5)
        data = generate_vcmr(cfg)
        pinv = {s: np.linalg.pinv(w) for s, w in data.maps.items()}
        lat = {(i, s): (v.arrays[s] - data.offsets[s]) @ pinv[s].T for i, v in enumerate(data.videos["train"])
               for s in ("visual", "subtitle")}
        best = []
        for i, v in enumerate(data.videos["train"]):
            for j in range(len(v.meta["queries"])):
                for stream in ("visual", "subtitle"):
                    z = v.query_latents[stream][j]
                    if not z.any():
                        continue
                    other = "subtitle" if stream == "visual" else "visual"
                    sims = [float((lat[(k, other)] @ z / (np.linalg.norm(lat[(k, other)], axis=1) * np.linalg.norm(z)
                                                         + 1e-9)).max())
                            for k in range(len(data.videos["train"])) if k != i]
                    best.append(max(sims))
        return float(np.mean(best))

    with_d, without = best_elsewhere(1.0), best_elsewhere(0.0)
    print(f"\nbest cosine of a query's latent in the other stream of another video: {with_d:.3f} vs {without:.3f}")
    assert with_d > without + 0.1  # the max over a corpus of clips is high by chance too (~0.66)


@pytest.mark.skipif(not TVR_VAL.is_file(), reason="needs ../shared/data/tvr/tvr_val_release.jsonl")
def test_vcmr_durations_from_real_tvr() -> None:
    real = {}
    with open(TVR_VAL) as f:
        for line in f:
            d = json.loads(line)
            real.setdefault(d["vid_name"], (d["duration"], []))[1].append((d["ts"], d["type"]))
    durations = {dur for dur, _ in real.values()}
    data = generate_vcmr(SynthVcmrConfig(splits={"train": 15}, durations_from=str(TVR_VAL)))
    for v in data.videos["train"]:
        assert v.meta["duration"] in durations
        for q in v.meta["queries"]:
            assert 0 <= q["ts"][0] <= q["ts"][1] <= v.meta["duration"]
    with pytest.raises(FileNotFoundError, match="durations_from"):
        generate_vcmr(SynthVcmrConfig(durations_from="/nonexistent/tvr.jsonl"))
