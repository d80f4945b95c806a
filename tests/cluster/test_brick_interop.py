"""Interop with the native client: what gfuse writes to bricks, ``mount -t glusterfs`` reads, and back.

gfuse's protocol client acts as a replicating client would (same gfid and same credential with
its ctime on every brick of the replica set); the native FUSE client then has to see exactly the
files, modes, symlink targets, user xattrs, times and gfids we made. In the other direction, files
written through a native mount are looked up by name and read through gfuse.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Iterator

import pytest
import trio
from test_brick_fops import all_ok, disk_gfid, make_dir, open_bricks, uniq

from testkit import cluster as tc
from gfuse.fops import Proc
from gfuse.iatt import ROOT_GFID
from gfuse.cred import new_gfid, now_cred

pytestmark = [pytest.mark.cluster, pytest.mark.native]


@pytest.fixture(scope="module")
def vol_arbiter(glusterd: tc.GlusterdProcess) -> Iterator[tc.Volume]:
    """replica 3 arbiter 1, for this module's two tests (the ``volume`` fixture finds it by name)."""
    vol = tc.create_volume("arbiter")
    try:
        yield vol
    finally:
        vol.delete()


def _data_bricks(volume: tc.Volume, rs: list) -> list:
    """The bricks that hold file data: on an arbiter volume not the last (its writes keep no data, its
    reads fail with ENOSYS: gluster's features/arbiter on the brick)."""
    return rs[:-1] if volume.kind == "arbiter" else rs


def _ns(sec: int, nsec: int) -> int:
    return sec * 1_000_000_000 + nsec


def native_gfid(path: os.PathLike | str) -> bytes:
    """The gfid the native client knows for ``path`` (its virtual xattr)."""
    text = os.getxattr(path, "glusterfs.gfid.string", follow_symlinks=False).rstrip(b"\0").decode()
    return uuid.UUID(text).bytes


@pytest.mark.parametrize("volume", ["dist1", "replica3", "arbiter"], indirect=True)
async def test_gfuse_writes_native_reads(volume: tc.Volume, native_mount, request: pytest.FixtureRequest) -> None:
    top = uniq(request)
    payload = os.urandom(200_000) + b"end"
    with trio.fail_after(60):
        async with open_bricks(volume) as v:
            rs = v.bricks  # dist1: the brick; replica3: the whole replica set
            assert len(v.sets) == 1
            tgfid = await make_dir(rs, ROOT_GFID, top, 0o755)

            # a regular file: CREATE, WRITE, SETXATTR, with one credential per fop for all replicas
            fgfid = new_gfid()
            ccred = now_cred(Proc.CREATE)
            res = await all_ok(rs, lambda b: b.client.create(tgfid, "data.bin", os.O_RDWR | os.O_CREAT | os.O_EXCL,
                                                             stat.S_IFREG | 0o640, fgfid, cred=ccred))
            fds = {b.index: r.fd for b, r in zip(rs, res)}
            wcred = now_cred(Proc.WRITE)
            await all_ok(rs, lambda b: b.client.write(fds[b.index], 0, payload, cred=wcred))
            xcred = now_cred(Proc.FSETXATTR)
            await all_ok(rs, lambda b: b.client.fsetxattr(fds[b.index], {"user.origin": b"gfuse",
                                                                         "user.bin": b"\x00\x01\xff"}, cred=xcred))
            await all_ok(rs, lambda b: b.client.flush(fds[b.index]))
            await all_ok(rs, lambda b: b.client.release(fds[b.index]))

            # a directory with a file in it, and an xattr on the directory
            dgfid = await make_dir(rs, tgfid, "subdir", 0o710)
            await all_ok(rs, lambda b: b.client.setxattr(dgfid, {"user.kind": b"dir"}, cred=now_cred(Proc.SETXATTR)))
            ngfid = new_gfid()
            ncred = now_cred(Proc.CREATE)
            res = await all_ok(rs, lambda b: b.client.create(dgfid, "nested.txt", os.O_WRONLY | os.O_CREAT,
                                                             stat.S_IFREG | 0o600, ngfid, cred=ncred))
            nfds = {b.index: r.fd for b, r in zip(rs, res)}
            nwcred = now_cred(Proc.WRITE)
            await all_ok(rs, lambda b: b.client.write(nfds[b.index], 0, b"nested\n", cred=nwcred))
            await all_ok(rs, lambda b: b.client.release(nfds[b.index]))

            # a symlink
            sgfid = new_gfid()
            scred = now_cred(Proc.SYMLINK)
            await all_ok(rs, lambda b: b.client.symlink(tgfid, "link", "data.bin", sgfid, cred=scred))

        for b in rs:  # what the bricks hold
            assert disk_gfid(b.path(top, "data.bin")) == fgfid
            want = payload if b in _data_bricks(volume, rs) else b""  # the arbiter: the name, no data
            assert b.path(top, "data.bin").read_bytes() == want

        m = await trio.to_thread.run_sync(native_mount, volume)
        base = m.path / top
        assert sorted(os.listdir(base)) == ["data.bin", "link", "subdir"]

        st = os.stat(base / "data.bin")
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and st.st_size == len(payload)
        assert (base / "data.bin").read_bytes() == payload
        assert os.getxattr(base / "data.bin", "user.origin") == b"gfuse"
        assert os.getxattr(base / "data.bin", "user.bin") == b"\x00\x01\xff"
        assert native_gfid(base / "data.bin") == fgfid
        # the times come from our credentials, identical on every replica
        assert st.st_mtime_ns == _ns(wcred.ctime_sec, wcred.ctime_nsec), (st.st_mtime_ns, wcred)
        assert st.st_ctime_ns == _ns(xcred.ctime_sec, xcred.ctime_nsec), (st.st_ctime_ns, xcred)

        st = os.stat(base / "subdir")
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o710
        assert os.getxattr(base / "subdir", "user.kind") == b"dir"
        assert native_gfid(base / "subdir") == dgfid
        assert os.listdir(base / "subdir") == ["nested.txt"]
        assert (base / "subdir" / "nested.txt").read_bytes() == b"nested\n"
        assert stat.S_IMODE(os.stat(base / "subdir" / "nested.txt").st_mode) == 0o600
        assert native_gfid(base / "subdir" / "nested.txt") == ngfid

        assert os.readlink(base / "link") == "data.bin"
        lst = os.lstat(base / "link")
        assert stat.S_ISLNK(lst.st_mode)
        assert lst.st_mtime_ns == _ns(scred.ctime_sec, scred.ctime_nsec)
        assert native_gfid(base / "link") == sgfid
        assert (base / "link").read_bytes() == payload  # followed by the native client

        assert native_gfid(base) == tgfid

        if volume.replica > 1:
            # nothing for self-heal to do: the replicas agree
            out = await trio.to_thread.run_sync(lambda: tc.gluster("volume", "heal", volume.name, "info"))
            counts = [line for line in out.splitlines() if line.startswith("Number of entries:")]
            assert counts and all(line.split(":")[1].strip() == "0" for line in counts), out


@pytest.mark.parametrize("volume", ["dist1", "replica3", "arbiter"], indirect=True)
async def test_native_writes_gfuse_reads(volume: tc.Volume, native_mount, request: pytest.FixtureRequest) -> None:
    top = uniq(request)
    payload = os.urandom(300_000)
    m = await trio.to_thread.run_sync(native_mount, volume)
    base = m.path / top

    def write_native() -> None:
        os.mkdir(base, 0o755)
        with open(base / "from-native.bin", "wb") as f:
            f.write(payload)
        os.chmod(base / "from-native.bin", 0o604)
        os.setxattr(base / "from-native.bin", "user.writer", b"native")
        os.symlink("from-native.bin", base / "nlink")
        os.mkdir(base / "nsub", 0o700)

    await trio.to_thread.run_sync(write_native)
    mgfid = {n: native_gfid(base / n) for n in ("from-native.bin", "nlink", "nsub")}

    with trio.fail_after(60):
        async with open_bricks(volume) as v:
            rs = v.bricks
            res = await all_ok(rs, lambda b: b.client.lookup(ROOT_GFID, top))
            tgfid = res[0].stat.gfid
            assert all(r.stat.gfid == tgfid and r.stat.is_dir for r in res)
            assert tgfid == native_gfid(base)

            res = await all_ok(rs, lambda b: b.client.lookup(tgfid, "from-native.bin"))
            ds = _data_bricks(volume, rs)
            for b, r in zip(rs, res):
                assert r.stat.gfid == mgfid["from-native.bin"] == disk_gfid(b.path(top, "from-native.bin"))
                assert r.stat.size == (len(payload) if b in ds else 0) and stat.S_IMODE(r.stat.mode) == 0o604
            fgfid = res[0].stat.gfid
            res = await all_ok(rs, lambda b: b.client.open(fgfid, os.O_RDONLY))
            fds = {b.index: r.fd for b, r in zip(rs, res)}
            res = await all_ok(ds, lambda b: b.client.read(fds[b.index], 0, len(payload) + 4096))
            for r in res:
                assert r.data == payload
            if ds != rs:
                with pytest.raises(OSError) as exc:
                    await rs[-1].client.read(fds[rs[-1].index], 0, 4096)
                assert exc.value.errno == errno.ENOSYS
            # in pieces too
            got = bytearray()
            off = 0
            while True:
                r = await rs[0].client.read(fds[rs[0].index], off, 65536)
                if not r.data:
                    break
                got += r.data
                off += len(r.data)
            assert bytes(got) == payload
            await all_ok(rs, lambda b: b.client.release(fds[b.index]))
            res = await all_ok(rs, lambda b: b.client.getxattr(fgfid, "user.writer"))
            assert all(r.dict["user.writer"] == b"native" for r in res)

            res = await all_ok(rs, lambda b: b.client.lookup(tgfid, "nlink"))
            for b, r in zip(rs, res):
                assert r.stat.is_lnk and r.stat.gfid == mgfid["nlink"] == disk_gfid(b.path(top, "nlink"))
            res = await all_ok(rs, lambda b: b.client.readlink(mgfid["nlink"]))
            assert all(r.path == "from-native.bin" for r in res)

            res = await all_ok(rs, lambda b: b.client.lookup(tgfid, "nsub"))
            for b, r in zip(rs, res):
                assert r.stat.is_dir and stat.S_IMODE(r.stat.mode) == 0o700
                assert r.stat.gfid == mgfid["nsub"] == disk_gfid(b.path(top, "nsub"))

            res = await all_ok(rs, lambda b: b.client.opendir(tgfid))
            dfds = {b.index: r.fd for b, r in zip(rs, res)}
            res = await all_ok(rs, lambda b: b.client.readdirp_all(dfds[b.index]))
            for entries in res:
                by_name = {e.name: e for e in entries if e.name not in (".", "..")}
                assert set(by_name) == {"from-native.bin", "nlink", "nsub"}
                for n, e in by_name.items():
                    assert e.stat.gfid == mgfid[n]
            await all_ok(rs, lambda b: b.client.release(dfds[b.index]))
