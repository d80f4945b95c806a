"""The host's mount table and gfuse serving processes, read from /proc without touching any mount.

Nothing here calls stat() on a mount point: on a mount whose FUSE server is dead or stuck that
would fail or hang. Mount points come from /proc/self/mountinfo, serving processes from
/proc/<pid>/cmdline (``gfuse mount`` re-executes itself as ``… gfuse.cli mount SOURCE DIR … --ready-fd N``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

GFUSE_FSTYPE = "fuse.gfuse"
_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo (proc(5)), fields unescaped."""
    mount_id: int
    parent_id: int
    target: str
    fstype: str
    source: str
    mount_options: frozenset[str]
    super_options: frozenset[str]
    #: ``major:minor`` of the filesystem (names its bdi under /sys/class/bdi)
    dev: str = ""
    #: the directory of the filesystem mounted here (a bind of a subdirectory shows it)
    root: str = "/"
    #: optional fields such as ``shared:N`` / ``master:N`` (mount propagation)
    optional: tuple[str, ...] = ()

    @property
    def readonly(self) -> bool:
        return "ro" in self.mount_options

    @property
    def is_gfuse(self) -> bool:
        return self.fstype == GFUSE_FSTYPE


def read_mounts(path: str = "/proc/self/mountinfo") -> list[MountEntry]:  # the one mount-table parser
    """Every mount of this process's mount namespace, in mountinfo order (parents before children)."""
    out = []
    with open(path) as f:
        for line in f:
            left, sep, right = line.rstrip("\n").partition(" - ")
            if not sep:
                continue
            a, b = left.split(), right.split()
            if len(a) < 6 or len(b) < 2:
                continue
            try:
                ids = int(a[0]), int(a[1])
            except ValueError:
                continue
            out.append(MountEntry(
                mount_id=ids[0],
                parent_id=ids[1],
                target=_unescape(a[4]),
                fstype=b[0],
                source=_unescape(b[1]),
                mount_options=frozenset(a[5].split(",")),
                super_options=frozenset(b[2].split(",")) if len(b) > 2 else frozenset(),
                dev=a[2],
                root=_unescape(a[3]),
                optional=tuple(a[6:]),
            ))
    return out


def mount_at(target: str, mounts: list[MountEntry] | None = None) -> MountEntry | None:
    """The topmost mount on ``target`` (normalised, not resolved), or None."""
    found = mounts_at(target, mounts)
    return found[-1] if found else None


def is_mounted(path: str) -> bool:
    """True if ``path`` (made absolute, not resolved) is a mount point in this namespace."""
    try:
        return bool(mounts_at(os.path.abspath(path)))
    except OSError:
        return False


def gfuse_mounts() -> list[MountEntry]:
    """Every gfuse mount of this mount namespace."""
    return [m for m in read_mounts() if m.is_gfuse]


def mounts_at(target: str, mounts: list[MountEntry] | None = None) -> list[MountEntry]:
    """The mounts stacked on ``target``, bottom first (the last one is what a path lookup sees)."""
    return [m for m in (read_mounts() if mounts is None else mounts) if m.target == target]


def mounts_under(root: str, mounts: list[MountEntry] | None = None) -> list[MountEntry]:
    """Mounts on ``root`` or below it, in mountinfo order."""
    root = root.rstrip("/") or "/"
    prefix = root + "/" if root != "/" else "/"
    return [m for m in (read_mounts() if mounts is None else mounts)
            if m.target == root or m.target.startswith(prefix)]


def same_source(a: str, b: str) -> bool:
    """``server:/vol/sub`` and ``server:/vol/sub/`` name the same thing."""
    def norm(s: str) -> str:
        s = s.strip()
        host, sep, path = s.partition(":/")
        return f"{host}:/{path.strip('/')}" if sep else s.rstrip("/")
    return norm(a) == norm(b)


def pid_alive(pid: int | None) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    if not pid or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _serves(argv: list[str], target: str) -> bool:
    if "--ready-fd" not in argv or "--standby" in argv or not any("gfuse" in a for a in argv):
        return False  # a standby (gfuse.holder) waits to take over a restartable mount: it serves nothing yet
    for i, a in enumerate(argv[:-2]):
        if a == "mount" and os.path.normpath(argv[i + 2]) == target:
            return True
    return False


def is_serving_process(pid: int | None, target: str) -> bool:
    """True if ``pid`` is alive and is the daemonized ``gfuse mount`` serving ``target``."""
    if not pid:
        return False
    return pid_alive(pid) and _serves(_cmdline(pid), target)


def serving_pids(target: str) -> list[int]:
    """Every live gfuse serving process for ``target`` (normally zero or one)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            pid = int(name)
            if pid != os.getpid() and _serves(_cmdline(pid), target) and pid_alive(pid):
                out.append(pid)
    return sorted(out)


def canonical_target(path: str) -> str:
    """Absolute, normalized, with symlinks in the parent resolved — without touching ``path`` itself
    (it may be a mount point whose server is dead)."""
    path = os.path.normpath(path)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path
