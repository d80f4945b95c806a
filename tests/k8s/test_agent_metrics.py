"""The node agent's Prometheus endpoint (``gfuse-agent --metrics-address``) with a real mount.

The agent runs as its own process (testkit.kubelet.AgentProcess) with ``--metrics-address 127.0.0.1:<free
port>``, mounts a real replica-3 volume on a kubelet-style pod path, the test does I/O on it and fetches
``/metrics`` over HTTP: the mount's series carry its labels and count the requests and bytes. A stopped
serving process (SIGSTOP) and a killed one (SIGKILL) show ``gfuse_mount_up 0`` and never hold the endpoint.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gfuse.mounttable import pid_alive
from testkit.kubelet import AgentProcess, cleanup_mounts_under, wait_for

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

Series = dict[str, list[tuple[dict[str, str], float]]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int, timeout: float = 15.0) -> tuple[Series, float]:
    """The parsed /metrics and how long the request took."""
    t0 = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    took = time.monotonic() - t0
    out: Series = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out, took


def _value(series: Series, name: str, **labels: str) -> float:
    got = [v for lab, v in series.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(got) == 1, f"{name}{labels}: {got}; all: {series.get(name)}"
    return got[0]


@pytest.mark.timeout(240)

def _events(emu, reason: str, namespace: str = "team-a") -> list[dict]:
    """The Events of ``reason`` the emulated API server holds in ``namespace``."""
    return [e for e in emu.list("events", namespace) if e["reason"] == reason]

def test_metrics_of_one_mount(vol_replica3, tmp_path: Path) -> None:
    port = _free_port()
    # a long health interval: the agent does not repair the killed server below while the test looks at it
    agent = AgentProcess(tmp_path / "agent", health_interval=600, extra_args=("--metrics-address",
                                                                              f"127.0.0.1:{port}"))
    agent.start()
    try:
        uid = str(uuid.uuid4())
        target = tmp_path / "pods" / uid / "volumes" / "gfuse.example.org~gfuse" / "data"
        c = agent.client()
        pid = c.mount(vol_replica3.source, str(target))["pid"]
        volume = vol_replica3.source.split(":/", 1)[1]
        labels = {"target": str(target), "source": vol_replica3.source, "volume": volume, "pod_uid": uid,
                  "bridge": "flexvolume", "backend": ""}

        # some I/O: 1 MiB written, read back past the page cache, a name that does not exist
        data = os.urandom(1 << 20)
        f = target / f"{tmp_path.name}.bin"
        fd = os.open(f, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            assert os.write(fd, data) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.read(fd, len(data) + 1) == data
        finally:
            os.close(fd)
        with pytest.raises(FileNotFoundError):
            os.stat(target / "no-such-file")

        s, took = _scrape(port)
        print(f"\n/metrics with one mount: {took * 1000:.0f} ms")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as r:
            shown = ("gfuse_mount_up", "gfuse_mount_bricks_up", 'gfuse_fuse_requests_total{', "gfuse_written_bytes",
                     "gfuse_read_bytes", 'errno="ENOENT"', 'le="0.005",op="write"')
            print("\n".join(ln for ln in r.read().decode().splitlines()
                            if any(x in ln for x in shown) and not ln.startswith("#"))[:3000])
        assert _value(s, "gfuse_mount_up", **labels) == 1
        assert _value(s, "gfuse_mount_healthy", **labels) == 1
        assert _value(s, "gfuse_mount_repairs_total", **labels) == 0
        assert _value(s, "gfuse_mount_bricks", **labels) == 3 and _value(s, "gfuse_mount_bricks_up", **labels) == 3
        assert len([lab for lab, v in s["gfuse_brick_up"] if lab["target"] == str(target) and v == 1]) == 3
        assert _value(s, "gfuse_agent_mounts") == 1
        assert abs(_value(s, "gfuse_mount_start_time_seconds", **labels) - time.time()) < 600
        for op in ("lookup", "create", "write", "read", "flush", "release"):
            n = _value(s, "gfuse_fuse_requests_total", op=op, **labels)
            assert n > 0, op
            assert _value(s, "gfuse_fuse_request_duration_seconds_count", op=op, **labels) == n
            assert _value(s, "gfuse_fuse_request_duration_seconds_bucket", op=op, le="+Inf", **labels) == n
            assert _value(s, "gfuse_fuse_request_duration_seconds_sum", op=op, **labels) > 0
        assert _value(s, "gfuse_written_bytes_total", **labels) >= len(data)
        assert _value(s, "gfuse_read_bytes_total", **labels) >= len(data)
        assert _value(s, "gfuse_fuse_errors_total", op="lookup", errno="ENOENT", **labels) >= 1
        assert _value(s, "gfuse_mount_fuse_requests_in_flight", **labels) >= 0
        assert _value(s, "gfuse_mount_brick_calls_in_flight", **labels) >= 0
        writes = _value(s, "gfuse_fuse_requests_total", op="write", **labels)
        assert "process_cpu_seconds_total" in s

        # the counters go on (the scrape itself touched nothing on the mount)
        (target / f"{tmp_path.name}.txt").write_text("more\n")
        s, _ = _scrape(port)
        assert _value(s, "gfuse_fuse_requests_total", op="write", **labels) == writes + 1

        # a stopped server: its status socket accepts but never answers -> up 0 within the per-mount timeout
        os.kill(pid, signal.SIGSTOP)
        try:
            s, took = _scrape(port)
            assert took < 6, f"a stopped mount server held /metrics {took:.1f}s"
            assert _value(s, "gfuse_mount_up", **labels) == 0
            assert not [lab for lab, _ in s.get("gfuse_fuse_requests_total", []) if lab["target"] == str(target)]
        finally:
            os.kill(pid, signal.SIGCONT)
        s, _ = _scrape(port)
        assert _value(s, "gfuse_mount_up", **labels) == 1
        started = _value(s, "gfuse_mount_start_time_seconds", **labels)

        # a killed server: nobody answers its status socket -> up 0 at once; a successor (-o restartable) or
        # the agent's repair may serve the mount again, with a start time of its own
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 10, "the serving process to die")
        s, took = _scrape(port)
        assert took < 6, f"a dead mount server held /metrics {took:.1f}s"
        up = _value(s, "gfuse_mount_up", **labels)
        assert up == 0 or _value(s, "gfuse_mount_start_time_seconds", **labels) != started, \
            "the killed server's mount still shows its old serving process"
        assert _value(s, "gfuse_agent_mounts") == 1
        print(f"killed server: up {up:g} ({took * 1000:.0f} ms)")

        with pytest.raises(OSError) as ei:  # whichever errno the dead or taken-over mount gives
            os.stat(target / "no-such-file")
        assert ei.value.errno in (errno.ENOENT, errno.ENOTCONN, errno.EIO)
        assert c.unmount(str(target))["was_mounted"] is True
        s, _ = _scrape(port)
        assert _value(s, "gfuse_agent_mounts") == 0
        assert not [lab for lab, _ in s.get("gfuse_mount_up", []) if lab["target"] == str(target)]
    finally:
        agent.close()
        cleanup_mounts_under(tmp_path)


def test_bad_metrics_address_stops_the_agent_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from testkit.kubelet import source_env

    base = [sys.executable, "-m", "flexvolume.agent", "--socket", str(tmp_path / "a.sock"), "--state",
            str(tmp_path / "state"), "--kubelet-dir", str(tmp_path)]
    p = subprocess.run([*base, "--metrics-address", "9840"], capture_output=True, text=True, timeout=30,
                       env=source_env())
    assert p.returncode == 2 and p.stderr.strip() == (
        "gfuse-agent: --metrics-address '9840' is not HOST:PORT (e.g. 127.0.0.1:9840, or :9840 for every interface)")
    with socket.socket() as busy:  # a port another process holds: refused at start, one line, no traceback
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = subprocess.run([*base, "--metrics-address", f"127.0.0.1:{port}"], capture_output=True, text=True,
                           timeout=30, env=source_env())
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == f"gfuse-agent: cannot serve metrics on 127.0.0.1:{port}: Address " \
                                                f"already in use"
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------------ events


def _cli_line(source: str, tmp_path: Path) -> str:
    """The one line ``gfuse mount`` prints for ``source`` (without its ``gfuse: `` prefix)."""
    import subprocess
    import sys

    from testkit.kubelet import source_env

    d = tmp_path / "cli-mnt"
    d.mkdir(exist_ok=True)
    p = subprocess.run([sys.executable, "-m", "gfuse.cli", "mount", source, str(d)], capture_output=True, text=True,
                       timeout=90, env=source_env())
    assert p.returncode != 0, p
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("gfuse: "), line
    return line.removeprefix("gfuse: ")


@pytest.mark.timeout(240)
def test_failed_mount_message_is_the_cli_line(vol_replica3, tmp_path: Path) -> None:
    """kubelet records a failed FlexVolume mount or CSI NodeStageVolume as a FailedMount Event on the pod,
    with the driver's message or the gRPC status's details: both carry the line ``gfuse mount`` prints,
    unchanged, after where it was mounted."""
    import grpc

    from flexvolume.agentclient import AgentClient
    from flexvolume.csi.node import NodeService
    from flexvolume.csi.stubs import csi_pb2 as pb
    from testkit.kubelet import Node, PodInfo, kubelet_mount_options

    source = f"{vol_replica3.host}:/gfuset_no_such_volume"
    cli = _cli_line(source, tmp_path)
    assert "gfuset_no_such_volume" in cli and "\n" not in cli

    class Aborted(Exception):
        pass

    class Context:
        def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise Aborted(code, details)

    with Node(tmp_path / "node", health_interval=1.0, probe_timeout=3.0) as node:
        pod = PodInfo(name="web-0")
        vdir = node.kubelet.pod_volume_dir(pod.uid, "data")
        r = node.mount(vdir, kubelet_mount_options(source, pod))
        assert r.returncode == 1 and r.output == {"status": "Failure",
                                                  "message": f"cannot mount {source} on {vdir}: {cli}"}, r

        csi = NodeService("n1", str(node.kubelet.root), AgentClient(node.agent.socket, timeout=90))
        staging = node.kubelet.root / "plugins/kubernetes.io/csi/gfuse.csi.example.org/0123abcd/globalmount"
        cap = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                                  access_mode=pb.VolumeCapability.AccessMode(
                                      mode=pb.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER))
        with pytest.raises(Aborted) as ei:
            csi.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=source, staging_target_path=str(staging),
                                                          volume_capability=cap), Context())
        code, details = ei.value.args
        assert code == grpc.StatusCode.UNAVAILABLE
        assert details == f"the gfuse agent: cannot mount {source} on {staging}: {cli}"
        assert node.agent.client().list() == []


@pytest.mark.timeout(240)
def test_repairs_are_events_on_the_pod(vol_replica3, tmp_path: Path) -> None:
    """With an API server (--kubeconfig here; in a cluster the pod's service account), a mount the agent
    mounts again is a ``MountRepaired`` Event on its pod, and a repair that fails a ``MountRepairFailed`` one
    whose message is the agent's line (``gfuse mount``'s, after where) — posted once, not every retry."""
    from flexvolume.state import MountRecord, save_state
    from testkit.kube_emulator import KubeEmulator

    bad_source = f"{vol_replica3.host}:/gfuset_no_such_volume"
    cli = _cli_line(bad_source, tmp_path)
    pods = {"web-0": str(uuid.uuid4()), "web-1": str(uuid.uuid4())}
    targets = {n: tmp_path / "pods" / uid / "volumes" / "gfuse.example.org~gfuse" / "data" for n, uid in pods.items()}
    with KubeEmulator() as emu:
        kubeconfig = emu.write_kubeconfig(tmp_path / "kubeconfig")
        agent = AgentProcess(tmp_path / "agent", health_interval=1.0, extra_args=("--kubeconfig", str(kubeconfig)))
        agent.workdir.mkdir(parents=True)
        # what the FlexVolume driver's mounts leave in the state file (kubelet's pod name, namespace, uid);
        # neither is mounted now (a node reboot): the agent mounts them again, or tries to
        records = {}
        for name, source in (("web-0", vol_replica3.source), ("web-1", bad_source)):
            targets[name].mkdir(parents=True)
            records[str(targets[name])] = MountRecord(source, str(targets[name]), context={
                "pod": name, "namespace": "team-a", "pod_uid": pods[name]})
        save_state(str(agent.state), records)
        agent.start()
        try:
            (ok,) = wait_for(lambda: _events(emu, "MountRepaired"), 60, "the MountRepaired event")
            assert ok["type"] == "Warning" and ok["involvedObject"] == {
                "apiVersion": "v1", "kind": "Pod", "name": "web-0", "namespace": "team-a", "uid": pods["web-0"]}
            assert ok["message"].startswith(f"the gfuse mount of {vol_replica3.source} on {targets['web-0']} was "
                                            f"not serving") and "repair #1" in ok["message"]
            assert ok["source"] == {"component": "gfuse-agent"} and ok["reportingComponent"] == "gfuse-agent"
            (bad,) = wait_for(lambda: _events(emu, "MountRepairFailed"), 60, "the MountRepairFailed event")
            assert bad["type"] == "Warning" and bad["involvedObject"]["name"] == "web-1"
            assert bad["involvedObject"]["uid"] == pods["web-1"]
            assert bad["message"] == f"cannot mount {bad_source} on {targets['web-1']}: {cli}"
            agent.wait_health_passes(3)  # the repair is retried every pass; the event is not repeated
            failed = _events(emu, "MountRepairFailed")
            assert len(failed) == 1 and failed[0].get("count", 1) == 1
            assert len(_events(emu, "MountRepaired")) == 1
        finally:
            agent.close()
            cleanup_mounts_under(tmp_path)


def test_bad_kubeconfig_stops_the_agent_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from testkit.kubelet import source_env

    bad = tmp_path / "kubeconfig"
    bad.write_text("this: [is not a kubeconfig\n")
    p = subprocess.run([sys.executable, "-m", "flexvolume.agent", "--socket", str(tmp_path / "a.sock"), "--state",
                        str(tmp_path / "state"), "--kubelet-dir", str(tmp_path), "--kubeconfig", str(bad)],
                       capture_output=True, text=True, timeout=60, env=source_env())
    assert p.returncode == 2, p
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith(f"gfuse-agent: cannot use {bad}: "), line


@pytest.mark.timeout(240)
def test_csi_repairs_are_events_on_the_pods(vol_replica3, tmp_path: Path) -> None:
    """A CSI staging mount serves every pod of its volume on the node: NodePublishVolume (with the CSIDriver's
    podInfoOnMount: the pod's name, namespace and uid in the volume context) records the pod in the agent's
    context of the staging mount (``csi.pods``), NodeUnpublishVolume forgets it, and the agent's repair of the
    staging mount is a ``MountRepaired`` Event on each pod still published, naming the volume and the pod's
    path. A repair-only agent (--restartable no), so that a SIGKILL of the server is a repair. The plugin's
    Node service runs in this process (its RPC methods called as grpc would)."""
    import json

    import grpc

    from flexvolume.agentclient import AgentClient
    from flexvolume.csi.node import NodeService
    from flexvolume.csi.stubs import csi_pb2 as pb
    from testkit.kube_emulator import KubeEmulator

    class Context:
        def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise AssertionError(f"{code}: {details}")

    kubelet = tmp_path / "kubelet"
    pods = {"web-0": str(uuid.uuid4()), "web-1": str(uuid.uuid4())}
    cap = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(), access_mode=pb.VolumeCapability.AccessMode(
        mode=pb.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER))
    vid = vol_replica3.source
    staging = str(kubelet / "plugins/kubernetes.io/csi/gfuse.csi.example.org/0123abcd/globalmount")
    targets = {}
    for name, uid in pods.items():
        d = kubelet / "pods" / uid / "volumes/kubernetes.io~csi/pv-data"
        d.mkdir(parents=True)
        targets[name] = str(d / "mount")
    with KubeEmulator() as emu:
        kubeconfig = emu.write_kubeconfig(tmp_path / "kubeconfig")
        agent = AgentProcess(tmp_path / "agent", health_interval=1.0, kubelet_dir=kubelet,
                             extra_args=("--kubeconfig", str(kubeconfig), "--restartable", "no"))
        agent.start()
        node = NodeService("n1", str(kubelet), AgentClient(agent.socket, timeout=90))
        try:
            node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                           volume_capability=cap), Context())
            for name, uid in pods.items():
                ctx = {"csi.storage.k8s.io/pod.name": name, "csi.storage.k8s.io/pod.namespace": "team-a",
                       "csi.storage.k8s.io/pod.uid": uid, "csi.storage.k8s.io/ephemeral": "false"}
                node.NodePublishVolume(pb.NodePublishVolumeRequest(
                    volume_id=vid, staging_target_path=staging, target_path=targets[name], volume_capability=cap,
                    volume_context=ctx), Context())

            def recorded() -> dict:
                (rec,) = [r for r in agent.client().list() if r["target"] == staging]
                return json.loads(rec["context"].get("csi.pods", "{}"))

            assert recorded() == {targets[n]: {"name": n, "namespace": "team-a", "uid": u} for n, u in pods.items()}
            node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=targets["web-1"]),
                                     Context())
            assert list(recorded()) == [targets["web-0"]]
            (rec,) = agent.client().list()
            assert rec["context"]["csi.role"] == "staging" and rec["context"]["csi.volume_id"] == vid
            os.kill(rec["pid"], signal.SIGKILL)

            (ev,) = wait_for(lambda: _events(emu, "MountRepaired"), 60, "the MountRepaired event")
            assert ev["type"] == "Warning" and ev["involvedObject"] == {
                "apiVersion": "v1", "kind": "Pod", "name": "web-0", "namespace": "team-a", "uid": pods["web-0"]}
            assert ev["message"].startswith(f"the gfuse mount of {vid} of CSI volume {vid} staged on {staging} "
                                            f"(published for this pod at {targets['web-0']}) was not serving"), ev
            assert "repair #1" in ev["message"] and "binds the pod's target" in ev["message"], ev
            # the node plugin's rebind of the pod's target (its repair loop, one pass here)
            def rebound() -> bool:
                node.repair_targets()
                try:
                    Path(targets["web-0"], "after-repair.txt").write_text("ok\n")
                    return True
                except OSError as e:
                    assert e.errno in (errno.ENOTCONN, errno.ECONNABORTED), e
                    return False

            wait_for(rebound, 30, "the pod's target to work again")
            agent.wait_health_passes(2)
            assert len(_events(emu, "MountRepaired")) == 1, "web-1 was unpublished: no event for it"
        finally:
            for t in targets.values():
                with contextlib.suppress(Exception):
                    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=t), Context())
            with contextlib.suppress(Exception):
                node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging),
                                       Context())
            agent.close()
            cleanup_mounts_under(tmp_path)
