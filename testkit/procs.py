"""Processes of the test tooling: the one rule for "is the process that made this still running".

A record ``{"pid", "start", "boot_id"}`` names one process for good: a pid reused after the owner
died, or a reboot, does not make a dead owner look alive. A record with pid 0 means "kept on
purpose" (``--keep``): nobody owns it, and cleanup of dead runs leaves it alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gfuse import jsonfile


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3… of /proc/PID/stat (the command name may hold spaces and parentheses)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()


def state(pid: int) -> str | None:
    """One-letter state of ``pid`` (R, S, D, T, Z, …) or None if there is no such process."""
    f = _stat_fields(pid)
    return f[0] if f else None


def start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot; None if there is no such process or it is a zombie."""
    f = _stat_fields(pid)
    if not f or f[0] in ("Z", "X"):
        return None
    try:
        return int(f[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    """True if ``pid`` runs (exists and is not a zombie)."""
    return pid is not None and pid > 0 and start_time(pid) is not None


def record(pid: int) -> dict[str, Any]:
    """What names ``pid`` for good; pid 0 records "kept, no owner"."""
    if pid == 0:
        return {"pid": 0}
    return {"pid": pid, "start": start_time(pid), "boot_id": boot_id()}


def kept(rec: Mapping[str, Any] | None) -> bool:
    """True for a record of something kept on purpose (pid 0), which no cleanup of dead runs removes."""
    return rec is not None and rec.get("pid") == 0


def same_process(rec: Mapping[str, Any] | None) -> bool:
    """True if the process a :func:`record` names still runs. A missing record names nobody: False."""
    if not rec or not rec.get("pid"):
        return False
    if rec.get("boot_id") and rec["boot_id"] != boot_id():
        return False
    st = start_time(int(rec["pid"]))
    return st is not None and rec.get("start") in (None, st)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """A state record, written whole or not at all (the product's :mod:`gfuse.jsonfile`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    jsonfile.write_atomic(path, dict(data))


def read_json(path: Path) -> dict[str, Any] | None:
    """The record, or None when missing or unreadable (leftovers of a crashed run are not fatal)."""
    try:
        return jsonfile.read(path)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
