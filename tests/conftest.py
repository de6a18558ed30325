"""Shared pytest fixtures: a real S3 (moto server on 127.0.0.1), and tiny datasets written
with the xmr writer, so every layer's tests run against the same real formats."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

TVR_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tvr"
# Tests that read the real TVR annotations: on a fresh clone without ../shared they skip, saying so.
needs_tvr = pytest.mark.skipif(not (TVR_DIR / "tvr_val_release.jsonl").is_file()
                               or not (TVR_DIR / "tvr_video2dur_idx.json").is_file(),
                               reason=f"needs the real TVR annotations in {TVR_DIR} (the project's ../shared "
                                      "folder beside the checkout); run it there")

# Ray reads the auth mode at import time: set before any test module imports ray.
from xmr.ray.compat import use_token_auth  # noqa: E402

use_token_auth()

from xmr.data.manifest import LabelSpec, ModalitySpec
from xmr.data.writer import DatasetWriter

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared folder (METHODS.md, TVR metadata); tests only, never product code."""
    return Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real HTTP S3 endpoint (moto server, free port on 127.0.0.1); sets the AWS env vars
    so boto3 anywhere in the process (and in forked workers) talks to it; restores them after."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = dict(S3_ENV, AWS_ENDPOINT_URL=url)
    saved = {k: os.environ.get(k) for k in list(env) + ["AWS_PROFILE", "AWS_ENDPOINT_URL_S3"]}
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ.update(env)
    try:
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket; returns its name."""
    import boto3

    name = f"xmr-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def write_tiny_category(root: Path, *, splits: dict[str, int] | None = None, samples_per_shard: int = 7,
                        seed: int = 0, kind: str = "single") -> Path:
    """Random float16 pairs, d_a=8 and b of shape [2, 4], labels of ``kind``."""
    splits = splits or {"train": 50, "val": 13}
    rng = np.random.default_rng(seed)
    num_classes = {"single": [4], "multi": [4], "hierarchical": [2, 4], "none": []}[kind]
    w = DatasetWriter(str(root), name="tiny-category", task="category",
                      modalities={"a": ModalitySpec("image", [8], "float16"),
                                  "b": ModalitySpec("audio", [2, 4], "float16")},
                      labels=LabelSpec(kind, num_classes), source={"kind": "test", "details": {"seed": seed}},
                      samples_per_shard=samples_per_shard)
    for split, n in splits.items():
        with w.split(split) as s:
            for i in range(n):
                c = int(rng.integers(4))
                meta: dict = {"id": f"{split}-{i}"}
                if kind == "single":
                    meta["label"] = c
                elif kind == "multi":
                    meta["label_set"] = sorted({c, int(rng.integers(4))})
                elif kind == "hierarchical":
                    meta["label_path"] = [c // 2, c]
                s.write(f"{split}_{i:05d}", {"a": rng.normal(size=8), "b": rng.normal(size=(2, 4))}, meta)
    w.finish()
    return root


def write_tiny_vcmr(root: Path, *, splits: dict[str, int] | None = None, samples_per_shard: int = 4,
                    seed: int = 0) -> Path:
    """Random videos of 3..9 clips (clip_len 1.5 s), 0..3 queries each of 2..5 tokens."""
    splits = splits or {"train": 24, "val": 7}
    rng = np.random.default_rng(seed)
    dv, ds, dq, clip_len = 6, 5, 4, 1.5
    w = DatasetWriter(str(root), name="tiny-vcmr", task="vcmr",
                      modalities={"visual": ModalitySpec("i3d", [dv], "float16"),
                                  "subtitle": ModalitySpec("roberta", [ds], "float16"),
                                  "query": ModalitySpec("roberta", [dq], "float16")},
                      labels=LabelSpec("none", []), source={"kind": "test", "details": {"seed": seed}},
                      clip_len=clip_len, samples_per_shard=samples_per_shard)
    desc_id = 0
    for split, n in splits.items():
        with w.split(split) as s:
            for i in range(n):
                n_clips = int(rng.integers(3, 10))
                duration = n_clips * clip_len - float(rng.uniform(0, 1.0))
                queries = []
                for _ in range(int(rng.integers(1 if i % 3 else 0, 4))):
                    t_s = float(rng.uniform(0, duration - 0.5))
                    t_e = float(rng.uniform(t_s, duration))
                    queries.append({"desc_id": desc_id, "desc": f"query {desc_id}", "type": "vt",
                                    "ts": [round(t_s, 2), round(t_e, 2)], "n_tokens": int(rng.integers(2, 6))})
                    desc_id += 1
                sub_mask = rng.integers(0, 2, size=n_clips).astype(np.uint8)
                arrays = {"visual": rng.normal(size=(n_clips, dv)),
                          "subtitle": rng.normal(size=(n_clips, ds)) * sub_mask[:, None],
                          "sub_mask": sub_mask,
                          "query_tokens": rng.normal(size=(sum(q["n_tokens"] for q in queries), dq))}
                meta = {"vid_name": f"{split}_video_{i}", "duration": round(duration, 2), "n_clips": n_clips,
                        "video_index": 1000 + i, "queries": queries}
                s.write(f"{split}_{i:05d}", arrays, meta)
    w.finish()
    return root


@pytest.fixture(scope="session")
def tiny_category_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50 train / 13 val category pairs in shards of 7 (uneven last shard); read-only."""
    return write_tiny_category(tmp_path_factory.mktemp("tiny_category"))


@pytest.fixture(scope="session")
def tiny_vcmr_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 train / 7 val videos with 0..3 queries each, shards of 4 videos; read-only."""
    return write_tiny_vcmr(tmp_path_factory.mktemp("tiny_vcmr"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Two briefly trained SCCMRL checkpoints on the audio-visual digits (different seeds)
    and an untrained QACLN checkpoint on a tiny VCMR corpus; shared by the serving tests."""
    import torch

    from train_helpers import preset_cfg, train
    from xmr.checkpoint import save_checkpoint
    from xmr.method import Method

    avdigits = str(Path(__file__).resolve().parents[1] / "data" / "avdigits")
    root = tmp_path_factory.mktemp("serve")
    out = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = preset_cfg("sccmrl", avdigits, f"seed={seed}", "model.embed_dim=32", "model.hidden_dim=64")
        method = Method(cfg)
        train(method, cfg, steps=15)
        out[f"cat{seed}"] = str(save_checkpoint(root / f"cat{seed}", method.eval(), cfg))
    vdata = write_tiny_vcmr(root / "vcmr", splits={"train": 8, "val": 9})
    cfg = preset_cfg("qacln", str(vdata), "model.embed_dim=16", "model.num_heads=2")
    torch.manual_seed(0)
    out["vcmr"] = str(save_checkpoint(root / "qacln", Method(cfg).eval(), cfg))
    out["vcmr_data"] = str(vdata)
    return out


# --------------------------------------------------------------------------- marks by what a test starts

S3_FIXTURES = {"s3_endpoint", "s3_bucket", "s3_data"}


def pytest_collection_modifyitems(config, items):
    """A test that uses the S3 fixtures starts the moto server: marked ``s3`` from its fixtures."""
    for item in items:
        if S3_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.s3)


@pytest.fixture(autouse=True)
def _ray_mark_is_honest(request):
    """A test without the ``ray`` mark that leaves an in-process Ray running fails, naming the
    mark, so ``pytest -m "not ray"`` really starts no Ray."""
    import sys

    def running() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    before = running()
    yield
    if request.node.get_closest_marker("ray") is None and not before and running():
        pytest.fail(f"{request.node.nodeid} started Ray: mark it @pytest.mark.ray")
