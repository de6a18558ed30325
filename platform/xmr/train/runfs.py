"""Run directories on local disk or S3, through the same pyarrow filesystem Ray Train uses.

A run lives at ``<storage.root>/<run_name>/``: Ray Train's ``checkpoint_epochNNNN/`` folders
and its own state, plus ours: ``config.yaml`` (the resolved config), ``metrics.csv`` (one
row per epoch) and ``best.json`` (the best checkpoint's URI, metric and epoch).
"""

from __future__ import annotations

import os
import posixpath
from urllib.parse import urlparse

import pyarrow.fs as pafs

from xmr.data.storage import env_endpoint, env_region, is_s3, split_s3


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """The explicit endpoint, else the standard AWS environment's (S3-compatible stores)."""
    return endpoint_url or env_endpoint()


def filesystem(root: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local directory or ``s3://bucket/prefix``."""
    if is_s3(root):
        bucket, prefix = split_s3(root)
        kwargs: dict = {}
        endpoint = s3_endpoint(endpoint_url)
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or endpoint
            kwargs["scheme"] = parsed.scheme or "https"
        region = env_region()
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), posixpath.join(bucket, prefix).rstrip("/")
    path = os.path.abspath(os.path.expanduser(root))
    os.makedirs(path, exist_ok=True)
    return pafs.LocalFileSystem(), path


class RunDir:
    """One run's folder: small text files, each written whole. On local disk a file is
    written beside its target and renamed over it, so a reader (or a crash) never sees half
    of ``best.json`` or ``metrics.csv``; an S3 object appears only when its upload completes."""

    def __init__(self, root: str, name: str, endpoint_url: str | None = None) -> None:
        self.root, self.name = root, name
        self.fs, base = filesystem(root, endpoint_url)
        self.path = posixpath.join(base, name)
        if isinstance(self.fs, pafs.LocalFileSystem):
            os.makedirs(self.path, exist_ok=True)

    def uri(self, rel: str = "") -> str:
        """A path users can pass back to xmr (``s3://...`` or an absolute local path)."""
        full = posixpath.join(self.path, rel) if rel else self.path
        return f"s3://{full}" if isinstance(self.fs, pafs.S3FileSystem) else full

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = posixpath.join(self.path, rel)
        if not isinstance(self.fs, pafs.LocalFileSystem):
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        staging = f"{target}.{os.getpid()}.partial"
        with open(staging, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, target)

    def read_text(self, rel: str) -> str | None:
        path = posixpath.join(self.path, rel)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read().decode()
