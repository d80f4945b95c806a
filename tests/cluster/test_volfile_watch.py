"""VolfileWatcher: glusterd pushes FETCHSPEC to connected clients when a volfile changes."""

from __future__ import annotations

import pytest
import trio

from gfuse import rpc
from testkit import cluster as tc
from gfuse.fops import CBK_PROGRAM, Cbk
from gfuse.mgmt import Server, VolfileWatcher, fetch_graph
from gfuse.volfile import Graph

pytestmark = pytest.mark.cluster


async def test_volume_set_reaches_the_watcher(vol_dist1: tc.Volume) -> None:
    """``gluster volume set VOL performance.quick-read off`` -> on_change gets the new graph in ~10 s."""
    servers = [Server(vol_dist1.host)]
    _, before = await fetch_graph(servers, vol_dist1.name)
    assert [x for x in before.xlators.values() if x.type == "performance/quick-read"], "quick-read is on by default"

    changes: list[Graph] = []
    got = trio.Event()
    pushes: list[int] = []

    async def on_change(g: Graph) -> None:
        changes.append(g)
        got.set()

    watcher = VolfileWatcher(servers, vol_dist1.name, before, on_change)
    # count the FETCHSPEC pushes glusterd sends (wrapping the watcher's own handler)
    orig = watcher._callback

    def spy(call: rpc.Call) -> None:
        if call.prog == CBK_PROGRAM and call.proc == Cbk.FETCHSPEC:
            pushes.append(call.proc)
        orig(call)

    watcher._callback = spy

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            await trio.sleep(0.5)  # let glusterd register the connection
            t0 = trio.current_time()
            await trio.to_thread.run_sync(vol_dist1.set_option, "performance.quick-read", "off")
            t_set = trio.current_time() - t0
            with trio.move_on_after(10):
                await got.wait()
            elapsed = trio.current_time() - t0
            nursery.cancel_scope.cancel()

    assert pushes, "glusterd sent no FETCHSPEC callback on our connection within 10 s of 'volume set'"
    assert changes, f"FETCHSPEC arrived ({len(pushes)}x) but on_change was not called"
    new = changes[-1]
    assert new.text != before.text
    assert not [x for x in new.xlators.values() if x.type == "performance/quick-read"], "quick-read still in graph"
    assert watcher.current is new
    print(f"volume set took {t_set:.2f}s; on_change after {elapsed:.2f}s; {len(pushes)} FETCHSPEC pushes")
