"""The gfuse node agent: protocol, mount lifecycle, and mounts that survive the agent.

Real GlusterFS volumes (tests/conftest.py), real gfuse mounts, the agent as a separate process
(testkit.kubelet.AgentProcess) that the tests SIGKILL. No kubelet can run here: the kubelet
directory is a stand-in made rshared, a "pod" is a process in a mount namespace with slave
propagation started before the volume is mounted (testkit.kubelet), and the FlexVolume driver is
executed as kubelet executes it.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from flexvolume.agentclient import AgentError
from gfuse.mounttable import mounts_at, pid_alive
from flexvolume.state import MountRecord, load_state, save_state
from testkit.kubelet import (
    AgentProcess,
    Node,
    PodInfo,
    cleanup_mounts_under,
    gfuse_serving_pids,
    kubelet_mount_options,
    source_env,
    wait_for,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

# A pod's process: waits (bounded) for the volume to appear in its own mount namespace, then appends
# numbered lines through ONE open file descriptor until told to stop. Progress and errors go to
# files in a control directory outside the volume. If a write fails (the serving process died) it
# stops writing and checks that a fresh open of the volume works again (after the agent's repair).
WRITER = r'''
M="$1"; CTL="$2"; FILE="$3"
n=0
until grep -q " $M " /proc/self/mountinfo; do
  n=$((n+1)); if [ $n -gt 900 ]; then echo "the volume never appeared in the pod" > "$CTL/error"; exit 3; fi
  sleep 0.1
done
echo "$$" > "$CTL/mounted"
exec 3>>"$M/$FILE" || { echo "open failed" > "$CTL/error"; exit 4; }
i=0
while [ ! -e "$CTL/stop" ] && [ $i -lt 30000 ]; do
  if ! echo "line $i" >&3; then echo "$i" > "$CTL/write-error"; break; fi
  i=$((i+1))
  echo $i > "$CTL/count.tmp"; mv "$CTL/count.tmp" "$CTL/count"
  sleep 0.02
done
exec 3>&-
echo $i > "$CTL/done"
if [ -e "$CTL/write-error" ]; then
  n=0
  until cat "$M/$FILE" > /dev/null 2>&1; do
    n=$((n+1)); if [ $n -gt 900 ]; then echo "no fresh open within 90s" > "$CTL/error"; exit 5; fi
    sleep 0.1
  done
  echo "after repair" > "$M/$FILE.after" && echo ok > "$CTL/reopen-ok"
fi
exec sleep 600
'''


def _count(ctl: Path) -> int:
    try:
        return int((ctl / "count").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _pod_error(ctl: Path) -> str | None:
    p = ctl / "error"
    return p.read_text().strip() if p.exists() else None


def _wait_count(ctl: Path, at_least: int, timeout: float, what: str) -> int:
    def check() -> int:
        err = _pod_error(ctl)
        assert err is None, f"the pod failed: {err}"
        assert not (ctl / "write-error").exists(), f"a write of the pod failed ({what}), at line " \
                                                    f"{(ctl / 'write-error').read_text().strip()}"
        c = _count(ctl)
        return c if c >= at_least else 0
    return wait_for(check, timeout, f"the pod to write {at_least} lines ({what})")


@pytest.fixture
def agent(tmp_path: Path):
    a = AgentProcess(tmp_path / "agent", health_interval=1.0, probe_timeout=3.0)
    a.start()
    try:
        yield a
    finally:
        a.close()
        cleanup_mounts_under(tmp_path)


def _raw(sock_path: str, data: bytes, timeout: float = 5.0) -> tuple[dict | None, bool]:
    """Send raw bytes; return (the first answer or None, whether the agent closed the connection)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(data)
        buf = b""
        answer = None
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                return answer, False
            if not chunk:
                break
            buf += chunk
            if answer is None and len(buf) >= 4:
                (n,) = struct.unpack(">I", buf[:4])
                if len(buf) >= 4 + n:
                    answer = msgpack.unpackb(buf[4:4 + n], raw=False)
                    buf = buf[4 + n:]
                    s.settimeout(1.0)
        return answer, True


def _frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


# ------------------------------------------------------------------------------------------------
# protocol


def test_ping_and_framing(agent: AgentProcess) -> None:
    c = agent.client()
    pong = c.ping()
    assert pong["ok"] is True and pong["protocol"] == 1 and isinstance(pong["version"], str)
    assert pong["mounts"] == 0
    # several requests on one connection, each answered in order
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(agent.socket)
        for op in ("ping", "list", "ping"):
            s.sendall(_frame({"op": op}))
            (n,) = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))
            resp = msgpack.unpackb(s.recv(n, socket.MSG_WAITALL), raw=False)
            assert resp["ok"] is True, resp
            assert ("mounts" in resp) and (isinstance(resp["mounts"], list) if op == "list" else True)
    # a body that is not msgpack / not a map: answered, connection stays usable
    ans, _ = _raw(agent.socket, _frame([1, 2]) + _frame({"op": "ping"}))
    assert ans == {"ok": False, "error": "bad request: a message must be a msgpack map, not list", "code": "invalid"}
    ans, _ = _raw(agent.socket, struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    assert ans["ok"] is False and ans["code"] == "invalid" and "not a msgpack message" in ans["error"]
    # impossible frame lengths: answered, then the connection is closed
    for n in (0, (1 << 20) + 1):
        ans, closed = _raw(agent.socket, struct.pack(">I", n))
        assert ans["ok"] is False and ans["code"] == "invalid" and "frame length" in ans["error"], ans
        assert closed
    # the agent is still fine
    assert c.ping()["ok"] is True


def test_requests_refused_precisely(agent: AgentProcess, tmp_path: Path) -> None:
    c = agent.client()

    def refused(req: dict) -> AgentError:
        with pytest.raises(AgentError) as ei:
            c.call(req)
        return ei.value

    e = refused({"op": "format-the-disk"})
    assert e.code == "invalid" and "unknown op 'format-the-disk'" in e.message
    e = refused({"no-op": 1})
    assert e.code == "invalid" and "unknown op None" in e.message
    e = refused({"op": "mount", "target": str(tmp_path / "m")})
    assert e.code == "invalid" and e.message == "mount: 'source' is required (a non-empty string)"
    e = refused({"op": "mount", "source": "127.0.0.2:/v"})
    assert e.code == "invalid" and "'target' is required" in e.message
    e = refused({"op": "mount", "source": "127.0.0.2:/v", "target": "relative/dir"})
    assert e.code == "invalid" and "must be an absolute path" in e.message
    e = refused({"op": "mount", "source": "no-volume-here", "target": str(tmp_path / "m")})
    assert e.code == "invalid" and "bad source" in e.message and "SERVER[:PORT]:/VOLUME" in e.message
    e = refused({"op": "mount", "source": "127.0.0.2:/v", "target": str(tmp_path / "m"), "options": "ro"})
    assert e.code == "invalid" and "must be a list of strings" in e.message
    e = refused({"op": "mount", "source": "127.0.0.2:/v", "target": str(tmp_path / "m"), "readonly": "yes"})
    assert e.code == "invalid" and "'readonly' must be true or false" in e.message
    e = refused({"op": "mount", "source": "127.0.0.2:/v", "target": str(tmp_path / "m"), "options": ["bogus=1"]})
    assert e.code == "invalid" and "unknown mount option 'bogus'" in e.message
    e = refused({"op": "mount", "source": "127.0.0.2:/v", "target": str(tmp_path / "m"), "timeout": -1})
    assert e.code == "invalid" and "timeout must be a positive number" in e.message
    assert not (tmp_path / "m").exists()  # nothing was made for refused requests
    e = refused({"op": "stats", "target": str(tmp_path / "nowhere")})
    assert e.code == "not_found" and "No such file or directory" in e.message
    # unmount of something that was never mounted: success (kubelet retries unmounts)
    (tmp_path / "plain").mkdir()
    assert c.unmount(str(tmp_path / "plain")) == {"ok": True, "was_mounted": False}
    assert c.unmount(str(tmp_path / "does-not-exist")) == {"ok": True, "was_mounted": False}
    # a directory mounted by something else is neither mounted over nor unmounted
    other = tmp_path / "tmpfs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "pretend", str(other)], check=True, timeout=10)
    try:
        e = refused({"op": "mount", "source": "127.0.0.2:/v", "target": str(other)})
        assert e.code == "conflict" and e.message == (f"{other} is already mounted (tmpfs from pretend); unmount it "
                                                      f"first or use another directory")
        e = refused({"op": "unmount", "target": str(other)})
        assert e.code == "conflict" and "not a gfuse mount; not unmounting it" in e.message
        assert mounts_at(str(other))
    finally:
        subprocess.run(["umount", str(other)], check=False, timeout=10)
    assert c.list() == []


def test_one_agent_per_state_file_and_socket(agent: AgentProcess, tmp_path: Path) -> None:
    def run_second(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flexvolume.agent", *args], capture_output=True, text=True,
                              timeout=30, check=False, env=source_env())

    p = run_second("--socket", f"{agent.socket}.2", "--state", str(agent.state), "--lock-wait", "0.5")
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == (f"gfuse-agent: another gfuse agent holds {agent.state}.lock (it owns the mounts of "
                        f"{agent.state}); stop it first\n")
    p = run_second("--socket", agent.socket, "--state", str(tmp_path / "other-state"))
    assert p.returncode == 1
    assert p.stderr == f"gfuse-agent: another process answers on {agent.socket}; stop it or use --socket\n"
    assert agent.client().ping()["ok"] and os.path.exists(agent.socket)


# ------------------------------------------------------------------------------------------------
# mounts


def test_mount_lifecycle(agent: AgentProcess, vol_replica3, native_mount, tmp_path: Path) -> None:
    c = agent.client()
    target = tmp_path / "mnt" / "data"  # the agent makes missing directories
    t0 = time.monotonic()
    resp = c.mount(vol_replica3.source, str(target), options=["allow_other"], context={"pod": "default/web-0"})
    mount_s = time.monotonic() - t0
    assert resp["ok"] and resp["already"] is False and pid_alive(resp["pid"])
    pid = resp["pid"]
    assert gfuse_serving_pids(target) == [pid]
    (m,) = mounts_at(str(target))
    assert m.fstype == "fuse.gfuse" and m.source == vol_replica3.source and not m.readonly
    name = f"{tmp_path.name}.txt"
    (target / name).write_text("via the agent's mount\n")
    assert (native_mount(vol_replica3) / name).read_text() == "via the agent's mount\n"

    (entry,) = c.list()
    assert entry["target"] == str(target) and entry["source"] == vol_replica3.source
    assert entry["pid"] == pid and entry["healthy"] is True and entry["state"] == "healthy"
    assert entry["options"] == ["allow_other"] and entry["readonly"] is False
    assert entry["context"] == {"pod": "default/web-0"} and entry["repairs"] == 0
    # the state file says the same (msgpack, written atomically: no temp files left)
    state = load_state(str(agent.state))
    assert list(state) == [str(target)] and state[str(target)].pid == pid
    assert [p.name for p in agent.state.parent.iterdir() if ".tmp." in p.name] == []

    # idempotent; a different source, or read-only, on the same target is refused
    again = c.mount(vol_replica3.source + "/", str(target), options=["allow_other"])
    assert again["already"] is True and again["pid"] == pid
    with pytest.raises(AgentError) as ei:
        c.mount(f"{vol_replica3.source}/elsewhere", str(target))
    assert ei.value.code == "conflict"
    assert ei.value.message == (f"{target} is already mounted by gfuse from {vol_replica3.source}, not "
                                f"{vol_replica3.source}/elsewhere; unmount it first")
    with pytest.raises(AgentError, match=r"is already mounted read-write .* asked read-only"):
        c.mount(vol_replica3.source, str(target), readonly=True)

    st = c.stats(str(target))
    assert set(st) == {"bytes_total", "bytes_used", "bytes_available", "inodes_total", "inodes_used",
                       "inodes_available"}
    sv = os.statvfs(target)
    assert st["bytes_total"] == sv.f_blocks * sv.f_frsize > 0
    assert 0 < st["bytes_used"] <= st["bytes_total"] and 0 < st["bytes_available"] <= st["bytes_total"]
    assert st["inodes_total"] == sv.f_files and st["inodes_used"] + st["inodes_available"] == st["inodes_total"]

    t0 = time.monotonic()
    assert c.unmount(str(target)) == {"ok": True, "was_mounted": True}
    unmount_s = time.monotonic() - t0
    assert not mounts_at(str(target))
    assert not pid_alive(pid) and gfuse_serving_pids(target) == []
    from gfuse.status import status_socket_path

    assert not os.path.exists(status_socket_path(str(target)))
    assert c.list() == [] and load_state(str(agent.state)) == {}
    assert c.unmount(str(target)) == {"ok": True, "was_mounted": False}
    print(f"\nagent mount {mount_s:.1f}s, unmount {unmount_s:.1f}s")


def test_unreachable_volume_is_a_precise_error(agent: AgentProcess, vol_replica3, tmp_path: Path) -> None:
    c = agent.client()
    cases = [
        (f"{vol_replica3.host}:1:/{vol_replica3.name}", "unavailable", "cannot mount"),  # nothing listens on port 1
        (f"{vol_replica3.host}:/gfuset_no_such_volume", "unavailable", "does not exist"),
        (f"{vol_replica3.source}/no/such/subdir", "unavailable", "no/such/subdir"),
    ]
    for source, code, fragment in cases:
        target = tmp_path / f"m{cases.index((source, code, fragment))}"
        t0 = time.monotonic()
        with pytest.raises(AgentError) as ei:
            c.mount(source, str(target), timeout=40)
        took = time.monotonic() - t0
        assert ei.value.code == code and fragment in ei.value.message, ei.value.message
        assert ei.value.message.startswith(f"cannot mount {source} on {target}: ")
        assert "\n" not in ei.value.message and took < 40
        assert not mounts_at(str(target)) and gfuse_serving_pids(target) == []
        print(f"\n{source}: {ei.value.message} ({took:.1f}s)")
    assert c.list() == []


def test_stats_and_health_bounded_on_a_stuck_mount(agent: AgentProcess, vol_replica3, tmp_path: Path) -> None:
    c = agent.client()
    target = tmp_path / "stuck"
    pid = c.mount(vol_replica3.source, str(target))["pid"]
    os.kill(pid, signal.SIGSTOP)  # the serving process stops answering: stat() on the mount would hang
    try:
        t0 = time.monotonic()
        with pytest.raises(AgentError) as ei:
            c.stats(str(target), timeout=15)
        assert ei.value.code == "timeout" and "did not answer within 3s" in ei.value.message
        assert time.monotonic() - t0 < 8
        t0 = time.monotonic()
        (entry,) = c.list(timeout=15)
        assert entry["healthy"] is False and entry["state"] == "hung" and f"serving process {pid}" in entry["reason"]
        assert time.monotonic() - t0 < 8
        assert c.ping()["ok"]  # the agent itself never blocks on the mount
        assert "is unhealthy" in wait_for(lambda: "is unhealthy" in agent.log.read_text() and agent.log.read_text(),
                                          15, "the health check to notice")
        assert gfuse_serving_pids(target) == [pid]  # a stuck mount is reported, not torn down
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: c.list()[0]["healthy"], 20, "the mount to answer again")
    assert c.list()[0]["pid"] == pid and c.list()[0]["repairs"] == 0
    c.unmount(str(target))
    # the serving process ends once the kernel has told it (an exiting process keeps its /proc entry a moment)
    t0 = time.monotonic()
    wait_for(lambda: not pid_alive(pid), 10, f"serving process {pid} to exit after the unmount")
    print(f"serving process gone {time.monotonic() - t0:.2f}s after the unmount returned")


def test_state_is_readopted_after_a_reboot(vol_replica3, tmp_path: Path) -> None:
    """Entries of the state file whose mounts are gone (node reboot) are mounted again while their
    directory exists; entries whose directory is gone (pod deleted) are dropped."""
    target = tmp_path / "pods" / "uid1" / "volumes" / "gfuse.example.org~gfuse" / "data"
    target.mkdir(parents=True)
    gone = tmp_path / "pods" / "uid2" / "volumes" / "gfuse.example.org~gfuse" / "data"
    a = AgentProcess(tmp_path / "agent", health_interval=1.0)
    a.workdir.mkdir(parents=True)
    save_state(str(a.state), {
        # a pid that cannot be alive
        str(target): MountRecord(vol_replica3.source, str(target), ["allow_other"], pid=4194304),
        str(gone): MountRecord(vol_replica3.source, str(gone)),
    })
    torn = Path(f"{a.state}.tmp.12345")  # left by an agent killed while writing the state
    torn.write_bytes(b"\x82\xa7ver")
    a.start()
    try:
        assert not torn.exists()
        c = a.client()
        entries = wait_for(lambda: [m for m in c.list() if m["healthy"] and m["repairs"] == 1] and c.list(), 60,
                           "the agent to mount the entry again")
        assert [m["target"] for m in entries] == [str(target)]
        (m,) = entries
        assert m["repairs"] == 1 and m["pid"] in gfuse_serving_pids(target)
        assert mounts_at(str(target))[-1].source == vol_replica3.source
        assert list(load_state(str(a.state))) == [str(target)]
        assert "is gone (its pod was removed); dropping it" in a.log.read_text()
    finally:
        a.close()
        cleanup_mounts_under(tmp_path)


# ------------------------------------------------------------------------------------------------
# mounts outlive the agent; dead serving processes are repaired


@pytest.fixture
def node(tmp_path: Path):
    with Node(tmp_path / "node", health_interval=1.0, probe_timeout=3.0) as n:
        yield n


def test_pod_keeps_writing_while_the_agent_is_killed_and_replaced(node: Node, vol_replica3, native_mount,
                                                                  tmp_path: Path) -> None:
    pod_info = PodInfo(name="writer-0")
    vdir = node.kubelet.pod_volume_dir(pod_info.uid, "data")
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    fname = f"{tmp_path.name}.log"
    pod = node.pod(WRITER, vdir, ctl, fname)  # the pod runs before the volume is mounted
    r = node.mount(vdir, kubelet_mount_options(vol_replica3.source, pod_info))
    assert r.status == "Success" and r.returncode == 0 and r.stderr == "", r
    wait_for(lambda: (ctl / "mounted").exists() or _pod_error(ctl), 30, "the pod to see the volume")
    _wait_count(ctl, 20, 30, "before the agent is killed")
    (entry,) = node.agent.client().list()
    serving = entry["pid"]

    # SIGKILL the agent (and its whole process group): the pod's writes go on
    old_agent = node.agent.pid
    assert node.agent.kill(signal.SIGKILL) == -signal.SIGKILL
    assert not pid_alive(old_agent)
    _wait_count(ctl, _count(ctl) + 20, 30, "while no agent runs")
    assert pid_alive(serving)

    # a new agent re-adopts the mount from its state file
    node.agent.start()
    (entry,) = node.agent.client().list()
    assert entry["target"] == str(vdir) and entry["pid"] == serving and entry["healthy"] is True
    assert entry["context"]["pod"] == "writer-0" and entry["context"]["pod_uid"] == pod_info.uid
    node.agent.wait_health_passes(2)
    assert node.agent.client().list()[0]["repairs"] == 0
    _wait_count(ctl, _count(ctl) + 20, 30, "after the new agent started")

    # replaced as a rolling update does it (SIGTERM, then a new agent process)
    assert node.agent.kill(signal.SIGTERM) == 0
    node.agent.start()
    assert node.agent.client().list()[0]["pid"] == serving
    _wait_count(ctl, _count(ctl) + 20, 30, "after the agent was replaced")

    (ctl / "stop").touch()
    written = int(wait_for(lambda: (ctl / "done").exists() and (ctl / "done").read_text().strip(), 30,
                           "the pod to close its file"))
    assert not (ctl / "write-error").exists() and _pod_error(ctl) is None
    assert pod.alive()
    lines = (native_mount(vol_replica3) / fname).read_text().splitlines()
    assert len(lines) == written and lines == [f"line {i}" for i in range(written)]
    assert pid_alive(serving) and node.agent.client().list()[0]["repairs"] == 0
    print(f"\npod wrote {written} lines through one fd across an agent SIGKILL and a replacement; none lost")

    r = node.unmount(vdir)
    assert r.status == "Success" and r.returncode == 0, r
    wait_for(lambda: not pid_alive(serving), 15, "the serving process to exit")
    assert str(vdir) not in pod.mount_targets()
    assert node.agent.client().list() == [] and load_state(str(node.agent.state)) == {}


def _repair_only(agent: AgentProcess) -> None:
    """The agent restarted with --restartable no: mounts are repair-only, as on a kernel without
    FUSE_NOTIFY_RESEND (restartable ones are in tests/k8s/test_agent_takeover.py)."""
    agent.kill(signal.SIGTERM)
    agent.extra_args = (*agent.extra_args, "--restartable", "no")
    agent.start()


def test_dead_serving_process_is_repaired(node: Node, vol_replica3, native_mount, tmp_path: Path) -> None:
    """Repair-only: a fresh mount is stacked over the dead one (never detached first); the pod (slave
    propagation) sees it, its open descriptor keeps failing."""
    _repair_only(node.agent)
    pod_info = PodInfo(name="writer-1")
    vdir = node.kubelet.pod_volume_dir(pod_info.uid, "data")
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    fname = f"{tmp_path.name}.log"
    pod = node.pod(WRITER, vdir, ctl, fname)
    r = node.mount(vdir, kubelet_mount_options(vol_replica3.source, pod_info))
    assert r.status == "Success", r
    _wait_count(ctl, 10, 40, "before the serving process is killed")
    c = node.agent.client()
    old = c.list()[0]["pid"]

    os.kill(old, signal.SIGKILL)  # the FUSE server dies: "Transport endpoint is not connected"
    t0 = time.monotonic()
    failed_at = int(wait_for(lambda: (ctl / "write-error").exists() and (ctl / "write-error").read_text().strip(),
                             30, "the pod's open descriptor to fail"))
    entry = wait_for(lambda: [m for m in c.list() if m["repairs"] >= 1 and m["healthy"]], 60,
                     "the agent to repair the mount")[0]
    repair_s = time.monotonic() - t0
    assert entry["pid"] != old and entry["pid"] in gfuse_serving_pids(vdir) and entry["mode"] == "repair-only"
    assert not pid_alive(old) and len(mounts_at(str(vdir))) == 2  # the new one over the dead one

    # new opens work, in the pod (through propagation) and on the node
    wait_for(lambda: (ctl / "reopen-ok").exists() or _pod_error(ctl), 60, "the pod to open the volume again")
    assert _pod_error(ctl) is None
    assert pod.exec(f"cat {vdir}/{fname}.after").stdout == "after repair\n"
    assert (vdir / f"{fname}.after").read_text() == "after repair\n"
    # every write acknowledged before the crash is on the volume (the one that failed may or may not be:
    # the server can die after the bricks took it and before it answered)
    lines = (native_mount(vol_replica3) / fname).read_text().splitlines()
    expected = [f"line {i}" for i in range(failed_at)]
    first_bad = next((i for i, (a, b) in enumerate(zip(lines, expected)) if a != b), None)
    assert lines[:failed_at] == expected, (f"{len(lines)} lines on the volume, {failed_at} acknowledged; first "
                                           f"difference at {first_bad}; last lines {lines[-3:]}")
    assert lines[failed_at:] in ([], [f"line {failed_at}"]), f"unexpected lines after the failed write: {lines[-3:]}"
    assert "repaired" in node.agent.log.read_text()
    print(f"\nrepaired {repair_s:.1f}s after the serving process was killed; {failed_at} acknowledged lines kept"
          f"{' (and the failed one)' if len(lines) > failed_at else ''}")

    r = node.unmount(vdir)
    assert r.status == "Success", r
    assert gfuse_serving_pids(vdir) == [] and not mounts_at(str(vdir))
    assert str(vdir) not in pod.mount_targets()


def test_bricks_down_is_unhealthy_not_torn_down(agent: AgentProcess, make_volume, tmp_path: Path) -> None:
    """gfuse answers "Transport endpoint is not connected" itself while every brick is down, like a dead
    FUSE server would: the agent must tell them apart (the serving process lives) and leave the mount
    in place -- unmounting it would expose the node's directory underneath to the pods. And a serving
    process that dies while no brick answers (repair-only) is not covered until the volume can be mounted
    again."""
    _repair_only(agent)
    vol = make_volume("replica3")
    c = agent.client()
    target = tmp_path / "m"
    pid = c.mount(vol.source, str(target))["pid"]
    (target / "f").write_text("kept\n")
    for i in range(3):
        vol.kill_brick(i)
    entry = wait_for(lambda: [m for m in c.list() if not m["healthy"]], 60, "the mount to be unhealthy")[0]
    print(f"\nall bricks down: {entry['state']}: {entry['reason']}")
    assert entry["state"] in ("error", "hung")
    agent.wait_health_passes(2)
    entry = c.list()[0]
    assert entry["repairs"] == 0 and entry["pid"] == pid and gfuse_serving_pids(target) == [pid]
    assert mounts_at(str(target)) and "repairing" not in agent.log.read_text()

    # now the serving process dies too: dead, but nothing to mount again -- the dead mount stays
    os.kill(pid, signal.SIGKILL)
    entry = wait_for(lambda: [m for m in c.list() if m["repair_error"]], 30, "a failed repair")[0]
    assert entry["state"] == "dead" and "Transport endpoint is not connected" in entry["reason"]
    assert entry["repair_error"] == f"the volume {vol.source} cannot be reached: none of its 3 bricks answers"
    agent.wait_health_passes(1)
    assert len(mounts_at(str(target))) == 1 and mounts_at(str(target))[0].is_gfuse  # fail closed
    with pytest.raises(OSError, match="Transport endpoint is not connected"):
        os.stat(target)
    assert c.list()[0]["repairs"] == 0

    vol.start_force()  # the bricks come back: the next health pass repairs the mount
    entry = wait_for(lambda: [m for m in c.list() if m["healthy"] and m["repairs"] == 1], 90,
                     "the repair once the bricks are back")[0]
    assert entry["repair_error"] == "" and entry["pid"] in gfuse_serving_pids(target)
    assert (target / "f").read_text() == "kept\n"
    c.unmount(str(target))


def test_injections_refused_and_mounts_keep_nosuid_nodev(agent: AgentProcess, vol_replica3, tmp_path: Path) -> None:
    """Issue 11 through the real agent process: what reaches it comes from Kubernetes objects, so a comma
    in the source (libfuse would split fsname= there), traversals, node files (log-file=, TLS files), and
    targets outside its --kubelet-dir (here tmp_path) or through a symlink are refused with code invalid,
    changing nothing; suid/dev asked as options are ignored and the mount is nosuid,nodev."""
    c = agent.client(timeout=30)
    target = tmp_path / "pods" / "uid" / "volumes" / "gfuse.example.org~gfuse" / "data"
    log_target = tmp_path / "injected.log"
    outside = Path("/var/tmp") / f"gfuse-outside-{os.getpid()}"
    link = tmp_path / "link"
    link.symlink_to("/var/tmp")
    src = vol_replica3.source
    bad = [
        ({"source": f"{src}/x,suid,dev"}, "comma"),
        ({"source": f"{src}/../x"}, "'..'"),
        ({"options": ["subdir=.."]}, "'..'"),
        ({"options": [f"log-file={log_target}"]}, "names a file on the node"),
        ({"options": ["ssl-ca=/etc/shadow"]}, "names a file on the node"),
        ({"target": str(outside)}, "outside the kubelet directory"),
        ({"target": str(link / "x")}, "outside the kubelet directory"),
        ({"target": str(link)}, "symbolic link"),
    ]
    for change, why in bad:
        with pytest.raises(AgentError) as ei:
            c.call({"op": "mount", "source": src, "target": str(target), **change})
        assert ei.value.code == "invalid" and why in ei.value.message, (change, ei.value.message)
    assert c.list() == [] and not target.exists() and not outside.exists() and not log_target.exists()
    assert not load_state(str(agent.state)) and gfuse_serving_pids(target) == []

    c.mount(src, str(target), options=["allow_other", "suid", "dev", "exec"])
    try:
        (m,) = mounts_at(str(target))
        assert {"nosuid", "nodev"} <= m.mount_options and m.source == src, m
        line = next(ln for ln in Path("/proc/mounts").read_text().splitlines() if ln.split()[1] == str(target))
        assert {"nosuid", "nodev"} <= set(line.split()[3].split(",")), line
    finally:
        c.unmount(str(target))
    assert not log_target.exists()


def test_a_bad_state_record_does_not_empty_the_table(vol_replica3, tmp_path: Path) -> None:
    """The agent keeps every valid entry of a state file with one broken record, says which it dropped, and
    re-adopts the good mount."""
    target = tmp_path / "pods" / "uid1" / "volumes" / "gfuse.example.org~gfuse" / "data"
    target.mkdir(parents=True)
    a = AgentProcess(tmp_path / "agent", health_interval=1.0)
    a.workdir.mkdir(parents=True)
    good = MountRecord(vol_replica3.source, str(target), ["allow_other"]).to_wire()
    broken = {"source": vol_replica3.source, "target": str(tmp_path / "pods" / "x"), "since": "yesterday"}
    a.state.write_bytes(msgpack.packb({"version": 1, "mounts": [broken, good, 42]}))
    a.start()
    try:
        entries = wait_for(lambda: [m for m in a.client().list() if m["healthy"]], 60, "the good entry mounted")
        assert [m["target"] for m in entries] == [str(target)]
        log = a.log.read_text()
        assert "dropped an invalid entry 0: mount entry for" in log and "since must be a time" in log, log
        assert "dropped an invalid entry 2: a mount entry must be a map" in log
        assert list(a.workdir.glob("agent-state.msgpack.dropped-*")), "the file as it was is kept"
    finally:
        a.close()
        cleanup_mounts_under(tmp_path)


def test_node_options_reach_every_mount_and_probe(vol_replica3, tmp_path: Path) -> None:
    """What a PV may not ask for (node files, TLS, log settings) the node's admin gives the agent with
    --node-option: every mount gets it (here read-ahead-kb, visible in the kernel's bdi; the repair probe
    is given the same), it is not recorded as the PV's, and a PV asking for a node option is still refused."""
    from gfuse.mounttable import mount_at

    a = AgentProcess(tmp_path / "agent", extra_args=("--node-option", "read-ahead-kb=2048,log-level=DEBUG"))
    a.start()
    try:
        c = a.client()
        target = tmp_path / "pods" / "p1" / "vol"
        resp = c.mount(vol_replica3.source, str(target))
        m = mount_at(str(target))
        assert m is not None and m.fstype == "fuse.gfuse"
        assert Path(f"/sys/class/bdi/{m.dev}/read_ahead_kb").read_text().strip() == "2048"
        cmdline = Path(f"/proc/{resp['pid']}/cmdline").read_bytes().split(b"\0")
        assert any(b"read-ahead-kb=2048" in arg for arg in cmdline), cmdline
        (entry,) = c.list()
        assert entry["options"] == [], "node options are the node's, not recorded as the PV's"
        with pytest.raises(AgentError) as ei:
            c.mount(vol_replica3.source, str(tmp_path / "pods" / "p2" / "vol"), options=["log-file=/etc/x"])
        assert ei.value.code == "invalid"
        assert c.unmount(str(target))["was_mounted"] is True
    finally:
        a.close()
        cleanup_mounts_under(tmp_path)


def test_bad_node_options_stop_the_agent_with_one_line(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "flexvolume.agent", "--socket", str(tmp_path / "a.sock"),
                        "--state", str(tmp_path / "state"), "--node-option", "no-such-option=1"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "--node-option: unknown mount option 'no-such-option'" in p.stderr.strip().splitlines()[-1]
