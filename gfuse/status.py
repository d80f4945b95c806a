"""The status socket of a serving process: ``gfuse status`` and the node agent read it.

One JSON object per connection, from the path alone (never touching the mount, which may hang).
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import json
import os
import socket
from typing import Any, Callable

import trio

RUN_DIR = "/run/gfuse"

#: upper bounds (seconds) of the buckets of the FUSE request latency histograms (a last one, +Inf, is implied):
#: fixed, so that a request costs one bisect and two increments, and every mount's histograms can be summed
LATENCY_BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                      0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class OpCounts:
    """One FUSE operation's requests: how many, their total time, and how many fell in each latency bucket
    (not cumulative; the last one is above every bound)."""

    __slots__ = ("requests", "seconds", "buckets")

    def __init__(self) -> None:
        self.requests = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)


class FuseStats:
    """Counters of the FUSE requests one serving process answered, by operation (the handler's name): kept
    on the trio thread that runs every handler (no lock), a few dict and list increments per request (the
    time comes from the vDSO clock: no system call). Reported through the status socket (:meth:`snapshot`).
    An error is a request answered with an errno, counted by operation and errno name (``lookup`` ENOENT is
    most of them on a healthy mount)."""

    def __init__(self) -> None:
        self.ops: dict[str, OpCounts] = {}
        self.errors: dict[tuple[str, int], int] = {}
        self.bytes_read = 0
        self.bytes_written = 0

    def done(self, op: str, seconds: float) -> None:
        c = self.ops.get(op)
        if c is None:
            c = self.ops[op] = OpCounts()
        c.requests += 1
        c.seconds += seconds
        c.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def failed(self, op: str, code: int) -> None:
        key = (op, code)
        self.errors[key] = self.errors.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: ``{"latency_buckets": [bounds], "ops": {op: {"requests", "seconds", "buckets": [n per
        bucket, the last one +Inf]}}, "errors": [{"op", "errno", "count"}], "bytes_read", "bytes_written"}``."""
        return {"latency_buckets": list(LATENCY_BUCKETS),
                "ops": {op: {"requests": c.requests, "seconds": c.seconds, "buckets": list(c.buckets)}
                        for op, c in self.ops.items()},
                "errors": [{"op": op, "errno": errno.errorcode.get(code, str(code)), "count": n}
                           for (op, code), n in self.errors.items()],
                "bytes_read": self.bytes_read, "bytes_written": self.bytes_written}


def status_socket_path(mountpoint: str) -> str:
    """Where the serving process answers ``gfuse status``; from the path alone, never touching the mount."""
    h = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(RUN_DIR, f"{h}.sock")


def bind_unix_socket(path: str, mode: int = 0o600) -> socket.socket:
    """A unix stream socket bound at ``path`` that has ``mode`` from the moment it exists: bound under a
    umask that leaves only ``mode``, synchronously (no other task runs while the process's umask is
    narrowed, and no chmod after the bind leaves a window where others could connect)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock


async def serve_status(path: str, status: Callable[[], dict[str, Any]]) -> None:
    """Answer every connection on ``path`` with ``status()``; the socket is never reachable by others
    (0600 from its creation: :func:`bind_unix_socket`)."""
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.from_stdlib_socket(bind_unix_socket(path))
    sock.listen(8)
    with sock:
        while True:
            conn, _ = await sock.accept()
            with conn:
                try:
                    await conn.send((json.dumps(status()) + "\n").encode())
                except OSError:
                    pass


def query_status(mountpoint: str, timeout: float = 3.0) -> dict[str, Any]:
    path = status_socket_path(mountpoint)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status: dict[str, Any] = json.loads(data)
    return status


async def query_status_async(mountpoint: str, timeout: float = 2.0, limit: int = 1 << 22) -> dict[str, Any]:
    """:func:`query_status` from a trio task (the node agent's metrics): at most ``timeout`` seconds in all
    (``trio.TooSlowError``: a stuck or stopped server), ``OSError`` when nobody serves the socket, ``ValueError``
    for an answer that is not a JSON object (or is larger than ``limit``)."""
    path = status_socket_path(mountpoint)
    with trio.fail_after(timeout):
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            await s.connect(path)
            data = bytearray()
            while True:
                chunk = await s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > limit:
                    raise ValueError(f"status answer longer than {limit} bytes")
    status = json.loads(data)
    if not isinstance(status, dict):
        raise ValueError(f"status answer is a {type(status).__name__}, not an object")
    return status
