"""The node agent's mounts outlive their server (issue 12), with containers made as kubelet + runc make them.

A "container" here is what kubelet and runc give a pod: its own mount namespace (``unshare --mount
--propagation private``) with its own bind of the volume directory, made after the volume is mounted, with
propagation None -- a mount made on the host later never reaches it. (tests/k8s/test_agent.py's pods are
slaves of the whole host tree: more permissive than kubelet.) Real agent process, real holder, real FUSE,
real bricks.

- Restartable (the agent's default where the kernel has FUSE_NOTIFY_RESEND): the gfuse server is SIGKILLed
  under a container appending checksummed records every 10 ms through one fd: no syscall fails, every
  record is there; the agent reports the mount ``restartable/held``. Also with a holder that starts no
  successor (the agent takes the connection over itself), across a SIGKILL of the agent, and through an
  in-place upgrade (a new agent from another copy of the code, another version, hands the mount over).
- Repair-only (``--restartable no``, what a kernel < 6.9 gets): what the container sees, exactly, and that
  the repair stacks a fresh mount over the dead one (nothing lands in the node's directory).

``GFUSE_AGENT_TAKEOVER_KILLS`` (default 3) sets how many SIGKILLs the first test deals. Every process a test
starts (containers, agent, holder, servers) is ended and every mount undone, also when it fails.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flexvolume.state import load_state
from gfuse.mounttable import mounts_at, pid_alive
from gfuse.status import query_status
from testkit.records import check_records
from testkit.kubelet import AgentProcess, cleanup_mounts_under, gfuse_serving_pids, source_env, wait_for

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("unshare") is None,
                       reason="needs /dev/fuse and unshare"),
    pytest.mark.timeout(300),
]

README = Path(__file__).resolve().parents[2] / "README.md"
#: what the README says a running container sees on a repair-only mount (asserted below, word for word)
REPAIR_ONLY_SEES = ("a container that was running when its volume's gfuse server died gets ENOTCONN (\"Transport "
                    "endpoint is not connected\") on every file it had open, on the volume directory itself and on "
                    "every new file it opens there, also after the agent's repair, until the pod is restarted (a "
                    "call in flight at the moment of the crash may get ECONNABORTED instead)")

#: in the container: a checksummed record every 10 ms through one O_APPEND fd until CTL/stop exists; any
#: failed syscall ends it, with the error in CTL/writer.json
WRITER = textwrap.dedent("""
    import json, os, struct, sys, time, zlib
    path, ctl = sys.argv[1], sys.argv[2]
    res = {"records": 0, "error": None, "stalls": []}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        i = 0
        while not os.path.exists(f"{ctl}/stop") and i < 100000:
            rec = struct.pack("<Q", i) + os.urandom(20)
            rec += struct.pack("<I", zlib.crc32(rec))
            t = time.monotonic()
            if os.write(fd, rec) != len(rec):
                raise OSError(5, "short write")
            dt = time.monotonic() - t
            if dt > 0.05:
                res["stalls"].append([round(t, 3), round(dt, 3)])  # when (CLOCK_MONOTONIC), how long
            i += 1
            res["records"] = i
            with open(f"{ctl}/count.tmp", "w") as f:
                f.write(str(i))
            os.replace(f"{ctl}/count.tmp", f"{ctl}/count")
            time.sleep(0.01)
        os.fsync(fd)
        os.close(fd)
    except OSError as e:
        res["error"] = f"record {res['records']}: {e}"
    with open(f"{ctl}/writer.json", "w") as f:
        json.dump(res, f)
""")

#: in the container: holds a file open, then (once CTL/probe-N exists) tries the old fd, the directory, a
#: new file, and writes what each gave to CTL/seen-N.json (errno names; "ok")
PROBER = textwrap.dedent("""
    import errno, json, os, sys, time
    d, ctl = sys.argv[1], sys.argv[2]
    fd = os.open(f"{d}/held.txt", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"before")
    open(f"{ctl}/ready", "w").close()
    def outcome(fn):
        try:
            fn()
            return "ok"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    n = 0
    while n < 2:
        if not os.path.exists(f"{ctl}/probe-{n}"):
            time.sleep(0.02)
            continue
        seen = {"write old fd": outcome(lambda: os.pwrite(fd, b"after", 0)),
                "read old fd": outcome(lambda: os.pread(fd, 5, 0)),
                "stat dir": outcome(lambda: os.stat(d)),
                "list dir": outcome(lambda: os.listdir(d)),
                "create new file": outcome(lambda: os.close(os.open(f"{d}/new-{n}", os.O_WRONLY | os.O_CREAT)))}
        with open(f"{ctl}/seen-{n}.json", "w") as f:
            json.dump(seen, f)
        n += 1
""")


class Setup:
    """One test's agent (own holder, own takeover records), its volume directory and its containers."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.takeover_dir = f"/dev/shm/gfuse-test-{uuid.uuid4().hex[:12]}"
        self.agent = AgentProcess(tmp / "agent", health_interval=1.0, probe_timeout=3.0, kubelet_dir=tmp)
        self.target = tmp / "pods" / "uid-1" / "volumes" / "gfuse.example.org~gfuse" / "data"
        self.containers: list[subprocess.Popen[bytes]] = []
        self.holder: subprocess.Popen[bytes] | None = None
        self._old_env = os.environ.get("GFUSE_TAKEOVER_DIR")
        os.environ["GFUSE_TAKEOVER_DIR"] = self.takeover_dir  # the agent (source_env) and what it starts

    def start_holder(self, *args: str) -> None:
        """A holder started before the agent (the agent finds it): e.g. --no-restart, so that only the agent
        takes a connection over."""
        with open(self.tmp / "holder.log", "ab") as log:
            self.holder = subprocess.Popen([sys.executable, "-m", "gfuse.holder", "--socket", self.agent.holder_socket,
                                            "--idle-exit", "0", *args], stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=log, start_new_session=True, env=source_env())
        from gfuse.takeover import holder_request

        wait_for(lambda: _answers(holder_request, self.agent.holder_socket), 20, "the holder to answer")

    def container(self, script: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        """``script`` in a new mount namespace (private propagation) that sees the volume only through its own
        bind at ROOT/data (a kubelet + runc container); "/data" in ``args`` is replaced by it. Its control
        directory (outside the volume)."""
        root = self.tmp / f"ctr{len(self.containers)}"
        (root / "data").mkdir(parents=True)
        ctl = root / "ctl"
        ctl.mkdir()
        (root / "run.py").write_text(script)
        sh = f'mount --bind "{self.target}" "{root}/data" && exec {sys.executable} "{root}/run.py" "$@"'
        p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", sh, "ctr",
                              *[a.replace("/data", str(root / "data")) for a in args], str(ctl)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.containers.append(p)
        return p, ctl

    def server_pid(self) -> int:
        (entry,) = self.agent.client().list()
        assert entry["pid"], entry
        return int(entry["pid"])

    def logs(self) -> str:
        out = []
        for p in (self.agent.log, self.agent.workdir / "holder.log", self.tmp / "holder.log"):
            if p.exists():
                out.append(f"--- {p.name} (tail)\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]))
        for log in Path("/var/log/gfuse").glob(f"{str(self.target).strip('/').replace('/', '-')}*.log"):
            out.append(f"--- {log.name} (tail)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(out)

    def close(self) -> None:
        for p in self.containers:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        try:
            if self.agent.alive():
                self.agent.close()
            else:
                self.agent.stop_holder()
        finally:
            cleanup_mounts_under(self.tmp)
            if self.holder is not None and self.holder.poll() is None:
                self.holder.kill()
                self.holder.wait(10)
            self.agent.stop_holder()
            shutil.rmtree(self.takeover_dir, ignore_errors=True)
            if self._old_env is None:
                os.environ.pop("GFUSE_TAKEOVER_DIR", None)
            else:
                os.environ["GFUSE_TAKEOVER_DIR"] = self._old_env


def _answers(request: Any, path: str) -> bool:
    try:
        return bool(request({"op": "list"}, timeout=2, path=path)[0].get("ok"))
    except Exception:  # noqa: BLE001 - not up yet
        return False


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.close()


def _restartable_or_skip(s: Setup) -> None:
    log = s.agent.log.read_text()
    if "new mounts are restartable" not in log:
        pytest.skip(f"this kernel ({os.uname().release}) has no FUSE_NOTIFY_RESEND (Linux >= 6.9): the agent makes "
                    "repair-only mounts")


def _count(ctl: Path) -> int:
    try:
        return int((ctl / "count").read_text() or 0)
    except (OSError, ValueError):
        return 0


def _writer_result(s: Setup, p: subprocess.Popen[bytes], ctl: Path) -> dict[str, Any]:
    (ctl / "stop").touch()
    try:
        out, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"the container's writer hung\n{s.logs()}")
    res: dict[str, Any] = json.loads((ctl / "writer.json").read_text())
    assert res["error"] is None, f"{res}\n{out.decode(errors='replace')}\n{s.logs()}"
    return res


def test_agent_mounts_are_restartable_a_killed_server_is_a_pause(setup: Setup, vol_replica3: Any) -> None:
    """The agent mounts restartable by default; its holder keeps the FUSE connection; SIGKILLs of the gfuse
    server are a pause for a propagation-None container writing through one fd, never an error; the agent
    never repairs (nothing stacked, no lazy unmount) and says the mount is restartable/held."""
    s = setup
    kills = int(os.environ.get("GFUSE_AGENT_TAKEOVER_KILLS", "3"))
    s.agent.start()
    _restartable_or_skip(s)
    c = s.agent.client(timeout=30)
    c.mount(vol_replica3.source, str(s.target))
    (entry,) = c.list()
    assert entry["mode"] == "restartable/held" and entry["restartable"] is True, entry
    assert load_state(str(s.agent.state))[str(s.target)].restartable is True
    st = query_status(str(s.target))
    assert st["mode"] == "restartable/held", st
    name = f"{s.tmp.name}.bin"
    writer, ctl = s.container(WRITER, f"/data/{name}")
    wait_for(lambda: _count(ctl) >= 20 or writer.poll() is not None, 30, "the container to write")
    killed = []
    for _ in range(kills):
        pid = wait_for(lambda: (e := c.list()[0])["healthy"] and e["pid"], 60, "a server serving the mount")
        time.sleep(2.5)  # its standby loaded (the holder starts one a second after a takeover)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        wait_for(lambda pid=pid: not pid_alive(pid), 10, f"pid {pid} to die")
        n = _count(ctl)
        wait_for(lambda n=n: _count(ctl) >= n + 20 or writer.poll() is not None, 60, "the writes to go on")
    res = _writer_result(s, writer, ctl)
    entry = wait_for(lambda: (e := c.list()[0])["healthy"] and e, 30, "the mount served")
    assert entry["pid"] not in killed and entry["mode"] == "restartable/held" and entry["repairs"] == 0, entry
    assert entry["takeovers"] >= kills and entry["pause"] is not None, entry
    assert len(mounts_at(str(s.target))) == 1  # the same mount: nothing stacked, nothing detached
    assert query_status(str(s.target))["pid"] == entry["pid"]
    check_records((s.target / name).read_bytes(), res["records"])
    for d in vol_replica3.brick_dirs:
        check_records((d / name).read_bytes(), res["records"])
    stalls = sorted(dt for _, dt in res["stalls"])
    print(f"\n{kills} SIGKILLs of the server under the agent: {res['records']} records, no failed syscall; stalls "
          f"> 50 ms: {stalls}")
    assert "repairing" not in s.agent.log.read_text()
    c.unmount(str(s.target))
    assert not mounts_at(str(s.target)) and gfuse_serving_pids(s.target) == []


def test_the_agent_takes_a_held_connection_over_itself(setup: Setup, vol_replica3: Any) -> None:
    """A holder that starts no successor (found running by the agent): when the server dies the agent sees the
    mount restarting (not dead: it never stacks or unmounts it) and, after its grace, runs the takeover
    itself; the container only waited."""
    s = setup
    s.start_holder("--no-restart")
    s.agent.start()
    _restartable_or_skip(s)
    c = s.agent.client(timeout=30)
    c.mount(vol_replica3.source, str(s.target))
    name = f"{s.tmp.name}.bin"
    writer, ctl = s.container(WRITER, f"/data/{name}")
    wait_for(lambda: _count(ctl) >= 20 or writer.poll() is not None, 30, "the container to write")
    old = s.server_pid()
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    seen = wait_for(lambda: [e for e in c.list() if e["state"] == "restarting"], 20, "the agent to see it restart")
    assert "its server died" in seen[0]["reason"] and seen[0]["mode"] == "restartable/held", seen
    n = _count(ctl)
    wait_for(lambda: _count(ctl) > n or writer.poll() is not None, 60, "the writes to go on")
    took = time.monotonic() - t0
    res = _writer_result(s, writer, ctl)
    wait_for(lambda: "took over" in s.agent.log.read_text(), 30, "the agent's takeover to end")
    (entry,) = c.list()
    assert entry["healthy"] and entry["pid"] not in (old, None) and entry["repairs"] == 0, entry
    assert len(mounts_at(str(s.target))) == 1
    check_records((s.target / name).read_bytes(), res["records"])
    print(f"\nthe agent took the connection over {took:.1f}s after the SIGKILL; longest stall "
          f"{max((dt for _, dt in res['stalls']), default=0):.2f}s, no failed syscall")


def test_the_holder_survives_the_agent_a_new_agent_takes_over(setup: Setup, vol_replica3: Any) -> None:
    """SIGKILL of the agent (its whole process group), then of the gfuse server, with no agent running: the
    holder the agent started is in a session of its own and lives on, keeps the connection and gives it to a
    successor; a new agent finds the holder and the mount in its state file and re-adopts it, held. The
    container's writer saw a pause."""
    s = setup
    s.agent.start()
    _restartable_or_skip(s)
    c = s.agent.client(timeout=30)
    c.mount(vol_replica3.source, str(s.target))
    from gfuse.takeover import holder_request

    assert holder_request({"op": "list"}, timeout=5, path=s.agent.holder_socket)[0]["mounts"], "not held"
    name = f"{s.tmp.name}.bin"
    writer, ctl = s.container(WRITER, f"/data/{name}")
    wait_for(lambda: _count(ctl) >= 20 or writer.poll() is not None, 30, "the container to write")
    old = s.server_pid()
    assert s.agent.kill(signal.SIGKILL) == -signal.SIGKILL
    holder = holder_request({"op": "list"}, timeout=5, path=s.agent.holder_socket)[0]
    assert pid_alive(holder["pid"]), "the holder died with the agent"
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old), 10, "the server to die")
    n = _count(ctl)
    wait_for(lambda: _count(ctl) > n + 20 or writer.poll() is not None, 90, "the writes to go on")
    s.agent.start()
    (entry,) = s.agent.client().list()
    assert entry["healthy"] and entry["pid"] not in (old, None) and entry["mode"] == "restartable/held", entry
    assert entry["takeovers"] >= 1 and entry["repairs"] == 0 and entry["restartable"] is True, entry
    now = holder_request({"op": "list"}, timeout=5, path=s.agent.holder_socket)[0]
    assert now["pid"] == holder["pid"] and now["mounts"][0]["pid"] == entry["pid"], now
    s.agent.wait_health_passes(2)
    n = _count(ctl)
    wait_for(lambda: _count(ctl) > n + 20 or writer.poll() is not None, 30, "the writes to go on")
    res = _writer_result(s, writer, ctl)
    assert s.agent.client().list()[0]["repairs"] == 0 and len(mounts_at(str(s.target))) == 1
    check_records((s.target / name).read_bytes(), res["records"])
    longest = max((dt for _, dt in res["stalls"]), default=0)
    print(f"\nagent and server SIGKILLed: longest stall {longest:.2f}s, no failed syscall")


def test_repair_only_stacks_over_the_dead_mount_what_a_running_container_sees(setup: Setup,
                                                                              vol_replica3: Any) -> None:
    """Repair-only (``--restartable no``, what a kernel without FUSE_NOTIFY_RESEND gets): the server's SIGKILL
    ends the FUSE connection. A container that got the volume with propagation None keeps the dead mount: its
    old fd, the directory and new files in it all fail with ENOTCONN, also after the agent's repair -- until
    the pod restarts (a new container gets the repaired mount). The repair stacks a fresh mount over the dead
    one: nothing written through the host path meanwhile lands in the node's directory. The README says so in
    these words (REPAIR_ONLY_SEES)."""
    assert REPAIR_ONLY_SEES in " ".join(README.read_text().split()), "README: what a repair-only pod sees"
    s = setup
    s.agent.extra_args = ("--restartable", "no")
    s.agent.start()
    c = s.agent.client(timeout=30)
    c.mount(vol_replica3.source, str(s.target))
    assert c.list()[0]["mode"] == "repair-only" and query_status(str(s.target))["mode"] == "repair-only"
    prober, ctl = s.container(PROBER, "/data")
    wait_for(lambda: (ctl / "ready").exists() or prober.poll() is not None, 30, "the container's open file")
    old = s.server_pid()

    gap_errors: set[str] = set()
    stop = threading.Event()

    def host_writer() -> None:  # a host process creating files in the volume dir through the repair
        i = 0
        while not stop.is_set():
            try:
                (s.target / f"gap-{i}").write_text("x")
            except OSError as e:
                gap_errors.add(errno.errorcode.get(e.errno or 0, str(e.errno)))
            i += 1
            time.sleep(0.01)

    t = threading.Thread(target=host_writer, daemon=True)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old), 10, "the server to die")
    t.start()
    try:
        time.sleep(1.5)  # past the attribute timeout (1 s): a stat within it is answered from the kernel's cache
        (ctl / "probe-0").touch()
        wait_for(lambda: (ctl / "seen-0.json").exists(), 30, "the container's first probe")
        entry = wait_for(lambda: [e for e in c.list() if e["healthy"] and e["repairs"] == 1], 60, "the repair")[0]
    finally:
        stop.set()
        t.join(10)
    assert entry["pid"] != old and entry["mode"] == "repair-only"
    assert len(mounts_at(str(s.target))) == 2, "the fresh mount stacked over the dead one"
    (ctl / "probe-1").touch()
    wait_for(lambda: (ctl / "seen-1.json").exists(), 30, "the container's second probe")
    dead = {k: "ENOTCONN" for k in ("write old fd", "read old fd", "stat dir", "list dir", "create new file")}
    for n in (0, 1):  # before and after the repair: the same, until the pod restarts
        assert json.loads((ctl / f"seen-{n}.json").read_text()) == dead, n
    # the host path: errors until the repair (ECONNABORTED: a create in flight when the server died), then the
    # stacked mount -- never the node's disk
    assert "ENOTCONN" in gap_errors and gap_errors <= {"ENOTCONN", "ECONNABORTED"}, gap_errors
    # a restarted pod (a new container) gets the repaired mount
    again, ctl2 = s.container(PROBER, "/data")
    wait_for(lambda: (ctl2 / "ready").exists() or again.poll() is not None, 30, "the new container's open file")
    (ctl2 / "probe-0").touch()
    wait_for(lambda: (ctl2 / "seen-0.json").exists(), 30, "the new container's probe")
    assert set(json.loads((ctl2 / "seen-0.json").read_text()).values()) == {"ok"}
    written = sorted(p.name for p in s.target.iterdir() if p.name.startswith("gap-"))
    c.unmount(str(s.target))  # both mounts of the stack
    assert not mounts_at(str(s.target))
    assert os.listdir(s.target) == [], "files landed in the node's directory under the mount"
    print(f"\nrepair-only: the container saw ENOTCONN everywhere; the host path {sorted(gap_errors)} then "
          f"{len(written)} files on the volume, none on the node")


def test_an_agent_of_another_version_upgrades_mounts_in_place(setup: Setup, vol_replica3: Any, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The DaemonSet's rolling update, on one host: a new agent from another copy of the code (the new image:
    another version string) hands the restartable mount over to its own gfuse at start -- the new process
    connects, the old one is asked to finish what it read and leave (SIGUSR2) -- under the container's writer:
    no failed syscall, ``gfuse status`` names the new version, and a successor after a later SIGKILL runs the
    new code too (the holder starts it from the code of the mount's last server)."""
    s = setup
    s.agent.start()
    _restartable_or_skip(s)
    c = s.agent.client(timeout=30)
    c.mount(vol_replica3.source, str(s.target))
    old_version = query_status(str(s.target))["version"]
    name = f"{s.tmp.name}.bin"
    writer, ctl = s.container(WRITER, f"/data/{name}")
    wait_for(lambda: _count(ctl) >= 20 or writer.poll() is not None, 30, "the container to write")
    old = s.server_pid()

    new = tmp_path / "new-image"  # the code of the new image: a copy, with another version
    repo = Path(__file__).resolve().parents[2]
    for pkg in ("gfuse", "flexvolume"):
        shutil.copytree(repo / pkg, new / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    new_version = f"{old_version}+upgrade-test"
    init = new / "gfuse" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{old_version}"', f'__version__ = "{new_version}"'))
    assert new_version in init.read_text()
    import testkit.kubelet

    monkeypatch.setattr(testkit.kubelet, "source_env", lambda env=None: dict(os.environ, PYTHONPATH=str(new)))
    assert s.agent.kill(signal.SIGTERM) == 0
    t0 = time.monotonic()
    s.agent.start()

    def upgraded() -> bool:
        try:
            return query_status(str(s.target))["version"] == new_version
        except (OSError, ValueError):
            return False

    wait_for(upgraded, 60, f"gfuse {new_version} to serve the mount\n{s.logs()}")
    took = time.monotonic() - t0
    n = _count(ctl)
    wait_for(lambda: _count(ctl) > n + 20 or writer.poll() is not None, 30, "the writes to go on")
    st = query_status(str(s.target))
    assert st["pid"] != old and st["mode"] == "restartable/held" and not pid_alive(old), st
    assert f"upgraded {s.target} in place: gfuse {old_version} -> {new_version}" in s.agent.log.read_text()
    cmdline = Path(f"/proc/{st['pid']}/environ").read_bytes()
    assert f"PYTHONPATH={new}".encode() in cmdline.split(b"\0")

    from gfuse.takeover import holder_request

    def standby() -> int:
        m = holder_request({"op": "list"}, timeout=5, path=s.agent.holder_socket)[0]["mounts"][0]
        return int(m["standby"])

    sb = wait_for(standby, 30, "the holder's standby (started from the new code)")
    sb_env = [v for v in Path(f"/proc/{sb}/environ").read_bytes().split(b"\0") if v.startswith(b"PYTHONPATH=")]
    # the new code first (the holder's own PYTHONPATH may follow it)
    assert len(sb_env) == 1 and sb_env[0][len("PYTHONPATH="):].split(b":")[0] == str(new).encode(), \
        (sb, sb_env, (s.agent.workdir / "holder.log").read_text(errors="replace")[-3000:])
    t_kill = time.monotonic()
    os.kill(st["pid"], signal.SIGKILL)  # a crash after the upgrade: the successor is of the new version too
    wait_for(lambda: not pid_alive(st["pid"]), 10, "the upgraded server to die")
    wait_for(lambda: upgraded() and query_status(str(s.target))["pid"] != st["pid"], 60, "a new-version successor")
    n = _count(ctl)
    wait_for(lambda: _count(ctl) > n + 20 or writer.poll() is not None, 30, "the writes to go on")
    res = _writer_result(s, writer, ctl)
    check_records((s.target / name).read_bytes(), res["records"])
    (entry,) = s.agent.client().list()
    assert entry["healthy"] and entry["mode"] == "restartable/held" and entry["repairs"] == 0, entry
    handover = [dt for t, dt in res["stalls"] if t < t_kill]
    after = [dt for t, dt in res["stalls"] if t >= t_kill]
    print(f"\nin-place upgrade {old_version} -> {new_version} {took:.1f}s after the new agent started: stalls > 50 ms "
          f"in the hand-over {handover}, at the SIGKILL after it {after}; no failed syscall")
