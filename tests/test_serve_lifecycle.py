"""``xmr serve`` and ``xmr train`` as processes, as a user runs them: SIGTERM drains the
in-flight requests and exits 0 with one line; and with a real ``ray start --head`` cluster on
the machine (started and stopped by the test), every command attaches to it, says so in one
line and never passes start-only arguments. Its own module: no other Ray may be running in
the test process while these look for one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
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
        # the gateway's malloc keeps a fixed mmap threshold (GATEWAY_ENV: memory after bursts of large bodies)
        from train_helpers import processes_titled
        from xmr.ray.serve import GATEWAY_ENV

        gateways = processes_titled("ray::ServeReplica:xmr:Gateway")
        assert gateways, "no gateway replica found by its title"
        for pid in gateways:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert all(f"{k}={v}".encode() in environ for k, v in GATEWAY_ENV.items()), pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert key not in "".join(seen)


def _stop_cluster_under(temp: str) -> None:
    """Stop the cluster whose processes name ``temp`` (its GCS, raylet, log monitor...) and
    the processes they started (its workers: Serve's controller, proxy and replicas, titled
    ``ray::...``), by their pids, as ``ray stop --force`` would (SIGKILL: the cluster is the
    test's own and thrown away; its GCS and raylet sit out a SIGTERM for 20 s once Serve ran
    on it). ``ray stop`` itself takes no address or temp dir: it would stop every Ray on the
    machine, other people's included."""
    def ours() -> set[int]:
        parents, named = {}, set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    state, parent = (entry / "stat").read_text().rpartition(")")[2].split()[:2]
                    if state == "Z":  # dead already, waiting to be reaped
                        continue
                    parents[int(entry.name)] = int(parent)
                    if temp.encode() in (entry / "cmdline").read_bytes():
                        named.add(int(entry.name))
                except (OSError, ValueError, IndexError):
                    pass
        found = set(named)
        while True:  # and their descendants
            more = {pid for pid, parent in parents.items() if parent in found} - found
            if not more:
                return found
            found |= more

    for pid in ours():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.time() + 20
    while ours() and time.time() < deadline:
        time.sleep(0.2)
    assert not ours(), f"processes of the cluster under {temp} outlived SIGKILL"


@pytest.fixture
def ray_start_cluster(monkeypatch):
    """A real `ray start --head` on this machine, stopped at the end whatever happens. Its
    temp dir is the test's own (``RAY_TMPDIR``, for ``ray start`` and for the commands this
    test starts: Ray's bootstrap file, which they read to find "the cluster running on this
    machine", lives in it), so no other command on the machine attaches to it, and it is
    stopped by its own processes' pids instead of ``ray stop --force``, which would kill
    every Ray on the machine."""
    temp = tempfile.mkdtemp(prefix="xr35-")  # short: Ray's socket paths live under it
    monkeypatch.setenv("RAY_TMPDIR", temp)
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    ray_bin = Path(sys.executable).parent / "ray"
    try:
        subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=4", "--disable-usage-stats",
                        "--include-dashboard=false"], check=True, env=env, capture_output=True, timeout=120)
        yield port
    finally:
        _stop_cluster_under(temp)
        shutil.rmtree(temp, ignore_errors=True)


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


def _searches(url: str, body: dict, key: str, stop: threading.Event, answers: list) -> None:
    """Searches back to back until ``stop``; each answer as (status, body's first bytes,
    times resent). Like Go's HTTP client or a browser, the session resends a request whose
    connection closed before any answer came (RFC 9110 §9.2.2; every xmr route is a read):
    HAProxy closes a keep-alive client connection that way when the gateway replica holding
    its request dies on a reused server connection, where Serve's proxy answers a 500."""
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    with requests.Session() as s:
        s.mount("http://", HTTPAdapter(max_retries=Retry(total=2, connect=2, read=2, status=0, other=0,
                                                          allowed_methods=None, raise_on_status=False)))
        while not stop.is_set():
            try:
                r = s.post(f"{url}/search", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
                answers.append((r.status_code, r.text[:200], len(r.raw.retries.history) if r.raw.retries else 0))
            except requests.RequestException as exc:
                answers.append((None, repr(exc), None))


def _haproxy_replays(stats_port: int, stop: threading.Event, seen: list) -> None:
    """Polls HAProxy's stats CSV until ``stop``: the largest count of requests it retried or
    redispatched (``wretr`` + ``wredis``) on the gateway backend. Counters restart with each
    HAProxy reload (Serve reloads it when a replica comes or goes), hence the polling."""
    while not stop.is_set():
        try:
            rows = requests.get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=5).text.splitlines()
            head = rows[0].lstrip("# ").split(",")
            total = 0
            for row in rows[1:]:
                cells = dict(zip(head, row.split(",")))
                if cells.get("svname") == "BACKEND" and cells.get("pxname", "").startswith("http-xmr"):
                    total += int(cells.get("wretr") or 0) + int(cells.get("wredis") or 0)
            seen.append(total)
        except (requests.RequestException, IndexError, ValueError):
            pass
        stop.wait(0.2)


def _listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses something listens on at TCP ``port`` (from /proc/net/tcp)."""
    found = set()
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        host, hex_port = fields[1].split(":")
        if fields[3] == "0A" and int(hex_port, 16) == port:
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(host))))
    return found


@pytest.mark.timeout(480)
def test_haproxy_ingress_loses_no_request_when_a_replica_of_either_deployment_dies(checkpoints):
    """``xmr serve --ingress haproxy`` (Serve's HAProxy ingress, with xmr's retry policy) and
    two replicas of each deployment, under a steady load of 6 clients: SIGKILLing a gateway
    replica (the ingress deployment: with Serve's Python proxy this answers some requests
    with a plain-text 500) and then a retriever replica costs no request (no 5xx, nothing a
    client that resends on a connection closed without an answer sees); HAProxy's client
    port listens on 127.0.0.1 only; SIGTERM stops it with the server (no haproxy left)."""
    from train_helpers import processes_titled

    key = "k3y-" + os.urandom(12).hex()
    port, stats, metrics = free_port(), free_port(), free_port()
    proc = _xmr("serve", "--checkpoint", checkpoints["cat0"], "--gallery", AVDIGITS, "--port", str(port),
                "--replicas", "2", "--ingress", "haproxy",
                env={"XMR_API_KEY": key, "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
                     "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics)})
    seen: list[str] = []
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_line(proc, "[xmr] HAProxy ingress", 240, seen)
        assert _listening_addresses(port) == {"127.0.0.1"}
        assert _listening_addresses(stats) == {"0.0.0.0"}  # HAProxy is in front; Ray binds its stats port widely
        body = {"query": _query(), "k": 5}
        answers: list = []
        stop = threading.Event()
        clients = [threading.Thread(target=_searches, args=(url, body, key, stop, answers)) for _ in range(6)]
        replays: list[int] = []
        clients.append(threading.Thread(target=_haproxy_replays, args=(stats, stop, replays)))
        for t in clients:
            t.start()
        killed = {}
        try:
            for kind in ("Gateway", "Retriever"):
                replicas = processes_titled(f"ray::ServeReplica:xmr:{kind}")
                assert len(replicas) == 2, (kind, replicas)
                before = len(answers)
                while len(answers) < before + 30:  # the load is flowing
                    time.sleep(0.05)
                os.kill(replicas[0], signal.SIGKILL)
                killed[kind] = len(answers)
                if kind == "Gateway":
                    resent_before = sum(a[2] > 0 for a in answers if a[2] is not None)
                deadline = time.time() + 120  # Serve notices and starts a replacement
                while len(processes_titled(f"ray::ServeReplica:xmr:{kind}")) < 2 and time.time() < deadline:
                    time.sleep(0.5)
                mark = len(answers)
                while len(answers) < mark + 30 and time.time() < deadline:  # and the load flows on
                    time.sleep(0.05)
        finally:
            stop.set()
            for t in clients:
                t.join()
        assert all(len(answers) > at + 30 for at in killed.values()), (killed, len(answers))
        failed = [a for a in answers if a[0] != 200]
        assert failed == [], (len(answers), failed[:5])
        resent = sum(a[2] > 0 for a in answers)
        # the gateway kill hit requests in flight, and they were covered: replayed by HAProxy
        # or resent by the client after HAProxy closed their connection unanswered
        assert max(replays, default=0) + resent - resent_before > 0, (replays[-5:], resent)
        print(f"{len(answers)} searches, all 200; HAProxy replayed up to {max(replays, default=0)}, the clients "
              f"resent {resent} whose connection closed without an answer")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, ("".join(seen) + rest)[-3000:]
    assert _listening_addresses(port) == set() and _listening_addresses(stats) == set()  # no haproxy left


def test_haproxy_ingress_needs_a_key(monkeypatch):
    """Ray's HAProxy config binds its stats and metrics ports (and the gateway replicas'
    ports) on every interface: without a key, ``--ingress haproxy`` is refused before any Ray
    starts, saying why and what to do."""
    monkeypatch.delenv("XMR_API_KEY", raising=False)
    proc = _xmr("serve", "--checkpoint", "no-such-checkpoint", "--ingress", "haproxy")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "--ingress haproxy" in out and "XMR_API_KEY" in out and "every interface" in out, out
    proc = _xmr("serve", "--checkpoint", "no-such-checkpoint", "--ingress", "haproxy", "--direct",
                env={"XMR_API_KEY": "k" * 32})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "choose one" in out, out
    # Ray's own switch in the environment starts HAProxy too: the same rule, whatever --ingress says
    proc = _xmr("serve", "--checkpoint", "no-such-checkpoint", env={"RAY_SERVE_ENABLE_HA_PROXY": "1"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "RAY_SERVE_ENABLE_HA_PROXY=1" in out and "XMR_API_KEY" in out, out


def test_another_commands_embedded_ray_is_not_attached():
    """An embedded Ray another process started (as `xmr compare` runs one) is that process's
    own: a second command starts its own Ray instead of attaching to it (it would die with
    the first command), while a `ray start` cluster is still attached to (the test above)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO / "platform")}
    env.pop("RAY_ADDRESS", None)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys; ray.init(address='local', num_cpus=1, include_dashboard=False); "
                               "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read(); ray.shutdown()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        theirs = holder.stdout.readline().strip()
        assert theirs, "the first process's Ray did not start"
        probe = subprocess.run(
            [sys.executable, "-c", "import ray; from xmr.ray.session import ensure_ray; "
                                   "how = ensure_ray(num_cpus=1, dashboard=False, quiet=True); "
                                   "print(how); print(ray.get_runtime_context().gcs_address); ray.shutdown()"],
            capture_output=True, text=True, env=env, timeout=180)
        how, ours = (probe.stdout.strip().splitlines() + ["", ""])[:2]
        assert how == "started an embedded local Ray" and ours and ours != theirs, probe.stdout + probe.stderr[-2000:]
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
