"""A request's query checked once, at the gateway, against what the endpoint serves (the
contract of ``xmr.serve.contract``: the checkpoint's route, each modality's shape, the
gallery's size, the query-token limit, its featurisers), and turned into the arrays the
retrievers search. A retriever (or every shard of a sharded index) gets the parsed query,
never the request: nothing is parsed twice, and a client's mistake is answered before any
shard is asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from xmr.serve.requests import RequestError, as_array, tokens_array


@dataclass(frozen=True)
class SearchQuery:
    """Category / pair: a query of modality ``role``, answered with the other's top ``k``."""

    role: str
    vector: np.ndarray
    k: int

    @property
    def other(self) -> str:
        return "b" if self.role == "a" else "a"


@dataclass(frozen=True)
class MomentsQuery:
    """VCMR: query token features [T, d]; ``video`` restricts the search to one video (SVMR)."""

    tokens: np.ndarray
    k: int
    video: str | None = None


def served_route(served: dict[str, Any] | None, route: str) -> dict[str, Any]:
    """The contract, when the served checkpoint answers ``route``; else the client's 404
    naming the route it serves."""
    if not served:
        raise RequestError(503, "the endpoint is still being configured; retry shortly")
    if served["route"] != route:
        from xmr.tasks import FAMILIES

        serves = " / ".join(f.title for f in FAMILIES.values() if f.route == route)
        title = served.get("title") or "different"
        raise RequestError(404, f"/{route} serves {serves} models; this checkpoint is a {title} model "
                                f"(use /{served['route']})")
    return served


def search_role(req, binary: np.ndarray | None, served: dict[str, Any], audio_role: str | None) -> str:
    """The query's modality, once the request gives exactly one query form this endpoint takes."""
    if req.text is not None:
        raise RequestError(422, "text: this dataset's features come from no text encoder this endpoint has "
                                "(only VCMR corpora built with --text-encoder take text); send features in 'query'")
    if sum(x is not None for x in (req.query, req.audio_wav_base64, binary)) != 1:
        raise RequestError(422, "give exactly one of query (features), query_base64 / a .npy body, "
                                "or audio_wav_base64")
    if req.audio_wav_base64 is None:
        return req.modality or "a"
    if audio_role is None:
        raise RequestError(422, "audio_wav_base64: this gallery's dataset has no audio featuriser; send features")
    if req.modality not in (None, audio_role):
        raise RequestError(422, f"modality = {req.modality!r}: audio queries are modality {audio_role!r}")
    return audio_role


def search_vector(req, binary: np.ndarray | None, role: str, served: dict[str, Any]) -> np.ndarray:
    """The feature query as float32 of the modality's exact shape (flat base64 floats take
    the modality's shape; a .npy keeps its own)."""
    dims = served["dims"][role]
    value = req.query
    if binary is not None:
        value = binary.reshape(dims) if binary.ndim == 1 and binary.size == int(np.prod(dims)) else binary
    return as_array(value, dims, "query")


def search_query(req, role: str, vector: np.ndarray, served: dict[str, Any]) -> SearchQuery:
    """The checked query, ``k`` within the gallery's size (a sharded index's: all shards')."""
    size = served.get("gallery_size")
    if size and req.k > size:
        raise RequestError(422, f"k = {req.k}: the gallery holds {size} items")
    return SearchQuery(role, vector, req.k)


def moments_query(req, binary: np.ndarray | None, text_tokens: np.ndarray | None, served: dict[str, Any],
                  featuriser_bound: bool) -> MomentsQuery:
    """Token features [T, d] from the body (features, base64, a .npy) or from the text
    featuriser's tokens (``text_tokens``, the corpus's first ``max_query_tokens``)."""
    dim = served["dims"]["query"][-1]
    max_tokens = served["max_query_tokens"]
    if req.text is not None and (req.query is not None or binary is not None):
        raise RequestError(422, "give one of text or query (token features), not both")
    if text_tokens is not None:  # any text of 1..2000 characters (the OpenAPI document): its first tokens
        value = text_tokens[:max_tokens]
    elif binary is not None:
        value = binary.reshape(-1, dim) if binary.ndim == 1 and binary.size % dim == 0 else binary
    elif req.text is not None:
        if served.get("text") and not featuriser_bound:
            raise RequestError(503, "text: the text featuriser is not ready; retry shortly")
        raise RequestError(422, "text: this dataset's query features come from no text encoder this endpoint "
                                "has (build the corpus with xmr data synth vcmr --text-encoder); send token "
                                "features in 'query'")
    else:
        value = req.query
    if value is None:
        raise RequestError(422, "query: required (token features [T, d_query])")
    return MomentsQuery(tokens_array(value, dim, max_tokens), req.k, req.video)
