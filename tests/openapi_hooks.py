"""Schemathesis hooks for the endpoint's OpenAPI document (``SCHEMATHESIS_HOOKS=openapi_hooks``
with ``tests/`` on ``PYTHONPATH``): how to generate the values JSON Schema cannot describe.

The document says what these are (``xmr.serve.contract``): a ``float32le-base64[SHAPE]``
string is base64 of little-endian float32 values of that shape (finite, bounded; "1..32,4"
is 1 to 32 rows of 4); a ``wav-base64`` string a PCM WAV file; an ``application/x-npy`` body
a numpy.save array. Schemathesis knows none of them, so these strategies make valid ones.
The served document's float32 formats and .npy shapes come from the environment
(XMR_ST_FORMATS, XMR_ST_NPY_SHAPES: JSON lists; the test reads them from the document)."""

from __future__ import annotations

import base64
import io
import json
import os
import wave

import numpy as np
import schemathesis
from hypothesis import strategies as st

FORMATS = json.loads(os.environ.get("XMR_ST_FORMATS", "[]"))
NPY_SHAPES = json.loads(os.environ.get("XMR_ST_NPY_SHAPES", "[[64]]"))
SEEDS = st.integers(0, 2**32 - 1)


def _values(n: int, seed: int, scale: float) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=n) * scale).astype("<f4")


def _float32_base64(args) -> str:
    n, seed, scale = args
    return base64.b64encode(_values(n, seed, scale).tobytes()).decode()


def _counts(name: str):
    """How many values a ``float32le-base64[SHAPE]`` format holds, as a strategy."""
    dims = []
    for part in name[name.index("[") + 1:-1].split(","):
        lo, _, hi = part.partition("..")
        dims.append(st.integers(int(lo), int(hi or lo)))
    return st.tuples(*dims).map(lambda d: int(np.prod(d)))


def _wav_base64(args) -> str:
    rate, channels, ms, seed = args
    n = max(1, rate * ms // 1000)
    x = np.random.default_rng(seed).uniform(-1, 1, size=n * channels)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return base64.b64encode(buf.getvalue()).decode()


def _npy(args) -> bytes:
    shape, seed, dtype, scale = args
    buf = io.BytesIO()
    np.save(buf, _values(int(np.prod(shape)), seed, scale).reshape(shape).astype(dtype))
    return buf.getvalue()


SCALES = st.sampled_from([0.0, 1.0, 1e3])
for name in FORMATS:
    schemathesis.openapi.format(name, st.tuples(_counts(name), SEEDS, SCALES).map(_float32_base64))
schemathesis.openapi.format("wav-base64", st.tuples(st.sampled_from([8000, 16000, 44100]), st.integers(1, 2),
                                                    st.integers(20, 1500), SEEDS).map(_wav_base64))
schemathesis.openapi.media_type("application/x-npy", st.tuples(st.sampled_from([tuple(s) for s in NPY_SHAPES]), SEEDS,
                                                               st.sampled_from(["<f4", "<f8", ">f4"]), SCALES)
                                .map(_npy))
