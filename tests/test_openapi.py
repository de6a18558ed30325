"""The endpoint's OpenAPI document tells the truth (issue 37): schemathesis, every check on,
runs against a real ``xmr serve`` application of a category and of a VCMR checkpoint, with
and without a bearer key, and finds nothing; a client generated from the document
(openapi-python-client) gets the same top-k as the raw HTTP call.

One module, one Ray: the two applications are deployed once and redeployed with a key (the
gateway is reconfigured in place), so the module costs one Serve start. The tests run in
the order of the key they need (every test without it, then every test with it), so the
applications are redeployed once, not at every switch (a switch costs both apps' gateways
~2 s on 2 cores; the old order switched five times)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import requests

from conftest import TVR_DIR, needs_tvr
from test_serve import free_port
from train_helpers import wait_healthy

pytestmark = [pytest.mark.timeout(900), pytest.mark.ray, pytest.mark.serve]

REPO = Path(__file__).resolve().parents[1]
AVDIGITS = str(REPO / "data" / "avdigits")
KEY = "openapi-contract-key-37-abcdefgh"
SEED = 37
EXAMPLES = 100  # per operation
ST = Path(sys.executable).with_name("st")
# openapi-python-client pins a typer that transformers (the [text] extra) cannot share: it
# lives in a venv of its own that scripts/setup.sh makes (requirements/codegen.txt).
CODEGEN = Path(sys.executable).parents[1] / "codegen" / "bin"


def _args(kind: str, checkpoints: dict, key: bool) -> dict:
    args = ({"checkpoint": checkpoints["cat0"], "gallery": AVDIGITS, "split": "test"} if kind == "cat" else
            {"checkpoint": checkpoints["vcmr"], "gallery": checkpoints["vcmr_data"], "split": "val"})
    if key:
        args["api_key_sha256"] = hashlib.sha256(KEY.encode()).hexdigest()
    return args


@pytest.fixture(scope="module")
def served(checkpoints):
    """The category app at /c and the VCMR app at /v; ``use(key)`` redeploys both with or
    without the key and waits until the gateways answer that way."""
    import ray
    from ray import serve

    from xmr.serve.startup import start

    ray.init(num_cpus=6, include_dashboard=False)
    port = free_port()
    state = {"key": None}

    def use(key: bool) -> dict:
        if state["key"] is not key:
            urls = {kind: start(_args(kind, checkpoints, key), port=port, name=kind, route_prefix=f"/{kind[0]}")
                    for kind in ("cat", "vcmr")}
            for url in urls.values():
                wait_healthy(url)
                deadline = time.time() + 60
                while time.time() < deadline:  # the gateway has taken the new config
                    if (requests.get(f"{url}/info", timeout=10).status_code == 401) is key:
                        break
                    time.sleep(0.5)
            state.update(key=key, urls=urls)
        return state["urls"]

    use.port = port
    yield use
    serve.shutdown()
    ray.shutdown()


def _auth(key: bool) -> dict:
    return {"Authorization": f"Bearer {KEY}"} if key else {}


def _document(url: str, key: bool) -> dict:
    r = requests.get(f"{url}/openapi.json", headers=_auth(key), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _generation_env(doc: dict) -> dict:
    """The served document's float32 formats and .npy shapes, for the hooks' strategies
    (tests/openapi_hooks.py)."""
    formats, shapes = set(), []

    def walk(node):
        if isinstance(node, dict):
            if str(node.get("format", "")).startswith("float32le-base64["):
                formats.add(node["format"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    for name in formats:  # each shape, and the same values flat
        dims = [int(p.partition("..")[2] or p) for p in name[name.index("[") + 1:-1].split(",")]
        low = [int(p.partition("..")[0]) for p in name[name.index("[") + 1:-1].split(",")]
        for d in {tuple(dims), tuple(low)}:
            shapes += [list(d), [int(np.prod(d))]]
    return {"XMR_ST_FORMATS": json.dumps(sorted(formats)), "XMR_ST_NPY_SHAPES": json.dumps(shapes)}


# --------------------------------------------------------------------------- the document itself


def test_the_document_matches_the_served_checkpoint(served):
    urls = served(False)
    cat, vcmr = _document(urls["cat"], False), _document(urls["vcmr"], False)
    from openapi_spec_validator import validate

    for doc in (cat, vcmr):
        validate(doc)  # valid OpenAPI 3.1
    assert set(cat["paths"]) == {"/search", "/healthz", "/info"}  # no /moments on a category model
    assert set(vcmr["paths"]) == {"/moments", "/healthz", "/info"}
    branches = {b["title"]: b for b in cat["components"]["schemas"]["SearchRequest"]["oneOf"]}
    assert {"FeaturesQueryA", "FeaturesQueryB", "Base64QueryA", "Base64QueryB", "AudioQuery"} == set(branches)
    a = branches["FeaturesQueryA"]["properties"]["query"]
    b = branches["FeaturesQueryB"]["properties"]["query"]
    assert (a["minItems"], a["maxItems"]) == (64, 64) and (b["minItems"], b["items"]["minItems"]) == (32, 40)
    info = requests.get(f"{urls['cat']}/info", timeout=10).json()
    op = cat["paths"]["/search"]["post"]
    assert op["parameters"][0]["schema"]["maximum"] == min(1000, info["gallery_size"])
    assert set(op["requestBody"]["content"]) == {"application/json", "application/x-npy"}
    assert {"200", "400", "403", "408", "411", "413", "422", "503"} == set(op["responses"])
    assert "securitySchemes" not in cat["components"] and "security" not in cat
    # a TRACE gets 405 with the methods the route takes
    r = requests.request("TRACE", f"{urls['cat']}/healthz", timeout=10)
    assert r.status_code == 405 and "GET" in r.headers["Allow"] and "error" in r.json()


# --------------------------------------------------------------------------- schemathesis, all checks


def _schemathesis(url: str, key: bool, tmp_path: Path) -> None:
    """``st run`` with every check, a fixed seed and EXAMPLES per operation: no finding, and
    every operation of the document tested."""
    doc = _document(url, key)
    cmd = [str(ST), "run", f"{url}/openapi.json", "--checks", "all", "--seed", str(SEED),
           "--max-examples", str(EXAMPLES), "--workers", "1", "--request-timeout", "30",
           "--report", "junit", "--report-dir", str(tmp_path)]
    if key:
        cmd += ["--header", f"Authorization: Bearer {KEY}"]
    env = {**os.environ, **_generation_env(doc), "SCHEMATHESIS_HOOKS": "openapi_hooks",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
           "NO_COLOR": "1", "COLUMNS": "200"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-12000:]
    assert "No issues found" in report, report[-4000:]
    # every operation of the document was exercised, none failed or was skipped
    junit = ElementTree.parse(next(tmp_path.glob("junit-*.xml"))).getroot()
    tested = {case.get("name") for case in junit.iter("testcase")}
    assert tested == {f"{m.upper()} {p}" for p, item in doc["paths"].items() for m in item}, report[-4000:]
    assert [junit.get(n) for n in ("errors", "failures", "skipped")] == ["0", "0", "0"], report[-4000:]


@needs_tvr
def test_schemathesis_finds_nothing_on_a_text_corpus(served, tmp_path_factory, tmp_path):
    """A corpus whose query tokens came from all-MiniLM-L6-v2: /moments also takes text (its
    own branch of the document), featurised by the TextFeaturiser deployment."""
    if importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("the [text] extra is not installed (make test installs it: pip install -e '.[test,text]')")
    import torch

    from train_helpers import preset_cfg
    from xmr.checkpoint import save_checkpoint
    from xmr.cli import main
    from xmr.method import Method
    from xmr.serve.startup import start

    served(False)
    root = tmp_path_factory.mktemp("text")
    data = root / "tvr-text"
    assert main(["data", "synth", "vcmr", "--queries-from", str(TVR_DIR / "tvr_val_release.jsonl"), "--text-encoder",
                 "minilm", "--splits", "train=4", "--out", str(data), "--quiet"]) == 0
    cfg = preset_cfg("qacln", str(data), "model.embed_dim=16", "model.num_heads=2", "data.max_query_tokens=8",
                     "data.val_split=train", "data.test_split=train")
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "ck", Method(cfg).eval(), cfg)
    url = start({"checkpoint": str(ckpt), "gallery": str(data), "split": "train"}, port=served.port, name="text",
                route_prefix="/t")
    wait_healthy(url)
    doc = _document(url, False)
    assert "TextQuery" in {b["title"] for b in doc["components"]["schemas"]["MomentsRequest"]["oneOf"]}
    _schemathesis(url, False, tmp_path)


@pytest.mark.parametrize("kind, key", [("cat", False), ("vcmr", False), ("cat", True), ("vcmr", True)],
                         ids=["cat-no-key", "vcmr-no-key", "cat-key", "vcmr-key"])
def test_schemathesis_finds_nothing(served, kind, key, tmp_path):
    _schemathesis(served(key)[kind], key, tmp_path)


# --------------------------------------------------------------------------- with the key (after every test without)


def test_a_key_adds_the_bearer_scheme(served):
    urls = served(True)
    doc = _document(urls["vcmr"], True)
    from openapi_spec_validator import validate

    validate(doc)
    assert doc["components"]["securitySchemes"]["bearer"] == {**doc["components"]["securitySchemes"]["bearer"],
                                                              "type": "http", "scheme": "bearer"}
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    for path in ("/moments", "/info"):
        op = next(iter(doc["paths"][path].values()))
        assert op["security"] == [{"bearer": []}] and "401" in op["responses"] and "403" not in op["responses"]
    assert requests.get(f"{urls['vcmr']}/openapi.json", timeout=10).status_code == 401


# --------------------------------------------------------------------------- a generated client


@pytest.mark.skipif(not (CODEGEN / "openapi-python-client").is_file(),
                    reason="openapi-python-client's venv (.venv/codegen) is missing: run scripts/setup.sh")
def test_a_generated_client_gets_the_raw_calls_top_k(served, tmp_path):
    urls = served(True)
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(_document(urls["cat"], True)))
    gen = subprocess.run([str(CODEGEN / "openapi-python-client"), "generate", "--path", str(spec), "--output-path",
                          str(tmp_path / "client"), "--meta", "none"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert gen.returncode == 0, gen.stdout + gen.stderr
    from xmr.data.reader import make_loader

    x = next(iter(make_loader(AVDIGITS, "val", local_batch_size=1, shuffle=False)))["b"][0].float().numpy()
    raw = requests.post(f"{urls['cat']}/search", json={"query": x.tolist(), "modality": "b", "k": 5},
                        headers=_auth(True), timeout=30)
    assert raw.status_code == 200, raw.text
    (tmp_path / "query.json").write_text(json.dumps(x.tolist()))
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from client import AuthenticatedClient
        from client.api.default import search
        from client.models import FeaturesQueryB, FeaturesQueryBModality
        c = AuthenticatedClient(base_url={urls['cat']!r}, token={KEY!r}, timeout=30)
        q = json.load(open({str(tmp_path / 'query.json')!r}))
        r = search.sync_detailed(client=c, body=FeaturesQueryB(query=q, modality=FeaturesQueryBModality("b"), k=5))
        assert r.status_code == 200, r.content
        print(json.dumps(r.parsed.to_dict()))
        """)
    run = subprocess.run([str(CODEGEN / "python"), "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    got = json.loads(run.stdout)
    assert [h["id"] for h in got["results"]] == [h["id"] for h in raw.json()["results"]]
    assert [h["score"] for h in got["results"]] == [h["score"] for h in raw.json()["results"]]
    assert len(got["results"]) == 5
