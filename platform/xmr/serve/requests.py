"""HTTP request bodies and their validation. Every rejection is a 4xx whose JSON body says
which field is wrong and why; nothing a client sends can reach a 500."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, ValidationError
from starlette.requests import Request

MAX_BODY_BYTES = 4 << 20  # 4 MiB: a 100 k-element float query in JSON, or ~90 s of 16 kHz WAV in base64
MAX_ELEMENTS = 1 << 17
MAX_K = 1000
# JSON bodies are checked for shape before they are parsed: a query is at most a 2-D array
# inside the request object, so 8 levels leave room; a number of more than 40 characters is
# no float32 anyone means (and Python's int() refuses 4,300 digits with a ValueError).
MAX_JSON_DEPTH = 8
MAX_NUMBER_CHARS = 40
# Query values beyond this magnitude overflow float32 in the norm or the scores (sqrt of
# float32's max over MAX_ELEMENTS is ~5e16), which would give NaN scores.
MAX_ABS_VALUE = 1e15

# Feature arrays are checked by numpy (``as_array`` / ``tokens_array``), not element by
# element by pydantic: a 20 x 768 query is 15k numbers, and per-element validation of that
# costs more than the search itself.
FeatureArray = Annotated[list, Field(min_length=1, max_length=MAX_ELEMENTS)]


def _integral(value: Any) -> Any:
    """JSON does not tell 5 from 5.0 (JSON Schema calls both integers): a float with no
    fraction is the integer; strings and booleans stay refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Count = Annotated[StrictInt, BeforeValidator(_integral)]


class RequestError(Exception):
    """A client mistake: HTTP ``status`` and a message that names the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def __reduce__(self):  # crosses process boundaries (a replica's error reaching the gateway)
        return RequestError, (self.status, self.message)


def errors_returned(method):
    """A replica method whose client error (``RequestError``) is returned as a value, not
    raised: Serve logs every exception a replica raises as an ERROR with its traceback, and a
    client's mistake is not the server's. The gateway raises it again (``Gateway._call``),
    so one error type travels from wherever it arose to the client."""
    import functools
    import inspect

    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        try:
            out = method(*args, **kwargs)
            return await out if inspect.isawaitable(out) else out
        except RequestError as exc:
            return exc

    return wrapper


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
    k: Count = Field(10, ge=1, le=MAX_K)


class MomentsRequest(BaseModel):
    """Video corpus moment retrieval; ``video`` restricts it to one video (SVMR)."""

    model_config = ConfigDict(extra="forbid")
    query: FeatureArray | None = Field(None, description="query token features [T, d_query]")
    text: str | None = Field(None, min_length=1, max_length=2000,
                             description="raw text, for datasets whose query tokens came from a text encoder "
                                         "(xmr data synth vcmr --text-encoder): featurised by the same encoder")
    k: Count = Field(10, ge=1, le=100)
    video: str | None = Field(None, min_length=1, max_length=512, description="video id: search only this video")


class SearchHit(BaseModel):
    id: str
    score: float = Field(description="cosine similarity")
    label: Any = Field(None, description="the item's label(s), where the dataset has them")


class SearchResponse(BaseModel):
    modality: str = Field(description="the modality of the results (the other one)")
    k: int
    results: list[SearchHit]
    shards: int | None = Field(None, description="a sharded index: how many shards it has")
    missing_shards: list[int] | None = Field(None, description="a sharded index: shards that did not answer in time "
                                                               "(the results are the other shards' merged top-k)")
    partial: bool | None = Field(None, description="a sharded index: true when missing_shards is not empty")


class MomentHit(BaseModel):
    video: str
    start: float = Field(description="seconds")
    end: float = Field(description="seconds")
    score: float


class MomentsResponse(BaseModel):
    k: int
    video: str | None = Field(None, description="the video searched (SVMR requests)")
    results: list[MomentHit]
    shards: int | None = Field(None, description="a sharded index: how many shards it has")
    missing_shards: list[int] | None = Field(None, description="a sharded index: shards that did not answer in time")
    partial: bool | None = Field(None, description="a sharded index: true when missing_shards is not empty")


class BatchingCounters(BaseModel):
    batches: int
    queries: int
    mean_batch: float = Field(description="queries per batch")
    compute_ms_per_batch: float
    compute_s: float = Field(description="compute seconds, all batches")


class ShardInfo(BaseModel):
    shard: int
    items: int
    answering: bool = Field(description="whether it answered this /info in time")
    missing_from_answers: int = Field(description="answers given without it")
    replica: str | None = None
    search: str | None = None
    gallery: str | None = None
    batching: dict[str, BatchingCounters] | None = None
    gateway_calls: dict[str, float] | None = Field(
        None, description="the gateway's search calls to this shard: calls, the queries they carried, mean_batch")


class InfoResponse(BaseModel):
    """What the endpoint serves and how it has been doing."""

    method: str = Field(description="the checkpoint's method")
    task: str = Field(description="its task family (category, pair, vcmr)")
    model: str
    checkpoint: str = Field(description="which run and checkpoint (its last two path parts, or the s3:// URI)")
    gallery: str = Field(description="the dataset (or index) searched; 'sharded' for a sharded index")
    split: str | None = None
    gallery_size: int = Field(description="items (category) or videos (VCMR) searched")
    embed_dim: int
    input_dims: dict[str, list[int]] = Field(description="each modality's feature shape")
    search: str = Field(description="exact, or approximate (its index kinds)")
    build_s: float | None = Field(None, description="seconds the replica took to load and encode")
    built_at: str | None = None
    loading: str | None = Field(description="a checkpoint being loaded to replace this one, or null")
    batch_size: int | None = None
    batching: dict[str, BatchingCounters] | None = Field(None, description="per route: is batching paying")
    torch_threads: int | None = None
    replica: str | None = Field(None, description="the replica that answered")
    featurisers: list[str] = Field(description="raw query forms this endpoint turns into features")
    text_encoder: dict[str, Any] | None = Field(description="the corpus's text encoder, or null")
    retried_calls: int = Field(description="calls sent again after their replica died")
    auth: bool = Field(description="whether a bearer key is required")
    shards: list[ShardInfo] | None = Field(None, description="a sharded index: each shard")
    partial_answers: int | None = Field(None, description="a sharded index: answers given without every shard")


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"] = Field(description="degraded: some shards of a sharded index are down")
    shards: int | None = None
    missing_shards: list[int] | None = None


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


def _finite(arr: np.ndarray, field: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise RequestError(422, f"{field}: contains NaN or Inf")
    if float(np.abs(arr).max()) > MAX_ABS_VALUE:
        raise RequestError(422, f"{field}: values of magnitude above {MAX_ABS_VALUE:g} overflow the scores; "
                                f"send features on their usual scale")
    return arr


def as_array(value: Any, shape: list[int], field: str) -> np.ndarray:
    """The query as float32 of exactly ``shape``; finite values of bounded magnitude only."""
    arr = numeric_array(value, field)
    if list(arr.shape) != list(shape):
        raise RequestError(422, f"{field}: expected shape {list(shape)}, got {list(arr.shape)}")
    return _finite(arr, field)


def tokens_array(value: Any, dim: int, max_tokens: int) -> np.ndarray:
    arr = numeric_array(value, "query") if value is not None else None
    if arr is None or arr.ndim != 2:
        raise RequestError(422, f"query: expected a [T, {dim}] array of token features")
    if arr.shape[1] != dim:
        raise RequestError(422, f"query: expected {dim} features per token, got {arr.shape[1]}")
    if not 1 <= arr.shape[0] <= max_tokens:
        raise RequestError(422, f"query: expected 1..{max_tokens} tokens, got {arr.shape[0]}")
    return _finite(arr, "query")


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


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _bounded_number(kind):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise RequestError(422, f"a number of {len(text)} characters (at most {MAX_NUMBER_CHARS}): "
                                    f"{text[:20]}...")
        return kind(text)
    return parse


def _no_constant(name: str):
    raise RequestError(422, f"the body contains {name}: NaN or Inf is not a JSON number; send finite numbers")


def parse_json_body(body: bytes) -> Any:
    """A JSON body, its shape checked before it is parsed: nesting depth, the number of
    elements and the length of each number are bounded, and NaN / Infinity are refused, so
    no body can make the parser recurse, allocate far beyond its size, or fail with a 500."""
    skeleton = _JSON_STRING.sub(b'""', body)  # brackets and commas inside strings do not count
    chars = np.frombuffer(skeleton, dtype=np.uint8)
    if chars.size:
        step = np.zeros(chars.size, dtype=np.int32)
        step[(chars == ord("[")) | (chars == ord("{"))] = 1
        step[(chars == ord("]")) | (chars == ord("}"))] = -1
        depth = int(np.cumsum(step).max())
        if depth > MAX_JSON_DEPTH:
            raise RequestError(422, f"the JSON body is nested {depth} levels deep, at most {MAX_JSON_DEPTH}: "
                                    f"send the query as a flat or 2-D list")
        commas = int((chars == ord(",")).sum())
        if commas > MAX_ELEMENTS + 64:
            raise RequestError(413, f"the JSON body holds {commas + 1} elements, at most {MAX_ELEMENTS}")
    try:
        return json.loads(body, parse_int=_bounded_number(int), parse_float=_bounded_number(float),
                          parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({exc.__class__.__name__} at position "
                                f"{getattr(exc, 'pos', '?')}): send a JSON object, or a .npy body with "
                                f"Content-Type application/x-npy") from None
    except RecursionError:  # unreachable past the depth check; kept so no body can give a 500
        raise RequestError(422, f"the JSON body is nested too deep (at most {MAX_JSON_DEPTH} levels)") from None


def parse_npy_body(body: bytes) -> np.ndarray:
    """A ``.npy`` body as float32. The header is read and checked first (magic, dtype, shape
    x itemsize against the limit and the bytes actually sent), so a header that claims a
    huge array allocates nothing, and a zip (``.npz``) or pickle is refused."""
    fmt = np.lib.format
    f = io.BytesIO(body)
    if not body.startswith(b"\x93NUMPY"):
        kind = " (a zip archive: .npz is not accepted)" if body.startswith(b"PK") else ""
        raise RequestError(400, f"the body is not a valid .npy array{kind}: write one array with numpy.save")
    try:
        major, _ = fmt.read_magic(f)
        header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
        shape, fortran, dtype = header(f, max_header_size=1024)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise RequestError(400, f"the .npy header is not valid ({exc.__class__.__name__}): write it with numpy.save") from None
    if dtype.hasobject or dtype.kind not in "iuf":
        raise RequestError(422, f"query: a .npy array of numbers is expected, got dtype {dtype}")
    size = int(np.prod(shape, dtype=object)) if shape else 1
    if size == 0 or size > MAX_ELEMENTS:
        raise RequestError(422 if size == 0 else 413, f"query: {size} numbers (1..{MAX_ELEMENTS} allowed)")
    data = body[f.tell():]
    if len(data) != size * dtype.itemsize:
        raise RequestError(400, f"the .npy header declares {size * dtype.itemsize} bytes of data, the body holds "
                                f"{len(data)}")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return arr.astype(np.float32)


# --------------------------------------------------------------------------- a request's body


NPY = "application/x-npy"


def body_schema(model) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()},
        NPY: {"schema": {"type": "string", "format": "binary",
                         "description": "a float32 .npy array (np.save); k, modality, video as query parameters"}}}}}


def base64_floats(text: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "query_base64: not valid base64") from None
    if not raw or len(raw) % 4:
        raise RequestError(422, f"query_base64: {len(raw)} bytes is not a whole number of float32 values")
    if len(raw) // 4 > MAX_ELEMENTS:
        raise RequestError(413, f"query_base64: {len(raw) // 4} numbers, at most {MAX_ELEMENTS}")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


# What the gateway serves (``xmr.serve.contract.served_contract``: route, feature shapes per
# modality, gallery size), set with the OpenAPI contract (``set_contract``): a .npy body's
# modality follows from its shape, and ``k`` is checked against the gallery here too.
SERVED: list[dict[str, Any] | None] = [None]
QUERY_PARAMS = ("k", "modality", "video")


def _query_params(request: Request, model) -> dict[str, Any]:
    """``k``, ``modality``, ``video`` from the query string (a .npy body's only place for
    them), each once; any other parameter is refused, naming it."""
    params: dict[str, Any] = {}
    for name, value in request.query_params.multi_items():
        if name not in QUERY_PARAMS or name not in model.model_fields:
            raise RequestError(422, f"query parameter {name[:40]!r}: not one this route takes "
                                    f"({', '.join(p for p in QUERY_PARAMS if p in model.model_fields)})")
        if name in params:
            raise RequestError(422, f"query parameter {name!r}: given more than once")
        params[name] = value
    if "k" in params:  # ASCII digits only: int() would also take " 5", "1_0", "+5" or "٥", none an integer
        if not re.fullmatch(r"-?[0-9]{1,8}", params["k"]):
            raise RequestError(422, f"k: expected an integer query parameter, got {params['k'][:20]!r}")
        params["k"] = int(params["k"])
    return params


def _served_gallery_size() -> int | None:
    """The served category / pair gallery's size, where the contract knows it."""
    served = SERVED[0] or {}
    return served.get("gallery_size") if served.get("route") == "search" else None


def _with_default_k(req):
    """A request that leaves ``k`` out gets the document's default, ``min(10, gallery size)``
    (xmr.serve.contract), not a 422 from a gallery smaller than 10."""
    size = _served_gallery_size()
    if size and "k" not in req.model_fields_set and req.k > size:
        return req.model_copy(update={"k": size})
    return req


def _npy_modality(arr: np.ndarray) -> str | None:
    """The one served modality whose shape (or element count, flat) the array has, if any."""
    served = SERVED[0] or {}
    dims = served.get("dims") if served.get("route") == "search" else None
    if not dims:
        return None
    fits = [r for r, d in dims.items() if list(arr.shape) == list(d)
            or (arr.ndim == 1 and arr.size == int(np.prod(d)))]
    return fits[0] if len(fits) == 1 else None


async def parse_request(request: Request, model) -> tuple[Any, np.ndarray | None]:
    """(validated request model, binary query array or None) from a JSON or .npy body. Query
    parameters apply to both; a field of a JSON body takes precedence over its parameter."""
    body = await request.body()
    params = _query_params(request, model)
    if request.headers.get("content-type", "").split(";")[0].strip() == NPY:
        binary = parse_npy_body(body)
        if "modality" in model.model_fields and "modality" not in params:
            inferred = _npy_modality(binary)
            if inferred is not None:
                params["modality"] = inferred
        return _with_default_k(validated(model, params)), binary
    if params:  # each parameter valid on its own, whatever the body gives
        checked = validated(model, params)
        size = _served_gallery_size()
        if "k" in params and size and checked.k > size:
            raise RequestError(422, f"k = {checked.k}: the gallery holds {size} items")
    data = parse_json_body(body)
    if not isinstance(data, dict):
        raise RequestError(422, f"body: expected a JSON object, got {type(data).__name__}")
    data = {**params, **data}
    encoded = data.pop("query_base64", None)
    req = _with_default_k(validated(model, data))
    if encoded is None:
        return req, None
    if not isinstance(encoded, str):
        raise RequestError(422, "query_base64: expected a base64 string of float32 values")
    if req.query is not None:
        raise RequestError(422, "give one of query (a JSON list) or query_base64, not both")
    return req, base64_floats(encoded)


def validated(model, data: dict[str, Any]):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestError(422, error_text(exc.errors())) from None
