"""``xmr serve`` and ``xmr train`` as processes, as a user runs them: SIGTERM drains the
in-flight requests and exits 0 with one line; and with a real ``ray start --head`` cluster on
the machine (started and stopped by the test), every command attaches to it, says so in one
line and never passes start-only arguments. Its own module: no other Ray may be running in
the test process while these look for one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from test_serve import AVDIGITS, free_port
from test_serve import _load, _query

pytestmark = [pytest.mark.timeout(300), pytest.mark.ray, pytest.mark.serve]

REPO = Path(__file__).resolve().parents[1]


def _xmr(*args: str, env: dict | None = None) -> subprocess.Popen:
    full = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1", **(env or {})}
    full.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "xmr.cli", *args], cwd=REPO, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_line(proc: subprocess.Popen, needle: str, timeout: float, seen: list[str]) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} never printed:\n{''.join(seen)[-3000:]}")


def test_sigterm_drains_in_flight_requests_and_exits_zero(checkpoints):
    port = free_port()
    proc = _xmr("serve", "--checkpoint", checkpoints["cat0"], "--gallery", AVDIGITS, "--port", str(port))
    seen: list[str] = []
    try:
        _wait_line(proc, "[xmr] serving", 180, seen)
        url = f"http://127.0.0.1:{port}"
        statuses: list = []
        stop = threading.Event()
        threads = [threading.Thread(target=_load, args=(url, {"query": _query(), "k": 5}, stop, statuses))
                   for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stop.set()
    for t in threads:
        t.join()
    out = "".join(seen) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "[xmr] SIGTERM: stopped serving after draining in-flight requests" in out and "embedded Ray stopped" in out
    assert "*** SIGTERM received" not in out and "Traceback" not in out
    ok = [s for s in statuses if s == 200]
    # requests answered before the drain all succeeded; after it the port is closed (a refused
    # connection, never a 5xx)
    assert len(ok) > 5 and not [s for s in statuses if isinstance(s, int) and s >= 500], statuses[-10:]


def _environments_holding(secret: bytes, skip: set[int]) -> list[str]:
    """Processes on this machine (but ``skip``) whose environment holds ``secret``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            env = (entry / "environ").read_bytes()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:120].decode(errors="replace")
        except OSError:
            continue
        if secret in env:
            found.append(f"{entry.name}: {cmd}")
    return found


def test_the_key_reaches_no_ray_process_only_its_digest(checkpoints):
    """``XMR_API_KEY`` in ``xmr serve``'s environment: the raylet, the workers and both
    deployments' replicas started from it never hold it (only its digest travels), and the
    key works."""
    key = "k3y-" + os.urandom(12).hex()
    port = free_port()
    proc = _xmr("serve", "--checkpoint", checkpoints["cat0"], "--gallery", AVDIGITS, "--port", str(port),
                env={"XMR_API_KEY": key})
    seen: list[str] = []
    try:
        _wait_line(proc, "[xmr] serving", 180, seen)
        # xmr's own lines only: Ray Serve's controller / proxy / replica lines go to its log files
        assert [line for line in seen if line.strip() and not line.startswith("[xmr]")] == [], seen
        url = f"http://127.0.0.1:{port}"
        body = {"query": _query(), "k": 3}
        assert requests.post(f"{url}/search", json=body, timeout=30).status_code == 401
        ok = requests.post(f"{url}/search", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert ok.status_code == 200, ok.text
        # the process the user started holds what the user gave it; nothing it started does
        assert _environments_holding(key.encode(), skip={proc.pid, os.getpid()}) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert key not in "".join(seen)


@pytest.fixture
def ray_start_cluster(tmp_path):
    """A real `ray start --head` on this machine, stopped at the end whatever happens."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    ray_bin = Path(sys.executable).parent / "ray"
    subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=4", "--disable-usage-stats",
                    "--include-dashboard=false"], check=True, env=env, capture_output=True, timeout=120)
    try:
        yield port
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_commands_attach_to_a_running_ray_start_cluster(ray_start_cluster, checkpoints, tiny_category_dataset,
                                                        tmp_path):
    port = free_port()
    proc = _xmr("serve", "--checkpoint", checkpoints["cat0"], "--gallery", AVDIGITS, "--port", str(port))
    seen: list[str] = []
    try:
        _wait_line(proc, "[xmr] serving", 180, seen)
        assert any("attached to the Ray cluster running on this machine" in line for line in seen), seen
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(seen) + rest
    assert proc.returncode == 0 and "the cluster keeps running" in out, out[-3000:]
    assert "num_cpus and num_gpus must not be provided" not in out and "Traceback" not in out
    train = _xmr("train", "--config", "sccmrl", "--storage", str(tmp_path / "runs"), "--run-name", "attached",
                 "--set", f"data.path={tiny_category_dataset}", "--set", "optim.epochs=1",
                 "--set", "model.embed_dim=8", "--set", "model.hidden_dim=16", "--no-tracking")
    out, _ = train.communicate(timeout=240)
    assert train.returncode == 0, out[-3000:]
    assert "attached to the Ray cluster running on this machine" in out and "Traceback" not in out
