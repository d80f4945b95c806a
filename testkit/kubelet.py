"""Stand-ins for kubelet, pods and the agent process, for tests of the FlexVolume driver and the agent.

No kubelet or container runtime can run on the test machines, so this reproduces what matters to a
volume driver:

- :class:`KubeletDir` — a stand-in ``/var/lib/kubelet``: a directory bind-mounted on itself and made
  ``rshared`` (as kubelet's directory is on a systemd host), with pod volume paths shaped
  ``<root>/pods/<uid>/volumes/<vendor>~gfuse/<name>``;
- :class:`Pod` — a process in its own mount namespace whose mounts are slaves of the host's
  (``unshare --mount --propagation slave``), like a container that got the kubelet directory with
  ``rslave`` propagation; started *before* a volume is mounted, it only sees the mount through
  propagation;
- :func:`install_driver` / :func:`call_driver` — the driver installed as
  ``<plugin-dir>/<vendor>~gfuse/gfuse`` and executed as kubelet executes it (argv, JSON keys, a bare
  environment, stdout and stderr read together);
- :class:`AgentProcess` — ``gfuse-agent`` as a separate process that a test can SIGKILL.

Everything is bounded in time and cleans up after itself (mounts under the stand-in kubelet
directory, serving processes, agent processes, the rshared bind mount) even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from flexvolume.agentclient import AgentClient, AgentError
from gfuse.mounttable import mount_at, mounts_at, mounts_under, pid_alive, read_mounts

VENDOR = "gfuse.example.org"
DRIVER = "gfuse"
PLUGIN_DIR_NAME = f"{VENDOR}~{DRIVER}"  # kubelet escapes "gfuse.example.org/gfuse" to "gfuse.example.org~gfuse"


#: the checkout this module (and so the code under test) comes from
SOURCE_ROOT = str(Path(__file__).resolve().parent.parent)


def source_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) with this checkout first on PYTHONPATH, so that the agent, the driver and
    the ``gfuse mount`` they start run the code under test, whatever ``pip install -e`` points at."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SOURCE_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def _run(cmd: list[str], timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()}")
    return p


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate()`` until it returns something truthy; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def gfuse_serving_pids_under(root: str) -> list[int]:
    """gfuse serving processes (daemonized ``gfuse mount``) whose mount point is under ``root``."""
    prefix = root.rstrip("/") + "/"
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "--ready-fd" in argv and "mount" in argv:
            i = argv.index("mount")
            if i + 2 < len(argv) and (argv[i + 2] + "/").startswith(prefix):
                out.append(int(name))
    return out


def cleanup_mounts_under(root: str | Path) -> list[str]:
    """Kill gfuse serving processes for mounts below ``root`` and detach every mount below it
    (not ``root`` itself). Returns what was unmounted."""
    root = os.path.abspath(str(root))
    for pid in gfuse_serving_pids_under(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    done = []
    for _ in range(5):
        below = [m for m in mounts_under(root) if m.target != root]
        if not below:
            break
        for m in reversed(below):
            _run(["umount", "-c", "-l", m.target], timeout=20, check=False)
            done.append(m.target)
    return done


class KubeletDir:
    """A stand-in kubelet root directory, bind-mounted on itself and made rshared.

    Use as a context manager; on exit every mount below it is detached, gfuse serving processes
    for them are killed and the bind mount is undone.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(os.path.abspath(str(root)))
        self._bound = False

    def __enter__(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        _run(["mount", "--bind", str(self.root), str(self.root)])
        self._bound = True
        try:
            _run(["mount", "--make-rshared", str(self.root)])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        cleanup_mounts_under(self.root)
        if self._bound:
            for _ in range(3):
                if not mounts_at(str(self.root)):
                    break
                _run(["umount", "-c", "-l", str(self.root)], timeout=20, check=False)
            self._bound = False

    @property
    def propagation_shared(self) -> bool:
        """True if the bind mount is in a shared peer group (mountinfo optional field ``shared:N``)."""
        top = mount_at(str(self.root))
        return top is not None and any(p.startswith("shared:") for p in top.optional)

    def pod_volume_dir(self, pod_uid: str, name: str) -> Path:
        """Where kubelet mounts a FlexVolume of driver ``gfuse.example.org/gfuse`` for a pod."""
        return self.root / "pods" / pod_uid / "volumes" / PLUGIN_DIR_NAME / name


@dataclass
class PodInfo:
    """What kubelet knows about the pod a volume is mounted for."""

    name: str = "web-0"
    namespace: str = "default"
    uid: str = field(default_factory=lambda: "-".join(secrets.token_hex(n) for n in (4, 2, 2, 2, 6)))
    service_account: str = "default"


def kubelet_mount_options(
    volume: str | None,
    pod: PodInfo,
    *,
    pv_name: str = "pv-gfuse",
    readonly: bool = False,
    fs_type: str = "",
    fs_group: int | None = None,
    secrets_: dict[str, bytes] | None = None,
    pv_options: dict[str, str] | None = None,
) -> dict[str, str]:
    """The JSON object kubelet passes to ``mount`` (all values strings, kubelet's exact keys).

    ``volume`` goes into the PV's ``spec.flexVolume.options`` (None leaves it out); ``pv_options``
    adds other PV options ("readOnly", "backupServers", "mountOptions").
    """
    import base64

    opts = {
        "kubernetes.io/fsType": fs_type,
        "kubernetes.io/readwrite": "ro" if readonly else "rw",
        "kubernetes.io/pvOrVolumeName": pv_name,
        "kubernetes.io/pod.name": pod.name,
        "kubernetes.io/pod.namespace": pod.namespace,
        "kubernetes.io/pod.uid": pod.uid,
        "kubernetes.io/serviceAccount.name": pod.service_account,
    }
    for key, value in (secrets_ or {}).items():
        opts[f"kubernetes.io/secret/{key}"] = base64.b64encode(value).decode()
    if fs_group is not None:
        opts["kubernetes.io/mounterArgs.FsGroup"] = str(fs_group)
    if volume is not None:
        opts["volume"] = volume
    opts.update(pv_options or {})
    return opts


def install_driver(plugin_root: str | Path, agent_socket: str | Path) -> Path:
    """Install the driver as kubelet finds it: ``<plugin_root>/gfuse.example.org~gfuse/gfuse``, an executable.

    The installed file is a small shell script running ``flexvolume.driver`` of this checkout with this
    Python and pointing it at ``agent_socket`` (kubelet gives drivers no environment of their own).
    """
    d = Path(plugin_root) / PLUGIN_DIR_NAME
    d.mkdir(parents=True, exist_ok=True)
    exe = d / DRIVER
    tmp = d / f".{DRIVER}.tmp"
    tmp.write_text("#!/bin/sh\n"
                   f"GFUSE_AGENT_SOCKET={shlex.quote(str(agent_socket))} PYTHONPATH={shlex.quote(SOURCE_ROOT)} "
                   f"exec {shlex.quote(sys.executable)} -m flexvolume.driver \"$@\"\n")
    tmp.chmod(0o755)
    tmp.replace(exe)  # atomic, as the DaemonSet installs it
    return exe


@dataclass
class DriverResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    output: dict[str, Any] | None  # stdout parsed as one JSON object, None if it is not

    @property
    def status(self) -> str | None:
        return (self.output or {}).get("status")

    @property
    def message(self) -> str:
        return str((self.output or {}).get("message", ""))

    def __str__(self) -> str:
        return (f"{shlex.join(self.argv)} -> rc {self.returncode} in {self.seconds:.1f}s, stdout {self.stdout!r}, "
                f"stderr {self.stderr!r}")


def call_driver(exe: str | Path, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None
                ) -> DriverResult:
    """Execute the driver as kubelet does: ``exe cmd args…`` from ``/`` with a bare environment."""
    argv = [str(exe), *args]
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/",
                       env=env if env is not None else {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                                                                 "/sbin:/bin"}, check=False)
    out = None
    with contextlib.suppress(ValueError):
        parsed = json.loads(p.stdout)
        out = parsed if isinstance(parsed, dict) else None
    return DriverResult(argv, p.returncode, p.stdout, p.stderr, time.monotonic() - t0, out)


class Pod:
    """A "pod": ``sh -c SCRIPT`` in a new mount namespace with slave propagation.

    ``args`` become ``$1``, ``$2``, … of the script. :meth:`exec` runs a shell command inside the
    pod's mount namespace (``nsenter``). :meth:`stop` kills it; so does leaving a ``with`` block.
    """

    def __init__(self, script: str, *args: str, log: str | Path | None = None) -> None:
        self.script = script
        self.args = [str(a) for a in args]
        self.log = Path(log) if log else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        with open(self.log if self.log else os.devnull, "ab") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "slave", "sh", "-c", self.script, "pod", *self.args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, cwd="/")
        # return only once the script runs in its own namespace: a mount made now reaches it by propagation only
        mine = os.readlink("/proc/self/ns/mnt")

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the pod exited with status {self.proc.returncode}")
            try:
                return (os.readlink(f"/proc/{self.pid}/ns/mnt") != mine
                        and Path(f"/proc/{self.pid}/comm").read_text().strip() != "unshare")
            except OSError:
                return False

        wait_for(ready, 10, "the pod's mount namespace", interval=0.01)
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exec(self, command: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "sh", "-c", command], capture_output=True,
                              text=True, timeout=timeout, cwd="/", check=False)

    def mount_targets(self) -> list[str]:
        """Mount points in the pod's mount namespace."""
        return [m.target for m in read_mounts(f"/proc/{self.pid}/mountinfo")]

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


class AgentProcess:
    """``python -m flexvolume.agent`` as its own process (and process group), for tests that kill it."""

    def __init__(self, workdir: str | Path, *, health_interval: float = 1.0, probe_timeout: float = 3.0,
                 extra_args: tuple[str, ...] = (), kubelet_dir: str | Path | None = None) -> None:
        self.workdir = Path(workdir)
        #: the agent's --kubelet-dir: it mounts only below it (default: the directory holding ``workdir``)
        self.kubelet_dir = Path(kubelet_dir) if kubelet_dir is not None else self.workdir.parent
        # unix socket paths are limited to 108 bytes: keep it short, outside the test's tmp dir
        self.socket = f"/tmp/gfa-{secrets.token_hex(4)}.sock"
        #: this agent's own gfuse holder (restartable mounts), never the node's; ended by :meth:`close`
        self.holder_socket = self.socket.replace("/gfa-", "/gfh-")
        self.state = self.workdir / "agent-state.msgpack"
        self.log = self.workdir / "agent.log"
        self.health_interval = health_interval
        self.probe_timeout = probe_timeout
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.started: list[int] = []

    def command(self) -> list[str]:
        return [sys.executable, "-m", "flexvolume.agent", "--socket", self.socket, "--state", str(self.state),
                "--health-interval", str(self.health_interval), "--probe-timeout", str(self.probe_timeout),
                "--kubelet-dir", str(self.kubelet_dir), "--holder-socket", self.holder_socket,
                "--holder-log", str(self.workdir / "holder.log"), "--log-level", "DEBUG", *self.extra_args]

    def start(self, timeout: float = 30.0) -> AgentProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            log.write(f"---- starting agent at {time.strftime('%H:%M:%S')}\n".encode())
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, cwd="/", env=source_env())
        self.started.append(self.proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited with status {self.proc.returncode}: {self.log_tail()}")
            try:
                self.client(timeout=2).ping()
                return self
            except AgentError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"the agent did not answer ping within {timeout:g}s: "
                                       f"{self.log_tail()}") from None
                time.sleep(0.1)

    def client(self, timeout: float = 10.0) -> AgentClient:
        return AgentClient(self.socket, timeout=timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 15.0) -> int | None:
        """Signal the agent's whole process group (the agent and any ``gfuse mount`` it is running, not
        the serving processes, which live in sessions of their own) and wait for it."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=10)

    def wait_health_passes(self, n: int, timeout: float = 30.0) -> None:
        """Wait until the running agent has finished ``n`` more health passes."""
        c = self.client(timeout=5)
        start = c.ping()["health_passes"]
        wait_for(lambda: c.ping()["health_passes"] >= start + n, timeout, f"{n} agent health pass(es)")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def close(self, unmount: bool = True) -> None:
        """Unmount what the agent lists (bounded), stop it, remove its socket."""
        if unmount and self.alive():
            with contextlib.suppress(AgentError):
                c = self.client(timeout=10)
                for m in c.list():
                    with contextlib.suppress(AgentError):
                        c.unmount(m["target"], timeout=30)
        self.kill(signal.SIGTERM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        self.stop_holder()

    def stop_holder(self) -> None:
        """End this agent's holder, if one runs (it outlives the agent on purpose)."""
        from gfuse.takeover import holder_request

        with contextlib.suppress(Exception):
            holder_request({"op": "quit"}, timeout=5, path=self.holder_socket)


class Node:
    """A stand-in node: a kubelet directory (rshared), the driver installed in a plugin directory,
    a running agent, and the pods started through :meth:`pod`.

    On exit: pods are killed, the agent unmounts what it lists and stops, and whatever is left
    below the kubelet directory is detached (serving processes killed), then the bind mount undone.
    """

    def __init__(self, workdir: str | Path, *, health_interval: float = 1.0, probe_timeout: float = 3.0) -> None:
        self.workdir = Path(workdir)
        self.kubelet = KubeletDir(self.workdir / "kubelet")
        self.plugin_dir = self.workdir / "volume-plugins"
        self.agent = AgentProcess(self.workdir / "agent", health_interval=health_interval,
                                  probe_timeout=probe_timeout, kubelet_dir=self.kubelet.root)
        self.driver: Path | None = None
        self.pods: list[Pod] = []

    def __enter__(self) -> Self:
        self.kubelet.__enter__()
        try:
            self.agent.start()
            self.driver = install_driver(self.plugin_dir, self.agent.socket)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for pod in self.pods:
            pod.stop()
        try:
            self.agent.close()
        finally:
            self.kubelet.close()

    def pod(self, script: str, *args: str | Path) -> Pod:
        p = Pod(script, *[str(a) for a in args], log=self.workdir / f"pod-{len(self.pods)}.log")
        self.pods.append(p)
        return p.start()

    def call(self, *args: str, timeout: float = 120.0) -> DriverResult:
        assert self.driver is not None
        return call_driver(self.driver, *args, timeout=timeout)

    def mount(self, mount_dir: str | Path, options: dict[str, str], timeout: float = 120.0) -> DriverResult:
        """``<driver> mount <mount-dir> <json>``, as kubelet calls it."""
        return self.call("mount", str(mount_dir), json.dumps(options), timeout=timeout)

    def unmount(self, mount_dir: str | Path, timeout: float = 120.0) -> DriverResult:
        return self.call("unmount", str(mount_dir), timeout=timeout)


def gfuse_serving_pids(target: str | Path) -> list[int]:
    """Live gfuse serving processes for exactly ``target``."""
    from gfuse.mounttable import serving_pids

    return serving_pids(os.path.abspath(str(target)))


__all__ = [
    "AgentError",
    "AgentProcess",
    "DriverResult",
    "KubeletDir",
    "Node",
    "Pod",
    "PodInfo",
    "call_driver",
    "cleanup_mounts_under",
    "gfuse_serving_pids",
    "install_driver",
    "kubelet_mount_options",
    "pid_alive",
    "source_env",
    "wait_for",
]
