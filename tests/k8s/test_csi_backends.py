"""The CSI Controller on the storage backends, against a real three-node gluster cluster.

One cluster for the module (``mc`` of ``test_storage_backends``: three glusterd on 127.1.1.1-3 in a
private network namespace, ``gfuse cluster init`` with the pool volume and 64 MiB brick pools). The
node agent and ``gfuse-csi --mode both`` run in that network namespace (``nsenter --net``; their
mounts are in the host's mount namespace, visible here) with ``--gluster-command`` the CLI of node 1.
The tests play the external-provisioner/resizer and kubelet over gRPC: subdir volumes whose quota
a pod hits (EDQUOT), volumes of their own, the gRPC codes of storage failures, controllers killed
right after every step of create and delete (``GFUSE_STORAGE_CRASH_AT``: the process exits on
the spot, as with SIGKILL) and the retry by a live one, and the volumes of the controller before
it used quota, adopted.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shlex
import subprocess
import time
import warnings
from pathlib import Path

import grpc
import pytest
import test_storage_backends
from test_csi import (
    SANITY_EXPAND_SIZE,
    SANITY_IDEMPOTENT_COUNT,
    SANITY_SIZE,
    Code,
    Csi,
    _stop,
    _tail,
    csi_processes,
    expect,
    mount_cap,
    pb,
    pb_grpc,
    sanity_cap,
    sanity_cleanup,
    sanity_dirs,
    start_plugin,
)
from test_storage_backends import POOL, _write_until_edquot

from gfuse.mounttable import mounts_under
from flexvolume.storage.backends import (
    CRASH_ENV,
    CRASH_EXIT,
    META,
    SubdirBackend,
    VolumeBackend,
)
from flexvolume.storage.glusterd import Glusterd
from gfuse.cli import _default_log_file

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

#: the module's cluster: three glusterd, `gfuse cluster init` (pool volume, 64 MiB brick pools)
mc = test_storage_backends.mc

MiB = 1 << 20
SOURCE = f"127.1.1.1:/{POOL}"
AccessMode = pb.VolumeCapability.AccessMode


@pytest.fixture(scope="module")
def gd(mc) -> Glusterd:
    return mc.cli(1, timeout=60)


def _ctrl_args(mc, state: Path | None = None) -> tuple[str, ...]:
    return ("--gluster-command", shlex.join(mc.gluster_command(1)), "--glusterd-socket", "", "--pool", SOURCE,
            *(("--state-dir", str(state)) if state else ()))


@pytest.fixture(scope="module")
def plugin(request, mc) -> Csi:
    with csi_processes(request, *_ctrl_args(mc), prefix=mc.net_prefix()) as c:
        yield c


@pytest.fixture(scope="module")
def state(plugin) -> Path:
    return plugin.root / "state"


@pytest.fixture(scope="module")
def pool(plugin, state) -> Path:
    """The pool as the controller sees it: its own mount (the same FUSE connection, no cache lag)."""
    return state / "pools" / f"127.1.1.1_{POOL}"


@pytest.fixture
def stubs(plugin):
    ch = plugin.channel()
    try:
        yield pb_grpc.NodeStub(ch), pb_grpc.ControllerStub(ch)
    finally:
        ch.close()


def _create(name: str, size: int = 0, limit: int = 0, **params: str) -> pb.CreateVolumeRequest:
    return pb.CreateVolumeRequest(name=name, volume_capabilities=[mount_cap(AccessMode.SINGLE_NODE_WRITER)],
                                  parameters=params, capacity_range=pb.CapacityRange(required_bytes=size,
                                                                                     limit_bytes=limit))


def _expand(volume_id: str, size: int, limit: int = 0) -> pb.ControllerExpandVolumeRequest:
    return pb.ControllerExpandVolumeRequest(volume_id=volume_id, capacity_range=pb.CapacityRange(
        required_bytes=size, limit_bytes=limit))


def _validate(volume_id: str) -> pb.ValidateVolumeCapabilitiesRequest:
    return pb.ValidateVolumeCapabilitiesRequest(volume_id=volume_id, volume_capabilities=[mount_cap()])


def _limits(gd: Glusterd, volume: str = POOL) -> dict[str, int]:
    return {q.path: q.hard_limit for q in gd.quota_list(volume)}


def _entries(pool: Path, name: str) -> dict[str, bool]:
    """Where the subdir backend may have left something of ``name`` on the pool."""
    meta = pool / META
    return {"dir": os.path.lexists(pool / name), "record": (meta / "volumes" / f"{name}.json").exists(),
            "staging": os.path.lexists(meta / "staging" / name), "trash": os.path.lexists(meta / "trash" / name)}


def _pool_entries(mc, pool: Path, name: str, expected: dict[str, bool]) -> None:
    """Assert the pool's entries of ``name``. If they differ *and* the pool mount's gfuse logged an
    entry operation that missed a replica (gfuse's replicate answers once a quorum took it; the
    bricks then disagree until healed), trigger the heal and wait for it: that is gfuse's issue, warned
    about, not the controller's. Anything else fails at once."""
    entries = _entries(pool, name)
    if entries == expected:
        return
    log = Path(_default_log_file(str(pool)))
    missed = [line for line in (log.read_text(errors="replace").splitlines() if log.exists() else [])
              if "missed on replica" in line]
    assert missed, f"{name} on the pool: {entries}, expected {expected}"
    mc.gluster(1, "volume", "heal", POOL, check=False)
    deadline = time.monotonic() + 20
    while entries != expected and time.monotonic() < deadline:
        time.sleep(0.5)
        entries = _entries(pool, name)
    if entries != expected:  # seen after a brick answered EDQUOT to a create outside any limited directory
        pytest.xfail(f"gfuse/gluster, not the controller: the pool's replicas still disagree after a heal "
                     f"({missed[-1]}); {name}: {entries}, expected {expected}")
    warnings.warn(f"gfuse pool mount: {missed[-1]} — the entries of {name} disagreed until healed", stacklevel=2)


def _assert_gone(mc, pool: Path, gd: Glusterd, name: str) -> None:
    _pool_entries(mc, pool, name, {"dir": False, "record": False, "staging": False, "trash": False})
    limits = _limits(gd)
    assert "/" + name not in limits, f"{name} still has a quota limit: {limits}"


# ------------------------------------------------------------------------------------------------
# subdir: a quota'd directory


def test_subdir_volume_quota_enforced_expand_delete(mc, plugin, stubs, gd, pool) -> None:
    node, ctrl = stubs
    name = f"pvc-{secrets.token_hex(6)}"
    req = _create(name, 4 * MiB, pool=SOURCE, mountOptions="ping-timeout=10")
    v = ctrl.CreateVolume(req, timeout=90).volume
    assert v.volume_id == f"subdir:{SOURCE}/{name}" and v.capacity_bytes == 4 * MiB
    assert dict(v.volume_context) == {"source": f"{SOURCE}/{name}", "backupServers": "127.1.1.2:127.1.1.3",
                                      "mountOptions": "ping-timeout=10"}
    assert _limits(gd).get("/" + name) == 4 * MiB
    assert os.getxattr(pool / name, "trusted.gfuse.pv") == name.encode()
    assert (pool / name).stat().st_mode & 0o7777 == 0o777

    # idempotent by name; an incompatible capacity is ALREADY_EXISTS
    assert ctrl.CreateVolume(req, timeout=30).volume == v
    assert ctrl.CreateVolume(_create(name, 2 * MiB, 8 * MiB, pool=SOURCE, mountOptions="ping-timeout=10"),
                             timeout=30).volume == v
    for size, limit in ((8 * MiB, 0), (0, 2 * MiB)):
        details = expect(Code.ALREADY_EXISTS, ctrl.CreateVolume, _create(name, size, limit, pool=SOURCE))
        assert str(4 * MiB) in details
    ok = ctrl.ValidateVolumeCapabilities(_validate(v.volume_id), timeout=30)
    assert ok.HasField("confirmed")

    # a pod writes past the size: the bricks refuse (EDQUOT); df shows the PV's size
    cap = mount_cap(AccessMode.SINGLE_NODE_WRITER)
    staging, target = plugin.staging(name), plugin.target("pod-quota", name)
    node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=v.volume_id, staging_target_path=staging,
                                                   volume_capability=cap, volume_context=v.volume_context), timeout=90)
    try:
        node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=v.volume_id, staging_target_path=staging, target_path=target, volume_capability=cap,
            volume_context=v.volume_context), timeout=30)
        Path(target, "hello").write_text("hello from a pod\n")
        assert not Path(target, META).exists(), "a pod sees its own directory only"
        st = os.statvfs(target)
        assert st.f_blocks * st.f_frsize == 4 * MiB
        written = _write_until_edquot(Path(staging), 4 * MiB)  # the pod's target is a bind mount of it
        assert 2 * MiB <= written <= 6 * MiB, written

        # expansion raises the limit (never lowers it); a limit below the size is OUT_OF_RANGE
        assert ctrl.ControllerExpandVolume(_expand(v.volume_id, 8 * MiB), timeout=60).capacity_bytes == 8 * MiB
        assert _limits(gd).get("/" + name) == 8 * MiB
        assert ctrl.ControllerExpandVolume(_expand(v.volume_id, 6 * MiB), timeout=60).capacity_bytes == 8 * MiB
        expect(Code.OUT_OF_RANGE, ctrl.ControllerExpandVolume, _expand(v.volume_id, MiB, 2 * MiB))
        deadline = time.monotonic() + 15
        while True:  # the new limit reaches the bricks with a delay
            try:
                Path(target, f"after-expand-{time.monotonic_ns()}").write_bytes(b"y" * MiB)
                break
            except OSError as e:
                assert e.errno in (errno.EDQUOT, errno.ENOTCONN) and time.monotonic() < deadline, e
                time.sleep(0.5)
        assert ctrl.CreateVolume(req, timeout=30).volume.capacity_bytes == 8 * MiB  # a retry sees the expansion
    finally:
        node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=v.volume_id, target_path=target), timeout=30)
        node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=v.volume_id, staging_target_path=staging),
                               timeout=60)

    # delete: directory, record and limit go; again, and unknown ids, succeed
    ctrl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id), timeout=60)
    _assert_gone(mc, pool, gd, name)
    ctrl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id), timeout=60)
    for unknown in ("no-such-volume", f"subdir:{SOURCE}/pvc-never-made", "volume:127.1.1.1:/gfuse_pvc-never-made",
                    f"{SOURCE}/static", f"subdir:{SOURCE}/sha-crafted", f"volume:127.1.1.1:/{POOL}"):
        ctrl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=unknown), timeout=60)
    expect(Code.NOT_FOUND, ctrl.ValidateVolumeCapabilities, _validate(v.volume_id))
    expect(Code.NOT_FOUND, ctrl.ControllerExpandVolume, _expand(v.volume_id, 16 * MiB))
    # a directory the controller did not make is neither deleted nor taken over
    (pool / "not-ours").mkdir()
    try:
        ctrl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=f"subdir:{SOURCE}/not-ours"), timeout=60)
        assert (pool / "not-ours").is_dir()
        assert "[name-conflict]" in expect(Code.ALREADY_EXISTS, ctrl.CreateVolume, _create("not-ours", MiB))
    finally:
        (pool / "not-ours").rmdir()
    # names that are no directory names are hashed; without a capacity range the default size
    odd = ctrl.CreateVolume(_create("ns/claim.with dots"), timeout=60).volume
    assert odd.volume_id.startswith(f"subdir:{SOURCE}/csi-sha-") and odd.capacity_bytes == 1 << 30
    ctrl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=odd.volume_id), timeout=60)
    assert not (pool / odd.volume_id.rpartition("/")[2]).exists()


# ------------------------------------------------------------------------------------------------
# volume: a gluster volume per PV


def test_volume_backend_create_expand_delete(mc, stubs, gd) -> None:
    _, ctrl = stubs
    name = f"pvc-{secrets.token_hex(6)}"
    volname = f"gfuse_{name}"
    req = _create(name, 8 * MiB, backend="volume", replica="3", volumeOptions="performance.quick-read=off")
    v = ctrl.CreateVolume(req, timeout=120).volume
    server = v.volume_id.split(":")[1]
    assert v.volume_id == f"volume:{server}:/{volname}" and v.capacity_bytes == 8 * MiB
    ctx = dict(v.volume_context)
    assert ctx["source"] == f"{server}:/{volname}"
    assert sorted([server, *ctx["backupServers"].split(":")]) == ["127.1.1.1", "127.1.1.2", "127.1.1.3"]
    assert ctrl.CreateVolume(req, timeout=30).volume == v
    expect(Code.ALREADY_EXISTS, ctrl.CreateVolume, _create(name, 16 * MiB, backend="volume"))
    info = gd.volume_info(volname)
    assert info.started and info.replica == 3 and info.options["performance.quick-read"] == "off"
    assert sorted(b.host for b in info.bricks) == ["127.1.1.1", "127.1.1.2", "127.1.1.3"]
    assert _limits(gd, volname) == {"/": 8 * MiB}
    with mc.gfuse_mount(ctx["source"], options=["backup-volfile-servers=" + ctx["backupServers"]]) as mnt:
        (mnt / "hello").write_text("hello\n")
    assert ctrl.ValidateVolumeCapabilities(_validate(v.volume_id), timeout=30).HasField("confirmed")
    assert ctrl.ControllerExpandVolume(_expand(v.volume_id, 16 * MiB), timeout=60).capacity_bytes == 16 * MiB
    assert _limits(gd, volname) == {"/": 16 * MiB}
    ctrl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)
    assert gd.volume_info(volname) is None
    ctrl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id), timeout=60)
    expect(Code.NOT_FOUND, ctrl.ValidateVolumeCapabilities, _validate(v.volume_id))
    _gc(mc, volname)


def _gc(mc, volname: str) -> None:
    """The controller cannot see the nodes' brick pools: `gfuse cluster gc` on each node removes the
    directories of deleted volumes (and nothing else)."""
    env = {**os.environ, "GFUSE_GLUSTER_COMMAND": shlex.join(mc.gluster_command(1)), "GFUSE_GLUSTERD_SOCKET": ""}
    for n in mc.nodes:
        out = subprocess.run(["gfuse", "cluster", "gc", "--node", n.host, "--pool", POOL], env=env, check=False,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    left = [p for n in mc.nodes for p in n.bricks.iterdir() if p.name.startswith(volname)]
    assert not left, left


# ------------------------------------------------------------------------------------------------
# errors a user or admin can act on


def test_storage_errors_have_codes_and_reasons(mc, plugin, stubs, gd, state) -> None:
    _, ctrl = stubs
    RE = Code.RESOURCE_EXHAUSTED
    details = expect(RE, ctrl.CreateVolume, _create("pvc-r4", MiB, backend="volume", replica="4"))
    assert "replica 4 needs 4 storage nodes" in details and "[insufficient-nodes]" in details, details
    details = expect(RE, ctrl.CreateVolume, _create("pvc-huge", 100 * MiB, backend="volume"))
    assert "[pool-full]" in details and "brick pools" in details, details
    details = expect(RE, ctrl.CreateVolume, _create("pvc-huge", 1 << 50, pool=SOURCE))
    assert f"pool {POOL} is full" in details and "[pool-full]" in details, details
    details = expect(Code.INVALID_ARGUMENT, ctrl.CreateVolume, _create("pvc-r0", MiB, backend="volume", replica="x"))
    assert "replica" in details and "[invalid-parameters]" in details
    details = expect(Code.UNAVAILABLE, ctrl.CreateVolume, _create("pvc-nopool", MiB, pool="127.1.1.1:/nosuchpool"))
    assert "nosuchpool does not exist" in details and "[pool-unavailable]" in details, details
    assert not [v for v in gd.volumes() if v in ("gfuse_pvc-r4", "gfuse_pvc-huge")]
    assert "/pvc-huge" not in _limits(gd)

    # glusterd unreachable: a controller given a socket nobody serves (and no --pool)
    sock = plugin.root / "no-such-glusterd.socket"
    proc, endpoint, log = start_plugin(plugin.root, "nogd", "--mode", "controller", "--glusterd-socket", str(sock),
                                       "--state-dir", str(plugin.root / "nogd-state"), prefix=mc.net_prefix())
    try:
        with grpc.insecure_channel(endpoint) as ch:
            other = pb_grpc.ControllerStub(ch)
            for call, request in ((other.CreateVolume, _create("pvc-nogd", MiB, pool=SOURCE)),
                                  (other.DeleteVolume, pb.DeleteVolumeRequest(volume_id=f"subdir:{SOURCE}/pvc-x")),
                                  (other.ControllerExpandVolume, _expand(f"subdir:{SOURCE}/pvc-x", MiB))):
                details = expect(Code.UNAVAILABLE, call, request, timeout=60)
                assert str(sock) in details and "[glusterd-unreachable]" in details, details
            details = expect(Code.INVALID_ARGUMENT, other.CreateVolume, _create("pvc-noreg", MiB, backend="volume"))
            assert "pool" in details
    finally:
        _stop(proc)
    assert proc.returncode == 0, _tail(log)


# ------------------------------------------------------------------------------------------------
# crash safety


def _crash(mc, plugin, state: Path, at: str, call) -> None:
    """A controller that exits right after step ``at`` (``kind.op.step``) of the storage backend:
    ``call(controller stub)`` must die with it."""
    tag = at.replace(".", "-")
    proc, endpoint, log = start_plugin(plugin.root, f"crash-{tag}", "--mode", "controller", *_ctrl_args(mc, state),
                                       prefix=mc.net_prefix(), env={CRASH_ENV: at})
    try:
        with grpc.insecure_channel(endpoint) as ch:
            with pytest.raises(grpc.RpcError) as ei:
                call(pb_grpc.ControllerStub(ch))
            assert ei.value.code() == Code.UNAVAILABLE, ei.value.details()
        proc.wait(30)
        assert proc.returncode == CRASH_EXIT, f"the controller did not reach {at}\n{_tail(log)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


#: where the controller process is killed: the first and a middle step of create, a middle step of delete.
#: That a retry finishes after a crash at *every* step of the backends is tested against the backends
#: themselves (tests/k8s/test_storage_backends.py, *_crash_*); here: a killed controller process, and the
#: live one's retry of the same CSI call, resume what it left.
CRASH_STEPS = {"subdir": (("record", "rename"), ("trash",)), "volume": (("create", "start"), ("delete",))}


@pytest.mark.parametrize("kind", ["subdir", "volume"])
def test_controller_killed_mid_create_and_delete(mc, plugin, stubs, gd, state, pool, kind) -> None:
    """Create, then delete, each killed after some of its steps in turn (each run resumes what the last
    one left); the live controller's retry finishes, leaving one volume, then nothing."""
    _, ctrl = stubs
    backend = SubdirBackend if kind == "subdir" else VolumeBackend
    create_steps, delete_steps = CRASH_STEPS[kind]
    assert set(create_steps) <= set(backend.CREATE_STEPS) and set(delete_steps) <= set(backend.DELETE_STEPS)
    name = f"pvc-crash-{kind}-{secrets.token_hex(3)}"
    req = _create(name, 4 * MiB, backend=kind, **({"pool": SOURCE} if kind == "subdir" else {}))
    for step in create_steps:
        _crash(mc, plugin, state, f"{kind}.create.{step}", lambda c: c.CreateVolume(req, timeout=120))
    v = ctrl.CreateVolume(req, timeout=120).volume
    assert v.capacity_bytes == 4 * MiB
    volname = f"gfuse_{name}"
    if kind == "subdir":
        _pool_entries(mc, pool, name, {"dir": True, "record": True, "staging": False, "trash": False})
        assert json.loads((pool / META / "volumes" / f"{name}.json").read_text())["state"] == "ready"
        assert _limits(gd).get("/" + name) == 4 * MiB
    else:
        assert [x for x in gd.volumes() if x.startswith(f"gfuse_pvc-crash-{kind}")] == [volname]
        assert gd.volume_info(volname).started and _limits(gd, volname) == {"/": 4 * MiB}
    delete = pb.DeleteVolumeRequest(volume_id=v.volume_id)
    for step in delete_steps:
        _crash(mc, plugin, state, f"{kind}.delete.{step}", lambda c: c.DeleteVolume(delete, timeout=120))
    ctrl.DeleteVolume(delete, timeout=120)
    if kind == "subdir":
        _assert_gone(mc, pool, gd, name)
    else:
        assert gd.volume_info(volname) is None
        _gc(mc, volname)
    expect(Code.NOT_FOUND, ctrl.ValidateVolumeCapabilities, _validate(v.volume_id))


# ------------------------------------------------------------------------------------------------
# volumes of the controller before it used quota, and pool mounts by the agent


def _legacy_volume(pool: Path, name: str, size: int, state: str = "ready", made: bool = True) -> str:
    """What the earlier controller left on the pool for volume ``name``; its id."""
    vid = f"subdir:{SOURCE}/{name}"
    meta = pool / ".gfuse-csi"
    (meta / "volumes").mkdir(parents=True, exist_ok=True)
    (meta / "trash").mkdir(exist_ok=True)
    if made:
        (pool / name).mkdir(mode=0o777)
        (pool / name / "data").write_text(f"data of {name}\n")
    rec = {"name": name, "volume_id": vid, "pool": SOURCE, "dir": name, "capacity_bytes": size,
           "context": {"source": f"{SOURCE}/{name}"}, "parameters": {"pool": SOURCE}, "driver": "x",
           "created": time.time(), "state": state}
    (meta / "volumes" / f"{name}.json").write_text(json.dumps(rec))
    return vid


def test_volumes_of_the_earlier_controller_are_adopted(mc, plugin, stubs, gd, state, pool) -> None:
    _, ctrl = stubs
    legacy = pool / ".gfuse-csi"
    # a ready volume: the first RPC on its id adopts it (killed after every step of that, in turn)
    name = f"pvc-old-{secrets.token_hex(3)}"
    vid = _legacy_volume(pool, name, 4 * MiB)
    for step in SubdirBackend.ADOPT_STEPS:
        _crash(mc, plugin, state, f"subdir.adopt.{step}",
               lambda c: c.ValidateVolumeCapabilities(_validate(vid), timeout=60))
    assert ctrl.ValidateVolumeCapabilities(_validate(vid), timeout=60).HasField("confirmed")
    assert not (legacy / "volumes" / f"{name}.json").exists()
    rec = json.loads((pool / META / "volumes" / f"{name}.json").read_text())
    assert rec["state"] == "ready" and rec["size_bytes"] == 4 * MiB and rec["adopted"]
    assert _limits(gd).get("/" + name) == 4 * MiB and (pool / name / "data").read_text() == f"data of {name}\n"
    assert ctrl.ControllerExpandVolume(_expand(vid, 6 * MiB), timeout=60).capacity_bytes == 6 * MiB
    assert _limits(gd).get("/" + name) == 6 * MiB
    # CreateVolume retried by the external-provisioner for an old volume: the same volume
    name2 = f"pvc-old-{secrets.token_hex(3)}"
    vid2 = _legacy_volume(pool, name2, 0)
    v2 = ctrl.CreateVolume(_create(name2, pool=SOURCE), timeout=60).volume
    assert v2.volume_id == vid2 and (pool / name2 / "data").exists() and "/" + name2 not in _limits(gd)
    # ... also of a name with a dot (its directory was the name; new ones get csi-sha-<hash>)
    dotted = f"pvc.old-{secrets.token_hex(3)}"
    vid_dotted = _legacy_volume(pool, dotted, MiB)
    assert ctrl.CreateVolume(_create(dotted, MiB, pool=SOURCE), timeout=60).volume.volume_id == vid_dotted
    assert _limits(gd).get("/" + dotted) == MiB
    # a delete of the earlier controller killed halfway: the directory in its trash, the record left
    name3 = f"pvc-old-{secrets.token_hex(3)}"
    vid3 = _legacy_volume(pool, name3, MiB, made=False)
    (legacy / "trash" / f"{name3}.1700000000.abcdef").mkdir()
    (legacy / "trash" / f"{name3}.1700000000.abcdef" / "f").write_text("x")
    for v in (vid, vid2, vid_dotted, vid3):
        ctrl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v), timeout=60)
    for n in (name, name2, dotted, name3):
        _assert_gone(mc, pool, gd, n)
    assert list((legacy / "volumes").iterdir()) == [] and list((legacy / "trash").iterdir()) == []


def test_pool_mounts_by_the_agent(mc, plugin) -> None:
    """--mode controller --pool-mounter agent: the pool mount is the agent's, released at stop."""
    ctrl_state = plugin.root / "agent-ctrl-state"
    proc, endpoint, log = start_plugin(plugin.root, "agentctrl", "--mode", "controller", "--pool-mounter", "agent",
                                       "--agent-socket", plugin.agent_socket, *_ctrl_args(mc, ctrl_state),
                                       prefix=mc.net_prefix())
    try:
        with grpc.insecure_channel(endpoint) as ch:
            ctrl = pb_grpc.ControllerStub(ch)
            v = ctrl.CreateVolume(_create(f"pvc-{secrets.token_hex(6)}", MiB, pool=SOURCE), timeout=90).volume
            mine = [r for r in plugin.agent_client().list() if r["target"].startswith(str(ctrl_state))]
            assert [r["source"] for r in mine] == [SOURCE], mine
            ctrl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id), timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 0, _tail(log)
    assert not [r for r in plugin.agent_client().list() if r["target"].startswith(str(ctrl_state))]
    assert not mounts_under(str(ctrl_state))


# ------------------------------------------------------------------------------------------------
# csi-sanity's cases that need CreateVolume (flexvolume/csi/SANITY.md)


def test_sanity_controller_and_node_cases(plugin, stubs, gd, pool) -> None:
    """csi-sanity's Controller cases (CreateVolume, DeleteVolume, ValidateVolumeCapabilities, ExpandVolume) and
    the Node suite's "should work" and "should be idempotent" (runControllerTest: NodeStageVolume and
    NodePublishVolume IdempotentCount times each, then NodeGetVolumeStats of the target), with its requests
    (MakeCreateVolumeReq: a SINGLE_NODE_WRITER mount capability, required_bytes the test volume size,
    --csi.testvolumeparameters ``pool``) and directories, and its Cleanup (unpublish, unstage, delete, for every
    volume made). Names from UniqueString: ``<prefix>-<hex>``."""
    node, ctrl = stubs
    made: list[str] = []

    def create(prefix: str, *, name: str = "", limit: int = 0, size: int = SANITY_SIZE) -> pb.Volume:
        req = pb.CreateVolumeRequest(name=name or f"{prefix}-{secrets.token_hex(4)}",
                                     volume_capabilities=[sanity_cap()], parameters={"pool": SOURCE},
                                     capacity_range=pb.CapacityRange(required_bytes=size, limit_bytes=limit))
        v = ctrl.CreateVolume(req, timeout=90).volume
        assert v.volume_id, v
        if v.volume_id not in made:
            made.append(v.volume_id)
        return v

    t0 = time.monotonic()
    with sanity_dirs(plugin.kubelet) as d:
        try:
            # CreateVolume "should return appropriate values SingleNodeWriter NoCapacity" / "WithCapacity 1Gi"
            create("sanity-controller-create-single-no-capacity")
            v = create("sanity-controller-create-single-with-capacity")
            assert v.capacity_bytes >= SANITY_SIZE or v.capacity_bytes == 0, v
            # "should not fail when requesting to create a volume with already existing name and same capacity"
            name = f"sanity-controller-create-twice-{secrets.token_hex(4)}"
            assert create("", name=name).volume_id == create("", name=name).volume_id
            # "should fail when requesting to create a volume with already existing name and different capacity"
            name = f"sanity-controller-create-twice-different-{secrets.token_hex(4)}"
            assert create("", name=name, limit=SANITY_SIZE).capacity_bytes == SANITY_SIZE
            expect(Code.ALREADY_EXISTS, ctrl.CreateVolume, pb.CreateVolumeRequest(
                name=name, volume_capabilities=[sanity_cap()], parameters={"pool": SOURCE},
                capacity_range=pb.CapacityRange(required_bytes=2 * SANITY_SIZE, limit_bytes=2 * SANITY_SIZE)))
            # "should not fail when creating volume with maximum-length name" (UniqueStringWithLength, 128)
            prefix = "sanity-controller-create-maxlen-"
            long = create("", name=prefix + secrets.token_hex(64)[:128 - len(prefix)])
            assert long.capacity_bytes >= SANITY_SIZE and len(long.volume_id.encode()) <= 128, long
            # ValidateVolumeCapabilities "should fail when no volume capabilities are provided" and
            # "should return appropriate values (no optional values added)"
            v = create("sanity-controller-validate")
            expect(Code.INVALID_ARGUMENT, ctrl.ValidateVolumeCapabilities,
                   pb.ValidateVolumeCapabilitiesRequest(volume_id=v.volume_id))
            ok = ctrl.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
                volume_id=v.volume_id, volume_capabilities=[sanity_cap()]), timeout=30)
            assert not ok.HasField("confirmed") or ok.confirmed.volume_capabilities, ok
            assert ok.HasField("confirmed"), ok
            # ExpandVolume "should work" (MakeExpandVolumeReq: the capability too)
            v = create("sanity-expand-volume")
            r = ctrl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
                volume_id=v.volume_id, capacity_range=pb.CapacityRange(required_bytes=SANITY_EXPAND_SIZE),
                volume_capability=sanity_cap()), timeout=60)
            assert r.capacity_bytes == SANITY_EXPAND_SIZE, r
            # DeleteVolume "should return appropriate values (no optional values added)"
            v = create("sanity-controller-create-appropriate")
            ctrl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)
            assert not (pool / v.volume_id.rpartition("/")[2]).exists()
            # Node Service "should work" (count 1) and "should be idempotent" (count IdempotentCount)
            for i, count in enumerate((1, SANITY_IDEMPOTENT_COUNT)):
                v = create(f"sanity-node-full-{i}")
                for _ in range(count):
                    node.NodeStageVolume(pb.NodeStageVolumeRequest(
                        volume_id=v.volume_id, volume_capability=sanity_cap(), staging_target_path=d.staging,
                        volume_context=v.volume_context), timeout=90)
                for _ in range(count):
                    node.NodePublishVolume(pb.NodePublishVolumeRequest(
                        volume_id=v.volume_id, target_path=d.target, staging_target_path=d.staging,
                        volume_capability=sanity_cap(), volume_context=v.volume_context), timeout=30)
                assert len(mounts_under(d.mount)) == 1 and len(mounts_under(d.staging)) == 1
                stats = node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=v.volume_id,
                                                                             volume_path=d.target), timeout=30)
                assert stats.usage, stats
                sanity_cleanup(node, ctrl, d, [v.volume_id])  # the AfterEach of this case
                made.remove(v.volume_id)
                assert not mounts_under(str(plugin.kubelet)) and not os.path.exists(d.target)
                os.makedirs(d.staging, exist_ok=True)  # the next case's Setup (unstage removed it)
        finally:
            sanity_cleanup(node, ctrl, d, made)
    print(f"csi-sanity's controller and node cases took {time.monotonic() - t0:.1f}s")
    assert not mounts_under(str(plugin.kubelet))
    left = [n for n in os.listdir(pool) if n.startswith(("sanity-", "csi-sha-"))]
    assert not left, left
    assert not [p for p in _limits(gd) if p.lstrip("/").startswith(("sanity-", "csi-sha-"))], _limits(gd)
