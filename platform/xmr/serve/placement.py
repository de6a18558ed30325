"""Whether an application's replicas can be placed, in words an operator acts on: refused
before deploying when a replica fits on no node at all (``refuse_unplaceable``), and named
while deploying when one waits for resources no node has free (``unplaced``)."""

from __future__ import annotations

import time
from typing import Any

from xmr.ray.serve import pending_replicas


class StartError(RuntimeError):
    """The application did not start: it cannot be placed (before deploying) or was not
    serving by the start-up deadline; the message says why and what to change."""


def app_status(name: str):
    from ray import serve

    try:
        return serve.status().applications.get(name)
    except Exception:  # noqa: BLE001 - Serve's controller is starting: nothing to say yet
        return None


def not_running(name: str) -> list[str]:
    app = app_status(name)
    return sorted(d for d, st in (app.deployments if app else {}).items() if str(st.status).split(".")[-1] != "HEALTHY")


def unplaced(name: str, needs: dict[str, dict[str, float]], first_seen: dict[str, float],
             final: bool = False, grace_s: float = 5.0) -> list[tuple[str, str]]:
    """(deployment, line) for each deployment of app ``name`` whose replicas wait for
    resources no node has free. Which: those Ray's state API shows unplaced for ``grace_s``;
    where the state API is missing, those Serve's status says are waiting to be scheduled;
    and at the deadline (``final``) any deployment not yet running whose replica does not fit
    in what the cluster has free. Only those a replica of which cannot fit now are named (a
    replica that waits for a node starting up fits once it is up)."""
    import ray

    app = app_status(name)
    deployments = app.deployments if app else {}
    waiting = {d for d, st in deployments.items() if str(st.status).split(".")[-1] != "HEALTHY"}
    pending = pending_replicas(name)
    now = time.monotonic()
    candidates: dict[str, dict[str, float]] = {}
    if pending is not None:
        for dep, req in pending.items():
            first_seen.setdefault(dep, now)
            if now - first_seen[dep] >= grace_s or final:
                candidates[dep] = {**needs.get(dep, {}), **_as_need(req)}
    else:
        for dep, st in deployments.items():
            if "to be scheduled" in (st.message or ""):
                candidates[dep] = needs.get(dep, {})
    if final:
        for dep in waiting:
            candidates.setdefault(dep, needs.get(dep, {}))
    if not candidates:
        return []
    free, total = ray.available_resources(), ray.cluster_resources()
    out = []
    for dep in sorted(candidates):
        need = candidates[dep]
        short = [r for r, v in need.items() if v > free.get(r, 0.0) + 1e-9]
        if need and short:
            out.append((dep, f"[xmr] {dep} {placement_words(need, free, total)}"))
    return out


def _as_need(req: dict[str, Any]) -> dict[str, float]:
    """The state API's required resources (``CPU``, ``memory``, ...) as xmr's need dict."""
    return {k: float(v) for k, v in req.items() if k in ("CPU", "GPU", "memory")}


def amount(resource: str, value: float) -> str:
    if resource == "memory":
        return f"{value / 2**30:.1f} GiB of memory"
    unit = resource if value == 1 else f"{resource}s"
    return f"{value:g} {unit}"


def placement_words(need: dict[str, float], free: dict[str, float], total: dict[str, float]) -> str:
    """"needs 1 CPU; the cluster has 0 of 2 free: ..." for one replica's ``need``."""
    wants = " and ".join(amount(r, v) for r, v in need.items())
    has = "; ".join(
        (f"{free.get(r, 0.0) / 2**30:.1f} of {total.get(r, 0.0) / 2**30:.1f} GiB of memory free" if r == "memory"
         else f"{free.get(r, 0.0):g} of {total.get(r, 0.0):g} {r}s free")
        for r in need)
    return (f"needs {wants}; the cluster has {has}: lower --replicas or shards, or add nodes "
            "(a replica waits until it fits)")


def refuse_unplaceable(needs: dict[str, dict[str, float]], shards: list[dict[str, Any]] | None) -> None:
    """StartError (before anything is deployed) when a replica of a deployment fits on no
    node of the cluster at all (more memory, CPUs or GPUs than its largest node has): it
    would wait forever. The error names the deployment, its shard (``shards``: a sharded
    index's parts) and the sizes."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    problems = unfit(needs, nodes)
    if not problems:
        return
    parts = {f"Retriever{i:03d}": p for i, p in enumerate(shards or [])}
    lines = []
    for dep, resource, need, largest in problems:
        part = parts.get(dep)
        what = (f"{dep} (shard {dep[-3:]}, {part['items']:,} items, {part['resident_bytes'] / 2**30:.2f} GiB loaded)"
                if part and part.get("resident_bytes") else dep)
        lines.append(f"{what} needs {amount(resource, need)} per replica; the largest node of this cluster has "
                     f"{amount(resource, largest)}")
    raise StartError("this index fits on no node of the cluster: " + "; ".join(lines)
                     + ". Cut it into more shards (xmr index build --shards), or add larger nodes")


def unfit(needs: dict[str, dict[str, float]], nodes: list[dict[str, float]]) -> list[tuple[str, str, float, float]]:
    """(deployment, resource, needed, the largest node's total) for each resource a replica
    needs more of than any one node has (``nodes``: each alive node's total resources)."""
    out = []
    for dep, need in needs.items():
        for resource, value in need.items():
            largest = max((float(n.get(resource, 0.0)) for n in nodes), default=0.0)
            if value > largest + 1e-9:
                out.append((dep, resource, value, largest))
    return out
