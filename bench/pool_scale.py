#!/usr/bin/env python3
"""N subdir PVs of one pool volume staged on one node through the gfuse agent (issue 13).

A throwaway replica-3 volume on loopback gets N directories; a gfuse agent (its own socket, state file,
holder and stand-in kubelet directory) stages each as a PV -- the mount request CSI NodeStageVolume and
the FlexVolume driver send -- one after the other. Printed: the stage time of the 1st, the median and the
Nth PV, the gfuse processes and their RSS in all (serving processes, the holder and its standby), the TCP
connections to each brick, the machine's load average, and the command to rerun. ``--per-pv`` runs the
agent without ``--pool-subdirs`` (one gfuse mount per PV, the behaviour before) for comparison.

Everything made (mounts, agent, holder, gfuse processes, the volume, the directories) is removed at the
end, also on Ctrl-C or SIGTERM.

Rerun (root, on a machine with glusterd, see /work/shared/TESTBED.md):
    python3 bench/pool_scale.py --pvs 100
    python3 bench/pool_scale.py --pvs 10 --per-pv        # the baseline: a gfuse server per PV
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testkit import cluster as tc
from testkit.kubelet import AgentProcess, cleanup_mounts_under, gfuse_serving_pids_under


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def gfuse_processes(root: Path, holder_socket: str) -> dict[str, list[int]]:
    """gfuse processes this run made: serving ones (mounts below ``root``), the holder's standby, the holder."""
    serving: list[int] = []
    standby: list[int] = []
    for pid in gfuse_serving_pids_under(str(root)):
        (standby if "--standby" in _cmdline(pid) else serving).append(pid)
    holder = [int(n) for n in os.listdir("/proc") if n.isdigit() and holder_socket in _cmdline(int(n))
              and "gfuse.holder" in " ".join(_cmdline(int(n)))]
    return {"serving": serving, "standby": standby, "holder": holder}


def brick_connections(pids: list[int], vol: tc.Volume) -> dict[int, int]:
    """Established TCP connections of ``pids`` to each brick's port."""
    ports = {vol.brick_port(i): i for i in range(len(vol.bricks))}
    out = dict.fromkeys(ports.values(), 0)
    for pid in pids:
        inodes = set()
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with_link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if with_link.startswith("socket:["):
                    inodes.add(with_link[8:-1])
            tables = [Path(f"/proc/{pid}/net/{t}").read_text() for t in ("tcp", "tcp6")]
        except OSError:
            continue
        for text in tables:
            for line in text.splitlines()[1:]:
                f = line.split()
                port = int(f[2].rsplit(":", 1)[1], 16)
                if f[9] in inodes and f[3] == "01" and port in ports:
                    out[ports[port]] += 1
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pvs", type=int, default=100, help="subdir PVs to stage (default %(default)s)")
    p.add_argument("--per-pv", action="store_true", help="one gfuse mount per PV (the agent without --pool-subdirs)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    if os.geteuid() != 0:
        print("pool_scale: needs root (mounts)", file=sys.stderr)
        return 2
    why = tc.unavailable_reason()
    if why:
        print(f"pool_scale: no GlusterFS here: {why}", file=sys.stderr)
        return 2
    tc.ensure_glusterd()
    work = Path(tempfile.mkdtemp(prefix="gfuse-poolscale-"))
    vol = agent = None
    try:
        vol = tc.create_volume("replica3")
        names = [f"pvc-{i:04d}" for i in range(args.pvs)]
        with vol.mount(work / "native") as native:
            for n in names:
                (native.path / n).mkdir()
        extra = () if args.per_pv else ("--pool-subdirs", "yes")
        agent = AgentProcess(work / "agent", health_interval=10.0, extra_args=extra,
                             kubelet_dir=work / "kubelet").start()
        c = agent.client(timeout=120)
        times = []
        for i, n in enumerate(names):
            staging = work / "kubelet" / "plugins" / "kubernetes.io" / "csi" / "gfuse" / n / "globalmount"
            t0 = time.monotonic()
            c.mount(f"{vol.source}/{n}", str(staging), timeout=120,
                    context={"csi.volume_id": f"subdir:{vol.source}/{n}", "csi.role": "staging"})
            times.append(time.monotonic() - t0)
            if (i + 1) % 25 == 0:
                print(f"  staged {i + 1}/{len(names)}", file=sys.stderr)
        time.sleep(2)  # the holder's standby starts after the first restartable mount
        procs = gfuse_processes(work, agent.holder_socket)
        everyone = [pid for group in procs.values() for pid in group]
        rss = {k: sum(_rss_kib(pid) for pid in v) / 1024 for k, v in procs.items()}
        conns = brick_connections(procs["serving"], vol)
        ok = all(Path(work / "kubelet" / "plugins" / "kubernetes.io" / "csi" / "gfuse" / n / "globalmount")
                 .is_dir() for n in names[:: max(1, len(names) // 10)])
        load = os.getloadavg()
        mode = "one gfuse mount per PV (--per-pv)" if args.per_pv else "pool mounts (--pool-subdirs yes)"
        print(f"\n{args.pvs} subdir PVs of one replica-3 pool on one node, {mode}")
        print(f"  stage time: 1st {times[0]:.3f} s, median {statistics.median(times):.3f} s, "
              f"{len(times)}th {times[-1]:.3f} s (all {sum(times):.1f} s)")
        print(f"  gfuse processes: {len(everyone)} ({len(procs['serving'])} serving, {len(procs['standby'])} standby, "
              f"{len(procs['holder'])} holder)")
        print(f"  gfuse RSS in all: {sum(rss.values()):.0f} MiB (serving {rss['serving']:.0f}, standby "
              f"{rss['standby']:.0f}, holder {rss['holder']:.0f})")
        print("  TCP connections per brick: " + ", ".join(f"brick {i}: {n}" for i, n in sorted(conns.items())))
        print(f"  PVs answer: {'yes' if ok else 'NO'}")
        print(f"  load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} cores)")
        print(f"  rerun: python3 bench/pool_scale.py {shlex.join(sys.argv[1:])}".rstrip())
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\npool_scale: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if agent is not None:
            agent.close()
        cleanup_mounts_under(work)
        if vol is not None:
            try:
                vol.delete()
            except tc.GlusterError as e:
                print(f"pool_scale: could not delete volume {vol.name}: {e}", file=sys.stderr)
        import shutil

        from gfuse.mounttable import mounts_under

        if not mounts_under(str(work)):  # never remove through a mount left behind
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"pool_scale: mounts left below {work}; not removing it", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
