"""The gfuse-node DaemonSet's pod, run by ``podman kube play`` with the image built here: its FUSE mount
reaches the host.

No Kubernetes control plane or kubelet can run on these machines, so this plays kubelet's part by hand:

- the image is the repository's Dockerfile built offline by ``scripts/build-image.sh`` (debootstrap
  base, host-built wheelhouse, ``podman build --network none``), tagged ``localhost/gfuse:test``;
- the Pod is the DaemonSet template converted by ``daemonset/podman/kube_to_pod.py`` (registry.k8s.io
  sidecars dropped: unreachable, and nothing to register with; ``--no-systemd``: PID 1 here is not
  systemd), with the kubelet dir moved to a stand-in directory bind-mounted on itself and made rshared
  (``/`` is a private mount here) and the FlexVolume plugin dir moved to a test directory;
- the node-level hostPaths ``/run/gfuse``, ``/var/lib/gfuse`` and ``/var/log/gfuse`` are moved to test
  directories too, so this test never touches (or is disturbed by) the host's real ones; the FlexVolume
  shim is told where the agent's pid file is on the host (``GFUSE_AGENT_PIDFILE``, as the installer allows);
- kubelet's call of the driver is :func:`testkit.kubelet.call_driver`: the shim the pod's init
  container installed, executed on the host with kubelet's argv and JSON, which ``nsenter``s the agent
  container and runs ``gfuse-flexvolume`` there; the agent in the pod mounts the volume at a kubelet-shaped
  path, and the mount must appear on the host (Bidirectional propagation) and in a workload container
  started earlier with the kubelet dir ``rslave``.

Skips (with the reason) when not root, podman is missing or cannot run containers, or the image is
missing and cannot be built cheaply: the image is built (or rebuilt when the sources changed, label
``org.example.gfuse.source-hash``) automatically when the debootstrap base image exists (~1 min);
making the base too (debootstrap from a Debian mirror, ~1.5 min more) only with ``GFUSE_PODMAN_BUILD=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from flexvolume.agentclient import AgentClient, AgentError
from gfuse.mounttable import mounts_at
from testkit.kubelet import (
    PLUGIN_DIR_NAME,
    DriverResult,
    KubeletDir,
    PodInfo,
    call_driver,
    cleanup_mounts_under,
    kubelet_mount_options,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-image.sh"
KUBE_TO_POD = ROOT / "daemonset" / "podman" / "kube_to_pod.py"
IMAGE = os.environ.get("GFUSE_PODMAN_IMAGE", "localhost/gfuse:test")
BASE_IMAGE = "localhost/gfuse-base:bookworm"
IMAGE_WORKDIR = "/var/tmp/gfuse-image"
HASH_LABEL = "org.example.gfuse.source-hash"
# what the test machines need (TESTBED: crun fails on hybrid cgroups; default ulimits are refused)
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""

INIT_OK = {"status": "Success", "capabilities": {"attach": False, "selinuxRelabel": False, "fsGroup": False,
                                                 "supportsMetrics": True, "requiresFSResize": False}}

pytestmark = pytest.mark.timeout(900)


def _build_wanted() -> bool:
    return os.environ.get("GFUSE_PODMAN_BUILD", "") not in ("", "0", "false", "no")


def _podman_env() -> dict[str, str]:
    env = dict(os.environ)
    if not env.get("CONTAINERS_CONF"):
        conf = Path(IMAGE_WORKDIR) / "containers.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
            tmp = conf.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(CONTAINERS_CONF)
            tmp.replace(conf)
        env["CONTAINERS_CONF"] = str(conf)
    return env


def podman(*args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=_podman_env(),
                       check=False, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()}")
    return p


def call_in_container(container: str, *argv: str, timeout: float = 120.0) -> DriverResult:
    """``argv`` run in ``container`` (podman exec), stdout and stderr apart, as a :class:`DriverResult`."""
    t0 = time.monotonic()
    p = podman("exec", container, *argv, timeout=timeout, check=False)
    out = None
    with contextlib.suppress(ValueError):
        parsed = json.loads(p.stdout)
        out = parsed if isinstance(parsed, dict) else None
    return DriverResult(list(argv), p.returncode, p.stdout, p.stderr, time.monotonic() - t0, out)


def _image_hash(image: str) -> str | None:
    p = podman("image", "inspect", "--format", "{{index .Labels \"" + HASH_LABEL + "\"}}", image, check=False)
    return p.stdout.strip() if p.returncode == 0 else None


@pytest.fixture(scope="module")
def gfuse_image() -> str:
    """The gfuse image, built from this checkout; skips with the reason when that is not possible."""
    if os.geteuid() != 0:
        pytest.skip("podman kube play test: needs root (rootful podman, mounts)")
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (apt-get install --no-install-recommends podman runc conmon catatonit)")
    p = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    if p.returncode != 0:
        pytest.skip(f"podman cannot run here: {(p.stderr or p.stdout).strip()[:300]}")
    want = subprocess.run([str(BUILD_SCRIPT), "--print-source-hash"], capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()
    have = _image_hash(IMAGE)
    if have == want:
        return IMAGE
    if "GFUSE_PODMAN_IMAGE" in os.environ:
        if have is not None:
            return IMAGE  # an image the caller chose: use it as it is
        pytest.skip(f"GFUSE_PODMAN_IMAGE={IMAGE} does not exist")
    base = podman("image", "exists", BASE_IMAGE, check=False).returncode == 0
    if not base and not _build_wanted():
        state = "missing" if have is None else "older than the sources"
        pytest.skip(f"image {IMAGE} is {state} and building it needs a debootstrap base image ({BASE_IMAGE}, "
                    f"~2.5 min with a Debian mirror): set GFUSE_PODMAN_BUILD=1 to build it "
                    f"(or run scripts/build-image.sh once)")
    if not base and not shutil.which("debootstrap"):
        pytest.skip("debootstrap is not installed: cannot build the base image (apt-get install debootstrap)")
    t0 = time.monotonic()
    b = subprocess.run([str(BUILD_SCRIPT), "-t", IMAGE, "--base", BASE_IMAGE, "--workdir", IMAGE_WORKDIR],
                       capture_output=True, text=True, timeout=1200, env=_podman_env(), check=False)
    if b.returncode != 0:
        pytest.fail(f"scripts/build-image.sh failed ({b.returncode}):\n{b.stderr[-3000:]}", pytrace=False)
    # (no equality check with `want`: a checkout being edited may have changed since)
    print(f"\nbuilt {IMAGE} in {time.monotonic() - t0:.0f}s")
    return IMAGE


def _pod_manifest(image: str, name: str, work: Path, kubelet: Path, plugin_dir: Path) -> dict:
    """kube_to_pod.py's Pod for this node, with the node-level hostPaths moved into ``work``."""
    out = subprocess.run(
        ["python3", str(KUBE_TO_POD), "--kubelet-dir", str(kubelet), "--flexvolume-dir", str(plugin_dir),
         "--image", image, "--node-name", os.uname().nodename, "--no-systemd"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    pod = yaml.safe_load(out)
    assert pod["kind"] == "Pod"
    pod["metadata"]["name"] = name
    spec = pod["spec"]
    # the converter's promises: no registry sidecars, the stand-in kubelet dir everywhere, Bidirectional kept
    names = [c["name"] for c in spec["containers"]]
    assert names == ["agent", "csi-node"], names
    assert "/var/lib/kubelet" not in out and "systemd-run" not in out
    for c in spec["containers"]:
        (kmount,) = [m for m in c["volumeMounts"] if m["name"] == "kubelet-dir"]
        assert kmount == {"name": "kubelet-dir", "mountPath": str(kubelet), "mountPropagation": "Bidirectional"}
    # podman 4.3 (Debian 12) applies the pod's restartPolicy to init containers: with "Always" it restarts
    # install-flexvolume after it exited 0 and then fails `kube play` ("failed to remove once init
    # container ... as it is running"). OnFailure keeps the init container done and still restarts a
    # failing agent or csi-node.
    spec["restartPolicy"] = "OnFailure"
    # node-level state of this test in its own directories, not the host's /run/gfuse etc.
    moved = {"run-gfuse": work / "run-gfuse", "state-dir": work / "state", "log-dir": work / "log"}
    for v in spec["volumes"]:
        if v["name"] in moved:
            v["hostPath"]["path"] = str(moved[v["name"]])
    # the shim runs on the host: it must find the agent's pid file where the host sees it
    (init,) = spec["initContainers"]
    for e in init["env"]:
        if e["name"] == "GFUSE_AGENT_PIDFILE":
            e["value"] = str(moved["run-gfuse"] / "agent.pid")
    return pod


def _diagnostics(pod_name: str) -> str:
    parts = []
    for args in (["pod", "ps", "--filter", f"name={pod_name}"], ["ps", "-a", "--pod", "--filter", f"pod={pod_name}"]):
        p = podman(*args, check=False)
        parts.append(p.stdout + p.stderr)
    for c in ("install-flexvolume", "agent", "csi-node"):
        p = podman("logs", "--tail", "30", f"{pod_name}-{c}", check=False)
        parts.append(f"--- {c} logs:\n{p.stdout}{p.stderr}")
    return "\n".join(parts)


@pytest.fixture
def node_pod(gfuse_image: str) -> Iterator[dict]:
    """The gfuse-node pod running under podman kube play; everything undone at the end, even on failure."""
    work = Path(f"/var/tmp/gfp-{secrets.token_hex(4)}")  # short: unix socket paths live under it
    name = f"gfuse-node-{work.name[4:]}"
    kubelet_dir = KubeletDir(work / "kubelet")
    workload = f"{name}-workload"
    manifest = work / "gfuse-node-pod.yaml"
    played = False
    try:
        kubelet_dir.__enter__()
        assert kubelet_dir.propagation_shared
        plugin_dir = work / "flexvolume"
        pod = _pod_manifest(gfuse_image, name, work, kubelet_dir.root, plugin_dir)
        manifest.write_text(yaml.safe_dump(pod, sort_keys=False))
        t0 = time.monotonic()
        played = True
        p = podman("kube", "play", str(manifest), timeout=180, check=False)
        if p.returncode != 0:
            raise AssertionError(f"podman kube play failed ({p.returncode}): {p.stderr or p.stdout}\n"
                                 f"{_diagnostics(name)}")
        socket = work / "run-gfuse" / "agent.sock"
        driver = plugin_dir / PLUGIN_DIR_NAME / "gfuse"

        def agent_answers() -> bool:
            try:
                AgentClient(str(socket), timeout=3).ping()
                return True
            except AgentError:
                return False

        try:
            wait_for(agent_answers, 60, "the agent in the pod to answer on its socket", interval=0.5)
            wait_for(lambda: os.access(driver, os.X_OK), 10, "the FlexVolume shim installed by the init container")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{_diagnostics(name)}") from None
        started_s = time.monotonic() - t0
        yield {"name": name, "work": work, "kubelet": kubelet_dir, "driver": driver, "socket": socket,
               "manifest": manifest, "workload": workload, "started_s": started_s}
    finally:
        podman("rm", "-f", "-t", "0", workload, check=False, timeout=60)
        if played:
            # kube down stops the agent's container; the mount servers it started (no systemd here) die with
            # it, so mounts still present are detached after it (cleanup_mounts_under).
            podman("kube", "down", str(manifest), check=False, timeout=120)
            podman("pod", "rm", "-f", "-t", "0", name, check=False, timeout=60)
        cleanup_mounts_under(kubelet_dir.root)
        kubelet_dir.close()
        for _ in range(3):
            if not any(m for m in mounts_at(str(work))):
                break
            subprocess.run(["umount", "-l", str(work)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


def test_daemonset_pod_mounts_reach_the_host(node_pod: dict, make_volume, native_mount) -> None:
    t_all = time.monotonic()
    name, kubelet, driver = node_pod["name"], node_pod["kubelet"], node_pod["driver"]
    # the pod really is the DaemonSet's: its agent and csi-node containers run (the init container finished)
    ps = json.loads(podman("ps", "-a", "--pod", "--filter", f"pod={name}", "--format", "json").stdout)
    state = {c["Names"][0]: c["State"] for c in ps}
    assert state.get(f"{name}-agent") == "running" and state.get(f"{name}-csi-node") == "running", state
    assert state.get(f"{name}-install-flexvolume") in ("exited", None), state  # podman removes init containers
    # the shim the init container installed is the real one (not tests' install_driver), and answers init
    assert "nsenter" in driver.read_text()
    r = call_driver(driver, "init")
    assert r.returncode == 0 and r.output == INIT_OK, r
    # the agent runs in the pod, not on the host; hostNetwork is honoured (the bricks are on loopback)
    agent_pid = int(podman("inspect", "--format", "{{.State.Pid}}", f"{name}-agent").stdout)
    assert "gfuse-agent" in Path(f"/proc/{agent_pid}/cmdline").read_bytes().decode()
    assert os.readlink(f"/proc/{agent_pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert os.readlink(f"/proc/{agent_pid}/ns/net") == os.readlink("/proc/self/ns/net")
    # kubelet runs the driver on the host: the shim, which nsenters the agent's pid from its pid file. That
    # pid is a host pid only with hostPID, which podman 4.3's kube play ignores (the container gets its own
    # pid namespace and the agent writes 1); then the shim finds no live agent and says so, and the driver
    # is run where the shim would run it, in the agent container (podman exec), with kubelet's argv.
    host_pid = os.readlink(f"/proc/{agent_pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    pidfile = int((node_pod["work"] / "run-gfuse" / "agent.pid").read_text())
    if host_pid:
        assert pidfile == agent_pid

        def driver_call(*args: str) -> DriverResult:
            return call_driver(driver, *args)
    else:
        assert pidfile == 1, pidfile
        r = call_driver(driver, "mount", str(kubelet.root / "pods" / "x" / "volumes" / PLUGIN_DIR_NAME / "v"), "{}")
        assert r.returncode == 1 and r.status == "Failure" and "agent is not running" in r.message, r
        # unmount needs no agent: the shim does it (nothing is mounted there: Success)
        r = call_driver(driver, "unmount", str(kubelet.root / "pods" / "x" / "volumes" / PLUGIN_DIR_NAME / "v"))
        assert r.returncode == 0 and r.status == "Success" and "without the gfuse agent" in r.message, r

        def driver_call(*args: str) -> DriverResult:
            return call_in_container(f"{name}-agent", "/usr/local/bin/gfuse-flexvolume", *args)
    print(f"\nhostPID honoured by podman kube play: {host_pid}")
    r = driver_call("init")
    assert r.returncode == 0 and r.output == INIT_OK, r

    vol = make_volume("replica3")
    # a workload container started before the mount, with the kubelet dir rslave: it sees the mount only
    # through propagation (kubelet gives pods their volume dirs the same way)
    podman("run", "-d", "--name", node_pod["workload"], "--network", "none", "--entrypoint", "sleep",
           "-v", f"{kubelet.root}:{kubelet.root}:rslave", IMAGE, "600", timeout=60)

    pod_info = PodInfo(name="web-0", namespace="shop")
    vdir = kubelet.pod_volume_dir(pod_info.uid, "data")
    t0 = time.monotonic()
    r = driver_call("mount", str(vdir), json.dumps(kubelet_mount_options(vol.source, pod_info)))
    mount_s = time.monotonic() - t0
    assert r.returncode == 0 and r.output == {"status": "Success",
                                              "message": f"mounted {vol.source} on {vdir}"}, r
    assert r.stderr == "", r
    # from the HOST: the FUSE mount made inside the agent container is here (Bidirectional -> rshared)
    (m,) = wait_for(lambda: mounts_at(str(vdir)), 10, "the pod's mount to reach the host")
    assert m.fstype == "fuse.gfuse" and m.source == vol.source, m
    # the serving process is the pod's (its mount namespace), seen through hostPID
    listed = AgentClient(str(node_pod["socket"]), timeout=10).list()
    assert [x["target"] for x in listed] == [str(vdir)], listed

    fname = f"from-the-host-{secrets.token_hex(3)}.txt"
    (vdir / fname).write_text("written on the host through the pod's mount\n")
    assert (vdir / fname).read_text() == "written on the host through the pod's mount\n"
    native = native_mount(vol)
    assert (native / fname).read_text() == "written on the host through the pod's mount\n"
    (native / f"{fname}.native").write_text("written by the native client\n")
    assert (vdir / f"{fname}.native").read_text() == "written by the native client\n"
    # the workload container (started earlier, rslave) sees and writes the same data
    p = podman("exec", node_pod["workload"], "sh", "-c",
               f"cat {vdir}/{fname}.native && echo written-by-the-workload > {vdir}/{fname}.workload", check=False)
    assert p.returncode == 0 and p.stdout == "written by the native client\n", p
    assert (native / f"{fname}.workload").read_text() == "written-by-the-workload\n"

    # kubelet's unmount through the same shim: gone from the agent container and the host
    r = driver_call("unmount", str(vdir))
    assert r.returncode == 0 and r.output == {"status": "Success", "message": f"unmounted {vdir}"}, r
    wait_for(lambda: not mounts_at(str(vdir)), 10, "the unmount to reach the host")
    assert AgentClient(str(node_pod["socket"]), timeout=10).list() == []

    # podman kube down: the pod's containers go
    t0 = time.monotonic()
    podman("kube", "down", str(node_pod["manifest"]), timeout=120)
    down_s = time.monotonic() - t0
    assert podman("pod", "exists", name, check=False).returncode != 0
    print(f"\npod up {node_pod['started_s']:.1f}s, driver mount {mount_s:.1f}s, kube down {down_s:.1f}s, "
          f"test body {time.monotonic() - t_all:.1f}s")
    with contextlib.suppress(OSError):
        os.rmdir(vdir)
