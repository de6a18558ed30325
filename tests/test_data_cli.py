"""``xmr data inspect`` prints the manifest summary and catches tampered shards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xmr.data.cli import main as data_cli

pytestmark = pytest.mark.timeout(120)


def test_inspect_summary_and_verify(tiny_vcmr_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert data_cli(["data", "inspect", str(tiny_vcmr_dataset), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "dataset  tiny-vcmr" in out and "task     vcmr  clip_len=1.5s" in out
    assert "visual    i3d          shape=[6] float16" in out and "labels   none" in out
    assert "verified 8/8 shards OK" in out  # 24 train videos / 4 + 7 val / 4
    train = next(line for line in out.splitlines() if line.startswith("train"))
    assert train.split()[1:4] == ["24", str(_queries(tiny_vcmr_dataset, "train")), "6"]


def _queries(root: Path, split: str) -> int:
    from xmr.data.manifest import load_manifest

    return int(load_manifest(str(root)).splits[split].num_queries or 0)


def test_inspect_detects_tampered_shard(tiny_category_dataset: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(shutil.copytree(tiny_category_dataset, tmp_path / "ds"))
    shard = root / "train-000003.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # one flipped bit-pattern inside the first member's data
    shard.write_bytes(bytes(data))
    assert data_cli(["data", "inspect", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"MISMATCH {shard}: sha256" in out and "[split train]" in out and ", 1 bad" in out
    assert data_cli(["data", "inspect", str(root), "--no-verify"]) == 0


def test_inspect_missing_dataset_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert data_cli(["data", "inspect", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "xmr data inspect: error:" in err and "nothing/manifest.json: no manifest.json" in err


def test_inspect_over_s3_as_a_subprocess(tiny_category_dataset: Path, s3_bucket: str, repo_root: Path) -> None:
    url = f"s3://{s3_bucket}/cli"
    assert data_cli(["data", "upload", str(tiny_category_dataset), url, "--quiet"]) == 0
    env = dict(os.environ, PYTHONPATH=str(repo_root / "platform"))
    run = subprocess.run([sys.executable, "-m", "xmr.data.cli", "data", "inspect", url, "--quiet",
                          "--endpoint-url", os.environ["AWS_ENDPOINT_URL"]],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "dataset  tiny-category" in run.stdout and "verified 10/10 shards OK" in run.stdout
