"""Converged mode run for real: three ``gfuse-glusterd`` pods (the DaemonSet's template, image target
``glusterd`` of the Dockerfile) under ``podman kube play``, their ``setup`` containers peering them and
creating the pool volume, the FlexVolume provisioner's storage path into them, and gfuse mounts of the pool.

No Kubernetes can run here (see TESTBED), so this plays the cluster's part by hand:

- **nodes and their network.** Each storage "node" is a network namespace we create (``ip netns``), with a
  veth to a bridge in a namespace of its own; a fourth namespace on the bridge is the client "node". The
  DaemonSet's ``hostNetwork: true`` becomes ``podman kube play --network ns:/run/netns/<node>``: glusterd
  binds ``0.0.0.0:24007`` of its node, unmodified, and the bricks their ports. Addresses are 10.251.0.N,
  which exist only inside these namespaces; nothing touches the host's interfaces or its glusterd.
- **the headless Service** ``gfuse-glusterd.gfuse-system.svc`` is an ``/etc/hosts`` (a hostPath file: podman
  ignores ``hostAliases`` on host-network pods) naming the three node addresses, and the downward API's
  ``status.podIP`` is the node's address (podman does not know it for a network namespace it did not make).
  ``INTERVAL`` of the setup loop is 2 s instead of 30.
- **hostPaths** (``/var/lib/glusterd``, logs, bricks) are per-node directories under the test's work dir.
- **the provisioner's access to glusterd** is the Deployment's own: ``gfuse-node-gluster``
  (daemonset/image/node-gluster.sh, nsenter into the node's glusterd, run here from the host as the
  hostPID provisioner pod runs it) with ``GFUSE_GLUSTERD_PID`` = the pod's glusterd (the host has its own
  glusterd too, so the script's lookup by name would be ambiguous). The real
  :class:`~flexvolume.storage.backends.SubdirBackend` makes a quota'd PV directory through it, whose gfuse
  mount from the client node is written and checked against the quota. (With nsenter --mount alone the CLI
  died with SIGSEGV here: glusterd's pid namespace is needed too, see daemonset/converged/README.md.)

The image is built from this checkout by ``daemonset/podman/build-glusterd-image.sh`` (~20 s) on the
debootstrap base of ``scripts/build-image.sh``; without that base the test skips unless
``GFUSE_PODMAN_BUILD=1`` (then the base is made first, as tests/test_podman_daemonset.py does).
Everything (pods, containers, mounts, processes in the namespaces, the namespaces, directories) is removed
at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gfuse.mounttable import mounts_under
from testkit.kubelet import wait_for

from test_podman_daemonset import BASE_IMAGE, BUILD_SCRIPT, IMAGE_WORKDIR, _build_wanted, _podman_env, podman

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "daemonset"
GLUSTERD_BUILD = DAEMONSET / "podman" / "build-glusterd-image.sh"
NODE_GLUSTER = DAEMONSET / "image" / "node-gluster.sh"
IMAGE = os.environ.get("GFUSE_PODMAN_GLUSTERD_IMAGE", "localhost/gfuse-glusterd:test")
HASH_LABEL = "org.example.gfuse.glusterd-hash"
SUBNET = "10.251.0"
NODES = 3
SERVICE = "gfuse-glusterd.gfuse-system.svc"
POOL = "gfuse-pool"

pytestmark = pytest.mark.timeout(420)


def _run(*cmd: str, timeout: float = 60.0, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False,
                       stdin=subprocess.DEVNULL, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-2000:]}")
    return p


@pytest.fixture(scope="module")
def glusterd_image() -> str:
    if os.geteuid() != 0:
        pytest.skip("converged podman test: needs root (rootful podman, network namespaces, mounts)")
    for tool in ("podman", "ip", "nsenter"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    p = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    if p.returncode != 0:
        pytest.skip(f"podman cannot run here: {(p.stderr or p.stdout).strip()[:300]}")
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        if not _build_wanted():
            pytest.skip(f"the debootstrap base image {BASE_IMAGE} is missing: set GFUSE_PODMAN_BUILD=1 "
                        f"(or run scripts/build-image.sh once)")
        b = subprocess.run([str(BUILD_SCRIPT), "--base", BASE_IMAGE, "--workdir", IMAGE_WORKDIR],
                           capture_output=True, text=True, timeout=1200, check=False)
        if b.returncode != 0:
            pytest.fail(f"scripts/build-image.sh failed:\n{b.stderr[-3000:]}", pytrace=False)
    want = _run(str(GLUSTERD_BUILD), "--base", BASE_IMAGE, "--print-hash").stdout.strip()
    have = podman("image", "inspect", "--format", "{{index .Labels \"" + HASH_LABEL + "\"}}", IMAGE, check=False)
    if have.returncode == 0 and have.stdout.strip() == want:
        return IMAGE
    b = subprocess.run([str(GLUSTERD_BUILD), "-t", IMAGE, "--base", BASE_IMAGE, "--workdir", IMAGE_WORKDIR],
                       capture_output=True, text=True, timeout=600, check=False,
                       env={**os.environ, "CONTAINERS_CONF": podman_conf()})
    if b.returncode != 0:
        pytest.fail(f"build-glusterd-image.sh failed ({b.returncode}):\n{b.stderr[-3000:]}", pytrace=False)
    return IMAGE


def podman_conf() -> str:
    return _podman_env()["CONTAINERS_CONF"]


def _manifests() -> tuple[dict, dict]:
    ds = yaml.safe_load((DAEMONSET / "converged" / "glusterd-daemonset.yaml").read_text())
    cm = yaml.safe_load((DAEMONSET / "converged" / "gluster-setup.yaml").read_text())
    return ds, cm


def node_pod(ds: dict, i: int, name: str, work: Path, image: str, configmap: str) -> dict:
    """The gfuse-glusterd DaemonSet's template as node ``i``'s Pod (see the module docstring for each change)."""
    spec = yaml.safe_load(yaml.safe_dump(ds["spec"]["template"]["spec"]))
    assert spec["hostNetwork"] is True  # the node's network: podman kube play runs in the node's namespace
    for k in ("serviceAccountName", "automountServiceAccountToken", "nodeSelector", "tolerations",
              "priorityClassName", "dnsPolicy"):
        spec.pop(k, None)
    node_dir = work / f"n{i}"
    # the Service's DNS name: podman ignores hostAliases on a host-network pod, so an /etc/hosts of our own
    node_dir.mkdir(parents=True, exist_ok=True)
    # each address's first name is its node's (what a reverse lookup gives, as for real nodes), then the Service
    (node_dir / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
        f"{SUBNET}.{n} gfc-node{n}\n" for n in range(1, NODES + 1)) + "".join(
        f"{SUBNET}.{n} {SERVICE}\n" for n in range(1, NODES + 1)))
    spec["volumes"].append({"name": "etc-hosts", "hostPath": {"path": str(node_dir / "hosts"), "type": "File"}})
    for v in spec["volumes"]:
        if v["name"] == "etc-hosts":
            continue
        if "hostPath" in v:
            v["hostPath"]["path"] = str(node_dir / v["name"])
        elif "emptyDir" in v:
            # podman 4.3 makes an emptyDir a *named* volume (its name): every pod would share one /run, and
            # so one glusterd socket. A per-pod directory is what Kubernetes gives.
            del v["emptyDir"]
            v["hostPath"] = {"path": str(node_dir / v["name"]), "type": "DirectoryOrCreate"}
        elif "configMap" in v:
            # podman turns the ConfigMap into a volume of its name: a per-test name, removed at the end
            v["configMap"]["name"] = configmap
    for c in spec["containers"]:
        c["image"] = image
        # podman 4.3 refuses declared ports on a host-network pod ("PortMappings can only be used with Bridge
        # or slirp4netns"); under hostNetwork Kubernetes treats them as documentation
        c.pop("ports", None)
        for e in c.get("env", []):
            if e["name"] == "POD_IP":
                e.pop("valueFrom")
                e["value"] = f"{SUBNET}.{i}"
            if e["name"] == "INTERVAL":
                e["value"] = "2"
        c.setdefault("volumeMounts", []).append({"name": "etc-hosts", "mountPath": "/etc/hosts", "readOnly": True})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": ds["spec"]["template"]["metadata"]["labels"]},
            "spec": spec}


class Net:
    """A bridge namespace and one namespace per node, veth-linked; all removed by :meth:`close`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.made: list[str] = []

    def ns(self, what: str) -> str:
        return f"{self.prefix}-{what}"

    def add(self, what: str) -> str:
        name = self.ns(what)
        _run("ip", "netns", "add", name)
        self.made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def up(self, nodes: dict[str, int]) -> None:
        sw = self.add("sw")
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        for what, n in nodes.items():
            name = self.add(what)
            _run("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{n}", "netns", sw)
            _run("ip", "-n", sw, "link", "set", f"p{n}", "master", "br0", "up")
            _run("ip", "-n", name, "addr", "add", f"{SUBNET}.{n}/24", "dev", "eth0")
            _run("ip", "-n", name, "link", "set", "eth0", "up")

    def exec_prefix(self, what: str) -> list[str]:
        """Run in the node's network namespace, the host's mount namespace (FUSE mounts visible here)."""
        return ["nsenter", f"--net=/run/netns/{self.ns(what)}"]

    def kill_all(self) -> None:
        for name in self.made:
            pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)

    def close(self) -> None:
        self.kill_all()
        for name in reversed(self.made):
            _run("ip", "netns", "del", name, check=False)
        self.made = []


def _diagnostics(names: list[str]) -> str:
    out = []
    for n in names:
        for c in ("setup", "glusterd"):
            p = podman("logs", "--tail", "25", f"{n}-{c}", check=False)
            out.append(f"--- {n}-{c}:\n{p.stdout}{p.stderr}")
    return "\n".join(out)


@pytest.fixture
def converged(glusterd_image: str) -> Iterator[dict]:
    tag = secrets.token_hex(3)
    work = Path(f"/var/tmp/gfc-{tag}")
    net = Net(f"gfc{tag}")
    names = [f"gfc-{tag}-n{i}" for i in range(1, NODES + 1)]
    configmap = f"gfc-{tag}-setup"
    manifests: list[Path] = []
    try:
        work.mkdir(parents=True)
        net.up({**{f"n{i}": i for i in range(1, NODES + 1)}, "client": 100})
        ds, cm = _manifests()
        cm["metadata"]["name"] = configmap
        t0 = time.monotonic()
        for i, name in enumerate(names, start=1):
            m = work / f"{name}.yaml"
            pod = node_pod(ds, i, name, work, glusterd_image, configmap)
            m.write_text(yaml.safe_dump_all([cm, pod], sort_keys=False))
            manifests.append(m)
            # podman 4.3 pods cannot join a given network namespace (--network ns:PATH); with hostNetwork
            # they take podman's own, so podman runs in the node's namespace (and the host's mount namespace)
            p = _run(*net.exec_prefix(f"n{i}"), "podman", "kube", "play", str(m), timeout=120, check=False,
                     env=_podman_env())
            if p.returncode != 0:
                raise AssertionError(f"podman kube play {name} failed: {p.stderr or p.stdout}\n{_diagnostics(names)}")
        yield {"work": work, "net": net, "names": names, "t0": t0}
    finally:
        # mounts first (their servers run in the client namespace), then pods, then whatever is left in the
        # namespaces, then the namespaces and the directories
        for m in reversed(mounts_under(str(work))):
            _run("umount", "-l", m.target, check=False)
        for m in manifests:
            podman("kube", "down", str(m), check=False, timeout=120)
        for name in names:
            podman("pod", "rm", "-f", "-t", "0", name, check=False, timeout=60)
        podman("volume", "rm", "-f", configmap, check=False, timeout=60)
        net.close()
        for m in reversed(mounts_under(str(work))):
            _run("umount", "-l", m.target, check=False)
        shutil.rmtree(work, ignore_errors=True)


def _glusterd_pid(name: str) -> int:
    pid = int(podman("inspect", "--format", "{{.State.Pid}}", f"{name}-glusterd").stdout)
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "glusterd"
    return pid


def node_gluster(pid: int, timeout: float = 60):
    """The provisioner Deployment's --gluster-command (gfuse-node-gluster) into the glusterd ``pid``."""
    from flexvolume.storage.glusterd import Glusterd

    return Glusterd("/var/run/glusterd.socket", command=["env", f"GFUSE_GLUSTERD_PID={pid}", str(NODE_GLUSTER)],
                    timeout=timeout)


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, Z, ...), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _killed_wrapper_kills_the_cli(glusterd_pid: int) -> None:
    # the CLI without --mode=script is its interactive shell: it waits on stdin (an open pipe) forever
    p = subprocess.Popen([str(NODE_GLUSTER)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "GFUSE_GLUSTERD_PID": str(glusterd_pid)})
    cli: list[int] = []
    try:
        def the_cli():
            kids = [int(c) for t in os.listdir(f"/proc/{p.pid}/task")
                    for c in Path(f"/proc/{p.pid}/task/{t}/children").read_text().split()]
            kids = [k for k in kids if _state(k) is not None
                    and Path(f"/proc/{k}/comm").read_text().strip() == "gluster"]
            return kids or None
        assert p.poll() is None
        cli[:] = wait_for(the_cli, 20, "the interactive gluster CLI under gfuse-node-gluster")
        p.kill()
        p.wait(timeout=10)
        # dead: a zombie until its pid namespace's init reaps it, or gone
        wait_for(lambda: all(_state(k) in (None, "Z", "X") for k in cli), 10, "the CLI to die with its nsenter")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
        for k in cli:
            if _state(k) not in (None, "Z", "X"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(k, signal.SIGKILL)


def test_converged_glusterd_pods_form_the_pool_and_serve_the_provisioner(converged: dict) -> None:
    from flexvolume.storage.backends import GfuseMounter, SubdirBackend

    names, net, work = converged["names"], converged["net"], converged["work"]
    pids = [wait_for(lambda n=n: _glusterd_pid(n), 60, f"{n}'s glusterd") for n in names]
    # node 1's glusterd the way the provisioner Deployment reaches it: gfuse-node-gluster, from the host
    gd = node_gluster(pids[0])

    last: list[str] = []

    def pool_ready():
        try:
            info = gd.volume_info(POOL)
            return info if info and info.started and gd.quota_enabled(POOL, info) else None
        except Exception as e:  # noqa: BLE001 - glusterd still starting
            last[:] = [f"{type(e).__name__}: {e}"]
            return None

    try:
        info = wait_for(pool_ready, 120, "the setup containers to peer the nodes and create the pool", interval=1)
    except AssertionError as e:
        raise AssertionError(f"{e} (last error: {last})\n{_diagnostics(names)}") from None
    formed_s = time.monotonic() - converged["t0"]
    assert info.replica == 3 and sorted(b.host for b in info.bricks) == [f"{SUBNET}.{i}" for i in range(1, 4)], info
    peers = gd.peers()
    assert sorted(p.hostname for p in peers) == [f"{SUBNET}.2", f"{SUBNET}.3"] and all(p.connected for p in peers)
    # every node's glusterd sees the same pool (each node's own CLI in its own namespaces)
    for pid in pids[1:]:
        assert POOL in node_gluster(pid).volumes()
    # a provisioner timeout kills gfuse-node-gluster (the outer nsenter): the CLI, its child in glusterd's
    # pid namespace, dies with it (pdeathsig) and does not hang on to the provisioner's pipes
    _killed_wrapper_kills_the_cli(pids[0])

    # the provisioner's storage path: SubdirBackend through gfuse-node-gluster, its pool mount from the
    # client node (the provisioner pod mounts it over the pod network the same way)
    mounter = GfuseMounter(net.exec_prefix("client"))
    backend = SubdirBackend(gd, POOL, state_dir=work / "provisioner", mounter=mounter)
    pv = f"pvc-{secrets.token_hex(4)}"
    size = 64 << 20
    try:
        vol = backend.create(pv, size, {})
        assert vol.source == f"{SUBNET}.1:/{POOL}/{pv}", vol
        assert sorted(vol.backup_servers) == [f"{SUBNET}.2", f"{SUBNET}.3"]
        # a node's mount of the PV, as the FlexVolume driver's agent would make it (gfuse, client node)
        mnt = work / "pod-volume"
        mnt.mkdir()
        _run(*net.exec_prefix("client"), sys.executable, "-m", "gfuse.cli", "mount", vol.source, str(mnt),
             "-o", "backup-volfile-servers=" + ":".join(vol.backup_servers), timeout=90)
        try:
            (mnt / "hello.txt").write_text("written through a gfuse mount of the converged pool\n")
            assert (mnt / "hello.txt").read_text() == "written through a gfuse mount of the converged pool\n"
            # the quota the provisioner set is what df shows (quota-deem-statfs, set by the setup script)
            st = os.statvfs(mnt)
            assert st.f_blocks * st.f_frsize == size, (st.f_blocks * st.f_frsize, size)
            # the file is on all three bricks, in the node directories (hostPath bricks)
            for i in range(1, 4):
                brick = work / f"n{i}" / "bricks" / POOL / pv / "hello.txt"
                assert brick.read_text().startswith("written through"), brick
        finally:
            _run(sys.executable, "-m", "gfuse.cli", "umount", str(mnt), timeout=60, check=False)
        backend.delete(pv)
        assert not any((work / f"n{i}" / "bricks" / POOL / pv).exists() for i in range(1, 4))
    finally:
        close = getattr(backend, "close", None)
        if callable(close):
            close()
    print(f"\npool formed {formed_s:.1f}s after kube play; test {time.monotonic() - converged['t0']:.1f}s")
