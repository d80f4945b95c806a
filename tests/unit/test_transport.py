"""The RPC connection (gfuse/transport.py) over an in-memory stream, in virtual time.

A scripted peer on the other end of ``trio.testing.memory_stream_pair`` answers, delays or ignores
calls; trio's MockClock makes ping-timeouts of seconds take no real time. The real-brick tests of
the same behaviour (SIGSTOPped brick, idle-then-slow INODELK) stay in tests/cluster/test_brick_faults.py.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from gfuse import rpc
from gfuse.handshake import DUMP_PROGRAM, PING
from gfuse.transport import RpcConnection

PROG, VERS = 1298437, 400  # GlusterFS 4.x fop program; the meaning of the numbers does not matter here


@dataclass
class Peer:
    """The server side: records every call; ``answer(call)`` decides (reply bytes, delay) or None."""

    stream: trio.abc.HalfCloseableStream
    answer: Callable[[rpc.Call], tuple[bytes, float] | None]
    calls: list[tuple[float, rpc.Call]] = field(default_factory=list)

    async def run(self) -> None:
        reader = rpc.RecordReader()
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    data = await self.stream.receive_some(1 << 16)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                for record in reader.feed(data):
                    msg = rpc.decode_message(record)
                    assert isinstance(msg, rpc.Call)
                    self.calls.append((trio.current_time(), msg))
                    a = self.answer(msg)
                    if a is not None:
                        nursery.start_soon(self._reply_later, msg.xid, *a)

    async def _reply_later(self, xid: int, body: bytes, delay: float) -> None:
        await trio.sleep(delay)
        await self.send(rpc.encode_reply(xid, body))

    async def send(self, record: bytes) -> None:
        try:
            await self.stream.send_all(rpc.frame(record))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def pings(self) -> list[float]:
        return [t for t, c in self.calls if c.prog == DUMP_PROGRAM and c.proc == PING]


def echo(delay: float = 0.0, pings: bool = True) -> Callable[[rpc.Call], tuple[bytes, float] | None]:
    """Answer every call with its own body after ``delay``; PINGs at once (or never)."""
    def answer(c: rpc.Call) -> tuple[bytes, float] | None:
        if c.prog == DUMP_PROGRAM and c.proc == PING:
            return (b"", 0.0) if pings else None
        return (c.body, delay)
    return answer


@asynccontextmanager
async def connection(answer: Callable[[rpc.Call], tuple[bytes, float] | None], *, ping_timeout: float | None = 4.0,
                     on_callback: Callable[[rpc.Call], None] | None = None
                     ) -> AsyncIterator[tuple[RpcConnection, Peer]]:
    client_end, server_end = trio.testing.memory_stream_pair()
    peer = Peer(server_end, answer)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        conn = RpcConnection(client_end, "peer", on_callback, ping_timeout)  # type: ignore[arg-type]
        nursery.start_soon(conn._run)
        try:
            yield conn, peer
        finally:
            await conn.aclose()
            nursery.cancel_scope.cancel()


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.mark.trio
async def test_many_calls_in_flight_get_their_own_replies(clock: trio.testing.MockClock) -> None:
    """Replies come back out of order (later calls answered first): each caller gets its own body."""
    def answer(c: rpc.Call) -> tuple[bytes, float] | None:
        if c.prog == DUMP_PROGRAM:
            return b"", 0.0
        n = int.from_bytes(c.body, "big")
        return c.body, 1.0 / (n + 1)  # call 0 answered last
    got: dict[int, bytes] = {}
    async with connection(answer) as (conn, _peer):
        async def one(n: int) -> None:
            got[n] = await conn.call(PROG, VERS, 1, n.to_bytes(4, "big"))
        async with trio.open_nursery() as nursery:
            for n in range(32):
                nursery.start_soon(one, n)
        assert conn.outstanding == 0
    assert got == {n: n.to_bytes(4, "big") for n in range(32)}


@pytest.mark.trio
async def test_a_silent_server_is_dropped_after_one_ping_timeout(clock: trio.testing.MockClock) -> None:
    """Nothing received for ping-timeout while a call waits → ENOTCONN then, not twice that later."""
    async with connection(lambda c: None, ping_timeout=4.0) as (conn, peer):
        t0 = trio.current_time()
        with pytest.raises(OSError) as e:
            await conn.call(PROG, VERS, 1, b"x")
        elapsed = trio.current_time() - t0
    assert e.value.errno == errno.ENOTCONN
    assert "ping timeout" in str(e.value)
    assert 4.0 <= elapsed <= 4.0 + 4.0 / 4 + 0.01  # one pinger period of lateness at most
    assert peer.pings(), "the client PINGs while a call waits"


@pytest.mark.trio
async def test_a_slow_answer_with_pings_answered_is_not_a_timeout(clock: trio.testing.MockClock) -> None:
    """A call that takes 3× ping-timeout is fine while the server answers PINGs (a long blocking lock)."""
    async with connection(echo(delay=12.0), ping_timeout=4.0) as (conn, peer):
        t0 = trio.current_time()
        assert await conn.call(PROG, VERS, 1, b"slow") == b"slow"
        assert trio.current_time() - t0 == pytest.approx(12.0)
        assert len(peer.pings()) >= 3


@pytest.mark.trio
async def test_idle_time_before_a_slow_call_is_not_silence(clock: trio.testing.MockClock) -> None:
    """gluster drops a server only when it was silent while we waited on it: an idle connection
    (no call for longer than ping-timeout) followed by a call answered just inside ping-timeout must
    succeed — even when the server does not answer PINGs (silence counts from when we started waiting)."""
    delays = iter([0.0, 2.9])

    def answer(c: rpc.Call) -> tuple[bytes, float] | None:
        return None if c.prog == DUMP_PROGRAM else (c.body, next(delays))
    async with connection(answer, ping_timeout=3.0) as (conn, _peer):
        assert await conn.call(PROG, VERS, 1, b"a") == b"a"
        await trio.sleep(10.0)
        assert await conn.call(PROG, VERS, 1, b"b") == b"b"
        assert not conn.closed.is_set()


@pytest.mark.trio
async def test_an_unanswered_ping_is_silence_even_when_idle(clock: trio.testing.MockClock) -> None:
    """A PING is a call we wait on: a server that never answers it is dropped ping-timeout after it
    last said anything, as gluster's ping timer does, although no other call waits."""
    async with connection(echo(delay=2.0, pings=False), ping_timeout=3.0) as (conn, peer):
        assert await conn.call(PROG, VERS, 1, b"a") == b"a"
        assert peer.pings()
        with trio.fail_after(10):
            await conn.closed.wait()
        assert "ping timeout" in conn.close_reason


@pytest.mark.trio
async def test_idle_connection_is_not_pinged(clock: trio.testing.MockClock) -> None:
    async with connection(echo(), ping_timeout=2.0) as (conn, peer):
        await conn.call(PROG, VERS, 1, b"a")
        await trio.sleep(60.0)
        assert peer.pings() == []
        assert not conn.closed.is_set()


@pytest.mark.trio
async def test_no_ping_timeout_means_wait_forever(clock: trio.testing.MockClock) -> None:
    async with connection(echo(delay=600.0, pings=False), ping_timeout=None) as (conn, peer):
        assert await conn.call(PROG, VERS, 1, b"z") == b"z"
        assert peer.pings() == []


@pytest.mark.trio
async def test_callbacks_are_told_apart_by_message_type(clock: trio.testing.MockClock) -> None:
    """A server CALL with the xid of a pending call is a callback, never that call's reply."""
    seen: list[rpc.Call] = []
    async with connection(lambda c: None, ping_timeout=None, on_callback=seen.append) as (conn, peer):
        async with trio.open_nursery() as nursery:
            result: list[bytes] = []

            async def caller() -> None:
                result.append(await conn.call(PROG, VERS, 1, b"q"))
            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            xid = peer.calls[0][1].xid
            await peer.send(rpc.encode_call(xid, 52743234, 1, 9, rpc.AUTH_NULL, b"", b"upcall"))
            await trio.testing.wait_all_tasks_blocked()
            assert [c.body for c in seen] == [b"upcall"] and result == []
            await peer.send(rpc.encode_reply(xid, b"real"))
        assert result == [b"real"]


@pytest.mark.trio
async def test_a_failing_callback_handler_does_not_kill_the_connection(clock: trio.testing.MockClock) -> None:
    def handler(c: rpc.Call) -> None:
        raise RuntimeError("subscriber bug")
    async with connection(echo(), on_callback=handler) as (conn, peer):
        await peer.send(rpc.encode_call(7, 52743234, 1, 9, rpc.AUTH_NULL, b"", b""))
        assert await conn.call(PROG, VERS, 1, b"ok") == b"ok"


async def fail_while_waiting(conn: RpcConnection, peer: Peer, fault: Callable[[], Awaitable[None]]) -> list[OSError]:
    """Start one call the peer never answers, inject ``fault``, return what the caller got."""
    errors: list[OSError] = []

    async def caller() -> None:
        try:
            await conn.call(PROG, VERS, 1, b"q")
        except OSError as e:
            errors.append(e)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        await fault()
    return errors


@pytest.mark.trio
async def test_garbage_from_the_peer_fails_pending_calls_cleanly(clock: trio.testing.MockClock) -> None:
    """A hostile or broken peer: the connection closes with a reason, waiting calls get ENOTCONN."""
    async with connection(lambda c: None, ping_timeout=None) as (conn, peer):
        errors = await fail_while_waiting(
            conn, peer, lambda: peer.stream.send_all(rpc.frame(b"\x00\x00\x00\x01\x00\x00\x00\x07garbage")))
        assert [e.errno for e in errors] == [errno.ENOTCONN]
        assert conn.closed.is_set() and "protocol error" in conn.close_reason
        with pytest.raises(OSError) as later:
            await conn.call(PROG, VERS, 1, b"again")
        assert later.value.errno == errno.ENOTCONN


@pytest.mark.trio
async def test_peer_closing_fails_pending_and_later_calls(clock: trio.testing.MockClock) -> None:
    async with connection(lambda c: None, ping_timeout=None) as (conn, peer):
        errors = await fail_while_waiting(conn, peer, peer.stream.aclose)
        assert [e.errno for e in errors] == [errno.ENOTCONN]
        assert "closed by peer" in conn.close_reason or "receive failed" in conn.close_reason
