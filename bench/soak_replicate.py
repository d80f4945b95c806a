#!/usr/bin/env python3
"""Fault soak of gfuse's replicate translator (issue 14): no acknowledged write is lost or hidden.

Each round a checksummed writer works on a fresh file through a gfuse mount — writes of random sizes at
random offsets, ftruncates, fallocate (plain, KEEP_SIZE, ZERO_RANGE with and without KEEP_SIZE, PUNCH_HOLE),
fsyncs, reads checked against its model — while one fault is injected:

- ``kill``: a brick (random) is SIGKILLed, brought back with ``volume start force`` a little later;
- ``stop``: a brick is SIGSTOPped for longer than the volume's ping-timeout (set to ``--ping-timeout``),
  then SIGCONTed — gfuse drops it after the ping-timeout, the writes go on to the two others;
- ``gfuse``: the gfuse server is SIGKILLed (the writer's next calls fail) and the volume is mounted again.
  gfuse has no writeback cache, so every op the writer was acknowledged is owed, not only what it fsynced;
  the op in progress at the kill may be on some bricks only.

Two bricks are up all along, so (except after a gfuse kill) no call may fail. Each round ends with the
self-heal daemon done (``heal info`` empty on every brick) and every data brick's copy equal to what the
writer was acknowledged (after a gfuse kill: that, or that plus the op in progress), the arbiter's copy
empty, and a read through gfuse equal to it too. Printed: the tally per fault, and any mismatch.

Run (root, glusterd running; throwaway volumes on loopback, deleted at the end):
    python3 bench/soak_replicate.py --rounds 50                      # replica 3 and arbiter, 50 rounds each
    python3 bench/soak_replicate.py --kinds distrep --rounds 50      # 2 x 3 (a fault on either set)
    python3 bench/soak_replicate.py --kinds arbiter --rounds 10 --faults kill,stop
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testkit import cluster as tc

FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
MAX_SIZE = 4 << 20


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def sha(b: bytes | bytearray) -> str:
    return hashlib.sha256(b).hexdigest()[:12]


class Writer(threading.Thread):
    """Random ops on ``path``; ``model`` is what the acknowledged ops say the file holds."""

    def __init__(self, path: Path, seed: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.rng = random.Random(seed)
        self.model = bytearray()
        self.synced = b""  # the model at the last acknowledged fsync
        self.inflight = b""  # the model the op in progress would make
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
                time.sleep(0.01)
        finally:
            try:
                os.close(fd)
            except OSError as e:
                if not self.dead.is_set():
                    self.errors.append(f"close: {e!r}")

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
            n = os.pwrite(fd, data, off)
            if n != len(data):
                self.errors.append(f"{self.ops.total()}: short write {n} of {len(data)}")
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


def heal_done(vol: tc.Volume, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    next_trigger = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_trigger:
            tc.gluster("volume", "heal", vol.name, timeout=60, check=False)
            next_trigger = time.monotonic() + 10
        root = tc.gluster_xml("volume", "heal", vol.name, "info", timeout=60)
        bricks = list(root.iter("brick"))
        if bricks and all((b.findtext("status") or "").strip() == "Connected"
                          and (b.findtext("numberOfEntries") or "").strip() == "0" for b in bricks):
            return True
        time.sleep(1)
    return False


def data_set(vol: tc.Volume, name: str) -> list[int]:
    """The bricks of the replica set that holds ``name``'s data (2 x 3: not a DHT linkto file)."""
    for first in range(0, len(vol.brick_dirs), 3):
        p = vol.brick_dir(first) / name
        if p.exists() and LINKTO not in os.listxattr(p):
            return [first, first + 1, first + 2]
    raise AssertionError(f"no replica set holds {name}")


LINKTO = "trusted.glusterfs.dht.linkto"


def one_round(vol: tc.Volume, mnt: tc.GfuseMount, k: int, fault: str, rng: random.Random, ping: int,
              tally: Counter[str], log: list[str]) -> tc.GfuseMount:
    name = f"soak-{k}.bin"
    w = Writer(mnt.path / name, rng.randrange(1 << 30))
    w.start()
    time.sleep(rng.uniform(1.0, 3.0))
    brick = rng.randrange(len(vol.brick_dirs))
    if fault == "kill":
        vol.kill_brick(brick)
        time.sleep(rng.uniform(0.5, 3.0))
        vol.start_force()
    elif fault == "stop":
        vol.pause_brick(brick)
        time.sleep(ping + 3)
        vol.resume_brick(brick)
    elif fault == "gfuse":
        w.dead.set()
        assert mnt.pid is not None
        os.kill(mnt.pid, signal.SIGKILL)
    time.sleep(rng.uniform(1.0, 3.0) if fault != "gfuse" else 0.5)
    w.stop.set()
    w.join(120)
    if fault == "gfuse":
        mnt.unmount()
        mnt = tc.GfuseMount(vol, options=[f"ping-timeout={ping}"])
        mnt.mount()
    healed = heal_done(vol, 300)
    tally[f"{fault}:rounds"] += 1
    if w.errors:
        tally[f"{fault}:errors"] += len(w.errors)
        log.append(f"round {k} ({fault}): {len(w.errors)} errors, first {w.errors[:3]}")
    if not healed:
        tally[f"{fault}:heal-timeouts"] += 1
        log.append(f"round {k} ({fault}): heal info not empty after 300 s")
    data_bricks = [i for i in data_set(vol, name) if not (vol.kind == "arbiter" and i % 3 == 2)]
    # writes reach gfuse synchronously (no writeback cache) and replicate acknowledges only what a quorum has
    # (blame on disk first): even across a gfuse SIGKILL every acknowledged op is owed, not just the fsynced
    # ones; the op the server was doing when killed may be on some bricks and not others (never answered)
    owed = [bytes(w.model)] if fault != "gfuse" else [bytes(w.model), w.inflight]
    copies = [(vol.brick_dir(i) / name).read_bytes() for i in data_bricks]
    via = (mnt.path / name).read_bytes()
    bad = [i for i, c in zip(data_bricks, copies) if c not in owed]
    if bad or (fault != "gfuse" and len(set(copies)) > 1) or via not in owed:
        tally[f"{fault}:mismatches"] += 1
        log.append(f"round {k} ({fault}, brick {brick}): copies {[(len(c), sha(c)) for c in copies]}, via gfuse "
                   f"{len(via)} {sha(via)}, owed {[(len(o), sha(o)) for o in owed]}")
    if vol.kind == "arbiter" and (vol.brick_dir(2) / name).stat().st_size != 0:
        tally[f"{fault}:arbiter-has-data"] += 1
    tally["ops"] += w.ops.total()
    (mnt.path / name).unlink()
    return mnt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="replica3,arbiter")
    ap.add_argument("--faults", default="kill,stop,gfuse")
    ap.add_argument("--rounds", type=int, default=10, help="rounds per volume kind")
    ap.add_argument("--ping-timeout", type=int, default=5)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--stop-on-failure", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    faults = args.faults.split(",")
    tally: Counter[str] = Counter()
    log: list[str] = []
    t0 = time.monotonic()
    shown = 0
    for kind in args.kinds.split(","):
        shown = len(log)
        vol = tc.create_volume(kind, options={"network.ping-timeout": args.ping_timeout})
        mnt = tc.GfuseMount(vol, options=[f"ping-timeout={args.ping_timeout}"])
        try:
            mnt.mount()
            for k in range(args.rounds):
                fault = faults[k % len(faults)]
                mnt = one_round(vol, mnt, k, fault, rng, args.ping_timeout, tally, log)
                print(f"{kind} round {k + 1}/{args.rounds} ({fault}): {dict(sorted(tally.items()))}", flush=True)
                for line in log[shown:]:
                    print("  " + line, flush=True)
                shown = len(log)
                if log and args.stop_on_failure:
                    break
        finally:
            mnt.unmount()
            vol.delete()
    print(f"\nseed {args.seed}, {time.monotonic() - t0:.0f} s")
    for line in log:
        print(line)
    print("tally:", dict(sorted(tally.items())))
    bad = sum(v for key, v in tally.items() if key.endswith((":errors", ":mismatches", ":heal-timeouts",
                                                                ":arbiter-has-data")))
    print("mismatches:", sum(v for key, v in tally.items() if key.endswith(":mismatches")))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
