"""Storage round trips against a real S3 endpoint (moto server over HTTP), and a streaming
read that survives a connection dropped mid-body."""

from __future__ import annotations

import filecmp
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import write_tiny_category
from xmr.data import storage
from xmr.data.cli import main as data_cli
from xmr.data.manifest import LabelSpec, ModalitySpec, load_manifest
from xmr.data.reader import make_loader
from xmr.data.writer import DatasetWriter

pytestmark = pytest.mark.timeout(120)


def _batches(root: str, **kw) -> list[dict]:
    return list(make_loader(root, "train", local_batch_size=8, seed=3, **kw))


def test_round_trip_local_s3_local(tiny_category_dataset: Path, s3_bucket: str, tmp_path: Path) -> None:
    url = f"s3://{s3_bucket}/datasets/tiny"
    assert data_cli(["data", "upload", str(tiny_category_dataset), url, "--quiet"]) == 0
    assert data_cli(["data", "inspect", url, "--quiet"]) == 0
    back = tmp_path / "back"
    assert data_cli(["data", "download", url, str(back), "--quiet"]) == 0
    src_files = sorted(p.name for p in tiny_category_dataset.iterdir())
    assert sorted(p.name for p in back.iterdir()) == src_files
    match, mismatch, errors = filecmp.cmpfiles(tiny_category_dataset, back, src_files, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(src_files)

    # Reading straight from S3 (two loader worker processes, each with its own client) equals local.
    local = _batches(str(tiny_category_dataset), num_workers=2)
    remote = _batches(url, num_workers=2)
    assert len(local) == len(remote) > 0
    for lb, rb in zip(local, remote):
        assert lb["key"] == rb["key"]
        assert np.array_equal(lb["a"].numpy(), rb["a"].numpy())
        assert np.array_equal(lb["b"].numpy(), rb["b"].numpy())
        assert lb["label"].tolist() == rb["label"].tolist()


def test_writer_straight_to_s3(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/direct"
    w = DatasetWriter(url, name="direct", task="category",
                      modalities={"a": ModalitySpec("x", [3], "float32"), "b": ModalitySpec("y", [2], "float32")},
                      labels=LabelSpec("none", []), source={"kind": "test"}, samples_per_shard=2)
    with w.split("train") as s:
        for i in range(5):
            s.write(f"k{i}", {"a": np.full(3, i, np.float32), "b": np.zeros(2, np.float32)}, {"id": str(i)})
    m = w.finish()
    assert load_manifest(url).to_dict()["splits"] == m.to_dict()["splits"]
    listed = storage.list_prefix(url)
    assert listed == sorted([f"{url}/manifest.json"] + [f"{url}/train-00000{i}.tar" for i in range(3)])
    batch = next(iter(make_loader(url, "train", local_batch_size=5, shuffle=False)))
    assert batch["a"][:, 0].tolist() == [0, 1, 2, 3, 4] and "label" not in batch
    with pytest.raises(FileExistsError, match=f"{url}/manifest.json"):
        DatasetWriter(url, name="direct", task="category", modalities=w.modalities, labels=w.labels,
                      source={"kind": "test"})


def test_s3_errors_name_the_url(s3_bucket: str) -> None:
    missing = f"s3://{s3_bucket}/nothing/manifest.json"
    with pytest.raises(FileNotFoundError, match=f"{missing}: NoSuchKey"):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/nothing/manifest.json"):
        load_manifest(f"s3://{s3_bucket}/nothing")
    assert not storage.exists(missing)
    storage.write_bytes(missing, b"{}")
    assert storage.exists(missing) and storage.read_bytes(missing) == b"{}"


class DroppingProxy:
    """TCP proxy to the S3 endpoint that cuts the first connection whose response passes
    ``drop_after`` bytes: a real dropped connection in the middle of a body."""

    def __init__(self, upstream: tuple[str, int], drop_after: int) -> None:
        self.upstream, self.drop_after, self.drops = upstream, drop_after, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, up, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, is_response: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if is_response and self.drops == 0 and sent + len(data) > self.drop_after:
                    self.drops += 1
                    dst.sendall(data[: self.drop_after - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_streaming_read_resumes_after_dropped_connection(s3_endpoint: str, s3_bucket: str) -> None:
    payload = np.random.default_rng(0).bytes(3 << 20)
    url = f"s3://{s3_bucket}/big.bin"
    storage.write_bytes(url, payload)
    host, port = s3_endpoint.removeprefix("http://").split(":")
    proxy = DroppingProxy((host, int(port)), drop_after=200_000)
    with storage.open_read(url, endpoint_url=f"http://127.0.0.1:{proxy.port}", buffer_size=1 << 16) as f:
        got = b"".join(iter(lambda: f.read(100_000), b""))
        resumes = f.raw.resumes  # type: ignore[attr-defined]
    proxy.sock.close()
    assert proxy.drops == 1 and resumes == 1
    assert got == payload


def test_local_storage_helpers(tmp_path: Path) -> None:
    root = write_tiny_category(tmp_path / "ds", splits={"train": 9})
    files = storage.list_prefix(str(root))
    assert [Path(f).name for f in files] == ["manifest.json", "train-000000.tar", "train-000001.tar"]
    copied = storage.upload_dir(str(root), str(tmp_path / "copy"), progress=False)
    assert all(filecmp.cmp(a, b, shallow=False) for a, b in zip(files, sorted(copied)))
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.read_bytes(str(tmp_path / "nope"))


def test_download_refuses_keys_that_resolve_outside_the_folder(s3_bucket: str, tmp_path: Path) -> None:
    """An S3 key is a string, not a path: ``ckpt/../../../x/rel.txt`` lists under ``ckpt/``
    and would be written three folders above the download's target (issue 24)."""
    storage.write_bytes(f"s3://{s3_bucket}/ckpt/model.safetensors", b"weights")
    storage.write_bytes(f"s3://{s3_bucket}/ckpt/../../../x/rel.txt", b"planted")
    target = tmp_path / "a" / "b" / "c" / "local"
    with pytest.raises(ValueError, match=r"'\.\./\.\./\.\./x/rel\.txt' resolves outside"):
        storage.download_dir(f"s3://{s3_bucket}/ckpt", str(target), progress=False)
    assert not (tmp_path / "a" / "x").exists() and not list(tmp_path.rglob("rel.txt"))
