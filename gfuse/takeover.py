"""Mounts that outlive their serving process (issue 12): a new process takes over the live FUSE connection.

The kernel keeps a FUSE connection while any process holds its ``/dev/fuse`` file (facts measured on
kernel 6.18 in ``bench/takeover_pause.py``'s docstring). So a restartable mount (``-o restartable``)
hands a copy of its FUSE fd to the per-node holder (:mod:`gfuse.holder`) right after mounting, and
keeps, on tmpfs, everything a successor needs to answer the kernel as it would have:

* ``init``: the kernel's FUSE_INIT request, read by us before libfuse sees it. A successor runs libfuse
  on the held fd (``fuse_session_mount`` takes ``/dev/fd/N``: no new mount) and feeds this request to
  ``fuse_session_process_buf``: libfuse then computes its session state (protocol minor, buffer size,
  capabilities) exactly as the first time, and pyfuse3's ``init`` hook runs. Its reply carries the
  unique of a request the kernel finished long ago, which the kernel refuses with ENOENT and libfuse
  ignores silently. Setting libfuse's private ``got_init``/``conn`` fields instead would mean guessing
  the layout of ``struct fuse_session``, which changes between libfuse releases; the recorded request
  needs nothing but the public API.
* ``journal``: node ids → (gfid, lookup count), file handles → (node id, gfid, open flags), directory
  handles → (gfid, readdir cookies) and the entry operations in progress (the gfid a create was sent
  with), as fixed little records in a shared mapping of a tmpfs file. A record is a memory copy made
  before the handler returns, so before the reply reaches the kernel: no system call, no fsync and no
  round trip per request; what a SIGKILLed process copied is in the page cache for the next one. The
  type byte is stored last, so a record cut by the kill is not read.
* ``mount.json``: the volume spec, the ``-o`` options, the log file and the mount's root gfid.

A successor (``gfuse mount --takeover MOUNTPOINT``, or the holder on its own when the server dies)
takes the fd from the holder, connects the graph, reopens every file and directory the kernel holds by
gfid, starts a fresh journal with the restored state, then writes FUSE_NOTIFY_RESEND: the kernel queues
again every request the dead process had read but not answered (unique | 1 << 63), and they run again.
Re-running is safe: writes name their offset (files reopened here lose O_APPEND, so a write the dead
process already did lands on the same bytes again — the kernel computes append offsets itself), and an
entry operation the first attempt may have done is recognised (:class:`Journal` ``entry``/``removal``/
``rename``): a create finds its name holding the very gfid the first attempt sent and is answered with
that file, an unlink or rename finding its source gone is answered with success.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import mmap
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .cred import new_gfid
from .fops import Proc, Result
from .options import MountError
from .rpc import Credential

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ FUSE wire facts

FUSE_INIT = 26
FUSE_NOTIFY_RESEND = 7
FUSE_INIT_EXT = 1 << 30
FUSE_HAS_RESEND = 1 << 39
FUSE_UNIQUE_RESEND = 1 << 63
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error (notify code when unique is 0), unique
INIT_IN = struct.Struct("<IIIII")  # major, minor, max_readahead, flags, flags2
#: a read from /dev/fuse needs room for max_write (gfuse's is 1 MiB) plus the request headers
READ_SIZE = (1 << 20) + (1 << 16)
MNT_DETACH = 2  # as libfuse unmounts (lazily)


def init_flags(init: bytes) -> tuple[int, int, int]:
    """(major, minor, 64-bit flags) of a recorded FUSE_INIT request."""
    h = IN_HEADER.unpack_from(init)
    if h[1] != FUSE_INIT:
        raise ValueError(f"not a FUSE_INIT request (opcode {h[1]})")
    major, minor, _ra, flags, flags2 = INIT_IN.unpack_from(init, IN_HEADER.size)
    return major, minor, flags | (flags2 << 32 if flags & FUSE_INIT_EXT else 0)


def kernel_has_resend(init: bytes) -> bool:
    """Whether the kernel that sent this INIT re-queues unanswered requests on FUSE_NOTIFY_RESEND
    (it says so with FUSE_HAS_RESEND since Linux 6.9)."""
    return bool(init_flags(init)[2] & FUSE_HAS_RESEND)


def notify_resend(fd: int) -> None:
    """Ask the kernel to queue again every request read from this connection but not answered."""
    n = os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0))
    if n != OUT_HEADER.size:
        raise OSError(errno.EIO, f"FUSE_NOTIFY_RESEND: short write ({n})")


class _FuseBuf(ctypes.Structure):
    """struct fuse_buf (libfuse 3 public header)."""
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


def _session() -> int:
    from .fuse_lowlevel import pyfuse3_session

    return pyfuse3_session()


def read_init(fd: int, timeout: float = 10.0) -> bytes:
    """The kernel's FUSE_INIT, read from a fresh connection before libfuse's loop runs."""
    import select

    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise OSError(errno.ETIMEDOUT, "no FUSE_INIT from the kernel")
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        try:
            data = os.read(fd, READ_SIZE)
        except InterruptedError:
            continue
        init_flags(data)  # ValueError if it is something else
        return data


def process_request(data: bytes) -> None:
    """Hand one raw request to pyfuse3's libfuse session, as its loop would (``fuse_session_process_buf``)."""
    # PyDLL: the call keeps the GIL, as pyfuse3's own loop does (its handlers run Python without taking it)
    lib = ctypes.PyDLL("libfuse3.so.3")
    lib.fuse_session_process_buf.argtypes = [ctypes.c_void_p, ctypes.POINTER(_FuseBuf)]
    lib.fuse_session_process_buf.restype = None
    mem = ctypes.create_string_buffer(data, len(data))
    buf = _FuseBuf(len(data), 0, ctypes.cast(mem, ctypes.c_void_p), -1, 0)
    lib.fuse_session_process_buf(_session(), ctypes.byref(buf))


def mode_of(restart: Restart | None) -> str:
    """What ``gfuse status`` and the node agent say a mount runs in: ``restartable/held`` (the holder has a copy of
    its FUSE fd: the death of its server is a pause), ``restartable/unheld`` (restartable, but no holder has the
    fd right now: the server gives it to a new holder within a second or so), or ``repair-only`` (its server's
    death ends the connection; the node agent stacks a fresh mount over the dead one)."""
    if restart is None:
        return "repair-only"
    return "restartable/held" if restart.held else "restartable/unheld"


# ------------------------------------------------------------------------------------------ kernel probes

MS_NOSUID, MS_NODEV, MS_RDONLY, MS_REC, MS_PRIVATE = 2, 4, 1, 1 << 14, 1 << 18
CLONE_NEWNS = 0x00020000


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    libc = _libc()
    if libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                  ctypes.c_ulong(flags), data.encode() if data is not None else None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {target}: {os.strerror(code)}")


def fuse_mount_fd(mountpoint: str, fsname: str, subtype: str, *, read_only: bool = False,
                  allow_other: bool = False, default_permissions: bool = True,
                  kernel_options: Iterable[str] = ()) -> int:
    """Open ``/dev/fuse`` and mount a new FUSE connection on ``mountpoint`` with mount(2) ourselves; the fd
    (for ``pyfuse3.init("/dev/fd/N")``: libfuse then uses it and mounts nothing). As libfuse's own mount,
    with one difference: libfuse stat()s the mount point first, which fails on a dead FUSE mount
    ("Transport endpoint is not connected"); the kernel itself mounts over one without asking it anything
    (the path walk stops at the dead mount's root, no request is sent). That is how a repair stacks a fresh
    mount **over** a dead one instead of detaching it first (the node's directory is never exposed)."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        os.set_inheritable(fd, False)
        data = [f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}"]
        if default_permissions:
            data.append("default_permissions")
        if allow_other:
            data.append("allow_other")
        data += list(kernel_options)
        flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
        _mount(fsname, mountpoint, f"fuse.{subtype}", flags, ",".join(data))
    except BaseException:
        os.close(fd)
        raise
    return fd


def probe_resend(timeout: float = 5.0) -> bool:
    """Whether this kernel re-queues unanswered FUSE requests on FUSE_NOTIFY_RESEND (Linux >= 6.9), from the
    FUSE_INIT of a throwaway connection mounted in a private mount namespace of its own (call it in a process
    of its own: ``python -m gfuse.takeover --probe-resend``; it unshares its mount namespace). Root only."""
    import tempfile

    if _libc().unshare(CLONE_NEWNS) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"unshare(CLONE_NEWNS): {os.strerror(code)}")
    _mount("none", "/", None, MS_REC | MS_PRIVATE, None)  # nothing done here reaches any other namespace
    d = tempfile.mkdtemp(prefix="gfuse-probe-")
    try:
        fd = fuse_mount_fd(d, "gfuse-probe", "gfuse-probe")
        try:
            return kernel_has_resend(read_init(fd, timeout))
        finally:
            os.close(fd)  # ends the connection: the mount is dead, and gone with this namespace
            _libc().umount2(d.encode(), MNT_DETACH)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(d)


def kernel_resend_guess() -> bool:
    """Without probing: Linux >= 6.9 by the release number."""
    import re

    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (6, 9)


def main(argv: list[str] | None = None) -> None:
    """``python -m gfuse.takeover --probe-resend``: exit 0 if the kernel can resend, 1 if not, 2 if it cannot
    be told (no /dev/fuse, no privilege: the reason on stderr)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m gfuse.takeover")
    ap.add_argument("--probe-resend", action="store_true", required=True)
    ap.parse_args(argv)
    try:
        sys.exit(0 if probe_resend() else 1)
    except (OSError, ValueError) as e:
        print(f"gfuse: cannot probe FUSE_NOTIFY_RESEND: {e}", file=sys.stderr)
        sys.exit(2)


# ------------------------------------------------------------------------------------------ where records live

def run_dir() -> Path:
    """tmpfs: /run/gfuse/takeover where /run is tmpfs, or /run/gfuse is one (the node pod's hostPath of the host's
    /run/gfuse: the records then outlive the pod), else /dev/shm (``GFUSE_TAKEOVER_DIR`` overrides)."""
    env = os.environ.get("GFUSE_TAKEOVER_DIR")
    if env:
        return Path(env)
    tmpfs = _is_tmpfs("/run") or _is_tmpfs("/run/gfuse")
    return Path("/run/gfuse/takeover") if tmpfs else Path("/dev/shm/gfuse-takeover")


def _is_tmpfs(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if left.split()[4] == path:
                    return right.split()[0] == "tmpfs"
    except (OSError, IndexError):
        pass
    return False


def state_dir(mountpoint: str) -> Path:
    import hashlib

    return run_dir() / hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]


@dataclass
class MountRecord:
    """What a successor needs to serve the same mount (``mount.json``)."""
    mountpoint: str
    spec: str
    options: str
    log_file: str
    root_gfid: bytes
    started: float = 0.0
    #: the holder socket the fd was given to: a successor asks that one (``GFUSE_HOLDER_SOCKET`` of the mount)
    holder: str = ""

    def write(self, d: Path) -> None:
        from .jsonfile import write_atomic

        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = dataclasses.asdict(self)
        data["root_gfid"] = self.root_gfid.hex()
        write_atomic(d / "mount.json", data)

    @classmethod
    def read(cls, mountpoint: str) -> MountRecord:
        from .jsonfile import read

        d = state_dir(mountpoint)
        try:
            data = read(d / "mount.json")
        except ValueError as e:
            raise TakeoverError(f"the record of {mountpoint} is corrupt: {e}") from None
        if data is None:
            raise TakeoverError(f"{mountpoint} has no takeover record in {d} (not mounted with -o restartable?)")
        try:
            return cls(str(data["mountpoint"]), str(data["spec"]), str(data["options"]), str(data["log_file"]),
                       bytes.fromhex(str(data["root_gfid"])), float(data.get("started", 0.0)),
                       str(data.get("holder", "")))
        except (KeyError, ValueError) as e:
            raise TakeoverError(f"the record of {mountpoint} is incomplete: {e}") from None


class TakeoverError(MountError):
    """A takeover cannot be done; the message is one line for the user."""


# ------------------------------------------------------------------------------------------ the journal

# record types (the first byte; 0 ends the journal)
(R_LOOKUP, R_FORGET, R_OPEN, R_RELEASE, R_OPENDIR, R_RELEASEDIR, R_COOKIE, R_INTENT, R_DONE, R_LOCK,
 R_UNLOCK) = range(1, 12)
_LOOKUP = struct.Struct("<BQ16sQ")  # ino, gfid, count
_FORGET = struct.Struct("<BQQ")  # ino, count
_OPEN = struct.Struct("<BQQ16sI")  # fh, ino, gfid, flags
_HANDLE = struct.Struct("<BQ")  # fh/dh (release, releasedir)
_OPENDIR = struct.Struct("<BQ16s")  # dh, gfid
_COOKIE = struct.Struct("<BQQQ")  # dh, id, offset
#: id, op, parent gfid, gfid, when (wall clock), len(name), len(new name); then the names (the new one after 16s)
_INTENT = struct.Struct("<BQB16s16sdHH")
_DONE = struct.Struct("<BQ")  # intent id
_LOCK = struct.Struct("<BQQhqqi")  # fh, lock owner, type, start, len, pid: a lock granted
_UNLOCK = struct.Struct("<BQQ")  # fh, lock owner: flush dropped the owner's POSIX locks
MIN_CAPACITY = 4 << 20
F_UNLCK = 2
_CRASH_AFTER = frozenset(filter(None, os.environ.get("GFUSE_TAKEOVER_CRASH_AFTER", "").upper().split(",")))
#: intents finished before the process died that a successor still recognises (the process may have
#: died between finishing one and the reply reaching the kernel)
KEEP_DONE = 64
#: how long an entry operation begun by a dead process may be re-sent (successors that fail retry with back-off)
INTENT_TTL = 600.0


@dataclass
class Intent:
    """An entry operation begun: what a re-sent copy of it is compared with."""
    id: int
    op: int
    parent: bytes
    name: str
    gfid: bytes = b"\0" * 16
    new_parent: bytes = b""
    new_name: str = ""
    done: bool = False
    when: float = field(default_factory=time.time)

    def key(self) -> tuple[int, bytes, str]:
        return (self.op, self.parent, self.name)


@dataclass
class DirRecord:
    gfid: bytes
    cookies: dict[int, int] = field(default_factory=dict)


@dataclass
class State:
    """What the kernel refers to, as a journal says it."""
    inodes: dict[int, list[Any]] = field(default_factory=dict)  # ino → [gfid, lookups]
    files: dict[int, tuple[int, bytes, int]] = field(default_factory=dict)  # fh → (ino, gfid, flags)
    dirs: dict[int, DirRecord] = field(default_factory=dict)
    intents: OrderedDict[int, Intent] = field(default_factory=OrderedDict)
    #: fh → the locks granted on it, in order: (owner, type, start, len, pid); replayed they give the same locks
    locks: dict[int, list[tuple[int, int, int, int, int]]] = field(default_factory=dict)
    max_fh: int = 0
    max_dh: int = 0
    max_intent: int = 0
    records: int = 0

    def pending(self, now: float | None = None) -> dict[tuple[int, bytes, str], Intent]:
        """Entry operations a re-sent request may repeat: the unfinished ones and the last finished ones, begun
        less than INTENT_TTL ago (a request re-sent later than that was not in flight at the death)."""
        now = time.time() if now is None else now
        recent = [i for i in self.intents.values() if now - i.when < INTENT_TTL]
        out = {i.key(): i for i in [i for i in recent if i.done][-KEEP_DONE:]}
        out.update({i.key(): i for i in recent if not i.done})
        return out


def _encode_intent(i: Intent) -> bytes:
    name = i.name.encode("utf-8", "surrogateescape")
    new = i.new_name.encode("utf-8", "surrogateescape")
    head = _INTENT.pack(R_INTENT, i.id, i.op, i.parent, i.gfid, i.when, len(name), len(new))
    return head + name + ((i.new_parent or b"\0" * 16) + new if new else b"")


def parse(data: bytes | mmap.mmap) -> State:
    """Replay a journal; stops at the first zero byte, or at a record cut short."""
    s = State()
    pos, end = 0, len(data)
    while pos < end:
        t = data[pos]
        try:
            if t == R_LOOKUP:
                _, ino, gfid, n = _LOOKUP.unpack_from(data, pos)
                pos += _LOOKUP.size
                rec = s.inodes.get(ino)
                if rec is None or rec[0] != gfid:
                    s.inodes[ino] = [gfid, n]
                else:
                    rec[1] += n
            elif t == R_FORGET:
                _, ino, n = _FORGET.unpack_from(data, pos)
                pos += _FORGET.size
                rec = s.inodes.get(ino)
                if rec is not None:
                    rec[1] -= n
                    if rec[1] <= 0:
                        del s.inodes[ino]
            elif t == R_OPEN:
                _, fh, ino, gfid, flags = _OPEN.unpack_from(data, pos)
                pos += _OPEN.size
                s.files[fh] = (ino, gfid, flags)
                s.max_fh = max(s.max_fh, fh)
            elif t == R_RELEASE:
                _, fh = _HANDLE.unpack_from(data, pos)
                pos += _HANDLE.size
                s.files.pop(fh, None)
                s.locks.pop(fh, None)
                s.max_fh = max(s.max_fh, fh)
            elif t == R_LOCK:
                _, fh, owner, kind, start, length, pid = _LOCK.unpack_from(data, pos)
                pos += _LOCK.size
                _add_lock(s.locks, fh, (owner, kind, start, length, pid))
            elif t == R_UNLOCK:
                _, fh, owner = _UNLOCK.unpack_from(data, pos)
                pos += _UNLOCK.size
                _drop_owner(s.locks, fh, owner)
            elif t == R_OPENDIR:
                _, dh, gfid = _OPENDIR.unpack_from(data, pos)
                pos += _OPENDIR.size
                s.dirs[dh] = DirRecord(gfid)
                s.max_dh = max(s.max_dh, dh)
            elif t == R_RELEASEDIR:
                _, dh = _HANDLE.unpack_from(data, pos)
                pos += _HANDLE.size
                s.dirs.pop(dh, None)
                s.max_dh = max(s.max_dh, dh)
            elif t == R_COOKIE:
                _, dh, cid, off = _COOKIE.unpack_from(data, pos)
                pos += _COOKIE.size
                d = s.dirs.get(dh)
                if d is not None:
                    d.cookies[cid] = off
            elif t == R_INTENT:
                _, iid, op, parent, gfid, when, nlen, newlen = _INTENT.unpack_from(data, pos)
                p = pos + _INTENT.size
                if p + nlen + (16 + newlen if newlen else 0) > end:
                    break
                name = bytes(data[p:p + nlen]).decode("utf-8", "surrogateescape")
                p += nlen
                new_parent, new_name = b"", ""
                if newlen:
                    new_parent = bytes(data[p:p + 16])
                    new_name = bytes(data[p + 16:p + 16 + newlen]).decode("utf-8", "surrogateescape")
                    p += 16 + newlen
                pos = p
                s.intents[iid] = Intent(iid, op, parent, name, gfid, new_parent, new_name, when=when)
                s.max_intent = max(s.max_intent, iid)
                while len(s.intents) > 4 * KEEP_DONE and next(iter(s.intents.values())).done:
                    s.intents.popitem(last=False)
            elif t == R_DONE:
                _, iid = _DONE.unpack_from(data, pos)
                pos += _DONE.size
                i = s.intents.get(iid)
                if i is not None:
                    i.done = True
            else:
                break  # 0: the end (or garbage: stop rather than guess)
        except struct.error:
            break  # the last record was cut short
        s.records += 1
    return s


def _add_lock(locks: dict[int, list[tuple[int, int, int, int, int]]], fh: int,
              lk: tuple[int, int, int, int, int]) -> None:
    """An unlock of the whole file (start 0, len 0) leaves the owner nothing to take again."""
    owner, kind, start, length, _pid = lk
    if kind == F_UNLCK and start == 0 and length == 0:
        _drop_owner(locks, fh, owner)
    else:
        locks.setdefault(fh, []).append(lk)


def _drop_owner(locks: dict[int, list[tuple[int, int, int, int, int]]], fh: int, owner: int) -> None:
    held = locks.get(fh)
    if held is not None:
        held[:] = [lk for lk in held if lk[0] != owner]
        if not held:
            del locks[fh]


class Journal:
    """The records of one serving process, in a shared mapping of ``path`` (see the module docstring).

    ``inodes()`` gives the live inode table (ino, gfid, lookups) when the journal is rewritten compactly.
    """

    def __init__(self, path: Path, inodes: Callable[[], Iterable[tuple[int, bytes, int]]]) -> None:
        self.path = path
        self._inodes = inodes
        self.files: dict[int, tuple[int, bytes, int]] = {}
        self.dirs: dict[int, DirRecord] = {}
        self.intents: OrderedDict[int, Intent] = OrderedDict()
        self.locks: dict[int, list[tuple[int, int, int, int, int]]] = {}
        self._next_intent = 1
        self._mm: mmap.mmap | None = None
        self._off = 0
        #: what a successor restored: re-sent entry operations are compared with these (consumed once)
        self.retried: dict[tuple[int, bytes, str], Intent] = {}
        self.compactions = 0

    # --- file -------------------------------------------------------------------------------------

    def start(self, state: State | None = None) -> None:
        """A fresh journal holding ``state`` (the restored one, or nothing), swapped in atomically."""
        if state is not None:
            self.files = dict(state.files)
            self.dirs = {dh: DirRecord(d.gfid, dict(d.cookies)) for dh, d in state.dirs.items()}
            # what a re-sent request may still repeat, also if this process dies before it comes
            self.intents = OrderedDict((i.id, i) for i in sorted(state.pending().values(), key=lambda i: i.id))
            self.locks = {fh: list(held) for fh, held in state.locks.items() if fh in self.files}
            self._next_intent = state.max_intent + 1
        self._rewrite(((ino, rec[0], rec[1]) for ino, rec in state.inodes.items()) if state is not None else None)

    def _snapshot(self, inodes: Iterable[tuple[int, bytes, int]] | None) -> bytes:
        out = bytearray()
        for ino, gfid, n in inodes if inodes is not None else self._inodes():
            if ino != 1 and n > 0:
                out += _LOOKUP.pack(R_LOOKUP, ino, gfid, n)
        for fh, (ino, gfid, flags) in self.files.items():
            out += _OPEN.pack(R_OPEN, fh, ino, gfid, flags)
        for fh, held in self.locks.items():
            for owner, kind, start, length, pid in held:
                out += _LOCK.pack(R_LOCK, fh, owner, kind, start, length, pid)
        for dh, d in self.dirs.items():
            out += _OPENDIR.pack(R_OPENDIR, dh, d.gfid)
            for cid, off in d.cookies.items():
                out += _COOKIE.pack(R_COOKIE, dh, cid, off)
        for i in self.intents.values():
            out += _encode_intent(i)
        return bytes(out)

    def _rewrite(self, inodes: Iterable[tuple[int, bytes, int]] | None = None) -> None:
        snap = self._snapshot(inodes)
        cap = max(MIN_CAPACITY, 4 * len(snap))
        cap = (cap + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, cap)
            mm = mmap.mmap(fd, cap, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        mm[:len(snap)] = snap
        os.replace(tmp, self.path)
        old, self._mm, self._off = self._mm, mm, len(snap)
        if old is not None:
            old.close()

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def _room(self, n: int) -> mmap.mmap | None:
        mm = self._mm
        if mm is not None and self._off + n >= len(mm):
            self.compactions += 1
            self._rewrite()
            mm = self._mm
        return mm

    def _put(self, s: struct.Struct, kind: int, *fields: Any) -> None:
        """One fixed-size record, packed in place; the type byte last: a record cut by a kill is never read."""
        mm = self._room(s.size)
        if mm is None:
            return
        o = self._off
        s.pack_into(mm, o, 0, *fields)
        mm[o] = kind
        self._off = o + s.size

    def _put_bytes(self, rec: bytes) -> None:
        n = len(rec)
        mm = self._room(n)
        if mm is None:
            return
        o = self._off
        mm[o + 1:o + n] = rec[1:]
        mm[o] = rec[0]
        self._off = o + n

    # --- what the bridge calls (gfuse.fuse.GlusterOperations) ---------------------------------------

    def lookup(self, ino: int, gfid: bytes) -> None:
        self._put(_LOOKUP, R_LOOKUP, ino, gfid, 1)

    def forget(self, ino: int, n: int) -> None:
        self._put(_FORGET, R_FORGET, ino, n)

    def opened(self, fh: int, ino: int, gfid: bytes, flags: int) -> None:
        self.files[fh] = (ino, gfid, flags)
        self._put(_OPEN, R_OPEN, fh, ino, gfid, flags & 0xFFFFFFFF)

    def released(self, fh: int) -> None:
        self.locks.pop(fh, None)
        if self.files.pop(fh, None) is not None:
            self._put(_HANDLE, R_RELEASE, fh)

    def locked(self, fh: int, owner: int, lock: Any) -> None:
        """A lock (or unlock) the bricks granted: ``lock`` has type, start, len, pid (fuse_lowlevel.Lock)."""
        if fh in self.files:
            lk = (owner & 0xFFFFFFFFFFFFFFFF, lock.type, lock.start, lock.len, lock.pid)
            _add_lock(self.locks, fh, lk)
            self._put(_LOCK, R_LOCK, fh, *lk)

    def unlocked_owner(self, fh: int, owner: int) -> None:
        held = self.locks.get(fh)
        if held is not None and any(lk[0] == owner for lk in held):
            _drop_owner(self.locks, fh, owner)
            self._put(_UNLOCK, R_UNLOCK, fh, owner & 0xFFFFFFFFFFFFFFFF)

    def opendir(self, dh: int, gfid: bytes) -> None:
        self.dirs[dh] = DirRecord(gfid)
        self._put(_OPENDIR, R_OPENDIR, dh, gfid)

    def releasedir(self, dh: int) -> None:
        if self.dirs.pop(dh, None) is not None:
            self._put(_HANDLE, R_RELEASEDIR, dh)

    def cookie(self, dh: int, cid: int, off: int) -> None:
        d = self.dirs.get(dh)
        if d is not None:
            d.cookies[cid] = off
            self._put(_COOKIE, R_COOKIE, dh, cid, off & 0xFFFFFFFFFFFFFFFF)

    def _begin(self, op: int, parent: bytes, name: str, gfid: bytes = b"\0" * 16, new_parent: bytes = b"",
               new_name: str = "") -> Intent:
        i = Intent(self._next_intent, op, parent, name, gfid, new_parent, new_name)
        self._next_intent += 1
        self.intents[i.id] = i
        self._put_bytes(_encode_intent(i))
        return i

    def _end(self, i: Intent) -> None:
        self.intents.pop(i.id, None)
        self._put(_DONE, R_DONE, i.id)

    def _crash_point(self, op: Proc) -> None:
        """Fault injection for tests: with ``GFUSE_TAKEOVER_CRASH_AFTER=MKDIR,CREATE,…`` the process SIGKILLs
        itself right after the bricks did such an operation and before the kernel hears of it, once per
        operation and mount (a marker file beside the journal remembers it across successors)."""
        if op.name not in _CRASH_AFTER:
            return
        marker = self.path.with_name(f"crashed-after-{op.name}")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return
        log.warning("GFUSE_TAKEOVER_CRASH_AFTER: killing myself after %s", op.name)
        os.kill(os.getpid(), 9)

    def _retry_of(self, op: int, parent: bytes, name: str) -> Intent | None:
        """The restored intent a request repeats (recognised once: then it is finished here too)."""
        first = self.retried.pop((op, parent, name), None) if self.retried else None
        if first is not None and first.id in self.intents:
            self._end(first)
        return first

    async def entry(self, op: Proc, top: Any, parent: bytes, name: str, cred_of: Callable[[], Credential],
                    call: Callable[[bytes], Awaitable[Result]], flags: int = 0) -> Result:
        """A create/mkdir/mknod/symlink with the gfid it is sent with on record; a re-sent one whose first
        attempt happened (its name holds that gfid) is answered from the bricks as the first one was."""
        first = self._retry_of(op, parent, name)
        if first is not None:
            cred = cred_of()
            try:
                r: Result = await top.lookup(parent, name, cred=cred)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ESTALE):
                    raise
            else:
                st = r.need_stat()
                if st.gfid == first.gfid:
                    log.info("re-sent %s of %r: the first attempt made it (gfid %s)", op.name, name, st.gfid.hex())
                    if op == Proc.CREATE:
                        o: Result = await top.open(st.gfid, reopen_flags(flags) | (flags & os.O_APPEND), cred=cred)
                        return dataclasses.replace(r, fd=o.need_fd())
                    return r
        i = self._begin(op, parent, name, first.gfid if first is not None else new_gfid())
        try:
            r = await call(i.gfid)
            self._crash_point(op)
            return r
        finally:
            self._end(i)

    async def removal(self, op: Proc, parent: bytes, name: str, call: Callable[[], Awaitable[Any]]) -> None:
        """An unlink/rmdir; a re-sent one finding the name gone after its first attempt is a success."""
        first = self._retry_of(op, parent, name)
        i = self._begin(op, parent, name)
        try:
            await call()
            self._crash_point(op)
        except OSError as e:
            if first is None or e.errno != errno.ENOENT:
                raise
            log.info("re-sent %s of %r: the first attempt removed it", op.name, name)
        finally:
            self._end(i)

    async def rename(self, top: Any, parent: bytes, name: str, new_parent: bytes, new_name: str,
                     cred_of: Callable[[], Credential], call: Callable[[], Awaitable[Any]]) -> None:
        """A rename; a re-sent one finding its source gone and its target there is a success (the
        RENAME_NOREPLACE check of a re-sent one sees the target the first attempt made: EEXIST)."""
        first = self._retry_of(Proc.RENAME, parent, name)
        i = self._begin(Proc.RENAME, parent, name, new_parent=new_parent, new_name=new_name)
        try:
            await call()
            self._crash_point(Proc.RENAME)
        except Exception as e:
            if (first is None or getattr(e, "errno", None) not in (errno.ENOENT, errno.EEXIST)
                    or (first.new_parent, first.new_name) != (new_parent, new_name)
                    or not await _renamed(top, parent, name, new_parent, new_name, cred_of())):
                raise
            log.info("re-sent rename of %r: the first attempt renamed it", name)
        finally:
            self._end(i)


async def _renamed(top: Any, parent: bytes, name: str, new_parent: bytes, new_name: str, cred: Credential) -> bool:
    """The source name is gone and the target is there."""
    try:
        await top.lookup(parent, name, cred=cred)
        return False
    except OSError as e:
        if e.errno != errno.ENOENT:
            return False
    try:
        await top.lookup(new_parent, new_name, cred=cred)
    except OSError:
        return False
    return True


class NoJournal(Journal):
    """What a mount without ``-o restartable`` records: nothing."""

    def _crash_point(self, op: Proc) -> None:
        return None

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"), lambda: ())

    def _put(self, s: struct.Struct, kind: int, *fields: Any) -> None:
        return None

    def _put_bytes(self, rec: bytes) -> None:
        return None

    def opened(self, fh: int, ino: int, gfid: bytes, flags: int) -> None:
        return None

    def opendir(self, dh: int, gfid: bytes) -> None:
        return None

    def cookie(self, dh: int, cid: int, off: int) -> None:
        return None

    def _begin(self, op: int, parent: bytes, name: str, gfid: bytes = b"\0" * 16, new_parent: bytes = b"",
               new_name: str = "") -> Intent:
        return Intent(0, op, parent, name, gfid, new_parent, new_name)

    def _end(self, i: Intent) -> None:
        return None


NO_JOURNAL = NoJournal()


def reopen_flags(flags: int) -> int:
    """Open flags for reopening a handle the kernel holds: never create or truncate again, and no
    O_APPEND — the kernel gives every write its offset (for O_APPEND its cached size), so a re-sent write
    overwrites what its first attempt wrote instead of appending it twice."""
    return flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | os.O_APPEND)


# ------------------------------------------------------------------------------------------ the holder link

def holder_socket() -> str:
    return os.environ.get("GFUSE_HOLDER_SOCKET", "/run/gfuse/holder.sock")


def _send(sock: socket.socket, msg: dict[str, Any], fd: int | None = None) -> None:
    data = (json.dumps(msg) + "\n").encode()
    if fd is None:
        sock.sendall(data)
    else:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def _recv(sock: socket.socket) -> tuple[dict[str, Any], int | None]:
    """One reply line, and the fd that came with it."""
    fds = array.array("i")
    buf = b""
    while not buf.endswith(b"\n"):
        data, anc, _flags, _addr = sock.recvmsg(65536, socket.CMSG_LEN(4 * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
        if not data:
            raise ConnectionError("the holder closed the connection")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        buf += data
    msg = json.loads(buf)
    if not isinstance(msg, dict):
        raise ValueError("a holder reply is a JSON object")
    for extra in fds[1:]:
        os.close(extra)
    return msg, (fds[0] if fds else None)


def connect_holder(spawn: bool = True, timeout: float = 10.0, path: str | None = None) -> socket.socket:
    """A connection to the holder at ``path`` (default :func:`holder_socket`); started when there is none
    (``spawn``)."""
    path = path or holder_socket()
    deadline = time.monotonic() + timeout
    started = False
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(path)
            return s
        except OSError as e:
            s.close()
            if not spawn or time.monotonic() > deadline:
                raise TakeoverError(f"the gfuse holder at {path} is not reachable: {e.strerror or e}") from None
        if not started:
            spawn_holder(path)
            started = True
        time.sleep(0.05)


def spawn_holder(path: str, *, log_file: str | None = None, wrapper: list[str] | None = None,
                 idle_exit: float | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a holder for ``path``, detached from us (its own session: it outlives every mount process and
    whoever started it, also a SIGKILL of that one's process group). ``wrapper`` prefixes the command (e.g.
    ``systemd-run --scope --quiet --collect --`` puts it outside the starter's cgroup, and execs it)."""
    log_file = log_file or os.environ.get("GFUSE_HOLDER_LOG", "/var/log/gfuse/holder.log")
    os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
    cmd = [*(wrapper or []), sys.executable, "-m", "gfuse.holder", "--socket", path]
    if idle_exit is not None:
        cmd += ["--idle-exit", f"{idle_exit:g}"]
    with open(os.devnull, "rb") as devnull, open(log_file, "ab") as out:
        return subprocess.Popen(cmd, stdin=devnull, stdout=out, stderr=out, start_new_session=True, close_fds=True,
                                cwd="/", env=env)


def code_origin() -> dict[str, str]:
    """Which code this process runs, for the holder to start successors from: the interpreter and the directory
    holding this ``gfuse`` package."""
    return {"python": sys.executable, "path": str(Path(__file__).resolve().parent.parent)}


def gfuse_version() -> str:
    """The version this code serves (``GFUSE_VERSION`` overrides it: a build or test names what it deploys)."""
    from . import __version__

    return os.environ.get("GFUSE_VERSION") or __version__


def holder_request(msg: dict[str, Any], fd: int | None = None, timeout: float = 10.0,
                   spawn: bool = False, path: str | None = None) -> tuple[dict[str, Any], int | None]:
    """One request and its reply on a new connection."""
    with connect_holder(spawn=spawn, timeout=timeout, path=path) as s:
        s.settimeout(timeout)
        _send(s, msg, fd)
        return _recv(s)


# ------------------------------------------------------------------------------------------ one serving process

class Restart:
    """The restart side of one serving process: a new restartable mount, or a takeover of one.

    ``mount.MountedVolume`` calls :meth:`fuse_target` for ``pyfuse3.init``, :meth:`start` once libfuse's
    session exists (before the first request is read), :meth:`root_gfid` and :meth:`finish` at the end.
    """

    def __init__(self, mountpoint: str, spec: str, options: str, log_file: str, takeover: bool,
                 standby: bool = False, handover: bool = False) -> None:
        self.mountpoint = mountpoint
        #: handover: a standby that has the holder ask the serving process to leave (an in-place upgrade)
        self.standby = standby or handover
        self.handover = handover
        self.spec = spec
        self.options = options
        self.log_file = log_file
        self.takeover = takeover
        self.dir = state_dir(mountpoint)
        #: the holder this process talks to: the one named in the record for a takeover
        self.holder = holder_socket()
        self.record: MountRecord | None = None
        self._sock: socket.socket | None = None
        self._fd: int | None = None
        self.journal: Journal | None = None
        self.resend = False
        self.restored_files = 0
        self.restored_locks = 0
        self.took = 0.0

    @property
    def mode(self) -> str:
        return "takeover (serving a connection a previous process made)" if self.takeover else "restartable"

    @property
    def held(self) -> bool:
        """Whether the holder has a copy of the FUSE fd now (our connection to it is open)."""
        return self._sock is not None

    # --- before libfuse ------------------------------------------------------------------------------

    def take(self) -> None:
        """Takeover: the held fd from the holder (refused while another process serves the mount). A standby
        only reads the record here: it connects its graph first, then waits in :meth:`wait_turn`."""
        self.record = MountRecord.read(self.mountpoint)
        self.holder = self.record.holder or self.holder
        if not self.standby:
            self._take()

    async def wait_turn(self) -> None:
        """A standby: wait (in a thread, the graph's connections kept alive) until the holder hands the fd."""
        if self.standby and self._fd is None:
            await trio.to_thread.run_sync(self._take)

    def _take(self) -> None:
        try:
            sock = connect_holder(spawn=False, path=self.holder)
        except TakeoverError as e:
            raise TakeoverError(f"cannot take over {self.mountpoint}: {e}") from None
        sock.settimeout(None if self.standby else 10)
        try:
            _send(sock, {"op": "take", "mountpoint": self.mountpoint, "pid": os.getpid(), "wait": self.standby,
                         "handover": self.handover, **code_origin()})
            reply, fd = _recv(sock)
        except (OSError, ValueError) as e:
            sock.close()
            raise TakeoverError(f"cannot take over {self.mountpoint}: the holder: {e}") from None
        if not reply.get("ok") or fd is None:
            sock.close()
            raise TakeoverError(f"cannot take over {self.mountpoint}: {reply.get('error', 'the holder sent no fd')}")
        sock.settimeout(None)
        self._sock, self._fd = sock, fd
        self.took = time.monotonic()

    def fuse_target(self) -> str:
        """What ``pyfuse3.init`` mounts: the mount point, or for a takeover the held fd (libfuse ≥ 3.3 takes
        ``/dev/fd/N`` as an open FUSE device and mounts nothing)."""
        return f"/dev/fd/{self._fd}" if self.takeover else self.mountpoint

    def root_gfid(self, resolved: bytes) -> bytes:
        """The gfid the kernel knows as node 1: the recorded one for a takeover."""
        return self.record.root_gfid if self.takeover and self.record is not None else resolved

    # --- once libfuse's session exists ------------------------------------------------------------------

    async def start(self, ops: Any, switch: Any, nursery: trio.Nursery) -> None:
        """INIT, restored state, fresh journal, resend, and the holder link; before the loop reads a request."""
        from .fuse_lowlevel import pyfuse3_session_fd

        fd = pyfuse3_session_fd()
        if not self.takeover:  # a takeover's is there (gone: the connection ended, and this process fails)
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        journal = Journal(self.dir / "journal", lambda: ((i, r.gfid, r.nlookup) for i, r in list(ops.inodes.items())))
        if not self.takeover:
            init = read_init(fd)
            tmp = self.dir / ".init.tmp"
            tmp.write_bytes(init)
            os.replace(tmp, self.dir / "init")
            process_request(init)
            self.resend = kernel_has_resend(init)
            journal.start()
            MountRecord(self.mountpoint, self.spec, self.options, self.log_file, ops.root_gfid,
                        time.time(), self.holder).write(self.dir)
            if not self.resend:
                log.warning("this kernel has no FUSE_NOTIFY_RESEND (Linux < 6.9): a successor can take over "
                            "the mount, but requests the dying process had read are lost (they hang)")
        else:
            init = (self.dir / "init").read_bytes()
            process_request(init)
            self.resend = kernel_has_resend(init)
            state = parse((self.dir / "journal").read_bytes())
            await self._restore(ops, switch, state)
            journal.start(state)
            journal.retried = state.pending()
        ops.journal = self.journal = journal
        if self.takeover:
            if self.resend:
                notify_resend(fd)
            log.info("took over %s: %d node ids, %d files (%d locks) and %d directories reopened, %s, in %.0f ms",
                     self.mountpoint, len(ops.inodes), self.restored_files, self.restored_locks, len(journal.dirs),
                     "unanswered requests re-queued" if self.resend else "no resend (kernel < 6.9)",
                     (time.monotonic() - self.took) * 1000)
        else:
            sock = connect_holder(spawn=True, path=self.holder)
            sock.settimeout(10)
            _send(sock, {"op": "put", "mountpoint": self.mountpoint, "pid": os.getpid(), "restart": True,
                         **code_origin()}, fd)
            reply, _ = _recv(sock)
            if not reply.get("ok"):
                raise TakeoverError(f"the holder refused {self.mountpoint}: {reply.get('error')}")
            sock.settimeout(None)
            self._sock = sock
        nursery.start_soon(self._link, fd)

    async def _restore(self, ops: Any, switch: Any, state: State) -> None:
        from .fuse import _DirHandle, _Inode

        for ino, (gfid, n) in state.inodes.items():
            if ino != 1:
                ops.inodes[ino] = _Inode(gfid, n)
        switch.reserve_handles(state.max_fh)
        failed: list[str] = []

        async def reopen(fh: int, ino: int, gfid: bytes, flags: int) -> None:
            try:
                await switch.reopen_as(fh, gfid, reopen_flags(flags))
            except OSError as e:
                failed.append(f"{gfid.hex()}: {e}")
                state.files.pop(fh, None)
                return
            try:
                await self._relock(switch, fh, state.locks.get(fh, []))
            except OSError as e:  # another client took a lock meanwhile: this descriptor is lost (as strict-locks)
                failed.append(f"{gfid.hex()}: its POSIX lock could not be taken again ({e})")
                state.files.pop(fh, None)
                state.locks.pop(fh, None)
                await switch.release(fh)
                return
            ops._opened(ino, fh)
            self.restored_files += 1
            self.restored_locks += len(state.locks.get(fh, []))

        async def reopendir(dh: int, d: DirRecord) -> None:
            try:
                r = await switch.opendir(d.gfid)
            except OSError as e:
                failed.append(f"directory {d.gfid.hex()}: {e}")
                return
            ops.dirs[dh] = _DirHandle(r.need_fd(), d.gfid, dict(d.cookies), max(d.cookies, default=1) + 1)

        async with trio.open_nursery() as n:
            for fh, (ino, gfid, flags) in state.files.items():
                n.start_soon(reopen, fh, ino, gfid, flags)
            for dh, d in state.dirs.items():
                n.start_soon(reopendir, dh, d)
        ops._dir_handles = max(ops._dir_handles, state.max_dh)
        for why in failed:
            log.warning("after takeover this handle answers EBADF: %s", why)

    @staticmethod
    async def _relock(switch: Any, fh: int, held: list[tuple[int, int, int, int, int]]) -> None:
        """Take the locks of ``fh`` again, in the order they were granted (non-blocking: one another client
        holds now is an error)."""
        from .cred import now_cred
        from .fops import SETLK, Flock
        from .fuse import lk_owner

        for owner, kind, start, length, pid in held:
            cred = now_cred(Proc.LK, lk_owner=lk_owner(owner))
            await switch.lk(fh, SETLK, Flock(kind, 0, start, length, pid & 0xFFFFFFFF, lk_owner(owner)), cred=cred)

    async def _link(self, fd: int) -> None:
        """Keep the holder connection (its end tells the holder we died); if the holder dies, start another
        and give it our fd again."""
        while True:
            sock = self._sock
            if sock is not None:
                try:
                    tsock = trio.socket.from_stdlib_socket(sock)
                    while await tsock.recv(4096):
                        pass
                except OSError:
                    pass
                self._sock = None
                sock.close()
                log.warning("the gfuse holder went away; handing the mount's fd to a new one")
            await trio.sleep(1.0)
            try:
                s = await trio.to_thread.run_sync(connect_holder, True, 10.0, self.holder)
                s.settimeout(10)
                _send(s, {"op": "put", "mountpoint": self.mountpoint, "pid": os.getpid(), "restart": True,
                          **code_origin()}, fd)
                reply, _ = _recv(s)
                s.settimeout(None)
                if reply.get("ok"):
                    self._sock = s
                else:
                    s.close()
            except (OSError, TakeoverError, ValueError) as e:
                log.warning("the gfuse holder is not reachable: %s", e)

    # --- the end -----------------------------------------------------------------------------------------

    def finish(self, stopping: bool) -> None:
        """``stopping``: the mount ends on purpose (signal or unmount): the holder drops its copy and a takeover
        unmounts (libfuse only unmounts what it mounted). Otherwise leave everything for a successor."""
        if self.journal is not None:
            self.journal.close()
        if not stopping:
            return
        try:
            holder_request({"op": "bye", "mountpoint": self.mountpoint}, timeout=5, path=self.holder)
        except (OSError, ValueError, TakeoverError) as e:
            log.info("telling the holder %s is unmounted: %s", self.mountpoint, e)
        if self.takeover:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.umount2(self.mountpoint.encode(), MNT_DETACH) != 0:
                code = ctypes.get_errno()
                if code != errno.EINVAL:  # EINVAL: no longer mounted (the kernel's unmount ended us)
                    log.warning("unmounting %s: %s", self.mountpoint, os.strerror(code))
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
