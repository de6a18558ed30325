"""The endpoint's API key, taken in once before anything starts (``--api-key-file`` or
XMR_API_KEY): only its digest travels on, to the gateway's settings."""

from __future__ import annotations

import hashlib
import os

def read_api_key(key_file: str | None) -> str | None:
    """The bearer token from ``--api-key-file`` or XMR_API_KEY, or None. XMR_API_KEY is
    removed from this process's environment once read, so no process started from here (an
    embedded Ray's raylet, its workers, the replicas) inherits it: only its digest travels."""
    key = None
    if key_file:
        try:
            key = open(key_file, encoding="utf-8").read().strip()
        except OSError as exc:
            raise SystemExit(f"xmr serve: --api-key-file {key_file}: {exc.strerror}") from None
        if not key:
            raise SystemExit(f"xmr serve: --api-key-file {key_file} is empty")
    env_key = os.environ.pop("XMR_API_KEY", "").strip()
    key = key or env_key or None
    if key is not None and len(key) < 16:
        raise SystemExit("xmr serve: the API key must be at least 16 characters")
    return key


def key_digest(key: str | None) -> str | None:
    """SHA-256 (hex) of the key: what the gateway compares a request's token against."""
    return hashlib.sha256(key.encode()).hexdigest() if key else None
