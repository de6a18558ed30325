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
    p.add_argument("--samples-per-shard", type=int, default=shard_default)
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

    cfg = SynthVcmrConfig(splits=_sizes(a.splits, SynthVcmrConfig().splits), dim_visual=a.dim_visual,
                          dim_subtitle=a.dim_subtitle, dim_query=a.dim_query, latent_dim=a.latent_dim,
                          min_duration=a.min_duration, max_duration=a.max_duration, max_queries=a.max_queries,
                          sub_missing=a.sub_missing, signal=a.signal, noise=a.noise,
                          durations_from=a.durations_from, seed=a.seed, dtype=a.dtype)
    _summary(write_synth_vcmr(a.out, cfg, name=a.name, **_writer_kw(a)), a.out)
    return 0


def _convert_tvr(a: argparse.Namespace) -> int:
    from xmr.data.sources.tvr import convert_tvr

    m, rep = convert_tvr(a.out, splits=_kv(a.splits, "--splits"), video_feats=a.video_feats,
                         sub_feats=a.sub_feats, query_feats=a.query_feats, video2dur=a.video2dur,
                         max_clips=a.max_clips, max_query_tokens=a.max_query_tokens, skip_missing=a.skip_missing,
                         name=a.name, dtype=a.dtype, **_writer_kw(a))
    _summary(m, a.out)
    print(f"videos without query {rep.videos_without_query}; clips truncated {rep.clips_truncated}; "
          f"clip-count mismatches {rep.clip_count_mismatch}; query tokens truncated {rep.tokens_truncated}; "
          f"ts clamped {rep.ts_clamped}; skipped videos {len(rep.skipped_videos)}, "
          f"queries {len(rep.skipped_queries)}")
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
    c.add_argument("--name", default="synth-category")
    c.add_argument("--splits", nargs="*", metavar="SPLIT=N", help="sizes (default train=400 val=100 test=100)")
    c.add_argument("--n-classes", type=int, default=10)
    c.add_argument("--dim-a", type=int, default=32)
    c.add_argument("--dim-b", type=int, default=48)
    c.add_argument("--seq-len-a", type=int, default=None, help="make modality a a [T, D] token sequence")
    c.add_argument("--seq-len-b", type=int, default=None, help="make modality b a [T, D] token sequence")
    c.add_argument("--latent-dim", type=int, default=16)
    c.add_argument("--class-scale", type=float, default=0.6, help="spread of class means")
    c.add_argument("--instance-scale", type=float, default=0.7, help="per-pair latent shared by a and b")
    c.add_argument("--noise-a", type=float, default=0.8)
    c.add_argument("--noise-b", type=float, default=0.8)
    c.add_argument("--offset-scale", type=float, default=1.0, help="modality offset (modality gap)")
    c.add_argument("--hierarchy", type=int, default=None, metavar="K_COARSE",
                   help="group the classes into K coarse classes; labels become label_path")
    c.add_argument("--multi-label", action="store_true", help="1-3 labels per sample (label_set)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    c.set_defaults(func=_reported(_synth_category))
    v = kinds.add_parser("vcmr", help="video corpus with v / t / vt moment queries")
    _common(v, 64)
    v.add_argument("--name", default="synth-vcmr")
    v.add_argument("--splits", nargs="*", metavar="SPLIT=N", help="videos (default train=60 val=20 test=20)")
    v.add_argument("--dim-visual", type=int, default=32)
    v.add_argument("--dim-subtitle", type=int, default=24)
    v.add_argument("--dim-query", type=int, default=24)
    v.add_argument("--latent-dim", type=int, default=16)
    v.add_argument("--min-duration", type=float, default=12.0)
    v.add_argument("--max-duration", type=float, default=90.0)
    v.add_argument("--max-queries", type=int, default=4)
    v.add_argument("--sub-missing", type=float, default=0.3, help="share of clips without a subtitle")
    v.add_argument("--signal", type=float, default=2.0, help="strength of the planted moment latent")
    v.add_argument("--noise", type=float, default=0.3)
    v.add_argument("--durations-from", default=None, metavar="TVR_JSONL",
                   help="sample durations, moments and query types from real TVR annotations")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    v.set_defaults(func=_reported(_synth_vcmr))


def _add_convert(sub: Any) -> None:
    conv = sub.add_parser("convert", help="convert public dataset layouts into shards")
    kinds = conv.add_subparsers(dest="convert_kind", required=True, metavar="KIND")
    t = kinds.add_parser("tvr", help="TVR annotations jsonl + HDF5 features -> vcmr shards")
    _common(t, 64)
    t.add_argument("--name", default="tvr")
    t.add_argument("--splits", nargs="+", required=True, metavar="SPLIT=JSONL", help="e.g. train=PATH val=PATH")
    t.add_argument("--video-feats", required=True, help="HDF5: vid_name -> [n_clips, Dv]")
    t.add_argument("--sub-feats", required=True, help="HDF5: vid_name -> [n_clips, Ds] (+ optional vid_name-mask)")
    t.add_argument("--query-feats", required=True, help="HDF5: str(desc_id) -> [n_tokens, Dq]")
    t.add_argument("--video2dur", required=True, help="json {split: {vid_name: [duration, video_index]}}")
    t.add_argument("--max-clips", type=int, default=None)
    t.add_argument("--max-query-tokens", type=int, default=None)
    t.add_argument("--skip-missing", action="store_true", help="skip (and count) videos/queries missing in HDF5")
    t.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    t.set_defaults(func=_reported(_convert_tvr))
    f = kinds.add_parser("features", help="paired feature matrices (.npz / .mat / .h5) -> category shards")
    _common(f, 256)
    f.add_argument("file", help="feature file (.npz, .mat v5 or v7.3, .h5)")
    f.add_argument("--name", default=None, help="dataset name (default: the file's stem)")
    f.add_argument("--keys", nargs="*", default=[], metavar="ROLE_SPLIT=NAME",
                   help="array names, e.g. a_train=I_tr,b_train=T_tr,label_train=L_tr (others auto-detected)")
    f.add_argument("--val-fraction", type=float, default=0.0, help="carve a seeded val split from train")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--a-name", default="image")
    f.add_argument("--b-name", default="text")
    f.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    f.set_defaults(func=_reported(_convert_features))


def register_sources(data_subparsers: Any) -> None:
    """Add ``synth``, ``convert`` and ``avdigits`` to the ``xmr data`` subcommands."""
    _add_synth(data_subparsers)
    _add_convert(data_subparsers)
    av = data_subparsers.add_parser("avdigits", help="build the avdigits audio-visual dataset (needs espeak-ng)")
    _common(av, 256)
    av.add_argument("--name", default="avdigits")
    av.add_argument("--per-class", type=int, default=90, help="images per digit (0: all 1,797)")
    av.add_argument("--limit", type=int, default=None, help="total samples cap, stratified (quick builds)")
    av.add_argument("--seed", type=int, default=0)
    av.set_defaults(func=_reported(_avdigits))
