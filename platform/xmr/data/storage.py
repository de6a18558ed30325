"""One small storage layer over local paths and ``s3://bucket/key`` URLs.

Everything that touches dataset bytes goes through here, so local and S3 datasets behave
the same. Credentials and endpoint come from the standard AWS environment/config
(``AWS_ENDPOINT_URL[_S3]``, ``AWS_ACCESS_KEY_ID``, profiles, ...) unless ``endpoint_url``
is given. The boto3 client is created lazily per process and per endpoint, because boto3
clients are neither fork- nor pickle-safe (DataLoader and Ray workers create their own).
Streaming reads survive a dropped connection by resuming with a ``Range`` request.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable

MAX_ATTEMPTS = 5          # botocore standard-mode retries per request
READ_RESUMES = 5          # how many times one streaming read may resume after a drop
BACKOFF_S = 0.2           # first resume backoff; doubles each time
_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


class StorageError(IOError):
    """A storage operation failed; the message starts with the URL."""


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(url):
        raise ValueError(f"{url}: not an s3:// URL")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket in the s3:// URL")
    return bucket, key


def join(root: str, *parts: str) -> str:
    """Join path parts with '/' for S3 and os.path for local roots."""
    if is_s3(root):
        out = root.rstrip("/")
        for p in parts:
            out = f"{out}/{p.strip('/')}"
        return out
    return os.path.join(root, *parts)


def env_endpoint() -> str | None:
    """The S3 endpoint of the standard AWS environment (S3-compatible stores), or None. The
    S3 settings are read here, with the keys boto3 reads itself: xmr's one S3 intake."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def env_region() -> str | None:
    """The AWS environment's region, or None."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def client(endpoint_url: str | None = None) -> Any:
    """The S3 client for this process and endpoint (created on first use)."""
    key = (os.getpid(), endpoint_url, os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"))
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            import boto3
            from botocore.config import Config

            cfg = Config(retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                         max_pool_connections=32)
            c = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=cfg)
            _clients[key] = c
        return c


def _s3_error(url: str, e: Exception) -> Exception:
    """Turn a botocore error into FileNotFoundError/StorageError naming the URL and code."""
    code = getattr(e, "response", {}).get("Error", {}).get("Code", type(e).__name__)
    if str(code) in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
        return FileNotFoundError(f"{url}: {code}")
    return StorageError(f"{url}: {code}: {e}")


class _ResumableS3Raw(io.RawIOBase):
    """Raw stream over a ``get_object`` body that resumes with ``Range: bytes=<offset>-``.

    Only the connection-level failures are retried (a dropped or stalled connection);
    ``IfMatch`` on the resume pins the object version so a shard replaced mid-read fails
    loudly instead of splicing two different files.
    """

    def __init__(self, url: str, endpoint_url: str | None) -> None:
        super().__init__()
        self.url = url
        self.endpoint_url = endpoint_url
        self.bucket, self.key = split_s3(url)
        self.offset = 0
        self.etag: str | None = None
        self.size: int | None = None
        self.resumes = 0
        self._body: Any = None
        self._open()

    def _open(self) -> None:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self.offset:
            kw["Range"] = f"bytes={self.offset}-"
        if self.etag:
            kw["IfMatch"] = self.etag
        try:
            resp = client(self.endpoint_url).get_object(**kw)
        except Exception as e:  # botocore errors carry the S3 code
            raise _s3_error(self.url, e) from e
        self.etag = self.etag or resp.get("ETag")
        if self.size is None:
            self.size = int(resp.get("ContentLength", 0))
        self._body = resp["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.size is not None and self.offset >= self.size:
            return 0
        while True:
            try:
                data = self._body.read(len(b))
                if not data and self.size is not None and self.offset < self.size:
                    raise ConnectionError(f"stream ended at byte {self.offset} of {self.size}")
                break
            except Exception as e:
                if not _is_connection_error(e) or self.resumes >= READ_RESUMES:
                    raise StorageError(
                        f"{self.url}: read failed at byte {self.offset} after {self.resumes} resumes: {e!r}") from e
                self.resumes += 1
                time.sleep(BACKOFF_S * 2 ** (self.resumes - 1))
                self._close_body()
                self._open()
        n = len(data)
        b[:n] = data
        self.offset += n
        return n

    def _close_body(self) -> None:
        try:
            if self._body is not None:
                self._body.close()
        except Exception:  # the connection is already broken; nothing to release
            self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()


def _is_connection_error(e: Exception) -> bool:
    """True for failures of the connection (worth a Range resume), not of the request."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import HTTPError as Urllib3Error

    return isinstance(e, (BotoConnectionError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError,
                          Urllib3Error, ConnectionError, TimeoutError))


def open_read(url: str, *, endpoint_url: str | None = None, buffer_size: int = 1 << 20) -> BinaryIO:
    """A buffered binary stream of ``url``; S3 reads stream and resume after drops."""
    if is_s3(url):
        return io.BufferedReader(_ResumableS3Raw(url, endpoint_url), buffer_size=buffer_size)  # type: ignore[return-value]
    try:
        return open(url, "rb")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: no such file") from e


def read_bytes(url: str, *, endpoint_url: str | None = None) -> bytes:
    with open_read(url, endpoint_url=endpoint_url) as f:
        return f.read()


def write_bytes(url: str, data: bytes, *, endpoint_url: str | None = None) -> None:
    """Write a whole object/file (local writes go through a temp file and rename)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            client(endpoint_url).put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as e:
            raise _s3_error(url, e) from e
        return
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{url}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, url)


def exists(url: str, *, endpoint_url: str | None = None) -> bool:
    if not is_s3(url):
        return os.path.exists(url)
    bucket, key = split_s3(url)
    try:
        client(endpoint_url).head_object(Bucket=bucket, Key=key)
        return True
    except Exception as e:
        err = _s3_error(url, e)
        if isinstance(err, FileNotFoundError):
            return False
        raise err from e


def list_prefix(url: str, *, endpoint_url: str | None = None) -> list[str]:
    """Every file/object below ``url`` (treated as a directory), as full URLs, sorted."""
    if not is_s3(url):
        root = Path(url)
        if not root.is_dir():
            raise FileNotFoundError(f"{url}: no such directory")
        return sorted(str(p) for p in root.rglob("*") if p.is_file())
    bucket, key = split_s3(url)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    out = []
    try:
        for page in client(endpoint_url).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            # keys ending in "/" are directory markers (pyarrow and consoles write them), not files
            out.extend(f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []) if not o["Key"].endswith("/"))
    except Exception as e:
        raise _s3_error(url, e) from e
    return sorted(out)


def _run_parallel(jobs: list[tuple[str, str]], fn: Callable[[str, str], None], workers: int,
                  progress: bool, desc: str) -> None:
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(jobs), desc=desc, unit="file", disable=not progress) as bar:
        futures = [pool.submit(fn, src, dst) for src, dst in jobs]
        for f in futures:
            f.result()
            bar.update(1)


def upload_dir(local: str, url: str, *, endpoint_url: str | None = None, workers: int = 8,
               progress: bool = True, files: list[str] | None = None) -> list[str]:
    """Copy every file below ``local`` (or only ``files``, relative paths) to ``url``."""
    root = Path(local)
    if not root.is_dir():
        raise FileNotFoundError(f"{local}: no such directory to upload")
    if files is None:
        rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    else:
        rels = list(files)
    jobs = [(str(root / r), join(url, r)) for r in rels]

    def put(src: str, dst: str) -> None:
        if is_s3(dst):
            bucket, key = split_s3(dst)
            try:
                client(endpoint_url).upload_file(src, bucket, key)
            except Exception as e:
                raise _s3_error(dst, e) from e
        else:
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)

    _run_parallel(jobs, put, workers, progress, f"upload {url}")
    return [d for _, d in jobs]


def download_dir(url: str, local: str, *, endpoint_url: str | None = None, workers: int = 8,
                 progress: bool = True, files: list[str] | None = None) -> list[str]:
    """Copy every object below ``url`` (or only ``files``, relative paths) into ``local``."""
    if files is None:
        srcs = list_prefix(url, endpoint_url=endpoint_url)
        if not srcs:
            raise FileNotFoundError(f"{url}: nothing to download (empty prefix)")
        base = url.rstrip("/") + "/" if is_s3(url) else str(Path(url)) + os.sep
        rels = [s[len(base):] for s in srcs]
    else:
        rels = list(files)
    root = os.path.realpath(local)
    for r in rels:  # a key like "ckpt/../../x" must not write outside ``local``
        dst = os.path.realpath(os.path.join(local, r))
        if not r or not dst.startswith(root + os.sep):
            raise ValueError(f"{url}: the object {r!r} resolves outside {local}; refusing to download it")
    jobs = [(join(url, r), os.path.join(local, r)) for r in rels]

    def get(src: str, dst: str) -> None:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        if is_s3(src):
            bucket, key = split_s3(src)
            try:
                client(endpoint_url).download_file(bucket, key, dst)
            except Exception as e:
                raise _s3_error(src, e) from e
        else:
            shutil.copyfile(src, dst)

    _run_parallel(jobs, get, workers, progress, f"download {url}")
    return [d for _, d in jobs]
