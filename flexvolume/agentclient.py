"""Synchronous client of the gfuse node agent (used by the FlexVolume driver and the CSI plugin).

Plain blocking sockets, no event loop: the FlexVolume driver lives for one call. Every call is
bounded by a timeout (connect, send and receive share one deadline) and every failure is an
:class:`AgentError` whose message is one line an admin can act on::

    from flexvolume.agentclient import AgentClient, AgentError

    c = AgentClient("/run/gfuse/agent.sock")
    c.ping()                                   # {"ok": True, "version": "0.1.0", "protocol": 1}
    c.mount("server1:/vol/sub", "/var/lib/kubelet/pods/…/volumes/gfuse.example.org~gfuse/data",
            options=["backup-volfile-servers=server2:server3"], readonly=False)
    c.stats(target)                            # {"bytes_total": …, "bytes_used": …, …}
    c.list()                                   # [{"source": …, "target": …, "pid": …, "healthy": …}, …]
    c.unmount(target)
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any

from .protocol import DEFAULT_SOCKET, HEADER, FrameError, decode, encode, frame_length

#: seconds the agent may need beyond the budget it is given for a mount (spawn, bookkeeping)
MOUNT_MARGIN = 5.0


class AgentError(Exception):
    """The agent refused or could not be reached. ``code`` is one of protocol.ERROR_CODES."""

    def __init__(self, message: str, code: str = "internal") -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message


class AgentClient:
    """Talks to the agent at ``socket_path``; ``timeout`` bounds calls that do not give their own."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    # -- the operations ----------------------------------------------------------------------

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """``{"ok": True, "version": str, "protocol": int, "mounts": int}``."""
        return self.call({"op": "ping"}, timeout)

    def mount(
        self,
        source: str,
        target: str,
        options: Iterable[str] = (),
        readonly: bool = False,
        timeout: float = 60.0,
        context: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Mount ``source`` (``server:/vol[/subdir]``) on ``target`` through the agent.

        ``options`` are ``gfuse mount -o`` items. Idempotent: ``target`` already mounted by gfuse
        from the same source (and the same read-only mode) succeeds with ``"already": True``.
        ``context`` (e.g. pod namespace/name) is kept with the mount for ``list``. The agent gets
        ``timeout - 5`` seconds for the mount; this call waits ``timeout`` at most.
        """
        req: dict[str, Any] = {
            "op": "mount",
            "source": source,
            "target": target,
            "options": [str(o) for o in options],
            "readonly": bool(readonly),
            "timeout": max(1.0, timeout - MOUNT_MARGIN),
        }
        if context:
            req["context"] = {str(k): str(v) for k, v in context.items()}
        return self.call(req, timeout)

    def unmount(self, target: str, timeout: float = 60.0) -> dict[str, Any]:
        """Unmount ``target`` and stop its serving process. Idempotent (an unmounted path succeeds)."""
        return self.call({"op": "unmount", "target": target, "timeout": max(1.0, timeout - MOUNT_MARGIN)},
                         timeout)

    def list(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """The agent's mounts: dicts with source, target, options, readonly, pid, healthy, reason, …"""
        return list(self.call({"op": "list"}, timeout)["mounts"])

    def stats(self, target: str, timeout: float | None = None) -> dict[str, int]:
        """statvfs of ``target`` (bytes_/inodes_ total, used, available); bounded even on a dead mount."""
        resp = self.call({"op": "stats", "target": target}, timeout)
        return {k: v for k, v in resp.items() if k not in ("ok",)}

    # -- the transport -----------------------------------------------------------------------

    def call(self, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one request, return the response map; raises :class:`AgentError` unless ``ok``."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        what = f"gfuse agent at {self.socket_path}"
        try:
            frame = encode(request)
        except (FrameError, TypeError, ValueError) as e:
            raise AgentError(f"cannot encode the request: {e}", "invalid") from None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                s.settimeout(max(0.01, min(5.0, deadline - time.monotonic())))
                s.connect(self.socket_path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise AgentError(f"{what} is not running ({e.strerror}); start the gfuse agent on this node "
                                 f"(the gfuse DaemonSet pod) or check the socket path", "unavailable") from None
            except TimeoutError:
                raise AgentError(f"{what} did not accept a connection within {min(5.0, timeout):g}s; "
                                 f"the agent is overloaded or stuck (see its log)", "unavailable") from None
            except OSError as e:
                raise AgentError(f"cannot connect to {what}: {e.strerror or e}", "unavailable") from None
            try:
                self._send(s, frame, deadline)
                header = self._recv_exact(s, HEADER.size, deadline)
                body = self._recv_exact(s, frame_length(header), deadline)
                resp = decode(body)
            except TimeoutError:
                raise AgentError(f"{what} did not answer {request.get('op')!r} within {timeout:g}s "
                                 f"(see the agent's log)", "timeout") from None
            except FrameError as e:
                raise AgentError(f"{what} sent a malformed answer: {e}", "internal") from None
            except EOFError:
                raise AgentError(f"{what} closed the connection without answering {request.get('op')!r} "
                                 f"(did it restart? see its log)", "unavailable") from None
            except OSError as e:
                raise AgentError(f"talking to {what} failed: {e.strerror or e}", "unavailable") from None
        finally:
            s.close()
        if not isinstance(resp.get("ok"), bool):
            raise AgentError(f"{what} sent an answer without 'ok': {resp!r:.200}", "internal")
        if not resp["ok"]:
            raise AgentError(str(resp.get("error") or "the agent refused without a reason"),
                             str(resp.get("code") or "internal"))
        return resp

    @staticmethod
    def _send(s: socket.socket, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError()
            s.settimeout(left)
            n = s.send(view)
            view = view[n:]

    @staticmethod
    def _recv_exact(s: socket.socket, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError()
            s.settimeout(left)
            chunk = s.recv(min(65536, n - len(buf)))
            if not chunk:
                raise EOFError()
            buf += chunk
        return bytes(buf)
