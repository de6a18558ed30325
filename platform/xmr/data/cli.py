"""``xmr data``: move datasets between local disk and S3 and inspect/verify them.

``inspect`` re-hashes every shard against the manifest: the reader trusts shard contents
(it only checks counts and values), so a shard replaced or corrupted in storage is caught
here, before a long training run.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from xmr.data import storage
from xmr.data.manifest import Manifest, ManifestError, load_manifest


def shard_sha256(url: str, endpoint_url: str | None = None) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of one shard, streamed."""
    h, n = hashlib.sha256(), 0
    with storage.open_read(url, endpoint_url=endpoint_url) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def verify(root: str, manifest: Manifest, *, endpoint_url: str | None = None, workers: int = 8,
           progress: bool = True) -> list[str]:
    """Hash every shard; returns one line per problem (empty when all shards match)."""
    from tqdm import tqdm

    shards = [(split, s) for split, info in manifest.splits.items() for s in info.shards]

    def check(item: tuple[str, Any]) -> str | None:
        split, s = item
        url = storage.join(root, s.path)
        try:
            digest, size = shard_sha256(url, endpoint_url)
        except (OSError, storage.StorageError) as e:
            return f"{url}: cannot read ({e})"
        if digest != s.sha256 or size != s.bytes:
            return (f"{url}: sha256 {digest[:16]}… ({size} bytes) != manifest {s.sha256[:16]}… "
                    f"({s.bytes} bytes) [split {split}]")
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(tqdm(pool.map(check, shards), total=len(shards), desc=f"verify {root}", unit="shard",
                            disable=not progress))
    return [r for r in results if r]


def summary(root: str, m: Manifest) -> str:
    """Human-readable manifest summary."""
    lines = [f"dataset  {m.name}  ({root})", f"task     {m.task}" + (f"  clip_len={m.clip_len}s" if m.clip_len else ""),
             "modalities:"]
    for role, spec in m.modalities.items():
        lines.append(f"  {role:<9} {spec.name:<12} shape={spec.shape} {spec.dtype}")
    lab = m.labels
    lines.append(f"labels   {lab.kind}  num_classes={lab.num_classes}")
    lines.append(f"{'split':<10}{'samples':>10}{'queries':>10}{'shards':>8}{'bytes':>14}")
    for name, s in m.splits.items():
        q = "-" if s.num_queries is None else str(s.num_queries)
        lines.append(f"{name:<10}{s.num_samples:>10}{q:>10}{len(s.shards):>8}{sum(x.bytes for x in s.shards):>14}")
    lines.append(f"source   {m.source}")
    lines.append(f"created  {m.created}  schema_version={m.schema_version}")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    m = load_manifest(args.path, endpoint_url=args.endpoint_url)
    print(summary(args.path, m))
    if args.no_verify:
        return 0
    problems = verify(args.path, m, endpoint_url=args.endpoint_url, progress=not args.quiet)
    n = sum(len(s.shards) for s in m.splits.values())
    for p in problems:
        print(f"MISMATCH {p}")
    print(f"verified {n - len(problems)}/{n} shards" + (" OK" if not problems else f", {len(problems)} bad"))
    return 1 if problems else 0


def _upload(args: argparse.Namespace) -> int:
    m = load_manifest(args.local_dir)  # refuse to upload something that is not a dataset
    files = [s.path for info in m.splits.values() for s in info.shards]
    storage.upload_dir(args.local_dir, args.s3_url, files=files, endpoint_url=args.endpoint_url,
                       workers=args.workers, progress=not args.quiet)
    storage.upload_dir(args.local_dir, args.s3_url, files=["manifest.json"], endpoint_url=args.endpoint_url,
                       progress=False)  # manifest last: readers never see missing shards
    print(f"uploaded {m.name}: {len(files)} shards + manifest.json -> {args.s3_url}")
    return 0


def _download(args: argparse.Namespace) -> int:
    m = load_manifest(args.s3_url, endpoint_url=args.endpoint_url)
    files = [s.path for info in m.splits.values() for s in info.shards] + ["manifest.json"]
    storage.download_dir(args.s3_url, args.local_dir, files=files, endpoint_url=args.endpoint_url,
                         workers=args.workers, progress=not args.quiet)
    print(f"downloaded {m.name}: {len(files) - 1} shards + manifest.json -> {args.local_dir}")
    return 0


def _reported(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print storage/manifest errors as one line (they already name the URL) with exit code 2."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (OSError, ManifestError, storage.StorageError) as e:
            print(f"xmr data {args.data_command}: error: {e}", file=sys.stderr)
            return 2
    return run


def register(subparsers: Any) -> None:
    """Add ``xmr data ...`` to the top-level ``xmr`` parser."""
    data = subparsers.add_parser("data", help="datasets: upload, download, inspect, build from sources")
    data_subparsers = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS env/config)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        return p

    up = common(data_subparsers.add_parser("upload", help="copy a local dataset to s3://bucket/prefix"))
    up.add_argument("local_dir", help="a local dataset folder (with manifest.json)")
    up.add_argument("s3_url", help="destination, s3://bucket/prefix")
    up.add_argument("--workers", type=int, default=8, help="parallel transfers")
    up.set_defaults(func=_reported(_upload))
    down = common(data_subparsers.add_parser("download", help="copy a dataset from s3:// to a local dir"))
    down.add_argument("s3_url", help="a dataset on S3, s3://bucket/prefix")
    down.add_argument("local_dir", help="local destination folder")
    down.add_argument("--workers", type=int, default=8, help="parallel transfers")
    down.set_defaults(func=_reported(_download))
    ins = common(data_subparsers.add_parser("inspect", help="print the manifest summary and verify shards"))
    ins.add_argument("path", help="dataset root (local dir or s3://bucket/prefix)")
    ins.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every shard")
    ins.set_defaults(func=_reported(_inspect))

    from xmr.data.sources.cli import register_sources

    register_sources(data_subparsers)


def main(argv: list[str] | None = None) -> int:
    """``python -m xmr.data.cli data inspect PATH`` (the same parser as ``xmr data``)."""
    parser = argparse.ArgumentParser(prog="xmr")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
