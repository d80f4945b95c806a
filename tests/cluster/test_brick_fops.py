"""Every fop of the protocol client against real bricks, checked on the brick directories.

At the protocol level there is no replicate or distribute translator: these tests open one
:class:`BrickClient` per ``protocol/client`` of the volfile and, for replica volumes, do what a
replicating client must do -- send each entry-creating fop to *every* brick of a replica set at
once, with the same gfid and the same credential (ctime). What the bricks answer is compared
with what they wrote to disk (``os.stat``, ``os.getxattr(path, "trusted.gfid")``, file bytes).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from gfuse import fops as F
from testkit import cluster as tc
from gfuse.fops import Flock, Proc
from gfuse.iatt import NULL_GFID, ROOT_GFID, SET_ATIME, SET_MODE, SET_MTIME, Iatt
from gfuse.mgmt import Server, fetch_graph
from gfuse.volfile import Graph
from gfuse.cred import new_gfid, now_cred
from gfuse.xlators.client import BrickClient

pytestmark = pytest.mark.cluster

KIND_PARAMS = ["dist1", "replica3", "distrep"]


# ------------------------------------------------------------------------------------------
# helpers: one BrickClient per brick, replica sets, "do it on every brick of the set"


@dataclass
class Brick:
    index: int
    client: BrickClient
    dir: Path

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)


@dataclass
class Bricks:
    volume: tc.Volume
    graph: Graph
    bricks: list[Brick]
    sets: list[list[Brick]] = field(default_factory=list)


def replica_sets(graph: Graph, bricks: Sequence[Brick]) -> list[list[Brick]]:
    """Bricks grouped as the volfile's cluster/replicate translators group them (or one each)."""
    by_name = {b.client.name: b for b in bricks}
    afrs = [x for x in graph.xlators.values() if x.type == "cluster/replicate"]
    if not afrs:
        return [[b] for b in bricks]
    sets = [[by_name[s.name] for s in afr.subvolumes if s.name in by_name] for afr in afrs]
    return [s for s in sets if s]


@asynccontextmanager
async def open_bricks(vol: tc.Volume, only: Sequence[int] | None = None, **client_kw: Any) -> AsyncIterator[Bricks]:
    """Connect to every brick of ``vol`` (or the bricks ``only``), one session each; cancelled on exit."""
    srv, graph = await fetch_graph([Server(vol.host)], vol.name)
    dirs = {str(d) for d in vol.brick_dirs}
    bricks = []
    for i, x in enumerate(graph.clients()):
        if only is not None and i not in only:
            continue
        c = BrickClient(x, srv, volfile_key=vol.name, **client_kw)
        assert c.brick_path in dirs, f"volfile brick {c.brick_path} is not one of {sorted(dirs)}"
        bricks.append(Brick(i, c, Path(c.brick_path)))
    clients = [b.client for b in bricks]
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            for c in clients:
                await nursery.start(c.run)
            for c in clients:
                assert await c.wait_up(10), f"{c.name} did not come up: {c.last_error}"
        try:
            yield Bricks(vol, graph, bricks, replica_sets(graph, bricks))
        finally:
            nursery.cancel_scope.cancel()


async def on_each(bricks: Sequence[Brick], fn: Callable[[Brick], Awaitable[Any]]) -> list[Any]:
    """Run ``fn`` on every brick concurrently; results (or the OSError raised) in brick order."""
    out: list[Any] = [None] * len(bricks)

    async def one(i: int, b: Brick) -> None:
        try:
            out[i] = await fn(b)
        except OSError as e:
            out[i] = e

    async with trio.open_nursery() as nursery:
        for i, b in enumerate(bricks):
            nursery.start_soon(one, i, b)
    return out


async def all_ok(bricks: Sequence[Brick], fn: Callable[[Brick], Awaitable[Any]]) -> list[Any]:
    res = await on_each(bricks, fn)
    bad = [(b.client.name, r) for b, r in zip(bricks, res) if isinstance(r, OSError)]
    assert not bad, f"failed on {bad}"
    return res


async def all_fail(bricks: Sequence[Brick], fn: Callable[[Brick], Awaitable[Any]], err: int) -> None:
    res = await on_each(bricks, fn)
    for b, r in zip(bricks, res):
        assert isinstance(r, OSError), f"{b.client.name}: expected {errno.errorcode[err]}, got success {r}"
        assert r.errno == err, f"{b.client.name}: expected {errno.errorcode[err]}, got {r!r}"


def disk_gfid(p: Path) -> bytes:
    return os.getxattr(p, "trusted.gfid", follow_symlinks=False)


def uniq(request: pytest.FixtureRequest) -> str:
    """A name unique to this test (and this session: the shared volumes keep files)."""
    import secrets
    return f"{request.node.name.replace('[', '-').replace(']', '')[:60]}-{secrets.token_hex(3)}"


async def make_dir(bricks: Sequence[Brick], parent: bytes, name: str, mode: int = 0o755) -> bytes:
    """MKDIR on every given brick with one gfid and one credential; returns the gfid."""
    gfid = new_gfid()
    cred = now_cred(Proc.MKDIR)
    res = await all_ok(bricks, lambda b: b.client.mkdir(parent, name, mode, gfid, cred=cred))
    for r in res:
        assert r.stat.gfid == gfid and r.stat.is_dir
    return gfid


async def make_file(bricks: Sequence[Brick], parent: bytes, name: str, data: bytes = b"",
                    mode: int = 0o644) -> bytes:
    """CREATE + WRITE + RELEASE on every given brick (same gfid, same ctime); returns the gfid."""
    gfid = new_gfid()
    cred = now_cred(Proc.CREATE)
    res = await all_ok(bricks, lambda b: b.client.create(parent, name, os.O_RDWR | os.O_CREAT | os.O_EXCL,
                                                          stat.S_IFREG | mode, gfid, cred=cred))
    fds = {b.index: r.fd for b, r in zip(bricks, res)}
    if data:
        wcred = now_cred(Proc.WRITE)
        await all_ok(bricks, lambda b: b.client.write(fds[b.index], 0, data, cred=wcred))
    await all_ok(bricks, lambda b: b.client.release(fds[b.index]))
    return gfid


# ------------------------------------------------------------------------------------------
# every fop, on every brick of every replica set


async def _fop_scenario(rs: list[Brick], dgfid: bytes, dname: str, shared_with: Sequence[Path]) -> None:
    """The whole fop list on one replica set, inside directory ``dname`` (gfid ``dgfid``)."""
    def on(fn: Callable[[Brick], Awaitable[Any]]) -> Awaitable[list[Any]]:
        return all_ok(rs, fn)

    # LOOKUP of a missing name
    await all_fail(rs, lambda b: b.client.lookup(dgfid, "nothing-here"), errno.ENOENT)

    # CREATE: same gfid and credential on every replica
    g = new_gfid()
    cred = now_cred(Proc.CREATE)
    res = await on(lambda b: b.client.create(dgfid, "f", os.O_RDWR | os.O_CREAT | os.O_EXCL,
                                             stat.S_IFREG | 0o640, g, cred=cred))
    fd = {b.index: r.fd for b, r in zip(rs, res)}
    for b, r in zip(rs, res):
        assert r.stat.gfid == g and r.stat.is_reg and stat.S_IMODE(r.stat.mode) == 0o640
        assert r.postparent.gfid == dgfid
        st = os.stat(b.path(dname, "f"))
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and st.st_size == 0
        assert disk_gfid(b.path(dname, "f")) == g
        assert r.stat.ino == int.from_bytes(g[8:], "big")  # gluster's ino is the gfid's low half
    # CREATE of an existing name with O_EXCL
    await all_fail(rs, lambda b: b.client.create(dgfid, "f", os.O_RDWR | os.O_CREAT | os.O_EXCL,
                                                 stat.S_IFREG | 0o640, new_gfid()), errno.EEXIST)

    # WRITE / READ / FSTAT / FLUSH / FSYNC
    data = b"hello gluster\n" * 100
    wcred = now_cred(Proc.WRITE)
    res = await on(lambda b: b.client.write(fd[b.index], 0, data, cred=wcred))
    for r in res:
        assert r.ret == len(data) and r.post.size == len(data) and r.pre.size == 0
    res = await on(lambda b: b.client.write(fd[b.index], len(data), b"tail", cred=wcred))
    data += b"tail"
    res = await on(lambda b: b.client.read(fd[b.index], 0, 1 << 20))
    for r in res:
        assert r.data == data and r.stat.size == len(data)
    res = await on(lambda b: b.client.read(fd[b.index], 6, 7))
    assert all(r.data == b"gluster" for r in res)
    res = await on(lambda b: b.client.read(fd[b.index], len(data) + 10, 100))
    assert all(r.data == b"" and r.ret == 0 for r in res)  # past EOF
    res = await on(lambda b: b.client.fstat(fd[b.index]))
    assert all(r.stat.gfid == g and r.stat.size == len(data) for r in res)
    await on(lambda b: b.client.flush(fd[b.index]))
    res = await on(lambda b: b.client.fsync(fd[b.index]))
    assert all(r.post.size == len(data) for r in res)
    await on(lambda b: b.client.fsync(fd[b.index], datasync=True))
    for b in rs:
        assert b.path(dname, "f").read_bytes() == data

    # STAT, nameless and named LOOKUP
    res = await on(lambda b: b.client.stat(g))
    assert all(r.stat.gfid == g and r.stat.size == len(data) for r in res)
    res = await on(lambda b: b.client.lookup_gfid(g))
    assert all(r.stat.gfid == g and r.stat.size == len(data) for r in res)
    res = await on(lambda b: b.client.lookup(dgfid, "f"))
    assert all(r.stat.gfid == g and r.postparent.gfid == dgfid for r in res)

    # FTRUNCATE, TRUNCATE, FALLOCATE
    tcred = now_cred(Proc.FTRUNCATE)
    res = await on(lambda b: b.client.ftruncate(fd[b.index], 5, cred=tcred))
    assert all(r.post.size == 5 for r in res)
    for b in rs:
        assert b.path(dname, "f").read_bytes() == data[:5]
    tcred = now_cred(Proc.TRUNCATE)
    res = await on(lambda b: b.client.truncate(g, 3, cred=tcred))
    assert all(r.pre.size == 5 and r.post.size == 3 for r in res)
    for b in rs:
        assert os.stat(b.path(dname, "f")).st_size == 3
    acred = now_cred(Proc.FALLOCATE)
    res = await on(lambda b: b.client.fallocate(fd[b.index], 0, 0, 8192, cred=acred))
    assert all(r.post.size == 8192 for r in res)
    for b in rs:
        assert b.path(dname, "f").read_bytes() == data[:3] + b"\0" * (8192 - 3)

    # SETATTR (mode, then times) and FSETATTR
    scred = now_cred(Proc.SETATTR, valid=SET_MODE)
    res = await on(lambda b: b.client.setattr(g, Iatt(mode=0o600), SET_MODE, cred=scred))
    assert all(stat.S_IMODE(r.post.mode) == 0o600 and stat.S_IMODE(r.pre.mode) == 0o640 for r in res)
    for b in rs:
        assert stat.S_IMODE(os.stat(b.path(dname, "f")).st_mode) == 0o600
    when = 1_500_000_000
    tcred = now_cred(Proc.SETATTR, valid=SET_MTIME | SET_ATIME)
    res = await on(lambda b: b.client.setattr(g, Iatt(atime=when, mtime=when + 7), SET_ATIME | SET_MTIME,
                                              cred=tcred))
    assert all(r.post.mtime == when + 7 for r in res)
    for b in rs:
        st = os.stat(b.path(dname, "f"))
        assert int(st.st_mtime) == when + 7 and int(st.st_atime) == when
    fcred = now_cred(Proc.FSETATTR, valid=SET_MODE)
    res = await on(lambda b: b.client.fsetattr(fd[b.index], Iatt(mode=0o604), SET_MODE, cred=fcred))
    assert all(stat.S_IMODE(r.post.mode) == 0o604 for r in res)
    for b in rs:
        assert stat.S_IMODE(os.stat(b.path(dname, "f")).st_mode) == 0o604

    # ACCESS
    await on(lambda b: b.client.access(g, os.R_OK | os.W_OK))

    # xattrs: SETXATTR / GETXATTR / REMOVEXATTR and the fd variants
    xcred = now_cred(Proc.SETXATTR)
    await on(lambda b: b.client.setxattr(g, {"user.color": b"blue"}, cred=xcred))
    for b in rs:
        assert os.getxattr(b.path(dname, "f"), "user.color") == b"blue"
    res = await on(lambda b: b.client.getxattr(g, "user.color"))
    assert all(r.dict.get("user.color") == b"blue" for r in res), [r.dict for r in res]
    await all_fail(rs, lambda b: b.client.getxattr(g, "user.absent"), errno.ENODATA)
    await on(lambda b: b.client.fsetxattr(fd[b.index], {"user.shape": b"round", "user.size": b"xl"}, cred=xcred))
    for b in rs:
        assert os.getxattr(b.path(dname, "f"), "user.shape") == b"round"
        assert os.getxattr(b.path(dname, "f"), "user.size") == b"xl"
    res = await on(lambda b: b.client.fgetxattr(fd[b.index], "user.shape"))
    assert all(r.dict.get("user.shape") == b"round" for r in res)
    res = await on(lambda b: b.client.fgetxattr(fd[b.index]))  # list every xattr
    for r in res:
        assert {"user.color", "user.shape", "user.size"} <= set(r.dict), r.dict
    # XATTR_CREATE on an existing key
    await all_fail(rs, lambda b: b.client.setxattr(g, {"user.color": b"red"}, flags=os.XATTR_CREATE), errno.EEXIST)
    await on(lambda b: b.client.removexattr(g, "user.color", cred=xcred))
    await on(lambda b: b.client.fremovexattr(fd[b.index], "user.shape", cred=xcred))
    for b in rs:
        names = os.listxattr(b.path(dname, "f"))
        assert "user.color" not in names and "user.shape" not in names and "user.size" in names
    await all_fail(rs, lambda b: b.client.removexattr(g, "user.color"), errno.ENODATA)

    # STATFS
    # (bricks of one volume sharing a filesystem each report their share: glusterd's shared-brick-count)
    res = await on(lambda b: b.client.statfs(dgfid))
    for b, r in zip(rs, res):
        sv = os.statvfs(b.dir)
        shared = sum(1 for d in shared_with if os.stat(d).st_dev == os.stat(b.dir).st_dev)
        assert r.statfs.bsize == sv.f_bsize and r.statfs.namemax == sv.f_namemax
        assert r.statfs.blocks == sv.f_blocks // shared and r.statfs.files == sv.f_files // shared, (r.statfs, sv)

    # OPEN an existing file read-only, READ, RELEASE
    res = await on(lambda b: b.client.open(g, os.O_RDONLY))
    rofd = {b.index: r.fd for b, r in zip(rs, res)}
    res = await on(lambda b: b.client.read(rofd[b.index], 0, 3))
    assert all(r.data == data[:3] for r in res)
    await on(lambda b: b.client.release(rofd[b.index]))
    await on(lambda b: b.client.release(fd[b.index]))

    # MKNOD (a fifo)
    pg = new_gfid()
    cred = now_cred(Proc.MKNOD)
    res = await on(lambda b: b.client.mknod(dgfid, "fifo", stat.S_IFIFO | 0o620, 0, pg, cred=cred))
    assert all(r.stat.gfid == pg and stat.S_ISFIFO(r.stat.mode) for r in res)
    for b in rs:
        st = os.stat(b.path(dname, "fifo"))
        assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620
        assert disk_gfid(b.path(dname, "fifo")) == pg

    # SYMLINK / READLINK
    sg = new_gfid()
    cred = now_cred(Proc.SYMLINK)
    res = await on(lambda b: b.client.symlink(dgfid, "sl", "f", sg, cred=cred))
    assert all(r.stat.gfid == sg and r.stat.is_lnk for r in res)
    for b in rs:
        assert os.readlink(b.path(dname, "sl")) == "f"
        assert disk_gfid(b.path(dname, "sl")) == sg
    res = await on(lambda b: b.client.readlink(sg))
    assert all(r.path == "f" for r in res)

    # LINK: nlink grows by one on the brick and in the answer
    before = {b.index: os.stat(b.path(dname, "f")).st_nlink for b in rs}
    pre = await on(lambda b: b.client.stat(g))
    cred = now_cred(Proc.LINK)
    res = await on(lambda b: b.client.link(g, dgfid, "hard", cred=cred))
    for b, r, p in zip(rs, res, pre):
        assert r.stat.gfid == g and r.stat.nlink == p.stat.nlink + 1
        assert os.stat(b.path(dname, "f")).st_nlink == before[b.index] + 1
        assert os.stat(b.path(dname, "hard")).st_ino == os.stat(b.path(dname, "f")).st_ino
        assert disk_gfid(b.path(dname, "hard")) == g

    # RENAME within the directory
    cred = now_cred(Proc.RENAME)
    res = await on(lambda b: b.client.rename(dgfid, "hard", dgfid, "hard2", cred=cred))
    assert all(r.stat.gfid == g for r in res)
    for b in rs:
        assert not b.path(dname, "hard").exists()
        assert disk_gfid(b.path(dname, "hard2")) == g
    await all_fail(rs, lambda b: b.client.lookup(dgfid, "hard"), errno.ENOENT)

    # UNLINK, and UNLINK of a missing name
    cred = now_cred(Proc.UNLINK)
    res = await on(lambda b: b.client.unlink(dgfid, "hard2", cred=cred))
    assert all(r.postparent.gfid == dgfid for r in res)
    for b in rs:
        assert not b.path(dname, "hard2").exists()
        assert os.stat(b.path(dname, "f")).st_nlink == before[b.index]
    await all_fail(rs, lambda b: b.client.unlink(dgfid, "hard2"), errno.ENOENT)

    # MKDIR, MKDIR of an existing name, RMDIR of a non-empty and then an empty directory
    sub = await make_dir(rs, dgfid, "sub", 0o750)
    for b in rs:
        st = os.stat(b.path(dname, "sub"))
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
        assert disk_gfid(b.path(dname, "sub")) == sub
    await all_fail(rs, lambda b: b.client.mkdir(dgfid, "sub", 0o755, new_gfid()), errno.EEXIST)
    # RENAME into another directory and back
    cred = now_cred(Proc.RENAME)
    res = await on(lambda b: b.client.rename(dgfid, "fifo", sub, "moved-fifo", cred=cred))
    assert all(r.stat.gfid == pg and r.postparent.gfid == sub and r.postoldparent.gfid == dgfid for r in res)
    for b in rs:
        assert not b.path(dname, "fifo").exists() and disk_gfid(b.path(dname, "sub", "moved-fifo")) == pg
    await on(lambda b: b.client.rename(sub, "moved-fifo", dgfid, "fifo", cred=now_cred(Proc.RENAME)))
    for b in rs:
        assert disk_gfid(b.path(dname, "fifo")) == pg and os.listdir(b.path(dname, "sub")) == []
    await make_file(rs, sub, "inner", b"x")
    await all_fail(rs, lambda b: b.client.rmdir(dgfid, "sub"), errno.ENOTEMPTY)
    await on(lambda b: b.client.unlink(sub, "inner"))
    cred = now_cred(Proc.RMDIR)
    await on(lambda b: b.client.rmdir(dgfid, "sub", cred=cred))
    for b in rs:
        assert not b.path(dname, "sub").exists()
    await all_fail(rs, lambda b: b.client.lookup_gfid(sub), errno.ENOENT)

    # OPENDIR / READDIR / READDIRP
    res = await on(lambda b: b.client.opendir(dgfid))
    dfd = {b.index: r.fd for b, r in zip(rs, res)}
    res = await on(lambda b: b.client.readdirp_all(dfd[b.index]))
    for b, entries in zip(rs, res):
        names = {e.name: e for e in entries}
        assert set(names) == {".", "..", "f", "fifo", "sl"} == set(os.listdir(b.path(dname))) | {".", ".."}
        assert names["f"].stat.gfid == g and names["sl"].stat.gfid == sg and names["fifo"].stat.gfid == pg
        assert names["f"].type == 8 and names["sl"].type == 10  # DT_REG, DT_LNK
    res = await on(lambda b: b.client.readdir(dfd[b.index]))
    for r in res:
        assert {e.name for e in r.entries} == {".", "..", "f", "fifo", "sl"}
        assert all(e.stat is None for e in r.entries)
    await on(lambda b: b.client.release(dfd[b.index]))


@pytest.mark.parametrize("volume", KIND_PARAMS, indirect=True)
async def test_every_fop(volume: tc.Volume, request: pytest.FixtureRequest) -> None:
    with trio.fail_after(90):
        async with open_bricks(volume) as v:
            # LOOKUP of the root on every brick
            res = await all_ok(v.bricks, lambda b: b.client.lookup_root())
            for r in res:
                assert r.stat.gfid == ROOT_GFID and r.stat.is_dir
            for b in v.bricks:
                assert disk_gfid(b.dir) == ROOT_GFID
            # a test directory on every brick (as distribute would), same gfid everywhere
            dname = uniq(request)
            dgfid = await make_dir(v.bricks, ROOT_GFID, dname)
            for b in v.bricks:
                assert disk_gfid(b.path(dname)) == dgfid
            assert len(v.sets) == {"dist1": 1, "replica3": 1, "distrep": 2}[volume.kind]
            assert [len(s) for s in v.sets] == [volume.replica] * len(v.sets)
            async with trio.open_nursery() as nursery:
                for rs in v.sets:
                    nursery.start_soon(_fop_scenario, rs, dgfid, dname, volume.brick_dirs)


async def test_create_needs_a_gfid(vol_dist1: tc.Volume) -> None:
    with trio.fail_after(30):
        async with open_bricks(vol_dist1) as v:
            c = v.bricks[0].client
            for bad in (NULL_GFID, b"short"):
                with pytest.raises(ValueError):
                    await c.create(ROOT_GFID, "never", os.O_RDWR | os.O_CREAT, stat.S_IFREG | 0o644, bad)
                with pytest.raises(ValueError):
                    await c.mkdir(ROOT_GFID, "never", 0o755, bad)
                with pytest.raises(ValueError):
                    await c.mknod(ROOT_GFID, "never", stat.S_IFIFO | 0o644, 0, bad)
                with pytest.raises(ValueError):
                    await c.symlink(ROOT_GFID, "never", "x", bad)
            assert not v.bricks[0].path("never").exists()
            assert c.is_up  # nothing went out that could have upset the session


# ------------------------------------------------------------------------------------------
# readdirp paging


@pytest.mark.parametrize("volume", ["replica3"], indirect=True)
async def test_readdirp_paging(volume: tc.Volume, request: pytest.FixtureRequest) -> None:
    n = 300
    with trio.fail_after(90):
        async with open_bricks(volume) as v:
            rs = v.sets[0]
            dname = uniq(request)
            dgfid = await make_dir(rs, ROOT_GFID, dname)
            gfids = {}
            limiter = trio.CapacityLimiter(32)

            async def mk(i: int) -> None:
                async with limiter:
                    name = f"entry-{i:04d}-{'x' * (i % 40)}"
                    gfids[name] = await make_file(rs, dgfid, name)

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(mk, i)
            for b in rs:
                assert len(os.listdir(b.path(dname))) == n

            for b in rs:
                fd = (await b.client.opendir(dgfid)).fd
                seen: list[str] = []
                pages = 0
                offset = 0
                while True:
                    r = await b.client.readdirp(fd, offset, 4096)
                    if not r.entries:
                        break
                    pages += 1
                    assert pages < 1000
                    seen += [e.name for e in r.entries]
                    for e in r.entries:
                        if e.name in gfids:
                            assert e.stat.gfid == gfids[e.name]
                    offset = r.entries[-1].off
                await b.client.release(fd)
                names = [s for s in seen if s not in (".", "..")]
                assert len(names) == n and set(names) == set(gfids), "some entry missing or repeated"
                assert pages >= 10, f"4 KiB pages should split {n} entries, got {pages} pages"
                # the same through the client's own pager
                fd = (await b.client.opendir(dgfid)).fd
                all_entries = await b.client.readdirp_all(fd, page=4096)
                await b.client.release(fd)
                assert sorted(e.name for e in all_entries if e.name not in (".", "..")) == sorted(gfids)


# ------------------------------------------------------------------------------------------
# locks between two sessions (two connections to the same brick)


async def test_locks_between_sessions(vol_replica3: tc.Volume, request: pytest.FixtureRequest) -> None:
    with trio.fail_after(60):
        async with open_bricks(vol_replica3) as a, open_bricks(vol_replica3) as bsess:
            rs = a.sets[0]
            dname = uniq(request)
            dgfid = await make_dir(rs, ROOT_GFID, dname)
            g = await make_file(rs, dgfid, "locked", b"0123456789")
            A, B = a.bricks[0].client, bsess.bricks[0].client
            assert A.brick_path == B.brick_path
            dom = f"{vol_replica3.name}-replicate-0"
            whole = Flock(F.WRLCK, 0, 0, 0)
            unlock = Flock(F.UNLCK, 0, 0, 0)
            # bricks >= 7.0 refuse lock fops from a null lk_owner (EINVAL): each locker names itself,
            # as AFR does with its frame's lk_owner
            own_a = now_cred(lk_owner=b"owner-a!")
            own_b = now_cred(lk_owner=b"owner-b!")

            # INODELK: conflicting non-blocking lock from the other session -> EAGAIN
            await A.inodelk(g, dom, F.SETLK, whole, cred=own_a)
            with pytest.raises(OSError) as ei:
                await B.inodelk(g, dom, F.SETLK, whole, cred=own_b)
            assert ei.value.errno == errno.EAGAIN
            await B.inodelk(g, dom + ":other", F.SETLK, whole, cred=own_b)  # other domain: independent
            await B.inodelk(g, dom + ":other", F.SETLK, unlock, cred=own_b)
            # same connection, different lk_owner: a different owner conflicts too
            with pytest.raises(OSError) as ei:
                await A.inodelk(g, dom, F.SETLK, whole, cred=now_cred(lk_owner=b"other-owner"))
            assert ei.value.errno == errno.EAGAIN
            # the other session cannot unlock what A holds
            with pytest.raises(OSError) as ei:
                await B.inodelk(g, dom, F.SETLK, unlock, cred=own_a)
            assert ei.value.errno == errno.EINVAL
            await A.inodelk(g, dom, F.SETLK, unlock, cred=own_a)
            await B.inodelk(g, dom, F.SETLK, whole, cred=own_b)
            with pytest.raises(OSError) as ei:
                await A.inodelk(g, dom, F.SETLK, whole, cred=own_a)
            assert ei.value.errno == errno.EAGAIN
            await B.inodelk(g, dom, F.SETLK, unlock, cred=own_b)

            # FINODELK with ranges
            fa = (await A.open(g, os.O_RDWR)).fd
            fb = (await B.open(g, os.O_RDWR)).fd
            await A.finodelk(fa, dom, F.SETLK, Flock(F.WRLCK, 0, 0, 100), cred=own_a)
            await B.finodelk(fb, dom, F.SETLK, Flock(F.WRLCK, 0, 100, 100), cred=own_b)  # no overlap
            with pytest.raises(OSError) as ei:
                await B.finodelk(fb, dom, F.SETLK, Flock(F.WRLCK, 0, 50, 10), cred=own_b)
            assert ei.value.errno == errno.EAGAIN
            await A.finodelk(fa, dom, F.SETLK, Flock(F.UNLCK, 0, 0, 100), cred=own_a)
            await B.finodelk(fb, dom, F.SETLK, Flock(F.WRLCK, 0, 50, 10), cred=own_b)
            await B.finodelk(fb, dom, F.SETLK, Flock(F.UNLCK, 0, 50, 10), cred=own_b)
            await B.finodelk(fb, dom, F.SETLK, Flock(F.UNLCK, 0, 100, 100), cred=own_b)
            # read locks share; a write lock then conflicts
            await A.finodelk(fa, dom, F.SETLK, Flock(F.RDLCK, 0, 0, 0), cred=own_a)
            await B.finodelk(fb, dom, F.SETLK, Flock(F.RDLCK, 0, 0, 0), cred=own_b)
            with pytest.raises(OSError) as ei:
                await B.finodelk(fb, dom, F.SETLK, Flock(F.WRLCK, 0, 0, 0), cred=now_cred(lk_owner=b"w"))
            assert ei.value.errno == errno.EAGAIN
            await A.finodelk(fa, dom, F.SETLK, unlock, cred=own_a)
            await B.finodelk(fb, dom, F.SETLK, unlock, cred=own_b)

            # ENTRYLK / FENTRYLK LOCK_NB on (parent, name, domain)
            await A.entrylk(dgfid, dom, "victim", F.ENTRYLK_LOCK_NB, F.ENTRYLK_WRLCK, cred=own_a)
            with pytest.raises(OSError) as ei:
                await B.entrylk(dgfid, dom, "victim", F.ENTRYLK_LOCK_NB, F.ENTRYLK_WRLCK, cred=own_b)
            assert ei.value.errno == errno.EAGAIN
            await B.entrylk(dgfid, dom, "bystander", F.ENTRYLK_LOCK_NB, F.ENTRYLK_WRLCK, cred=own_b)  # other name
            await B.entrylk(dgfid, dom, "bystander", F.ENTRYLK_UNLOCK, F.ENTRYLK_WRLCK, cred=own_b)
            await A.entrylk(dgfid, dom, "victim", F.ENTRYLK_UNLOCK, F.ENTRYLK_WRLCK, cred=own_a)
            await B.entrylk(dgfid, dom, "victim", F.ENTRYLK_LOCK_NB, F.ENTRYLK_WRLCK, cred=own_b)
            await B.entrylk(dgfid, dom, "victim", F.ENTRYLK_UNLOCK, F.ENTRYLK_WRLCK, cred=own_b)
            dfa = (await A.opendir(dgfid)).fd
            dfb = (await B.opendir(dgfid)).fd
            await B.fentrylk(dfb, dom, "victim", F.ENTRYLK_LOCK_NB, F.ENTRYLK_WRLCK, cred=own_b)
            with pytest.raises(OSError) as ei:
                await A.fentrylk(dfa, dom, "victim", F.ENTRYLK_LOCK_NB, F.ENTRYLK_WRLCK, cred=own_a)
            assert ei.value.errno == errno.EAGAIN
            # a lock on the whole directory (no name) conflicts with a name lock
            with pytest.raises(OSError) as ei:
                await A.entrylk(dgfid, dom, None, F.ENTRYLK_LOCK_NB, F.ENTRYLK_WRLCK, cred=own_a)
            assert ei.value.errno == errno.EAGAIN
            await B.fentrylk(dfb, dom, "victim", F.ENTRYLK_UNLOCK, F.ENTRYLK_WRLCK, cred=own_b)
            await A.fentrylk(dfa, dom, "victim", F.ENTRYLK_LOCK_NB, F.ENTRYLK_WRLCK, cred=own_a)
            await A.fentrylk(dfa, dom, "victim", F.ENTRYLK_UNLOCK, F.ENTRYLK_WRLCK, cred=own_a)
            await A.release(dfa)
            await B.release(dfb)

            # LK (POSIX record locks)
            r = await A.lk(fa, F.SETLK, Flock(F.WRLCK, 0, 0, 100, pid=111, owner=b"owner-a!"), cred=own_a)
            assert r.flock.type == F.WRLCK
            with pytest.raises(OSError) as ei:
                await B.lk(fb, F.SETLK, Flock(F.WRLCK, 0, 50, 10, pid=222, owner=b"owner-b!"), cred=own_b)
            assert ei.value.errno == errno.EAGAIN
            r = await B.lk(fb, F.GETLK, Flock(F.WRLCK, 0, 50, 10, pid=222, owner=b"owner-b!"), cred=own_b)
            assert r.flock.type == F.WRLCK and r.flock.start == 0 and r.flock.len == 100, r.flock
            assert r.flock.pid == 111, r.flock
            r = await B.lk(fb, F.GETLK, Flock(F.WRLCK, 0, 200, 10, pid=222, owner=b"owner-b!"), cred=own_b)
            assert r.flock.type == F.UNLCK, r.flock  # a free range
            await B.lk(fb, F.SETLK, Flock(F.RDLCK, 0, 100, 50, pid=222, owner=b"owner-b!"), cred=own_b)
            await A.lk(fa, F.SETLK, Flock(F.UNLCK, 0, 0, 100, pid=111, owner=b"owner-a!"), cred=own_a)
            await B.lk(fb, F.SETLK, Flock(F.WRLCK, 0, 50, 10, pid=222, owner=b"owner-b!"), cred=own_b)
            r = await A.lk(fa, F.GETLK, Flock(F.WRLCK, 0, 0, 0, pid=111, owner=b"owner-a!"), cred=own_a)
            assert r.flock.type in (F.WRLCK, F.RDLCK) and r.flock.pid == 222, r.flock
            await A.release(fa)
            await B.release(fb)  # closing the fd drops B's posix locks
            fa = (await A.open(g, os.O_RDWR)).fd
            await A.lk(fa, F.SETLK, Flock(F.WRLCK, 0, 0, 0, pid=111, owner=b"owner-a!"), cred=own_a)
            await A.release(fa)


# ------------------------------------------------------------------------------------------
# xattrop: AFR-style changelog arithmetic


def _cl(data: int, meta: int, entry: int) -> bytes:
    return struct.pack(">3i", data, meta, entry)


@pytest.mark.parametrize("volume", ["replica3"], indirect=True)
async def test_xattrop_add_array(volume: tc.Volume, request: pytest.FixtureRequest) -> None:
    with trio.fail_after(30):
        async with open_bricks(volume) as v:
            rs = v.sets[0]
            dname = uniq(request)
            dgfid = await make_dir(rs, ROOT_GFID, dname)
            g = await make_file(rs, dgfid, "cl", b"abc")
            peer = f"trusted.afr.{volume.name}-client-1"
            res = await all_ok(rs, lambda b: b.client.xattrop(g, F.XATTROP_ADD_ARRAY,
                                                              {"trusted.afr.dirty": _cl(1, 0, 0)}))
            assert all(r.dict["trusted.afr.dirty"] == _cl(1, 0, 0) for r in res), [r.dict for r in res]
            await all_ok(rs, lambda b: b.client.xattrop(g, F.XATTROP_ADD_ARRAY,
                                                        {"trusted.afr.dirty": _cl(1, 0, 0), peer: _cl(0, 1, 0)}))
            for b in rs:
                assert os.getxattr(b.path(dname, "cl"), "trusted.afr.dirty") == _cl(2, 0, 0)
                assert os.getxattr(b.path(dname, "cl"), peer) == _cl(0, 1, 0)
            res = await all_ok(rs, lambda b: b.client.open(g, os.O_RDWR))
            fds = {b.index: r.fd for b, r in zip(rs, res)}
            res = await all_ok(rs, lambda b: b.client.fxattrop(fds[b.index], F.XATTROP_ADD_ARRAY,
                                                               {"trusted.afr.dirty": _cl(-2, 3, 0),
                                                                peer: _cl(0, 0, 0)}))
            for r in res:  # zero deltas read the current value back, as AFR's pre-op does
                assert r.dict["trusted.afr.dirty"] == _cl(0, 3, 0) and r.dict[peer] == _cl(0, 1, 0), r.dict
            await all_ok(rs, lambda b: b.client.fxattrop(fds[b.index], F.XATTROP_ADD_ARRAY,
                                                         {"trusted.afr.dirty": _cl(0, -3, 0), peer: _cl(0, -1, 0)}))
            for b in rs:
                assert os.getxattr(b.path(dname, "cl"), "trusted.afr.dirty") == _cl(0, 0, 0)
                assert os.getxattr(b.path(dname, "cl"), peer) == _cl(0, 0, 0)
            await all_ok(rs, lambda b: b.client.release(fds[b.index]))


# ------------------------------------------------------------------------------------------
# large I/O, concurrency, credentials


async def _roundtrip(rs: list[Brick], dgfid: bytes, dname: str, size: int) -> None:
    """CREATE, one WRITE of ``size`` bytes and one READ of them, on every brick of the set."""
    payload = os.urandom(size)
    name = f"big-{size}"
    g = new_gfid()
    cred = now_cred(Proc.CREATE)
    res = await all_ok(rs, lambda b: b.client.create(dgfid, name, os.O_RDWR | os.O_CREAT,
                                                     stat.S_IFREG | 0o644, g, cred=cred))
    fds = {b.index: r.fd for b, r in zip(rs, res)}
    wcred = now_cred(Proc.WRITE)
    res = await all_ok(rs, lambda b: b.client.write(fds[b.index], 0, payload, cred=wcred))
    assert all(r.ret == size and r.post.size == size for r in res)
    res = await all_ok(rs, lambda b: b.client.read(fds[b.index], 0, size))
    for r in res:
        assert len(r.data) == size and r.data == payload
    for b in rs:
        assert b.path(dname, name).read_bytes() == payload
    await all_ok(rs, lambda b: b.client.release(fds[b.index]))


@pytest.mark.parametrize("volume", ["dist1", "replica3"], indirect=True)
async def test_large_write_read(volume: tc.Volume, request: pytest.FixtureRequest) -> None:
    with trio.fail_after(60):
        async with open_bricks(volume) as v:
            rs = v.sets[0]
            dname = uniq(request)
            dgfid = await make_dir(rs, ROOT_GFID, dname)
            for size in (1 << 20, 16 << 20):
                await _roundtrip(rs, dgfid, dname, size)


async def test_200_concurrent_stats_one_connection(vol_dist1: tc.Volume, request: pytest.FixtureRequest) -> None:
    with trio.fail_after(30):
        async with open_bricks(vol_dist1) as v:
            b = v.bricks[0]
            dname = uniq(request)
            dgfid = await make_dir([b], ROOT_GFID, dname)
            gfids = [await make_file([b], dgfid, f"s{i}", b"x" * i) for i in range(10)]
            conn = b.client.conn
            results: dict[int, Any] = {}
            peak = 0

            async def one(i: int) -> None:
                nonlocal peak
                r = await b.client.stat(gfids[i % 10])
                peak = max(peak, conn.outstanding)
                results[i] = r

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, i)
            assert len(results) == 200
            for i, r in results.items():  # every answer went to the call that asked
                assert r.stat.gfid == gfids[i % 10] and r.stat.size == i % 10
            assert b.client.conn is conn and b.client.is_up  # one connection throughout
            assert peak > 1, "calls were not multiplexed"


@pytest.mark.parametrize("volume", ["dist1", "replica3"], indirect=True)
async def test_non_root_credential_is_refused(volume: tc.Volume, request: pytest.FixtureRequest) -> None:
    with trio.fail_after(30):
        async with open_bricks(volume) as v:
            rs = v.sets[0]
            dname = uniq(request)
            dgfid = await make_dir(rs, ROOT_GFID, dname, 0o755)
            for b in rs:
                st = os.stat(b.path(dname))
                assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o755
            user = now_cred(Proc.CREATE, uid=1000, gid=1000)
            await all_fail(rs, lambda b: b.client.create(dgfid, "nope", os.O_RDWR | os.O_CREAT,
                                                         stat.S_IFREG | 0o644, new_gfid(), cred=user), errno.EACCES)
            await all_fail(rs, lambda b: b.client.mkdir(dgfid, "nope", 0o755, new_gfid(),
                                                        cred=now_cred(Proc.MKDIR, uid=1000, gid=1000)), errno.EACCES)
            for b in rs:
                assert not b.path(dname, "nope").exists()
            # with the directory opened up, the same user may create, and owns what it made
            await all_ok(rs, lambda b: b.client.setattr(dgfid, Iatt(mode=0o777), SET_MODE))
            g = new_gfid()
            res = await all_ok(rs, lambda b: b.client.create(dgfid, "mine", os.O_RDWR | os.O_CREAT,
                                                             stat.S_IFREG | 0o600, g, cred=user))
            for b, r in zip(rs, res):
                assert r.stat.uid == 1000 and r.stat.gid == 1000
                st = os.stat(b.path(dname, "mine"))
                assert (st.st_uid, st.st_gid) == (1000, 1000)
                await b.client.release(r.fd)
            # and root's 0600 file stays closed to that user
            rg = await make_file(rs, dgfid, "roots", b"secret", mode=0o600)
            await all_fail(rs, lambda b: b.client.open(rg, os.O_RDONLY, cred=now_cred(uid=1000, gid=1000)),
                           errno.EACCES)
            await all_fail(rs, lambda b: b.client.access(rg, os.R_OK, cred=now_cred(uid=1000, gid=1000)),
                           errno.EACCES)
            await all_ok(rs, lambda b: b.client.access(g, os.R_OK | os.W_OK, cred=now_cred(uid=1000, gid=1000)))


async def test_lock_fops_without_explicit_credential(vol_dist1: tc.Volume, request: pytest.FixtureRequest) -> None:
    """The typed lock fops must work with their default credential.

    Bricks since 7.0 refuse INODELK/ENTRYLK/LK from a null lk_owner with EINVAL
    (``pl_is_lk_owner_valid`` in xlators/features/locks/src/common.c); ``now_cred()`` defaults
    to the 4-byte null owner, so a lock call without ``cred=`` can never succeed.
    """
    with trio.fail_after(30):
        async with open_bricks(vol_dist1) as v:
            b = v.bricks[0]
            dname = uniq(request)
            dgfid = await make_dir([b], ROOT_GFID, dname)
            g = await make_file([b], dgfid, "f", b"x")
            await b.client.inodelk(g, "gfuse-test", F.SETLK, Flock(F.WRLCK, 0, 0, 0))
            await b.client.inodelk(g, "gfuse-test", F.SETLK, Flock(F.UNLCK, 0, 0, 0))
            await b.client.entrylk(dgfid, "gfuse-test", "f", F.ENTRYLK_LOCK_NB, F.ENTRYLK_WRLCK)
            await b.client.entrylk(dgfid, "gfuse-test", "f", F.ENTRYLK_UNLOCK, F.ENTRYLK_WRLCK)
            fd = (await b.client.open(g, os.O_RDWR)).fd
            await b.client.lk(fd, F.SETLK, Flock(F.WRLCK, 0, 0, 0))
            await b.client.release(fd)
