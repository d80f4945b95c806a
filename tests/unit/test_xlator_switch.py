"""The graph switch over in-memory graphs: new work goes to the newest graph, open handles and calls in
progress stay on theirs, and an old graph is retired only when neither is left (as
tests/cluster/test_mount_graph_switch.py checks with a live volfile change).

Each "graph" here is a session with its own brick, so where a call went shows in the bricks' contents.
"""

from __future__ import annotations

import errno
import os

import pytest
import trio

from gfuse.cred import new_gfid
from gfuse.iatt import ROOT_GFID
from gfuse.xlators.switch import GraphSwitch
from testkit.membrick import MemBrick, MemClient


class Retired:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def graph(name: str) -> tuple[MemBrick, MemClient]:
    b = MemBrick(name)
    return b, b.client()


async def test_new_work_goes_to_the_new_graph_and_open_files_stay(autojump_clock: trio.abc.Clock) -> None:
    a, ga = graph("a")
    b, gb = graph("b")
    sw = GraphSwitch(ga)
    c = await sw.create(ROOT_GFID, "open-across", os.O_RDWR, 0o644, new_gfid())
    assert c.fd is not None
    await sw.write(c.fd, 0, b"before-")
    retired = Retired()
    sw.switch(gb, retired)
    assert sw.current is gb and retired.count == 0
    await sw.write(c.fd, 7, b"after")
    assert (await sw.read(c.fd, 0, 100)).data == b"before-after"
    assert a.data("open-across") == b"before-after" and not b.exists("open-across")
    with pytest.raises(OSError) as e:
        await sw.lookup(ROOT_GFID, "open-across")  # new lookups see the new graph
    assert e.value.errno == errno.ENOENT
    n = await sw.create(ROOT_GFID, "new", os.O_RDWR, 0o644, new_gfid())
    assert n.fd is not None and n.fd != c.fd
    assert b.exists("new") and not a.exists("new")
    await sw.release(n.fd)
    assert retired.count == 0, "retired while a handle was still open on it"
    await sw.release(c.fd)
    assert retired.count == 1
    await sw.release(c.fd)  # a second release of a handle is ignored
    with pytest.raises(OSError) as e:
        await sw.write(c.fd, 0, b"x")
    assert e.value.errno == errno.EBADF
    assert retired.count == 1


async def test_a_call_in_progress_keeps_the_old_graph(autojump_clock: trio.abc.Clock) -> None:
    """A lookup begun just before the switch finishes on the old graph, which is retired after it."""
    a, ga = graph("a")
    _, gb = graph("b")
    await ga.mkdir(ROOT_GFID, "d", 0o755, new_gfid())
    sw = GraphSwitch(ga)
    retired = Retired()
    got: list[object] = []

    async def slow_lookup() -> None:
        got.append(await sw.lookup(ROOT_GFID, "d"))

    a.stop()  # the brick hangs: the call stays in progress
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_lookup)
        await trio.sleep(1)
        sw.switch(gb, retired)
        await trio.sleep(1)
        assert retired.count == 0, "retired with a call in progress on it"
        a.cont()
    assert len(got) == 1, "the call begun before the switch did not complete"
    assert retired.count == 1


async def test_an_open_in_progress_reserves_its_graph(autojump_clock: trio.abc.Clock) -> None:
    a, ga = graph("a")
    _, gb = graph("b")
    g = new_gfid()
    await ga.create(ROOT_GFID, "f", os.O_RDWR, 0o644, g)
    sw = GraphSwitch(ga)
    retired = Retired()
    handles: list[int] = []

    async def slow_open() -> None:
        r = await sw.open(g, os.O_RDWR)
        assert r.fd is not None
        handles.append(r.fd)

    a.stop()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_open)
        await trio.sleep(1)
        sw.switch(gb, retired)
        a.cont()
    assert handles and retired.count == 0, "the handle opened across the switch did not keep its graph"
    await sw.write(handles[0], 0, b"on-a")
    assert a.data("f") == b"on-a"
    await sw.release(handles[0])
    assert retired.count == 1


@pytest.mark.parametrize("fop", ["open", "create", "opendir"])
async def test_a_failed_open_does_not_pin_the_old_graph(autojump_clock: trio.abc.Clock, fop: str) -> None:
    a, ga = graph("a")
    _, gb = graph("b")
    await ga.mkdir(ROOT_GFID, "exists", 0o755, new_gfid())
    sw = GraphSwitch(ga)
    retired = Retired()

    async def failing_open() -> None:
        with pytest.raises(OSError) as e:
            if fop == "open":
                await sw.open(new_gfid(), os.O_RDONLY)  # no such inode
            elif fop == "opendir":
                await sw.opendir(new_gfid())
            else:
                await sw.create(ROOT_GFID, "exists", os.O_RDWR, 0o644, new_gfid())
        assert e.value.errno == (errno.EEXIST if fop == "create" else errno.ENOENT)

    a.stop()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(failing_open)
        await trio.sleep(1)
        sw.switch(gb, retired)
        assert retired.count == 0
        a.cont()
    assert retired.count == 1


async def test_each_old_graph_is_retired_on_its_own(autojump_clock: trio.abc.Clock) -> None:
    _, ga = graph("a")
    _, gb = graph("b")
    _, gc = graph("c")
    sw = GraphSwitch(ga)
    fa = (await sw.opendir(ROOT_GFID)).fd
    ra, rb = Retired(), Retired()
    sw.switch(gb, ra)
    fb = (await sw.opendir(ROOT_GFID)).fd
    sw.switch(gc, rb)
    assert fa is not None and fb is not None and fa != fb
    assert {e.name for e in (await sw.readdirp(fb)).entries} >= {".", ".."}
    await sw.releasedir(fb)
    assert (ra.count, rb.count) == (0, 1)
    await sw.releasedir(fa)
    assert (ra.count, rb.count) == (1, 1)
    assert sw.generation == 3
