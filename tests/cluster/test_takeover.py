"""Restartable mounts (issue 12): a SIGKILLed gfuse server is a pause for a running container, never an error.

The "container" is made as kubelet + runc make one: its own mount namespace (``unshare --mount
--propagation private``) with its own bind of the volume directory, so a mount made on the host later is
invisible to it — it keeps the FUSE connection it was given, and only a takeover of that very connection
(gfuse/takeover.py, gfuse/holder.py) can serve it again. Real kernel, real FUSE, real bricks.

Each test has its own holder (``GFUSE_HOLDER_SOCKET``) and takeover records (``GFUSE_TAKEOVER_DIR``), so
it never touches another test's or the node's; the fixture unmounts and ends the holder and every process
it started (found by pid: the holder's list and the test's unique mount point), also when a test fails.
Skipped with the reason when the kernel has no FUSE_NOTIFY_RESEND (Linux < 6.9).

``GFUSE_TAKEOVER_KILLS`` (default 8) sets how many SIGKILLs the writer test deals (the issue asks 20).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gfuse import takeover
from gfuse.status import query_status
from testkit.records import check_records
from testkit import cluster as tc
from testkit.cluster import wait_until

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]

#: runs inside the container: appends a checksummed record every 10 ms to a file it holds open; any failed
#: syscall ends it with the error in its JSON summary (and exit status 1)
WRITER = textwrap.dedent("""
    import json, os, struct, sys, time, zlib
    path, seconds, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    res = {"records": 0, "error": None, "stalls": []}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            rec = struct.pack("<Q", i) + os.urandom(20)
            rec += struct.pack("<I", zlib.crc32(rec))
            t = time.monotonic()
            if os.write(fd, rec) != len(rec):
                raise OSError(5, "short write")
            dt = time.monotonic() - t
            if dt > 0.05:
                res["stalls"].append([round(t, 3), round(dt, 3)])
            i += 1
            res["records"] = i
            time.sleep(0.01)
        os.fsync(fd)
        os.close(fd)
    except OSError as e:
        res["error"] = f"record {res['records']}: {e}"
    with open(out, "w") as f:
        json.dump(res, f)
    sys.exit(1 if res["error"] else 0)
""")

#: runs inside the container: mkdir, exclusive create (+ write and read back), rename, unlink — each must
#: succeed although the server dies right after the bricks did it (GFUSE_TAKEOVER_CRASH_AFTER)
ENTRY_OPS = textwrap.dedent("""
    import json, os, sys
    d, out = sys.argv[1], sys.argv[2]
    res = {"done": [], "error": None}
    try:
        os.mkdir(f"{d}/dir")
        res["done"].append("mkdir")
        fd = os.open(f"{d}/dir/f", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"first")
        res["done"].append("create")
        os.rename(f"{d}/dir/f", f"{d}/dir/g")
        res["done"].append("rename")
        os.close(fd)
        with open(f"{d}/dir/g", "rb") as f:
            res["content"] = f.read().decode()
        os.unlink(f"{d}/dir/g")
        res["done"].append("unlink")
        res["left"] = os.listdir(f"{d}/dir")
    except OSError as e:
        res["error"] = f"after {res['done']}: {e}"
    with open(out, "w") as f:
        json.dump(res, f)
    sys.exit(1 if res["error"] else 0)
""")


#: runs inside the container: holds a POSIX write lock on a file across the server's death, then unlocks
LOCKER = textwrap.dedent("""
    import fcntl, os, sys, time
    path, marks = sys.argv[1], sys.argv[2]
    def wait(name):
        while not os.path.exists(f"{marks}/{name}"):
            time.sleep(0.02)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    open(f"{marks}/locked", "w").close()
    wait("unlock")
    os.write(fd, b"still mine")
    fcntl.lockf(fd, fcntl.LOCK_UN)
    open(f"{marks}/unlocked", "w").close()
    wait("exit")
    os.close(fd)
""")


class Node:
    """One test's restartable gfuse mount, its holder and its containers."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mnt = tmp / "mnt"
        self.mnt.mkdir()
        self.log = tmp / "mount.log"
        self.env = dict(os.environ, GFUSE_HOLDER_SOCKET=str(tmp / "holder.sock"),
                        GFUSE_HOLDER_LOG=str(tmp / "holder.log"),
                        GFUSE_TAKEOVER_DIR=f"/dev/shm/gfuse-test-{uuid.uuid4().hex[:12]}",
                        PYTHONPATH=str(REPO))
        self.pids: set[int] = set()
        self.containers: list[subprocess.Popen[bytes]] = []
        self.plain: list[Path] = []  # plain (not restartable) gfuse mounts: another client

    def holder(self, msg: dict[str, Any]) -> dict[str, Any]:
        old = os.environ.get("GFUSE_HOLDER_SOCKET")
        os.environ["GFUSE_HOLDER_SOCKET"] = self.env["GFUSE_HOLDER_SOCKET"]
        try:
            return takeover.holder_request(msg, timeout=5)[0]
        finally:
            if old is None:
                del os.environ["GFUSE_HOLDER_SOCKET"]
            else:
                os.environ["GFUSE_HOLDER_SOCKET"] = old

    def mounted(self) -> dict[str, Any]:
        """The holder's entry for our mount."""
        mounts = self.holder({"op": "list"})["mounts"]
        assert len(mounts) == 1, mounts
        m: dict[str, Any] = mounts[0]
        self.pids.update(p for p in (m["pid"], m["standby"]) if p)
        return m

    def mount(self, vol: tc.Volume, extra_env: dict[str, str] | None = None) -> None:
        env = dict(self.env, **(extra_env or {}))
        self.env = env
        p = subprocess.run([sys.executable, "-m", "gfuse.cli", "mount", vol.source, str(self.mnt), "-o",
                            f"restartable,log-file={self.log}"], env=env, capture_output=True, text=True,
                           timeout=90, cwd=REPO)
        assert p.returncode == 0, p.stderr
        assert tc.is_mounted(self.mnt)
        rec = next(Path(env["GFUSE_TAKEOVER_DIR"]).glob("*/init"))
        if not takeover.kernel_has_resend(rec.read_bytes()):
            pytest.skip(f"this kernel ({os.uname().release}) has no FUSE_NOTIFY_RESEND (Linux >= 6.9): requests "
                        "a dying server had read cannot be re-queued, so a takeover is not a pause")
        self.mounted()

    def plain_mount(self, vol: tc.Volume) -> Path:
        mp = self.tmp / f"plain{len(self.plain)}"
        mp.mkdir()
        self.plain.append(mp)
        p = subprocess.run([sys.executable, "-m", "gfuse.cli", "mount", vol.source, str(mp), "-o",
                            f"log-file={self.tmp / 'plain.log'}"], capture_output=True, text=True, timeout=90,
                           cwd=REPO)
        assert p.returncode == 0, p.stderr
        return mp

    def container(self, script: str, *args: str) -> subprocess.Popen[bytes]:
        """``script`` in a new mount namespace (private propagation) that sees the volume only through its
        own bind at /data (as kubelet binds a volume into a container)."""
        root = self.tmp / f"ctr{len(self.containers)}"
        (root / "data").mkdir(parents=True)
        (root / "run.py").write_text(script)
        sh = f'mount --bind "{self.mnt}" "{root}/data" && exec {sys.executable} "{root}/run.py" "$@"'
        p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", sh, "ctr",
                              *[a.replace("/data", str(root / "data")) for a in args]],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.containers.append(p)
        return p

    def serving_pid(self, timeout: float = 60) -> int:
        """The pid of the process serving the mount (once one does)."""
        def serving() -> int:
            m = self.mounted()
            return int(m["pid"]) if m["served"] and _alive(m["pid"]) else 0
        return wait_until(serving, timeout, "a process serving the mount")

    def cleanup(self) -> None:
        for p in self.containers:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        with contextlib.suppress(Exception):
            self.mounted()
        for mp in self.plain:
            if tc.is_mounted(mp):
                subprocess.run(["umount", "-l", str(mp)], timeout=30, check=False)
            self.pids.update(_pids_naming(str(mp)))
        if tc.is_mounted(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], timeout=30, check=False)
        with contextlib.suppress(Exception):
            self.holder({"op": "quit"})
        # every process of this test: the ones the holder named, and any left with our unique mount point
        self.pids.update(_pids_naming(str(self.mnt)) | _pids_naming(self.env["GFUSE_HOLDER_SOCKET"]))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in self.pids):
            time.sleep(0.1)
        for pid in self.pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.env["GFUSE_TAKEOVER_DIR"], ignore_errors=True)

    def logs(self) -> str:
        out = []
        for name in ("holder.log", "mount.log"):
            p = self.tmp / name
            if p.exists():
                out.append(f"--- {name} (tail)\n" + "\n".join(p.read_text(errors="replace").splitlines()[-60:]))
        return "\n".join(out)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _pids_naming(word: str) -> set[int]:
    found = set()
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if word.encode() in f.read():
                        found.add(int(d))
            except OSError:
                pass
    return found


@pytest.fixture
def node(tmp_path: Path, glusterd: tc.GlusterdProcess) -> Iterator[Node]:
    if not os.path.exists("/dev/fuse") or shutil.which("unshare") is None:
        pytest.skip("needs /dev/fuse and unshare")
    n = Node(tmp_path)
    try:
        yield n
    finally:
        n.cleanup()


def test_sigkilled_server_is_a_pause_for_a_container(make_volume: Any, node: Node) -> None:
    """A container appends a checksummed record every 10 ms to a file it holds open while the gfuse
    server of its volume is SIGKILLed at random moments (also while a successor is still taking over):
    no syscall fails, every record is there, through the mount and on every brick, in order."""
    kills = int(os.environ.get("GFUSE_TAKEOVER_KILLS", "5"))  # a soak: GFUSE_TAKEOVER_KILLS=100
    vol = make_volume("replica3")
    node.mount(vol)
    first = node.serving_pid()
    seconds = 4 + kills * 2.2
    writer = node.container(WRITER, "/data/log.bin", str(seconds), str(node.tmp / "writer.json"))
    rnd = random.Random()
    killed = []
    time.sleep(1.0)
    for _ in range(kills):
        pid = node.serving_pid()
        time.sleep(rnd.uniform(0.0, 2.0))  # a random moment of its life (it may still be taking over)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        wait_until(lambda pid=pid: not _alive(pid), 10, f"pid {pid} to die")
    try:
        out, _ = writer.communicate(timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        writer.kill()
        pytest.fail(f"the container's writer hung\n{node.logs()}")
    res = json.loads((node.tmp / "writer.json").read_text())
    assert writer.returncode == 0 and res["error"] is None, f"{res}\n{out.decode(errors='replace')}\n{node.logs()}"
    assert first in killed and len(set(killed)) == kills
    serving = node.serving_pid()
    assert serving not in killed
    m = node.mounted()
    assert len(m["handoffs"]) == kills, m  # each killed process had the fd; each time another took it
    st = query_status(str(node.mnt))
    assert st["pid"] == serving and st["restart"].startswith("takeover"), st
    n = res["records"]
    assert n > 0
    check_records((node.mnt / "log.bin").read_bytes(), n)
    for d in vol.brick_dirs:
        check_records((d / "log.bin").read_bytes(), n)
    stalls = sorted(s[1] for s in res["stalls"])
    print(f"{kills} SIGKILLs, {n} records, stalls > 50 ms: {len(stalls)}, longest {stalls[-1] if stalls else 0:.3f} s")


def test_entry_ops_resent_after_the_bricks_did_them(make_volume: Any, node: Node) -> None:
    """The server dies right after the bricks made a directory, created a file exclusively, renamed and
    unlinked it, before the kernel heard of it (GFUSE_TAKEOVER_CRASH_AFTER): the kernel re-sends each
    request to the successor, which recognises what the first attempt did and answers as it would have —
    no EEXIST for the mkdir and the exclusive create, no ENOENT for the rename and the unlink."""
    vol = make_volume("replica3")
    node.mount(vol, {"GFUSE_TAKEOVER_CRASH_AFTER": "MKDIR,CREATE,RENAME,UNLINK"})
    node.serving_pid()
    time.sleep(4)  # a standby may be ready, or not: both paths are a successor
    p = node.container(ENTRY_OPS, "/data", str(node.tmp / "ops.json"))
    try:
        out, _ = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"the container hung\n{node.logs()}")
    res = json.loads((node.tmp / "ops.json").read_text())
    assert p.returncode == 0 and res["error"] is None, f"{res}\n{out.decode(errors='replace')}\n{node.logs()}"
    assert res["done"] == ["mkdir", "create", "rename", "unlink"] and res["content"] == "first" and res["left"] == []
    markers = sorted(q.name for q in Path(node.env["GFUSE_TAKEOVER_DIR"]).glob("*/crashed-after-*"))
    assert markers == [f"crashed-after-{op}" for op in ("CREATE", "MKDIR", "RENAME", "UNLINK")]
    assert node.mounted()["restarts"] >= 4
    for d in vol.brick_dirs:
        assert (d / "dir").is_dir() and os.listdir(d / "dir") == []


def test_a_posix_lock_is_held_across_a_takeover(make_volume: Any, node: Node) -> None:
    """A container holds a POSIX write lock when its server is SIGKILLed: the successor takes the lock again
    before it answers anything, so another client still cannot get it; the container's unlock then frees it."""
    import errno
    import fcntl

    vol = make_volume("replica3")
    node.mount(vol)
    other = node.plain_mount(vol)
    marks = node.tmp / "marks"
    marks.mkdir()
    time.sleep(2)  # a standby, or not: both are successors
    c = node.container(LOCKER, "/data/locked.bin", str(marks))
    try:
        wait_until(lambda: (marks / "locked").exists() or c.poll() is not None, 60, "the container's lock")
        assert c.poll() is None, c.communicate()[0].decode(errors="replace")

        def try_lock() -> int:
            fd = os.open(other / "locked.bin", os.O_RDWR)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.lockf(fd, fcntl.LOCK_UN)
                return 0
            except OSError as e:
                return e.errno or -1
            finally:
                os.close(fd)

        assert try_lock() in (errno.EAGAIN, errno.EACCES), "another client got the container's lock"
        pid = node.serving_pid()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: node.serving_pid() != pid, 60, "a successor")
        # the mount answers again once the successor has restored everything (locks first)
        probe = subprocess.run(["stat", "-c", "%s", str(node.mnt / "locked.bin")], capture_output=True, text=True,
                               timeout=60)
        assert probe.returncode == 0, probe.stderr
        assert try_lock() in (errno.EAGAIN, errno.EACCES), f"the lock was lost in the takeover\n{node.logs()}"
        (marks / "unlock").touch()
        wait_until(lambda: (marks / "unlocked").exists() or c.poll() is not None, 60, "the container's unlock")
        assert c.poll() is None, c.communicate()[0].decode(errors="replace")
        assert try_lock() == 0, "the container's unlock did not free the lock"
        (marks / "exit").touch()
        out, _ = c.communicate(timeout=60)
        assert c.returncode == 0, out.decode(errors="replace")
        assert (node.mnt / "locked.bin").read_bytes() == b"still mine"
        for d in vol.brick_dirs:
            assert (d / "locked.bin").read_bytes() == b"still mine"
        assert "(1 locks)" in (node.tmp / "mount.log").read_text()
    finally:
        (marks / "unlock").touch()
        (marks / "exit").touch()
