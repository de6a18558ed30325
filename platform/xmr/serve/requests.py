"""HTTP request bodies and their validation. Every rejection is a 4xx whose JSON body says
which field is wrong and why; nothing a client sends can reach a 500."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt

MAX_BODY_BYTES = 4 << 20  # 4 MiB: a 100 k-element float query in JSON, or ~90 s of 16 kHz WAV in base64
MAX_ELEMENTS = 1 << 17
MAX_K = 1000

# Feature arrays are checked by numpy (``as_array`` / ``tokens_array``), not element by
# element by pydantic: a 20 x 768 query is 15k numbers, and per-element validation of that
# costs more than the search itself.
FeatureArray = Annotated[list, Field(min_length=1, max_length=MAX_ELEMENTS)]


class RequestError(Exception):
    """A client mistake: HTTP ``status`` and a message that names the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def __reduce__(self):  # crosses process boundaries (a replica's error reaching the gateway)
        return RequestError, (self.status, self.message)


class SearchRequest(BaseModel):
    """Category / pair retrieval: a query of one modality, answered from the other."""

    model_config = ConfigDict(extra="forbid")
    query: FeatureArray | None = Field(None, description="feature array of the query modality "
                                       "(shape = the dataset's dims for that modality)")
    audio_wav_base64: str | None = Field(None, max_length=MAX_BODY_BYTES,
                                         description="a WAV file, base64 (datasets with an audio featuriser)")
    text: str | None = Field(None, min_length=1, max_length=2000,
                             description="raw text (datasets whose query features came from a text encoder)")
    modality: Literal["a", "b"] | None = Field(None, description="the query's modality; results are the other")
    k: StrictInt = Field(10, ge=1, le=MAX_K)


class MomentsRequest(BaseModel):
    """Video corpus moment retrieval; ``video`` restricts it to one video (SVMR)."""

    model_config = ConfigDict(extra="forbid")
    query: FeatureArray | None = Field(None, description="query token features [T, d_query]")
    text: str | None = Field(None, min_length=1, max_length=2000,
                             description="raw text, for datasets whose query tokens came from a text encoder "
                                         "(xmr data synth vcmr --text-encoder): featurised by the same encoder")
    k: StrictInt = Field(10, ge=1, le=100)
    video: str | None = Field(None, min_length=1, max_length=512, description="video id: search only this video")


class SearchHit(BaseModel):
    id: str
    score: float = Field(description="cosine similarity")
    label: Any = Field(None, description="the item's label(s), where the dataset has them")


class SearchResponse(BaseModel):
    modality: str = Field(description="the modality of the results (the other one)")
    k: int
    results: list[SearchHit]


class MomentHit(BaseModel):
    video: str
    start: float = Field(description="seconds")
    end: float = Field(description="seconds")
    score: float


class MomentsResponse(BaseModel):
    k: int
    video: str | None = Field(None, description="the video searched (SVMR requests)")
    results: list[MomentHit]


def numeric_array(value: Any, field: str) -> np.ndarray:
    """A nested JSON list of numbers as float32; anything else (strings, booleans, nulls,
    ragged rows, objects) is a 422 naming the field."""
    try:
        raw = np.asarray(value)
    except ValueError:
        raise RequestError(422, f"{field}: rows of different lengths (expected a rectangular array)") from None
    if raw.dtype.kind not in "iuf" or raw.size == 0:
        raise RequestError(422, f"{field}: expected a non-empty array of numbers")
    if raw.size > MAX_ELEMENTS:
        raise RequestError(413, f"{field}: {raw.size} numbers, at most {MAX_ELEMENTS}")
    return raw.astype(np.float32)


def as_array(value: Any, shape: list[int], field: str) -> np.ndarray:
    """The query as float32 of exactly ``shape``; finite values only."""
    arr = numeric_array(value, field)
    if list(arr.shape) != list(shape):
        raise RequestError(422, f"{field}: expected shape {list(shape)}, got {list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise RequestError(422, f"{field}: contains NaN or Inf")
    return arr


def tokens_array(value: Any, dim: int, max_tokens: int) -> np.ndarray:
    arr = numeric_array(value, "query") if value is not None else None
    if arr is None or arr.ndim != 2:
        raise RequestError(422, f"query: expected a [T, {dim}] array of token features")
    if arr.shape[1] != dim:
        raise RequestError(422, f"query: expected {dim} features per token, got {arr.shape[1]}")
    if not 1 <= arr.shape[0] <= max_tokens:
        raise RequestError(422, f"query: expected 1..{max_tokens} tokens, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise RequestError(422, "query: contains NaN or Inf")
    return arr


def decode_wav_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "audio_wav_base64: not valid base64") from None


def error_text(errors: list[dict[str, Any]]) -> str:
    """Pydantic errors as one line per field, without echoing the (possibly huge) input."""
    lines = []
    for e in errors[:10]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        lines.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(lines)
