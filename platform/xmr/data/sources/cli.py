"""``xmr data synth|convert|avdigits``: the dataset sources as subcommands.

``register_sources(data_subparsers)`` is called by ``xmr.data.cli`` with the ``data``
command's subparsers. Each handler builds a dataset, then prints where it wrote and a
one-line summary; heavy imports happen inside the handlers so ``xmr --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable


def _kv(items: list[str], what: str) -> dict[str, str]:
    """Parse ``NAME=VALUE`` items (also comma-separated) into a dict, naming a bad item."""
    out: dict[str, str] = {}
    for item in items:
        for part in filter(None, item.split(",")):
            if "=" not in part:
                raise SystemExit(f"xmr data: {what}: expected NAME=VALUE, got {part!r}")
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _sizes(items: list[str] | None, default: dict[str, int]) -> dict[str, int]:
    if not items:
        return dict(default)
    try:
        return {k: int(v) for k, v in _kv(items, "--splits").items()}
    except ValueError as e:
        raise SystemExit(f"xmr data: --splits: sizes must be integers ({e})") from e


def _summary(m: Any, out: str) -> None:
    splits = ", ".join(f"{n} {s.num_samples}" + (f" ({s.num_queries} queries)" if s.num_queries is not None else "")
                       + f" in {len(s.shards)} shard(s)" for n, s in m.splits.items())
    shapes = ", ".join(f"{r}={m.modalities[r].name}{m.modalities[r].shape}" for r in m.modalities)
    print(f"wrote {out}/manifest.json")
    print(f"{m.name} ({m.task}): {splits}; {shapes}; labels {m.labels.kind} {m.labels.num_classes}")


def _reported(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print input errors (they name the file/key/field) as one line with exit code 2."""
    def run(a: argparse.Namespace) -> int:
        try:
            return fn(a)
        except (OSError, ValueError, RuntimeError) as e:
            print(f"xmr data {getattr(a, 'data_command', '')}: error: {e}", file=sys.stderr)
            return 2
    return run


def _common(p: argparse.ArgumentParser, shard_default: int) -> None:
    p.add_argument("--out", required=True, help="dataset root: local directory or s3://bucket/prefix")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    p.add_argument("--samples-per-shard", type=int, default=shard_default, help="samples (videos for vcmr) per tar shard")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (e.g. a local moto/MinIO server)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _writer_kw(a: argparse.Namespace) -> dict:
    return {"samples_per_shard": a.samples_per_shard, "overwrite": a.overwrite,
            "endpoint_url": a.endpoint_url, "progress": not a.quiet}


def _synth_category(a: argparse.Namespace) -> int:
    from xmr.data.sources.synth_category import SynthCategoryConfig, write_synth_category

    cfg = SynthCategoryConfig(n_classes=a.n_classes, splits=_sizes(a.splits, SynthCategoryConfig().splits),
                              dim_a=a.dim_a, dim_b=a.dim_b, seq_len_a=a.seq_len_a, seq_len_b=a.seq_len_b,
                              latent_dim=a.latent_dim, class_scale=a.class_scale, instance_scale=a.instance_scale, noise_a=a.noise_a,
                              noise_b=a.noise_b, offset_scale=a.offset_scale, hierarchy=a.hierarchy,
                              multi_label=a.multi_label, seed=a.seed, dtype=a.dtype)
    _summary(write_synth_category(a.out, cfg, name=a.name, **_writer_kw(a)), a.out)
    return 0


def _synth_vcmr(a: argparse.Namespace) -> int:
    from xmr.data.sources.synth_vcmr import SynthVcmrConfig, write_synth_vcmr

    if (a.queries_from is None) != (a.text_encoder is None):
        raise ValueError("--queries-from and --text-encoder go together: real annotations' text encoded by a real "
                         "encoder (e.g. --queries-from tvr_val_release.jsonl --text-encoder minilm)")
    if a.queries_from is not None:
        from xmr.data.sources.text_vcmr import TextVcmrConfig, write_text_vcmr

        base = TextVcmrConfig()
        cfg = TextVcmrConfig(queries_from=a.queries_from, text_encoder=a.text_encoder,
                             splits=_sizes(a.splits, base.splits), dim_visual=a.dim_visual,
                             dim_subtitle=a.dim_subtitle, max_queries=a.max_queries or 0,
                             signal=a.signal, noise=a.noise, sub_missing=a.sub_missing, seed=a.seed, dtype=a.dtype)
        name = a.name if a.name != "synth-vcmr" else "text-vcmr"
        _summary(write_text_vcmr(a.out, cfg, name=name, **_writer_kw(a)), a.out)
        return 0

    cfg = SynthVcmrConfig(splits=_sizes(a.splits, SynthVcmrConfig().splits), dim_visual=a.dim_visual,
                          dim_subtitle=a.dim_subtitle, dim_query=a.dim_query, latent_dim=a.latent_dim,
                          min_duration=a.min_duration, max_duration=a.max_duration,
                          max_queries=a.max_queries if a.max_queries is not None else 4,
                          sub_missing=a.sub_missing, signal=a.signal, noise=a.noise,
                          durations_from=a.durations_from, single_stream_share=a.single_stream_share,
                          cross_stream_distractors=a.cross_stream_distractors,
                          distractors_per_video=a.distractors_per_video, seed=a.seed, dtype=a.dtype)
    _summary(write_synth_vcmr(a.out, cfg, name=a.name, **_writer_kw(a)), a.out)
    return 0


def _synth_tvr_release(a: argparse.Namespace) -> int:
    from xmr.data.sources.synth_vcmr import SynthVcmrConfig
    from xmr.data.sources.tvr_release import TvrReleaseConfig, convert_command, summary, write_tvr_release

    base = TvrReleaseConfig()
    cfg = TvrReleaseConfig(splits=_sizes(a.splits, base.splits), annotations=a.annotations, video2dur=a.video2dur,
                           dim_visual=a.dim_visual, dim_subtitle=a.dim_subtitle, dim_query=a.dim_query,
                           max_tokens=a.max_tokens, seed=a.seed,
                           synth=SynthVcmrConfig(**{**base.synth.__dict__, "signal": a.signal, "noise": a.noise,
                                                    "sub_missing": a.sub_missing}))
    rep = write_tvr_release(a.out, cfg, progress=not a.quiet, overwrite=a.overwrite)
    print(f"wrote {a.out}: {summary(rep)}")
    print(f"convert with: {convert_command(a.out, list(cfg.splits))}")
    return 0


def _convert_tvr(a: argparse.Namespace) -> int:
    import resource
    import time

    from xmr.data.sources.tvr import convert_tvr

    t0 = time.perf_counter()
    m, rep = convert_tvr(a.out, splits=_kv(a.splits, "--splits"), video_feats=a.video_feats,
                         sub_feats=a.sub_feats, query_feats=a.query_feats, video2dur=a.video2dur,
                         max_clips=a.max_clips, max_query_tokens=a.max_query_tokens, skip_missing=a.skip_missing,
                         name=a.name, dtype=a.dtype, **_writer_kw(a))
    _summary(m, a.out)
    print(f"videos without query {rep.videos_without_query}; clips truncated {rep.clips_truncated}; "
          f"clip-count mismatches {rep.clip_count_mismatch}; query tokens truncated {rep.tokens_truncated}; "
          f"ts clamped {rep.ts_clamped}; skipped videos {len(rep.skipped_videos)}, "
          f"queries {len(rep.skipped_queries)}")
    print(f"converted in {time.perf_counter() - t0:.0f} s, peak memory "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


def _convert_features(a: argparse.Namespace) -> int:
    from xmr.data.sources.features import convert_features

    m, rep = convert_features(a.file, a.out, keys=_kv(a.keys, "--keys"), val_fraction=a.val_fraction,
                              seed=a.seed, name=a.name, a_name=a.a_name, b_name=a.b_name, dtype=a.dtype,
                              **_writer_kw(a))
    _summary(m, a.out)
    base = f", {rep.label_base}-based" if rep.label_base is not None else ""
    print(f"arrays {rep.keys}; labels {rep.label_format}{base}, {rep.num_classes} classes")
    return 0


def _avdigits(a: argparse.Namespace) -> int:
    from xmr.data.sources.avdigits import AvdigitsConfig, build_avdigits

    cfg = AvdigitsConfig(per_class=a.per_class or None, limit=a.limit, seed=a.seed)
    _summary(build_avdigits(a.out, cfg, name=a.name, **_writer_kw(a)), a.out)
    return 0


def _add_synth(sub: Any) -> None:
    synth = sub.add_parser("synth", help="synthetic datasets with a planted ground truth")
    kinds = synth.add_subparsers(dest="synth_kind", required=True, metavar="KIND")
    c = kinds.add_parser("category", help="paired a/b features with class (and instance) structure")
    _common(c, 256)
    c.add_argument("--name", default="synth-category", help="dataset name recorded in the manifest")
    c.add_argument("--splits", nargs="*", metavar="SPLIT=N", help="sizes (default train=400 val=100 test=100)")
    c.add_argument("--n-classes", type=int, default=10, help="number of (fine) classes")
    c.add_argument("--dim-a", type=int, default=32, help="feature dimension of modality a")
    c.add_argument("--dim-b", type=int, default=48, help="feature dimension of modality b")
    c.add_argument("--seq-len-a", type=int, default=None, help="make modality a a [T, D] token sequence")
    c.add_argument("--seq-len-b", type=int, default=None, help="make modality b a [T, D] token sequence")
    c.add_argument("--latent-dim", type=int, default=16, help="dimension of the shared latent both modalities are made from")
    c.add_argument("--class-scale", type=float, default=0.6, help="spread of class means")
    c.add_argument("--instance-scale", type=float, default=0.7, help="per-pair latent shared by a and b")
    c.add_argument("--noise-a", type=float, default=0.8, help="feature noise of modality a")
    c.add_argument("--noise-b", type=float, default=0.8, help="feature noise of modality b")
    c.add_argument("--offset-scale", type=float, default=1.0, help="modality offset (modality gap)")
    c.add_argument("--hierarchy", type=int, default=None, metavar="K_COARSE",
                   help="group the classes into K coarse classes; labels become label_path")
    c.add_argument("--multi-label", action="store_true", help="1-3 labels per sample (label_set)")
    c.add_argument("--seed", type=int, default=0, help="generator seed (the same seed writes the same shards)")
    c.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="feature dtype in the shards")
    c.set_defaults(func=_reported(_synth_category))
    v = kinds.add_parser("vcmr", help="video corpus with v / t / vt moment queries")
    _common(v, 64)
    v.add_argument("--name", default="synth-vcmr", help="dataset name recorded in the manifest")
    v.add_argument("--splits", nargs="*", metavar="SPLIT=N", help="videos (default train=60 val=20 test=20)")
    v.add_argument("--dim-visual", type=int, default=32, help="visual feature dimension per clip")
    v.add_argument("--dim-subtitle", type=int, default=24, help="subtitle feature dimension per clip")
    v.add_argument("--dim-query", type=int, default=24, help="query token feature dimension")
    v.add_argument("--latent-dim", type=int, default=16, help="dimension of the clip and moment latents")
    v.add_argument("--min-duration", type=float, default=12.0, help="shortest video, seconds")
    v.add_argument("--max-duration", type=float, default=90.0, help="longest video, seconds")
    v.add_argument("--max-queries", type=int, default=None, help="most queries per video (default 4; with "
                                                                 "--queries-from: all of the video's)")
    v.add_argument("--sub-missing", type=float, default=0.3, help="share of clips without a subtitle")
    v.add_argument("--signal", type=float, default=2.0, help="strength of the planted moment latent")
    v.add_argument("--noise", type=float, default=0.3, help="feature noise of clips and query tokens")
    v.add_argument("--durations-from", default=None, metavar="TVR_JSONL",
                   help="sample durations, moments and query types from real TVR annotations")
    v.add_argument("--single-stream-share", type=float, default=None,
                   help="share of v / t (single-stream) queries, the rest vt (default: a third each)")
    v.add_argument("--cross-stream-distractors", type=float, default=0.5,
                   help="chance that a query's content also sits in the other stream of another video")
    v.add_argument("--distractors-per-video", type=int, default=1, help="random-content segments per video")
    v.add_argument("--seed", type=int, default=0, help="generator seed (the same seed writes the same shards)")
    v.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="feature dtype in the shards")
    v.add_argument("--queries-from", default=None, metavar="ANNOTATIONS_JSONL",
                   help="real TVR-style annotations (vid_name, duration, ts, desc, type, desc_id): their videos, "
                        "moments and query text (with --text-encoder); --dim-query is then the encoder's")
    v.add_argument("--text-encoder", default=None, choices=["minilm"],
                   help="encode each query's text (all-MiniLM-L6-v2 from the [text] extra, offline) into its token "
                        "features and plant its sentence embedding in its moment's clips")
    v.set_defaults(func=_reported(_synth_vcmr))
    r = kinds.add_parser("tvr-release", help="a TVR-sized corpus in the public release's layout (jsonl + HDF5)")
    r.add_argument("--out", required=True, help="local directory for the release files")
    r.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--splits", nargs="*", metavar="SPLIT=N", help="videos per split (default: train=17435 val=2179, TVR's)")
    r.add_argument("--annotations", default=None, metavar="TVR_JSONL",
                   help="real validation annotations: val queries taken, train queries drawn from them (default: drawn)")
    r.add_argument("--video2dur", default=None, metavar="JSON",
                   help="real tvr_video2dur_idx.json: the splits' video names and durations (default: drawn)")
    r.add_argument("--dim-visual", type=int, default=3072, help="visual feature dimension per 1.5 s clip")
    r.add_argument("--dim-subtitle", type=int, default=768, help="subtitle feature dimension per clip")
    r.add_argument("--dim-query", type=int, default=768, help="query token feature dimension")
    r.add_argument("--max-tokens", type=int, default=30, help="most tokens a query has")
    r.add_argument("--signal", type=float, default=2.0, help="strength of a moment's planted latent")
    r.add_argument("--noise", type=float, default=0.3, help="feature noise")
    r.add_argument("--sub-missing", type=float, default=0.3, help="share of clips without a subtitle")
    r.add_argument("--seed", type=int, default=0, help="random seed")
    r.set_defaults(func=_reported(_synth_tvr_release))


def _add_convert(sub: Any) -> None:
    conv = sub.add_parser("convert", help="convert public dataset layouts into shards")
    kinds = conv.add_subparsers(dest="convert_kind", required=True, metavar="KIND")
    t = kinds.add_parser("tvr", help="TVR annotations jsonl + HDF5 features -> vcmr shards")
    _common(t, 64)
    t.add_argument("--name", default="tvr", help="dataset name recorded in the manifest")
    t.add_argument("--splits", nargs="+", required=True, metavar="SPLIT=JSONL", help="e.g. train=PATH val=PATH")
    t.add_argument("--video-feats", required=True, help="HDF5: vid_name -> [n_clips, Dv]")
    t.add_argument("--sub-feats", required=True, help="HDF5: vid_name -> [n_clips, Ds] (+ optional vid_name-mask)")
    t.add_argument("--query-feats", required=True, help="HDF5: str(desc_id) -> [n_tokens, Dq]")
    t.add_argument("--video2dur", required=True, help="json {split: {vid_name: [duration, video_index]}}")
    t.add_argument("--max-clips", type=int, default=None, help="keep at most this many clips per video (default: all)")
    t.add_argument("--max-query-tokens", type=int, default=None, help="keep at most this many tokens per query (default: all)")
    t.add_argument("--skip-missing", action="store_true", help="skip (and count) videos/queries missing in HDF5")
    t.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="feature dtype in the shards")
    t.set_defaults(func=_reported(_convert_tvr))
    f = kinds.add_parser("features", help="paired feature matrices (.npz / .mat / .h5) -> category shards")
    _common(f, 256)
    f.add_argument("file", help="feature file (.npz, .mat v5 or v7.3, .h5)")
    f.add_argument("--name", default=None, help="dataset name (default: the file's stem)")
    f.add_argument("--keys", nargs="*", default=[], metavar="ROLE_SPLIT=NAME",
                   help="array names, e.g. a_train=I_tr,b_train=T_tr,label_train=L_tr (others auto-detected)")
    f.add_argument("--val-fraction", type=float, default=0.0, help="carve a seeded val split from train")
    f.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split when the file has none")
    f.add_argument("--a-name", default="image", help="name of modality a in the manifest")
    f.add_argument("--b-name", default="text", help="name of modality b in the manifest")
    f.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="feature dtype in the shards")
    f.set_defaults(func=_reported(_convert_features))


def register_sources(data_subparsers: Any) -> None:
    """Add ``synth``, ``convert`` and ``avdigits`` to the ``xmr data`` subcommands."""
    _add_synth(data_subparsers)
    _add_convert(data_subparsers)
    av = data_subparsers.add_parser("avdigits", help="build the avdigits audio-visual dataset (needs espeak-ng)")
    _common(av, 256)
    av.add_argument("--name", default="avdigits", help="dataset name recorded in the manifest")
    av.add_argument("--per-class", type=int, default=90, help="images per digit (0: all 1,797)")
    av.add_argument("--limit", type=int, default=None, help="total samples cap, stratified (quick builds)")
    av.add_argument("--seed", type=int, default=0, help="seed of voices, noise and the split")
    av.set_defaults(func=_reported(_avdigits))
