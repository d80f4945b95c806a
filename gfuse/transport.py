"""One TCP connection carrying ONC RPC calls, on trio.

Many calls are in flight at once, told apart by xid. The peer may send its own
CALLs on the same socket (gluster's callbacks, with an xid sequence of their own):
they are recognised by message type, never by xid, and handed to ``on_callback``.
While calls are outstanding the connection PINGs the server and drops the
connection when nothing has arrived for ``ping_timeout`` seconds, as gluster's
client does. The connection owns no reconnect policy: see
:class:`gfuse.xlators.client.BrickClient` for that.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
from typing import Callable

import trio

from . import rpc
from .errors import leaf
from .handshake import DUMP_PROGRAM, DUMP_VERSION, PING
from .tls import TlsError, TlsSetup, handshake_error
from .xdr import ProtocolError

log = logging.getLogger(__name__)

CallbackHandler = Callable[[rpc.Call], None]


def _keepalive(sock: trio.socket.SocketType, idle: int = 20, interval: int = 2, count: int = 9) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Waiter:
    __slots__ = ("event", "reply", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: rpc.Reply | None = None
        self.error: BaseException | None = None


def _why(e: BaseException) -> str:
    """An exception's text, or its cause's (trio's SSLStream raises BrokenResourceError() from the SSL error)."""
    return str(e) or str(e.__cause__ or e.__context__ or type(e).__name__)


def not_connected(what: str) -> OSError:
    return OSError(errno.ENOTCONN, f"{what}: {'Transport endpoint is not connected'}")


class RpcConnection:
    """A live RPC connection. Create with :meth:`connect`; its reader runs in the caller's nursery."""

    def __init__(self, stream: trio.abc.Stream, name: str, on_callback: CallbackHandler | None,
                 ping_timeout: float | None, *, tls: TlsSetup | None = None) -> None:
        self._stream = stream
        #: the TLS setup the connection was made with (None: plain TCP); ``tls_version`` once negotiated
        self.tls = tls
        self.tls_version: str | None = stream.version() if isinstance(stream, trio.SSLStream) else None
        self._received_any = False
        self.name = name
        self._on_callback = on_callback
        self._ping_timeout = ping_timeout
        self._xids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._send_lock = trio.StrictFIFOLock()
        self._reader = rpc.RecordReader()
        self._last_recv = trio.current_time()
        #: when the connection last went from idle to waiting: silence before that is not the server's fault
        self._busy_since = self._last_recv
        self._ping_in_flight = False
        self._nursery: trio.Nursery | None = None
        self.closed = trio.Event()
        self.close_reason: str = ""
        self._cancel = trio.CancelScope()

    @classmethod
    async def connect(cls, nursery: trio.Nursery, host: str, port: int, *, name: str | None = None,
                      on_callback: CallbackHandler | None = None, ping_timeout: float | None = 42.0,
                      connect_timeout: float = 10.0, tls: TlsSetup | None = None) -> "RpcConnection":
        """Open a TCP connection (TLS on it when ``tls`` is given) and start its reader (and pinger) in
        ``nursery``. With ``tls``, a connection that cannot be set up or verified raises
        :class:`~gfuse.tls.TlsError`: nothing is ever sent in plain text instead."""
        ctx = tls.context() if tls is not None else None  # a missing certificate fails before connecting
        stream: trio.abc.Stream
        tcp: trio.SocketStream | None = None
        with trio.move_on_after(connect_timeout) as cs:
            try:
                tcp = await trio.open_tcp_stream(host, port)
            except OSError as e:
                cause = leaf(e.__cause__) if e.__cause__ is not None else e
                if not isinstance(cause, OSError):
                    cause = e
                raise OSError(cause.errno or errno.ECONNREFUSED,
                              f"cannot connect to {host}:{port}: {cause.strerror or cause}") from e
            _keepalive(tcp.socket)
            stream = tcp
            if ctx is not None:
                assert tls is not None
                ssl_stream = trio.SSLStream(tcp, ctx, server_hostname=None)
                try:
                    await ssl_stream.do_handshake()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    tcp.socket.close()
                    raise handshake_error(e, tls, f"{host}:{port}") from e
                stream = ssl_stream
        if cs.cancelled_caught:
            if tcp is not None:  # connected: the TLS handshake did not finish
                tcp.socket.close()
                raise TlsError(f"TLS handshake with {host}:{port} timed out after {connect_timeout:g}s: "
                               f"does the server use TLS?", errno.ETIMEDOUT)
            raise OSError(errno.ETIMEDOUT, f"connecting to {host}:{port} timed out after {connect_timeout:g}s")
        conn = cls(stream, name or f"{host}:{port}", on_callback, ping_timeout, tls=tls)
        nursery.start_soon(conn._run)
        return conn

    # ------------------------------------------------------------ calls

    @property
    def outstanding(self) -> int:
        return len(self._waiters)

    async def call(self, prog: int, vers: int, proc: int, body: bytes = b"", *,
                   cred_flavor: int = rpc.AUTH_NULL, cred_body: bytes = b"") -> bytes:
        """Send one call and wait for its reply; returns the result bytes.

        Raises ``OSError(ENOTCONN)`` if the connection is or becomes closed, and
        :class:`~gfuse.rpc.RPCError` if the server refuses the call.
        """
        if self.closed.is_set():
            raise not_connected(self.name)
        xid = next(self._xids) & 0xFFFFFFFF
        record = rpc.frame(rpc.encode_call(xid, prog, vers, proc, cred_flavor, cred_body, body))
        w = _Waiter()
        if not self._waiters:
            self._busy_since = trio.current_time()
        self._waiters[xid] = w
        try:
            async with self._send_lock:
                if self.closed.is_set():
                    raise not_connected(self.name)
                try:
                    await self._stream.send_all(record)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    self._fail(self._early_close(f"send failed: {_why(e)}"))
                    raise not_connected(f"{self.name} ({self.close_reason})") from e
            await w.event.wait()
        finally:
            self._waiters.pop(xid, None)
        if w.error is not None:
            raise w.error
        assert w.reply is not None
        return rpc.check_reply(w.reply, f"{self.name} prog {prog} proc {proc}")

    async def ping(self) -> None:
        await self.call(DUMP_PROGRAM, DUMP_VERSION, PING)

    async def aclose(self, reason: str = "closed by client") -> None:
        self._fail(reason)
        await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------ internals

    def _fail(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        self._cancel.cancel()
        for w in list(self._waiters.values()):
            w.error = not_connected(f"{self.name} ({reason})")
            w.event.set()
        raw = self._stream.transport_stream if isinstance(self._stream, trio.SSLStream) else self._stream
        sock = getattr(raw, "socket", None)  # in-memory streams (unit tests) have none
        try:
            if sock is not None:
                sock.close()
        except OSError:  # pragma: no cover
            pass

    async def _run(self) -> None:
        with self._cancel:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._ping_timeout:
                    nursery.start_soon(self._pinger)
                await self._read_loop()
                nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._stream.receive_some(1 << 20)
                if not data:
                    self._fail(self._early_close("connection closed by peer"))
                    return
                self._received_any = True
                self._last_recv = trio.current_time()
                for record in self._reader.feed(data):
                    self._dispatch(rpc.decode_message(record))
        except ProtocolError as e:
            log.error("%s: protocol error, dropping connection: %s", self.name, e)
            self._fail(f"protocol error: {e}")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._fail(self._early_close(f"receive failed: {_why(e)}"))

    def _early_close(self, reason: str) -> str:
        """Why a peer hangs up before its first reply, when that is what it usually means."""
        if self._received_any:
            return reason
        if self.tls is not None:
            # TLS 1.3: the server checks our certificate after our side of the handshake is done
            return (f"{reason}: the server ended the TLS session before its first reply — it did not accept "
                    f"our certificate {self.tls.cert} (not signed by a CA it trusts?); see the server's log")
        return (f"{reason} before any reply (if the server requires TLS — server.ssl on, or glusterd's "
                f"secure-access — the client must use it as well: client.ssl on, secure-mgmt=yes)")

    def _dispatch(self, msg: rpc.Call | rpc.Reply) -> None:
        if isinstance(msg, rpc.Call):
            if self._on_callback is not None:
                try:
                    self._on_callback(msg)
                except Exception:  # a subscriber's bug must not kill the connection
                    log.exception("%s: callback handler failed", self.name)
            return
        w = self._waiters.get(msg.xid)
        if w is None:
            log.debug("%s: reply for unknown xid %d (cancelled call)", self.name, msg.xid)
            return
        w.reply = msg
        w.event.set()

    async def _pinger(self) -> None:
        """PING while calls wait; give up on a server silent for ``ping_timeout`` while we wait on it."""
        assert self._ping_timeout and self._nursery is not None
        interval = max(0.2, min(self._ping_timeout / 4, 10.0))
        while True:
            await trio.sleep(interval)
            if not self._waiters:
                continue
            silence = trio.current_time() - max(self._last_recv, self._busy_since)
            if silence >= self._ping_timeout:
                log.warning("%s: no answer for %.1fs (ping-timeout %gs): disconnecting",
                            self.name, silence, self._ping_timeout)
                self._fail(f"ping timeout ({self._ping_timeout:g}s)")
                return
            if silence >= interval and not self._ping_in_flight:
                self._nursery.start_soon(self._ping_once)

    async def _ping_once(self) -> None:
        self._ping_in_flight = True
        try:
            await self.ping()
        except (OSError, rpc.RPCError):
            pass  # any answer, even a refusal, proves the server is alive; silence is judged by _pinger
        finally:
            self._ping_in_flight = False
