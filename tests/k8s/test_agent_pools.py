"""Subdir PVs of one pool volume share one gfuse mount on a node (issue 13, flexvolume.pools).

Real GlusterFS volume (a private replica 3 with a quota, tests/conftest.py), real gfuse mounts, the agent as
a separate process (testkit.kubelet.AgentProcess) with ``--pool-subdirs yes``. The mount requests are what
the FlexVolume driver's ``mount`` and the CSI plugin's NodeStageVolume send (AgentClient.mount); no kubelet
can run here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from flexvolume.agentclient import AgentError
from flexvolume.storage.backends import QUOTA_OPTIONS
from gfuse.mounttable import mounts_at, mounts_under, pid_alive
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


# -- CSI on pools: NodeStage/Publish/GetVolumeStats/Unpublish/Unstage of pooled subdir PVs -------------------


def _scrape(log: Path) -> str:
    import re
    import urllib.request

    m = re.search(r"metrics on http://([^/\s]+)/metrics", log.read_text(errors="replace"))
    assert m, "the agent logged no metrics address"
    with urllib.request.urlopen(f"http://{m.group(1)}/metrics", timeout=15) as r:
        return r.read().decode()


def _series(text: str, name: str, **labels: str) -> list[float]:
    """Values of the samples of ``name`` whose labels include ``labels``."""
    out = []
    for line in text.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            out.append(float(value))
    return out


@pytest.mark.timeout(180)
def test_csi_node_on_a_pool_one_server_quota_stats_metrics_takeover(request, pool_vol) -> None:
    """The CSI node plugin with an agent that pools subdir PVs (what the DaemonSet runs): two PVs of one volume
    staged are binds of one gfuse mount of it (one server), published at three targets; NodeGetVolumeStats and
    statvfs of a target show its PV's quota (a: 2 MiB) or the volume's size (b: no quota), and a normal
    condition; /metrics has each PV's series under its own target; a SIGKILL of the pool's server (restartable:
    the holder keeps the connection) is taken over with no repair and every bind -- open fds included -- keeps
    working; unstaging the last PV unmounts the pool."""
    from test_csi import csi_processes, mount_cap, pb, pb_grpc

    with csi_processes(request, agent_args=("--pool-subdirs", "yes", "--metrics-address", "127.0.0.1:0")) as csi:
        agent = csi.agent_client()
        ch = csi.channel()
        try:
            node = pb_grpc.NodeStub(ch)
            cap = mount_cap()
            targets: dict[str, tuple[str, str, bool]] = {}
            vids = {sub: f"{pool_vol.source}/{sub}" for sub in ("a", "b")}
            staging = {sub: csi.staging(f"pv-{sub}") for sub in vids}
            for sub, vid in vids.items():
                stage = pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging[sub],
                                                  volume_capability=cap)
                node.NodeStageVolume(stage, timeout=90)
                node.NodeStageVolume(stage, timeout=90)  # idempotent: no second bind, no second reference
            [pool] = _pools(agent)
            [pid] = _servers(csi.root)
            restartable = pool["restartable"]  # where the kernel has FUSE_NOTIFY_RESEND (Linux >= 6.9)
            print(f"pool mount {pool['mode']}")
            assert pool["refs"] == 2 and pool["pid"] == pid and pool["targets"] == sorted(staging.values())
            pdev = mounts_at(pool["target"])[-1].dev
            for sub, st in staging.items():
                [m] = mounts_at(st)
                assert m.fstype == "fuse.gfuse" and m.root == f"/{sub}" and m.dev == pdev, m
            targets |= {"a-rw": ("a", csi.target("pod-1", "pv-a"), False),
                       "a-ro": ("a", csi.target("pod-2", "pv-a"), True),
                       "b-rw": ("b", csi.target("pod-3", "pv-b"), False)}
            for sub, t, ro in targets.values():
                publish = pb.NodePublishVolumeRequest(volume_id=vids[sub], staging_target_path=staging[sub],
                                                      target_path=t, volume_capability=cap, readonly=ro)
                node.NodePublishVolume(publish, timeout=30)
                node.NodePublishVolume(publish, timeout=30)
                [m] = mounts_at(t)
                assert m.root == f"/{sub}" and m.dev == pdev and m.readonly == ro, m
                assert sorted(os.listdir(t)) == [f"only-in-{sub}"]  # its own directory, nothing else
            assert _pools(agent)[0]["refs"] == 2 and _servers(csi.root) == [pid]
            with pytest.raises(OSError) as ei:
                Path(targets["a-ro"][1], "nope").write_text("x")
            assert ei.value.errno == errno.EROFS

            # statfs per PV: a's quota (2 MiB) through the target and NodeGetVolumeStats; b shows the volume
            vfs_b = os.statvfs(targets["b-rw"][1])
            for name, (sub, t, _) in targets.items():
                vfs = os.statvfs(t)
                total = vfs.f_blocks * vfs.f_frsize
                if sub == "a":
                    assert total == 2 * MiB, (name, vfs)
                else:
                    assert total > 64 * MiB, (name, vfs)
                stats = node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vids[sub], volume_path=t),
                                                timeout=30)
                assert not stats.volume_condition.abnormal, stats
                assert stats.volume_condition.message == f"the gfuse mount of {vids[sub]} answers", stats
                usage = {u.unit: u for u in stats.usage}
                assert usage[pb.VolumeUsage.BYTES].total == total, (name, stats)
            assert vfs_b.f_blocks * vfs_b.f_frsize > 2 * MiB

            # metrics: each PV's series under its own target and source, served by the pool; the pool's once
            text = _scrape(csi.agent_log)
            for sub, st in staging.items():
                lab = {"target": st, "source": vids[sub], "volume": pool_vol.name, "bridge": "csi"}
                assert _series(text, "gfuse_mount_up", **lab) == [1.0], text
                assert _series(text, "gfuse_mount_healthy", **lab) == [1.0]
                assert _series(text, "gfuse_mount_pool", **lab, pool=pool["target"]) == [1.0]
                assert _series(text, "gfuse_mount_bricks_up", **lab) == [3.0]
                assert _series(text, "gfuse_read_bytes_total", target=st) == []  # the pool's, not repeated
            assert _series(text, "gfuse_mount_up", target=pool["target"], bridge="pool") == [1.0]
            assert len(_series(text, "gfuse_read_bytes_total", target=pool["target"])) == 1
            assert _series(text, "gfuse_agent_mounts") == [2.0] and _series(text, "gfuse_agent_pools") == [1.0]

            if restartable:
                # the pool's server SIGKILLed under open fds of every target: a takeover, not a repair
                fds = {name: os.open(os.path.join(t, f"held-{name}"), os.O_RDWR | os.O_CREAT)
                       for name, (_, t, ro) in targets.items() if not ro}
                try:
                    os.kill(pid, signal.SIGKILL)
                    wait_for(lambda: not pid_alive(pid), 10, "the pool's server to die")
                    for fd in fds.values():
                        assert os.pwrite(fd, b"after the kill", 0) == 14  # waits for the successor
                        os.fsync(fd)
                    for name, (sub, t, _) in targets.items():
                        assert len(mounts_at(t)) == 1 and mounts_at(t)[-1].dev == pdev, name  # nothing stacked
                        assert (Path(t) / f"only-in-{sub}").read_text() == sub
                    assert Path(targets["a-ro"][1], "held-a-rw").read_bytes() == b"after the kill"
                finally:
                    for fd in fds.values():
                        os.close(fd)
                # the successor (the holder's standby, or the agent's takeover) serves every PV
                new_pid = wait_for(lambda: (p := _pools(agent)[0]["pid"]) not in (None, pid) and pid_alive(p) and p,
                                   20, "a successor serving the pool")
                wait_for(lambda: all(m["healthy"] and m["pid"] == new_pid for m in agent.list()), 20,
                         "the agent to report the PVs healthy on the successor")
                assert all(m["repairs"] == 0 and m["takeovers"] >= 1 for m in agent.list()), agent.list()
                assert _pools(agent)[0]["repairs"] == 0 and _pools(agent)[0]["takeovers"] >= 1
                assert "repairing" not in csi.agent_log.read_text()
                stats = node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
                    volume_id=vids["a"], volume_path=targets["a-rw"][1]), timeout=30)
                assert not stats.volume_condition.abnormal, stats

            # unpublish all; unstage a: the pool stays for b; unstage b: the pool goes
            for sub, t, _ in targets.values():
                node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vids[sub], target_path=t),
                                         timeout=30)
                assert not mounts_at(t) and not os.path.exists(t)
            assert sorted(m["target"] for m in agent.list()) == sorted(staging.values())
            unstage = pb.NodeUnstageVolumeRequest(volume_id=vids["a"], staging_target_path=staging["a"])
            node.NodeUnstageVolume(unstage, timeout=60)
            node.NodeUnstageVolume(unstage, timeout=60)  # idempotent: b's reference stays
            assert not mounts_at(staging["a"]) and _pools(agent)[0]["refs"] == 1
            assert (Path(staging["b"]) / "only-in-b").read_text() == "b"
            node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vids["b"], staging_target_path=staging["b"]),
                                   timeout=60)
            assert _pools(agent) == [] and agent.list() == [] and not mounts_under(str(csi.kubelet))
            server = new_pid if restartable else pid
            wait_for(lambda: not pid_alive(server), 10, "the pool's server to exit")
        finally:
            for sub, t, _ in targets.values():  # after a failure: kubelet's unpublish, before the agent goes
                with contextlib.suppress(grpc.RpcError):
                    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vids[sub], target_path=t),
                                             timeout=30)
            ch.close()
