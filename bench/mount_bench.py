#!/usr/bin/env python3
"""Mount benchmark: gfuse against the native glusterfs FUSE client, on the same volume, in one run.

Both clients mount the same volume at the same time; every workload runs once per client, the
two alternating (native first for the 1st, 3rd, ... workload, gfuse first for the others), each
in its own directory. Per workload and client it measures:

* throughput: MiB/s (sequential 1 MiB I/O) or operations/s (4 KiB random I/O, metadata);
* client CPU per operation: utime+stime of the serving process (gfuse's daemon, the native
  ``glusterfs`` process) from /proc/PID/stat before/after, divided by the user operations;
* brick CPU per operation: the same for the volume's glusterfsd processes (local bricks only);
* brick fops per operation: ``gluster volume profile VOL info incremental`` around the workload,
  summed over bricks, per fop type, divided by the user operations.

Workloads (defaults; ``--quick`` shrinks them about 10x):

* seq-write  1 GiB in 1 MiB write() calls, fsync before close (in the timing)      MiB/s
* seq-read   the same file after ``echo 3 > /proc/sys/vm/drop_caches``, verified  MiB/s
* rand-read  4 KiB pread at random aligned offsets of a 256 MiB file, 20 s        ops/s
* rand-write 4 KiB pwrite the same way, fsync at the end (in the timing), 20 s    ops/s
  (O_DIRECT if the mount accepts it, else buffered after drop_caches: the output says which)
* create     10,000 files of 1 KiB (open O_CREAT|O_EXCL, write, close)            files/s
* stat       stat() of each, after drop_caches                                    files/s
* stat-warm  the same again 2 s after that client's stat pass ended (no drop_caches:
             past the kernel's 1 s attribute timeout, so its own caches are measured) files/s
* ls-l       os.scandir() + lstat() of each entry, after drop_caches              entries/s
* ls-l-warm  the same again 2 s after that client's ls-l pass ended               entries/s
* unlink     unlink() of each, after drop_caches                                  files/s

Rerun:
    python3 bench/mount_bench.py --quick                   # ~3 minute smoke run on a throwaway replica-3 volume
    python3 bench/mount_bench.py                           # full sizes (replica3; ~20-25 min on 2 cores)
    python3 bench/mount_bench.py --files 5000              # the run in bench/README.md (~15 min)
    python3 bench/mount_bench.py --kind distrep            # 2 x 3 distributed-replicate
    python3 bench/mount_bench.py --volume 127.0.0.2:/VOL   # an existing volume (left in place)

Needs root (mounts, drop_caches, gluster CLI). Progress goes to stderr, the report (Markdown) to
stdout. A throwaway volume is deleted at the end, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import json
import mmap
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testkit import cluster as tc  # noqa: E402 (after the sys.path line)

MiB = 1 << 20
BLOCK = 4096
CLIENTS = ("native", "gfuse")
WORKLOADS = ("seq-write", "seq-read", "rand-read", "rand-write", "create", "stat", "stat-warm", "ls-l", "ls-l-warm",
             "unlink")
#: a warm pass starts this long after the end of the same client's cold pass
WARM_DELAY = 2.0
FULL = {"seq_mib": 1024, "rand_mib": 256, "rand_seconds": 20.0, "files": 10_000, "timeout": 1800.0}
QUICK = {"seq_mib": 128, "rand_mib": 32, "rand_seconds": 2.0, "files": 1000, "timeout": 300.0}
T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- helpers


def cpu_seconds(pid: int | None) -> float | None:
    """utime+stime of a whole process (all its threads) in seconds, None if it is gone."""
    if not pid:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")  # fields 14, 15


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rfind(")") + 2:][:1] not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def native_client_pid(mountpoint: Path) -> int | None:
    """The glusterfs process serving ``mountpoint`` (its cmdline ends with the mount point)."""
    mp = str(mountpoint)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = cmdline(int(entry.name))
        if argv and os.path.basename(argv[0]) == "glusterfs" and mp in argv:
            return int(entry.name)
    return None


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    time.sleep(0.5)  # let the FORGETs the eviction queued reach the clients before we measure


def pattern_block(base: bytes | bytearray, index: int) -> bytearray:
    """``base`` (a multiple of 4 KiB) with each 4 KiB block starting with its global block index."""
    buf = bytearray(base)
    first = index * (len(base) // BLOCK)
    for k in range(len(base) // BLOCK):
        buf[k * BLOCK:k * BLOCK + 8] = (first + k).to_bytes(8, "little")
    return buf


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        if n <= 0:
            raise OSError(errno.EIO, f"write() returned {n}")
        mv = mv[n:]


def read_full(fd: int, buf: bytearray) -> int:
    """Fill ``buf`` from ``fd``; fewer bytes only at EOF."""
    mv = memoryview(buf)
    got = 0
    while got < len(buf):
        n = os.readv(fd, [mv[got:]])
        if n == 0:
            break
        got += n
    return got


def short_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f" on {exc.filename}" if exc.filename else ""
        return f"{type(exc).__name__} [{name}] {exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


class DataMismatch(Exception):
    pass


class Interrupted(Exception):
    """Ctrl-C/SIGTERM: the workload stops after the operation in flight."""


# ------------------------------------------------------------------------------------ the volume


#: gluster's upcall counters by index (gf_upcall_list, libglusterfs/src/globals.c) ...
UPCALL_NAMES = ("NULL", "UPCALL", "CI_IATT", "CI_XATTR", "CI_RENAME", "CI_UNLINK", "CI_FORGET", "LEASE_RECALL")
#: ... which the CLI's XML output names with the fop list instead (cli-xml-output.c writes
#: ``gf_fop_list[i]`` for upcall i): 1 UPCALL shows as STAT, 2 CI_IATT as READLINK, and so on
FOP_NAMES_OF_UPCALLS = ("NULL", "STAT", "READLINK", "MKNOD", "MKDIR", "UNLINK", "RMDIR", "SYMLINK")


def profile_counts(root: ET.Element) -> tuple[dict[str, int], dict[str, int], int, int]:
    """({FOP: hits}, {UPCALL: sent}, bytes read, bytes written) of the interval of a profile's XML.

    Each brick's ``<fopStats>`` lists the fops in fop order, then the upcall notifications the brick
    sent to *other* clients (cache invalidations), misnamed after the fops of the same index and with
    all latencies 0 (the text output names them right). A real STAT..SYMLINK always has a latency, so
    the first zero-latency entry of those names starts the upcalls; they are not fops the client made.
    """
    fops: dict[str, int] = {}
    upcalls: dict[str, int] = {}
    rd = wr = 0
    for brick in root.iter("brick"):
        st = brick.find("intervalStats")
        if st is None:
            continue
        in_upcalls = False
        for fop in st.iter("fop"):
            name = fop.findtext("name") or "?"
            hits = int(float(fop.findtext("hits") or 0))
            lat = [float(fop.findtext(k) or 0) for k in ("avgLatency", "minLatency", "maxLatency")]
            if not in_upcalls and name in FOP_NAMES_OF_UPCALLS[1:] and not any(lat):
                in_upcalls = True
            if in_upcalls:
                i = FOP_NAMES_OF_UPCALLS.index(name) if name in FOP_NAMES_OF_UPCALLS else -1
                name = UPCALL_NAMES[i] if i >= 0 else f"upcall {name}"
                upcalls[name] = upcalls.get(name, 0) + hits
            else:
                fops[name] = fops.get(name, 0) + hits
        rd += int(float(st.findtext("totalRead") or 0))
        wr += int(float(st.findtext("totalWrite") or 0))
    return fops, upcalls, rd, wr


@dataclass
class Target:
    """The volume under test: a throwaway one we made, or an existing one."""

    server: str
    name: str
    kind: str
    volume: tc.Volume | None = None  # set when we made it (and must delete it)
    profile_started_here: bool = False
    profile_error: str | None = None

    @property
    def mount_arg(self) -> tc.Volume | str:
        return self.volume if self.volume is not None else self.name

    def brick_pids(self) -> tuple[list[int], str | None]:
        """(pids of local glusterfsd bricks, why brick CPU is not available or None)."""
        try:
            root = tc.gluster_xml("volume", "status", self.name, timeout=30)
        except tc.GlusterError as e:
            return [], f"volume status failed: {str(e).splitlines()[0]}"
        pids, remote = [], 0
        for node in root.iter("node"):
            path = node.findtext("path") or ""
            if not path.startswith("/"):
                continue
            pid = int(node.findtext("pid") or 0)
            if pid > 0 and "glusterfsd" in " ".join(cmdline(pid)[:1]) and path in cmdline(pid):
                pids.append(pid)
            else:
                remote += 1
        return pids, (f"{remote} brick(s) not local" if remote else None)

    def profile(self) -> tuple[dict[str, int], dict[str, int], int, int] | None:
        """Since the last call, summed over bricks: ({FOP: hits}, {UPCALL: sent}, bytes read, bytes written)."""
        if self.profile_error:
            return None
        try:
            root = tc.gluster_xml("volume", "profile", self.name, "info", "incremental", timeout=60)
        except tc.GlusterError as e:
            self.profile_error = str(e).splitlines()[0]
            return None
        return profile_counts(root)

    def start_profile(self) -> None:
        try:
            tc.gluster("volume", "profile", self.name, "start", timeout=60)
            self.profile_started_here = True
        except tc.GlusterError as e:
            if "already started" not in (e.output or "").lower():
                self.profile_error = f"profile start failed: {(e.output or str(e)).strip().splitlines()[-1]}"
        if not self.profile_error:
            self.profile()  # start the first interval now

    def stop_profile(self) -> None:
        if self.profile_started_here and self.volume is None:
            with contextlib.suppress(tc.GlusterError):
                tc.gluster("volume", "profile", self.name, "stop", timeout=60)

    def client_graph(self) -> list[str]:
        """Performance translators in the native client's volfile (what the native mount caches)."""
        for name in (f"{self.name}.tcp-fuse.vol", f"trusted-{self.name}.tcp-fuse.vol"):
            p = Path("/var/lib/glusterd/vols", self.name, name)
            if p.is_file():
                return [line.split()[1].split("/", 1)[1] for line in p.read_text().splitlines()
                        if line.strip().startswith("type performance/")]
        return []


# ----------------------------------------------------------------------------------- the clients


@dataclass
class Client:
    name: str  # "native" | "gfuse"
    target: Target
    options: list[str]
    dirname: str
    mount: tc.NativeMount | None = None
    pid: int | None = None
    remounts: int = 0
    odirect: bool | None = None
    odirect_note: str = ""

    @property
    def path(self) -> Path:
        assert self.mount is not None
        return self.mount.path / self.dirname

    def do_mount(self) -> None:
        cls = tc.GfuseMount if self.name == "gfuse" else tc.NativeMount
        m = cls(self.target.mount_arg, server=self.target.server, options=self.options, timeout=120)
        progress(f"mounting {self.name} ({m.source})")
        m.mount()
        self.mount = m
        self.pid = m.pid if self.name == "gfuse" else native_client_pid(m.path)
        if not pid_alive(self.pid):
            raise RuntimeError(f"{self.name}: could not find the serving process of {m.path}")
        os.stat(m.path)
        progress(f"  {self.name} on {m.path}, serving pid {self.pid}")

    def healthy(self) -> bool:
        return self.mount is not None and pid_alive(self.pid) and tc.is_mounted(self.mount.path)

    def remount(self) -> None:
        progress(f"{self.name}: the mount is gone (serving pid {self.pid} dead?); remounting")
        self.unmount()
        self.remounts += 1
        self.do_mount()

    def unmount(self) -> None:
        if self.mount is not None:
            with contextlib.suppress(Exception):
                self.mount.unmount()
        self.mount = None

    def kill(self) -> None:
        """Watchdog: a workload hangs. Kill our serving process; pending calls fail ENOTCONN."""
        if pid_alive(self.pid) and self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------- measurements


@dataclass
class Result:
    client: str
    workload: str
    ops: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    cpu: float | None = None
    brick_cpu: float | None = None
    fops: dict[str, int] | None = None
    #: cache-invalidation notifications the bricks sent to other clients during the workload
    upcalls: dict[str, int] | None = None
    brick_read: int = 0
    brick_written: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def rate(self) -> float | None:
        if self.error or self.seconds <= 0:
            return None
        if self.workload.startswith("seq-"):
            return self.nbytes / MiB / self.seconds
        return self.ops / self.seconds

    def per_op(self, x: float | None) -> float | None:
        if self.error or x is None or self.ops <= 0:
            return None
        return x / self.ops


@dataclass
class Config:
    seq_mib: int
    rand_mib: int
    rand_seconds: float
    rand_ops: int
    files: int
    file_size: int
    timeout: float
    seed: int


class Bench:
    def __init__(self, cfg: Config, target: Target, clients: dict[str, Client]) -> None:
        self.cfg = cfg
        self.target = target
        self.clients = clients
        self.native = clients["native"]
        self.results: dict[tuple[str, str], Result] = {}
        self.brick_pids, self.brick_cpu_note = target.brick_pids()
        self.base = os.urandom(MiB)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        #: (client, workload) → when its run ended (for the warm passes)
        self.ended: dict[tuple[str, str], float] = {}
        self.cache_lines: list[str] = []

    def check(self) -> None:
        if self.stop.is_set():
            raise Interrupted("interrupted")

    # -- one measured run ----------------------------------------------------------------
    def measure(self, c: Client, workload: str, fn: Callable[[Client, Result], None],
                prepare: Callable[[Client, Result], None] | None = None) -> Result:
        r = Result(c.name, workload)
        self.results[(c.name, workload)] = r
        try:
            if not c.healthy():
                c.remount()
                r.notes.append("remounted first (the previous mount had died)")
        except Exception as e:  # noqa: BLE001
            r.error = f"FAILED: could not (re)mount: {short_error(e)}"
            progress(f"{workload} {c.name}: {r.error}")
            return r
        try:
            if prepare:
                prepare(c, r)
        except Exception as e:  # noqa: BLE001
            r.error = f"FAILED in preparation: {short_error(e)}"
            progress(f"{workload} {c.name}: {r.error}")
            return r
        progress(f"{workload} {c.name}: running")
        timed_out = threading.Event()

        def watchdog() -> None:
            timed_out.set()
            progress(f"{workload} {c.name}: no end after {self.cfg.timeout:.0f}s, killing pid {c.pid}")
            c.kill()

        self.target.profile()  # ends the interval: what follows is this workload's
        b0 = [cpu_seconds(p) for p in self.brick_pids]
        c0 = cpu_seconds(c.pid)
        timer = threading.Timer(self.cfg.timeout, watchdog)
        timer.daemon = True
        timer.start()
        t0 = time.perf_counter()
        try:
            fn(c, r)
        except Interrupted:
            r.error = "interrupted"
            raise
        except Exception as e:  # noqa: BLE001
            r.error = "FAILED: " + short_error(e)
            if timed_out.is_set():
                r.error = f"FAILED: no end after {self.cfg.timeout:.0f}s (serving process killed; {short_error(e)})"
            elif not pid_alive(c.pid):
                r.error += f" (the serving process {c.pid} is gone)"
        finally:
            timer.cancel()
        r.seconds = time.perf_counter() - t0
        self.ended[(c.name, workload)] = time.monotonic()
        if r.error and c.mount is not None:
            r.error = r.error.replace(str(c.path) + "/", f"{c.name}:").replace(str(c.path), f"{c.name}:.")
        c1 = cpu_seconds(c.pid)
        b1 = [cpu_seconds(p) for p in self.brick_pids]
        prof = self.target.profile()
        if c0 is not None and c1 is not None:
            r.cpu = c1 - c0
        if self.brick_pids and not self.brick_cpu_note and None not in b0 + b1:
            r.brick_cpu = sum(b1) - sum(b0)  # type: ignore[arg-type]
        if prof is not None:
            r.fops, r.upcalls, r.brick_read, r.brick_written = prof
        if r.error:
            progress(f"{workload} {c.name}: {r.error}")
        else:
            rate = r.rate()
            unit = "MiB/s" if workload.startswith("seq-") else "ops/s"
            progress(f"{workload} {c.name}: {r.ops} ops in {r.seconds:.2f}s = {rate:.1f} {unit}")
        return r

    def ok(self, client: str, workload: str) -> bool:
        r = self.results.get((client, workload))
        return r is not None and r.error is None

    # -- workloads ----------------------------------------------------------------------
    def seq_file(self, c: Client) -> Path:
        return c.path / "seq.dat"

    def w_seq_write(self, c: Client, r: Result) -> None:
        fd = os.open(self.seq_file(c), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i in range(self.cfg.seq_mib):
                self.check()
                write_all(fd, pattern_block(self.base, i))
                r.ops += 1
                r.nbytes += MiB
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_seq_via_native(self, c: Client, r: Result) -> None:
        if self.ok(c.name, "seq-write"):
            return
        r.notes.append("file written through the native mount (seq-write failed for this client)")
        path = self.native.mount.path / c.dirname / "seq.dat"  # type: ignore[union-attr]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i in range(self.cfg.seq_mib):
                write_all(fd, pattern_block(self.base, i))
            os.fsync(fd)
        finally:
            os.close(fd)

    def p_seq_read(self, c: Client, r: Result) -> None:
        self._write_seq_via_native(c, r)
        drop_caches()

    def w_seq_read(self, c: Client, r: Result) -> None:
        fd = os.open(self.seq_file(c), os.O_RDONLY)
        buf = bytearray(MiB)
        try:
            while True:
                self.check()
                n = read_full(fd, buf)
                if n == 0:
                    break
                r.ops += 1
                r.nbytes += n
                i = r.ops - 1
                if n != MiB or buf != pattern_block(self.base, i):
                    raise DataMismatch(f"MiB {i} of {c.name}/seq.dat differs from what was written "
                                       f"({n} bytes read)")
        finally:
            os.close(fd)
        if r.nbytes != self.cfg.seq_mib * MiB:
            raise DataMismatch(f"read {r.nbytes} bytes, wrote {self.cfg.seq_mib * MiB}")

    def rand_file(self, c: Client) -> Path:
        return c.path / "rand.dat"

    def p_rand_file(self, c: Client, r: Result) -> None:
        """Write the random-I/O file through the NATIVE mount (same bytes for both clients), once."""
        path = self.native.mount.path / c.dirname / "rand.dat"  # type: ignore[union-attr]
        size = self.cfg.rand_mib * MiB
        if not (path.exists() and path.stat().st_size == size):
            progress(f"  writing {self.cfg.rand_mib} MiB {c.name}/rand.dat through the native mount (not timed)")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for i in range(self.cfg.rand_mib):
                    write_all(fd, pattern_block(self.base, i))
                os.fsync(fd)
            finally:
                os.close(fd)
        if c.odirect is None:
            c.odirect, c.odirect_note = self.probe_odirect(self.rand_file(c))
        r.notes.append("O_DIRECT" if c.odirect else f"buffered after drop_caches ({c.odirect_note})")
        drop_caches()

    @staticmethod
    def probe_odirect(path: Path) -> tuple[bool, str]:
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        except OSError as e:
            return False, f"open(O_DIRECT): {short_error(e)}"
        try:
            buf = mmap.mmap(-1, BLOCK)
            os.preadv(fd, [buf], 0)
            return True, ""
        except OSError as e:
            return False, f"4 KiB O_DIRECT pread: {short_error(e)}"
        finally:
            os.close(fd)

    def _rand_io(self, c: Client, r: Result, write: bool) -> None:
        flags = os.O_RDWR if write else os.O_RDONLY
        fd = os.open(self.rand_file(c), flags | (os.O_DIRECT if c.odirect else 0))
        try:
            if not c.odirect:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            rng = random.Random(self.cfg.seed + (1 if write else 0))
            nblocks = self.cfg.rand_mib * MiB // BLOCK
            buf = mmap.mmap(-1, BLOCK)  # page aligned, as O_DIRECT wants
            if write:
                buf[:] = os.urandom(BLOCK)
            deadline = time.perf_counter() + self.cfg.rand_seconds
            limit = self.cfg.rand_ops or 1 << 62
            while r.ops < limit and (r.ops % 16 or time.perf_counter() < deadline):
                self.check()
                b = rng.randrange(nblocks)
                if write:
                    buf[:8] = b.to_bytes(8, "little")
                    n = os.pwritev(fd, [buf], b * BLOCK)
                else:
                    n = os.preadv(fd, [buf], b * BLOCK)
                    if n == BLOCK and buf[:8] != b.to_bytes(8, "little"):
                        raise DataMismatch(f"4 KiB block {b} of {c.name}/rand.dat: wrong data "
                                           f"(starts with {bytes(buf[:8]).hex()})")
                if n != BLOCK:
                    raise OSError(errno.EIO, f"{'pwrite' if write else 'pread'} of block {b} returned {n}")
                r.ops += 1
                r.nbytes += BLOCK
            if write:
                os.fsync(fd)
        finally:
            os.close(fd)

    def w_rand_read(self, c: Client, r: Result) -> None:
        self._rand_io(c, r, write=False)

    def w_rand_write(self, c: Client, r: Result) -> None:
        self._rand_io(c, r, write=True)

    def files_dir(self, c: Client) -> Path:
        return c.path / "files"

    def names(self) -> list[str]:
        return [f"f{i:06d}" for i in range(self.cfg.files)]

    def p_create(self, c: Client, r: Result) -> None:
        self.files_dir(c).mkdir(exist_ok=True)
        drop_caches()

    def w_create(self, c: Client, r: Result) -> None:
        d = self.files_dir(c)
        data = self.base[:self.cfg.file_size]
        for n in self.names():
            self.check()
            fd = os.open(d / n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if data:
                    write_all(fd, data)
            finally:
                os.close(fd)
            r.ops += 1

    def p_files(self, c: Client, r: Result) -> None:
        """stat/ls-l/unlink need the files; make missing ones through the native mount."""
        if not self.ok(c.name, "create"):
            d = self.native.mount.path / c.dirname / "files"  # type: ignore[union-attr]
            d.mkdir(exist_ok=True)
            have = set(os.listdir(d))
            missing = [n for n in self.names() if n not in have]
            if missing:
                r.notes.append(f"{len(missing)} files made through the native mount (create failed)")
                progress(f"  making {len(missing)} files through the native mount (create failed for {c.name})")
                data = self.base[:self.cfg.file_size]
                for n in missing:
                    fd = os.open(d / n, os.O_WRONLY | os.O_CREAT, 0o644)
                    with contextlib.suppress(OSError):
                        write_all(fd, data)
                    os.close(fd)
        drop_caches()

    def w_stat(self, c: Client, r: Result) -> None:
        d = self.files_dir(c)
        for n in self.names():
            self.check()
            s = os.stat(d / n)
            if s.st_size != self.cfg.file_size:
                raise DataMismatch(f"{c.name}/files/{n}: size {s.st_size}, wrote {self.cfg.file_size}")
            r.ops += 1

    def _warm(self, cold: str) -> Callable[[Client, Result], None]:
        """Preparation of a warm pass: no drop_caches; wait until WARM_DELAY after the cold pass ended."""
        def prep(c: Client, r: Result) -> None:
            if not self.ok(c.name, cold):
                self.p_files(c, r)
                r.notes.append(f"{cold} failed: not warm")
                return
            wait = self.ended[(c.name, cold)] + WARM_DELAY - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            r.notes.append(f"{time.monotonic() - self.ended[(c.name, cold)]:.1f} s after {cold}")
        return prep

    def w_ls(self, c: Client, r: Result) -> None:
        with os.scandir(self.files_dir(c)) as it:
            for e in it:
                self.check()
                e.stat(follow_symlinks=False)
                r.ops += 1
        if r.ops != self.cfg.files:
            raise DataMismatch(f"ls -l of {c.name}/files saw {r.ops} entries, {self.cfg.files} expected")

    def w_unlink(self, c: Client, r: Result) -> None:
        d = self.files_dir(c)
        for n in self.names():
            self.check()
            os.unlink(d / n)
            r.ops += 1

    # -- the run --------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, Callable, Callable | None]]:
        return [
            ("seq-write", self.w_seq_write, None),
            ("seq-read", self.w_seq_read, self.p_seq_read),
            ("rand-read", self.w_rand_read, self.p_rand_file),
            ("rand-write", self.w_rand_write, self.p_rand_file),
            ("create", self.w_create, self.p_create),
            ("stat", self.w_stat, self.p_files),
            ("stat-warm", self.w_stat, self._warm("stat")),
            ("ls-l", self.w_ls, self.p_files),
            ("ls-l-warm", self.w_ls, self._warm("ls-l")),
            ("unlink", self.w_unlink, self.p_files),
        ]

    def run(self, only: list[str]) -> None:
        """Each workload for both clients, alternating who goes first; a warm pass right after the same
        client's cold one (the other client's drop_caches in between would empty this one's kernel cache)."""
        plan = {w[0]: w for w in self.plan()}
        todo = [w for w in self.plan() if w[0] in only and not (w[0].endswith("-warm") and
                                                                 w[0].removesuffix("-warm") in only)]
        for i, (name, fn, prep) in enumerate(todo):
            order = CLIENTS if i % 2 == 0 else tuple(reversed(CLIENTS))
            for cname in order:
                self.check()
                self.measure(self.clients[cname], name, fn, prep)
                warm = f"{name}-warm"
                if warm in only and warm in plan:
                    self.check()
                    _, wfn, wprep = plan[warm]
                    self.measure(self.clients[cname], warm, wfn, wprep)

    def run_in_worker(self, only: list[str]) -> None:
        """Thread body. Signals are blocked here so they reach the main thread only: a signal
        arriving in a thread blocked in a FUSE request makes the kernel send FUSE_INTERRUPT,
        which the native client's interrupt handling is known to get stuck on (glusterfs #4371);
        the main thread sets ``stop`` instead and the workload ends after its current operation."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        try:
            self.run(only)
        except BaseException as e:  # noqa: BLE001
            self.error = e


# ---------------------------------------------------------------------------------------- report


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if x != 0 and abs(x) < 10 ** -digits * 5:
        return f"{x:.2g}"
    return f"{x:,.{digits}f}"


def ratio(g: float | None, n: float | None) -> str:
    if g is None or n is None or n == 0:
        return "–"
    return f"{g / n:.2f}"


LABELS = {
    "seq-write": "seq write {seq} (1 MiB writes + fsync)",
    "seq-read": "seq read {seq} (1 MiB reads, cold)",
    "rand-read": "rand read 4 KiB, {rand} file",
    "rand-write": "rand write 4 KiB, {rand} file",
    "create": "create {files} × {fsize}",
    "stat": "stat {files} (cold)",
    "stat-warm": "stat {files} (warm: 2 s later)",
    "ls-l": "ls -l {files} (scandir+lstat, cold)",
    "ls-l-warm": "ls -l {files} (warm: 2 s later)",
    "unlink": "unlink {files}",
}


def size_text(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"


def report(bench: Bench, only: list[str], top: int) -> str:
    cfg = bench.cfg
    out: list[str] = []
    fields = {"seq": size_text(cfg.seq_mib), "rand": size_text(cfg.rand_mib), "files": f"{cfg.files:,}",
              "fsize": (f"{cfg.file_size} B" if cfg.file_size % 1024 else f"{cfg.file_size // 1024} KiB")
              if cfg.file_size else "0 B"}
    out.append("| workload | figure | native | gfuse | gfuse/native |")
    out.append("|---|---|---:|---:|---:|")
    failures: list[str] = []
    for w in only:
        n, g = bench.results.get(("native", w)), bench.results.get(("gfuse", w))
        if n is None or g is None:
            continue
        label = LABELS[w].format(**fields)
        unit = "MiB/s" if w.startswith("seq-") else ("entries/s" if w.startswith("ls-l") else "ops/s")
        rows = [
            (unit, n.rate(), g.rate(), 1),
            ("client CPU µs/op", scale(n.per_op(n.cpu)), scale(g.per_op(g.cpu)), 0),
            ("brick CPU µs/op", scale(n.per_op(n.brick_cpu)), scale(g.per_op(g.brick_cpu)), 0),
            ("brick fops/op", n.per_op(total(n.fops)), g.per_op(total(g.fops)), 2),
        ]
        for k, (fig, nv, gv, digits) in enumerate(rows):
            ncell = n.error if (n.error and k == 0) else ("" if n.error else fmt(nv, digits))
            gcell = g.error if (g.error and k == 0) else ("" if g.error else fmt(gv, digits))
            out.append(f"| {label if k == 0 else ''} | {fig} | {ncell} | {gcell} | {ratio(gv, nv)} |")
        for r in (n, g):
            if r.error:
                failures.append(f"- {w}, {r.client}: {r.error}")
    out.append("")
    out.append(f"Brick fops per user operation, summed over all bricks (top {top} types per client):")
    out.append("")
    out.append("| workload | client | ops | seconds | brick fops per op | gfuse − native per op |"
               " brick MiB read / written per op |")
    out.append("|---|---|---:|---:|---|---|---|")
    for w in only:
        for cname in CLIENTS:
            r = bench.results.get((cname, w))
            if r is None:
                continue
            if r.fops is None:
                tops = "n/a (" + (bench.target.profile_error or "no profile") + ")"
            else:
                items = sorted(r.fops.items(), key=lambda kv: -kv[1])
                tops = ", ".join(f"{k} {per(v, r.ops)}" for k, v in items[:top] if v) or "none"
            diff = ""
            n = bench.results.get(("native", w))
            if cname == "gfuse" and n is not None and r.fops is not None and n.fops is not None \
                    and r.ops and n.ops:
                deltas = {k: r.fops.get(k, 0) / r.ops - n.fops.get(k, 0) / n.ops for k in set(r.fops) | set(n.fops)}
                diff = ", ".join(f"{k} {d:+.2f}" for k, d in sorted(deltas.items(), key=lambda kv: -abs(kv[1]))
                                 if abs(d) >= 0.05) or "none ≥ 0.05"
            io = f"{r.brick_read / MiB / max(r.ops, 1):.3g} / {r.brick_written / MiB / max(r.ops, 1):.3g}"
            notes = list(r.notes)
            if r.upcalls and any(r.upcalls.values()):
                ups = ", ".join(f"{k} {per(v, r.ops)}" for k, v in sorted(r.upcalls.items(), key=lambda kv: -kv[1]))
                notes.append(f"not fops: upcalls the bricks sent to other clients {ups}")
            tail = f" ({'; '.join(notes)})" if notes else ""
            err = " FAILED" if r.error else ""
            out.append(f"| {w} | {cname}{err} | {r.ops:,} | {r.seconds:.2f} | {tops}{tail} | {diff} | {io} |")
    if failures:
        out.append("")
        out.append("Failures:")
        out.extend(failures)
    return "\n".join(out)


def per(v: int, ops: int) -> str:
    x = v / max(ops, 1)
    return f"{x:.2f}" if x >= 0.01 else f"{x:.1g}"


def scale(x: float | None) -> float | None:
    return None if x is None else x * 1e6


def total(fops: dict[str, int] | None) -> float | None:
    return None if fops is None else float(sum(fops.values()))


def gfuse_version() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %cs"], check=False,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "gfuse"],
                               check=False, capture_output=True, text=True, timeout=10).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"git {head}" + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def memory(pid: int | None) -> str:
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
        mib = {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}
    except (OSError, KeyError, ValueError):
        return "n/a"
    return f"{mib['VmRSS']:.0f} MiB (peak {mib['VmHWM']:.0f} MiB)"


def probe_cache_lines(target: Target) -> list[str]:
    """What ``gfuse probe`` says about the volume's cache-invalidation (both sides) and gfuse's caching."""
    try:
        out = subprocess.run([sys.executable, "-m", "gfuse.cli", "probe", f"{target.server}:/{target.name}"],
                             check=False, capture_output=True, text=True, timeout=60, cwd=REPO).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    keep = False
    lines = []
    for line in out.splitlines():
        keep = keep or line.startswith("cache-invalidation:")
        if keep:
            lines.append(line)
    return lines


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def header_lines(rerun: str, started: dt.datetime, load0: float, gfuse_state: str, target: Target,
                 clients: dict[str, Client], bench: Bench, a: argparse.Namespace, rc: int) -> list[str]:
    def odirect(c: Client) -> str:
        if c.odirect is None:
            return f"{c.name} not run"
        return f"{c.name} " + ("O_DIRECT" if c.odirect else f"buffered ({c.odirect_note})")

    native, gfuse = clients["native"], clients["gfuse"]
    tick_ms = 1000 // os.sysconf("SC_CLK_TCK")
    bricks = bench.brick_cpu_note or "pids " + " ".join(map(str, bench.brick_pids))
    lines = [
        "# gfuse vs the native glusterfs FUSE client (bench/mount_bench.py)",
        "",
        f"    {rerun}",
        "",
        (f"- date: {started:%Y-%m-%d %H:%M} UTC, took {time.monotonic() - T0:.0f} s; host {platform.node()},"
         f" {os.cpu_count()} CPUs, kernel {platform.release()}, {tool_version(['glusterfs', '--version'])},"
         f" Python {platform.python_version()}; load average {load0:.2f} at the start,"
         f" {os.getloadavg()[0]:.2f} at the end"),
        f"- gfuse: {gfuse_state}",
        (f"- volume: {target.name} ({target.kind}, {'throwaway' if target.volume else 'existing'});"
         f" native client performance xlators: {', '.join(target.client_graph()) or '?'}"),
        (f"- volume options set: {', '.join(a.volume_set) or 'none (gluster defaults)'}"),
        (f"- mount options: native [{a.native_options}], gfuse [{a.gfuse_options}]"
         " (native: attribute/entry timeout 1 s; gfuse: 1 s, or md-cache's remaining lifetime when coherent)"),
        *(f"- gfuse probe: {line.strip()}" for line in bench.cache_lines),
        "- random I/O: " + "; ".join(odirect(c) for c in clients.values()),
        (f"- CPU from /proc/PID/stat (utime+stime, {tick_ms} ms ticks): native pid {native.pid},"
         f" gfuse pid {gfuse.pid}; bricks: {bricks}"),
        f"- remounts after a dead mount: native {native.remounts}, gfuse {gfuse.remounts}",
        f"- memory of the serving processes at the end (VmRSS, peak VmHWM): native {memory(native.pid)}, "
        f"gfuse {memory(gfuse.pid)}",
    ]
    if rc == 130:
        lines.append("- INTERRUPTED: the figures are partial")
    return lines


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=sorted(tc.KINDS), default="replica3",
                    help="shape of the throwaway volume (default replica3)")
    ap.add_argument("--volume", metavar="HOST:/VOL", help="use this existing volume instead (not deleted)")
    ap.add_argument("--quick", action="store_true", help="about 10x smaller sizes: a smoke run")
    ap.add_argument("--seq-mib", type=int, help="MiB written then read sequentially (default 1024, quick 128)")
    ap.add_argument("--rand-mib", type=int, help="size of the random-I/O file in MiB (default 256, quick 32)")
    ap.add_argument("--rand-seconds", type=float, help="seconds per random-I/O run (default 20, quick 2)")
    ap.add_argument("--rand-ops", type=int, default=0, help="stop random I/O after this many ops (0: no limit)")
    ap.add_argument("--files", type=int, help="files for create/stat/ls-l/unlink (default 10000, quick 1000)")
    ap.add_argument("--file-size", type=int, default=1024, help="bytes written into each small file (default 1024)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {','.join(WORKLOADS)} (default all)")
    ap.add_argument("--timeout", type=float, help="seconds before a hanging workload's client is killed "
                                                  "(default 1800, quick 300)")
    ap.add_argument("--volume-set", action="append", default=[], metavar="KEY=VALUE",
                    help="gluster volume set on the throwaway volume before it starts (repeatable), e.g. "
                         "group=metadata-cache")
    ap.add_argument("--metadata-cache", action="store_true",
                    help="shorthand for --volume-set group=metadata-cache (cache-invalidation on, 600 s)")
    ap.add_argument("--gfuse-options", default="", help="-o options for gfuse mount (comma-separated)")
    ap.add_argument("--native-options", default="", help="-o options for mount -t glusterfs (comma-separated)")
    ap.add_argument("--top", type=int, default=8, help="fop types listed per workload and client")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random offsets")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    a = ap.parse_args()

    if a.metadata_cache:
        a.volume_set.insert(0, "group=metadata-cache")
    vol_options: dict[str, str] = {}
    for kv in a.volume_set:
        k, eq, v = kv.partition("=")
        if not eq or not k:
            ap.error(f"--volume-set wants KEY=VALUE, not {kv!r}")
        vol_options[k.strip()] = v.strip()
    only = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in only if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workload(s) {bad}; choose from {','.join(WORKLOADS)}")
    only = [w for w in WORKLOADS if w in only]
    d = QUICK if a.quick else FULL
    cfg = Config(
        seq_mib=a.seq_mib or d["seq_mib"], rand_mib=a.rand_mib or d["rand_mib"],
        rand_seconds=a.rand_seconds or d["rand_seconds"], rand_ops=a.rand_ops, files=a.files or d["files"],
        file_size=a.file_size, timeout=a.timeout or d["timeout"], seed=a.seed)
    if os.geteuid() != 0:
        ap.error("needs root: mounts, /proc/sys/vm/drop_caches and the gluster CLI")
    reason = tc.native_mount_unavailable_reason()
    if reason:
        print(f"mount_bench: {reason}", file=sys.stderr)
        return 1

    rerun = shlex.join(["python3", os.path.relpath(sys.argv[0], os.getcwd()) if not sys.argv[0].startswith("/")
                        else sys.argv[0], *sys.argv[1:]])
    started = dt.datetime.now(dt.UTC)
    load0 = os.getloadavg()[0]

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    target: Target | None = None
    clients: dict[str, Client] = {}
    bench: Bench | None = None
    rc = 0
    try:
        tc.ensure_glusterd()
        if a.volume:
            host, _, vol = a.volume.partition(":")
            vol = vol.strip("/")
            if not host or not vol:
                ap.error("--volume wants HOST:/VOL")
            info = tc.volume_info(vol)
            target = Target(server=host, name=vol, kind=info.type)
        else:
            progress(f"creating a throwaway {a.kind} volume")
            v = tc.create_volume(a.kind, options=vol_options)
            target = Target(server=v.server, name=v.name, kind=a.kind, volume=v)
        progress(f"volume {target.name}; starting the profile")
        target.start_profile()
        tag = f"{os.getpid()}-{int(time.time())}"
        for cname, opts in (("native", a.native_options), ("gfuse", a.gfuse_options)):
            c = Client(cname, target, [o for o in opts.split(",") if o], f"mbench-{cname}-{tag}")
            clients[cname] = c
            c.do_mount()
        gfuse_state = gfuse_version()
        for c in clients.values():
            c.path.mkdir()
        bench = Bench(cfg, target, clients)
        bench.cache_lines = probe_cache_lines(target)
        worker = threading.Thread(target=bench.run_in_worker, args=(only,), name="workloads", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.5)
        except KeyboardInterrupt:
            progress("interrupted: stopping after the operation in flight (again: kill the serving processes)")
            bench.stop.set()
            try:
                while worker.is_alive():
                    worker.join(0.5)
            except KeyboardInterrupt:
                for c in clients.values():
                    progress(f"killing {c.name}'s serving process {c.pid}")
                    c.kill()
                worker.join(60)
            raise
        if bench.error is not None and not isinstance(bench.error, Interrupted):
            raise bench.error
    except KeyboardInterrupt as e:
        progress(f"interrupted ({str(e) or 'Ctrl-C'}); cleaning up")
        rc = 130
    except Exception as e:  # noqa: BLE001
        progress(f"error: {short_error(e)}")
        rc = 1
    finally:
        # report before teardown (a hanging unmount must not eat the figures)
        if bench is not None and bench.results:
            header = header_lines(rerun, started, load0, gfuse_state, target, clients, bench, a, rc)  # type: ignore[arg-type]
            text = "\n".join(header) + "\n\n" + report(bench, only, a.top) + "\n"
            sys.stdout.write(text)
            sys.stdout.flush()
            if a.json:
                Path(a.json).write_text(json.dumps({
                    "command": rerun, "date": started.isoformat(), "config": cfg.__dict__,
                    "volume": target.name if target else None,  # type: ignore[union-attr]
                    "results": [r.__dict__ for r in bench.results.values()],
                }, indent=2))
            if any(r.error for r in bench.results.values()):
                rc = rc or 3
        progress("cleaning up")
        with contextlib.suppress(BaseException):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the volume delete
        if target is not None and target.volume is None:
            native = clients.get("native")
            for c in clients.values():
                if native is not None and native.healthy():
                    with contextlib.suppress(OSError):
                        shutil.rmtree(native.mount.path / c.dirname)  # type: ignore[union-attr]
        for c in reversed(list(clients.values())):
            c.unmount()
        if target is not None:
            target.stop_profile()
            if target.volume is not None:
                try:
                    target.volume.delete()
                    progress(f"deleted volume {target.name}")
                except Exception as e:  # noqa: BLE001
                    progress(f"could not delete volume {target.name}: {e}")
                    rc = rc or 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
