"""The endpoint's OpenAPI document, made for the checkpoint it serves.

FastAPI documents the routes from their signatures; this module rewrites what only the
served checkpoint knows, so that the document describes exactly the requests the endpoint
accepts and every answer it gives (``schemathesis --checks all`` finds nothing, and clients
generated from it send what the endpoint takes; tests/test_openapi.py):

- only the operation of the checkpoint's task (``/search`` for category / pair models,
  ``/moments`` for VCMR; the other answers 404 and is left out);
- each query form as one branch of a ``oneOf`` (a feature array of each modality with its
  exact shape, base64 float32, a WAV file where the dataset has an audio featuriser, text
  where the corpus has a text encoder), ``k`` within the gallery's size, and the
  ``application/x-npy`` body with its query parameters;
- every status the endpoint answers per operation, all in the one ``Error`` shape;
- the bearer scheme and ``security`` on every route but ``/healthz`` when a key is set.

The facts come from the application builder (``served_contract``, read without loading the
model) through the gateway's config (``set_contract``), held here per process as the
middleware's key is (a module both import by name)."""

from __future__ import annotations

import copy
import math
from typing import Any

from xmr.serve import requests as rq
from xmr.serve.middleware import key_configured

_CONTRACT: list[dict[str, Any] | None] = [None]
_CACHE: dict[Any, dict[str, Any]] = {}

# Formats of strings the JSON Schema cannot check itself (documented in the description;
# schemathesis hooks for them: tests/openapi_hooks.py). A float32 format names its shape:
# "float32le-base64[32,40]", "float32le-base64[1..32,4]" (1 to 32 tokens of 4 values).
FLOAT32_BASE64 = "float32le-base64"
WAV_BASE64 = "wav-base64"
NUMBER = {"type": "number", "minimum": -rq.MAX_ABS_VALUE, "maximum": rq.MAX_ABS_VALUE}
NULL = {"type": "null"}
ERROR = {"$ref": "#/components/schemas/Error"}


def served_contract(family_route: str, dims: dict[str, list[int]], gallery_size: int | None, max_query_tokens: int,
                    audio_role: str | None, text: bool, title: str | None = None) -> dict[str, Any]:
    """What the document says about one served checkpoint, and what the gateway checks each
    query against (``xmr.serve.queries``; a plain dict: it travels in the gateway's config);
    ``gallery_size`` None: not known before loading (k up to its limit); ``title`` the task
    family's name, for the 404 of the other route."""
    return {"route": family_route, "dims": {r: [int(x) for x in d] for r, d in dims.items()},
            "gallery_size": max(1, int(gallery_size)) if gallery_size else rq.MAX_K, "max_query_tokens": int(max_query_tokens),
            "audio_role": audio_role, "text": bool(text), "title": title}


def set_contract(contract: dict[str, Any] | None) -> None:
    _CONTRACT[0] = contract or None
    rq.SERVED[0] = contract or None
    _CACHE.clear()


def contract() -> dict[str, Any] | None:
    return _CONTRACT[0]


def same_shapes(dims: dict[str, list[int]]) -> bool:
    """Whether a .npy array's shape leaves its modality open (both modalities share a shape)."""
    shapes = {tuple(d) for d in dims.values()}
    return len(shapes) == 1


def _array(shape: list[int]) -> dict[str, Any]:
    schema: dict[str, Any] = NUMBER
    for n in reversed(shape):
        schema = {"type": "array", "items": schema, "minItems": n, "maxItems": n}
    return schema


def _float32_base64(shape: str, what: str) -> dict[str, Any]:
    """A base64 float32 string of ``shape`` ("64", "32,40", or "1..32,4": T tokens of 4). Type
    and format alone: the format names what JSON Schema cannot say (whole float32 values of
    that shape, finite, bounded), and a generator that knows the format makes valid ones."""
    return {"type": "string", "format": f"{FLOAT32_BASE64}[{shape}]",
            "description": f"{what}: little-endian float32 values (C order), base64 (standard alphabet, "
                           f"padded); every value finite and of magnitude at most {rq.MAX_ABS_VALUE:g}"}


def _k(maximum: int, default: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": 1, "maximum": maximum, "default": min(default, maximum),
            "description": "how many results"}


def _branch(title: str, description: str, fields: dict[str, dict[str, Any]], required: list[str],
            all_fields: tuple[str, ...]) -> dict[str, Any]:
    """One query form: its own fields, and null for every other form's field (the endpoint
    takes an explicit null as absent)."""
    props = {name: fields.get(name, NULL) for name in all_fields}
    return {"title": title, "description": description, "type": "object", "properties": props,
            "required": required, "additionalProperties": False}


def search_body(c: dict[str, Any]) -> dict[str, Any]:
    dims, k = c["dims"], _k(min(rq.MAX_K, c["gallery_size"]), 10)
    names = ("query", "query_base64", "audio_wav_base64", "text", "modality", "k")
    branches = []
    for i, (role, shape) in enumerate(sorted(dims.items())):
        other = "b" if role == "a" else "a"
        default = i == 0  # modality defaults to "a"
        modality = {"enum": [role, None] if default else [role],
                    "description": f"the query's modality{' (default)' if default else ''}; results are {other!r}"}
        required = [] if default else ["modality"]
        size = math.prod(shape)
        branches.append(_branch(f"FeaturesQuery{role.upper()}", f"a feature array of modality {role!r}, shape {shape}",
                                {"query": _array(shape), "modality": modality, "k": k}, ["query", *required], names))
        branches.append(_branch(f"Base64Query{role.upper()}",
                                f"modality {role!r} as {size} float32 values (C order, shape {shape}), base64",
                                {"query_base64": _float32_base64(",".join(map(str, shape)), f"{size} values"),
                                 "modality": modality,
                                 "k": k}, ["query_base64", *required], names))
    role = c.get("audio_role")
    if role:
        branches.append(_branch("AudioQuery", f"a PCM WAV file (8-192 kHz, 1-8 channels, at most 30 s), base64; "
                                              f"featurised like the dataset's {role!r} side",
                                {"audio_wav_base64": {"type": "string", "format": WAV_BASE64,
                                                      "description": "a WAV file (audio/wav), base64"},
                                 "modality": {"enum": [role, None], "description": f"audio queries are {role!r}"},
                                 "k": k}, ["audio_wav_base64"], names))
    return {"title": "SearchRequest", "oneOf": branches,
            "description": "exactly one query form; explicit nulls count as absent"}


def moments_body(c: dict[str, Any]) -> dict[str, Any]:
    dim, max_t = c["dims"]["query"][-1], c["max_query_tokens"]
    k = _k(100, 10)
    video = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 512}, NULL],
             "description": "a video id of the served corpus: search only that video (SVMR; 404 if unknown)"}
    names = ("query", "query_base64", "text", "k", "video")
    tokens = {"type": "array", "items": _array([dim]), "minItems": 1, "maxItems": max_t,
              "description": f"query token features [T, {dim}], 1 <= T <= {max_t}"}
    branches = [
        _branch("TokensQuery", "query token features", {"query": tokens, "k": k, "video": video}, ["query"], names),
        _branch("Base64TokensQuery", f"T x {dim} float32 values (T tokens, 1 <= T <= {max_t}), base64",
                {"query_base64": _float32_base64(f"1..{max_t},{dim}", f"T x {dim} values"), "k": k,
                 "video": video}, ["query_base64"], names)]
    if c.get("text"):
        branches.append(_branch("TextQuery", "raw text, featurised by the corpus's text encoder",
                                {"text": {"type": "string", "minLength": 1, "maxLength": 2000}, "k": k,
                                 "video": video}, ["text"], names))
    return {"title": "MomentsRequest", "oneOf": branches,
            "description": "exactly one query form; explicit nulls count as absent"}


def _npy(description: str) -> dict[str, Any]:
    return {"schema": {"type": "string", "format": "binary", "description": description}}


def _query_params(c: dict[str, Any], route: str) -> list[dict[str, Any]]:
    where = "with a .npy body, or with a JSON body that does not give it (a body field takes precedence)"
    if route == "search":
        params = [{"name": "k", "in": "query", "required": False, "description": f"how many results, {where}",
                   "schema": _k(min(rq.MAX_K, c["gallery_size"]), 10)}]
        if same_shapes(c["dims"]):
            params.append({"name": "modality", "in": "query", "required": False,
                           "description": f"the query's modality (default 'a'), {where}",
                           "schema": {"type": "string", "enum": sorted(c["dims"])}})
        return params
    return [{"name": "k", "in": "query", "required": False, "description": f"how many results, {where}",
             "schema": _k(100, 10)},
            {"name": "video", "in": "query", "required": False,
             "description": f"search only this video (SVMR; 404 if unknown), {where}",
             "schema": {"type": "string", "minLength": 1, "maxLength": 512}}]


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": ERROR}}}
    if headers:
        out["headers"] = headers
    return out


def _responses(post: bool, secured: bool, open_route: bool, extra: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if post:
        out["400"] = _error("the body is not valid JSON, or not a valid .npy array; or an invalid Content-Length")
    if secured and not open_route:
        out["401"] = _error("a missing or wrong bearer token",
                            {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}})
    elif not open_route:
        out["403"] = _error("the endpoint has no key and answers only requests from its own machine")
    out.update({code: _error(text) for code, text in extra.items()})
    if post:
        out["408"] = _error("the body did not arrive within the body deadline")
        out["411"] = _error("no Content-Length header")
        out["413"] = _error("the body (or the query) is larger than the endpoint takes")
        out["422"] = _error("a field is invalid (its message names it): shape, values, k, the query form")
    out["503"] = _error("the model is loading or no replica is ready: retry",
                        {"Retry-After": {"required": False, "schema": {"type": "string"}}})
    return out


def openapi_document(base: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document (``base``) made to describe the served checkpoint (its operation,
    request schemas and parameters; where no checkpoint was configured, the app outside Serve,
    both routes with their generic models), with every status each route answers and, when a
    key is set, the bearer scheme."""
    c = _CONTRACT[0]
    secured = key_configured()
    key = (id(c), secured, id(base))
    if key in _CACHE:
        return _CACHE[key]
    doc = copy.deepcopy(base)
    paths = doc.setdefault("paths", {})
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = {"title": "Error", "type": "object", "required": ["error"], "additionalProperties": False,
                        "properties": {"error": {"type": "string", "description": "what is wrong and what to do"}}}
    if c is not None:
        served = c["route"]
        for route in ("search", "moments"):
            if route != served:
                paths.pop(f"/{route}", None)
        op = paths.get(f"/{served}", {}).get("post")
        if op is not None:
            body = search_body(c) if served == "search" else moments_body(c)
            name = body["title"]
            schemas[name] = body
            npy = ("a float32 (or other numeric) .npy array (numpy.save): shape "
                   + (" or ".join(f"{d} (modality {r!r})" for r, d in sorted(c["dims"].items()))
                      + ", or the same values flat" if served == "search"
                      else f"[T, {c['dims']['query'][-1]}], 1 <= T <= {c['max_query_tokens']}, or the same values flat"))
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}},
                rq.NPY: _npy(npy + "; other fields as query parameters")}}
            op["parameters"] = _query_params(c, served)
            extra = {"404": "the video is not in the served corpus"} if served == "moments" else {}
            op["responses"] = {"200": op["responses"]["200"], **_responses(True, secured, False, extra)}
            schemas.pop("MomentsRequest" if served == "search" else "SearchRequest", None)
            for unused in (("MomentsResponse", "MomentHit") if served == "search" else ("SearchResponse", "SearchHit")):
                schemas.pop(unused, None)
    for path, model in (("/info", rq.InfoResponse), ("/healthz", rq.HealthResponse)):
        op = paths.get(path, {}).get("get")
        if op is not None:
            found = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in found.pop("$defs", {}).items():
                schemas[name] = sub
            schemas[model.__name__] = found
            op["responses"]["200"] = {"description": op["responses"]["200"].get("description", "Successful Response"),
                                      "content": {"application/json": {
                                          "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    for path, item in paths.items():
        for method, op in item.items():
            op["operationId"] = path.strip("/")  # the generated client's function names: search, info, ...
            if path in ("/search", "/moments"):
                if c is None:  # no checkpoint's facts: either route, either's 404
                    op["responses"] = {"200": op["responses"]["200"], **_responses(
                        True, secured, False, {"404": "the checkpoint's task is served by the other route, or an "
                                                      "unknown video"})}
            else:
                op["responses"] = {"200": op["responses"]["200"], **_responses(False, secured, path == "/healthz", {})}
            if secured:
                op["security"] = [] if path == "/healthz" else [{"bearer": []}]
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "the key the endpoint was started with (XMR_API_KEY or --api-key-file)"}}
        doc["security"] = [{"bearer": []}]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _CACHE.clear()
    _CACHE[key] = doc
    return doc
