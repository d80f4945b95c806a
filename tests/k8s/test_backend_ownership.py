"""Non-root pods on provisioned PVs, and ``df`` of a PV (issue 13), against a real three-node cluster.

The StorageClass's ``uid``, ``gid`` and ``mode`` become the owner, group and mode of the PV's root on both
backends (the volume backend through a gfuse mount of the new volume, the subdir backend on the pool's);
through a gfuse mount a process of that user can create files there and another cannot; bad values are
refused before anything is made; ``os.statvfs`` of a mounted 1 GiB PV says 1 GiB (quota-deem-statfs).
One volume per backend, each made through a provisioner killed halfway and retried (the ownership is
recorded with the intent: the retry, given no parameters, still applies it).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexvolume.storage import StorageError
from flexvolume.storage.backends import (
    CRASH_ENV,
    CRASH_EXIT,
    DEEM_STATFS_KEY,
    META,
    OWNER_KEY,
    BrickPoolRegistry,
    GfuseMounter,
    LocalBrickCleaner,
    SubdirBackend,
    VolumeBackend,
    backend_for,
    volume_name,
)
from flexvolume.storage.glusterd import Glusterd
from testkit import multicluster as mcl

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

POOL = "gfuse-pool"
MiB, GiB = 1 << 20, 1 << 30
OWNER = {"uid": "1000", "gid": "2000"}


@pytest.fixture(scope="module")
def mc() -> Iterator[mcl.MultiCluster]:
    reason = mcl.unavailable_reason()
    if reason:
        if os.environ.get("GFUSE_REQUIRE_CLUSTER", "") not in ("", "0", "false", "no"):
            pytest.fail(f"GFUSE_REQUIRE_CLUSTER is set but: {reason}", pytrace=False)
        pytest.skip(reason)
    cluster = mcl.MultiCluster(3)
    cluster.start()
    try:
        nodes = [f"{n.host}:{n.bricks}" for n in cluster.nodes]
        env = {**os.environ, "GFUSE_GLUSTER_COMMAND": " ".join(cluster.gluster_command(1)),
               "GFUSE_GLUSTERD_SOCKET": ""}
        # brick pools are accounting only (quota allocates nothing): room for a 1 GiB volume PV
        proc = subprocess.run([sys.executable, "-m", "gfuse.cli", "cluster", "init", *nodes, "--pool", POOL,
                               "--pool-size", "2G"], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def gd(mc: mcl.MultiCluster) -> Glusterd:
    return Glusterd(None, command=mc.gluster_command(1), timeout=60)


@pytest.fixture(scope="module")
def state_dir(mc: mcl.MultiCluster) -> Path:
    d = mc.dir / "provisioner"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="module")
def subdir(mc: mcl.MultiCluster, gd: Glusterd, state_dir: Path) -> Iterator[SubdirBackend]:
    b = SubdirBackend(gd, POOL, state_dir=state_dir, mounter=GfuseMounter(mc.net_prefix()))
    yield b
    b.close()


@pytest.fixture(scope="module")
def volume(mc: mcl.MultiCluster, gd: Glusterd, state_dir: Path) -> VolumeBackend:
    return VolumeBackend(gd, BrickPoolRegistry(gd, POOL), cleaner=LocalBrickCleaner(), state_dir=state_dir,
                         mounter=GfuseMounter(mc.net_prefix()))


_DRIVER = r"""
import json, logging, sys
from flexvolume.storage.backends import *
from flexvolume.storage.glusterd import Glusterd
cfg = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO)
gd = Glusterd(None, command=cfg["gluster"], timeout=60)
mounter = GfuseMounter(cfg["net"])
if cfg["kind"] == "subdir":
    b = SubdirBackend(gd, cfg["pool"], state_dir=cfg["state"], mounter=mounter)
else:
    b = VolumeBackend(gd, BrickPoolRegistry(gd, cfg["pool"]), state_dir=cfg["state"], mounter=mounter)
b.create(cfg["name"], cfg["size"], cfg["params"])
"""


def _crashed_create(mc: mcl.MultiCluster, state_dir: Path, kind: str, name: str, params: dict[str, str],
                    step: str) -> None:
    """A provisioner process that creates ``name`` and is killed right after ``step``."""
    cfg = {"kind": kind, "name": name, "size": GiB, "params": params, "pool": POOL, "state": str(state_dir),
           "gluster": mc.gluster_command(1), "net": mc.net_prefix()}
    env = {**os.environ, CRASH_ENV: f"{kind}.create.{step}"}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cfg)], env=env, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == CRASH_EXIT, f"create did not reach {step!r}: rc {proc.returncode}\n{proc.stderr}"


def _as_user(root_fd: int, uid: int, gid: int, name: str) -> int:
    """Create ``name`` in the directory open as ``root_fd`` from a child running as ``uid:gid`` (no other
    groups); 0 or the errno it got. The fd was opened by root: no access to the mount's parents is needed."""
    pid = os.fork()
    if pid == 0:
        code = 100
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=root_fd))
                code = 0
            except OSError as e:
                code = e.errno or 99
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail(f"a child creating {name} as {uid}:{gid} hung")
        time.sleep(0.02)


def _check_pv_root(mnt: Path, mode: int) -> None:
    """The mounted PV's root is 1000:2000 with ``mode``; 1000 and members of 2000 create files, 1001 cannot."""
    st = os.stat(mnt)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 2000, mode), \
        f"root is {st.st_uid}:{st.st_gid} {stat.S_IMODE(st.st_mode):04o}"
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert _as_user(fd, 1000, 1000, "by-owner") == 0
        assert _as_user(fd, 1002, 2000, "by-group") == 0
        assert _as_user(fd, 1001, 1001, "by-other") == errno.EACCES
    finally:
        os.close(fd)
    assert not (mnt / "by-other").exists()
    owner_file = os.stat(mnt / "by-owner")
    assert owner_file.st_uid == 1000
    # setgid on the root: new entries get its group
    assert owner_file.st_gid == (2000 if mode & stat.S_ISGID else 1000)


def _check_df(mnt: Path, size: int) -> None:
    """``df`` of the mounted PV says its size (quota-deem-statfs), and its use grows with what is written."""
    st = os.statvfs(mnt)
    total = st.f_blocks * st.f_frsize
    assert abs(total - size) <= st.f_frsize, f"df says {total} bytes for a {size}-byte PV"
    with open(mnt / "four-mib", "wb") as f:
        f.write(b"x" * (4 * MiB))
        f.flush()
        os.fsync(f.fileno())
    deadline = time.monotonic() + 20  # the bricks' usage accounting (marker) is asynchronous
    while True:
        st = os.statvfs(mnt)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        if used >= 4 * MiB or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert 4 * MiB <= used <= 8 * MiB, f"df says {used} bytes used after writing 4 MiB"
    assert st.f_bavail * st.f_frsize <= size - 4 * MiB


def test_volume_backend_root_owner_mode_and_df(mc, volume, gd, state_dir):
    name = "pvc-own-vol"
    volname = volume_name(name)
    try:
        # killed before the ownership step, then right after it: the retries (given no parameters, as if the
        # class had changed) apply the recorded ownership, idempotently
        _crashed_create(mc, state_dir, "volume", name, {**OWNER, "mode": "0770"}, "quota")
        info = gd.volume_info(volname)
        assert json.loads(info.options[OWNER_KEY]) == {"uid": 1000, "gid": 2000, "mode": "0770"}
        assert info.options.get(DEEM_STATFS_KEY) == "on"
        _crashed_create(mc, state_dir, "volume", name, {}, "owner")
        pv = volume.create(name, GiB, {})
        assert volume.create(name, GiB, {**OWNER, "mode": "0770"}) == pv
        assert not list((state_dir / "volumes").iterdir()), "the ownership mount was left behind"
        with mc.gfuse_mount(pv.source, options=["allow_other", "backup-volfile-servers="
                                                + ":".join(pv.backup_servers)]) as mnt:
            _check_pv_root(mnt, 0o770)
            _check_df(mnt, GiB)
    finally:
        volume.delete(name)
    assert gd.volume_info(volname) is None


def test_subdir_backend_root_owner_mode_and_df(mc, subdir, gd, state_dir):
    """Also on a pool whose admin turned quota-deem-statfs off (`quota enable` turns it on): the backend
    turns it on again, or df of a PV would say the bricks' file system size."""
    name = "pvc-own-sub"
    gd.set_options(POOL, {DEEM_STATFS_KEY: "off"})
    try:
        _crashed_create(mc, state_dir, "subdir", name, {**OWNER, "mode": "2770"}, "mkdir")
        pv = subdir.create(name, GiB, {})  # the retry: ownership from the record
        assert gd.volume_info(POOL).options.get(DEEM_STATFS_KEY) == "on"
        with mc.gfuse_mount(pv.source, options=["allow_other"]) as mnt:
            _check_pv_root(mnt, 0o2770)
            _check_df(mnt, GiB)
    finally:
        subdir.delete(name)


@pytest.mark.parametrize(("bad", "says"), [
    ({"uid": "-1"}, "StorageClass parameter uid '-1' is not a user id"),
    ({"gid": "4294967295"}, "StorageClass parameter gid '4294967295' is not a group id"),
    ({"mode": "4770"}, "StorageClass parameter mode '4770' sets setuid"),
    ({"mode": "u=rwx"}, "StorageClass parameter mode 'u=rwx' is not an octal mode"),
])
def test_bad_ownership_refused_before_anything(subdir, volume, gd, bad, says):
    before_volumes = sorted(gd.volumes())
    root = subdir.root()
    before_pool = sorted(os.listdir(root)), sorted(os.listdir(root / META / "volumes"))
    for kind, backend in (("subdir", subdir), ("volume", volume)):
        with pytest.raises(StorageError) as ei:
            backend_for({"backend": kind, **bad}, glusterd=gd, pool=POOL)
        assert ei.value.reason == "invalid-parameters" and ei.value.message.startswith(says), ei.value.message
        with pytest.raises(StorageError) as ei:
            backend.create(f"pvc-bad-{kind}", MiB, {**OWNER, **bad})
        assert ei.value.reason == "invalid-parameters" and ei.value.message.startswith(says), ei.value.message
    assert sorted(gd.volumes()) == before_volumes
    assert (sorted(os.listdir(root)), sorted(os.listdir(root / META / "volumes"))) == before_pool
