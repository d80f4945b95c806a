"""testkit/multicluster.py: several real glusterd on one machine, and ``gfuse cluster init`` on them.

What is checked: each glusterd runs with gluster's own regression-suite options (tests/cluster.rc)
on its own 127.1.1.N, with its own working/run/log directories and socket; the default glusterd
of this machine (0.0.0.0:24007, other sessions' volumes) is not disturbed; ``gfuse cluster init``
(independent mode) peers unconfigured nodes, makes the pool volume and registers brick pools, and
is idempotent; a test run killed with SIGKILL leaves processes and mounts that the next run removes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testkit import multicluster as mcl

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


def _required() -> bool:
    return os.environ.get("GFUSE_REQUIRE_CLUSTER", "") not in ("", "0", "false", "no")


@pytest.fixture(autouse=True)
def _available():
    reason = mcl.unavailable_reason()
    if reason:
        if _required():
            pytest.fail(f"GFUSE_REQUIRE_CLUSTER is set but: {reason}", pytrace=False)
        pytest.skip(reason)


def _default_glusterd() -> tuple[int | None, bool, int | None]:
    """The machine's own glusterd: its pid, whether it answers, and the inode of the host's quotad
    socket (another quotad would replace it). Its volumes come and go with other test runs."""
    pid = None
    try:
        pid = int(Path("/run/glusterd.pid").read_text().strip())
    except (OSError, ValueError):
        pass
    out = subprocess.run(["gluster", "--mode=script", "volume", "list"], capture_output=True, text=True, timeout=60)
    try:
        quotad = os.stat("/run/gluster/quotad.socket").st_ino
    except OSError:
        quotad = None
    return pid, out.returncode == 0 or "No volumes present" in out.stdout, quotad


def _procs_naming(text: str) -> list[str]:
    found = []
    for e in Path("/proc").iterdir():
        if e.name.isdigit():
            try:
                cmd = (e / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and e.name != str(os.getpid()):
                found.append(f"{e.name}: {cmd[:120]}")
    return found


def _cli(mc: mcl.MultiCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "GFUSE_GLUSTER_COMMAND": " ".join(mc.gluster_command(1)), "GFUSE_GLUSTERD_SOCKET": ""}
    return subprocess.run(["gfuse", "cluster", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_three_glusterds_isolated_then_gone():
    before = _default_glusterd()
    host_bricks = {int(e.name) for e in Path("/proc").iterdir()
                   if e.name.isdigit() and _comm(int(e.name)) == "glusterfsd"}
    mc = mcl.MultiCluster(3)
    t0 = time.monotonic()
    mc.start()
    try:
        started = time.monotonic() - t0
        assert started < 20, f"start took {started:.1f}s"
        listen = subprocess.run([*mc.net_prefix(), "ss", "-ltnp"], capture_output=True, text=True, timeout=30).stdout
        sockets, pids = set(), set()
        for n in mc.nodes:
            pid = n.glusterd_pid()
            assert pid, f"no glusterd for {n.host}"
            pids.add(pid)
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            for opt in (f"management.working-directory={n.workdir}",
                        f"management.transport.socket.bind-address={n.host}",
                        f"management.run-directory={n.rundir}",
                        f"management.glusterd-sockfile={n.socket}",
                        f"management.logging-directory={n.logdir}"):
                assert opt.encode() in cmd, opt
            assert f"{n.host}:24007" in listen
            assert n.socket.is_socket()
            sockets.add(n.socket)
            # unconfigured: each is alone in its pool (independent mode before init)
            pool = [p for p in mc.gluster(n.index, "pool", "list").splitlines()[1:] if p.strip()]
            assert pool[0].split()[1] == "localhost"
            # the node's mount namespace shows its own directories where gluster hard-codes paths
            for target, src in (("/var/lib/glusterd", n.workdir), ("/run/gluster", n.rundir)):
                probe = subprocess.run([*mc.node_prefix(n.index), "stat", "-c", "%d:%i", target],
                                       capture_output=True, text=True, timeout=30).stdout.strip()
                st = os.stat(src)
                assert probe == f"{st.st_dev}:{st.st_ino}", (target, src)
        assert len(sockets) == 3 and len(pids) == 3
        assert "0.0.0.0:24007" not in listen  # the cluster's network namespace has only ours
        # glusterd 1 restarts (keeping its identity) like cluster.rc's restart_glusterd
        uuid = (mc.node(1).workdir / "glusterd.info").read_text()
        mc.kill_glusterd(1)
        mc.start_glusterd(1)
        assert (mc.node(1).workdir / "glusterd.info").read_text() == uuid
    finally:
        mc.stop()
    assert not mc.dir.exists()
    assert not _procs_naming(str(mc.dir)), _procs_naming(str(mc.dir))
    assert _default_glusterd() == before, "the default glusterd was disturbed"
    # bricks of the host that ran before still run (unless their owners stopped them meanwhile)
    gone = {p for p in host_bricks if not Path(f"/proc/{p}").exists()}
    assert len(gone) <= len(host_bricks) // 2 or not host_bricks, f"host bricks vanished: {gone}"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_cluster_init_is_idempotent_and_reports():
    with mcl.MultiCluster(3) as mc:
        nodes = [f"{n.host}:{n.bricks}" for n in mc.nodes]
        st = _cli(mc, "status", "--pool", "gfuse-pool")
        assert st.returncode == 1 and "none (run gfuse cluster init)" in st.stdout
        first = _cli(mc, "init", *nodes, "--pool-size", "1G", "--json")
        assert first.returncode == 0, first.stderr
        status = json.loads(first.stdout)
        assert sorted(p["host"] for p in status["peers"]) == ["127.1.1.2", "127.1.1.3"]
        assert all(p["connected"] for p in status["peers"])
        assert status["pool"]["status"] == "Started" and status["pool"]["replica"] == 3 and status["pool"]["quota"]
        assert all(b["online"] for b in status["pool"]["bricks"])
        assert [(b["host"], b["size_bytes"]) for b in status["brick_pools"]] == \
            [("127.1.1.1", 1 << 30), ("127.1.1.2", 1 << 30), ("127.1.1.3", 1 << 30)]
        assert "peer probe 127.1.1.2" in first.stderr
        again = _cli(mc, "init", *nodes, "--pool-size", "1G", "--json")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["brick_pools"] == status["brick_pools"]
        assert "peer probe" not in again.stderr and "creating" not in again.stderr
        # every node sees the same cluster
        for n in mc.nodes[1:]:
            info = mc.gluster_xml(n.index, "volume", "info", "gfuse-pool")
            assert info.find(".//volume/name").text == "gfuse-pool"
        human = _cli(mc, "status")
        assert human.returncode == 0 and "gfuse-pool Started Replicate replica 3, quota on" in human.stdout
        # a node with no glusterd: one line, exit 1
        bad = _cli(mc, "init", *nodes, "127.1.1.9:/srv/x", timeout=90)
        last = bad.stderr.strip().splitlines()[-1]
        assert bad.returncode == 1 and last.startswith("gfuse: ") and "127.1.1.9" in last, bad.stderr
        assert "glusterd-unreachable" in last and "24007" in last
        assert "Traceback" not in bad.stderr


def test_replica_impossible_and_unreachable():
    with mcl.MultiCluster(2) as mc:
        nodes = [f"{n.host}:{n.bricks}" for n in mc.nodes]
        r = _cli(mc, "init", *nodes, "--replica", "3")
        assert r.returncode == 1 and "insufficient-nodes" in r.stderr
        mc.kill_glusterd(1)
        r = _cli(mc, "status", timeout=60)
        assert r.returncode == 1 and "glusterd-unreachable" in r.stderr, r.stderr


_CRASHING_RUN = r"""
import os, signal, sys
from testkit import multicluster as mcl
mc = mcl.MultiCluster(2)
mc.start()
mc.peer_all()
n1, n2 = mc.nodes
mc.gluster(1, "volume", "create", "leftover", "replica", "2", f"{n1.host}:{n1.bricks}/b", f"{n2.host}:{n2.bricks}/b",
           "force")
mc.gluster(1, "volume", "start", "leftover")
ctx = mc.gfuse_mount(f"{n1.host}:/leftover")
mp = ctx.__enter__()
(mp / "f").write_text("x")
print(mc.dir, mp, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_leftovers_of_a_killed_run_are_removed():
    proc = subprocess.run([sys.executable, "-c", _CRASHING_RUN], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    cdir, mp = proc.stdout.split()
    assert _procs_naming(cdir), "the killed run left nothing to clean up?"
    assert mcl.is_mounted(mp)
    assert (Path(mp) / "f").read_text() == "x"
    removed = mcl.cleanup_stale()
    assert Path(cdir).name in removed
    assert not mcl.is_mounted(mp)
    assert not _procs_naming(cdir), _procs_naming(cdir)
    assert not Path(cdir).exists()


def test_heal_info_asks_the_nodes_glusterd():
    """heal info of a cluster volume: the gluster CLI's glfsheal would ask the host's glusterd (compiled-in
    socket path); MultiCluster.heal_info runs it with the node's socket and reads pending entries per brick."""
    with mcl.MultiCluster(1) as mc:
        n = mc.node(1)
        (n.bricks / "h").mkdir()
        dirs = [n.bricks / "h" / f"b{i}" for i in range(3)]
        mc.gluster(1, "volume", "create", "healv", "replica", "3", *(f"{n.host}:{d}" for d in dirs), "force")
        mc.gluster(1, "volume", "start", "healv")
        assert mc.heal_info(1, "healv") == [(f"{n.host}:{d}", "Connected", 0) for d in dirs]
        root = mc.gluster_xml(1, "volume", "status", "healv")
        pid = next(int(node.findtext("pid")) for node in root.iter("node") if node.findtext("path") == str(dirs[2]))
        os.kill(pid, signal.SIGKILL)
        with mc.gfuse_mount(f"{n.host}:/healv") as mp:
            (mp / "f").write_text("missed by brick 2")
            info = mc.heal_info(1, "healv")
        assert [b for b, _s, _n in info] == [f"{n.host}:{d}" for d in dirs]
        assert all(s == "Connected" and e and e >= 1 for _b, s, e in info[:2]), info
        assert info[2][1] != "Connected" and info[2][2] is None, info
