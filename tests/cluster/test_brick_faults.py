"""A BrickClient through brick faults: a killed brick (SIGKILL + ``volume start force``) and a hung one
(SIGSTOP + ping timeout). Runs on a private replica-3 volume, deleted at the end even on failure.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator

import pytest
import trio
from test_brick_fops import all_ok, make_file, open_bricks

from gfuse import fops as F
from testkit import cluster as tc
from gfuse.fops import Flock, Proc
from gfuse.iatt import ROOT_GFID
from gfuse.cred import now_cred
from gfuse.xlators.api import BrickEvent
from gfuse.xlators.client import BrickClient

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def fault_volume(glusterd: tc.GlusterdProcess) -> Iterator[tc.Volume]:
    """A private replica-3 volume for destructive tests (shared by this module only)."""
    vol = tc.create_volume("replica3")
    try:
        yield vol
    finally:
        vol.delete()  # resumes stopped bricks, stops and deletes the volume, removes the bricks


@pytest.fixture
def fvol(fault_volume: tc.Volume) -> Iterator[tc.Volume]:
    """The fault volume, with every brick running again after each test."""
    yield fault_volume
    fault_volume.ensure_online()


class Events:
    """Up/down transitions of one client, with the trio time they arrived."""

    def __init__(self, client: BrickClient) -> None:
        self.seen: list[tuple[float, bool, str]] = []
        self._changed = trio.Event()
        client.subscribe(self._on)

    def _on(self, ev: BrickEvent) -> None:
        self.seen.append((trio.current_time(), ev.up, ev.reason))
        self._changed.set()

    async def wait_for(self, up: bool, after: int = 0) -> float:
        """Wait until an event ``up`` arrives at index >= ``after``; returns its time."""
        while True:
            for t, u, _ in self.seen[after:]:
                if u == up:
                    return t
            self._changed = trio.Event()
            await self._changed.wait()

    @property
    def states(self) -> list[bool]:
        return [u for _, u, _ in self.seen]


async def test_killed_brick_comes_back_on_the_same_client(fvol: tc.Volume) -> None:
    payload = b"survives a brick restart\n" * 50
    with trio.fail_after(90):
        async with open_bricks(fvol, backoff=(0.2, 1.0)) as v:
            g = await make_file(v.bricks, ROOT_GFID, "restart-me", payload)
            c = v.bricks[0].client
            ev = Events(c)
            fd = (await c.open(g, os.O_RDWR)).fd
            assert (await c.read(fd, 0, len(payload))).data == payload
            conn_before, gen_before = c.conn, c.generation
            port_before = await trio.to_thread.run_sync(fvol.brick_port, 0)

            pid = await trio.to_thread.run_sync(fvol.brick_pid, 0)
            assert pid
            t_kill = trio.current_time()
            os.kill(pid, signal.SIGKILL)
            with trio.fail_after(5):
                t_down = await ev.wait_for(False)
            assert t_down - t_kill < 2
            assert not c.is_up
            await trio.to_thread.run_sync(lambda: fvol.wait_bricks(online=False, bricks=[0], timeout=15))

            # calls fail fast with ENOTCONN while the brick is gone
            for call in (lambda: c.stat(g), lambda: c.read(fd, 0, 10), lambda: c.lookup_root()):
                t0 = trio.current_time()
                with trio.fail_after(2), pytest.raises(OSError) as ei:
                    await call()
                assert ei.value.errno == errno.ENOTCONN, ei.value
                assert trio.current_time() - t0 < 1.0
            # the other replicas are not affected
            await all_ok(v.bricks[1:], lambda b: b.client.stat(g))

            await trio.to_thread.run_sync(fvol.start_force)
            port_after = await trio.to_thread.run_sync(fvol.brick_port, 0)
            with trio.fail_after(30):
                await ev.wait_for(True, after=1)
            assert ev.states == [False, True], ev.seen  # one down, one up: no flapping
            assert c.is_up and c.conn is not conn_before and c.generation == gen_before + 1

            r = await c.stat(g)
            assert r.stat.gfid == g and r.stat.size == len(payload)
            # the fd opened before the kill was reopened on the new connection
            assert (await c.read(fd, 0, len(payload))).data == payload
            assert (await c.fstat(fd)).stat.gfid == g
            w = await c.write(fd, len(payload), b"more", cred=now_cred(Proc.WRITE))
            assert w.post.size == len(payload) + 4
            await c.release(fd)
            print(f"brick port {port_before} -> {port_after}; down after {t_down - t_kill:.3f}s")


async def test_hung_brick_times_out_and_recovers(fvol: tc.Volume) -> None:
    with trio.fail_after(90):
        async with open_bricks(fvol) as v:
            g = await make_file(v.bricks, ROOT_GFID, "hang-me", b"abc")
        async with open_bricks(fvol, only=[0], ping_timeout=3, backoff=(0.2, 1.0)) as v:
            c = v.bricks[0].client
            ev = Events(c)
            fd = (await c.open(g, os.O_RDONLY)).fd
            assert (await c.stat(g)).stat.gfid == g  # the connection has just heard from the brick

            await trio.to_thread.run_sync(fvol.pause_brick, 0)
            try:
                t0 = trio.current_time()
                with trio.fail_after(15), pytest.raises(OSError) as ei:
                    await c.stat(g)
                elapsed = trio.current_time() - t0
                assert ei.value.errno == errno.ENOTCONN, ei.value
                assert 2.5 <= elapsed <= 10, f"failed after {elapsed:.1f}s with ping-timeout 3"
                with trio.fail_after(2):  # the down event follows the failed call closely
                    await ev.wait_for(False)
                assert ev.states == [False] and "ping" in ev.seen[0][2], ev.seen
                with trio.fail_after(2), pytest.raises(OSError) as ei:
                    await c.stat(g)  # down: fails at once
                assert ei.value.errno == errno.ENOTCONN
                # the other replicas answer (fresh sessions: see test_slow_call_after_idle_period...)
                async with open_bricks(fvol, only=[1, 2]) as others:
                    await all_ok(others.bricks, lambda b: b.client.stat(g))
            finally:
                await trio.to_thread.run_sync(fvol.resume_brick, 0)

            with trio.fail_after(30):
                await ev.wait_for(True, after=1)
            assert (await c.stat(g)).stat.gfid == g
            assert (await c.read(fd, 0, 3)).data == b"abc"
            await c.release(fd)
            print(f"ENOTCONN after {elapsed:.2f}s; events {[(round(t - t0, 2), u) for t, u, _ in ev.seen]}")


async def test_slow_call_after_idle_period_is_not_a_ping_timeout(fvol: tc.Volume) -> None:
    """A healthy brick must not be dropped because the connection was idle before a slow call.

    gluster's client disconnects only when nothing was received *and* nothing sent for
    ping-timeout (rpc_clnt_ping_timer_expired). Here: ping-timeout 3 s, 4.5 s without traffic,
    then a blocking INODELK that waits ~2 s for another session's lock: it must be granted.
    """
    with trio.fail_after(60):
        async with open_bricks(fvol, ping_timeout=3) as holder_s, open_bricks(fvol, ping_timeout=3) as waiter_s:
            g = await make_file(holder_s.bricks, ROOT_GFID, "slow-lock", b"x")
            holder, waiter = holder_s.bricks[0].client, waiter_s.bricks[0].client
            dom = "gfuse-test-idle"
            own_h, own_w = now_cred(lk_owner=b"holder!!"), now_cred(lk_owner=b"waiter!!")
            await waiter.stat(g)
            await holder.inodelk(g, dom, F.SETLK, Flock(F.WRLCK, 0, 0, 0), cred=own_h)
            conn = waiter.conn
            await trio.sleep(4.5)  # the waiter's connection stays idle longer than ping-timeout

            async def release_later() -> None:
                await trio.sleep(2.0)
                await holder.inodelk(g, dom, F.SETLK, Flock(F.UNLCK, 0, 0, 0), cred=own_h)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(release_later)
                t0 = trio.current_time()
                await waiter.inodelk(g, dom, F.SETLKW, Flock(F.WRLCK, 0, 0, 0), cred=own_w)
                waited = trio.current_time() - t0
            assert 1.5 <= waited < 5
            assert waiter.conn is conn and waiter.is_up
            await waiter.inodelk(g, dom, F.SETLK, Flock(F.UNLCK, 0, 0, 0), cred=own_w)


async def test_hung_brick_is_dropped_after_one_ping_timeout(fvol: tc.Volume) -> None:
    """Silence for ping-timeout while a call waits drops the connection -- not up to twice that.

    gluster's client arms its ping timer for ping-timeout and disconnects when it expires with
    nothing received (rpc_clnt_ping_timer_expired). One pinger period (ping-timeout/4) of
    lateness is fine; waiting for our own unanswered PING for another full ping-timeout is not.
    """
    timeout = 4.0
    with trio.fail_after(60):
        async with open_bricks(fvol) as v:
            g = await make_file(v.bricks, ROOT_GFID, "hang-me-too", b"abc")
        async with open_bricks(fvol, only=[0], ping_timeout=timeout, backoff=(0.2, 1.0)) as v:
            c = v.bricks[0].client
            await c.stat(g)
            await trio.to_thread.run_sync(fvol.pause_brick, 0)
            # silence is counted from the call we wait on: an idle connection is not a silent brick
            # (pause_brick itself can take seconds on a loaded machine)
            t_last = trio.current_time()
            try:
                with trio.fail_after(20), pytest.raises(OSError) as ei:
                    await c.stat(g)
                silent = trio.current_time() - t_last
            finally:
                await trio.to_thread.run_sync(fvol.resume_brick, 0)
            assert ei.value.errno == errno.ENOTCONN
            assert timeout - 0.1 <= silent <= timeout + timeout / 4 + 0.5, (
                f"dropped after {silent:.2f}s of silence (ping-timeout {timeout:g}s)")
