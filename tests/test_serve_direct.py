"""`xmr serve --direct`: Ray Serve in throughput-optimised mode, where the replica answers
HTTP on a port of its own (no proxy hop). Over real HTTP: the replica's port gives the same
results as the proxy's and as offline retrieval, validates input the same way, and binds
127.0.0.1."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import pytest
import requests
import torch

from test_serve import (AVDIGITS, BAD_SEARCH, assert_error, free_port,
                        offline_category, post)
from xmr.data.reader import make_loader

pytestmark = [pytest.mark.timeout(300), pytest.mark.ray, pytest.mark.serve]


@pytest.fixture(scope="module")
def direct(checkpoints):
    import ray

    from xmr.ray.serve import THROUGHPUT_ENV, direct_urls
    from xmr.serve.startup import start

    assert not ray.is_initialized()
    before = os.environ.get(THROUGHPUT_ENV)
    proxy = start({"checkpoint": checkpoints["cat0"], "gallery": AVDIGITS, "split": "test"}, port=free_port(),
                  name="cat", direct=True)
    urls = direct_urls("cat")
    yield {"proxy": proxy, "direct": urls}
    ray.shutdown()  # not serve.shutdown(): direct ingress drains replicas for 30 s first
    if before is None:
        os.environ.pop(THROUGHPUT_ENV, None)
    else:
        os.environ[THROUGHPUT_ENV] = before


def test_replica_port_answers_like_the_proxy_and_offline(direct, checkpoints):
    assert len(direct["direct"]) == 1
    replica = direct["direct"][0]
    assert urlparse(replica).hostname == "127.0.0.1" and urlparse(replica).port != urlparse(direct["proxy"]).port
    method, ids, a, b = offline_category(checkpoints["cat0"])
    queries = list(make_loader(AVDIGITS, "val", local_batch_size=8, shuffle=False))[0]
    for i in range(3):
        x = queries["a"][i].float()
        via_replica = post(f"{replica}/search", {"query": x.tolist(), "k": 5})
        via_proxy = post(f"{direct['proxy']}/search", {"query": x.tolist(), "k": 5})
        assert via_replica.status_code == via_proxy.status_code == 200, via_replica.text
        assert via_replica.json() == via_proxy.json()
        with torch.no_grad():
            q = torch.nn.functional.normalize(method.model.encode("a", x[None]), dim=-1)[0]
        top = torch.argsort(b @ q, descending=True)[:5]
        assert [h["id"] for h in via_replica.json()["results"]] == [ids[j] for j in top]
    info = requests.get(f"{replica}/info", timeout=30).json()
    assert info["gallery_size"] == len(ids) and info["batching"]["search"]["queries"] >= 3


@pytest.mark.parametrize("body, status, message", BAD_SEARCH, ids=[str(i) for i in range(len(BAD_SEARCH))])
def test_replica_port_validates_input_like_the_proxy(direct, body, status, message):
    assert_error(f"{direct['direct'][0]}/search", body, status, message)


def test_replica_port_refuses_oversized_bodies(direct):
    from xmr.serve.requests import MAX_BODY_BYTES

    r = post(f"{direct['direct'][0]}/search", b"[" + b"0," * (MAX_BODY_BYTES // 2) + b"0]")
    assert r.status_code == 413 and "exceeds" in r.json()["error"]
