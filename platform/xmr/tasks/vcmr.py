"""Video corpus moment retrieval (QACLN; the TVR benchmark): VR / SVMR / VCMR evaluation
over a corpus (METHODS.md §5 inference), the served video corpus, and its search.

Videos are encoded once; each query is encoded, scored against every video (φ), its top-N
videos re-ranked by span scores P_start(i)·P_end(j)·video score (i ≤ j inclusive clips, a
length limit) with the vectorised ``rank_moments``; the top 100 (video, t_s, t_e) are kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from xmr.data.reader import loader_for
from xmr.distributed import all_gather_objects, world_info
from xmr.metrics.vcmr import clips_to_moment, rank_moments, svmr_recall, vcmr_recall, vr_recall
from xmr.models.qacln import bucket_corpus, pad_encoding
from xmr.progress_line import units_in, with_progress
from xmr.tasks.base import TaskFamily


NMS_CANDIDATES = 300  # moments kept per query before non-maximum suppression leaves 100


class VcmrFamily(TaskFamily):
    name = "vcmr"
    dataset_task = "vcmr"
    main_metric = "vcmr_0.7_r10"
    route = "moments"
    title = "VCMR"
    train_unit = "query"
    indexed_units = False  # a training unit is a query; its index is its video's
    data_fields = ("data.max_clips", "data.max_query_tokens")
    output_files = ("predictions.json",)

    def score_share(self, model, cfg, manifest, split: str, detailed: bool = False,
                    nms: float | None = None) -> dict[str, np.ndarray]:
        """This rank's videos (a contiguous share of the corpus) encoded and kept here; every
        query ranked against them, the ranks agreeing on each query's global top videos
        (``CorpusShare``); ``score`` merges the ranks' candidates per query. A rank holds
        1/world of the corpus's clip encodings, so evaluation memory falls with the ranks."""
        rank, world = world_info()
        was_training = model.training
        model.eval()
        try:
            info = manifest.splits[split]
            videos = with_progress(loader_for(cfg, split, unit="video", rank=rank, world_size=world, manifest=manifest),
                                   f"{split}: encoding videos", -(-info.num_samples // world), "videos", units_in,
                                   speak=rank == 0)
            corpus, meta = encode_corpus(model, videos)
            share = CorpusShare.gathered(meta)
            queries = with_progress(loader_for(cfg, split, unit="query", manifest=manifest),
                                    f"{split}: ranking queries", info.num_queries or 0, "queries", units_in,
                                    speak=rank == 0)
            out = rank_query_batches(model, corpus, meta, queries, manifest.clip_len or 1.0, cfg.model.top_videos,
                                     cfg.model.max_moment_clips, detailed=detailed,
                                     candidates=NMS_CANDIDATES if nms is not None else 100, share=share)
            if detailed and rank == 0:  # the whole corpus, for the prediction file's video2idx
                out["corpus"] = {"vid_name": share.names, "video_index": share.video_index}
            return out
        finally:
            model.train(was_training)

    @staticmethod
    def _merged(shares: list) -> dict[str, np.ndarray]:
        """Rank 0's share: the ranks' candidates already merged per query batch
        (``rank_query_batches``); the other ranks' shares are empty."""
        return merge_ranked([{k: v for k, v in s.items() if k != "corpus"} for s in shares])

    def score(self, shares: list, cfg) -> dict[str, float]:
        return score_vcmr(self._merged(shares))

    def outputs(self, shares: list, cfg, manifest, nms: float | None = None) -> tuple[dict, dict[str, str]]:
        """Metrics (overall and per query type v / t / vt), and ``predictions.json`` in the
        public TVR evaluation layout (``video2idx``; ``VR``, ``SVMR``, ``VCMR``, at most 100
        per query, ranked), optionally after non-maximum suppression of overlapping spans."""
        from xmr.metrics.tvr import RankedPredictions, export_predictions
        from xmr.metrics.vcmr import nms_spans

        r = self._merged(shares)
        corpus = shares[0]["corpus"]
        video2idx = dict(zip(corpus["vid_name"], corpus["video_index"]))
        v, spans, score = r["vcmr_video"], r["vcmr_spans"], r["vcmr_scores"]
        if nms is not None:
            v, t_s, t_e, score = nms_spans(v, spans[..., 0], spans[..., 1], score, nms, keep=100)
            spans = np.stack([t_s, t_e], axis=-1)
        v, spans, score = v[:, :100], spans[:, :100], score[:, :100]
        r = {**r, "vcmr_video": v, "vcmr_spans": spans, "vcmr_scores": score}
        metrics: dict[str, Any] = score_vcmr(r)
        by_type = {}
        for t in ("v", "t", "vt"):
            keep = r["type"] == t
            if keep.any():
                by_type[t] = {"queries": int(keep.sum()), **score_vcmr({k: a[keep] for k, a in r.items()})}
        metrics["by_type"] = by_type
        gt = r["gt_video"]
        sub = export_predictions(
            r["desc_id"].tolist(), r["desc"].tolist(), video2idx, corpus["vid_name"],
            vcmr=RankedPredictions(v, spans[..., 0], spans[..., 1], score),
            svmr=RankedPredictions(np.repeat(gt[:, None], r["svmr_spans"].shape[1], axis=1), r["svmr_spans"][..., 0],
                                   r["svmr_spans"][..., 1], r["svmr_scores"]),
            vr=RankedPredictions.videos_only(r["vr"], r["vr_scores"]))
        return metrics, {"predictions.json": json.dumps(sub)}

    def build_gallery(self, model, cfg, manifest, root: str, split: str, endpoint_url: str | None = None,
                      approx: str = "auto", ann=None, part: tuple[int, int] = (0, 1)) -> "VideoCorpus":
        """The split's videos encoded in order; ``part`` (i, n): the i-th of n contiguous parts."""
        from xmr.data.reader import make_loader

        loader = make_loader(root, split, local_batch_size=64, shuffle=False, unit="video", manifest=manifest,
                             max_clips=cfg.data.max_clips, endpoint_url=endpoint_url, rank=part[0],
                             world_size=part[1])
        enc, meta = encode_corpus(model.eval(), with_progress(loader, f"index {split}: encoding",
                                                              loader.local_samples, "videos", units_in))
        return VideoCorpus({k: v.cpu() for k, v in enc.items()}, [str(n) for n in meta["vid_name"]], meta["duration"])

    def save_gallery(self, g: "VideoCorpus", out: Path) -> None:
        from safetensors.numpy import save_file

        save_file({f"enc_{k}": v.contiguous().numpy() for k, v in g.enc.items()}, str(out / "embeddings.safetensors"))
        (out / "items.json").write_text(json.dumps({"ids": g.ids, "durations": g.durations.tolist()}))

    def load_gallery(self, path: Path, arrays: dict, items: dict) -> "VideoCorpus":
        enc = {k[len("enc_"):]: torch.from_numpy(v) for k, v in arrays.items()}
        return VideoCorpus(enc, items["ids"], torch.tensor(items["durations"], dtype=torch.float32))

    def moments(self, model, corpus: "VideoCorpus", cfg, clip_len: float, items: list[tuple],
                with_videos: bool = False):
        return moments_batch(model, corpus, cfg, clip_len, items, with_videos)

    def svmr(self, model, corpus: "VideoCorpus", cfg, clip_len: float, tokens: np.ndarray, position: int, k: int):
        return svmr_one(model, corpus, cfg, clip_len, tokens, position, k)


@dataclass
class VideoCorpus:
    """Clip encodings of every video of a split; ids are video names."""

    enc: dict[str, torch.Tensor]
    ids: list[str]
    durations: torch.Tensor
    buckets: list = field(default_factory=list)  # length-grouped views for search, built once

    def __post_init__(self) -> None:
        if not self.buckets:
            self.buckets = bucket_corpus(self.enc)

    @property
    def size(self) -> int:
        return len(self.ids)


@torch.no_grad()
def encode_corpus(model, video_batches: Iterable[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All videos' clip encodings, padded to one clip count, plus their ids and durations."""
    encs, ids, durations, names = [], [], [], []
    for batch in video_batches:
        if len(batch["index"]) == 0:
            continue
        device = next(model.parameters()).device
        encs.append(model.encode_videos(*(batch[k].to(device) for k in ("visual", "subtitle", "sub_mask", "clip_mask"))))
        ids.append(batch["video_index"])
        durations.append(batch["duration"])
        names.extend(batch.get("vid_name", batch["key"]))
    if not encs:
        raise ValueError("encode_corpus: the corpus split yielded no videos")
    n = max(e["h_v"].shape[1] for e in encs)
    padded = [pad_encoding(e, n) for e in encs]
    corpus = {k: torch.cat([p[k] for p in padded]) for k in padded[0]}
    meta = {"video_index": torch.cat(ids), "duration": torch.cat(durations), "vid_name": names}
    return corpus, meta


@torch.no_grad()
def rank_queries(model, q: torch.Tensor, corpus: dict[str, torch.Tensor], top_videos: int, max_len: int,
                 top_k: int = 100, buckets: list | None = None):
    """(video scores [Q, V], ranked moments) for a chunk of encoded queries; ``buckets``
    (``bucket_corpus(corpus)``) saves regrouping the corpus on every call."""
    scores, top, start, end = model.search(q, corpus, top_videos, buckets=buckets)
    moments = rank_moments(scores, start.softmax(-1), end.softmax(-1), corpus["clip_mask"], top, max_len, top_k)
    return scores, moments


@dataclass
class CorpusShare:
    """Where this rank's videos sit in a corpus sharded by video across the ranks: a
    contiguous share (the evaluation read plan's), so a video's global position is its
    rank's ``offset`` plus its position there, the order one process would give it."""

    offset: int  # global position of this rank's first video
    video_index: list[int]  # every video's dataset index, in global order
    names: list[str]  # every video's name, in global order
    duration: torch.Tensor  # [videos] every video's duration, in global order

    @classmethod
    def gathered(cls, meta: dict[str, Any]) -> "CorpusShare":
        """From every rank's ``encode_corpus`` meta (a collective: every rank calls it)."""
        rank, _ = world_info()
        parts = all_gather_objects((meta["video_index"].tolist(), [str(n) for n in meta["vid_name"]],
                                    meta["duration"].cpu()))
        return cls(offset=sum(len(p[0]) for p in parts[:rank]), video_index=[i for p in parts for i in p[0]],
                   names=[n for p in parts for n in p[1]], duration=torch.cat([p[2] for p in parts]))

    @classmethod
    def whole(cls, meta: dict[str, Any]) -> "CorpusShare":
        return cls(0, meta["video_index"].tolist(), [str(n) for n in meta["vid_name"]], meta["duration"].cpu())


def global_top(values: torch.Tensor, positions: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] global positions of the n best (value, then lower position) of every rank's
    candidates ([B, M] each, gathered): the videos one process would rank within."""
    _, world = world_info()
    if world > 1:
        parts = all_gather_objects((values.cpu(), positions.cpu()))
        values, positions = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
    by_pos = positions.argsort(dim=1, stable=True)
    by_value = values.gather(1, by_pos).argsort(dim=1, descending=True, stable=True)
    return positions.gather(1, by_pos.gather(1, by_value))[:, :n]


@torch.no_grad()
def rank_query_batches(model, corpus: dict[str, torch.Tensor], meta: dict[str, Any],
                       query_batches: Iterable[dict[str, Any]], clip_len: float, top_videos: int = 100,
                       max_len: int = 16, detailed: bool = False, candidates: int = 100,
                       share: CorpusShare | None = None) -> dict[str, np.ndarray]:
    """Per-query predictions against the videos in ``corpus`` (this rank's share of the
    corpus, or all of it), merged across the ranks batch by batch and returned on rank 0
    (other ranks return nothing): the top 100 videos (VR) with their scores, the top
    ``candidates`` VCMR (video, t_s, t_e, score) within the query's global top
    ``top_videos`` videos, the SVMR top span in the query's own video, and the ground truth;
    videos by global position. Across ranks the query batches must be the same (every rank
    reads every query): each batch's global top videos are agreed by one all-gather.
    Exactness: a rank's top ``top_videos`` holds each of its videos in the global top
    (fewer videos outrank them), so masking the others out leaves exactly the candidates one
    process would decode; ``merge_ranked`` keeps the best across ranks. ``detailed`` adds
    what a prediction file needs: the SVMR top 100, the queries' desc_id, type and text."""
    share = share or CorpusShare.whole(meta)
    local = {int(v): i for i, v in enumerate(meta["video_index"].tolist())}
    position = {v: i for i, v in enumerate(share.video_index)}
    parts: dict[str, list[np.ndarray]] = {}
    rank, _ = world_info()
    device = corpus["clip_mask"].device
    buckets = bucket_corpus(corpus)
    durations = meta["duration"].cpu()
    svmr_k = 100 if detailed else 1
    for batch in query_batches:
        if len(batch["index"]) == 0:
            continue
        q = model.encode_queries(batch["q_tokens"].to(device), batch["q_mask"].to(device))
        agreed: dict[str, torch.Tensor] = {}

        def narrow(scores: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
            """This rank's top videos cut to the last one in the global top N (spans are
            decoded for those only); ``keep`` marks the ones inside it."""
            eligible = global_top(scores.gather(1, top).float(), top + share.offset, top_videos)
            keep = ((top + share.offset).unsqueeze(-1) == eligible.to(top.device).unsqueeze(1)).any(-1)  # [B, N]
            width = max(1, int((keep * torch.arange(1, top.shape[1] + 1, device=top.device)).amax()))
            agreed["keep"] = keep[:, :width]
            return top[:, :width]

        scores, top, start, end = model.search(q, corpus, top_videos, buckets=buckets, narrow=narrow)
        mask = corpus["clip_mask"][top] & agreed["keep"].unsqueeze(-1)
        moments = rank_moments(scores, start.softmax(-1), end.softmax(-1), mask, top, max_len, candidates)
        scores, moments = scores.float().cpu(), type(moments)(*(t.cpu() for t in moments))
        t_s, t_e = clips_to_moment(moments.st.numpy(), moments.ed.numpy(), clip_len,
                                   durations[moments.video.clamp(min=0)].numpy())
        try:
            gt = [position[int(v)] for v in batch["video_index"]]
        except KeyError as exc:
            raise ValueError(f"evaluate_vcmr: query on video index {exc} that is not in the corpus split") from None
        svmr_spans, svmr_scores, here = _svmr(model, q, corpus, batch["video_index"].tolist(), local,
                                              svmr_k, max_len, clip_len, durations)
        vr = scores.topk(min(100, scores.shape[1]), dim=1)
        video = moments.video.numpy()
        pad = candidates - video.shape[1]  # fewer spans than candidates in these videos: pad every batch alike
        mine = {"index": batch["index"].numpy(), "vr": vr.indices.numpy() + share.offset,
                "vr_scores": vr.values.numpy(),
                "vcmr_video": np.pad(np.where(video >= 0, video + share.offset, -1), ((0, 0), (0, pad)),
                                     constant_values=-1),
                "vcmr_spans": np.pad(np.stack([t_s, t_e], axis=-1), ((0, 0), (0, pad), (0, 0))),
                "vcmr_scores": np.pad(moments.score.numpy(), ((0, 0), (0, pad)), constant_values=-np.inf),
                "svmr_spans": svmr_spans, "svmr_scores": svmr_scores, "svmr_here": here, "gt_video": np.array(gt),
                "gt_spans": batch["ts"].numpy()}
        if detailed:
            mine.update(desc_id=batch["desc_id"].numpy(), type=np.array(batch["type"], dtype=object),
                        desc=np.array(batch["desc"], dtype=object))
        # Merged batch by batch, kept by rank 0 alone: a rank holds one copy of the split's
        # candidates at most (not one per rank), whatever the number of ranks.
        merged = merge_ranked(all_gather_objects(mine))
        if rank == 0:
            for k, v in merged.items():
                parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _svmr(model, q: torch.Tensor, corpus: dict[str, torch.Tensor], gt_videos: list[int], local: dict[int, int],
          svmr_k: int, max_len: int, clip_len: float, durations: torch.Tensor):
    """SVMR for a batch: the same decoding as VCMR restricted to each query's ground-truth
    video, for the queries whose video is in this rank's share (``here``); the others keep
    NaN spans and -inf scores, for ``merge_ranked`` to fill from the rank that holds it."""
    b, device = len(gt_videos), corpus["clip_mask"].device
    spans, scores = np.full((b, svmr_k, 2), np.nan), np.full((b, svmr_k), -np.inf)
    rows = [i for i, v in enumerate(gt_videos) if int(v) in local]
    if rows:
        only = torch.tensor([[local[int(gt_videos[i])]] for i in rows], device=device)
        s_start, s_end = model.span_logits(q[rows], corpus, only)
        single = rank_moments(torch.ones(len(rows), corpus["clip_mask"].shape[0], device=device),
                              s_start.softmax(-1), s_end.softmax(-1), corpus["clip_mask"], only, max_len,
                              top_k=svmr_k)
        s_s, s_e = clips_to_moment(single.st.cpu().numpy(), single.ed.cpu().numpy(), clip_len,
                                   durations[only.cpu()].numpy())
        w = s_s.shape[1]  # fewer than asked when the video has fewer spans
        spans[rows, :w] = np.stack([s_s, s_e], axis=-1)
        scores[rows, :w] = single.score.cpu().numpy()
    here = np.zeros(b, dtype=bool)
    here[rows] = True
    return spans, scores, here


def _best(keys: tuple[np.ndarray, ...], columns: list[np.ndarray], n: int) -> list[np.ndarray]:
    """Per row, the ``n`` best columns by ``keys`` (np.lexsort: the last key first)."""
    order = np.lexsort(keys, axis=-1)[:, :n]
    return [np.take_along_axis(c, order if c.ndim == 2 else order[..., None], axis=1) for c in columns]


def merge_ranked(shares: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One ranking per query from every rank's ``rank_query_batches`` over all queries: VR
    the best 100 of the ranks' videos (score, then position), VCMR the best ``candidates``
    of their moments (score, then video position, start, end: the order one process gives
    equal scores up to the video's rank within the query's top videos, which equal scores
    of different videos could only swap), SVMR from the rank holding the query's video.
    In query order (``index``)."""
    shares = [s for s in shares if len(s.get("gt_video", ()))]
    if not shares:
        raise ValueError("evaluate_vcmr: the query split yielded no queries")
    first = shares[0]
    if len(shares) == 1:
        r = dict(first)
    else:
        cat = {k: np.concatenate([s[k] for s in shares], axis=1)
               for k in ("vr", "vr_scores", "vcmr_video", "vcmr_spans", "vcmr_scores")}
        r = {k: v for k, v in first.items() if k not in cat}
        r["vr"], r["vr_scores"] = _best((cat["vr"], -cat["vr_scores"]), [cat["vr"], cat["vr_scores"]],
                                        min(100, cat["vr"].shape[1]))
        n = first["vcmr_video"].shape[1]
        sc = np.where(np.isfinite(cat["vcmr_scores"]), -cat["vcmr_scores"], np.inf)
        r["vcmr_video"], r["vcmr_spans"], r["vcmr_scores"] = _best(
            (cat["vcmr_spans"][..., 1], cat["vcmr_spans"][..., 0], cat["vcmr_video"], sc),
            [cat["vcmr_video"], cat["vcmr_spans"], cat["vcmr_scores"]], n)
        owner = np.argmax(np.stack([s["svmr_here"] for s in shares]), axis=0)
        for k in ("svmr_spans", "svmr_scores"):
            stacked = np.stack([s[k] for s in shares])
            r[k] = stacked[owner, np.arange(len(owner))]
    order = np.argsort(r["index"], kind="stable")
    return {k: v[order] for k, v in r.items() if k != "svmr_here"}


def score_vcmr(ranked: dict[str, np.ndarray]) -> dict[str, float]:
    """Recall metrics with flat keys: ``vr_r{k}``, ``svmr_{iou}_r1``, ``vcmr_{iou}_r{k}`` (fractions)."""
    if len(ranked["gt_video"]) == 0:
        raise ValueError("evaluate_vcmr: the query split yielded no queries")
    gt_v, gt_s = ranked["gt_video"], ranked["gt_spans"]
    out = {f"vr_{k}": v for k, v in vr_recall(ranked["vr"], gt_v, ks=(1, 10, 100)).items()}
    svmr = svmr_recall(ranked["svmr_spans"], gt_s, ks=(1,))
    out.update({f"svmr_{k.replace('-', '_')}": v for k, v in svmr.items()})
    vcmr = vcmr_recall(ranked["vcmr_video"], ranked["vcmr_spans"], gt_v, gt_s, ks=(1, 10, 100))
    out.update({f"vcmr_{k.replace('-', '_')}": v for k, v in vcmr.items()})
    return out


@torch.no_grad()
def evaluate_vcmr(model, video_batches: Iterable[dict[str, Any]], query_batches: Iterable[dict[str, Any]],
                  clip_len: float, top_videos: int = 100, max_len: int = 16) -> dict[str, float]:
    """Single-process VR / SVMR / VCMR recalls (see ``score_vcmr`` for the keys)."""
    was_training = model.training
    model.eval()
    try:
        corpus, meta = encode_corpus(model, video_batches)
        ranked = rank_query_batches(model, corpus, meta, query_batches, clip_len, top_videos, max_len)
    finally:
        model.train(was_training)
    return score_vcmr(merge_ranked([ranked]))


# --------------------------------------------------------------------------- search


def _pad_tokens(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(a.shape[0] for a in arrays)
    tokens = torch.zeros(len(arrays), t, arrays[0].shape[1])
    mask = torch.zeros(len(arrays), t, dtype=torch.bool)
    for i, a in enumerate(arrays):
        tokens[i, : a.shape[0]] = torch.from_numpy(a)
        mask[i, : a.shape[0]] = True
    return tokens, mask


def _moments(corpus: VideoCorpus, video: torch.Tensor, st_: torch.Tensor, ed: torch.Tensor, score: torch.Tensor,
             clip_len: float) -> list[list[dict[str, Any]]]:
    """Result rows for [B, k] decoded spans, converted to seconds in one vectorised pass
    (padding entries, video -1, dropped)."""
    v = video.numpy()
    t_s, t_e = clips_to_moment(st_.numpy(), ed.numpy(), clip_len, corpus.durations.numpy()[np.maximum(v, 0)])
    t_s, t_e = np.round(t_s, 3).tolist(), np.round(t_e, 3).tolist()
    ids, rows = corpus.ids, []
    for vr, ar, br, sr in zip(v.tolist(), t_s, t_e, score.tolist()):
        rows.append([{"video": ids[i], "start": a, "end": b, "score": c}
                     for i, a, b, c in zip(vr, ar, br, sr) if i >= 0])
    return rows


@torch.inference_mode()
def moments_batch(model, corpus: VideoCorpus, cfg, clip_len: float, items: list[tuple],
                  with_videos: bool = False) -> list[Any]:
    """items: (token array [T, d], k). VCMR over the whole corpus in one batch. With
    ``with_videos`` (a shard of a sharded corpus) each answer is ``{"results": moments,
    "videos": [[id, score], ...]}``, the videos its moments were ranked within (this
    corpus's top N, best first): what ``xmr.serve.shards.merge_moments`` needs."""
    m = cfg.model
    tokens, mask = _pad_tokens([tok for tok, _ in items])
    q = model.encode_queries(tokens, mask)
    k_max = max(k for _, k in items)
    scores, top, start, end = model.search(q, corpus.enc, min(m.top_videos, corpus.size), buckets=corpus.buckets)
    ranked = rank_moments(scores, start.softmax(-1), end.softmax(-1), corpus.enc["clip_mask"], top,
                          m.max_moment_clips, k_max)
    rows = [row[:k] for row, (_, k) in zip(_moments(corpus, ranked.video, ranked.st, ranked.ed, ranked.score,
                                                    clip_len), items)]
    if not with_videos:
        return rows
    picked = scores.gather(1, top).tolist()
    return [{"results": row, "videos": [[corpus.ids[j], s] for j, s in zip(t, sc)]}
            for row, t, sc in zip(rows, top.tolist(), picked)]


@torch.inference_mode()
def svmr_one(model, corpus: VideoCorpus, cfg, clip_len: float, tokens: np.ndarray, position: int,
             k: int) -> list[dict[str, Any]]:
    """Top-k spans within one video (the same span decoding, restricted to it)."""
    t, mask = _pad_tokens([tokens])
    q = model.encode_queries(t, mask)
    only = torch.tensor([[position]])
    start, end = model.span_logits(q, corpus.enc, only)
    ranked = rank_moments(torch.ones(1, corpus.size), start.softmax(-1), end.softmax(-1), corpus.enc["clip_mask"],
                          only, cfg.model.max_moment_clips, k)
    return _moments(corpus, ranked.video, ranked.st, ranked.ed, ranked.score, clip_len)[0]
