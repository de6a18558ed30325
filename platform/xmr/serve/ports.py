"""The ports an HAProxy ingress would bind, checked before a Ray is started with one, each
busy port named with the process that holds it (read from Linux's /proc)."""

from __future__ import annotations

import os


def busy_ports(ports: dict[str, int]) -> list[str]:
    """The ``ports`` (named by what sets them) that something on this machine already listens
    on, each with the listening process where the OS tells: HAProxy exits at start when one
    of its ports is taken (a leftover haproxy of a server that was SIGKILLed, say), which
    Serve reports only as an unhealthy proxy, retried forever."""
    import socket

    busy = []
    for what, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
                continue
            except OSError:
                pass
        holders = listeners(port)
        holder = ("; held by " + ", ".join(f"pid {pid} ({name})" for pid, name in holders)) if holders else ""
        busy.append(f"{what} {port}{holder}")
    return busy


def listeners(port: int) -> list[tuple[int, str]]:
    """(pid, command name) of the processes listening on TCP ``port``, from Linux's /proc
    (empty elsewhere, or where another user's processes cannot be read)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table, encoding="ascii").read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    found = []
    for proc in os.listdir("/proc") if inodes else []:
        if not proc.isdigit():
            continue
        try:
            if any(os.readlink(f"/proc/{proc}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{proc}/fd")):
                found.append((int(proc), open(f"/proc/{proc}/comm", encoding="utf-8").read().strip()))
        except OSError:
            continue
    return found
