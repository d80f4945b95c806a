#!/usr/bin/env python3
"""Fault soak of gfuse's replicate translator (issue 14): no acknowledged write is lost or hidden.

Everything runs on a private cluster (:class:`testkit.multicluster.MultiCluster`): ``--nodes`` glusterd
(3 by default) on 127.1.1.N in a network namespace of their own, the volume's bricks spread over them
(brick i on node i mod N + 1, so each replica set has one brick per node), gfuse mounting from
127.1.1.1 with the other nodes as backup volfile servers. So every fault below, the glusterd restart
included, touches only what the soak made; the host's glusterd and its volumes are never involved.

Each round a checksummed writer works on a fresh file through the gfuse mount — writes of random sizes at
random offsets, ftruncates, fallocate (plain, KEEP_SIZE, ZERO_RANGE with and without KEEP_SIZE, PUNCH_HOLE),
fsyncs, reads checked against its model — while one fault is injected:

- ``kill``: a brick is SIGKILLed, brought back with ``volume start force`` a little later (here and in
  ``stop`` a random brick of the replica set that holds the file, the arbiter too);
- ``stop``: a brick is SIGSTOPped for longer than the volume's ping-timeout (set to ``--ping-timeout``),
  then SIGCONTed — gfuse drops it after the ping-timeout, the writes go on to the two others;
- ``glusterd``: a node's glusterd (half the time the one the mount's volfile watcher is connected to: node 1
  at first, then the backup server it moved on to) is stopped with SIGTERM or SIGKILL and started again
  0.5-3 s later; its bricks and self-heal daemon keep running. The writer must see no failure; the
  mount's volfile watcher must be connected to a glusterd again within 40 s of the restart, and every
  brick up (the next round, a brick kill, needs the restarted glusterd's portmap for the same mount);
- ``gfuse``: the gfuse server is SIGKILLed (the writer's next calls fail) and the volume is mounted again.
  The issue owes only what was fsynced; the check is stricter: gfuse has no writeback cache, so every op
  the writer was acknowledged is owed (a write the kill cut short: its acknowledged part); the op in
  progress at the kill may be there too, or, for a write the kernel sent as several requests, a prefix of
  it ending at a page boundary (see ``Writer.owed``).

Two bricks of each replica set are up all along, so (except after a gfuse kill) no call may fail. Each
round starts with the mount seeing every brick up and ends with the self-heal daemon done (``heal info``
empty on every brick) and every data brick's copy equal to what the writer was acknowledged (after a gfuse
kill: that, or that plus the op in progress or a part of it as above), all copies equal, the arbiter's copy
empty, and a read through gfuse equal to them too. Printed: a table per volume kind and fault (rounds; in
how many kill and stop rounds another brick of the set held a pending changelog blaming the faulted one as
it came back, i.e. the fault bit; ops acknowledged, bytes checked, errors, mismatches, heal time: from the
writer's end, every brick up, until ``heal info`` is empty), and every failure with its round seed
(``--round-seed`` replays its choices; the writer's ops and model do not depend on timing).

Run (root; a private cluster under /var/tmp/gfuse-multicluster, removed at the end, also on Ctrl-C/SIGTERM;
a run killed with SIGKILL leaves it to the next run's :func:`testkit.multicluster.cleanup_stale`):
    python3 bench/soak_replicate.py --kinds replica3,arbiter,distrep --rounds 52   # 13 rounds of each fault
    python3 bench/soak_replicate.py --kinds arbiter --rounds 10 --faults kill,stop --seed 7
    python3 bench/soak_replicate.py --kinds distrep --rounds 4 --faults glusterd --round-seed 123456
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gfuse.status import query_status  # noqa: E402
from testkit import multicluster as mcl  # noqa: E402
from testkit import procs  # noqa: E402

FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
MAX_SIZE = 4 << 20
LINKTO = "trusted.glusterfs.dht.linkto"
#: kind -> (bricks, arbiter count); every kind is replica 3
KINDS = {"replica3": (3, 0), "arbiter": (3, 1), "distrep": (6, 0)}
FAULTS = ("kill", "stop", "gfuse", "glusterd")
GLUSTERD_PORT_HEX = f"{24007:04X}"


class SoakError(RuntimeError):
    """Something of the test bed (not of gfuse's data path) did not come back: the round cannot be judged."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def sha(b: bytes | bytearray) -> str:
    return hashlib.sha256(b).hexdigest()[:12]


def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = pred()
        except (OSError, ValueError, mcl.MultiClusterError) as e:
            last, ok = e, False
        else:
            ok = bool(last)
        if ok:
            return last
        if time.monotonic() > deadline:
            raise SoakError(f"{what}: not within {timeout:g} s (last: {last!r})")
        time.sleep(interval)


class Writer(threading.Thread):
    """Random ops on ``path``; ``model`` is what the acknowledged ops say the file holds."""

    def __init__(self, path: Path, seed: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.rng = random.Random(seed)
        self.model = bytearray()
        self.synced = b""  # the model at the last acknowledged fsync
        self.inflight = b""  # the model the op in progress would make
        # the write in progress (or the last one, if the kernel answered it short): the model before it, offset,
        # data, bytes acknowledged
        self.partial: tuple[bytes, int, bytes, int] | None = None
        self.short_write = False
        self.errors: list[str] = []
        self.ops = Counter[str]()
        self.stop = threading.Event()
        self.dead = threading.Event()  # the mount went away (gfuse killed): stop quietly

    def run(self) -> None:
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            while not self.stop.is_set():
                try:
                    self.step(fd)
                except OSError as e:
                    if self.dead.is_set():
                        return
                    self.errors.append(f"{self.ops.total()}: {e!r}")
                if self.short_write:
                    # only the gfuse kill cuts a write short, and the next op would fail anyway: stop here, so that
                    # what the cut write may have left (``inflight``, ``partial``) stays what ``owed`` looks at (run 5,
                    # 2 x 3 round 34, round seed 644630363: the next op overwrote them, and the copies, which held
                    # the whole cut write, were counted a mismatch)
                    return
                time.sleep(0.01)
        finally:
            try:
                os.close(fd)
            except OSError as e:
                if not self.dead.is_set():
                    self.errors.append(f"close: {e!r}")

    def applied(self, j: int) -> bytes:
        """The model before the write in progress with its first ``j`` bytes written."""
        assert self.partial is not None
        base, off, data, _n = self.partial
        new = bytearray(base)
        if off > len(new):
            new.extend(bytes(off - len(new)))
        new[off:off + j] = data[:j]
        return bytes(new)

    def owed(self) -> list[bytes]:
        """What a copy may hold after a gfuse kill: every acknowledged op, and maybe the one in progress. The
        kernel sends a write as one or more requests, one after the other, each but the last ending at a page
        boundary (the first one where a page it cannot fill whole is not cached, seen here: a 4096-byte write at
        293541 beyond the end of the file went as 1371 + 2725): the acknowledged ones are owed (a short write),
        the next one may have reached the bricks unanswered, so any page-boundary prefix of the write may be
        there."""
        out = [bytes(self.model), self.inflight]
        if self.partial is not None:
            _base, off, data, n = self.partial
            out += [self.applied(j) for j in range(n + 1, len(data)) if (off + j) % 4096 == 0]
        return out

    def step(self, fd: int) -> None:
        """One op; ``inflight`` is the model it would make (a killed server may have applied it on some
        bricks without answering), ``model`` moves on once it is acknowledged."""
        r, m = self.rng, self.model
        new = bytearray(m)
        x = r.random()
        if x < 0.5:
            off = r.randrange(0, max(len(m), 1) + 65536)
            data = r.randbytes(r.choice([1, 512, 4096, 10000, 65536, 131072]))
            if off + len(data) > MAX_SIZE:
                off = 0
            if off > len(new):
                new.extend(bytes(off - len(new)))
            new[off:off + len(data)] = data
            self.inflight = bytes(new)
            self.partial = (bytes(m), off, data, 0)
            n = os.pwrite(fd, data, off)
            if n != len(data):
                # the kernel's requests for this write after the first n bytes failed (see owed): the n bytes are
                # acknowledged. Only the gfuse kill may do this
                if not self.dead.is_set():
                    self.errors.append(f"{self.ops.total()}: short write {n} of {len(data)}")
                self.partial = (bytes(m), off, data, n)
                self.short_write = True
                new = bytearray(self.applied(n))
            else:
                self.partial = None
            kind = "write"
        elif x < 0.58:
            size = r.randrange(0, max(len(m), 1) + 65536)
            del new[size:]
            new.extend(bytes(size - len(new)))
            self.inflight = bytes(new)
            os.ftruncate(fd, size)
            kind = "truncate"
        elif x < 0.72:
            mode = r.choice([0, FALLOC_KEEP_SIZE, FALLOC_ZERO_RANGE, FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE,
                             FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE])
            off = r.randrange(0, max(len(m), 1) + 32768)
            length = r.randrange(1, 65536)
            if off + length > MAX_SIZE:
                return
            end = off + length
            if mode & (FALLOC_ZERO_RANGE | FALLOC_PUNCH_HOLE):
                stop = min(end, len(new)) if mode & FALLOC_KEEP_SIZE else end
                if stop > len(new):
                    new.extend(bytes(stop - len(new)))
                if stop > off:
                    new[off:stop] = bytes(stop - off)
            elif not mode & FALLOC_KEEP_SIZE and end > len(new):
                new.extend(bytes(end - len(new)))
            self.inflight = bytes(new)
            fallocate(fd, mode, off, length)
            kind = f"fallocate-{mode:#x}"
        elif x < 0.8:
            os.fsync(fd)
            self.synced = bytes(m)
            self.ops["fsync"] += 1
            return
        else:
            got = os.pread(fd, len(m) + 4096, 0)
            if got != bytes(m):
                self.errors.append(f"{self.ops.total()}: read {len(got)} bytes {sha(got)}, model {len(m)} "
                                   f"{sha(m)}")
            self.ops["read"] += 1
            return
        self.model = new
        self.ops[kind] += 1


# ------------------------------------------------------------------------------------------------
# the private cluster, its volume and the gfuse mount


class SoakVolume:
    """A replica-3 volume (``kind``) on the private cluster: brick i on node i mod N + 1."""

    def __init__(self, mc: mcl.MultiCluster, kind: str, name: str, ping: int) -> None:
        self.mc, self.kind, self.name = mc, kind, name
        n_bricks, self.arbiter = KINDS[kind]
        self.nodes = [mc.nodes[i % len(mc.nodes)] for i in range(n_bricks)]
        self.brick_dirs = [node.bricks / name / f"b{i}" for i, node in enumerate(self.nodes)]
        for d in self.brick_dirs:
            d.parent.mkdir(parents=True, exist_ok=True)
        args = ["volume", "create", name, "replica", "3", *(["arbiter", "1"] if self.arbiter else [])]
        self.gluster(*args, *(f"{node.host}:{d}" for node, d in zip(self.nodes, self.brick_dirs)), "force")
        self.gluster("volume", "set", name, "network.ping-timeout", str(ping))
        self.gluster("volume", "start", name)
        self.wait_online()

    def gluster(self, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        return self.mc.gluster(1, *args, timeout=timeout, check=check)

    def is_arbiter(self, i: int) -> bool:
        return bool(self.arbiter) and i % 3 == 2

    def status(self) -> list[tuple[bool, int | None]]:
        """(online, pid) of each brick, in volume order."""
        root = self.mc.gluster_xml(1, "volume", "status", self.name, timeout=60)
        by_path = {}
        for node in root.iter("node"):
            path = node.findtext("path") or ""
            if path.startswith("/"):
                pid = node.findtext("pid") or ""
                by_path[path] = (node.findtext("status") == "1", int(pid) if pid.isdigit() and int(pid) > 0 else None)
        return [by_path.get(str(d), (False, None)) for d in self.brick_dirs]

    def _pidfile(self, i: int) -> Path:
        """glusterd's pid file of brick i (in the node's /run/gluster)."""
        flat = str(self.brick_dirs[i]).replace("/", "-")
        return self.nodes[i].rundir / "vols" / self.name / f"{self.nodes[i].host}{flat}.pid"

    def brick_pid(self, i: int) -> int:
        online, pid = self.status()[i]
        if not online or not procs.alive(pid):
            raise SoakError(f"brick {i} is not running")
        assert pid is not None
        return pid

    def wait_online(self, timeout: float = 60.0) -> None:
        wait_for(lambda: all(on and procs.alive(pid) for on, pid in self.status()), timeout,
                 f"{self.name}: every brick online")

    def kill_brick(self, i: int) -> None:
        pid = self.brick_pid(i)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not procs.alive(pid) and not self.status()[i][0], 30, f"brick {i} offline")

    def pause_brick(self, i: int) -> int:
        pid = self.brick_pid(i)
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: procs.state(pid) in ("T", "t"), 10, f"brick {i} stopped")
        return pid

    def start_force(self, timeout: float = 90.0) -> None:
        """``volume start force`` until every brick is online. A SIGKILLed brick is a zombie until init reaps
        it (about a second here) and glusterd then takes it for running: its pid file goes first."""
        deadline = time.monotonic() + timeout
        while True:
            for i, (online, _pid) in enumerate(self.status()):
                if not online:
                    with contextlib.suppress(OSError, ValueError):
                        if not procs.alive(int(self._pidfile(i).read_text().strip())):
                            self._pidfile(i).unlink()
            self.gluster("volume", "start", self.name, "force", check=False)
            try:
                self.wait_online(timeout=min(10.0, max(deadline - time.monotonic(), 1.0)))
                return
            except SoakError:
                if time.monotonic() >= deadline:
                    raise

    def heal_info(self) -> tuple[bool, str]:
        """Every brick connected with no entry pending (glfsheal against node 1's glusterd)."""
        shown = self.mc.heal_info(1, self.name)
        return all(st == "Connected" and n == 0 for _b, st, n in shown), repr([(st, n) for _b, st, n in shown])

    def heal_done(self, timeout: float) -> tuple[bool, str]:
        """Wait for ``heal info`` empty on every brick, triggering a heal every 10 s (shd's own crawl is 600 s)."""
        deadline = time.monotonic() + timeout
        next_trigger = 0.0
        last = ""
        while time.monotonic() < deadline:
            if time.monotonic() >= next_trigger:
                self.gluster("volume", "heal", self.name, timeout=60, check=False)
                next_trigger = time.monotonic() + 10
            try:
                done, last = self.heal_info()
            except mcl.MultiClusterError as e:
                done, last = False, str(e)
            if done:
                return True, last
            time.sleep(1)
        return False, last

    def data_set(self, name: str) -> list[int]:
        """The bricks of the replica set that holds ``name``'s data (2 x 3: not a DHT linkto file)."""
        for first in range(0, len(self.brick_dirs), 3):
            p = self.brick_dirs[first] / name
            if p.exists() and LINKTO not in os.listxattr(p):
                return [first, first + 1, first + 2]
        raise SoakError(f"no replica set holds {name}")

    def blamed(self, name: str, brick: int) -> bool:
        """Another brick of the set has a pending (blaming) changelog for ``brick`` on ``name``: the fault bit."""
        for j in self.data_set(name):
            if j != brick:
                with contextlib.suppress(OSError):
                    if any(os.getxattr(self.brick_dirs[j] / name, f"trusted.afr.{self.name}-client-{brick}")):
                        return True
        return False

    def delete(self) -> None:
        self.gluster("volume", "stop", self.name, "force", check=False)
        self.gluster("volume", "delete", self.name, check=False)
        for node in self.mc.nodes:
            shutil.rmtree(node.bricks / self.name, ignore_errors=True)

    # -- glusterd ---------------------------------------------------------------------------------

    def restart_glusterd(self, i: int, sig: int, down: float) -> None:
        """Stop node i's glusterd with ``sig`` (its bricks keep running), start it again ``down`` s later."""
        pid = self.mc.node(i).glusterd_pid()
        if pid is None:
            raise SoakError(f"node {i} has no glusterd")
        self.mc.kill_glusterd(i, sig)
        if procs.alive(pid):
            raise SoakError(f"glusterd {i} (pid {pid}) survived signal {sig}")
        time.sleep(down)
        self.mc.start_glusterd(i)
        if len(self.mc.nodes) > 1:
            self.mc.wait_peers()


class SoakMount:
    """``gfuse mount 127.1.1.1:/VOL`` run as a client of the private cluster (its network namespace)."""

    def __init__(self, vol: SoakVolume, ping: int, logdir: Path, n: int) -> None:
        self.vol = vol
        self.path = vol.mc.mountpoint(f"{vol.name}-{n}")
        self.log = logdir / f"gfuse-{vol.name}-{n}.log"
        others = [node.host for node in vol.mc.nodes[1:]]
        opts = [f"ping-timeout={ping}", f"log-file={self.log}"]
        if others:
            opts.append("backup-volfile-servers=" + ":".join(others))
        cmd = [*vol.mc.net_prefix(), sys.executable, "-m", "gfuse.cli", "mount", f"{vol.mc.node(1).host}:/{vol.name}",
               str(self.path), "-o", ",".join(opts)]
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90, cwd=REPO)
        m = re.search(r"\(pid (\d+),", out.stdout)
        self.pid: int | None = int(m.group(1)) if m else None
        if out.returncode != 0 or not m or not mcl.is_mounted(self.path):
            self.unmount()
            raise SoakError(f"gfuse mount failed ({out.returncode}): {out.stdout}{out.stderr}")

    def bricks_up(self) -> bool:
        return all(b["up"] for b in query_status(str(self.path))["bricks"])

    def wait_bricks_up(self, timeout: float = 60.0) -> None:
        wait_for(self.bricks_up, timeout, "gfuse sees every brick up", interval=0.5)

    def mgmt_peer(self) -> str | None:
        """The glusterd (127.1.1.N) the serving process has an established TCP connection to (port 24007): its
        volfile watcher's; None while it has none."""
        assert self.pid is not None
        inodes = set()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{self.pid}/fd/{fd}"))
                if m:
                    inodes.add(m.group(1))
        for line in Path(f"/proc/{self.pid}/net/tcp").read_text().splitlines()[1:]:
            f = line.split()
            addr, _, port = f[2].partition(":")
            if f[9] in inodes and port == GLUSTERD_PORT_HEX and f[3] == "01":  # 01: ESTABLISHED
                return ".".join(str(b) for b in reversed(bytes.fromhex(addr)))
        return None

    def kill(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)

    def unmount(self) -> None:
        if mcl.is_mounted(self.path):
            if subprocess.run(["umount", str(self.path)], capture_output=True, timeout=60).returncode != 0:
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=60)
        if self.pid:
            deadline = time.monotonic() + 10
            while procs.alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                if procs.alive(self.pid):
                    os.kill(self.pid, signal.SIGKILL)
            self.pid = None
        with contextlib.suppress(OSError):
            self.path.rmdir()


# ------------------------------------------------------------------------------------------------
# one round


class Soak:
    def __init__(self, mc: mcl.MultiCluster, args: argparse.Namespace, logdir: Path) -> None:
        self.mc, self.args, self.logdir = mc, args, logdir
        self.ping = args.ping_timeout
        self.tally: defaultdict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self.heal_times: defaultdict[tuple[str, str], list[float]] = defaultdict(list)
        self.failures: list[str] = []
        self.mounts = 0
        self.detail = ""

    def mount(self, vol: SoakVolume) -> SoakMount:
        self.mounts += 1
        return SoakMount(vol, self.ping, self.logdir, self.mounts)

    def fail(self, key: tuple[str, str], what: str, line: str) -> None:
        self.tally[key][what] += 1
        self.failures.append(line)
        print("  FAIL " + line, flush=True)

    def one_round(self, vol: SoakVolume, mnt: SoakMount, k: int, fault: str, seed: int) -> SoakMount:
        rng = random.Random(seed)
        key = (vol.kind, fault)
        where = f"{vol.kind} round {k} ({fault}, round seed {seed})"
        name = f"soak-{k}.bin"
        mnt.wait_bricks_up()
        w = Writer(mnt.path / name, rng.randrange(1 << 30))
        w.start()
        time.sleep(rng.uniform(1.0, 3.0))
        brick = rng.choice(vol.data_set(name))  # on 2 x 3 a brick of the set that holds the file
        detail = f"brick {brick}"
        blamed = False
        if fault == "kill":
            vol.kill_brick(brick)
            time.sleep(rng.uniform(0.5, 3.0))
            blamed = vol.blamed(name, brick)
            vol.start_force()
        elif fault == "stop":
            pid = vol.pause_brick(brick)
            try:
                time.sleep(self.ping + 3)
                blamed = vol.blamed(name, brick)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        elif fault == "glusterd":
            # half the time the glusterd the mount's volfile watcher is connected to (node 1 at first; it moves on
            # to a backup volfile server when that one goes), else any node
            watched = mnt.mgmt_peer()
            hosts = [n.host for n in self.mc.nodes]
            node = (hosts.index(watched) + 1 if watched in hosts and rng.random() < 0.5
                    else rng.randrange(1, len(hosts) + 1))
            sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
            detail = f"glusterd {node} {sig.name}, the watcher's: {hosts[node - 1] == watched}"
            vol.restart_glusterd(node, sig, rng.uniform(0.5, 3.0))
        elif fault == "gfuse":
            detail = f"gfuse pid {mnt.pid} SIGKILL"
            w.dead.set()
            mnt.kill()
        time.sleep(rng.uniform(1.0, 3.0) if fault != "gfuse" else 0.5)
        w.stop.set()
        w.join(120)
        if w.is_alive():
            raise SoakError(f"{where}: the writer is stuck")
        if fault == "gfuse":
            mnt.unmount()
            mnt = self.mount(vol)
        if fault == "glusterd":
            try:
                wait_for(mnt.mgmt_peer, 40, "the mount's volfile watcher connected to a glusterd")
            except SoakError as e:
                self.fail(key, "mgmt-not-reconnected", f"{where}: {e}")
        try:
            mnt.wait_bricks_up()
        except SoakError as e:
            self.fail(key, "bricks-not-up", f"{where}: {e}")
        t_heal = time.monotonic()
        healed, info = vol.heal_done(self.args.heal_timeout)
        heal_s = time.monotonic() - t_heal
        t = self.tally[key]
        t["rounds"] += 1
        t["blamed"] += blamed
        if w.errors:
            self.fail(key, "errors", f"{where}, {detail}: {len(w.errors)} errors, first {w.errors[:3]}")
        if not healed:
            self.fail(key, "heal-timeouts", f"{where}, {detail}: heal info not empty after "
                                           f"{self.args.heal_timeout} s: {info}")
        else:
            self.heal_times[key].append(heal_s)
        data = [i for i in vol.data_set(name) if not vol.is_arbiter(i)]
        # writes reach gfuse synchronously (no writeback cache) and replicate acknowledges only what a quorum
        # has (blame on disk first): even across a gfuse SIGKILL every acknowledged op is owed, not just the
        # fsynced ones (what the issue asks); the op the server was doing when killed may be on some bricks
        # and not others (never answered)
        owed = [bytes(w.model)] if fault != "gfuse" else w.owed()
        copies = [(vol.brick_dirs[i] / name).read_bytes() for i in data]
        via = (mnt.path / name).read_bytes()
        t["bytes-checked"] += sum(map(len, copies)) + len(via)
        bad = [i for i, c in zip(data, copies) if c not in owed]
        if bad or len(set(copies)) > 1 or via not in owed:
            self.fail(key, "mismatches",
                      f"{where}, {detail}: copies {[(i, len(c), sha(c)) for i, c in zip(data, copies)]}, via gfuse "
                      f"{len(via)} {sha(via)}, owed {[(len(o), sha(o)) for o in owed]} "
                      f"(fsynced {len(w.synced)} {sha(w.synced)})")
        if fault == "gfuse" and bytes(w.model) not in copies:
            t["gfuse-inflight-kept"] += 1  # the op in progress at the kill was healed onto every copy
        t["short-writes"] += w.short_write
        if fault == "gfuse" and w.partial is not None and not w.short_write and bytes(w.model) not in copies \
                and w.inflight not in copies:
            t["gfuse-write-split"] += 1  # a page-boundary prefix of the write in progress
        for i in vol.data_set(name):
            if vol.is_arbiter(i) and (vol.brick_dirs[i] / name).stat().st_size != 0:
                self.fail(key, "arbiter-has-data", f"{where}: the arbiter's copy has data")
        t["ops"] += w.ops.total()
        (mnt.path / name).unlink()
        self.detail = detail
        return mnt

    def run_kind(self, kind: str, rounds: int, faults: list[str], rng: random.Random) -> None:
        vol = SoakVolume(self.mc, kind, f"soak_{kind}", self.ping)
        mnt: SoakMount | None = None
        try:
            mnt = self.mount(vol)
            for k in range(rounds):
                fault = faults[k % len(faults)]
                seed = self.args.round_seed if self.args.round_seed is not None else rng.randrange(1 << 30)
                t0 = time.monotonic()
                n_fail = len(self.failures)
                mnt = self.one_round(vol, mnt, k, fault, seed)
                t = self.tally[(kind, fault)]
                print(f"{kind} round {k + 1}/{rounds} ({fault}, {self.detail}): {time.monotonic() - t0:.0f} s, "
                      f"{t['rounds']} rounds {t['ops']} ops of this fault, {len(self.failures)} failures in all",
                      flush=True)
                if len(self.failures) > n_fail and self.args.stop_on_failure:
                    raise SoakError("stopping at the first failure (--stop-on-failure)")
        finally:
            if mnt is not None:
                mnt.unmount()
            vol.delete()

    def report(self) -> str:
        other_keys = ("mgmt-not-reconnected", "bricks-not-up", "arbiter-has-data")

        def row(kind: str, fault: str, t: Counter[str], blamed: object, heal: str) -> str:
            cells = [kind, fault, t["rounds"], blamed, t["ops"], t["bytes-checked"], t["errors"], t["mismatches"],
                     t["heal-timeouts"], sum(t[k] for k in other_keys), heal]
            return "| " + " | ".join(map(str, cells)) + " |"

        rows = ["| kind | fault | rounds | brick blamed | ops acknowledged | bytes checked | errors | mismatches "
                "| heal time-outs | other failures | heal s (median / max) |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        total: Counter[str] = Counter()
        for (kind, fault), t in sorted(self.tally.items(), key=lambda kv: (kv[0][0], FAULTS.index(kv[0][1]))):
            total.update(t)
            hs = self.heal_times[(kind, fault)]
            heal = f"{statistics.median(hs):.1f} / {max(hs):.1f}" if hs else "-"
            rows.append(row(kind, fault, t, t["blamed"] if fault in ("kill", "stop") else "-", heal))
        rows.append(row("all", "all", total, total["blamed"], ""))
        rows.append(f"\ngfuse rounds where the op in progress at the kill ended up on every copy: "
                    f"{total['gfuse-inflight-kept']} (of them holding only a page-boundary prefix of a write: "
                    f"{total['gfuse-write-split']}); where the kill cut a write short (the acknowledged part owed): "
                    f"{total['short-writes']}")
        return "\n".join(rows)


# ------------------------------------------------------------------------------------------------


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="replica3,arbiter,distrep")
    ap.add_argument("--faults", default=",".join(FAULTS),
                    help="cycled through in this order (a glusterd round is followed by a brick kill, same mount)")
    ap.add_argument("--rounds", type=int, default=12, help="rounds per volume kind")
    ap.add_argument("--nodes", type=int, default=3, help="glusterd nodes of the private cluster")
    ap.add_argument("--ping-timeout", type=int, default=5)
    ap.add_argument("--heal-timeout", type=int, default=300)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--round-seed", type=int, help="every round uses this seed (replays a failed round's choices)")
    ap.add_argument("--stop-on-failure", action="store_true")
    ap.add_argument("--logs", type=Path, default=Path("/var/tmp/gfuse-soak"),
                    help="gfuse logs go to LOGS/SEED/; kept (with the cluster's logs) only if a round failed")
    args = ap.parse_args()
    faults = args.faults.split(",")
    kinds = args.kinds.split(",")
    for f in faults:
        if f not in FAULTS:
            ap.error(f"unknown fault {f!r} (one of {', '.join(FAULTS)})")
    for kind in kinds:
        if kind not in KINDS:
            ap.error(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
    reason = mcl.unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    rng = random.Random(args.seed)
    logdir = args.logs / str(args.seed)
    logdir.mkdir(parents=True, exist_ok=True)
    cmd = "python3 bench/soak_replicate.py " + " ".join(sys.argv[1:])
    at = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                        text=True).stdout.strip()
    print(f"{cmd}\nseed {args.seed}, {time.strftime('%Y-%m-%d %H:%M:%S %z')}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, gfuse at {at}", flush=True)
    t0 = time.monotonic()
    mc = mcl.MultiCluster(args.nodes)
    soak = Soak(mc, args, logdir)
    interrupted: str | None = None
    try:
        mc.start()
        if args.nodes > 1:
            mc.peer_all()
        for kind in kinds:
            soak.run_kind(kind, args.rounds, faults, rng)
    except (SoakError, mcl.MultiClusterError) as e:
        interrupted = f"{type(e).__name__}: {e}"
    except KeyboardInterrupt as e:
        interrupted = f"interrupted ({e or 'Ctrl-C'})"
    finally:
        if soak.failures or interrupted:
            for node in mc.nodes:
                with contextlib.suppress(OSError):
                    shutil.copytree(node.logdir, logdir / f"node{node.index}", dirs_exist_ok=True)
        mc.stop()
    print(f"\nseed {args.seed}, {time.monotonic() - t0:.0f} s, load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for line in soak.failures:
        print("failure: " + line)
    if interrupted:
        print("stopped early: " + interrupted)
    print(soak.report())
    mismatches = sum(t["mismatches"] for t in soak.tally.values())
    print(f"mismatches: {mismatches}, failures: {len(soak.failures)}")
    if soak.failures or interrupted:
        print(f"logs kept in {logdir}")
        return 1
    shutil.rmtree(logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
