"""POSIX behaviour of a gfuse mount, through the kernel, on real replica-3 and 2 x 3 volumes.

Every test works in its own directory under one gfuse mount per volume kind (module-scoped:
mounting costs about a second) and removes it afterwards. The mount uses ``allow_other`` so
that the unprivileged-user tests (``setpriv --reuid=1000``) can reach it at all.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import cluster as tc
from gfuse.dhthash import LAYOUT_XATTR, Range

KINDS = ["replica3", "distrep"]
USER = 1000  # an unprivileged uid/gid for the permission tests
SYS_PYTHON = "/usr/bin/python3"  # readable by USER (the test interpreter may live under /root)


# ------------------------------------------------------------------------------------------
# helpers


class SharedMount:
    """One gfuse mount per volume kind for the whole module; remounted if a test killed it."""

    def __init__(self, vol: tc.Volume, options: list[str]) -> None:
        self.vol = vol
        self.options = options
        self.m: tc.GfuseMount | None = None

    def start(self) -> None:
        self.m = tc.GfuseMount(self.vol, options=self.options)
        self.m.mount()

    @property
    def path(self) -> Path:
        assert self.m is not None
        return self.m.path

    def alive(self) -> bool:
        try:
            os.stat(self.path)
            return tc.is_mounted(self.path)
        except OSError:
            return False

    def ensure_alive(self) -> None:
        if self.m is None or not self.alive():
            if self.m is not None:
                self.m.unmount()
            self.start()

    def stop(self) -> None:
        if self.m is not None:
            self.m.unmount()
            self.m = None


@pytest.fixture(scope="module", params=KINDS)
def shared(request: pytest.FixtureRequest, glusterd: tc.GlusterdProcess) -> Iterator[SharedMount]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    vol = request.getfixturevalue(f"vol_{request.param}")
    sm = SharedMount(vol, ["allow_other"])
    sm.start()
    try:
        yield sm
    finally:
        sm.stop()


@pytest.fixture
def d(shared: SharedMount, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory of this test on the shared gfuse mount, removed afterwards."""
    shared.ensure_alive()
    path = shared.path / f"posix-{request.node.name[:60]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")
    os.mkdir(path)
    os.chmod(path, 0o755)
    yield path
    shared.ensure_alive()
    if path.exists():
        rm_tree(path)


def rm_tree(path: Path) -> None:
    """rmtree that also removes entries a test left read-only or owned by USER."""
    for root, dirs, _files in os.walk(path):
        for n in dirs:
            os.chmod(os.path.join(root, n), 0o755)
    shutil.rmtree(path)


def errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def raises_errno(expected: int | tuple[int, ...], fn, *args, **kwargs) -> None:
    exp = expected if isinstance(expected, tuple) else (expected,)
    try:
        fn(*args, **kwargs)
    except OSError as e:
        assert e.errno in exp, f"{fn.__name__}{args}: {errname(e)} ({e}), expected {[errno.errorcode[x] for x in exp]}"
        return
    raise AssertionError(f"{fn.__name__}{args} succeeded, expected {[errno.errorcode[x] for x in exp]}")


_CHILD = r"""
import errno, json, os, sys
res = []
for op, *a in json.loads(sys.argv[1]):
    try:
        if op == "create":
            os.close(os.open(a[0], os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)); out = "ok"
        elif op == "write":
            fd = os.open(a[0], os.O_WRONLY); os.write(fd, b"u"); os.close(fd); out = "ok"
        elif op == "read":
            fd = os.open(a[0], os.O_RDONLY); out = os.read(fd, 100).decode(); os.close(fd)
        elif op == "mkdir":
            os.mkdir(a[0]); out = "ok"
        elif op == "unlink":
            os.unlink(a[0]); out = "ok"
        elif op == "rmdir":
            os.rmdir(a[0]); out = "ok"
        elif op == "rename":
            os.rename(a[0], a[1]); out = "ok"
        elif op == "chmod":
            os.chmod(a[0], a[1]); out = "ok"
        elif op == "chown":
            os.chown(a[0], a[1], a[2]); out = "ok"
        elif op == "utime":
            os.utime(a[0], ns=(a[1], a[1]) if a[1] is not None else None); out = "ok"
        elif op == "truncate":
            os.truncate(a[0], a[1]); out = "ok"
        elif op == "access":
            out = os.access(a[0], a[1])
        elif op == "stat":
            s = os.stat(a[0]); out = [s.st_uid, s.st_gid, stat_mode := s.st_mode & 0o7777]
        elif op == "listdir":
            out = sorted(os.listdir(a[0]))
        elif op == "setxattr":
            os.setxattr(a[0], a[1], a[2].encode()); out = "ok"
        else:
            out = "bad op " + op
    except OSError as e:
        out = errno.errorcode.get(e.errno, str(e.errno))
    res.append(out)
print(json.dumps(res))
"""


def as_user(ops: list[list], uid: int = USER) -> list:
    """Run filesystem ops as ``uid`` (no supplementary groups); each gives "ok", a value or an errno name."""
    py = SYS_PYTHON if os.path.exists(SYS_PYTHON) else shutil.which("python3")
    p = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", py, "-c", _CHILD,
         json.dumps([[o[0], *[str(x) if isinstance(x, Path) else x for x in o[1:]]] for o in ops])],
        capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def brick_copies(vol: tc.Volume, rel: Path) -> list[Path]:
    """Brick paths holding a non-linkto copy of ``rel`` (relative to the mount)."""
    out = []
    for b in vol.brick_dirs:
        p = b / rel
        try:
            s = os.lstat(p)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(s.st_mode) and (s.st_mode & 0o7777) == stat.S_ISVTX and s.st_size == 0:
            try:
                os.getxattr(p, "trusted.glusterfs.dht.linkto")
                continue
            except OSError:
                pass
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------
# files: data


def test_create_read_write_append_overwrite(d: Path) -> None:
    f = d / "f.txt"
    fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    assert os.write(fd, b"hello ") == 6
    os.close(fd)
    raises_errno(errno.EEXIST, os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    with open(f, "ab") as fh:
        fh.write(b"world")
    assert f.read_bytes() == b"hello world"
    with open(f, "r+b") as fh:  # overwrite in the middle
        fh.seek(6)
        fh.write(b"WORLD")
        fh.seek(0)
        assert fh.read() == b"hello WORLD"
    with open(f, "r+b") as fh:  # write past the end leaves a hole of zeros
        fh.seek(20)
        fh.write(b"!")
    assert f.read_bytes() == b"hello WORLD" + b"\0" * 9 + b"!"
    os.truncate(f, 0)  # (open with O_TRUNC: test_open_with_o_trunc)
    f.write_bytes(b"new")
    assert f.read_bytes() == b"new"
    assert os.stat(f).st_size == 3
    # O_APPEND from two fds: every write lands at the end
    a1 = os.open(f, os.O_WRONLY | os.O_APPEND)
    a2 = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.write(a1, b"-1")
    os.write(a2, b"-2")
    os.close(a1)
    os.close(a2)
    assert f.read_bytes() == b"new-1-2"
    # pread/pwrite at offsets
    fd = os.open(f, os.O_RDWR)
    os.pwrite(fd, b"XY", 1)
    assert os.pread(fd, 4, 0) == b"nXY-"
    assert os.pread(fd, 100, 7) == b""
    os.close(fd)
    raises_errno(errno.ENOENT, os.open, d / "missing", os.O_RDONLY)
    raises_errno(errno.EISDIR, os.open, d, os.O_WRONLY)
    raises_errno(errno.ENOTDIR, os.stat, f / "x")


def test_open_with_o_trunc(d: Path) -> None:
    f = d / "t"
    f.write_bytes(b"0123456789")
    f.write_bytes(b"new")  # open(O_WRONLY | O_CREAT | O_TRUNC)
    assert os.stat(f).st_size == 3
    assert f.read_bytes() == b"new"
    fd = os.open(f, os.O_RDWR | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        assert os.read(fd, 10) == b""
    finally:
        os.close(fd)


def test_truncate_shrink_and_grow(d: Path) -> None:
    f = d / "t"
    f.write_bytes(b"0123456789")
    os.truncate(f, 4)
    assert os.stat(f).st_size == 4 and f.read_bytes() == b"0123"
    os.truncate(f, 4096 * 3 + 5)
    data = f.read_bytes()
    assert len(data) == 4096 * 3 + 5 and data[:4] == b"0123" and data[4:] == b"\0" * (len(data) - 4)
    with open(f, "r+b") as fh:  # ftruncate on an open fd
        fh.truncate(2)
        fh.seek(0)
        assert fh.read() == b"01"
    os.truncate(f, 0)
    assert os.stat(f).st_size == 0 and f.read_bytes() == b""
    raises_errno(errno.EISDIR, os.truncate, d, 0)
    raises_errno(errno.EINVAL, os.truncate, f, -1)


def test_fsync_reaches_every_replica(shared: SharedMount, d: Path) -> None:
    f = d / "synced"
    payload = os.urandom(300_000)
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
        os.fdatasync(fd)
        copies = brick_copies(shared.vol, f.relative_to(shared.path))
        assert len(copies) == 3, copies  # one replica set
        for c in copies:
            assert c.read_bytes() == payload, c
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)  # fsync of a directory
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def test_big_file_sha256(d: Path) -> None:
    """100 MiB written in 1 MiB pieces and read back, byte for byte."""
    f = d / "big.bin"
    chunk = os.urandom(1 << 20)
    want = hashlib.sha256()
    t0 = time.monotonic()
    with open(f, "wb", buffering=0) as fh:
        for i in range(100):
            piece = chunk[i:] + chunk[:i]  # every MiB different
            fh.write(piece)
            want.update(piece)
        os.fsync(fh.fileno())
    t_write = time.monotonic() - t0
    assert os.stat(f).st_size == 100 << 20
    got = hashlib.sha256()
    t0 = time.monotonic()
    with open(f, "rb", buffering=0) as fh:
        while True:
            b = fh.read(1 << 20)
            if not b:
                break
            got.update(b)
    t_read = time.monotonic() - t0
    assert got.hexdigest() == want.hexdigest()
    print(f"100 MiB: write {100 / t_write:.1f} MiB/s, read {100 / t_read:.1f} MiB/s")


def test_concurrent_writers_to_different_files(d: Path) -> None:
    n, size = 8, 2 << 20
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            block = bytes([i]) * 65536
            with open(d / f"w{i}", "wb") as fh:
                for _ in range(size // len(block)):
                    fh.write(block)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "writers hung"
    assert not errors, errors
    for i in range(n):
        data = (d / f"w{i}").read_bytes()
        assert len(data) == size and data == bytes([i]) * size, f"w{i}"


# ------------------------------------------------------------------------------------------
# metadata


def test_chmod_chown_as_root(d: Path) -> None:
    f = d / "m"
    f.write_bytes(b"x")
    for mode in (0o600, 0o4755, 0o2710, 0o1777, 0o000):
        os.chmod(f, mode)
        assert stat.S_IMODE(os.stat(f).st_mode) == mode, oct(mode)
    os.chown(f, 1234, 5678)
    s = os.stat(f)
    assert (s.st_uid, s.st_gid) == (1234, 5678)
    os.chown(f, -1, 42)  # only the group
    s = os.stat(f)
    assert (s.st_uid, s.st_gid) == (1234, 42)
    os.mkdir(d / "sub", 0o700)
    os.chown(d / "sub", USER, USER)
    os.chmod(d / "sub", 0o751)
    s = os.stat(d / "sub")
    assert (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) == (USER, USER, 0o751)
    # root reads a 000 file (CAP_DAC_OVERRIDE)
    assert f.read_bytes() == b"x"


def test_unprivileged_user_gets_posix_errors(d: Path) -> None:
    """Permission checks for uid 1000: what POSIX says, whoever decides first (kernel or brick)."""
    closed = d / "closed"  # root's 0755 directory
    os.mkdir(closed, 0o755)
    secret = d / "secret"
    secret.write_bytes(b"s")
    os.chmod(secret, 0o600)
    public = d / "public"
    public.write_bytes(b"p")
    os.chmod(public, 0o644)
    shared_dir = d / "tmp"  # sticky, world-writable
    os.mkdir(shared_dir)
    os.chmod(shared_dir, 0o1777)
    (shared_dir / "roots").write_bytes(b"r")
    res = as_user([
        ["create", closed / "x"],             # EACCES: no write permission on the dir
        ["mkdir", closed / "y"],              # EACCES
        ["read", secret],                      # EACCES
        ["write", public],                     # EACCES
        ["read", public],                      # "p"
        ["chmod", public, 0o666],              # EPERM: not the owner
        ["chown", public, USER, USER],         # EPERM
        ["utime", public, 10**18],             # EPERM: explicit times need ownership
        ["truncate", public, 0],               # EACCES
        ["unlink", public],                    # EACCES: dir not writable
        ["create", shared_dir / "mine"],       # ok
        ["stat", shared_dir / "mine"],         # [1000, 1000, 0o644 & ~umask]
        ["chmod", shared_dir / "mine", 0o600],  # ok: owner
        ["chown", shared_dir / "mine", 0, 0],  # EPERM: giving away
        ["unlink", shared_dir / "roots"],      # EPERM: sticky dir, not the owner
        ["rename", shared_dir / "roots", shared_dir / "r2"],  # EPERM
        ["access", secret, os.R_OK],           # False
        ["access", public, os.R_OK],           # True
        ["access", public, os.W_OK],           # False
        ["setxattr", public, "user.x", "v"],   # EACCES/EPERM: not writable
        ["unlink", shared_dir / "mine"],       # ok
    ])
    assert res[0] == "EACCES", res
    assert res[1] == "EACCES", res
    assert res[2] == "EACCES", res
    assert res[3] == "EACCES", res
    assert res[4] == "p", res
    assert res[5] == "EPERM", res
    assert res[6] == "EPERM", res
    assert res[7] == "EPERM", res
    assert res[8] == "EACCES", res
    assert res[9] == "EACCES", res
    assert res[10] == "ok", res
    assert res[11][:2] == [USER, USER], res
    assert res[12] == "ok", res
    assert res[13] == "EPERM", res
    assert res[14] == "EPERM", res
    assert res[15] == "EPERM", res
    assert res[16:19] == [False, True, False], res
    assert res[19] in ("EACCES", "EPERM"), res
    assert res[20] == "ok", res
    assert (shared_dir / "roots").read_bytes() == b"r"
    assert not (closed / "x").exists() and not (closed / "y").exists()
    assert public.read_bytes() == b"p" and stat.S_IMODE(os.stat(public).st_mode) == 0o644


@pytest.mark.parametrize("volume", ["replica3"], indirect=True)
def test_brick_enforces_permissions_behind_stale_kernel_cache(volume: tc.Volume, gfuse_mount, native_mount,
                                                              request: pytest.FixtureRequest) -> None:
    """The kernel checks permissions on cached attributes; the brick must check the caller's real
    credential too. Permissions are tightened through a native mount while gfuse's kernel cache
    (attribute-timeout=60) still shows the old ones: the brick has to say no."""
    g = gfuse_mount(volume, options=["allow_other", "attribute-timeout=60", "entry-timeout=60"])
    n = native_mount(volume)
    name = f"brickperm-{uuid.uuid4().hex[:8]}"
    gd = g.path / name
    try:
        os.mkdir(gd)
        os.chmod(gd, 0o777)
        (gd / "f").write_bytes(b"data")
        os.chmod(gd / "f", 0o666)
        os.mkdir(gd / "sub")
        os.chmod(gd / "sub", 0o777)
        # warm the kernel's attribute cache as the user, then tighten behind gfuse's back
        assert as_user([["stat", gd / "f"], ["stat", gd / "sub"], ["stat", gd]]) == [
            [0, 0, 0o666], [0, 0, 0o777], [0, 0, 0o777]]
        os.chmod(n.path / name / "f", 0o600)
        os.chmod(n.path / name / "sub", 0o755)
        res = as_user([["stat", gd / "f"], ["write", gd / "f"], ["read", gd / "f"],
                       ["create", gd / "sub" / "new"]])
        assert res[0] == [0, 0, 0o666], f"kernel cache not stale any more, test is void: {res}"
        assert res[1:] == ["EACCES", "EACCES", "EACCES"], res
        assert (n.path / name / "f").read_bytes() == b"data"
        assert not (n.path / name / "sub" / "new").exists()
    finally:
        if (n.path / name).exists():
            rm_tree(n.path / name)


def test_utimes(d: Path) -> None:
    f = d / "u"
    f.write_bytes(b"x")
    at, mt = 1_000_000_000_123_456_789, 1_500_000_000_987_654_321
    os.utime(f, ns=(at, mt))
    s = os.stat(f)
    assert (s.st_atime_ns, s.st_mtime_ns) == (at, mt)
    before = time.time_ns()
    os.utime(f)  # utimensat(UTIME_NOW)
    s = os.stat(f)
    assert s.st_mtime_ns >= before - 2_000_000_000 and s.st_atime_ns >= before - 2_000_000_000
    os.utime(d, ns=(at, mt))  # on a directory
    assert os.stat(d).st_mtime_ns == mt
    # only mtime through utimensat with UTIME_OMIT for atime
    libc = ctypes.CDLL(None, use_errno=True)

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    UTIME_OMIT = (1 << 30) - 2
    ts = (Timespec * 2)(Timespec(0, UTIME_OMIT), Timespec(1234567890, 5))
    assert libc.utimensat(-100, os.fsencode(f), ts, 0) == 0, os.strerror(ctypes.get_errno())
    s = os.stat(f)
    assert s.st_mtime_ns == 1234567890_000000005
    assert s.st_atime_ns >= before - 2_000_000_000
    # a write moves mtime forward again
    os.utime(f, ns=(at, at))
    with open(f, "ab") as fh:
        fh.write(b"y")
    assert os.stat(f).st_mtime_ns > at


# ------------------------------------------------------------------------------------------
# directories and names


def test_mkdir_rmdir(d: Path) -> None:
    os.mkdir(d / "a", 0o750)
    assert stat.S_ISDIR(os.stat(d / "a").st_mode) and stat.S_IMODE(os.stat(d / "a").st_mode) == 0o750
    raises_errno(errno.EEXIST, os.mkdir, d / "a")
    os.makedirs(d / "a" / "b" / "c")
    (d / "a" / "b" / "file").write_bytes(b"x")
    raises_errno(errno.ENOTEMPTY, os.rmdir, d / "a")
    raises_errno(errno.ENOTEMPTY, os.rmdir, d / "a" / "b")
    raises_errno(errno.ENOTDIR, os.rmdir, d / "a" / "b" / "file")
    raises_errno(errno.ENOENT, os.rmdir, d / "nope")
    raises_errno(errno.ENOENT, os.mkdir, d / "nope" / "x")
    os.rmdir(d / "a" / "b" / "c")
    os.unlink(d / "a" / "b" / "file")
    os.rmdir(d / "a" / "b")
    assert os.listdir(d / "a") == []
    assert os.stat(d / "a").st_nlink == 2
    os.rmdir(d / "a")
    assert not (d / "a").exists()
    assert os.listdir(d) == []
    # the name can be reused at once, as a file
    (d / "a").write_bytes(b"now a file")
    assert (d / "a").read_bytes() == b"now a file"


def renameat2(old: os.PathLike, new: os.PathLike, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    r = libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), ctypes.c_uint(flags))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


RENAME_NOREPLACE = 1


def test_rename(d: Path) -> None:
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B")
    os.rename(d / "a", d / "b")  # file over file
    assert not (d / "a").exists() and (d / "b").read_bytes() == b"A"
    assert sorted(os.listdir(d)) == ["b"]
    os.makedirs(d / "x" / "inner")
    (d / "x" / "inner" / "f").write_bytes(b"deep")
    os.rename(d / "x", d / "y")  # a directory with content
    assert (d / "y" / "inner" / "f").read_bytes() == b"deep" and not (d / "x").exists()
    os.mkdir(d / "other")
    os.rename(d / "b", d / "other" / "b2")  # across directories
    assert (d / "other" / "b2").read_bytes() == b"A" and not (d / "b").exists()
    os.rename(d / "y" / "inner", d / "other" / "inner")  # a directory across directories
    assert (d / "other" / "inner" / "f").read_bytes() == b"deep"
    assert os.listdir(d / "y") == []
    os.mkdir(d / "empty")
    os.rename(d / "y", d / "empty")  # dir over an empty dir
    assert not (d / "y").exists() and (d / "empty").is_dir()
    raises_errno(errno.ENOTEMPTY, os.rename, d / "empty", d / "other")  # over a non-empty dir
    raises_errno(errno.EISDIR, os.rename, d / "other" / "b2", d / "empty")
    raises_errno(errno.ENOTDIR, os.rename, d / "empty", d / "other" / "b2")
    raises_errno(errno.EINVAL, os.rename, d / "other", d / "other" / "inner" / "z")  # into itself
    raises_errno(errno.ENOENT, os.rename, d / "missing", d / "z")
    # RENAME_NOREPLACE
    (d / "p").write_bytes(b"P")
    (d / "q").write_bytes(b"Q")
    raises_errno(errno.EEXIST, renameat2, d / "p", d / "q", RENAME_NOREPLACE)
    assert (d / "p").read_bytes() == b"P" and (d / "q").read_bytes() == b"Q"
    renameat2(d / "p", d / "r", RENAME_NOREPLACE)
    assert (d / "r").read_bytes() == b"P" and not (d / "p").exists()
    # rename onto a hard link of itself is a no-op
    os.link(d / "r", d / "r2")
    os.rename(d / "r", d / "r2")
    assert (d / "r").exists() and (d / "r2").exists()
    assert sorted(os.listdir(d)) == ["empty", "other", "q", "r", "r2"]


def test_hard_links(d: Path) -> None:
    f = d / "orig"
    f.write_bytes(b"shared")
    os.mkdir(d / "sub")
    os.link(f, d / "l1")
    os.link(f, d / "sub" / "l2")  # another directory
    for p in (f, d / "l1", d / "sub" / "l2"):
        s = os.stat(p)
        assert s.st_nlink == 3, p
        assert s.st_ino == os.stat(f).st_ino
    with open(d / "sub" / "l2", "ab") as fh:
        fh.write(b"+more")
    assert f.read_bytes() == b"shared+more"
    raises_errno(errno.EEXIST, os.link, f, d / "l1")
    raises_errno(errno.EPERM, os.link, d / "sub", d / "dirlink")  # no hard links to directories
    os.unlink(f)
    assert os.stat(d / "l1").st_nlink == 2
    assert (d / "l1").read_bytes() == b"shared+more"
    os.unlink(d / "sub" / "l2")
    assert os.stat(d / "l1").st_nlink == 1


def test_symlinks(d: Path) -> None:
    (d / "target").write_bytes(b"T")
    os.symlink("target", d / "rel")
    os.symlink(str(d / "target"), d / "abs")
    os.symlink("does/not/exist", d / "dangling")
    long_target = "x/" * 1000 + "end"
    os.symlink(long_target, d / "long")
    assert os.readlink(d / "rel") == "target"
    assert os.readlink(d / "abs") == str(d / "target")
    assert os.readlink(d / "dangling") == "does/not/exist"
    assert os.readlink(d / "long") == long_target
    assert stat.S_ISLNK(os.lstat(d / "rel").st_mode)
    assert os.lstat(d / "rel").st_size == len("target")
    assert (d / "rel").read_bytes() == b"T" and (d / "abs").read_bytes() == b"T"
    raises_errno(errno.ENOENT, os.stat, d / "dangling")
    raises_errno(errno.EEXIST, os.symlink, "x", d / "rel")
    raises_errno(errno.EINVAL, os.readlink, d / "target")
    os.symlink("..", d / "up")
    assert os.path.samefile(d / "up", d.parent)
    # lutimes on the link itself
    os.utime(d / "rel", ns=(10**18, 10**18), follow_symlinks=False)
    assert os.lstat(d / "rel").st_mtime_ns == 10**18
    assert os.stat(d / "target").st_mtime_ns != 10**18
    os.unlink(d / "rel")
    assert (d / "target").exists()


def test_mknod_and_mkfifo(d: Path) -> None:
    os.mkfifo(d / "fifo", 0o640)
    s = os.lstat(d / "fifo")
    assert stat.S_ISFIFO(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o640
    os.mknod(d / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    assert stat.S_ISCHR(os.lstat(d / "chr").st_mode)
    os.mknod(d / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    assert stat.S_ISBLK(os.lstat(d / "blk").st_mode)
    os.mknod(d / "reg", 0o644 | stat.S_IFREG)
    assert stat.S_ISREG(os.lstat(d / "reg").st_mode) and os.lstat(d / "reg").st_size == 0
    os.mknod(d / "sock", 0o644 | stat.S_IFSOCK)
    assert stat.S_ISSOCK(os.lstat(d / "sock").st_mode)
    raises_errno(errno.EEXIST, os.mkfifo, d / "fifo")
    # a fifo works as a fifo (a kernel pipe on the FUSE inode)
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(open(d / "fifo", "rb").read()))
    t.start()
    with open(d / "fifo", "wb") as fh:
        fh.write(b"through the pipe")
    t.join(timeout=10)
    assert out == [b"through the pipe"]
    assert sorted(os.listdir(d)) == ["blk", "chr", "fifo", "reg", "sock"]


def test_device_numbers(shared: SharedMount, d: Path) -> None:
    os.mknod(d / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(d / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    # the bricks got the right numbers (MKNOD carries a Linux dev_t) ...
    for name, dev in (("chr", os.makedev(1, 3)), ("blk", os.makedev(7, 200))):
        copies = brick_copies(shared.vol, (d / name).relative_to(shared.path))
        assert copies and all(os.lstat(c).st_rdev == dev for c in copies)
    # ... and the mount must show them
    assert os.lstat(d / "chr").st_rdev == os.makedev(1, 3)
    s = os.lstat(d / "blk")
    assert (os.major(s.st_rdev), os.minor(s.st_rdev)) == (7, 200)


def test_statvfs(shared: SharedMount) -> None:
    sv = os.statvfs(shared.path)
    assert sv.f_namemax == 255
    assert sv.f_bsize > 0 and sv.f_frsize > 0
    assert 0 < sv.f_bavail <= sv.f_bfree <= sv.f_blocks
    assert 0 < sv.f_ffree <= sv.f_files
    # (equality with the native client's numbers: test_mount_interop)


def test_access(d: Path) -> None:
    f = d / "acc"
    f.write_bytes(b"x")
    os.chmod(f, 0o640)
    assert os.access(f, os.R_OK | os.W_OK)
    assert os.access(f, os.F_OK)
    assert os.access(d, os.X_OK)
    assert not os.access(d / "missing", os.F_OK)
    os.chmod(f, 0o750)
    assert os.access(f, os.X_OK)
    os.chmod(f, 0o640)
    assert not os.access(f, os.X_OK)  # root needs some x bit to execute
    os.chmod(f, 0o604)
    assert as_user([["access", f, os.R_OK], ["access", f, os.W_OK], ["access", f, os.X_OK]]) == [True, False, False]


def test_user_xattrs(d: Path) -> None:
    f = d / "x"
    f.write_bytes(b"x")
    os.mkdir(d / "dir")
    for p in (f, d / "dir"):
        os.setxattr(p, "user.a", b"1")
        os.setxattr(p, "user.bin", b"\x00\xff\x00")
        os.setxattr(p, "user.empty", b"")
        os.setxattr(p, "user.big", b"v" * 1000)  # ext4: all xattrs share one block
        assert os.getxattr(p, "user.a") == b"1"
        assert os.getxattr(p, "user.bin") == b"\x00\xff\x00"
        assert os.getxattr(p, "user.empty") == b""
        assert os.getxattr(p, "user.big") == b"v" * 1000
        names = os.listxattr(p)
        assert {"user.a", "user.bin", "user.empty", "user.big"} <= set(names), names
        assert not [n for n in names if n.startswith(("trusted.", "glusterfs."))], names
        os.setxattr(p, "user.a", b"2", os.XATTR_REPLACE)
        assert os.getxattr(p, "user.a") == b"2"
        raises_errno(errno.EEXIST, os.setxattr, p, "user.a", b"3", os.XATTR_CREATE)
        raises_errno(errno.ENODATA, os.setxattr, p, "user.nope", b"3", os.XATTR_REPLACE)
        os.setxattr(p, "user.c", b"c", os.XATTR_CREATE)
        os.removexattr(p, "user.a")
        raises_errno(errno.ENODATA, os.getxattr, p, "user.a")
        raises_errno(errno.ENODATA, os.removexattr, p, "user.a")
        assert "user.a" not in os.listxattr(p)
        assert os.getxattr(p, "user.c") == b"c"
    # gluster's own xattrs are neither visible nor settable through the mount
    raises_errno(errno.ENODATA, os.getxattr, f, "trusted.gfid")
    raises_errno((errno.EPERM, errno.ENOTSUP), os.setxattr, f, "trusted.glusterfs.dht", b"x")


def test_name_lengths(d: Path) -> None:
    ok = "n" * 255
    (d / ok).write_bytes(b"long")
    assert (d / ok).read_bytes() == b"long"
    assert os.listdir(d) == [ok]
    os.mkdir(d / ("D" * 255))
    os.rename(d / ok, d / ("m" * 255))
    assert sorted(os.listdir(d)) == ["D" * 255, "m" * 255]
    bad = "b" * 256
    raises_errno(errno.ENAMETOOLONG, os.open, d / bad, os.O_CREAT | os.O_WRONLY)
    raises_errno(errno.ENAMETOOLONG, os.mkdir, d / bad)
    raises_errno(errno.ENAMETOOLONG, os.stat, d / bad)
    raises_errno(errno.ENAMETOOLONG, os.symlink, "x", d / bad)
    raises_errno(errno.ENAMETOOLONG, os.rename, d / ("m" * 255), d / bad)
    # multi-byte: 255 bytes are fine, 256 bytes are not, whatever the character count
    (d / ("é" * 127 + "x")).write_bytes(b"")  # 255 bytes
    raises_errno(errno.ENAMETOOLONG, os.open, d / ("é" * 128), os.O_CREAT | os.O_WRONLY)


def test_non_utf8_names(d: Path) -> None:
    bd = os.fsencode(d)
    names = [b"caf\xe9", b"\xff\xfe\xfd", b"mixed-\xc3\xa9-\x80", b"tab\tnew\nline"]
    for i, n in enumerate(names):
        with open(bd + b"/" + n, "wb") as fh:
            fh.write(bytes([i]) * 10)
    os.mkdir(bd + b"/dir-\xa0")
    listed = sorted(os.listdir(bd))
    assert listed == sorted([*names, b"dir-\xa0"])
    with os.scandir(bd) as it:
        assert sorted(e.name for e in it) == listed
    for i, n in enumerate(names):
        assert open(bd + b"/" + n, "rb").read() == bytes([i]) * 10
    os.rename(bd + b"/" + names[0], bd + b"/dir-\xa0/moved-\xe9")
    assert open(bd + b"/dir-\xa0/moved-\xe9", "rb").read() == bytes([0]) * 10
    os.symlink(b"\xfe-target", bd + b"/link-\xfe")
    assert os.readlink(bd + b"/link-\xfe") == b"\xfe-target"
    os.setxattr(bd + b"/" + names[1], b"user.\xe9", b"v")
    assert os.fsencode("user.\udce9") in [os.fsencode(x) for x in os.listxattr(bd + b"/" + names[1])]
    for n in names[1:]:
        os.unlink(bd + b"/" + n)
    os.unlink(bd + b"/link-\xfe")
    assert os.listdir(bd) == [b"dir-\xa0"]


def in_threads(fn, items: list, n: int = 8, timeout: float = 240) -> None:
    """``fn(item)`` for every item, from ``n`` threads (many FUSE requests in flight)."""
    errors: list[BaseException] = []

    def run(chunk: list) -> None:
        try:
            for item in chunk:
                fn(item)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(items[k::n],)) for k in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(timeout=max(deadline - time.monotonic(), 0.1))
    assert not any(t.is_alive() for t in threads), f"{fn.__name__} threads still running after {timeout}s"
    assert not errors, errors[:3]


@pytest.mark.parametrize("shared", ["distrep"], indirect=True)  # ~20 s of creates: one kind (the merged listing)
def test_large_directory_listing(d: Path) -> None:
    """2000 entries, each listed exactly once (many readdir pages, two replica sets merged)."""
    n = 2000
    names = [f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(n)]
    in_threads(lambda name: os.mknod(d / name, 0o644 | stat.S_IFREG), names)
    os.mkdir(d / "a-subdir")
    try:
        with os.scandir(d) as it:
            entries = [(e.name, e.is_file(follow_symlinks=False), e.is_dir(follow_symlinks=False)) for e in it]
        seen = [e[0] for e in entries]
        dups = sorted({x for x in seen if seen.count(x) > 1}) if len(set(seen)) != len(seen) else []
        assert not dups, f"listed more than once: {dups[:10]}"
        assert set(seen) == {*names, "a-subdir"}, (len(seen), sorted(set(names) - set(seen))[:10])
        assert all(f for name, f, _ in entries if name != "a-subdir")
        assert [dd for name, _, dd in entries if name == "a-subdir"] == [True]
        assert sorted(os.listdir(d)) == sorted(seen)  # a second, fresh directory stream
    finally:
        in_threads(lambda name: os.unlink(d / name), [x for x in names if os.path.lexists(d / x)])


def test_readdir_while_creating(d: Path) -> None:
    total = 120
    created: list[str] = []
    errors: list[BaseException] = []

    def creator() -> None:
        try:
            for i in range(total):
                name = f"c{i:04d}"
                os.mknod(d / name, 0o644 | stat.S_IFREG)
                created.append(name)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=creator)
    t.start()
    listings = 0
    deadline = time.monotonic() + 120
    try:
        while t.is_alive() and time.monotonic() < deadline:
            before = set(created)
            with os.scandir(d) as it:
                seen = [e.name for e in it]
            listings += 1
            assert len(seen) == len(set(seen)), "an entry was listed twice during concurrent creates"
            missing = sorted(before - set(seen))[:5]
            assert before <= set(seen), f"entries created before the listing are missing: {missing}"
            assert set(seen) <= {f"c{i:04d}" for i in range(total)}
            time.sleep(0.05)
    finally:
        t.join(timeout=120)
    assert not t.is_alive()
    assert not errors, errors
    assert listings >= 2
    assert sorted(os.listdir(d)) == sorted(created) and len(created) == total


def test_ls_l(d: Path) -> None:
    (d / "file").write_bytes(b"12345")
    os.symlink("file", d / "link")
    os.mkdir(d / "dir")
    os.mkfifo(d / "fifo")
    p = subprocess.run(["ls", "-la", "--time-style=+%s", str(d)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    lines = {ln.split()[-1] if "->" not in ln else ln.split()[-3]: ln for ln in p.stdout.splitlines()[1:]}
    lines.pop(".", None)  # gfuse lists no "." and ".." (POSIX allows that; the native client lists them)
    lines.pop("..", None)
    assert set(lines) == {"file", "link", "dir", "fifo"}, p.stdout
    fields = {k: v.split() for k, v in lines.items()}
    assert fields["file"][:5] == ["-rw-r--r--", "1", "root", "root", "5"], lines["file"]
    assert fields["link"][:5] == ["lrwxrwxrwx", "1", "root", "root", "4"], lines["link"]
    assert lines["link"].endswith("link -> file")
    assert fields["dir"][:4] == ["drwxr-xr-x", "2", "root", "root"], lines["dir"]
    assert fields["fifo"][:5] == ["prw-r--r--", "1", "root", "root", "0"], lines["fifo"]
    p = subprocess.run(["ls", "-lR", str(d.parent)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "Permission denied" not in p.stderr and "Input/output" not in p.stderr, p.stderr


# ------------------------------------------------------------------------------------------
# failures


def test_failed_brick_call_does_not_take_the_mount_down(make_volume, gfuse_mount) -> None:
    vol = make_volume("dist1")
    m = gfuse_mount(vol)
    f = m.path / "victim"
    f.write_bytes(b"before")
    pid = m.pid
    assert pid
    vol.kill_brick(0)
    # a fresh open() has to go to the brick (the kernel may have cached attributes, not data: no
    # page cache survives the close above because gfuse does not ask to keep it)
    try:
        data = f.read_bytes()
    except OSError as e:
        assert e.errno in (errno.EIO, errno.ENOTCONN), e
    else:
        pytest.fail(f"read with every brick dead succeeded: {data!r}")
    for _ in range(3):  # the serving process answers, with an error or cached attributes
        try:
            os.stat(m.path)
        except OSError as e:
            assert e.errno in (errno.EIO, errno.ENOTCONN), e
        assert tc.is_mounted(m.path)
        assert os.path.exists(f"/proc/{pid}"), "the gfuse process died"
    try:
        (m.path / "new").write_bytes(b"x")
    except OSError as e:
        assert e.errno in (errno.EIO, errno.ENOTCONN), e
    else:
        pytest.fail("create with every brick dead succeeded")
    vol.start_force()
    data = tc.wait_until(lambda: f.read_bytes(), 30, "the mount to read again after the brick came back",
                         ignore=(OSError,))
    assert data == b"before"
    os.stat(m.path)
    (m.path / "after").write_bytes(b"ok")
    assert (vol.brick_dir(0) / "after").read_bytes() == b"ok"
    assert os.path.exists(f"/proc/{pid}")


def test_fresh_distributed_volume_root_layout(make_volume, gfuse_mount, native_mount) -> None:
    """Nobody has looked at this volume yet: its root has no layout until gfuse writes one, which the
    native client then takes as it is."""
    vol = make_volume("distrep")
    m = gfuse_mount(vol)
    os.mkdir(m.path / "first")
    (m.path / "first" / "f").write_bytes(b"x")
    (m.path / "top-file").write_bytes(b"y")
    assert sorted(os.listdir(m.path)) == ["first", "top-file"]
    ranges = []
    for k in range(2):
        values = {os.getxattr(b, LAYOUT_XATTR) for b in vol.brick_dirs[3 * k:3 * k + 3]}
        assert len(values) == 1, f"replica set {k} disagrees on the root layout: {values}"
        ranges.append(Range.decode(values.pop()))
    spans = sorted((r.start, r.stop) for r in ranges)
    assert spans[0][0] == 0 and spans[-1][1] == 0xFFFFFFFF and spans[1][0] == spans[0][1] + 1, spans
    n = native_mount(vol)
    assert sorted(os.listdir(n.path)) == ["first", "top-file"]
    assert (n.path / "first" / "f").read_bytes() == b"x"
    assert [Range.decode(os.getxattr(vol.brick_dir(3 * k), LAYOUT_XATTR)) for k in range(2)] == ranges, \
        "the native client rewrote gfuse's root layout"
