#!/usr/bin/env python3
"""The floor of a Python FUSE server: client CPU per operation of a pyfuse3 filesystem that does nothing.

Why: issue 10 asks gfuse to use at most 1.5x the native client's CPU per operation. gfuse answers the kernel
through pyfuse3 on trio; this bench mounts a *null* filesystem on the same stack (pyfuse3 + trio, files kept
in a dict, no brick, no translator) and runs the workloads of ``bench/mount_bench.py`` on it. Whatever CPU
it spends per operation, gfuse spends too before it makes its first brick call. Divided by the native
client's CPU per operation of the same workload (pass ``--native-json`` a ``mount_bench.py --json`` file)
it says which rows no Python server on this stack can bring under 1.5x native.

Rerun (root, needs /dev/fuse):

    python3 bench/fuse_floor.py                         # 10,000 files, 20,000 random 4 KiB I/Os
    python3 bench/fuse_floor.py --native-json /tmp/mb.json

The server runs in a child process; its CPU (utime+stime from /proc) is read before and after each workload.
The kernel's entry and attribute timeouts are ``--timeout`` (default 0, so every stat reaches the server:
what gfuse pays cold; ``--timeout 600`` is gfuse's when the volume is coherent, and then ``ls -l`` costs only
READDIRPLUS).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat as st
import subprocess
import sys
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")


def serve(mountpoint: str, timeout: float) -> None:
    """The null filesystem: one flat directory of regular files held in memory."""
    import pyfuse3
    import trio

    class Null(pyfuse3.Operations):
        def __init__(self) -> None:
            super().__init__()
            self.names: dict[bytes, int] = {}
            self.data: dict[int, bytearray] = {}
            self.next = pyfuse3.ROOT_INODE + 1
            self.calls = 0

        def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = ino
            if ino == pyfuse3.ROOT_INODE:
                a.st_mode, a.st_nlink = st.S_IFDIR | 0o755, 2
            else:
                a.st_mode, a.st_nlink, a.st_size = st.S_IFREG | 0o644, 1, len(self.data[ino])
            a.entry_timeout = a.attr_timeout = timeout
            a.st_blksize, a.generation = 4096, 0
            return a

        async def lookup(self, parent, name, ctx=None):
            self.calls += 1
            ino = self.names.get(name)
            if ino is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(ino)

        async def getattr(self, inode, ctx=None):
            self.calls += 1
            return self._attr(inode)

        async def setattr(self, inode, attr, fields, fh, ctx):
            self.calls += 1
            if fields.update_size:
                del self.data[inode][attr.st_size:]
            return self._attr(inode)

        async def create(self, parent, name, mode, flags, ctx):
            self.calls += 1
            ino, self.next = self.next, self.next + 1
            self.names[name], self.data[ino] = ino, bytearray()
            return pyfuse3.FileInfo(fh=ino, direct_io=bool(flags & os.O_DIRECT)), self._attr(ino)

        async def open(self, inode, flags, ctx):
            self.calls += 1
            return pyfuse3.FileInfo(fh=inode, direct_io=bool(flags & os.O_DIRECT))

        async def read(self, fh, off, size):
            self.calls += 1
            return bytes(self.data[fh][off:off + size])

        async def write(self, fh, off, buf):
            self.calls += 1
            d = self.data[fh]
            if len(d) < off:
                d.extend(bytes(off - len(d)))
            d[off:off + len(buf)] = buf
            return len(buf)

        async def flush(self, fh):
            self.calls += 1

        async def release(self, fh):
            self.calls += 1

        async def unlink(self, parent, name, ctx):
            self.calls += 1
            ino = self.names.pop(name)
            del self.data[ino]

        async def forget(self, inode_list):
            pass

        async def getxattr(self, inode, name, ctx):
            self.calls += 1
            raise pyfuse3.FUSEError(errno.ENODATA)

        async def opendir(self, inode, ctx):
            self.calls += 1
            return inode

        async def readdir(self, fh, start_id, token):
            self.calls += 1
            items = sorted(self.names.items())
            for i, (name, ino) in enumerate(items[start_id:], start_id + 1):
                if not pyfuse3.readdir_reply(token, name, self._attr(ino), i):
                    break

        async def releasedir(self, fh):
            self.calls += 1

        async def statfs(self, ctx):
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = 4096
            s.f_blocks = s.f_bfree = s.f_bavail = 1 << 20
            s.f_files = s.f_ffree = s.f_favail = 1 << 20
            return s

    ops = Null()
    opts = set(pyfuse3.default_options) | {"fsname=gfuse-null"}
    pyfuse3.init(ops, mountpoint, opts)
    # the parent reads this to know the mount is up, then the request count at the end
    print("ready", flush=True)

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(pyfuse3.main)

            async def report() -> None:
                while True:
                    await trio.sleep(0.2)
                    with open(mountpoint + ".calls", "w") as f:
                        f.write(str(ops.calls))
            n.start_soon(report)

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=False)


def cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def calls(mp: str) -> int:
    time.sleep(0.45)
    with open(mp + ".calls") as f:
        return int(f.read() or 0)


def workloads(mp: str, files: int, ios: int) -> list[tuple[str, int, object]]:
    names = [os.path.join(mp, f"f{i:06d}") for i in range(files)]
    block = b"x" * 1024

    def create() -> None:
        for p in names:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, block)
            os.close(fd)

    def stat() -> None:
        for p in names:
            os.lstat(p)

    def ls_l() -> None:
        for e in os.scandir(mp):
            e.stat(follow_symlinks=False)

    big = os.path.join(mp, "big")
    size = 64 << 20
    offs = [((i * 2654435761) % (size // 4096)) * 4096 for i in range(ios)]

    def rand_write() -> None:
        fd = os.open(big, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
        buf = bytearray(os.urandom(4096))
        mv = memoryview(_aligned(4096))
        mv[:] = buf
        for o in offs:
            os.pwritev(fd, [mv], o)
        os.close(fd)

    def rand_read() -> None:
        fd = os.open(big, os.O_RDONLY | os.O_DIRECT)
        mv = memoryview(_aligned(4096))
        for o in offs:
            os.preadv(fd, [mv], o)
        os.close(fd)

    def unlink() -> None:
        for p in names:
            os.unlink(p)

    return [("create 1 KiB", files, create), ("stat", files, stat),
            ("ls -l (scandir+lstat)", files, ls_l), ("rand write 4 KiB O_DIRECT", ios, rand_write),
            ("rand read 4 KiB O_DIRECT", ios, rand_read), ("unlink", files, unlink)]


def _aligned(n: int) -> bytearray:
    import mmap
    return mmap.mmap(-1, n)  # type: ignore[return-value]  # page-aligned, as O_DIRECT needs


NATIVE_ROWS = {"create 1 KiB": "create", "stat": "stat", "ls -l (scandir+lstat)": "ls-l",
               "rand write 4 KiB O_DIRECT": "rand-write", "rand read 4 KiB O_DIRECT": "rand-read",
               "unlink": "unlink"}


def native_cpu(path: str | None) -> dict[str, float]:
    """client CPU µs/op of the native client per mount_bench workload, from its --json output."""
    if not path:
        return {}
    out: dict[str, float] = {}
    doc = json.load(open(path))
    for r in doc.get("results", []):
        if r.get("client") == "native" and r.get("cpu") is not None and r.get("ops") and not r.get("error"):
            out[r["workload"]] = r["cpu"] / r["ops"] * 1e6
    return out


def socket_round_trip(n: int = 20_000) -> float:
    """CPU µs of one 200-byte request/answer on a trio socket (the answer from a thread): what a brick call
    costs a trio client with no codec and no protocol at all -- one send, one epoll wake-up, one receive."""
    import socket
    import threading

    import trio

    a, b = socket.socketpair()

    def echo() -> None:
        while d := b.recv(4096):
            b.sendall(d)

    threading.Thread(target=echo, daemon=True).start()

    async def run() -> float:
        s = trio.socket.from_stdlib_socket(a)
        c0 = time.thread_time()
        for _ in range(n):
            await s.send(b"x" * 200)
            await s.recv(4096)
        return (time.thread_time() - c0) / n * 1e6

    try:
        return trio.run(run)
    finally:
        a.close()


def main() -> int:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=10_000, help="files for create/stat/ls/unlink (default 10,000)")
    p.add_argument("--ios", type=int, default=20_000, help="random 4 KiB reads and writes (default 20,000)")
    p.add_argument("--native-json", help="a bench/mount_bench.py --json file: print the floor over native's CPU/op")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="the kernel's entry/attribute timeout in seconds (default 0: every stat reaches the server; "
                        "600 is what gfuse gives when the volume is coherent)")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        serve(a.serve, a.timeout)
        return 0
    if os.geteuid() != 0:
        print("fuse_floor: run as root (it mounts a FUSE filesystem)", file=sys.stderr)
        return 2
    native = native_cpu(a.native_json)
    mp = tempfile.mkdtemp(prefix="gfuse-floor-")
    srv = subprocess.Popen([sys.executable, __file__, "--serve", mp, "--timeout", str(a.timeout)],
                           stdout=subprocess.PIPE, text=True)
    try:
        if srv.stdout is None or srv.stdout.readline().strip() != "ready":
            print("fuse_floor: the null filesystem did not start", file=sys.stderr)
            return 1
        print(f"# fuse_floor: pyfuse3 + trio null filesystem, entry/attr timeout {a.timeout:g} s, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start")
        print(f"# rerun: python3 {' '.join(sys.argv)}")
        print("| workload | ops | ops/s | server CPU µs/op | FUSE requests/op |"
              + (" native client CPU µs/op | floor / native |" if native else ""))
        print("|---|---:|---:|---:|---:|" + ("---:|---:|" if native else ""))
        for name, n, fn in workloads(mp, a.files, a.ios):
            c0, r0, t0 = cpu(srv.pid), calls(mp), time.perf_counter()
            fn()  # type: ignore[operator]
            t1 = time.perf_counter()
            c1, r1 = cpu(srv.pid), calls(mp)
            us = (c1 - c0) / n * 1e6
            row = f"| {name} | {n:,} | {n / (t1 - t0):,.0f} | {us:,.1f} | {(r1 - r0) / n:.2f} |"
            nat = native.get(NATIVE_ROWS[name])
            if native:
                row += f" {nat:,.0f} | {us / nat:.2f} |" if nat else " – | – |"
            print(row, flush=True)
        print(f"| one trio socket round trip (no codec, no brick) | 20,000 | – | {socket_round_trip():,.1f} | – |"
              + (" – | – |" if native else ""))
        print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, check=False)
        srv.terminate()
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()
        for f in (mp + ".calls",):
            if os.path.exists(f):
                os.unlink(f)
        os.rmdir(mp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
