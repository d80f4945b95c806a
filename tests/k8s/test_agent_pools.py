"""Subdir PVs of one pool volume share one gfuse mount on a node (issue 13, flexvolume.pools).

Real GlusterFS volume (a private replica 3 with a quota, tests/conftest.py), real gfuse mounts, the agent as
a separate process (testkit.kubelet.AgentProcess) with ``--pool-subdirs yes``. The mount requests are what
the FlexVolume driver's ``mount`` and the CSI plugin's NodeStageVolume send (AgentClient.mount); no kubelet
can run here.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import pytest

from flexvolume.agentclient import AgentError
from flexvolume.storage.backends import QUOTA_OPTIONS
from gfuse.mounttable import mounts_at, pid_alive
from testkit import cluster as tc
from testkit.kubelet import AgentProcess, cleanup_mounts_under, gfuse_serving_pids_under, wait_for

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

MiB = 1 << 20


@pytest.fixture
def pool_vol(make_volume, native_mount):
    """A replica-3 volume with directories a, b (quota 2 MiB on a) and a symlink to / -- the pool. Quota options
    as the subdir backend sets them before the first start (QUOTA_OPTIONS: without them 10.3 did not enforce)."""
    vol = make_volume("replica3", options=QUOTA_OPTIONS)
    root = native_mount(vol).path
    for d in ("a", "b"):
        (root / d).mkdir()
        (root / d / f"only-in-{d}").write_text(d)
    os.symlink("/", root / "escape")
    tc.gluster("volume", "quota", vol.name, "enable", timeout=60)
    tc.gluster("volume", "quota", vol.name, "limit-usage", "/a", "2MB", timeout=60)
    return vol


def _agent(tmp_path: Path, *extra: str) -> AgentProcess:
    return AgentProcess(tmp_path / "agent", health_interval=1.0, probe_timeout=3.0,
                        extra_args=("--pool-subdirs", "yes", *extra))


def _brick_connections(pid: int, vol: tc.Volume) -> dict[int, int]:
    """TCP connections of ``pid`` to each brick's port (from /proc: the socket inodes of its fds)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with_target = os.readlink(f"/proc/{pid}/fd/{fd}") if os.path.islink(f"/proc/{pid}/fd/{fd}") else ""
        if with_target.startswith("socket:["):
            inodes.add(with_target[8:-1])
    ports = {vol.brick_port(i): i for i in range(len(vol.bricks))}
    out = dict.fromkeys(ports.values(), 0)
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            port = int(f[2].rsplit(":", 1)[1], 16)
            if f[9] in inodes and f[3] == "01" and port in ports:  # ESTABLISHED
                out[ports[port]] += 1
    return out


def _servers(root: Path) -> list[int]:
    """gfuse serving processes of mounts below ``root`` (not the holder's standby, which serves nothing yet)."""
    return [p for p in gfuse_serving_pids_under(str(root))
            if b"--standby" not in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")]


def _pools(c) -> list[dict]:
    return c.call({"op": "list"})["pools"]


def _write_until_edquot(d: Path, limit: int) -> int:
    written = 0
    deadline = time.monotonic() + 20
    while written < 4 * limit and time.monotonic() < deadline:
        try:
            with open(d / f"fill-{time.monotonic_ns()}", "wb") as f:
                f.write(b"x" * MiB)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            assert e.errno == errno.EDQUOT, e
            return written
        written += MiB
        time.sleep(0.3)  # the quota's accounting reaches the bricks with a delay
    pytest.fail(f"no EDQUOT after {written} bytes into a {limit}-byte PV")


@pytest.mark.timeout(120)
def test_two_pvs_one_server_isolated_quota_refcounted_across_restart(pool_vol, tmp_path: Path) -> None:
    a = _agent(tmp_path).start()
    try:
        c = a.client()
        ta, tb = tmp_path / "pods" / "p1" / "a", tmp_path / "pods" / "p2" / "b"
        ra = c.mount(f"{pool_vol.source}/a", str(ta), context={"pod": "p1"})
        rb = c.mount(pool_vol.source, str(tb), options=["subdir=b"])  # subdir= is the same PV kind
        assert ra["already"] is False and rb["already"] is False
        [pid] = _servers(tmp_path)
        assert ra["pid"] == rb["pid"] == pid
        assert _brick_connections(pid, pool_vol) == {0: 1, 1: 1, 2: 1}
        # each PV is a bind of its own directory only; the pool mount itself is root-only, outside pods
        [pool] = _pools(c)
        assert pool["refs"] == 2 and pool["targets"] == sorted([str(ta), str(tb)]) and pool["pid"] == pid
        assert pool["source"] == pool_vol.source and os.stat(os.path.dirname(pool["target"])).st_mode & 0o777 == 0o700
        assert {m["target"]: (m["pool"], m["subdir"], m["pid"]) for m in c.list()} == {
            str(ta): (pool["target"], "a", pid), str(tb): (pool["target"], "b", pid)}
        assert mounts_at(str(ta))[-1].root == "/a" and mounts_at(str(tb))[-1].root == "/b"
        assert sorted(os.listdir(ta)) == ["only-in-a"] and sorted(os.listdir(tb)) == ["only-in-b"]
        (ta / "x").write_text("written through a")
        assert not (tb / "x").exists()
        # idempotent; a missing subdirectory or one that is a symlink: an error, nothing mounted
        assert c.mount(f"{pool_vol.source}/a", str(ta))["already"] is True
        for sub, why in (("no/such", "'no': No such file or directory"), ("escape", "is not a directory")):
            bad = tmp_path / "pods" / "p3" / sub.replace("/", "-")
            with pytest.raises(AgentError) as ei:
                c.mount(f"{pool_vol.source}/{sub}", str(bad))
            assert ei.value.code == "unavailable" and why in ei.value.message, ei.value.message
            assert ei.value.message.startswith(f"cannot mount {pool_vol.source}/{sub} on {bad}: ")
            assert not mounts_at(str(bad))
        assert _pools(c)[0]["refs"] == 2 and len(c.list()) == 2
        # the quota of a holds for a: EDQUOT at its 2 MiB; b (no quota) takes more than that
        written = _write_until_edquot(ta, 2 * MiB)
        assert MiB <= written <= 4 * MiB, written
        (tb / "big").write_bytes(b"y" * (3 * MiB))
        assert (tb / "big").stat().st_size == 3 * MiB

        # unmount one: the other keeps working on the same server
        assert c.unmount(str(tb)) == {"ok": True, "was_mounted": True}
        assert not mounts_at(str(tb)) and (ta / "x").read_text() == "written through a"
        assert _pools(c)[0]["refs"] == 1 and _servers(tmp_path) == [pid]

        # the agent is killed and replaced: the PV, its pool and its count are still there
        a.kill()
        a = _agent(tmp_path).start()
        c = a.client()
        a.wait_health_passes(1)
        [m] = c.list()
        assert m["target"] == str(ta) and m["pool"] == pool["target"] and m["pid"] == pid and m["healthy"]
        assert _pools(c)[0]["refs"] == 1
        assert c.mount(f"{pool_vol.source}/b", str(tb))["pid"] == pid  # the same server, count 2 again
        assert _pools(c)[0]["refs"] == 2 and (tb / "only-in-b").read_text() == "b"
        assert _servers(tmp_path) == [pid]

        # the last unmount takes the pool mount with it
        c.unmount(str(ta))
        assert _pools(c)[0]["refs"] == 1 and (tb / "big").stat().st_size == 3 * MiB
        c.unmount(str(tb))
        assert _pools(c) == [] and c.list() == [] and not mounts_at(pool["target"])
        wait_for(lambda: not pid_alive(pid), 10, "the pool's server to exit")
        assert not os.path.exists(pool["target"])
    finally:
        a.close()
        cleanup_mounts_under(tmp_path)


@pytest.mark.timeout(120)
def test_killed_pool_server_is_repaired_and_every_pv_works_again(pool_vol, tmp_path: Path) -> None:
    """Repair-only (--restartable no): the fresh pool mount is a new FUSE connection, each PV is bound again."""
    a = _agent(tmp_path, "--restartable", "no").start()
    try:
        c = a.client()
        targets = {sub: tmp_path / "pods" / sub / "vol" for sub in ("a", "b")}
        pids = {c.mount(f"{pool_vol.source}/{sub}", str(t))["pid"] for sub, t in targets.items()}
        [pid] = pids
        pool_dir = _pools(c)[0]["target"]
        old_dev = mounts_at(pool_dir)[-1].dev
        os.kill(pid, signal.SIGKILL)

        def both_work() -> bool:
            try:
                return all((t / f"only-in-{sub}").read_text() == sub for sub, t in targets.items())
            except OSError:
                return False
        wait_for(both_work, 40, "both PVs to work again after the pool's repair")
        [new_pid] = _servers(tmp_path)
        assert new_pid != pid
        for sub, t in targets.items():
            assert mounts_at(str(t))[-1].dev == mounts_at(pool_dir)[-1].dev != old_dev
            (t / "after-repair").write_text(sub)
        wait_for(lambda: all(m["healthy"] and m["pid"] == new_pid and m["repairs"] == 1 for m in c.list()), 10,
                 "the agent to report both PVs healthy on the new server")
        [pool] = _pools(c)
        assert pool["repairs"] == 1 and pool["refs"] == 2 and pool["pid"] == new_pid
        for t in targets.values():
            c.unmount(str(t))
            assert not mounts_at(str(t))  # the dead bind underneath went too
        assert _pools(c) == [] and not mounts_at(pool_dir)
        wait_for(lambda: not pid_alive(new_pid), 10, "the pool's server to exit")
    finally:
        a.close()
        cleanup_mounts_under(tmp_path)
