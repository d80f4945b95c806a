"""CSI contract tests of the gfuse CSI plugin (``gfuse-csi``), written in Python.

csi-sanity (Go) cannot be built on these machines and no kubelet or CSI sidecar can run here, so
this module plays kubelet and the external-provisioner/resizer: it starts the plugin as a separate
process on a temporary unix socket (``--mode both``) with a real node agent (``gfuse-agent``) on its
own socket and state file, and calls it through gRPC stubs generated the same way the plugin's are.
Paths are kubelet-shaped under a temporary kubelet directory (``--kubelet-dir``). Mounts are real:
gfuse mounts of a real replica-3 GlusterFS volume, bind mounts for publishing, and the native
client to check what landed on the volume.

The Controller's provisioning (quota'd subdirectories, a volume per PV, crash safety) needs a gluster
cluster whose glusterd it can manage: ``tests/test_csi_backends.py`` runs it on a three-node test
cluster; here only the requests it refuses before reaching any storage.

Everything started here is stopped and everything mounted is unmounted at the end, also when a
test fails (processes by their pid, mounts found under the temporary directory).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from flexvolume.agentclient import AgentClient, AgentError
from testkit.kubelet import gfuse_serving_pids_under
from gfuse.mounttable import mounts_at, mounts_under

try:  # generated at install time (scripts/install-deps.sh: python3 -m flexvolume.csi.stubs), never at import
    from flexvolume.csi.stubs import csi_pb2 as pb
    from flexvolume.csi.stubs import csi_pb2_grpc as pb_grpc
except ImportError as e:  # StubsMissingError (one line naming the command), or grpcio missing
    if os.environ.get("GFUSE_REQUIRE_CLUSTER", "") not in ("", "0", "false", "no"):
        raise
    pytest.skip(f"the CSI stubs are not there: {e}", allow_module_level=True)

DRIVER = "gfuse.csi.test.example.org"
NODE_ID = "csi-test-node"
GiB = 1 << 30
Code = grpc.StatusCode
AccessMode = pb.VolumeCapability.AccessMode

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]


def mount_cap(mode: int = AccessMode.MULTI_NODE_MULTI_WRITER, flags: tuple[str, ...] = ()) -> pb.VolumeCapability:
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(mount_flags=list(flags)),
                               access_mode=AccessMode(mode=mode))


def block_cap() -> pb.VolumeCapability:
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(),
                               access_mode=AccessMode(mode=AccessMode.SINGLE_NODE_WRITER))


# ------------------------------------------------------------------------------------------------
# the plugin and the agent as processes


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - not ready yet
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with status {proc.returncode}\n{_tail(log)}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{_tail(log)}")
        time.sleep(0.1)


def _tail(path: Path | None, n: int = 40) -> str:
    if path is None or not path.exists():
        return ""
    lines = path.read_text(errors="replace").splitlines()
    return f"--- last lines of {path}:\n" + "\n".join(lines[-n:])


def _stop(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _cleanup_mounts(root: str) -> list[str]:
    """Detach every mount under ``root`` and kill gfuse servers still serving there."""
    left = []
    for _ in range(5):
        below = mounts_under(root)
        if not below:
            break
        for m in reversed(below):
            subprocess.run(["umount", "-l", m.target], capture_output=True, timeout=20)
            left.append(m.target)
    deadline = time.monotonic() + 10
    while gfuse_serving_pids_under(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in gfuse_serving_pids_under(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


@dataclass
class Csi:
    root: Path
    kubelet: Path
    agent_socket: str
    endpoint: str
    plugin: subprocess.Popen
    agent: subprocess.Popen
    plugin_log: Path
    agent_log: Path

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.endpoint)

    @property
    def logs(self) -> str:
        return _tail(self.plugin_log) + "\n" + _tail(self.agent_log)

    def agent_client(self) -> AgentClient:
        return AgentClient(self.agent_socket, timeout=10)

    def staging(self, name: str) -> str:
        return str(self.kubelet / "plugins/kubernetes.io/csi" / DRIVER / name / "globalmount")

    def target(self, pod: str, pv: str) -> str:
        d = self.kubelet / "pods" / pod / "volumes/kubernetes.io~csi" / pv
        d.mkdir(parents=True, exist_ok=True)  # kubelet makes the parent; the plugin makes the target
        return str(d / "mount")


def start_plugin(root: Path, name: str, *args: str, prefix: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, Path]:
    """``gfuse-csi`` on ``root/name.sock`` (``prefix``: e.g. nsenter into a test cluster's network)."""
    endpoint = f"unix://{root}/{name}.sock"
    log = root / f"{name}.log"
    cmd = [*prefix, sys.executable, "-m", "flexvolume.csi.server", "--endpoint", endpoint, "--driver-name", DRIVER,
           "--nodeid", NODE_ID, "--log-level", "DEBUG", *args]
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                env=None if env is None else {**os.environ, **env})
    ch = grpc.insecure_channel(endpoint)
    ident = pb_grpc.IdentityStub(ch)
    _wait(lambda: ident.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=2), 60, f"the CSI plugin {name}",
          proc, log)
    ch.close()
    return proc, endpoint, log


@pytest.fixture(scope="module")
def csi(request: pytest.FixtureRequest) -> Iterator[Csi]:
    """The plugin (--mode both) and its agent; logs kept on failure or with GFUSE_CSI_TEST_KEEP=1."""
    with csi_processes(request) as c:
        yield c


@contextlib.contextmanager
def csi_processes(request: pytest.FixtureRequest, *plugin_args: str, prefix: Sequence[str] = (),
                  agent_args: Sequence[str] = ()) -> Iterator[Csi]:
    """An agent and a plugin (--mode both, then ``plugin_args``), both run with ``prefix``; stopped,
    their mounts undone and their directory removed at the end (kept with the logs after a failure)."""
    failed_before = request.session.testsfailed
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="gfuse-csi-", dir="/tmp"))  # short: unix socket paths
    kubelet = root / "kubelet"
    kubelet.mkdir()
    agent_socket = str(root / "agent.sock")
    agent_log = root / "agent.log"
    agent = plugin = None
    try:
        with open(agent_log, "ab") as f:
            # mounts below the kubelet directory, and the controllers' pool directories (--pool-mounter agent:
            # --state-dir state here, agent-ctrl-state in test_csi_backends)
            agent = subprocess.Popen([*prefix, sys.executable, "-m", "flexvolume.agent", "--socket", agent_socket,
                                      "--state", str(root / "agent-state.msgpack"), "--health-interval", "2",
                                      "--kubelet-dir", str(kubelet), "--allow-dir", str(root / "state"),
                                      "--allow-dir", str(root / "agent-ctrl-state"), "--log-level", "DEBUG",
                                      # its own holder of restartable mounts, ended below
                                      "--holder-socket", str(root / "holder.sock"),
                                      "--holder-log", str(root / "holder.log"), *agent_args],
                                     stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        _wait(lambda: AgentClient(agent_socket, timeout=2).ping(), 60, "the gfuse agent", agent, agent_log)
        plugin, endpoint, plugin_log = start_plugin(
            root, "csi", "--mode", "both", "--kubelet-dir", str(kubelet), "--agent-socket", agent_socket,
            "--state-dir", str(root / "state"), "--mount-timeout", "60", "--repair-interval", "1", *plugin_args,
            prefix=prefix)
        print(f"agent and plugin up in {time.monotonic() - t0:.1f}s")
        yield Csi(root, kubelet, agent_socket, endpoint, plugin, agent, plugin_log, agent_log)
    finally:
        _stop(plugin)  # the controller unmounts its pool mounts on SIGTERM
        if agent is not None and agent.poll() is None:
            with contextlib.suppress(AgentError):
                client = AgentClient(agent_socket, timeout=30)
                for m in client.list():
                    client.unmount(m["target"])
        _stop(agent)
        left = _cleanup_mounts(str(root))
        with contextlib.suppress(Exception):
            from gfuse.takeover import holder_request

            holder_request({"op": "quit"}, timeout=5, path=str(root / "holder.sock"))
        keep = os.environ.get("GFUSE_CSI_TEST_KEEP") or request.session.testsfailed > failed_before
        if mounts_under(str(root)):
            warnings.warn(f"mounts remain under {root}; not removing it", stacklevel=1)
        elif keep:
            warnings.warn(f"CSI test logs kept in {root} (plugin: csi.log, agent: agent.log)", stacklevel=1)
        else:
            shutil.rmtree(root, ignore_errors=True)
        assert not left, f"mounts left behind under {root}: {left}"


@pytest.fixture
def stubs(csi: Csi) -> Iterator[tuple[pb_grpc.IdentityStub, pb_grpc.NodeStub, pb_grpc.ControllerStub]]:
    ch = csi.channel()
    try:
        yield pb_grpc.IdentityStub(ch), pb_grpc.NodeStub(ch), pb_grpc.ControllerStub(ch)
    finally:
        ch.close()


def eventually(check, timeout: float = 10.0, what: str = "the native client to see it"):
    """The native client caches entries and attributes (1 s by default): a change made through
    gfuse shows there after the cache expires. Poll ``check()`` until it passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result is not False:
                return result
        except (AssertionError, OSError, ValueError):
            if time.monotonic() >= deadline:
                raise
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def expect(code: grpc.StatusCode, call, request, timeout: float = 90) -> str:
    with pytest.raises(grpc.RpcError) as ei:
        call(request, timeout=timeout)
    assert ei.value.code() == code, f"{ei.value.code()}: {ei.value.details()}"
    return ei.value.details()


# ------------------------------------------------------------------------------------------------
# the stubs


def _fdp():
    from google.protobuf import descriptor_pb2

    fdp = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(fdp)
    return fdp


def test_stubs_have_the_spec_v1_9_features() -> None:
    """The generated descriptor has what spec v1.9 added and the plugin uses, with the spec's numbers."""
    from flexvolume.csi import genstubs, stubs

    assert pb.__name__ == "flexvolume.csi.csi_pb2" and pb_grpc.__name__ == "flexvolume.csi.csi_pb2_grpc"
    assert pb.DESCRIPTOR.name == "csi.proto" and pb.DESCRIPTOR.package == "csi.v1"
    assert set(pb.DESCRIPTOR.services_by_name) >= {"Identity", "Controller", "Node"}
    assert genstubs.missing_features(_fdp()) == []
    cond = pb.DESCRIPTOR.message_types_by_name["VolumeCondition"]
    assert {f.name: f.number for f in cond.fields} == {"abnormal": 1, "message": 2}
    field = pb.NodeGetVolumeStatsResponse.DESCRIPTOR.fields_by_name["volume_condition"]
    assert field.number == 2 and field.message_type.full_name == "csi.v1.VolumeCondition"
    assert (AccessMode.SINGLE_NODE_SINGLE_WRITER, AccessMode.SINGLE_NODE_MULTI_WRITER) == (6, 7)
    RPC = pb.NodeServiceCapability.RPC
    assert (RPC.VOLUME_CONDITION, RPC.SINGLE_NODE_MULTI_WRITER, RPC.VOLUME_MOUNT_GROUP) == (4, 5, 6)
    # a v1.9 CO's bytes: volume_condition (field 2) of NodeGetVolumeStatsResponse
    got = pb.NodeGetVolumeStatsResponse.FromString(b"\x12\x08\x08\x01\x12\x04dead")
    assert got.volume_condition.abnormal and got.volume_condition.message == "dead"
    # what they were made from is recorded next to them
    info = stubs.source_info(Path(pb.__file__).parent)
    assert info.get("base_sha256") and info.get("key"), info


def test_extending_the_v1_1_descriptor() -> None:
    """The additions apply once, by the spec's names and numbers, and refuse a conflicting number."""
    from flexvolume.csi import genstubs

    fdp = _fdp()
    assert genstubs.extend(fdp) == [], "applied to stubs that have them, the additions add nothing"
    # take the v1.9 features out again (a v1.1 descriptor): extend puts them back
    fdp.message_type.remove(next(m for m in fdp.message_type if m.name == "VolumeCondition"))
    stats = next(m for m in fdp.message_type if m.name == "NodeGetVolumeStatsResponse")
    stats.field.remove(next(f for f in stats.field if f.name == "volume_condition"))
    mode = genstubs._find_enum(fdp, "VolumeCapability.AccessMode.Mode")
    mode.value.remove(next(v for v in mode.value if v.name == "SINGLE_NODE_MULTI_WRITER"))
    assert set(genstubs.missing_features(fdp)) == {
        "VolumeCondition", "NodeGetVolumeStatsResponse.volume_condition",
        "VolumeCapability.AccessMode.Mode.SINGLE_NODE_MULTI_WRITER"}
    added = genstubs.extend(fdp)
    assert "message VolumeCondition" in added
    assert "VolumeCapability.AccessMode.Mode.SINGLE_NODE_MULTI_WRITER = 7" in added
    assert genstubs.missing_features(fdp) == []
    # a base that uses one of the numbers for something else is refused, not silently merged
    mode.value.remove(next(v for v in mode.value if v.name == "SINGLE_NODE_MULTI_WRITER"))
    mode.value.add(name="SOMETHING_ELSE", number=7)
    with pytest.raises(genstubs.StubsError, match="conflicts"):
        genstubs.extend(fdp)


def test_base_descriptor_checks(tmp_path: Path) -> None:
    from flexvolume.csi import genstubs

    # the descriptor is read out of the wheel's file without running it
    src = ("from x import y\n"
           "DESCRIPTOR = _descriptor.FileDescriptor(name='csi.proto', serialized_pb=b'\\n\\tcsi.proto')\n")
    assert genstubs.descriptor_from_source(src, "t.py") == b"\n\tcsi.proto"
    with pytest.raises(genstubs.StubsError):
        genstubs.descriptor_from_source("import os\n", "t.py")
    # a wheel that is not the pinned one is refused
    fake = tmp_path / genstubs.EMBER_WHEEL
    fake.write_bytes(b"PK not the wheel")
    with pytest.raises(genstubs.StubsError, match="sha256"):
        genstubs.from_wheel(fake)
    # a csi.proto older than v1.9 is refused, naming what it lacks
    old = tmp_path / "csi.proto"
    old.write_text('syntax = "proto3";\npackage csi.v1;\nmessage NodeGetVolumeStatsResponse {}\n')
    with pytest.raises(genstubs.StubsError, match=r"lacks VolumeCondition.*v1\.9"):
        genstubs.generate(tmp_path / "out", proto=str(old))
    assert not (tmp_path / "out" / "csi_pb2.py").exists()


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_missing_stubs_fail_at_import_with_the_command_that_makes_them(tmp_path: Path) -> None:
    empty = tmp_path / "none"
    empty.mkdir()
    p = _python("import flexvolume.csi.node", GFUSE_CSI_STUBS_DIR=str(empty))
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("flexvolume.csi.stubs.StubsMissingError: flexvolume.csi: the CSI stubs were never "
                           "generated"), p.stderr
    assert str(empty) in last and last.endswith("make them with: python3 -m flexvolume.csi.stubs"), last
    # gfuse-csi says it in one line and exits 1
    p = subprocess.run([sys.executable, "-m", "flexvolume.csi.server", "--endpoint", f"unix://{tmp_path}/x.sock",
                        "--mode", "node"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "GFUSE_CSI_STUBS_DIR": str(empty)})
    assert p.returncode == 1, p
    assert p.stderr.strip().splitlines() == [
        f"gfuse-csi: flexvolume.csi: the CSI stubs were never generated (csi_pb2.py, csi_pb2_grpc.py missing in "
        f"{empty}); make them with: python3 -m flexvolume.csi.stubs"], p.stderr


def test_generating_stubs_elsewhere_and_loading_them(tmp_path: Path) -> None:
    """``python3 -m flexvolume.csi.stubs`` into $GFUSE_CSI_STUBS_DIR (as the image build does): written once,
    a no-op the second time, and loaded from there as flexvolume.csi.csi_pb2."""
    out = tmp_path / "stubs"
    env = {**os.environ, "GFUSE_CSI_STUBS_DIR": str(out)}
    cmd = [sys.executable, "-m", "flexvolume.csi.stubs"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and p.stdout.strip() == f"CSI stubs generated in {out}", p
    assert sorted(f.name for f in out.iterdir()) == ["csi_pb2.py", "csi_pb2_grpc.py", "csi_stubs.json"]
    mtime = (out / "csi_pb2.py").stat().st_mtime_ns
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0 and p.stdout.strip() == f"CSI stubs up to date in {out}", p
    assert (out / "csi_pb2.py").stat().st_mtime_ns == mtime
    p = _python("from flexvolume.csi.stubs import csi_pb2 as pb; import flexvolume.csi.node; "
                "print(pb.__name__, pb.__file__, pb.VolumeCondition.DESCRIPTOR.full_name)",
                GFUSE_CSI_STUBS_DIR=str(out))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["flexvolume.csi.csi_pb2", str(out / "csi_pb2.py"), "csi.v1.VolumeCondition"]


# ------------------------------------------------------------------------------------------------
# identity and capabilities


def test_identity(stubs) -> None:
    ident, _, _ = stubs
    info = ident.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
    assert info.name == DRIVER
    assert info.vendor_version
    caps = ident.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=10).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    expansion = {c.volume_expansion.type for c in caps if c.HasField("volume_expansion")}
    assert services == {pb.PluginCapability.Service.CONTROLLER_SERVICE}
    assert expansion == {pb.PluginCapability.VolumeExpansion.ONLINE}
    assert ident.Probe(pb.ProbeRequest(), timeout=10).ready.value is True


def test_node_and_controller_capabilities(stubs) -> None:
    _, node, ctrl = stubs
    ncaps = {c.rpc.type for c in node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=10).capabilities}
    NRPC = pb.NodeServiceCapability.RPC
    assert ncaps == {NRPC.STAGE_UNSTAGE_VOLUME, NRPC.GET_VOLUME_STATS, NRPC.VOLUME_CONDITION,
                     NRPC.SINGLE_NODE_MULTI_WRITER}
    assert node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=10).node_id == NODE_ID
    ccaps = {c.rpc.type for c in
             ctrl.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest(), timeout=10).capabilities}
    RPC = pb.ControllerServiceCapability.RPC
    assert ccaps == {RPC.CREATE_DELETE_VOLUME, RPC.EXPAND_VOLUME}
    # what is not advertised answers UNIMPLEMENTED
    expect(Code.UNIMPLEMENTED, ctrl.ControllerPublishVolume,
           pb.ControllerPublishVolumeRequest(volume_id="x", node_id=NODE_ID, volume_capability=mount_cap()))
    expect(Code.UNIMPLEMENTED, ctrl.ListVolumes, pb.ListVolumesRequest())
    expect(Code.UNIMPLEMENTED, node.NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_id="x", volume_path="/x"))


def test_node_mode_without_agent(csi: Csi) -> None:
    """--mode node: no Controller service, and Probe says not ready while the agent does not answer."""
    proc, endpoint, log = start_plugin(csi.root, "nodeonly", "--mode", "node", "--kubelet-dir", str(csi.kubelet),
                                       "--agent-socket", str(csi.root / "no-agent.sock"))
    try:
        with grpc.insecure_channel(endpoint) as ch:
            ident = pb_grpc.IdentityStub(ch)
            caps = ident.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=10).capabilities
            assert not any(c.HasField("service") for c in caps)
            # not ready (the agent may be restarting), not an error; the log says why
            assert ident.Probe(pb.ProbeRequest(), timeout=10).ready.value is False
            expect(Code.UNIMPLEMENTED, pb_grpc.ControllerStub(ch).ControllerGetCapabilities,
                   pb.ControllerGetCapabilitiesRequest())
            # staging needs the agent: UNAVAILABLE, with the reason
            staging = csi.staging("no-agent")
            details = expect(Code.UNAVAILABLE, pb_grpc.NodeStub(ch).NodeStageVolume, pb.NodeStageVolumeRequest(
                volume_id="127.0.0.2:/nosuchvolume", staging_target_path=staging, volume_capability=mount_cap()))
            assert "not running" in details, details
    finally:
        _stop(proc)
        assert proc.returncode == 0, _tail(log)
    assert not os.path.exists(endpoint[len("unix://"):]), "the plugin must remove its socket when it stops"


# ------------------------------------------------------------------------------------------------
# required fields and error codes (no volume needed)


def _bad_requests(k: Path) -> list[tuple[str, str, object, grpc.StatusCode]]:
    st = str(k / "plugins/kubernetes.io/csi/x/globalmount")
    tp = str(k / "pods/uid/volumes/kubernetes.io~csi/pv/mount")
    vid = "127.0.0.2:/somevolume"
    cap = mount_cap()
    pool = {"pool": "127.0.0.2:/somepool"}
    rng = pb.CapacityRange
    IA, NF, FP = Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION
    return [
        ("node", "NodeStageVolume", pb.NodeStageVolumeRequest(staging_target_path=st, volume_capability=cap), IA),
        ("node", "NodeStageVolume", pb.NodeStageVolumeRequest(volume_id=vid, volume_capability=cap), IA),
        ("node", "NodeStageVolume", pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=st), IA),
        ("node", "NodeStageVolume", pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=st,
                                                              volume_capability=block_cap()), IA),
        ("node", "NodeStageVolume", pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path="/tmp/elsewhere",
                                                              volume_capability=cap), IA),
        ("node", "NodeStageVolume", pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path="relative/path",
                                                              volume_capability=cap), IA),
        ("node", "NodeStageVolume", pb.NodeStageVolumeRequest(volume_id="no-such-volume", staging_target_path=st,
                                                              volume_capability=cap), NF),
        ("node", "NodeStageVolume", pb.NodeStageVolumeRequest(volume_id="x", staging_target_path=st,
                                                              volume_capability=cap,
                                                              volume_context={"source": "not a source"}), IA),
        ("node", "NodeUnstageVolume", pb.NodeUnstageVolumeRequest(staging_target_path=st), IA),
        ("node", "NodeUnstageVolume", pb.NodeUnstageVolumeRequest(volume_id=vid), IA),
        ("node", "NodePublishVolume", pb.NodePublishVolumeRequest(staging_target_path=st, target_path=tp,
                                                                  volume_capability=cap), IA),
        ("node", "NodePublishVolume", pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=st,
                                                                  volume_capability=cap), IA),
        ("node", "NodePublishVolume", pb.NodePublishVolumeRequest(volume_id=vid, target_path=tp,
                                                                  volume_capability=cap), IA),
        ("node", "NodePublishVolume", pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=st,
                                                                  target_path=tp), IA),
        ("node", "NodePublishVolume", pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=st,
                                                                  target_path=tp, volume_capability=block_cap()), IA),
        ("node", "NodePublishVolume", pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=st,
                                                                  target_path=tp, volume_capability=cap), FP),
        ("node", "NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(target_path=tp), IA),
        ("node", "NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(volume_id=vid), IA),
        ("node", "NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_path=tp), IA),
        ("node", "NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_id=vid), IA),
        ("node", "NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=tp), NF),
        # csi-sanity's "should fail when volume is not found": a relative path is NOT_FOUND, not INVALID_ARGUMENT
        ("node", "NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path="some/path"), NF),
        ("node", "NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path="/tmp"), NF),
        ("node", "NodeStageVolume", pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=st,
                                                              volume_capability=mount_cap(99)), IA),
        ("ctrl", "CreateVolume", pb.CreateVolumeRequest(volume_capabilities=[cap], parameters=pool), IA),
        ("ctrl", "CreateVolume", pb.CreateVolumeRequest(name="pvc-a", parameters=pool), IA),
        ("ctrl", "CreateVolume", pb.CreateVolumeRequest(name="pvc-a", volume_capabilities=[block_cap()],
                                                        parameters=pool), IA),
        ("ctrl", "CreateVolume", pb.CreateVolumeRequest(name="pvc-a", volume_capabilities=[cap]), IA),
        ("ctrl", "CreateVolume", pb.CreateVolumeRequest(name="pvc-a", volume_capabilities=[cap],
                                                        parameters={**pool, "poool": "typo"}), IA),
        ("ctrl", "CreateVolume", pb.CreateVolumeRequest(name="pvc-a", volume_capabilities=[cap],
                                                        parameters={"pool": "127.0.0.2:/pool/sub"}), IA),
        ("ctrl", "CreateVolume", pb.CreateVolumeRequest(name="pvc-a", volume_capabilities=[cap],
                                                        parameters={"backend": "volume", "replcia": "3"}), IA),
        ("ctrl", "CreateVolume", pb.CreateVolumeRequest(name="pvc-a", volume_capabilities=[cap],
                                                        parameters={"backend": "bogus"}), IA),
        ("ctrl", "CreateVolume", pb.CreateVolumeRequest(name="pvc-a", volume_capabilities=[cap],
                                                        parameters={**pool, "dirMode": "0999"}), IA),
        ("ctrl", "CreateVolume", pb.CreateVolumeRequest(name="pvc-a", volume_capabilities=[cap],
                                                        parameters={**pool, "mountOptions": "subdir=/x"}), IA),
        ("ctrl", "CreateVolume", pb.CreateVolumeRequest(name="pvc-a", volume_capabilities=[cap], parameters=pool,
                                                        capacity_range=rng(required_bytes=2 * GiB,
                                                                           limit_bytes=GiB)), IA),
        ("ctrl", "CreateVolume", pb.CreateVolumeRequest(name="pvc-a", volume_capabilities=[cap], parameters=pool,
                                                        capacity_range=rng(required_bytes=-1)), IA),
        ("ctrl", "CreateVolume", pb.CreateVolumeRequest(
            name="pvc-a", volume_capabilities=[cap], parameters=pool,
            volume_content_source=pb.VolumeContentSource(
                snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id="s"))), IA),
        ("ctrl", "DeleteVolume", pb.DeleteVolumeRequest(), IA),
        ("ctrl", "ValidateVolumeCapabilities", pb.ValidateVolumeCapabilitiesRequest(volume_capabilities=[cap]), IA),
        ("ctrl", "ValidateVolumeCapabilities", pb.ValidateVolumeCapabilitiesRequest(volume_id=vid), IA),
        ("ctrl", "ValidateVolumeCapabilities", pb.ValidateVolumeCapabilitiesRequest(
            volume_id="no-such-volume", volume_capabilities=[cap]), NF),
        ("ctrl", "ControllerExpandVolume", pb.ControllerExpandVolumeRequest(
            capacity_range=rng(required_bytes=GiB)), IA),
        ("ctrl", "ControllerExpandVolume", pb.ControllerExpandVolumeRequest(volume_id=vid), IA),
        ("ctrl", "ControllerExpandVolume", pb.ControllerExpandVolumeRequest(
            volume_id="no-such-volume", capacity_range=rng(required_bytes=GiB)), NF),
    ]


def test_errors_and_codes(csi: Csi, stubs) -> None:
    _, node, ctrl = stubs
    failures = []
    for i, (svc, method, request, code) in enumerate(_bad_requests(csi.kubelet)):
        call = getattr(node if svc == "node" else ctrl, method)
        try:
            call(request, timeout=30)
        except grpc.RpcError as e:
            if e.code() != code:
                failures.append(f"#{i} {method}({str(request).strip()!r}): {e.code().name} {e.details()!r}, "
                                f"expected {code.name}")
            elif not e.details():
                failures.append(f"#{i} {method}: {code.name} without a message")
        else:
            failures.append(f"#{i} {method}({str(request).strip()!r}) succeeded, expected {code.name}")
    assert not failures, "\n".join(failures)
    # none of these may have mounted or created anything
    assert not mounts_under(str(csi.kubelet))
    assert not any(csi.kubelet.rglob("mount"))


# ------------------------------------------------------------------------------------------------
# node: real mounts of a replica-3 volume


def _node_mounts(csi: Csi) -> list[str]:
    return sorted(m.target for m in mounts_under(str(csi.kubelet)))


def test_stage_publish_unpublish_unstage(csi: Csi, stubs, vol_replica3, native_mount) -> None:
    """The node lifecycle with real mounts; the plugin that staged and published is SIGKILLed
    halfway (the mounts belong to the agent and the kernel, not to it) and the main one finishes."""
    vol = vol_replica3
    native = native_mount(vol)
    name = f"csi-{secrets.token_hex(4)}"
    (native.path / name).mkdir()
    # a static PV: the id names the gluster source, here a subdirectory of the volume
    vid = f"{vol.source}/{name}"
    cap = mount_cap()
    staging = csi.staging(name)
    rw_target = csi.target("pod-rw", name)
    ro_target = csi.target("pod-ro", name)
    first, endpoint, _log = start_plugin(csi.root, "first", "--mode", "node", "--kubelet-dir", str(csi.kubelet),
                                        "--agent-socket", csi.agent_socket)
    ch = grpc.insecure_channel(endpoint)
    try:
        node = pb_grpc.NodeStub(ch)
        _node_lifecycle_first_half(csi, node, vol, native, name, vid, cap, staging, rw_target, ro_target)
    finally:
        ch.close()
        first.kill()
        first.wait(10)
    # the pods' mounts outlive the plugin
    assert Path(ro_target, "from-native.txt").read_text() == "hello from the native client\n"
    _, node, _ = stubs
    _node_lifecycle_second_half(csi, node, native, name, vid, cap, staging, rw_target, ro_target)


def _node_lifecycle_first_half(csi, node, vol, native, name, vid, cap, staging, rw_target, ro_target) -> None:
    t0 = time.monotonic()
    stage = pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging, volume_capability=cap)
    node.NodeStageVolume(stage, timeout=90)
    t_stage = time.monotonic() - t0
    node.NodeStageVolume(stage, timeout=90)  # idempotent
    [m] = mounts_at(staging)
    assert m.fstype == "fuse.gfuse" and m.source.rstrip("/") == vid, m
    assert [r["target"] for r in csi.agent_client().list()] == [staging], "the agent owns the staging mount"
    # the same staging path for another volume: ALREADY_EXISTS, nothing changed
    expect(Code.ALREADY_EXISTS, node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vol.source, staging_target_path=staging, volume_capability=cap))
    assert len(mounts_at(staging)) == 1

    publish = pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging, target_path=rw_target,
                                          volume_capability=cap)
    node.NodePublishVolume(publish, timeout=30)
    node.NodePublishVolume(publish, timeout=30)  # idempotent
    assert len(mounts_at(rw_target)) == 1
    # the same target read-only: incompatible with what is there
    ro_publish = pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging, target_path=rw_target,
                                             volume_capability=cap, readonly=True)
    expect(Code.ALREADY_EXISTS, node.NodePublishVolume, ro_publish)
    ro_publish.target_path = ro_target
    node.NodePublishVolume(ro_publish, timeout=30)
    node.NodePublishVolume(ro_publish, timeout=30)
    assert mounts_at(ro_target)[-1].readonly and not mounts_at(rw_target)[-1].readonly

    # a pod writes through its target; the native client reads it from the volume
    data = os.urandom(256 * 1024)
    with open(os.path.join(rw_target, "from-pod.bin"), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    eventually(lambda: (native.path / name / "from-pod.bin").read_bytes() == data)
    (native.path / name / "from-native.txt").write_text("hello from the native client\n")
    eventually(lambda: Path(ro_target, "from-native.txt").read_text() == "hello from the native client\n",
               what="gfuse to see the native client's file")
    assert Path(ro_target, "from-pod.bin").read_bytes() == data
    with pytest.raises(OSError) as ei:
        Path(ro_target, "nope").write_text("x")
    assert ei.value.errno == 30  # EROFS
    print(f"NodeStageVolume (a real gfuse mount) took {t_stage:.2f}s")


def _node_lifecycle_second_half(csi, node, native, name, vid, cap, staging, rw_target, ro_target) -> None:
    data = (native.path / name / "from-pod.bin").read_bytes()
    assert Path(rw_target, "from-pod.bin").read_bytes() == data
    # kubelet retries after a plugin restart: the new plugin finds everything in place
    before = _node_mounts(csi)
    node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                   volume_capability=cap), timeout=90)
    node.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                       target_path=rw_target, volume_capability=cap), timeout=30)
    node.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                       target_path=ro_target, volume_capability=cap, readonly=True),
                           timeout=30)
    assert _node_mounts(csi) == before

    # stats of a published volume: bytes and inodes, consistent
    stats = node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=rw_target), timeout=30)
    assert stats.HasField("volume_condition") and not stats.volume_condition.abnormal, stats
    assert stats.volume_condition.message, "the condition's message is REQUIRED"
    usage = {u.unit: u for u in stats.usage}
    assert set(usage) == {pb.VolumeUsage.BYTES, pb.VolumeUsage.INODES}
    b, i = usage[pb.VolumeUsage.BYTES], usage[pb.VolumeUsage.INODES]
    st = os.statvfs(native.path)
    assert b.total > 0 and 0 < b.used <= b.total and 0 <= b.available <= b.total
    assert abs(b.total - st.f_blocks * st.f_frsize) <= 0.05 * b.total, (b, st)
    assert i.total > 0 and i.used > 0 and i.available <= i.total

    for target in (rw_target, ro_target):
        unpublish = pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
        node.NodeUnpublishVolume(unpublish, timeout=30)
        node.NodeUnpublishVolume(unpublish, timeout=30)  # idempotent
        assert not mounts_at(target) and not os.path.exists(target), "the target is unmounted and removed"
    assert _node_mounts(csi) == [staging], "unpublish must leave the staging mount alone"
    unstage = pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging)
    node.NodeUnstageVolume(unstage, timeout=60)
    node.NodeUnstageVolume(unstage, timeout=60)  # idempotent
    assert _node_mounts(csi) == []
    assert csi.agent_client().list() == []
    # the data stays on the volume
    assert (native.path / name / "from-pod.bin").read_bytes() == data


def _stage_publish_kill(csi: Csi, node, vol, native, pod: str) -> tuple[str, str, str, str, float]:
    """Stage and publish a new directory of ``vol``, write a file through the target, SIGKILL the gfuse
    process serving the staging mount: (volume id, staging, target, name, time of the kill)."""
    name = f"csi-{secrets.token_hex(4)}"
    (native.path / name).mkdir()
    vid = f"{vol.source}/{name}"
    cap = mount_cap()
    staging = csi.staging(name)
    target = csi.target(pod, name)
    node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                   volume_capability=cap), timeout=90)
    node.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                       target_path=target, volume_capability=cap), timeout=30)
    Path(target, "before.txt").write_text("before\n")
    [rec] = [r for r in csi.agent_client().list() if r["target"] == staging]
    assert rec["pid"], rec
    t0 = time.monotonic()
    os.kill(rec["pid"], signal.SIGKILL)
    return vid, staging, target, name, t0


def _unpublish_unstage(node, vid: str, staging: str, target: str) -> None:
    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target), timeout=30)
    node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging), timeout=60)


def test_published_target_recovers_when_the_gfuse_server_dies(request: pytest.FixtureRequest, vol_replica3,
                                                              native_mount) -> None:
    """Repair-only mounts (an agent with --restartable no, as on a kernel without FUSE_NOTIFY_RESEND): the
    gfuse process serving a staged volume is SIGKILLed, the agent mounts the volume again over the dead
    staging mount, and the plugin binds the pod's dead target to the new mount (new opens work)."""
    native = native_mount(vol_replica3)
    with csi_processes(request, agent_args=("--restartable", "no")) as csi:
        ch = csi.channel()
        try:
            node = pb_grpc.NodeStub(ch)
            vid, staging, target, name, t0 = _stage_publish_kill(csi, node, vol_replica3, native, "pod-crash")
            try:
                deadline = time.monotonic() + 5
                while True:
                    try:
                        os.stat(target)
                    except OSError as e:
                        assert e.errno in (107, 103), e  # ENOTCONN / ECONNABORTED
                        break
                    assert time.monotonic() < deadline, "the target still answers 5 s after its server was killed"
                    time.sleep(0.05)
                _wait(lambda: Path(target, "before.txt").read_text() == "before\n", 60,
                      "the published target to work again", log=csi.plugin_log)
                print(f"target repaired {time.monotonic() - t0:.1f}s after the kill")
                Path(target, "after.txt").write_text("after\n")
                eventually(lambda: (native.path / name / "after.txt").read_text() == "after\n")
            finally:
                _unpublish_unstage(node, vid, staging, target)
            assert _node_mounts(csi) == []
        finally:
            ch.close()


def test_published_target_of_a_restartable_mount_never_fails(csi: Csi, stubs, vol_replica3, native_mount) -> None:
    """The default where the kernel has FUSE_NOTIFY_RESEND: the staging mount is restartable (its FUSE
    connection held by the agent's holder), so a SIGKILL of its server is a pause on the pod's target —
    every call through it succeeds, with the same mount, and the agent reports the mount restartable."""
    if "new mounts are restartable" not in Path(csi.agent_log).read_text():  # the agent's start-up line
        pytest.skip(f"this kernel ({os.uname().release}) has no FUSE_NOTIFY_RESEND: the agent makes repair-only "
                    "mounts")
    _, node, _ = stubs
    native = native_mount(vol_replica3)
    vid, staging, target, name, t0 = _stage_publish_kill(csi, node, vol_replica3, native, "pod-restart")
    try:
        before = mounts_at(target)
        assert Path(target, "before.txt").read_text() == "before\n"  # waits out the pause, never fails
        Path(target, "after.txt").write_text("after\n")
        print(f"served again {time.monotonic() - t0:.2f}s after the kill")
        eventually(lambda: (native.path / name / "after.txt").read_text() == "after\n")
        assert mounts_at(target) == before and len(mounts_at(staging)) == 1, "no mount made or stacked"
        [rec] = [r for r in csi.agent_client().list() if r["target"] == staging]
        assert rec.get("mode", "").startswith("restartable"), rec
    finally:
        _unpublish_unstage(node, vid, staging, target)
    assert _node_mounts(csi) == []


def test_single_node_access_modes(csi: Csi, stubs, vol_replica3, native_mount) -> None:
    """SINGLE_NODE_SINGLE_WRITER and SINGLE_NODE_MULTI_WRITER (spec v1.5) are served like SINGLE_NODE_WRITER;
    a SINGLE_NODE_SINGLE_WRITER volume is published at one target at a time (csi-sanity: "should fail when
    volume with single node single writer access mode is already mounted at a different target path",
    FAILED_PRECONDITION), a SINGLE_NODE_MULTI_WRITER one at several."""
    _, node, _ = stubs
    vol = vol_replica3
    native = native_mount(vol)
    for mode in (AccessMode.SINGLE_NODE_SINGLE_WRITER, AccessMode.SINGLE_NODE_MULTI_WRITER,
                 AccessMode.SINGLE_NODE_WRITER):
        mode_name = AccessMode.Mode.Name(mode)
        name = f"csi-{mode_name.lower().replace('_', '-')}-{secrets.token_hex(3)}"
        (native.path / name).mkdir()
        vid = f"{vol.source}/{name}"
        cap = mount_cap(mode)
        staging = csi.staging(name)
        targets = [csi.target("pod-a", name), csi.target("pod-b", name)]
        node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                       volume_capability=cap), timeout=90)
        try:
            publish = [pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging, target_path=t,
                                                   volume_capability=cap) for t in targets]
            node.NodePublishVolume(publish[0], timeout=30)
            node.NodePublishVolume(publish[0], timeout=30)  # idempotent, also for the single writer
            if mode == AccessMode.SINGLE_NODE_SINGLE_WRITER:
                details = expect(Code.FAILED_PRECONDITION, node.NodePublishVolume, publish[1])
                assert "SINGLE_NODE_SINGLE_WRITER" in details and targets[0] in details, details
                assert not mounts_at(targets[1])
                # once the first target is gone, the other one may have it
                node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=targets[0]),
                                         timeout=30)
                node.NodePublishVolume(publish[1], timeout=30)
            else:
                node.NodePublishVolume(publish[1], timeout=30)
                Path(targets[0], "a.txt").write_text(mode_name)
                eventually(lambda t=targets[1], want=mode_name: Path(t, "a.txt").read_text() == want,
                           what="the other target to see the file")
            ctrl_cap = pb.ValidateVolumeCapabilitiesRequest(volume_id=vid, volume_capabilities=[cap])
            assert stubs[2].ValidateVolumeCapabilities(ctrl_cap, timeout=30).HasField("confirmed"), mode_name
        finally:
            for t in targets:
                node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=t), timeout=30)
            node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging),
                                   timeout=60)
    assert _node_mounts(csi) == []


def _stats(node, vid: str, path: str):
    return node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path), timeout=30)


def test_volume_condition_reports_dead_and_missing_mounts(csi: Csi, stubs, vol_replica3) -> None:
    """NodeGetVolumeStats (what kubelet's volume health check calls, csi_client.go NodeGetVolumeStats) tells a
    live gfuse mount from one whose server died (abnormal, with the reason), from a path where something else
    or nothing is mounted. The mount here is a plain ``gfuse mount`` that no agent repairs, so it stays dead."""
    _, node, _ = stubs
    vol = vol_replica3
    vid = vol.source
    target = csi.target("pod-health", "pv-health")
    os.makedirs(target)
    subprocess.run([sys.executable, "-m", "gfuse.cli", "mount", vol.source, target], check=True, timeout=90,
                   capture_output=True)
    try:
        ok = _stats(node, vid, target)
        assert not ok.volume_condition.abnormal and vol.source in ok.volume_condition.message, ok
        assert {u.unit for u in ok.usage} == {pb.VolumeUsage.BYTES, pb.VolumeUsage.INODES}
        [pid] = gfuse_serving_pids_under(target)
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: _stats(node, vid, target).volume_condition.abnormal, 10, "the condition to turn abnormal")
        dead = _stats(node, vid, target)
        assert "dead" in dead.volume_condition.message and "not connected" in dead.volume_condition.message, dead
        assert not dead.usage, "no usage from a dead mount"
    finally:
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=30)
    # the directory is there, but nothing is mounted on it any more
    gone = _stats(node, vid, target)
    assert gone.volume_condition.abnormal and "nothing is mounted" in gone.volume_condition.message, gone
    # something that is not a gfuse mount
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "csi-test-tmpfs", target], check=True, timeout=30)
    try:
        other = _stats(node, vid, target)
        assert other.volume_condition.abnormal and "not a gfuse mount" in other.volume_condition.message, other
    finally:
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=30)
    os.rmdir(target)
    details = expect(Code.NOT_FOUND, node.NodeGetVolumeStats,
                     pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target))
    assert "no such path" in details, details


def test_example_storage_classes_are_accepted() -> None:
    """The CSI StorageClass examples have the parameters the controller and its backends accept."""
    import yaml

    from flexvolume.csi.controller import split_params
    from flexvolume.storage.backends import backend_for
    from flexvolume.storage.glusterd import Glusterd

    files = sorted((Path(__file__).resolve().parents[2] / "daemonset/storageclasses").glob("csi-*.yaml"))
    kinds = set()
    for f in files:
        sc = yaml.safe_load(f.read_text())
        _, params = split_params(sc["parameters"])
        backend = backend_for(params, glusterd=Glusterd("/nonexistent"), pool="gfuse-pool", state_dir="/nonexistent")
        kinds.add(backend.kind)
    assert kinds == {"subdir", "volume"}, files


# ------------------------------------------------------------------------------------------------
# issue 11: what a PV or StorageClass gives cannot reach the host


def test_injections_refused_and_mounts_keep_nosuid_nodev(csi: Csi, stubs, vol_replica3, native_mount) -> None:
    """Mount flags (PV/StorageClass mountOptions) and the volume context are checked as Kubernetes input:
    subdir traversals, log-file=, TLS files and a comma in the source are INVALID_ARGUMENT and leave nothing
    behind; suid/dev asked as flags are ignored, so the staging mount and the pod's bind mount stay
    nosuid,nodev in /proc/mounts."""
    _, node, _ = stubs
    vol = vol_replica3
    name = f"inj-{secrets.token_hex(4)}"
    (native_mount(vol).path / name).mkdir()
    staging = csi.staging(name)
    log_target = csi.root / f"{name}.log"
    bad = [
        (mount_cap(flags=("subdir=..",)), {}, "must be given as 'source'"),
        (mount_cap(flags=("subdir=../other",)), {}, "must be given as 'source'"),
        (mount_cap(flags=(f"log-file={log_target}",)), {}, "names a file on the node"),
        (mount_cap(flags=("ssl-key=/etc/shadow",)), {}, "names a file on the node"),
        (mount_cap(), {"source": f"{vol.source}/{name}", "mountOptions": f"log-file={log_target}"},
         "names a file on the node"),
        (mount_cap(), {"source": f"{vol.source}/{name},suid,dev"}, "comma"),
        (mount_cap(), {"source": f"{vol.source}/../{name}"}, "'..'"),
    ]
    for cap, ctx, why in bad:
        msg = expect(Code.INVALID_ARGUMENT, node.NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id=f"{vol.source}/{name}", staging_target_path=staging, volume_capability=cap,
            volume_context=ctx))
        assert why in msg, msg
    assert not os.path.exists(staging) and not log_target.exists() and csi.agent_client().list() == []

    cap = mount_cap(flags=("suid", "dev", "exec"))
    vid = f"{vol.source}/{name}"
    node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                   volume_capability=cap), timeout=90)
    target = csi.target("pod-inj", name)
    try:
        node.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                           target_path=target, volume_capability=cap), timeout=30)
        proc_mounts = {line.split()[1]: line.split()[3].split(",") for line in Path("/proc/mounts").read_text()
                       .splitlines()}
        for path in (staging, target):
            assert {"nosuid", "nodev"} <= set(proc_mounts[path]), (path, proc_mounts[path])
        assert mounts_at(staging)[-1].source == vid
    finally:
        node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target), timeout=30)
        node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging), timeout=60)
    assert not mounts_at(staging) and not log_target.exists()


# ------------------------------------------------------------------------------------------------
# csi-sanity's cases (kubernetes-csi/csi-test pkg/sanity; flexvolume/csi/SANITY.md maps every one to a test)
#
# csi-sanity cannot be built here (no Go module proxy): these send its requests, field for field, with its
# directories: a target *parent* (--csi.mountdir, os.Mkdir'd by csi-sanity before each case; the target is
# "<it>/target", made by the plugin) and a staging directory (--csi.stagingdir, os.Mkdir'd too), removed by it
# with os.Remove after each case. Under the plugin's --kubelet-dir here, as a real run needs
# (``gfuse-csi --kubelet-dir /tmp/sanity`` with ``--csi.mountdir /tmp/sanity/csi-mount``).

SANITY_SIZE = 4 << 20  #: --csi.testvolumesize (its default, 10 GiB, is larger than the test pools)
SANITY_EXPAND_SIZE = 8 << 20  #: --csi.testvolumeexpandsize
SANITY_IDEMPOTENT_COUNT = 10  #: csi-sanity's default Config.IdempotentCount
#: what csi-sanity's switch statements accept
SANITY_PLUGIN_SERVICES = {"CONTROLLER_SERVICE", "VOLUME_ACCESSIBILITY_CONSTRAINTS", "GROUP_CONTROLLER_SERVICE",
                          "SNAPSHOT_METADATA_SERVICE"}
SANITY_NODE_CAPS = {"UNKNOWN", "STAGE_UNSTAGE_VOLUME", "GET_VOLUME_STATS", "EXPAND_VOLUME", "VOLUME_CONDITION",
                    "SINGLE_NODE_MULTI_WRITER", "VOLUME_MOUNT_GROUP"}
SANITY_CONTROLLER_CAPS = {"CREATE_DELETE_VOLUME", "PUBLISH_UNPUBLISH_VOLUME", "LIST_VOLUMES", "GET_CAPACITY",
                          "CREATE_DELETE_SNAPSHOT", "LIST_SNAPSHOTS", "PUBLISH_READONLY", "CLONE_VOLUME",
                          "EXPAND_VOLUME", "MODIFY_VOLUME", "LIST_VOLUMES_PUBLISHED_NODES", "GET_VOLUME",
                          "VOLUME_CONDITION", "SINGLE_NODE_MULTI_WRITER", "GET_SNAPSHOT"}


def sanity_cap(mode: int = AccessMode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    """TestVolumeCapabilityWithAccessType: a mount volume, no flags, no fs type."""
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(), access_mode=AccessMode(mode=mode))


def sanity_volume_id() -> str:
    """DefaultIDGenerator.GenerateUniqueValidVolumeID"""
    return f"fake-vol-id-{secrets.token_hex(5)}"


@dataclass
class SanityDirs:
    mount: str    # sc.TargetPath: the parent of the targets
    staging: str  # sc.StagingPath

    @property
    def target(self) -> str:
        return self.mount + "/target"


@contextlib.contextmanager
def sanity_dirs(kubelet: Path) -> Iterator[SanityDirs]:
    """csi-sanity's Setup (os.Mkdir of both, an error if they exist) and Teardown (os.Remove, errors ignored)."""
    tag = secrets.token_hex(3)
    d = SanityDirs(str(kubelet / f"csi-mount-{tag}"), str(kubelet / f"csi-staging-{tag}"))
    os.mkdir(d.mount, 0o755)
    os.mkdir(d.staging, 0o755)
    try:
        yield d
    finally:
        for p in (d.mount, d.staging):
            with contextlib.suppress(OSError):
                os.rmdir(p)


def sanity_cleanup(node, ctrl, dirs: SanityDirs, volume_ids: Sequence[str]) -> None:
    """Resources.Cleanup: for each volume made (last first) NodeUnpublishVolume of <mountdir>/target and
    NodeUnstageVolume of the staging dir -- also for volumes never staged -- where any code but NOT_FOUND fails
    (isRelevantError), then DeleteVolume, which must succeed."""
    errors = []
    for vid in reversed(volume_ids):
        for call, request in ((node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id=vid,
                                                                                       target_path=dirs.target)),
                              (node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(volume_id=vid,
                                                                                   staging_target_path=dirs.staging))):
            try:
                call(request, timeout=60)
            except grpc.RpcError as e:
                if e.code() != Code.NOT_FOUND:
                    errors.append(f"{type(request).__name__} of {vid}: {e.code().name} {e.details()}")
        if ctrl is not None:
            try:
                ctrl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=120)
            except grpc.RpcError as e:
                errors.append(f"DeleteVolume of {vid}: {e.code().name} {e.details()}")
    assert not errors, errors


def test_sanity_identity_and_capabilities(csi: Csi, stubs) -> None:
    """Identity: GetPluginCapabilities, Probe, GetPluginInfo; NodeGetCapabilities, NodeGetInfo,
    ControllerGetCapabilities "should return appropriate capabilities/values" -- what csi-sanity checks, on the
    plugin's default driver name too."""
    import re

    from flexvolume.csi import DEFAULT_DRIVER_NAME

    ident, node, ctrl = stubs
    for c in ident.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=10).capabilities:
        kind = c.WhichOneof("type")
        assert kind in ("service", "volume_expansion"), c
        if kind == "service":
            assert pb.PluginCapability.Service.Type.Name(c.service.type) in SANITY_PLUGIN_SERVICES, c
        else:
            assert c.volume_expansion.type in (pb.PluginCapability.VolumeExpansion.ONLINE,
                                               pb.PluginCapability.VolumeExpansion.OFFLINE), c
    try:  # OK or FAILED_PRECONDITION; ready, when set, any value
        ident.Probe(pb.ProbeRequest(), timeout=10)
    except grpc.RpcError as e:
        assert e.code() == Code.FAILED_PRECONDITION, e
    # the Go regexp `^[a-zA-Z][A-Za-z0-9-\\.\\_]{0,61}[a-zA-Z]$` (in a raw string: the class has '\' too)
    name_re = re.compile(r"^[a-zA-Z][A-Za-z0-9\-\\._]{0,61}[a-zA-Z]$")
    name = ident.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10).name
    for n in (name, DEFAULT_DRIVER_NAME):
        assert 0 < len(n) <= 63 and name_re.match(n), n
    ncaps = node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=10).capabilities
    assert ncaps and all(c.HasField("rpc") and pb.NodeServiceCapability.RPC.Type.Name(c.rpc.type) in SANITY_NODE_CAPS
                         for c in ncaps), ncaps
    info = node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=10)
    assert info.node_id and info.max_volumes_per_node >= 0, info
    # no VOLUME_ACCESSIBILITY_CONSTRAINTS, so no accessible_topology is required
    ccaps = ctrl.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest(), timeout=10).capabilities
    assert ccaps and all(c.HasField("rpc") and pb.ControllerServiceCapability.RPC.Type.Name(c.rpc.type)
                         in SANITY_CONTROLLER_CAPS for c in ccaps), ccaps


def _sanity_requests() -> list[tuple[str, str, object, grpc.StatusCode | None]]:
    """(csi-sanity's case, method, request builder (dirs) , expected code; None: success)."""
    IA, NF = Code.INVALID_ARGUMENT, Code.NOT_FOUND
    device = {"device": "/dev/mock"}
    params = {"pool": "127.0.0.2:/somepool"}  # --csi.testvolumeparameters
    expand = pb.CapacityRange(required_bytes=SANITY_EXPAND_SIZE)
    return [
        ("NodePublishVolume should fail when no volume id is provided", "node.NodePublishVolume",
         lambda d: pb.NodePublishVolumeRequest(), IA),
        ("NodePublishVolume should fail when no target path is provided", "node.NodePublishVolume",
         lambda d: pb.NodePublishVolumeRequest(volume_id=sanity_volume_id()), IA),
        ("NodePublishVolume should fail when no volume capability is provided", "node.NodePublishVolume",
         lambda d: pb.NodePublishVolumeRequest(volume_id=sanity_volume_id(), target_path=d.target), IA),
        ("NodeUnpublishVolume should fail when no volume id is provided", "node.NodeUnpublishVolume",
         lambda d: pb.NodeUnpublishVolumeRequest(), IA),
        ("NodeUnpublishVolume should fail when no target path is provided", "node.NodeUnpublishVolume",
         lambda d: pb.NodeUnpublishVolumeRequest(volume_id=sanity_volume_id()), IA),
        ("NodeStageVolume should fail when no volume id is provided", "node.NodeStageVolume",
         lambda d: pb.NodeStageVolumeRequest(staging_target_path=d.staging, volume_capability=sanity_cap(),
                                             publish_context=device), IA),
        ("NodeStageVolume should fail when no staging target path is provided", "node.NodeStageVolume",
         lambda d: pb.NodeStageVolumeRequest(volume_id=sanity_volume_id(), volume_capability=sanity_cap(),
                                             publish_context=device), IA),
        # csi-sanity creates the volume first; the request is refused before the id is looked at
        ("NodeStageVolume should fail when no volume capability is provided", "node.NodeStageVolume",
         lambda d: pb.NodeStageVolumeRequest(volume_id="127.0.0.2:/somevolume", staging_target_path=d.staging,
                                             publish_context=device), IA),
        ("NodeUnstageVolume should fail when no volume id is provided", "node.NodeUnstageVolume",
         lambda d: pb.NodeUnstageVolumeRequest(staging_target_path=d.staging), IA),
        ("NodeUnstageVolume should fail when no staging target path is provided", "node.NodeUnstageVolume",
         lambda d: pb.NodeUnstageVolumeRequest(volume_id=sanity_volume_id()), IA),
        ("NodeGetVolumeStats should fail when no volume id is provided", "node.NodeGetVolumeStats",
         lambda d: pb.NodeGetVolumeStatsRequest(volume_path="some/path"), IA),
        ("NodeGetVolumeStats should fail when no volume path is provided", "node.NodeGetVolumeStats",
         lambda d: pb.NodeGetVolumeStatsRequest(volume_id=sanity_volume_id()), IA),
        ("NodeGetVolumeStats should fail when volume is not found", "node.NodeGetVolumeStats",
         lambda d: pb.NodeGetVolumeStatsRequest(volume_id=sanity_volume_id(), volume_path="some/path"), NF),
        ("CreateVolume should fail when no name is provided", "ctrl.CreateVolume",
         lambda d: pb.CreateVolumeRequest(parameters=params), IA),
        ("CreateVolume should fail when no volume capabilities are provided", "ctrl.CreateVolume",
         lambda d: pb.CreateVolumeRequest(name=f"sanity-controller-create-no-volume-capabilities-"
                                               f"{secrets.token_hex(4)}", parameters=params), IA),
        ("DeleteVolume should fail when no volume id is provided", "ctrl.DeleteVolume",
         lambda d: pb.DeleteVolumeRequest(), IA),
        ("DeleteVolume should succeed when an invalid volume id is used", "ctrl.DeleteVolume",
         lambda d: pb.DeleteVolumeRequest(volume_id="fake-vol-id"), None),
        ("ValidateVolumeCapabilities should fail when no volume id is provided", "ctrl.ValidateVolumeCapabilities",
         lambda d: pb.ValidateVolumeCapabilitiesRequest(), IA),
        ("ValidateVolumeCapabilities should fail when the requested volume does not exist",
         "ctrl.ValidateVolumeCapabilities",
         lambda d: pb.ValidateVolumeCapabilitiesRequest(volume_id=sanity_volume_id(),
                                                        volume_capabilities=[sanity_cap()]), NF),
        ("ExpandVolume should fail if no volume id is given", "ctrl.ControllerExpandVolume",
         lambda d: pb.ControllerExpandVolumeRequest(capacity_range=expand, volume_capability=sanity_cap()), IA),
        # sic: csi-sanity sends VolumeId "" here too
        ("ExpandVolume should fail if no capacity range is given", "ctrl.ControllerExpandVolume",
         lambda d: pb.ControllerExpandVolumeRequest(volume_id=""), IA),
    ]


@pytest.mark.parametrize("case,method,build,code", _sanity_requests(), ids=[c[0] for c in _sanity_requests()])
def test_sanity_request_validation(csi: Csi, stubs, case: str, method: str, build, code) -> None:
    """csi-sanity's cases that need no volume (a request with a field missing, an unknown id): the same
    request, the same code; nothing is mounted or left in the directories."""
    _, node, ctrl = stubs
    svc, _, name = method.partition(".")
    call = getattr(node if svc == "node" else ctrl, name)
    with sanity_dirs(csi.kubelet) as d:
        request = build(d)
        if code is None:
            call(request, timeout=30)
        else:
            details = expect(code, call, request, timeout=30)
            assert details, f"{code.name} without a message"
        assert not mounts_under(str(csi.kubelet)) and os.listdir(d.mount) == [] and os.listdir(d.staging) == []


def test_sanity_node_cases_on_a_static_volume(csi: Csi, stubs, vol_replica3) -> None:
    """csi-sanity's Node cases that need a staged volume, with its directories (a static volume here stands in
    for the one it creates; test_csi_backends has them with CreateVolume): NodeUnpublishVolume "should remove
    target path"; NodeGetVolumeStats "should fail when volume does not exist on the specified path" (some/path:
    NOT_FOUND); NodePublishVolume "should fail when volume with single node single writer access mode is already
    mounted at a different target path" (<mountdir>/other_target: FAILED_PRECONDITION); and its Cleanup's
    unpublish/unstage of what is no longer there."""
    _, node, _ = stubs
    vid = vol_replica3.source
    for mode in (AccessMode.SINGLE_NODE_WRITER, AccessMode.SINGLE_NODE_SINGLE_WRITER):
        cap = sanity_cap(mode)
        with sanity_dirs(csi.kubelet) as d:
            try:
                node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, volume_capability=cap,
                                                               staging_target_path=d.staging), timeout=90)
                publish = pb.NodePublishVolumeRequest(volume_id=vid, target_path=d.target, volume_capability=cap,
                                                      staging_target_path=d.staging)
                node.NodePublishVolume(publish, timeout=30)
                assert os.path.isdir(d.target) and mounts_at(d.target)
                if mode == AccessMode.SINGLE_NODE_WRITER:
                    stats = _stats(node, vid, d.target)
                    assert stats.usage and not stats.volume_condition.abnormal, stats
                    expect(Code.NOT_FOUND, node.NodeGetVolumeStats,
                           pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path="some/path"))
                    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=d.target),
                                             timeout=30)
                    assert not os.path.exists(d.target), "NodeUnpublishVolume must remove the target"
                else:
                    other = pb.NodePublishVolumeRequest(volume_id=vid, target_path=d.mount + "/other_target",
                                                        volume_capability=cap, staging_target_path=d.staging)
                    details = expect(Code.FAILED_PRECONDITION, node.NodePublishVolume, other)
                    assert d.target in details, details
                    assert not os.path.exists(d.mount + "/other_target")
            finally:
                sanity_cleanup(node, None, d, [vid])
            assert not mounts_under(str(csi.kubelet)) and os.listdir(d.mount) == []
    assert csi.agent_client().list() == []
