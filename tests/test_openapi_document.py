"""The OpenAPI document's rules, without Ray (issue 37): a valid OpenAPI 3.1 document for each
served task, with and without a key; the search body's one-of rule as JSON Schema reads it
(``{}`` is not a valid request, each query form is, two at once are not); the end-to-end
check of the document against a served endpoint is tests/test_openapi.py."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

import xmr.serve.deployments  # noqa: F401 - registers the gateway's routes on the FastAPI app
from xmr.serve.contract import served_contract, set_contract
from xmr.serve.http import api
from xmr.serve.middleware import set_key_digest

CAT = served_contract("search", {"a": [64], "b": [32, 40]}, 500, 32, "b", False)
VCMR = served_contract("moments", {"query": [4], "visual": [6], "subtitle": [5]}, 9, 8, None, True)


@pytest.fixture
def document():
    def make(contract, key: bool) -> dict:
        set_contract(contract)
        set_key_digest("ab" * 32 if key else None)
        doc = api.openapi()
        validate(doc)
        return doc

    yield make
    set_contract(None)
    set_key_digest(None)


@pytest.mark.parametrize("key", [False, True])
@pytest.mark.parametrize("contract", [None, CAT, VCMR], ids=["none", "category", "vcmr"])
def test_a_valid_document_for_each_task(document, contract, key):
    doc = document(contract, key)
    served = {"/search", "/moments"} if contract is None else {f"/{contract['route']}"}
    assert set(doc["paths"]) == served | {"/healthz", "/info"}
    for path, item in doc["paths"].items():
        for op in item.values():
            for code, answer in op["responses"].items():
                if code != "200":
                    assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
            if key:
                assert op["security"] == ([] if path == "/healthz" else [{"bearer": []}])
            assert ("401" in op["responses"]) is (key and path != "/healthz")
    assert ("securitySchemes" in doc["components"]) is key


def test_the_search_body_is_one_query_form(document):
    body = Draft202012Validator(document(CAT, False)["components"]["schemas"]["SearchRequest"])
    a, b = [0.5] * 64, [[0.5] * 40] * 32
    b64 = base64.b64encode(np.zeros(64, "<f4").tobytes()).decode()
    assert not body.is_valid({})  # the rule the endpoint enforces: exactly one query form
    assert body.is_valid({"query": a}) and body.is_valid({"query": a, "k": 5, "modality": None, "text": None})
    assert body.is_valid({"query": b, "modality": "b"}) and not body.is_valid({"query": b})
    assert body.is_valid({"query_base64": b64}) and not body.is_valid({"query": a, "query_base64": b64})
    assert not body.is_valid({"query": a[:-1]}) and not body.is_valid({"query": a, "k": 501})  # shape, k <= gallery
    assert not body.is_valid({"query": [1e16] + a[1:]})  # beyond the magnitude the scores can hold
    assert not body.is_valid({"text": "a cat"})  # no category source is built from text
    assert body.is_valid({"audio_wav_base64": "UklGRg==", "modality": "b"})  # the digits' audio side


def test_the_moments_body_takes_text_where_the_corpus_has_an_encoder(document):
    doc = document(VCMR, False)
    body = Draft202012Validator(doc["components"]["schemas"]["MomentsRequest"])
    assert body.is_valid({"text": "Ross opens the door.", "video": "v1"})
    assert body.is_valid({"query": [[0.0] * 4] * 8}) and not body.is_valid({"query": [[0.0] * 4] * 9})
    assert not body.is_valid({"text": "x", "query": [[0.0] * 4]}) and not body.is_valid({})
    params = {p["name"] for p in doc["paths"]["/moments"]["post"]["parameters"]}
    assert params == {"k", "video"}
    assert document(served_contract("moments", {"query": [4]}, 9, 8, None, False), False)[
        "components"]["schemas"]["MomentsRequest"]["oneOf"][-1]["title"] == "Base64TokensQuery"  # no text branch


def _parse(body: bytes, query: str, model):
    """The gateway's request parsing, without Ray: (request model, binary) or the RequestError."""
    import asyncio

    from starlette.requests import Request

    from xmr.serve.requests import RequestError, parse_request

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": query.encode(),
             "headers": [(b"content-type", b"application/json")]}
    try:
        return asyncio.run(parse_request(Request(scope, receive), model))
    except RequestError as exc:
        return exc


def test_the_endpoint_takes_what_the_document_says_of_k(document):
    """k's documented default is min(10, gallery size): a request that leaves it out is
    answered from a smaller gallery too; a k query parameter is an integer in ASCII digits
    (int() would also take " 5", "1_0", "+5", "٥")."""
    from urllib.parse import quote

    from xmr.serve.requests import RequestError, SearchRequest

    small = served_contract("search", {"a": [64], "b": [32, 40]}, 3, 32, None, False)
    doc = document(small, False)
    branch = doc["components"]["schemas"]["SearchRequest"]["oneOf"][0]
    assert branch["properties"]["k"]["default"] == 3
    body = b'{"query": [' + b", ".join([b"0.5"] * 64) + b"]}"
    assert _parse(body, "", SearchRequest)[0].k == 3
    assert _parse(body[:-1] + b', "k": 2}', "", SearchRequest)[0].k == 2
    assert _parse(body, "k=3", SearchRequest)[0].k == 3
    for bad in (" 5", "5 ", "1_0", "+5", "\u0665", "5.0", "0x5"):
        got = _parse(body, "k=" + quote(bad), SearchRequest)
        assert isinstance(got, RequestError) and got.status == 422, bad
