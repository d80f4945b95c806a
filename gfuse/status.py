"""The status socket of a serving process: ``gfuse status`` and the node agent read it.

One JSON object per connection, from the path alone (never touching the mount, which may hang).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Any, Callable

import trio

RUN_DIR = "/run/gfuse"


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
