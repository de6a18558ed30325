"""``xmr data synth|convert|avdigits``: the dataset sources as subcommands.

``register_sources(data_subparsers)`` is called by ``xmr.data.cli`` with the ``data``
command's subparsers. Each handler builds a dataset, then prints where it wrote and a
one-line summary; heavy imports happen inside the handlers so ``xmr --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

from xmr.data.sources.configs import (DIGITS_VIEWS, AvdigitsConfig, DigitsViewsConfig, SynthCategoryConfig,
                                      SynthVcmrConfig, TextVcmrConfig, TvrReleaseConfig)
from xmr.data.sources.options import add_options, given


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


def _sizes(items: list[str]) -> dict[str, int]:
    """``--splits train=400 val=100`` as sizes (the option is absent when not given)."""
    if not items:
        raise SystemExit("xmr data: --splits: give SPLIT=N for every split (or leave --splits out for the defaults)")
    try:
        return {k: int(v) for k, v in _kv(items, "--splits").items()}
    except ValueError as e:
        raise SystemExit(f"xmr data: --splits: sizes must be integers ({e})") from e


SIZES = {"splits": _sizes}
DTYPES = {"dtype": ("float16", "float32")}


def _summary(m: Any, out: str) -> None:
    splits = ", ".join(f"{n} {s.num_samples}" + (f" ({s.num_queries} queries)" if s.num_queries is not None else "")
                       + f" in {len(s.shards)} shard(s)" for n, s in m.splits.items())
    shapes = ", ".join(f"{r}={m.modalities[r].name}{m.modalities[r].shape}" for r in m.modalities)
    print(f"wrote {out}/manifest.json")
    print(f"{m.name} ({m.task}): {splits}; {shapes}; labels {m.labels.kind} {m.labels.num_classes}")


def _runtime(a: argparse.Namespace):
    """The command's runtime (``xmr.cli.main`` builds it); a parser used on its own, without
    ``main``, gets the defaults."""
    from xmr.runtime import Runtime

    return getattr(a, "runtime", None) or Runtime()


def _reported(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print input errors (they name the file/key/field) as one line with exit code 2. The
    writers' progress lines come at the runtime's interval (``XMR_PROGRESS_EVERY_S``)."""
    def run(a: argparse.Namespace) -> int:
        from xmr.progress_line import progress_every

        try:
            with progress_every(_runtime(a).progress_every_s):
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
    from xmr.data.sources.synth_category import write_synth_category

    cfg = SynthCategoryConfig(**given(a, SynthCategoryConfig, SIZES))
    _summary(write_synth_category(a.out, cfg, name=a.name, **_writer_kw(a)), a.out)
    return 0


def _synth_vcmr(a: argparse.Namespace) -> int:
    from xmr.data.sources.synth_vcmr import write_synth_vcmr
    from xmr.data.sources.text_vcmr import write_text_vcmr

    chosen = set(vars(a))
    if ("queries_from" in chosen) != ("text_encoder" in chosen):
        raise ValueError("--queries-from and --text-encoder go together: real annotations' text encoded by a real "
                         "encoder (e.g. --queries-from tvr_val_release.jsonl --text-encoder minilm)")
    synth_only = {f.name for f in dataclasses.fields(SynthVcmrConfig)} - {f.name for f in dataclasses.fields(TextVcmrConfig)}
    if "queries_from" in chosen:
        unused = sorted(f"--{n.replace('_', '-')}" for n in chosen & synth_only)
        if unused:
            raise ValueError(f"{', '.join(unused)}: not used with --queries-from (its queries come from the "
                             f"annotations and the text encoder)")
        cfg = TextVcmrConfig(**given(a, TextVcmrConfig, SIZES))
        name = a.name if a.name != "synth-vcmr" else "text-vcmr"
        _summary(write_text_vcmr(a.out, cfg, name=name, cache_dir=_runtime(a).cache, **_writer_kw(a)), a.out)
        return 0
    cfg = SynthVcmrConfig(**given(a, SynthVcmrConfig, SIZES))
    _summary(write_synth_vcmr(a.out, cfg, name=a.name, **_writer_kw(a)), a.out)
    return 0


TVR_SYNTH_KNOBS = ("signal", "noise", "sub_missing")  # of the release's planted structure (its SynthVcmrConfig)


def _synth_tvr_release(a: argparse.Namespace) -> int:
    from xmr.data.sources.tvr_release import convert_command, summary, write_tvr_release

    base = TvrReleaseConfig()
    knobs = {k: getattr(a, k) for k in TVR_SYNTH_KNOBS if hasattr(a, k)}
    cfg = TvrReleaseConfig(**given(a, TvrReleaseConfig, SIZES),
                           synth=dataclasses.replace(base.synth, **knobs))
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
    from xmr.data.sources.avdigits import build_avdigits

    cfg = AvdigitsConfig(**given(a, AvdigitsConfig, {"per_class": lambda n: n or None}))
    _summary(build_avdigits(a.out, cfg, name=a.name, **_writer_kw(a)), a.out)
    return 0


def _digits_views(a: argparse.Namespace) -> int:
    from xmr.data.sources.digits_views import write_digits_views

    cfg = DigitsViewsConfig(**given(a, DigitsViewsConfig, {"train_per_class": lambda n: n or None}))
    _summary(write_digits_views(a.out, cfg, name=a.name, **_writer_kw(a)), a.out)
    return 0


def _add_synth(sub: Any) -> None:
    synth = sub.add_parser("synth", help="synthetic datasets with a planted ground truth")
    kinds = synth.add_subparsers(dest="synth_kind", required=True, metavar="KIND")
    c = kinds.add_parser("category", help="paired a/b features with class (and instance) structure")
    _common(c, 256)
    c.add_argument("--name", default="synth-category", help="dataset name recorded in the manifest")
    add_options(c, SynthCategoryConfig, choices=DTYPES, metavars={"splits": "SPLIT=N", "hierarchy": "K_COARSE"}, helps={
        "splits": "samples per split",
        "n_classes": "number of (fine) classes",
        "dim_a": "feature dimension of modality a",
        "dim_b": "feature dimension of modality b",
        "seq_len_a": "make modality a a [T, D] token sequence",
        "seq_len_b": "make modality b a [T, D] token sequence",
        "latent_dim": "dimension of the shared latent both modalities are made from",
        "class_scale": "spread of class means",
        "instance_scale": "per-pair latent shared by a and b",
        "noise_a": "feature noise of modality a",
        "noise_b": "feature noise of modality b",
        "offset_scale": "modality offset (modality gap)",
        "hierarchy": "group the classes into K coarse classes; labels become label_path",
        "multi_label": "1-3 labels per sample (label_set)",
        "seed": "generator seed (the same seed writes the same shards)",
        "dtype": "feature dtype in the shards"})
    c.set_defaults(func=_reported(_synth_category))
    v = kinds.add_parser("vcmr", help="video corpus with v / t / vt moment queries")
    _common(v, 64)
    v.add_argument("--name", default="synth-vcmr", help="dataset name recorded in the manifest")
    add_options(v, SynthVcmrConfig, TextVcmrConfig, choices={**DTYPES, "text_encoder": ("minilm",)},
                metavars={"splits": "SPLIT=N", "durations_from": "TVR_JSONL", "queries_from": "ANNOTATIONS_JSONL"},
                when={TextVcmrConfig: "with --queries-from"}, helps={
        "splits": "videos per split",
        "dim_visual": "visual feature dimension per clip",
        "dim_subtitle": "subtitle feature dimension per clip",
        "dim_query": "query token feature dimension",
        "latent_dim": "dimension of the clip and moment latents",
        "min_duration": "shortest video, seconds",
        "max_duration": "longest video, seconds",
        "max_queries": "most queries per video (0: all of the video's annotated queries)",
        "sub_missing": "share of clips without a subtitle",
        "signal": "strength of the planted moment latent",
        "noise": "feature noise of clips and query tokens",
        "durations_from": "sample durations, moments and query types from real TVR annotations",
        "single_stream_share": "share of v / t (single-stream) queries, the rest vt (none: a third each)",
        "cross_stream_distractors": "chance that a query's content also sits in the other stream of another video",
        "type_cue": "how plainly a v / t query's words name its stream (1: always; 0: no more than a vt query's)",
        "distractors_per_video": "random-content segments per video",
        "seed": "generator seed (the same seed writes the same shards)",
        "dtype": "feature dtype in the shards",
        "queries_from": "real TVR-style annotations (vid_name, duration, ts, desc, type, desc_id): their videos, "
                        "moments and query text (with --text-encoder); the query dimension is then the encoder's",
        "text_encoder": "encode each query's text (all-MiniLM-L6-v2 from the [text] extra, offline) into its token "
                        "features and plant its sentence embedding in its moment's clips"})
    v.set_defaults(func=_reported(_synth_vcmr))
    r = kinds.add_parser("tvr-release", help="a TVR-sized corpus in the public release's layout (jsonl + HDF5)")
    r.add_argument("--out", required=True, help="local directory for the release files")
    r.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    add_options(r, TvrReleaseConfig, metavars={"splits": "SPLIT=N", "annotations": "TVR_JSONL",
                                                "video2dur": "JSON"}, helps={
        "splits": "videos per split (TVR's sizes)",
        "annotations": "real validation annotations: val queries taken, train queries drawn from them "
                       "(none: drawn)",
        "video2dur": "real tvr_video2dur_idx.json: the splits' video names and durations (none: drawn)",
        "dim_visual": "visual feature dimension per 1.5 s clip",
        "dim_subtitle": "subtitle feature dimension per clip",
        "dim_query": "query token feature dimension",
        "max_tokens": "most tokens a query has",
        "seed": "random seed"})
    add_options(r, TvrReleaseConfig().synth, helps={
        "signal": "strength of a moment's planted latent",
        "noise": "feature noise",
        "sub_missing": "share of clips without a subtitle"})
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
    """Add ``synth``, ``convert``, ``avdigits`` and ``digits-views`` to the ``xmr data`` subcommands."""
    _add_synth(data_subparsers)
    _add_convert(data_subparsers)
    av = data_subparsers.add_parser("avdigits", help="build the avdigits audio-visual dataset (needs espeak-ng)")
    _common(av, 256)
    av.add_argument("--name", default="avdigits", help="dataset name recorded in the manifest")
    add_options(av, AvdigitsConfig, helps={"per_class": "images per digit (0: all 1,797)",
                                            "limit": "total samples cap, stratified (quick builds)",
                                            "seed": "seed of voices, noise and the split"})
    av.set_defaults(func=_reported(_avdigits))
    dv = data_subparsers.add_parser("digits-views", help="sklearn's real digits as two views (image halves): "
                                    "a same-modality proxy for paired data, nothing planted")
    _common(dv, 512)
    dv.add_argument("--name", default="digits-views", help="dataset name recorded in the manifest")
    add_options(dv, DigitsViewsConfig, choices={**DTYPES, "views": DIGITS_VIEWS}, helps={
        "views": "how each 8x8 image is cut: left/right columns or top/bottom rows",
        "train_per_class": "training images per digit (0: all left after val and test)",
        "val_per_class": "validation images per digit",
        "test_per_class": "test images per digit",
        "seed": "seed of the stratified split",
        "dtype": "feature dtype in the shards"})
    dv.set_defaults(func=_reported(_digits_views))
