"""The FlexVolume driver, executed exactly as kubelet executes it.

kubelet (pkg/volume/flexvolume) runs ``<plugin-dir>/<vendor>~<driver>/<driver> <command> <args…>``
with a JSON object of strings as the last argument of ``mount``, reads stdout and stderr together
and unmarshals them as one JSON object. No kubelet can run here, so testkit.kubelet stands in:
the driver is installed at ``<plugin-dir>/gfuse.example.org~gfuse/gfuse`` and executed from ``/`` with a bare
environment; the kubelet directory is a bind mount made rshared; a "pod" is a process in a mount
namespace with slave propagation, started before the volume is mounted. The volumes and the gfuse
mounts are real.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexvolume.driver import CAPABILITIES, parse_mount_options
from gfuse.mounttable import mounts_at
from testkit.kubelet import (
    PLUGIN_DIR_NAME,
    AgentProcess,
    Node,
    PodInfo,
    call_driver,
    gfuse_serving_pids,
    install_driver,
    kubelet_mount_options,
    wait_for,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

INIT_OUTPUT = {"status": "Success", "capabilities": {"attach": False, "selinuxRelabel": False, "fsGroup": False,
                                                     "supportsMetrics": True, "requiresFSResize": False}}
REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / "daemonset" / "image"

#: kubelet's defaults for the capabilities an ``init`` answer leaves out (``defaultCapabilities`` in
#: pkg/volume/flexvolume/driver-call.go): a driver that does not say false gets true
KUBELET_DEFAULT_CAPABILITIES = {"attach": True, "selinuxRelabel": True, "supportsMetrics": False, "fsGroup": True,
                                "requiresFSResize": True}


def kubelet_reads_init(stdout: str) -> dict[str, bool]:
    """The capabilities kubelet keeps from an ``init`` answer, as ``handleCmdResponse`` (driver-call.go) gets them:
    the defaults above, overwritten by the keys of the JSON answer (Go's json.Unmarshal matches the ``json:`` tags
    of DriverCapabilities case-insensitively, and ignores unknown keys); then ``NewFlexVolumePlugin`` (plugin.go)
    keeps them and ``RequiresFSResize()`` returns ``requiresFSResize``."""
    answer = json.loads(stdout)
    assert answer["status"] == "Success", answer
    caps = dict(KUBELET_DEFAULT_CAPABILITIES)
    for key, value in (answer.get("capabilities") or {}).items():
        for known in caps:
            if key.lower() == known.lower():
                assert isinstance(value, bool), f"{key}: {value!r} is not a JSON boolean (kubelet fails the plugin)"
                caps[known] = value
    return caps


@pytest.fixture
def lone_driver(tmp_path: Path) -> Path:
    """The driver installed with no agent behind its socket."""
    return install_driver(tmp_path / "volume-plugins", tmp_path / "no-agent.sock")


def _exactly_one_json_object(r) -> dict:
    assert r.stderr == "", f"the driver wrote to stderr: {r}"
    assert r.output is not None, f"stdout is not one JSON object: {r}"
    assert r.stdout.strip() == json.dumps(r.output), r  # nothing else on stdout
    return r.output


# ------------------------------------------------------------------------------------------------
# the contract without a volume


def test_init(lone_driver: Path) -> None:
    r = call_driver(lone_driver, "init")
    assert _exactly_one_json_object(r) == INIT_OUTPUT and r.returncode == 0
    assert INIT_OUTPUT["capabilities"] == CAPABILITIES
    print(f"\ninit: {r.seconds * 1000:.0f} ms")


def _install_shim(plugin_dir: Path, pidfile: Path) -> Path:
    """The host shim as the DaemonSet's init container installs it (daemonset/image/install-flexvolume.sh)."""
    env = {"PATH": os.environ["PATH"], "FLEXVOLUME_DIR": str(plugin_dir), "GFUSE_AGENT_PIDFILE": str(pidfile),
           "GFUSE_SHIM_TEMPLATE": str(IMAGE_DIR / "flexvolume-shim.sh")}
    plugin_dir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["sh", str(IMAGE_DIR / "install-flexvolume.sh")], env=env, capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode == 0 and "installed" in r.stdout, r
    return plugin_dir / PLUGIN_DIR_NAME / "gfuse"


def test_init_as_kubelet_reads_it(lone_driver: Path, tmp_path: Path) -> None:
    """kubelet's view of ``init`` (kubelet_reads_init: handleCmdResponse + defaultCapabilities): no attach (else
    kubelet wraps the plugin as attachable and calls attach/mountdevice), no SELinux relabel and no fsGroup
    (no recursive relabel or chown of a whole volume), metrics from statfs, and **no filesystem resize**: with
    requiresFSResize true (kubelet's default) an expanded PV would get ``expandfs`` or kubelet's own resize of
    the mount; the size is the quota the bricks enforce. Both the driver and the host shim (which answers init
    itself while no agent runs) say so."""
    shim = _install_shim(tmp_path / "shim-plugins", tmp_path / "no-agent.pid")
    for exe in (lone_driver, shim):
        r = call_driver(exe, "init")
        assert r.returncode == 0 and r.stderr == "", r
        assert kubelet_reads_init(r.stdout) == {"attach": False, "selinuxRelabel": False, "supportsMetrics": True,
                                                "fsGroup": False, "requiresFSResize": False}, exe
        assert json.loads(r.stdout) == INIT_OUTPUT, exe


@pytest.mark.parametrize("argv", [
    ["attach", '{"volume":"h:/v"}', "node1"],
    ["detach", "pv-1", "node1"],
    ["waitforattach", "/dev/x", '{"volume":"h:/v"}'],
    ["isattached", '{"volume":"h:/v"}', "node1"],
    ["mountdevice", "/var/lib/kubelet/plugins/x", "/dev/x", '{"volume":"h:/v"}'],
    ["unmountdevice", "/var/lib/kubelet/plugins/x"],
    ["getvolumename", '{"volume":"h:/v"}'],
    ["expandvolume", '{"volume":"h:/v"}', "2Gi", "1Gi"],
    ["expandfs", '{"volume":"h:/v"}', "/var/lib/kubelet/pods/x", "2Gi", "1Gi"],
    ["provision", "{}"],
    ["no-such-command"],
])
def test_other_commands_are_not_supported(lone_driver: Path, argv: list[str]) -> None:
    r = call_driver(lone_driver, *argv)
    out = _exactly_one_json_object(r)
    assert out["status"] == "Not supported" and r.returncode == 0
    assert out["message"] == f"the gfuse driver does not implement {argv[0]!r}"


@pytest.mark.parametrize(("argv", "message"), [
    ([], "usage: gfuse-flexvolume init | mount <mount-dir> <json> | unmount <mount-dir>"),
    (["mount", "/tmp/x"], "usage: mount <mount-dir> <json-options> (got 1 argument(s))"),
    (["mount", "/tmp/x", "{}", "extra"], "usage: mount <mount-dir> <json-options> (got 3 argument(s))"),
    (["unmount"], "usage: unmount <mount-dir> (got 0 argument(s))"),
    (["unmount", "relative/dir"], "the mount directory must be an absolute path, not 'relative/dir'"),
])
def test_usage_errors(lone_driver: Path, argv: list[str], message: str) -> None:
    r = call_driver(lone_driver, *argv)
    assert _exactly_one_json_object(r) == {"status": "Failure", "message": message} and r.returncode == 1


POD = PodInfo(name="web-0", namespace="shop", uid="0f3e2d1c-aaaa-bbbb-cccc-0123456789ab")


@pytest.mark.parametrize(("options", "fragment"), [
    ("{", "the mount options are not valid JSON"),
    ("not json at all", "the mount options are not valid JSON"),
    ("[1, 2]", "the mount options must be a JSON object, not list"),
    (json.dumps(kubelet_mount_options(None, POD)),
     "option 'volume' is missing: set spec.flexVolume.options.volume of the PV to \"server:/volume[/subdir]\""),
    (json.dumps(kubelet_mount_options("just-a-name", POD)),
     "option 'volume' must be \"server:/volume[/subdir]\", not 'just-a-name'"),
    (json.dumps(kubelet_mount_options("h:/v", POD, fs_type="ext4")),
     "fsType 'ext4' is not supported by the gfuse driver"),
    (json.dumps(kubelet_mount_options("h:/v", POD, pv_options={"readOnly": "maybe"})),
     "option 'readOnly' must be \"true\" or \"false\", not 'maybe'"),
    (json.dumps({**kubelet_mount_options("h:/v", POD), "kubernetes.io/secret/password": "%%%"}),
     "secret key 'password' is not valid base64"),
    (json.dumps(kubelet_mount_options("h:/v", POD, pv_options={"backupServers": "h2:24007,h3"})),
     "option 'backupServers' must list host names separated by ':' or ','"),
    (json.dumps({**kubelet_mount_options("h:/v", POD), "kubernetes.io/readwrite": "rx"}),
     "kubernetes.io/readwrite must be \"rw\" or \"ro\", not 'rx'"),
])
def test_bad_mount_options_fail_precisely(lone_driver: Path, tmp_path: Path, options: str, fragment: str) -> None:
    target = tmp_path / "kubelet" / "pods" / POD.uid / "volumes" / "gfuse.example.org~gfuse" / "data"
    r = call_driver(lone_driver, "mount", str(target), options)
    out = _exactly_one_json_object(r)
    assert out["status"] == "Failure" and r.returncode == 1
    assert fragment in out["message"], out
    assert not target.exists()  # refused before touching anything


def test_mount_options_as_kubelet_sends_them() -> None:
    opts = kubelet_mount_options("server1:/vol/sub/dir", POD, fs_group=2000, secrets_={"user": b"admin"},
                                 pv_options={"backupServers": "server2:server3",
                                             "mountOptions": "ping-timeout=10, log-level=DEBUG,allow_other"})
    assert all(isinstance(v, str) for v in opts.values())
    assert parse_mount_options(json.dumps(opts)) == {
        "source": "server1:/vol/sub/dir",
        "options": ["allow_other", "ping-timeout=10", "log-level=DEBUG", "backup-volfile-servers=server2:server3"],
        "readonly": False,
        "context": {"pod": "web-0", "namespace": "shop", "pod_uid": POD.uid, "service_account": "default",
                    "pv": "pv-gfuse"},
    }
    assert parse_mount_options(json.dumps(kubelet_mount_options("s:/v", POD, readonly=True)))["readonly"] is True
    for value, ro in (("true", True), ("false", False), ("True", True), ("", False)):
        got = parse_mount_options(json.dumps(kubelet_mount_options("s:/v", POD, pv_options={"readOnly": value})))
        assert got["readonly"] is ro
    for value in ("s2,s3", "s2, s3", "s2 s3", "s2:s3"):
        got = parse_mount_options(json.dumps(kubelet_mount_options("s:/v", POD, pv_options={"backupServers": value})))
        assert got["options"][-1] == "backup-volfile-servers=s2:s3"
    for fs in ("", "glusterfs", "gfuse"):
        parse_mount_options(json.dumps(kubelet_mount_options("s:/v", POD, fs_type=fs)))


def test_agent_not_running(lone_driver: Path, tmp_path: Path) -> None:
    """mount fails (kubelet retries; the pod waits in ContainerCreating); unmount of what is not mounted succeeds
    (kubelet then removes the directory and the pod goes): neither needs the agent to end."""
    target = tmp_path / "kubelet" / "pods" / POD.uid / "volumes" / "gfuse.example.org~gfuse" / "data"
    why = (f"gfuse agent at {tmp_path / 'no-agent.sock'} is not running (No such file or directory); start the "
           f"gfuse agent on this node (the gfuse DaemonSet pod) or check the socket path")
    r = call_driver(lone_driver, "mount", str(target), json.dumps(kubelet_mount_options("h:/v", POD)))
    out = _exactly_one_json_object(r)
    assert out == {"status": "Failure", "message": why} and r.returncode == 1 and r.seconds < 10
    r = call_driver(lone_driver, "unmount", str(target))
    out = _exactly_one_json_object(r)
    assert out == {"status": "Success", "message": f"{target} was not mounted without the gfuse agent ({why})"}
    assert r.returncode == 0 and r.seconds < 10


def test_agent_not_answering_is_bounded(tmp_path: Path) -> None:
    """An agent that accepts connections but never answers: the driver gives up in bounded time."""
    path = str(tmp_path / "mute.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(path)
        mute.listen(16)  # never accept()ed: connect succeeds, nothing is ever answered
        driver = install_driver(tmp_path / "volume-plugins", path)
        env = {"PATH": "/usr/bin:/bin", "GFUSE_FLEXVOLUME_TIMEOUT": "5"}
        target = tmp_path / "pods" / "x" / "volumes" / "gfuse.example.org~gfuse" / "data"
        r = call_driver(driver, "mount", str(target), json.dumps(kubelet_mount_options("h:/v", POD)), env=env)
        out = _exactly_one_json_object(r)
        assert out["status"] == "Failure" and r.returncode == 1
        assert out["message"] == f"gfuse agent at {path} did not answer 'mount' within 5s (see the agent's log)"
        assert 4.5 < r.seconds < 12


# ------------------------------------------------------------------------------------------------
# real mounts through the agent


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    with Node(tmp_path_factory.mktemp("node"), health_interval=2.0) as n:
        yield n


POD_SCRIPT = r'''
exec sleep 600
'''


def test_mount_into_a_running_pod(node: Node, vol_replica3, native_mount, tmp_path: Path) -> None:
    assert node.kubelet.propagation_shared
    pod_info = PodInfo(name="web-0", namespace="shop")
    vdir = node.kubelet.pod_volume_dir(pod_info.uid, "data")
    ro_dir = node.kubelet.pod_volume_dir(pod_info.uid, "data-ro")
    pod = node.pod(POD_SCRIPT)  # running before anything is mounted: it can only see mounts by propagation
    assert os.readlink(f"/proc/{pod.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert not vdir.exists()  # kubelet leaves its creation to the driver

    opts = kubelet_mount_options(vol_replica3.source, pod_info, fs_group=2000, secrets_={"user": b"admin"},
                                 pv_options={"mountOptions": "attribute-timeout=1,entry-timeout=1"})
    r = node.mount(vdir, opts)
    out = _exactly_one_json_object(r)
    assert out == {"status": "Success", "message": f"mounted {vol_replica3.source} on {vdir}"} and r.returncode == 0
    mount_s = r.seconds
    (m,) = mounts_at(str(vdir))
    assert m.fstype == "fuse.gfuse" and m.source == vol_replica3.source and "allow_other" in m.super_options
    wait_for(lambda: str(vdir) in pod.mount_targets(), 10, "the mount to propagate into the pod")

    # the pod writes and reads; a non-root user in the pod can read (allow_other)
    name = f"{tmp_path.name}.txt"
    p = pod.exec(f"echo written-by-the-pod > {vdir}/{name} && cat {vdir}/{name} && ls {vdir}")
    assert p.returncode == 0 and p.stdout.startswith("written-by-the-pod\n") and name in p.stdout, p
    # (from inside the volume: pytest's tmp dir above it is private to root)
    p = pod.exec(f"cd {vdir} && setpriv --reuid=65534 --regid=65534 --clear-groups cat {name}")
    assert p.returncode == 0 and p.stdout == "written-by-the-pod\n", p
    # the native GlusterFS client sees the pod's write, and the pod sees the native client's
    native = native_mount(vol_replica3)
    assert (native / name).read_text() == "written-by-the-pod\n"
    (native / f"{name}.native").write_text("written-by-the-native-client\n")
    p = pod.exec(f"cat {vdir}/{name}.native")
    assert p.returncode == 0 and p.stdout == "written-by-the-native-client\n", p

    # kubelet retries: mounting again is a success and changes nothing
    pid = gfuse_serving_pids(vdir)
    r = node.mount(vdir, opts)
    assert _exactly_one_json_object(r) == {"status": "Success",
                                           "message": f"already mounted {vol_replica3.source} on {vdir}"}
    assert gfuse_serving_pids(vdir) == pid and len(mounts_at(str(vdir))) == 1
    # the same directory with another volume: a Failure that says what is there
    r = node.mount(vdir, kubelet_mount_options(f"{vol_replica3.source}/other", pod_info))
    out = _exactly_one_json_object(r)
    assert r.returncode == 1 and out == {"status": "Failure", "message": (
        f"{vdir} is already mounted by gfuse from {vol_replica3.source}, not {vol_replica3.source}/other; "
        f"unmount it first")}

    # a read-only volume of the same pod (kubelet's kubernetes.io/readwrite: ro)
    r = node.mount(ro_dir, kubelet_mount_options(vol_replica3.source, pod_info, readonly=True, pv_name="pv-ro"))
    assert _exactly_one_json_object(r)["status"] == "Success" and "read-only" in r.message
    assert mounts_at(str(ro_dir))[-1].readonly
    wait_for(lambda: str(ro_dir) in pod.mount_targets(), 10, "the read-only mount to propagate")
    p = pod.exec(f"cat {ro_dir}/{name}")
    assert p.returncode == 0 and p.stdout == "written-by-the-pod\n", p
    p = pod.exec(f"echo no > {ro_dir}/{name}.ro")
    assert p.returncode != 0 and "Read-only file system" in p.stderr, p

    st = node.agent.client().stats(str(vdir))
    assert st["bytes_total"] > 0 and st["inodes_total"] > 0
    listed = {m["target"]: m for m in node.agent.client().list()}
    assert set(listed) == {str(vdir), str(ro_dir)}
    assert listed[str(vdir)]["context"] == {"pod": "web-0", "namespace": "shop", "pod_uid": pod_info.uid,
                                            "service_account": "default", "pv": "pv-gfuse"}

    # unmount (as kubelet: after the pod's containers are gone, but the namespace may linger)
    for d in (vdir, ro_dir):
        pids = gfuse_serving_pids(d)
        r = node.unmount(d)
        assert _exactly_one_json_object(r) == {"status": "Success", "message": f"unmounted {d}"}
        assert not mounts_at(str(d)) and gfuse_serving_pids(d) == []
        # the serving process exits by itself once the kernel drops the mount: give it a moment (an exiting
        # process has no cmdline any more but may still have a /proc entry)
        wait_for(lambda pids=pids: _serving_gone(pids), 15, "the serving process to exit after the unmount")
        wait_for(lambda d=d: str(d) not in pod.mount_targets(), 10, "the unmount to propagate into the pod")
        r = node.unmount(d)
        assert _exactly_one_json_object(r) == {"status": "Success", "message": f"{d} was not mounted"}
    assert node.agent.client().list() == []
    os.rmdir(vdir)  # kubelet removes the directory after unmount; nothing is left in it
    r = node.unmount(vdir)
    assert _exactly_one_json_object(r)["status"] == "Success"
    print(f"\ndriver mount {mount_s:.1f}s")


def test_unreachable_volume(node: Node, vol_replica3) -> None:
    pod_info = PodInfo(name="web-1")
    for i, (source, fragment) in enumerate([
        (f"{vol_replica3.host}:/gfuset_no_such_volume", "does not exist"),  # more cases: tests/test_agent.py
    ]):
        vdir = node.kubelet.pod_volume_dir(pod_info.uid, f"data{i}")
        t0 = time.monotonic()
        r = node.mount(vdir, kubelet_mount_options(source, pod_info))
        out = _exactly_one_json_object(r)
        assert out["status"] == "Failure" and r.returncode == 1 and time.monotonic() - t0 < 60
        assert out["message"].startswith(f"cannot mount {source} on {vdir}: ") and fragment in out["message"], out
        assert not mounts_at(str(vdir)) and gfuse_serving_pids(vdir) == []
    assert node.agent.client().list() == []


def test_directory_mounted_by_something_else(node: Node) -> None:
    pod_info = PodInfo(name="web-2")
    vdir = node.kubelet.pod_volume_dir(pod_info.uid, "data")
    vdir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "other-fs", str(vdir)], check=True, timeout=10)
    try:
        r = node.mount(vdir, kubelet_mount_options("127.0.0.2:/v", pod_info))
        assert _exactly_one_json_object(r) == {"status": "Failure", "message": (
            f"{vdir} is already mounted (tmpfs from other-fs); unmount it first or use another directory")}
        r = node.unmount(vdir)
        assert _exactly_one_json_object(r) == {"status": "Failure", "message": (
            f"{vdir} is mounted with tmpfs from other-fs, which is not a gfuse mount; not unmounting it")}
        assert mounts_at(str(vdir))[-1].fstype == "tmpfs"
    finally:
        subprocess.run(["umount", str(vdir)], check=False, timeout=10)


# ------------------------------------------------------------------------------------------------
# unmount while the agent is down


def _serving_gone(pids: list[int]) -> bool:
    return all(not os.path.exists(f"/proc/{p}") or "Z" in Path(f"/proc/{p}/stat").read_text().split()[2]
               for p in pids)


def _assert_dead(d: Path) -> None:
    """The mount at ``d`` answers "Transport endpoint is not connected" (its server is gone for good)."""
    with pytest.raises(OSError) as e:
        os.stat(d / "x")
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED), e.value


@pytest.fixture
def repair_only(node: Node) -> Iterator[None]:
    """The module's agent restarted with --restartable no for one test, as on a kernel without
    FUSE_NOTIFY_RESEND: a SIGKILLed server leaves a dead mount (restartable mounts would be taken over by the
    holder instead; tests/k8s/test_agent_takeover.py), then the agent as it was."""
    agent = node.agent
    saved = agent.extra_args
    agent.kill(signal.SIGTERM)
    agent.extra_args = (*saved, "--restartable", "no")
    agent.start()
    try:
        yield
    finally:
        agent.kill(signal.SIGTERM)
        agent.extra_args = saved
        agent.start()


def test_unmount_while_the_agent_is_down(node: Node, repair_only: None, vol_replica3) -> None:
    """kubelet's ``TearDownAt`` (pkg/volume/flexvolume/unmounter.go) calls the driver's ``unmount`` and, after a
    Success, removes the volume directory; while unmount fails it retries and the pod stays Terminating. With
    the agent down (here stopped with SIGTERM, which leaves its mounts serving) the driver unmounts by itself:
    a live mount, one a process still uses (lazily), and a dead one (its FUSE server killed: "Transport endpoint
    is not connected"). The serving processes exit by themselves; the directories go; kubelet's retry of an
    unmount that already happened is a Success too. The agent, restarted, drops those entries and mounts
    nothing again."""
    pod_info = PodInfo(name="web-down")
    dirs = {n: node.kubelet.pod_volume_dir(pod_info.uid, n) for n in ("live", "busy", "dead")}
    for name, d in dirs.items():
        r = node.mount(d, kubelet_mount_options(vol_replica3.source, pod_info, pv_name=f"pv-{name}"))
        assert _exactly_one_json_object(r)["status"] == "Success", r
    pids = {n: gfuse_serving_pids(d) for n, d in dirs.items()}
    assert all(pids.values()), pids
    holder = subprocess.Popen(["sleep", "600"], cwd=dirs["busy"])  # keeps the busy mount in use
    for p in pids["dead"]:
        os.kill(p, signal.SIGKILL)
    wait_for(lambda: _serving_gone(pids["dead"]), 10, "the dead mount's server to die")
    _assert_dead(dirs["dead"])
    node.agent.kill(signal.SIGTERM)
    try:
        for d in dirs.values():
            r = node.unmount(d)
            out = _exactly_one_json_object(r)
            assert r.returncode == 0 and out["status"] == "Success", r
            assert out["message"].startswith(f"unmounted {d} without the gfuse agent (gfuse agent at "), out
            assert not mounts_at(str(d)) and not d.exists()
        wait_for(lambda: _serving_gone(pids["live"]), 15, "the unmounted volume's server to exit by itself")
        assert not _serving_gone(pids["busy"]), "a lazily unmounted volume serves whoever still uses it"
        holder.kill()
        holder.wait(10)
        wait_for(lambda: _serving_gone(pids["busy"]), 15, "the busy volume's server to exit once unused")
        r = node.unmount(dirs["live"])  # kubelet retrying
        assert _exactly_one_json_object(r)["status"] == "Success" and "was not mounted" in r.message, r
    finally:
        holder.kill()
        node.agent.start()
    node.agent.wait_health_passes(2)
    assert node.agent.client().list() == []
    assert not any(mounts_at(str(d)) for d in dirs.values()) and not any(d.exists() for d in dirs.values())


def test_shim_unmounts_without_an_agent(node: Node, repair_only: None, vol_replica3, tmp_path: Path) -> None:
    """The host shim (daemonset/image/flexvolume-shim.sh) as kubelet runs it when the agent's container is gone
    (no live pid in the pid file): it cannot run the Python driver, so ``unmount`` (kubelet's ``TearDownAt``)
    is done by the shim — a gfuse mount, live or dead, is unmounted and its directory removed; anything else
    mounted there is refused; a path that is not mounted is a Success."""
    shim = _install_shim(tmp_path / "plugins", tmp_path / "gone" / "agent.pid")
    pod_info = PodInfo(name="web-shim")
    live, dead, other = (node.kubelet.pod_volume_dir(pod_info.uid, n) for n in ("live", "dead", "other"))
    for d in (live, dead):
        assert _exactly_one_json_object(node.mount(d, kubelet_mount_options(vol_replica3.source, pod_info)))[
            "status"] == "Success"
    pids = {d: gfuse_serving_pids(d) for d in (live, dead)}
    for p in pids[dead]:
        os.kill(p, signal.SIGKILL)
    wait_for(lambda: _serving_gone(pids[dead]), 10, "the dead mount's server to die")
    _assert_dead(dead)
    for d in (live, dead):
        r = call_driver(shim, "unmount", str(d))
        assert r.stderr == "" and len(r.stdout.splitlines()) == 1, r  # one JSON line, nothing on stderr
        assert r.returncode == 0 and r.output == {"status": "Success", "message": (
            f"gfuse: unmounted {d} without the gfuse agent (no live gfuse-agent pid in {tmp_path}/gone/agent.pid)")}
        assert not mounts_at(str(d)) and not d.exists()
    wait_for(lambda: _serving_gone(pids[live]), 15, "the unmounted volume's server to exit by itself")
    r = call_driver(shim, "unmount", str(live))
    assert r.returncode == 0 and r.status == "Success" and f"{live} was not mounted" in r.message, r
    other.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "not-gfuse", str(other)], check=True, timeout=10)
    try:
        r = call_driver(shim, "unmount", str(other))
        assert r.returncode == 1 and r.output == {"status": "Failure", "message": (
            f"gfuse: {other} is mounted with tmpfs, which is not a gfuse mount; not unmounting it")}, r
        assert mounts_at(str(other))[-1].fstype == "tmpfs"
    finally:
        subprocess.run(["umount", str(other)], check=False, timeout=10)
    wait_for(lambda: node.agent.client().list() == [], 30, "the agent to drop the entries whose dirs are gone")


# ------------------------------------------------------------------------------------------------
# SELinux: context= reaches the kernel

SELINUX_CONTEXT = "system_u:object_r:container_file_t:s0:c123,c456"


def test_mount_options_keep_quoted_selinux_contexts() -> None:
    """kubelet writes an SELinux mount option as ``context="…"`` (quoted: MCS levels hold commas); the driver,
    and the agent after it, split mount options on the commas outside quotes only."""
    opts = kubelet_mount_options("s:/v", POD, pv_options={
        "mountOptions": f'ping-timeout=10,context="{SELINUX_CONTEXT}",log-level=DEBUG'})
    assert parse_mount_options(json.dumps(opts))["options"] == [
        "allow_other", "ping-timeout=10", f'context="{SELINUX_CONTEXT}"', "log-level=DEBUG"]


class _TracedAgent(AgentProcess):
    """The agent under ``strace -f``, recording every mount(2) it and its children (``gfuse mount``) make."""

    def command(self) -> list[str]:
        self.trace = self.workdir / "mount.strace"
        return ["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=mount", "-e", "signal=none", "-s", "2048",
                "-o", str(self.trace), *super().command()]


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_selinux_context_reaches_the_kernel_mount(vol_replica3, tmp_path: Path) -> None:
    """An SELinux ``context=`` mount option (what kubelet adds to a CSI volume's mount flags when the CSIDriver has
    ``seLinuxMount: true``; here in a PV's mountOptions) goes through every layer — driver, agent, ``gfuse mount``
    and its -o parser, libfuse — to the kernel: mount(2) gets it, commas and all. On a node without SELinux (as
    here) the kernel refuses it (EINVAL) and the Failure says the FUSE mount failed; with SELinux it mounts."""
    selinux = os.path.exists("/sys/fs/selinux/enforce")
    n = Node(tmp_path / "node", health_interval=30.0)
    # no holder (--restartable no): strace -f would wait for it to exit on its own (15 s idle) after the agent
    n.agent = _TracedAgent(tmp_path / "node" / "agent", health_interval=30.0, extra_args=("--restartable", "no"))
    with n:
        vdir = n.kubelet.pod_volume_dir(POD.uid, "labelled")
        r = n.mount(vdir, kubelet_mount_options(vol_replica3.source, POD, pv_options={
            "mountOptions": f'context="{SELINUX_CONTEXT}"'}))
        out = _exactly_one_json_object(r)
        calls = [line for line in n.agent.trace.read_text().splitlines()
                 if " mount(" in line and '"fuse.gfuse"' in line and f'"{vdir}"' in line]
        assert len(calls) == 1, n.agent.trace.read_text()
        data = calls[0].split('"fuse.gfuse", ', 1)[1]
        assert f'context=\\"{SELINUX_CONTEXT}\\"' in data and "allow_other" in data, calls[0]
        if selinux:
            assert out["status"] == "Success", out
        else:
            assert calls[0].endswith("= -1 EINVAL (Invalid argument)"), calls[0]
            assert out["status"] == "Failure" and "FUSE mount on" in out["message"], out
            assert "unknown mount option" not in out["message"]
