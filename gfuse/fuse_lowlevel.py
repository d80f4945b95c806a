"""FUSE requests pyfuse3 has no handler for: POSIX/BSD locks, fallocate, flush's lock owner, and opendir's
cache flags.

pyfuse3 3.x registers no ``getlk``/``setlk``/``flock``/``fallocate`` with libfuse, so the kernel
would keep locks local to one node and refuse fallocate. Without them a database on two nodes
could both "hold" a lock. This module adds them to the libfuse session pyfuse3 created:

* libfuse copies the ``fuse_lowlevel_ops`` table into the session in ``fuse_session_new``, and
  reads the lock slots only when the kernel's INIT request arrives (to ask for
  ``FUSE_CAP_POSIX_LOCKS``/``FUSE_CAP_FLOCK_LOCKS``). So after ``pyfuse3.init()`` and before
  ``pyfuse3.main()`` we write ctypes callbacks into the session's copy of the table.
* The session and pyfuse3's own table are static variables of pyfuse3's extension module; their
  addresses come from its ELF symbol table (pip builds it unstripped) and the copy inside the
  session is found by comparing bytes, never by guessing libfuse's private struct layout. If
  anything does not match exactly, nothing is patched and the mount works as before (locks stay
  node-local, fallocate answers EOPNOTSUPP) with a warning in the log.
* A callback runs inside ``fuse_session_process_buf`` on the trio thread: it copies its
  arguments (they live on libfuse's stack), starts a task in a nursery we own, and returns. The
  task replies exactly once (``fuse_reply_*``), also when cancelled.
* ``flush`` is taken over as well, because only libfuse's flush carries the lock owner: closing
  any descriptor drops the process's POSIX locks, which bricks do when FLUSH carries that owner.
* ``opendir`` is taken over because pyfuse3 answers it with a zeroed ``fuse_file_info`` but the handle:
  the kernel's readdir cache needs ``cache_readdir`` (FOPEN_CACHE_DIR: keep the listing in the directory's
  page cache) and ``keep_cache`` (FOPEN_KEEP_CACHE: do not drop what an earlier open cached) in the reply.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

import trio

log = logging.getLogger(__name__)

# slots of struct fuse_lowlevel_ops (libfuse 3.x keeps this order stable: fields are only appended)
SLOT_LOOKUP, SLOT_FLUSH, SLOT_OPENDIR, SLOT_STATFS, SLOT_GETLK, SLOT_SETLK, SLOT_FLOCK, SLOT_FALLOCATE = \
    2, 17, 20, 24, 31, 32, 39, 40
N_SLOTS = 44
PTR = ctypes.sizeof(ctypes.c_void_p)

LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = 1, 2, 4, 8
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
#: bits of fuse_file_info after ``flags`` (writepage, direct_io, keep_cache, flush, nonseekable,
#: flock_release, cache_readdir, noflush: libfuse 3's fuse_common.h, little-endian bit fields)
FI_KEEP_CACHE, FI_CACHE_READDIR = 1 << 2, 1 << 6


class FileInfo(ctypes.Structure):
    """struct fuse_file_info (libfuse 3): flags, fh and lock_owner are read; bits and fh written for opendir."""
    _fields_ = [("flags", ctypes.c_int), ("bits", ctypes.c_uint), ("padding2", ctypes.c_uint),
                ("fh", ctypes.c_uint64), ("lock_owner", ctypes.c_uint64), ("poll_events", ctypes.c_uint32)]


class CFlock(ctypes.Structure):
    """struct flock of the C library (x86-64/aarch64 layout)."""
    _fields_ = [("l_type", ctypes.c_short), ("l_whence", ctypes.c_short), ("l_start", ctypes.c_int64),
                ("l_len", ctypes.c_int64), ("l_pid", ctypes.c_int32)]


class CStatvfs(ctypes.Structure):
    """struct statvfs of the C library (64-bit Linux: every count an unsigned long)."""
    _fields_ = [(name, ctypes.c_ulong) for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                     "f_files", "f_ffree", "f_favail", "f_fsid", "f_flag",
                                                     "f_namemax")] + [("spare", ctypes.c_int * 6)]


class FuseCtx(ctypes.Structure):
    _fields_ = [("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("pid", ctypes.c_int32),
                ("umask", ctypes.c_uint32)]


REQ, INO = ctypes.c_void_p, ctypes.c_uint64
GETLK = ctypes.CFUNCTYPE(None, REQ, INO, ctypes.POINTER(FileInfo), ctypes.POINTER(CFlock))
SETLK = ctypes.CFUNCTYPE(None, REQ, INO, ctypes.POINTER(FileInfo), ctypes.POINTER(CFlock), ctypes.c_int)
FLOCK = ctypes.CFUNCTYPE(None, REQ, INO, ctypes.POINTER(FileInfo), ctypes.c_int)
FALLOCATE = ctypes.CFUNCTYPE(None, REQ, INO, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(FileInfo))
FLUSH = ctypes.CFUNCTYPE(None, REQ, INO, ctypes.POINTER(FileInfo))
OPENDIR = ctypes.CFUNCTYPE(None, REQ, INO, ctypes.POINTER(FileInfo))
STATFS = ctypes.CFUNCTYPE(None, REQ, INO)
INTERRUPT = ctypes.CFUNCTYPE(None, REQ, ctypes.c_void_p)


@dataclass(frozen=True)
class Lock:
    """A byte-range lock as FUSE gives it: len 0 means to the end of the file."""
    type: int
    start: int
    len: int
    pid: int


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    pid: int


class LockOps(Protocol):
    """What the bridge implements for these requests (errors as OSError(errno))."""

    async def getlk(self, fh: int, owner: int, lock: Lock, caller: Caller) -> Lock: ...

    async def setlk(self, fh: int, owner: int, lock: Lock, wait: bool, caller: Caller) -> None: ...

    async def fallocate(self, fh: int, mode: int, offset: int, length: int, caller: Caller) -> None: ...

    async def flush(self, fh: int, lock_owner: int | None = None) -> None: ...

    async def opendir_ll(self, inode: int, caller: Caller) -> tuple[int, bool, bool]:
        """(handle, cache_readdir, keep_cache) for an OPENDIR."""
        ...

    async def releasedir(self, fh: int) -> None: ...

    async def statfs_of(self, inode: int) -> Any:
        """statfs of the file system as seen from ``inode`` (an object with pyfuse3.StatvfsData's fields)."""
        ...


class Unsupported(Exception):
    """This pyfuse3/libfuse build cannot be extended (the reason is the message)."""


# ---------------------------------------------------------------------------------------- ELF symbols

def elf_symbols(path: str, wanted: set[str]) -> dict[str, int]:
    """``st_value`` of the named symbols from the ELF .symtab (static ones included)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"\x7fELF" or m[4] != 2 or m[5] != 1:
            raise Unsupported(f"{path}: not a 64-bit little-endian ELF file")
        shoff, = struct.unpack_from("<Q", m, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", m, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", m, shoff + i * shentsize) for i in range(shnum)]
        found: dict[str, int] = {}
        for sh in sections:
            if sh[1] != 2:  # SHT_SYMTAB
                continue
            strtab = sections[sh[6]]
            str_off = strtab[4]
            off, size, entsize = sh[4], sh[5], sh[9] or 24
            for pos in range(off, off + size, entsize):
                name_off, _info, _other, _shndx, value, _size = struct.unpack_from("<IBBHQQ", m, pos)
                end = m.find(b"\0", str_off + name_off)
                name = m[str_off + name_off:end].decode("ascii", "replace")
                if name in wanted:
                    found[name] = value
        missing = wanted - found.keys()
        if missing:
            raise Unsupported(f"{path} has no symbol table entries for {', '.join(sorted(missing))} (stripped?)")
        return found


def _pyfuse3_addresses() -> tuple[int, int, int]:
    """Absolute addresses of pyfuse3's ``session`` pointer, its ops table, and its lookup handler."""
    import pyfuse3
    path = str(Path(pyfuse3.__file__).resolve())
    names = {"PyInit_pyfuse3", "__pyx_v_7pyfuse3_session", "__pyx_v_7pyfuse3_fuse_ops",
             "__pyx_f_7pyfuse3_fuse_lookup"}
    sym = elf_symbols(path, names)
    lib = ctypes.CDLL(path)
    init = ctypes.cast(lib.PyInit_pyfuse3, ctypes.c_void_p).value
    assert init is not None, "a symbol of a loaded library has an address"
    base = init - sym["PyInit_pyfuse3"]
    return (base + sym["__pyx_v_7pyfuse3_session"], base + sym["__pyx_v_7pyfuse3_fuse_ops"],
            base + sym["__pyx_f_7pyfuse3_fuse_lookup"])


def pyfuse3_session() -> int:
    """The ``struct fuse_session *`` pyfuse3.init() made (for gfuse.takeover: INIT is fed to it by hand)."""
    session = ctypes.c_void_p.from_address(_pyfuse3_addresses()[0]).value
    if not session:
        raise Unsupported("pyfuse3.init() has not been called")
    return session


def pyfuse3_session_fd() -> int:
    """The session's /dev/fuse fd (libfuse's public ``fuse_session_fd``)."""
    lib = libfuse()
    lib.fuse_session_fd.argtypes = [ctypes.c_void_p]
    lib.fuse_session_fd.restype = ctypes.c_int
    fd: int = lib.fuse_session_fd(pyfuse3_session())
    return fd


def session_ops_table() -> int:
    """Address of the ``fuse_lowlevel_ops`` copy inside pyfuse3's live libfuse session."""
    session_var, ops_addr, lookup_fn = _pyfuse3_addresses()
    table = (ctypes.c_void_p * N_SLOTS).from_address(ops_addr)
    if table[SLOT_LOOKUP] != lookup_fn:
        raise Unsupported("pyfuse3's operation table does not have the expected layout")
    session = ctypes.c_void_p.from_address(session_var).value
    if not session:
        raise Unsupported("pyfuse3.init() has not been called")
    want = ctypes.string_at(ops_addr, N_SLOTS * PTR)
    for off in range(0, 512, PTR):
        if ctypes.string_at(session + off, len(want)) == want:
            return session + off
    raise Unsupported("the libfuse session does not hold a copy of pyfuse3's operation table")


# ---------------------------------------------------------------------------------------- the handlers

_libfuse: ctypes.CDLL | None = None


def libfuse() -> ctypes.CDLL:
    global _libfuse
    if _libfuse is None:
        lib = ctypes.CDLL("libfuse3.so.3")
        lib.fuse_reply_err.argtypes = [REQ, ctypes.c_int]
        lib.fuse_reply_lock.argtypes = [REQ, ctypes.POINTER(CFlock)]
        lib.fuse_reply_open.argtypes = [REQ, ctypes.POINTER(FileInfo)]
        lib.fuse_reply_statfs.argtypes = [REQ, ctypes.POINTER(CStatvfs)]
        lib.fuse_req_ctx.argtypes = [REQ]
        lib.fuse_req_ctx.restype = ctypes.POINTER(FuseCtx)
        lib.fuse_req_interrupt_func.argtypes = [REQ, INTERRUPT, ctypes.c_void_p]
        _libfuse = lib
    return _libfuse


def _errno_of(e: BaseException) -> int:
    code = getattr(e, "errno", None)
    return code if isinstance(code, int) and code > 0 else errno.EIO


class LowLevelHandlers:
    """Owns the ctypes callbacks and the tasks answering them; ``run`` must outlive pyfuse3.main."""

    def __init__(self, ops: LockOps) -> None:
        self.ops = ops
        self._nursery: trio.Nursery | None = None
        self._interrupts: dict[int, Callable[[], None]] = {}
        #: per (fh, lock owner) with blocking requests in flight: (lock requests since, how many wait)
        self._lock_gen: dict[tuple[int, int], tuple[int, int]] = {}
        self._next_id = 0
        # keep the CFUNCTYPE objects alive as long as libfuse may call them (the whole process)
        g = self._guarded
        self._callbacks = {
            SLOT_GETLK: GETLK(g(self._getlk)), SLOT_SETLK: SETLK(g(self._setlk)), SLOT_FLOCK: FLOCK(g(self._flock)),
            SLOT_FALLOCATE: FALLOCATE(g(self._fallocate)), SLOT_FLUSH: FLUSH(g(self._flush)),
            SLOT_OPENDIR: OPENDIR(g(self._opendir)), SLOT_STATFS: STATFS(g(self._statfs)),
        }
        self._on_interrupt = INTERRUPT(self._interrupted)
        _keep_alive.append(self)

    def install(self) -> bool:
        """Patch the live session (call between pyfuse3.init and pyfuse3.main); False if not possible."""
        try:
            lib = libfuse()
            addr = session_ops_table()
        except (Unsupported, OSError, AttributeError) as e:
            log.warning("POSIX/BSD locks stay local to this node and fallocate is unsupported: %s", e)
            return False
        table = (ctypes.c_void_p * N_SLOTS).from_address(addr)
        for slot in (SLOT_GETLK, SLOT_SETLK, SLOT_FLOCK, SLOT_FALLOCATE):
            if table[slot]:
                log.warning("libfuse slot %d is already taken; not extending the session", slot)
                return False
        for slot, cb in self._callbacks.items():
            table[slot] = ctypes.cast(cb, ctypes.c_void_p).value
        self._lib = lib
        log.debug("FUSE lock, flock, fallocate, flush, opendir and statfs handlers installed")
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the request tasks; when cancelled they answer EINTR before the session goes away."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    # --- plumbing -------------------------------------------------------------------------------

    def _guarded(self, fn: Callable[..., None]) -> Callable[..., None]:
        """An exception escaping a ctypes callback is only printed: answer the request instead."""
        def call(req: int, *args: Any) -> None:
            try:
                fn(req, *args)
            except BaseException:
                log.exception("FUSE %s handler failed", fn.__name__.strip("_"))
                self._lib.fuse_reply_err(req, errno.EIO)
        call.__name__ = fn.__name__
        return call

    def _caller(self, req: int) -> Caller:
        c = self._lib.fuse_req_ctx(req).contents
        return Caller(c.uid, c.gid, c.pid)

    def _spawn(self, req: int, name: str, work: Callable[[], Awaitable[Any]],
               reply: Callable[[Any], int] | None = None, on_interrupt: Callable[[], None] | None = None) -> None:
        """Start ``work`` for ``req``; exactly one reply follows (``reply(result)`` or an error)."""
        if self._nursery is None:
            self._lib.fuse_reply_err(req, errno.ENOTCONN)
            return
        self._nursery.start_soon(self._answer, req, name, work, reply, on_interrupt, name=f"fuse-{name}")

    async def _answer(self, req: int, name: str, work: Callable[[], Awaitable[Any]],
                      reply: Callable[[Any], int] | None, on_interrupt: Callable[[], None] | None) -> None:
        replied = False

        def answer_err(code: int) -> None:
            nonlocal replied
            if not replied:
                replied = True
                self._lib.fuse_reply_err(req, code)

        rid = 0
        if on_interrupt is not None:
            self._next_id += 1
            rid = self._next_id

            def interrupted() -> None:
                answer_err(errno.EINTR)
                on_interrupt()
            self._interrupts[rid] = interrupted
            self._lib.fuse_req_interrupt_func(req, self._on_interrupt, rid)
        try:
            result = await work()
        except trio.Cancelled:
            answer_err(errno.EINTR)
            raise
        except Exception as e:
            if not isinstance(e, OSError) and not hasattr(e, "errno"):
                log.exception("%s failed unexpectedly", name)
            elif _errno_of(e) not in (errno.EAGAIN, errno.EINTR, errno.EBADF, errno.EOPNOTSUPP, errno.ENOENT,
                                      errno.EACCES, errno.EPERM, errno.ESTALE, errno.ENOTDIR):
                log.warning("%s: %s", name, e)
            answer_err(_errno_of(e))
        else:
            if not replied:
                replied = True
                if reply is None:
                    self._lib.fuse_reply_err(req, 0)
                else:
                    reply(result)
        finally:
            self._interrupts.pop(rid, None)

    def _interrupted(self, req: int, data: int | None) -> None:
        cb = self._interrupts.pop(data or 0, None)
        if cb is not None:
            cb()

    # --- callbacks (run synchronously inside libfuse: copy everything, return at once) -----------------

    def _getlk(self, req: int, ino: int, fi: Any, lock: Any) -> None:
        fh, owner = fi.contents.fh, fi.contents.lock_owner
        lk = lock.contents
        want = Lock(lk.l_type, lk.l_start, lk.l_len, lk.l_pid)
        caller = self._caller(req)

        def reply(found: Lock) -> int:
            out = CFlock(found.type, 0, found.start, found.len, found.pid)
            rc: int = self._lib.fuse_reply_lock(req, ctypes.byref(out))
            return rc
        self._spawn(req, "getlk", lambda: self.ops.getlk(fh, owner, want, caller), reply)

    def _setlk(self, req: int, ino: int, fi: Any, lock: Any, sleep: int) -> None:
        fh, owner = fi.contents.fh, fi.contents.lock_owner
        lk = lock.contents
        self._set(req, "setlk", fh, owner, Lock(lk.l_type, lk.l_start, lk.l_len, lk.l_pid), bool(sleep))

    def _flock(self, req: int, ino: int, fi: Any, op: int) -> None:
        fh, owner = fi.contents.fh, fi.contents.lock_owner
        kind = {LOCK_SH: F_RDLCK, LOCK_EX: F_WRLCK, LOCK_UN: F_UNLCK}.get(op & ~LOCK_NB)
        if kind is None:
            self._lib.fuse_reply_err(req, errno.EINVAL)
            return
        caller = self._caller(req)
        self._set(req, "flock", fh, owner, Lock(kind, 0, 0, caller.pid), not (op & LOCK_NB), caller)

    def _set(self, req: int, name: str, fh: int, owner: int, lock: Lock, wait: bool,
             caller: Caller | None = None) -> None:
        caller = caller or self._caller(req)
        if (fh, owner) in self._lock_gen and lock.type != F_UNLCK:
            gen, waiting = self._lock_gen[(fh, owner)]
            self._lock_gen[(fh, owner)] = (gen + 1, waiting)
        if not wait:
            self._spawn(req, name, lambda: self.ops.setlk(fh, owner, lock, False, caller))
            return
        # A blocking lock the caller gave up on (signal → FUSE INTERRUPT) is answered EINTR at once; the
        # brick request goes on, and whatever it is granted later is given back (see abandon_lock).
        abandoned = trio.Event()
        self._spawn(req, name, lambda: self._wait_lock(fh, owner, lock, caller, abandoned),
                    on_interrupt=abandoned.set)

    async def _wait_lock(self, fh: int, owner: int, lock: Lock, caller: Caller, abandoned: trio.Event) -> None:
        key = (fh, owner)
        gen, waiting = self._lock_gen.get(key, (0, 0))
        self._lock_gen[key] = (gen, waiting + 1)
        try:
            await self.ops.setlk(fh, owner, lock, True, caller)
        finally:
            now, waiting = self._lock_gen[key]
            if waiting > 1:
                self._lock_gen[key] = (now, waiting - 1)
            else:
                del self._lock_gen[key]
        # Granted after the caller gave up: give it back, unless the same owner asked again since
        # (same-owner locks merge on the brick, so unlocking would drop the lock it holds now).
        if abandoned.is_set() and now == gen:
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                try:
                    await self.ops.setlk(fh, owner, Lock(F_UNLCK, lock.start, lock.len, lock.pid), False, caller)
                except Exception as e:  # noqa: BLE001 - best effort, in a shielded clean-up
                    log.warning("giving back an abandoned lock failed: %s", e)

    def _statfs(self, req: int, ino: int) -> None:
        """pyfuse3's statfs is not told the inode; the kernel sends the one df was pointed at. A bind mount of a
        subdirectory (the node agent's pooled PVs) then shows that subdirectory's quota (quota-deem-statfs), as
        a mount of the subdirectory itself does."""
        def reply(st: Any) -> int:
            out = CStatvfs(st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree,
                           st.f_favail, 0, 0, st.f_namemax)
            rc: int = self._lib.fuse_reply_statfs(req, ctypes.byref(out))
            return rc
        self._spawn(req, "statfs", lambda: self.ops.statfs_of(ino), reply)

    def _fallocate(self, req: int, ino: int, mode: int, offset: int, length: int, fi: Any) -> None:
        fh = fi.contents.fh
        caller = self._caller(req)
        self._spawn(req, "fallocate", lambda: self.ops.fallocate(fh, mode, offset, length, caller))

    def _flush(self, req: int, ino: int, fi: Any) -> None:
        fh, owner = fi.contents.fh, fi.contents.lock_owner
        self._spawn(req, "flush", lambda: self.ops.flush(fh, owner))

    def _opendir(self, req: int, ino: int, fi: Any) -> None:
        flags = fi.contents.flags
        caller = self._caller(req)

        def reply(answer: tuple[int, bool, bool]) -> int:
            fh, cache, keep = answer
            out = FileInfo(flags=flags, bits=(FI_CACHE_READDIR if cache else 0) | (FI_KEEP_CACHE if keep else 0),
                           fh=fh)
            rc: int = self._lib.fuse_reply_open(req, ctypes.byref(out))
            if rc != 0 and self._nursery is not None:  # the caller is gone: no RELEASEDIR will come for it
                self._nursery.start_soon(self.ops.releasedir, fh)
            return rc
        self._spawn(req, "opendir", lambda: self.ops.opendir_ll(ino, caller), reply)


_keep_alive: list[LowLevelHandlers] = []
