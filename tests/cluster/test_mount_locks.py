"""POSIX (fcntl) and BSD (flock) locks and fallocate through gfuse, between clients on real bricks.

Locks matter between *clients*: each lock holder below is its own process, working through a
different mount (a second gfuse, or the native glusterfs client), so a conflict can only be seen
if the lock reached the bricks. Every helper process is killed when its test ends.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from testkit import cluster as tc
from gfuse.status import query_status

pytestmark = pytest.mark.timeout(180)

HOLDER = r"""
import fcntl, os, signal, struct, sys
path, kind, start, length, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "w"
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
signal.signal(signal.SIGUSR1, lambda *_: (_ for _ in ()).throw(InterruptedError(4, "given up")))
print("ready", flush=True)
try:
    if kind == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    else:
        fcntl.fcntl(fd, fcntl.F_SETLKW if wait else fcntl.F_SETLK,
                    struct.pack("hhqqi", fcntl.F_WRLCK, 0, start, length, 0))
except OSError as e:
    print("error", e.errno, flush=True)
    sys.exit(3)
print("locked", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "close":
        os.close(fd)
        print("closed", flush=True)
    elif cmd == "unlock":
        fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_UNLCK, 0, start, length, 0))
        print("unlocked", flush=True)
    elif cmd == "exit":
        break
"""


class Holder:
    """A process that takes a lock on ``path`` and keeps it until told otherwise."""

    def __init__(self, path: Path, kind: str = "fcntl", start: int = 0, length: int = 0, wait: bool = False):
        self.path = path
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), kind, str(start), str(length),
                                      "w" if wait else "n"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self._buf = b""  # what was read from its stdout and not yet taken as a line
        assert self.read() == "ready"

    def read(self, timeout: float = 30.0) -> str:
        """The holder's next line. Read from the pipe's fd with our own buffer: a buffered readline may take two
        lines at once ("ready", then "locked" right after it), and a select on the fd then waits for a line that
        was already read (the 30 s 'did not answer' flake, with the holder waiting for its next command)."""
        import select
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"lock holder did not answer in {timeout:g} s: {self.state()}")
            chunk = os.read(fd, 4096)
            if not chunk:  # it exited (e.g. told "exit"): as readline, an empty line
                line, self._buf = self._buf, b""
                return line.decode().strip()
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode().strip()

    def state(self) -> str:
        """What the mount was doing (a flake under load 5-9 is not root-caused: this says where it waits)."""
        try:
            wchan = Path(f"/proc/{self.proc.pid}/wchan").read_text()
            st = query_status(str(self.path.parent))
            bricks = [b.get("up") for b in st.get("bricks", [])]
            return (f"holder in {wchan or '?'}; gfuse pid {st.get('pid')}: {st.get('fuse_requests_in_flight')} FUSE "
                    f"requests in flight, {st.get('pending_brick_calls')} brick calls pending, bricks up {bricks}")
        except (OSError, ValueError) as e:
            return f"(no status: {e})"

    def tell(self, cmd: str) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def hold() -> Iterator[Callable[..., Holder]]:
    """Factory: a Holder process (killed after the test); a non-waiting one has its lock already."""
    made: list[Holder] = []

    def start(path: Path, kind: str = "fcntl", start: int = 0, length: int = 0, wait: bool = False) -> Holder:
        h = Holder(path, kind, start, length, wait)
        made.append(h)
        if not wait:
            assert h.read() == "locked"
        return h
    yield start
    for h in made:
        h.stop()


def shared_file(vol, gfuse_mount, tag: str, data: bytes = b"data"):
    """Two gfuse clients of ``vol`` and a file made through the first: (a, b, path via a, path via b)."""
    a, b = gfuse_mount(vol), gfuse_mount(vol)
    name = f"{tag}-{os.getpid()}"
    (a.path / name).write_bytes(data)
    return a, b, a.path / name, b.path / name


def try_lock(path: Path, start: int = 0, length: int = 0, kind: int = fcntl.F_WRLCK) -> int:
    """F_SETLK from this process on a fresh fd: 0 or the errno; the fd (and lock) is dropped again."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", kind, 0, start, length, 0))
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def get_lock(path: Path, start: int = 0, length: int = 0) -> tuple[int, int, int, int]:
    """F_GETLK for a write lock: (type, start, len, pid) of the conflicting lock or F_UNLCK."""
    fd = os.open(path, os.O_RDWR)
    try:
        out = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, start, length, 0))
    finally:
        os.close(fd)
    t, _w, s, ln, pid = struct.unpack("hhqqi", out)
    return t, s, ln, pid


def try_flock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


CONFLICT = (errno.EAGAIN, errno.EACCES)


def test_posix_locks_between_two_gfuse_clients(volume, gfuse_mount, hold) -> None:
    _a, _b, pa, pb = shared_file(volume, gfuse_mount, "lk", b"x" * 4096)
    h = hold(pa, start=0, length=100)
    # the other client sees the lock, with its owner's range and pid
    assert try_lock(pb, 50, 10) in CONFLICT
    t, s, ln, pid = get_lock(pb, 0, 0)
    assert (t, s, ln) == (fcntl.F_WRLCK, 0, 100)
    assert pid == h.proc.pid
    assert try_lock(pb, 100, 50) == 0            # beyond the range: free
    assert try_lock(pb, 0, 10, fcntl.F_RDLCK) in CONFLICT
    # unlock drops it
    assert h.tell("unlock") == "unlocked"
    assert try_lock(pb, 0, 100) == 0
    assert get_lock(pb)[0] == fcntl.F_UNLCK


def test_close_drops_the_posix_lock_while_the_process_lives(vol_replica3, gfuse_mount, hold) -> None:
    _a, _b, pa, pb = shared_file(vol_replica3, gfuse_mount, "lk-close")
    h = hold(pa)
    assert try_lock(pb) in CONFLICT
    assert h.tell("close") == "closed"  # POSIX: closing any fd of the file drops the process's locks
    assert h.proc.poll() is None
    assert try_lock(pb) == 0


def test_lock_of_a_killed_process_is_released(vol_replica3, gfuse_mount, hold) -> None:
    _a, _b, pa, pb = shared_file(vol_replica3, gfuse_mount, "lk-kill")
    h = hold(pa)
    h.proc.kill()
    h.proc.wait(10)
    tc.wait_until(lambda: try_lock(pb) == 0, 10, "the lock of a dead process to be released")


def test_blocking_lock_waits_for_the_holder(vol_replica3, gfuse_mount, hold) -> None:
    _a, _b, pa, pb = shared_file(vol_replica3, gfuse_mount, "lk-wait")
    first = hold(pa)
    second = hold(pb, wait=True)
    with pytest.raises(TimeoutError):
        second.read(timeout=1.5)  # F_SETLKW is waiting
    t0 = time.monotonic()
    assert first.tell("unlock") == "unlocked"
    assert second.read(timeout=20) == "locked"
    assert time.monotonic() - t0 < 10
    assert try_lock(pa) in CONFLICT  # now the second client holds it


def test_interrupted_blocking_lock_leaves_no_lock_behind(vol_replica3, gfuse_mount, hold) -> None:
    """A process that gives up waiting (signal) gets EINTR; the lock it would have got is not kept."""
    _a, _b, pa, pb = shared_file(vol_replica3, gfuse_mount, "lk-intr")
    first = hold(pa)
    waiter = hold(pb, wait=True)
    with pytest.raises(TimeoutError):
        waiter.read(timeout=1.0)
    waiter.proc.send_signal(signal.SIGUSR1)
    assert waiter.read(timeout=10) == f"error {errno.EINTR}"
    waiter.proc.wait(10)
    assert first.tell("unlock") == "unlocked"
    tc.wait_until(lambda: try_lock(pa) == 0, 10, "the lock free again (an abandoned request must not keep it)")


def test_bsd_flock_between_clients(vol_replica3, gfuse_mount, hold) -> None:
    _a, _b, pa, pb = shared_file(vol_replica3, gfuse_mount, "flock")
    h = hold(pa, kind="flock")
    assert try_flock(pb) == errno.EWOULDBLOCK
    assert h.tell("close") == "closed"
    assert try_flock(pb) == 0


def test_locks_interoperate_with_the_native_client(vol_replica3, gfuse_mount, native_mount, hold) -> None:
    g, n = gfuse_mount(vol_replica3), native_mount(vol_replica3)
    name = f"lk-native-{os.getpid()}"
    (g.path / name).write_bytes(b"data")
    h = hold(g.path / name, start=10, length=10)
    assert try_lock(n.path / name, 15, 1) in CONFLICT
    assert try_lock(n.path / name, 20, 1) == 0
    assert h.tell("unlock") == "unlocked"
    hold(n.path / name, start=0, length=0)
    assert try_lock(g.path / name, 4096, 1) in CONFLICT
    assert get_lock(g.path / name)[0] == fcntl.F_WRLCK


# ------------------------------------------------------------------------------------------- fallocate

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _brick_copies(vol, name: str) -> list[bytes]:
    return [(Path(b) / name).read_bytes() for b in vol.brick_dirs]


def test_fallocate_modes_reach_every_replica(vol_replica3, gfuse_mount, native_mount) -> None:
    m = gfuse_mount(vol_replica3)
    name = f"falloc-{os.getpid()}"
    path = m.path / name
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fallocate(fd, 0, 0, 1 << 20)                       # plain: size grows, zeros
        assert os.fstat(fd).st_size == 1 << 20
        fallocate(fd, KEEP_SIZE, 1 << 20, 1 << 20)         # keep size: blocks, not size
        assert os.fstat(fd).st_size == 1 << 20
        for b in vol_replica3.brick_dirs:  # the space is reserved on every replica
            assert (Path(b) / name).stat().st_blocks * 512 >= 2 << 20, b
        os.pwrite(fd, b"\xff" * (1 << 20), 0)
        fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 4096, 8192)  # hole: zeros, size kept
        fallocate(fd, ZERO_RANGE, 65536, 4096)             # zero range
        with pytest.raises(OSError) as e:
            fallocate(fd, PUNCH_HOLE, 0, 4096)             # a hole without KEEP_SIZE: refused by the kernel
        assert e.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)
        os.fsync(fd)
    finally:
        os.close(fd)
    want = bytearray(b"\xff" * (1 << 20))
    want[4096:12288] = bytes(8192)
    want[65536:69632] = bytes(4096)
    assert path.read_bytes() == bytes(want)
    assert (native_mount(vol_replica3).path / name).read_bytes() == bytes(want)
    digests = {hashlib.sha256(c).hexdigest() for c in _brick_copies(vol_replica3, name)}
    assert len(digests) == 1 and digests == {hashlib.sha256(bytes(want)).hexdigest()}
    for b in vol_replica3.brick_dirs:  # nothing left pending: every replica took every change
        p = str(Path(b) / name)
        for x in os.listxattr(p):
            if x.startswith("trusted.afr.") and x != "trusted.afr.dirty":
                assert os.getxattr(p, x) == bytes(12), (b, x)


def test_lazy_unmount_while_a_lock_is_awaited(vol_replica3, gfuse_mount, hold) -> None:
    """After ``umount -l`` the open file is still served: the waiter gets its lock, and the server
    exits once that last file is closed."""
    _a, b, pa, pb = shared_file(vol_replica3, gfuse_mount, "lk-umount")
    first = hold(pa)
    waiter = hold(pb, wait=True)
    with pytest.raises(TimeoutError):
        waiter.read(timeout=1.0)
    subprocess.run(["umount", "-l", str(b.path)], check=True, timeout=30)
    assert first.tell("unlock") == "unlocked"
    assert waiter.read(timeout=30) == "locked"
    assert try_lock(pa) in CONFLICT
    waiter.tell("exit")
    waiter.proc.wait(10)
    tc.wait_until(lambda: b.pid is None or not os.path.exists(f"/proc/{b.pid}"), 30,
                  "the gfuse server to exit after its last file closed")
    assert try_lock(pa) == 0  # nothing left behind by the vanished client


def test_locks_survive_brick_restarts(make_volume, gfuse_mount, hold, tmp_path) -> None:
    """A restarted brick has forgotten every lock: gfuse grants its locks there again. Else, after two
    restarts and the third brick down, another client would get a lock that is still held."""
    vol = make_volume("replica3")
    log = tmp_path / "a.log"
    a = gfuse_mount(vol, options=[f"log-file={log}"])
    b = gfuse_mount(vol)
    name = f"lk-heal-{os.getpid()}"
    (a.path / name).write_bytes(b"data")
    h = hold(a.path / name, start=0, length=100)
    for i in (0, 1):
        vol.kill_brick(i)
        vol.start_force()
        tc.wait_until(lambda: all(x["up"] for x in query_status(str(a.path))["bricks"]), 30,
                      "gfuse to reconnect the brick")
        tc.wait_until(lambda n=i + 1: log.read_text().count("re-granted 1 POSIX lock") >= n, 30,
                      "the lock to be re-granted")
    vol.kill_brick(2)
    try:
        assert try_lock(b.path / name, 10, 1) in CONFLICT  # held on bricks 0 and 1 again
    finally:
        vol.start_force()
    assert h.tell("unlock") == "unlocked"
    tc.wait_until(lambda: try_lock(b.path / name, 10, 1) == 0, 30, "the lock to be free after the unlock")
