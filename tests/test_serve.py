"""The endpoint over real HTTP on a real local Ray Serve: results equal offline retrieval
with the same checkpoint, every bad input gets a 4xx JSON error, a checkpoint swap under a
stream of requests loses none, and fuzzed bodies never produce a 500."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import wave

import numpy as np
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_tiny_vcmr
from train_helpers import preset_cfg, train
from xmr.checkpoint import save_checkpoint
from xmr.data.manifest import load_manifest
from xmr.data.reader import make_loader
from xmr.method import Method

pytestmark = pytest.mark.timeout(300)

AVDIGITS = os.path.join(os.path.dirname(__file__), "..", "data", "avdigits")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two briefly trained SCCMRL checkpoints on the audio-visual digits (different seeds)
    and an untrained QACLN checkpoint on a tiny VCMR corpus."""
    root = tmp_path_factory.mktemp("serve")
    out = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = preset_cfg("sccmrl", AVDIGITS, f"seed={seed}", "model.embed_dim=32", "model.hidden_dim=64")
        method = Method(cfg)
        train(method, cfg, steps=15)
        out[f"cat{seed}"] = str(save_checkpoint(root / f"cat{seed}", method.eval(), cfg))
    vdata = write_tiny_vcmr(root / "vcmr", splits={"train": 8, "val": 9})
    cfg = preset_cfg("qacln", str(vdata), "model.embed_dim=16", "model.num_heads=2")
    torch.manual_seed(0)
    out["vcmr"] = str(save_checkpoint(root / "qacln", Method(cfg).eval(), cfg))
    out["vcmr_data"] = str(vdata)
    return out


@pytest.fixture(scope="module")
def endpoint(checkpoints):
    import ray
    from ray import serve

    from xmr.serve.cli import start

    os.environ["RAY_AUTH_MODE"] = "token"
    ray.init(num_cpus=4, include_dashboard=False)
    port = free_port()
    url = start({"checkpoint": checkpoints["cat0"], "gallery": AVDIGITS, "split": "test"}, port=port, name="cat")
    vurl = start({"checkpoint": checkpoints["vcmr"], "gallery": checkpoints["vcmr_data"], "split": "val"},
                 port=port, name="vcmr", route_prefix="/v")
    yield {"cat": url, "vcmr": vurl}
    serve.shutdown()
    ray.shutdown()


def post(url: str, body, **kw) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url, data=data, headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                         timeout=60, **kw)


@torch.no_grad()
def offline_category(ckpt: str, split: str = "test"):
    """Independent offline retrieval: embed the split with the checkpoint, cosine scores."""
    method = Method.from_checkpoint(ckpt).eval()
    ids, a, b = [], [], []
    for batch in make_loader(AVDIGITS, split, local_batch_size=64, shuffle=False):
        ids += batch["key"]
        a.append(torch.nn.functional.normalize(method.model.encode("a", batch["a"]), dim=-1))
        b.append(torch.nn.functional.normalize(method.model.encode("b", batch["b"]), dim=-1))
    return method, ids, torch.cat(a), torch.cat(b)


def test_search_equals_offline_retrieval(endpoint, checkpoints):
    method, ids, a, b = offline_category(checkpoints["cat0"])
    queries = list(make_loader(AVDIGITS, "val", local_batch_size=8, shuffle=False))[0]
    for role, gallery in (("a", b), ("b", a)):
        for i in range(4):
            x = queries[role][i].float()
            r = post(f"{endpoint['cat']}/search", {"query": x.tolist(), "modality": role, "k": 5})
            assert r.status_code == 200, r.text
            with torch.no_grad():
                q = torch.nn.functional.normalize(method.model.encode(role, x[None]), dim=-1)[0]
            scores = gallery @ q
            top = torch.argsort(scores, descending=True)[:5]
            got = r.json()["results"]
            assert [h["id"] for h in got] == [ids[j] for j in top]
            assert [h["score"] for h in got] == pytest.approx(scores[top].tolist(), abs=1e-5)
            assert all(isinstance(h["label"], int) for h in got)


def wav_bytes(x: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def test_wav_query_is_featurised_like_the_dataset(endpoint):
    t = np.arange(16000) / 16000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t) * np.hanning(len(t))
    r = post(f"{endpoint['cat']}/search", {"audio_wav_base64": base64.b64encode(wav_bytes(tone)).decode(), "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["modality"] == "a" and len(body["results"]) == 3  # audio (b) queries images (a)


def test_info_and_health(endpoint, checkpoints):
    assert requests.get(f"{endpoint['cat']}/healthz", timeout=10).json() == {"status": "ok"}
    info = requests.get(f"{endpoint['cat']}/info", timeout=10).json()
    assert info["gallery_size"] == load_manifest(AVDIGITS).splits["test"].num_samples
    assert info["input_dims"] == {"a": [64], "b": [32, 40]} and info["search"] == "exact"
    schema = requests.get(f"{endpoint['cat']}/openapi.json", timeout=10).json()
    assert "/search" in schema["paths"] and {"SearchResponse", "MomentsResponse"} <= set(schema["components"]["schemas"])


def test_direct_urls_says_how_to_enable_direct_ingress(endpoint):
    """This module's Ray runs Serve's default proxy path: asking for the replicas' own ports
    fails with the setting that enables them."""
    from xmr.serve.cli import THROUGHPUT_ENV, direct_urls

    with pytest.raises(RuntimeError, match=THROUGHPUT_ENV):
        direct_urls("cat", timeout_s=1)


@torch.no_grad()
def test_moments_equal_offline_and_svmr(endpoint, checkpoints):
    from xmr.tasks.vcmr import encode_corpus, rank_queries
    from xmr.metrics.vcmr import clips_to_moment

    method = Method.from_checkpoint(checkpoints["vcmr"]).eval()
    data = checkpoints["vcmr_data"]
    corpus, meta = encode_corpus(method.model, make_loader(data, "val", local_batch_size=64, shuffle=False, unit="video"))
    qb = next(iter(make_loader(data, "val", local_batch_size=4, shuffle=False, unit="query")))
    n = int(qb["q_mask"][0].sum())
    tokens = qb["q_tokens"][0, :n].float()
    r = post(f"{endpoint['vcmr']}/moments", {"query": tokens.tolist(), "k": 5})
    assert r.status_code == 200, r.text
    q = method.model.encode_queries(tokens[None], torch.ones(1, n, dtype=torch.bool))
    _, ranked = rank_queries(method.model, q, corpus, method.cfg.model.top_videos, method.cfg.model.max_moment_clips, 5)
    v = ranked.video[0]
    t_s, t_e = clips_to_moment(ranked.st[0].numpy(), ranked.ed[0].numpy(), 1.5, meta["duration"][v].numpy())
    got = r.json()["results"]
    assert [h["video"] for h in got] == [meta["vid_name"][i] for i in v.tolist()]
    assert [h["start"] for h in got] == pytest.approx(np.round(t_s, 3).tolist(), abs=1e-3)
    assert [h["end"] for h in got] == pytest.approx(np.round(t_e, 3).tolist(), abs=1e-3)
    assert [h["score"] for h in got] == pytest.approx(ranked.score[0].tolist(), rel=1e-4)
    one = post(f"{endpoint['vcmr']}/moments", {"query": tokens.tolist(), "k": 3, "video": meta["vid_name"][2]})
    assert one.status_code == 200 and {h["video"] for h in one.json()["results"]} == {meta["vid_name"][2]}


BAD_SEARCH = [
    ({"query": [0.1] * 63}, 422, "expected shape [64]"),
    ({"query": [[0.1] * 40] * 31, "modality": "b"}, 422, "expected shape [32, 40]"),
    ('{"query": [NaN' + ", 0.0" * 63 + "]}", 422, "NaN or Inf"),
    ('{"query": [Infinity' + ", 0.0" * 63 + "]}", 422, "NaN or Inf"),
    ({"query": []}, 422, "query"),
    ({}, 422, "exactly one of"),
    ({"query": [0.1] * 64, "k": 0}, 422, "k:"),
    ({"query": [0.1] * 64, "k": 1001}, 422, "k:"),
    ({"query": [0.1] * 64, "k": 999}, 422, "the gallery holds"),
    ({"query": [0.1] * 64, "k": "3"}, 422, "k:"),
    ({"query": [0.1] * 64, "modality": "c"}, 422, "modality"),
    ({"query": ["x"] * 64}, 422, "query"),
    ({"query": [True] * 64}, 422, "query"),
    ({"query": [0.1] * 64, "extra": 1}, 422, "extra"),
    ({"audio_wav_base64": "%%%not base64"}, 422, "not valid base64"),
    ({"audio_wav_base64": base64.b64encode(b"RIFF0000WAVEjunk").decode()}, 422, "not a readable PCM WAV"),
    ({"audio_wav_base64": base64.b64encode(wav_bytes(np.zeros(0))).decode()}, 422, "no samples"),
    ({"audio_wav_base64": base64.b64encode(wav_bytes(np.zeros(16000 * 40))).decode()}, 413, "at most"),
    ('{"query": [0.1, ', 422, "JSON"),
    ("[1, 2, 3]", 422, ""),
]


def assert_error(url: str, body, status: int, message: str) -> None:
    """The request gets ``status`` with a JSON error that contains ``message``."""
    r = post(url, body)
    assert r.status_code == status, r.text
    assert message.lower() in r.json()["error"].lower()


@pytest.mark.parametrize("body, status, message", BAD_SEARCH, ids=[str(i) for i in range(len(BAD_SEARCH))])
def test_bad_search_inputs_get_a_clear_4xx(endpoint, body, status, message):
    assert_error(f"{endpoint['cat']}/search", body, status, message)


def test_bad_moments_inputs_and_oversized_bodies(endpoint):
    v = endpoint["vcmr"]
    cases = [({"query": [[0.1] * 4], "video": "no-such-video"}, 404, "not in the served corpus"),
             ({"text": "a man opens a door"}, 422, "no text encoder"),
             ({"query": [[0.1] * 3]}, 422, "4 features per token"),
             ({"query": [[0.1] * 4] * 33}, 422, "1..32 tokens"),
             ({"query": [[0.1] * 4], "k": 101}, 422, "k:"),
             ({}, 422, "query: required")]
    for body, status, message in cases:
        r = post(f"{v}/moments", body)
        assert r.status_code == status and message in r.json()["error"], (body, r.text)
    big = b'{"query": [' + b"0.1," * (2 << 20) + b"0.1]}"
    r = post(f"{endpoint['cat']}/search", big)
    assert r.status_code == 413 and "exceeds" in r.json()["error"]
    r = post(f"{v}/search", {"query": [0.1] * 4})
    assert r.status_code == 404 and "VCMR model" in r.json()["error"]


def test_checkpoint_swap_under_load_loses_no_request(endpoint, checkpoints):
    from xmr.serve.cli import start

    url = endpoint["cat"]
    port = int(url.rsplit(":", 1)[1])
    statuses, stop = [], threading.Event()
    body = {"query": [0.2] * 64, "k": 3}

    def stream():
        while not stop.is_set():
            try:
                statuses.append(post(f"{url}/search", body).status_code)
            except requests.RequestException as exc:  # a dropped connection counts as lost
                statuses.append(repr(exc))

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        start({"checkpoint": checkpoints["cat1"], "gallery": AVDIGITS, "split": "test"}, port=port, name="cat")
        deadline = __import__("time").time() + 120
        while requests.get(f"{url}/info", timeout=10).json()["checkpoint"] != checkpoints["cat1"]:
            assert __import__("time").time() < deadline, "the new checkpoint never went live"
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(statuses) > 20 and set(statuses) == {200}, [s for s in statuses if s != 200][:5]
    start({"checkpoint": checkpoints["cat0"], "gallery": AVDIGITS, "split": "test"}, port=port, name="cat")


json_values = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=30)
bodies = st.dictionaries(st.sampled_from(["query", "k", "modality", "audio_wav_base64", "video", "text", "zz"]),
                         json_values | st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=0, max_size=70),
                         max_size=4)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, path=st.sampled_from(["/search", "/moments"]))
def test_fuzzed_bodies_never_get_a_500(endpoint, body, path):
    base = endpoint["vcmr"] if path == "/moments" else endpoint["cat"]
    r = post(f"{base}{path}", json.dumps(body, allow_nan=True))
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code >= 400:
        assert "error" in r.json()
