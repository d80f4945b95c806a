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

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from flexvolume.driver import CAPABILITIES, parse_mount_options
from gfuse.mounttable import mounts_at
from testkit.kubelet import (
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
                                                     "supportsMetrics": True}}


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
    target = tmp_path / "kubelet" / "pods" / POD.uid / "volumes" / "gfuse.example.org~gfuse" / "data"
    for argv in (["mount", str(target), json.dumps(kubelet_mount_options("h:/v", POD))], ["unmount", str(target)]):
        r = call_driver(lone_driver, *argv)
        out = _exactly_one_json_object(r)
        assert out["status"] == "Failure" and r.returncode == 1 and r.seconds < 10
        assert out["message"] == (f"gfuse agent at {tmp_path / 'no-agent.sock'} is not running (No such file or "
                                  f"directory); start the gfuse agent on this node (the gfuse DaemonSet pod) or "
                                  f"check the socket path")


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
        assert all(not os.path.exists(f"/proc/{p}") or "Z" in Path(f"/proc/{p}/stat").read_text() for p in pids)
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
