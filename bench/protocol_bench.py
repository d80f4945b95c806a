#!/usr/bin/env python3
"""Protocol-layer benchmark: LOOKUP and STAT calls/s, 1 MiB READ/WRITE MB/s against one brick.

Talks to the first brick of VOLUME through gfuse's protocol client only (no FUSE, no
replication), with N calls in flight, so it measures the codec + transport + brick.

Rerun:
    python bench/protocol_bench.py 127.0.0.1:/VOLUME            # an existing volume
    python bench/protocol_bench.py --make-volume                 # a throwaway 1-brick volume on loopback

Figures are printed per operation; nothing is timed inside the test suite.
"""

from __future__ import annotations

import argparse
import os
import stat as st
import sys
import time

import trio

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gfuse.iatt import ROOT_GFID
from gfuse.mgmt import fetch_graph, parse_volume_spec
from gfuse.cred import new_gfid
from gfuse.xlators.client import BrickClient


async def _timed(n: int, concurrency: int, fn) -> float:
    """Run ``fn(i)`` n times with ``concurrency`` in flight; return seconds."""
    it = iter(range(n))

    async def worker() -> None:
        for i in it:
            await fn(i)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return time.perf_counter() - t0


async def bench(spec_text: str, seconds_hint: int, concurrency: int, mib: int) -> None:
    spec = parse_volume_spec(spec_text)
    server, graph = await fetch_graph([spec.server], spec.volume)
    xl = graph.clients()[0]
    print(f"volume {spec.volume} ({graph.shape()}); brick {xl.options['remote-host']}:{xl.options['remote-subvolume']}")
    print(f"concurrency {concurrency}")
    async with trio.open_nursery() as nursery:
        c = BrickClient(xl, server, volfile_key=spec.volume, process_name="gfuse-bench")
        await nursery.start(c.run)
        if not c.is_up:
            raise SystemExit(f"brick down: {c.last_error}")
        name = f"bench-{os.getpid()}"
        gfid = new_gfid()
        r = await c.create(ROOT_GFID, name, os.O_RDWR | os.O_CREAT | os.O_EXCL, st.S_IFREG | 0o644, gfid)
        fd = r.fd
        try:
            n = 2000 * seconds_hint
            t = await _timed(n, concurrency, lambda i: c.lookup(ROOT_GFID, name))
            print(f"LOOKUP  {n / t:10.0f} calls/s   ({n} calls in {t:.2f}s)")
            t = await _timed(n, concurrency, lambda i: c.stat(gfid))
            print(f"STAT    {n / t:10.0f} calls/s   ({n} calls in {t:.2f}s)")
            block = os.urandom(1 << 20)
            t = await _timed(mib, min(concurrency, 8), lambda i: c.write(fd, i << 20, block))
            print(f"WRITE   {mib / t:10.1f} MiB/s     ({mib} x 1 MiB in {t:.2f}s)")
            t = await _timed(mib, min(concurrency, 8), lambda i: c.read(fd, i << 20, 1 << 20))
            print(f"READ    {mib / t:10.1f} MiB/s     ({mib} x 1 MiB in {t:.2f}s)")
        finally:
            await c.release(fd)
            await c.unlink(ROOT_GFID, name)
            nursery.cancel_scope.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("volume", nargs="?", help="SERVER:/VOLUME (omit with --make-volume)")
    ap.add_argument("--make-volume", action="store_true", help="create a throwaway 1-brick volume on loopback")
    ap.add_argument("--seconds", type=int, default=2, help="scale of the metadata runs (2000 calls per unit)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--mib", type=int, default=512, help="MiB written then read")
    a = ap.parse_args()
    if a.make_volume:
        from testkit import cluster as testcluster

        testcluster.ensure_glusterd()
        vol = testcluster.create_volume("dist1")
        try:
            trio.run(bench, vol.source, a.seconds, a.concurrency, a.mib)
        finally:
            vol.delete()
    elif a.volume:
        trio.run(bench, a.volume, a.seconds, a.concurrency, a.mib)
    else:
        ap.error("give SERVER:/VOLUME or --make-volume")


if __name__ == "__main__":
    main()
