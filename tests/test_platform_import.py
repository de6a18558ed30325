"""`platform/` is a source root, never a package: the stdlib `platform` module must still win."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]


def test_platform_dir_has_no_init():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_importable_from_repo_root():
    # cwd = repo root puts '' (the repo root) first on sys.path, where platform/ lives.
    code = "import platform, sys; print(platform.system()); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    system, origin = out.stdout.split()
    assert system == __import__("platform").system()
    assert not origin.startswith(str(REPO)), f"platform resolved to the repo: {origin}"


def test_torch_ray_boto3_import_from_repo_root():
    code = "import torch, ray, boto3, webdataset, xmr; print(xmr.__version__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
