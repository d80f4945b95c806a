"""Talking to glusterd: fetch the volfile (GETSPEC), find brick ports (PORTBYBRICK), watch for changes."""

from __future__ import annotations

import errno
import logging
import os
from typing import Awaitable, Callable, Sequence

import trio

from . import handshake as hs
from . import rpc
from .errors import leaf
from .fops import CBK_PROGRAM, Cbk
from .tls import DEFAULT as DEFAULT_TLS, TlsConfig, TlsError
from .transport import RpcConnection
from .volfile import Graph, parse
# re-exported: callers take the spec parsers from here as well
from .volspec import Server as Server, parse_servers as parse_servers, parse_volume_spec as parse_volume_spec

log = logging.getLogger(__name__)


class MgmtError(Exception):
    """glusterd could not give us what we asked for; the message is meant for a user."""

    def __init__(self, message: str, errno_: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno_


def mgmt_cred() -> bytes:
    return rpc.Credential(pid=os.getpid()).encode_v2()


async def _call(server: Server, prog: int, vers: int, proc: int, body: bytes, timeout: float,
                tls: TlsConfig | None = None) -> bytes:
    """One call on a short-lived connection to glusterd (TLS if ``tls`` says glusterd uses it)."""
    try:
        return await _call_raw(server, prog, vers, proc, body, timeout, tls or DEFAULT_TLS)
    except Exception as exc:  # unwrap what the nursery wrapped
        e = leaf(exc)
        if isinstance(e, TlsError):
            raise MgmtError(str(e), e.errno or errno.EACCES) from None
        if isinstance(e, trio.TooSlowError):
            raise MgmtError(f"glusterd at {server} did not answer within {timeout:g}s", errno.ETIMEDOUT) from None
        if isinstance(e, OSError):
            raise MgmtError(f"glusterd at {server} is unreachable ({e.strerror or e})", e.errno or errno.EIO) from None
        if isinstance(e, rpc.RPCError):
            raise MgmtError(f"glusterd at {server} refused the request: {e}", errno.EPROTO) from None
        raise


async def _call_raw(server: Server, prog: int, vers: int, proc: int, body: bytes, timeout: float,
                    tls: TlsConfig) -> bytes:
    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            conn = await RpcConnection.connect(nursery, server.host, server.port, name=f"glusterd {server}",
                                               ping_timeout=None, connect_timeout=timeout, tls=tls.mgmt(server))
            try:
                return await conn.call(prog, vers, proc, body, cred_flavor=rpc.AUTH_GLUSTERFS_V2,
                                       cred_body=mgmt_cred())
            finally:
                await conn.aclose()


async def getspec(server: Server, volume: str, timeout: float = 10.0, tls: TlsConfig | None = None) -> str:
    body = await _call(server, hs.HANDSHAKE_PROGRAM, hs.HANDSHAKE_VERSION, hs.GETSPEC, hs.getspec_req(volume), timeout,
                       tls)
    r = hs.getspec_rsp(body)
    if r.ret < 0:
        if r.errno in (errno.ENOENT, 0):
            raise MgmtError(f"volume {volume!r} does not exist on {server} (or is not started)", errno.ENOENT)
        raise MgmtError(f"glusterd at {server} refused volume {volume!r}: {os.strerror(r.errno)}", r.errno)
    if not r.spec.strip():
        raise MgmtError(f"glusterd at {server} returned an empty volfile for {volume!r}", errno.ENOENT)
    return r.spec


async def fetch_graph(servers: Sequence[Server], volume: str, timeout: float = 10.0,
                      tls: TlsConfig | None = None) -> tuple[Server, Graph]:
    """GETSPEC from the first server that answers (``backup-volfile-servers`` in order)."""
    last: MgmtError | None = None
    for server in servers:
        try:
            text = await getspec(server, volume, timeout, tls)
            return server, parse(text)
        except MgmtError as e:
            if e.errno == errno.ENOENT:
                raise  # the volume is unknown: another server of the same cluster will not know it either
            log.info("volfile server %s failed: %s", server, e)
            last = e
    assert last is not None, "no volfile servers given"
    raise last


async def port_by_brick(server: Server, brick_path: str, timeout: float = 10.0, tls: TlsConfig | None = None) -> int:
    body = await _call(server, hs.PORTMAP_PROGRAM, hs.PORTMAP_VERSION, hs.PORTBYBRICK,
                       hs.portbybrick_req(brick_path), timeout, tls)
    ret, err, _status, port = hs.portbybrick_rsp(body)
    if ret < 0 or port <= 0:
        raise MgmtError(f"brick {brick_path} has no port on {server}: is the brick process running?",
                        err or errno.ENOTCONN)
    return port


class VolfileWatcher:
    """Keeps a connection to glusterd and re-fetches the volfile when it may have changed.

    glusterd pushes a FETCHSPEC callback to its connected clients when a volume's
    volfile changes; after a reconnect we re-fetch too, because a change may have been
    missed. ``on_change`` is awaited with the new graph only when its text differs.
    """

    def __init__(self, servers: Sequence[Server], volume: str, current: Graph,
                 on_change: Callable[[Graph], Awaitable[None]], backoff_max: float = 10.0,
                 tls: TlsConfig | None = None) -> None:
        self.servers = list(servers)
        self.tls = tls or DEFAULT_TLS
        self.volume = volume
        self.current = current
        self._on_change = on_change
        self._backoff_max = backoff_max
        self._kick = trio.Event()

    def _callback(self, call: rpc.Call) -> None:
        if call.prog == CBK_PROGRAM and call.proc == Cbk.FETCHSPEC:
            self._kick.set()

    async def _refetch(self) -> None:
        try:
            _, graph = await fetch_graph(self.servers, self.volume, tls=self.tls)
        except MgmtError as e:
            log.warning("re-fetching the volfile of %s failed: %s", self.volume, e)
            return
        if graph.text != self.current.text:
            log.info("volfile of %s changed", self.volume)
            self.current = graph
            await self._on_change(graph)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        delay = 0.5
        started = False
        i = 0
        while True:
            server = self.servers[i % len(self.servers)]
            try:
                async with trio.open_nursery() as nursery:
                    conn = await RpcConnection.connect(nursery, server.host, server.port, name=f"glusterd {server}",
                                                       on_callback=self._callback, ping_timeout=None,
                                                       tls=self.tls.mgmt(server))
                    if not started:
                        task_status.started()
                        started = True
                    else:
                        await self._refetch()
                    delay = 0.5
                    while not conn.closed.is_set():
                        with trio.move_on_after(1.0):
                            await self._kick.wait()
                        if self._kick.is_set():
                            self._kick = trio.Event()
                            await self._refetch()
                    nursery.cancel_scope.cancel()
            except Exception as exc:  # connection failures arrive wrapped by the nursery
                e = leaf(exc)
                if not isinstance(e, (OSError, rpc.RPCError)):
                    raise
                log.debug("volfile watcher: %s: %s", server, e)
                if not started:
                    task_status.started()
                    started = True
            i += 1
            await trio.sleep(delay)
            delay = min(delay * 2, self._backoff_max)
