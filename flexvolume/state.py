"""The agent's mount table on disk: a msgpack file written atomically (temp file + fsync + rename).

Layout (msgpack map)::

    {"version": 1,
     "mounts": [{"source": "server:/vol[/sub]", "target": "/abs/path", "options": ["opt", …],
                 "readonly": bool, "pid": int | None, "since": float (unix time),
                 "context": {str: str}, "repairs": int}, …]}
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

DEFAULT_STATE = "/var/lib/gfuse/agent-state.msgpack"
STATE_VERSION = 1


class StateError(Exception):
    """The state file exists but cannot be used; the message says why and where."""


@dataclass
class MountRecord:
    source: str
    target: str
    options: list[str] = field(default_factory=list)
    readonly: bool = False
    pid: int | None = None
    since: float = field(default_factory=time.time)
    context: dict[str, str] = field(default_factory=dict)
    repairs: int = 0

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: Any) -> MountRecord:
        if not isinstance(d, dict):
            raise TypeError(f"a mount entry must be a map, not {type(d).__name__}")
        src, tgt = d.get("source"), d.get("target")
        if not isinstance(src, str) or not isinstance(tgt, str) or not tgt.startswith("/"):
            raise ValueError(f"mount entry without a valid source/target: {d!r:.200}")
        opts = d.get("options") or []
        if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
            raise ValueError(f"mount entry for {tgt}: options must be a list of strings")
        pid = d.get("pid")
        ctx = d.get("context") or {}
        return cls(
            source=src,
            target=tgt,
            options=list(opts),
            readonly=bool(d.get("readonly", False)),
            pid=pid if isinstance(pid, int) and pid > 0 else None,
            since=float(d.get("since") or time.time()),
            context={str(k): str(v) for k, v in ctx.items()} if isinstance(ctx, dict) else {},
            repairs=int(d.get("repairs") or 0),
        )


def load_state(path: str) -> dict[str, MountRecord]:
    """The mount table by target; an absent file is an empty table."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise StateError(f"cannot read state file {path}: {e.strerror}") from None
    try:
        obj = msgpack.unpackb(data, raw=False)
        if not isinstance(obj, dict):
            raise TypeError("not a map")
        if obj.get("version") != STATE_VERSION:
            raise ValueError(f"unknown version {obj.get('version')!r} (this agent reads {STATE_VERSION})")
        records = [MountRecord.from_wire(m) for m in obj.get("mounts") or []]
    except Exception as e:  # noqa: BLE001 - any decoding problem is the same problem for the admin
        raise StateError(f"state file {path} is corrupt: {e}") from None
    return {r.target: r for r in records}


def save_state(path: str, records: dict[str, MountRecord]) -> None:
    """Write the table atomically: a crash leaves either the old or the new file, never a torn one."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    body = msgpack.packb(
        {"version": STATE_VERSION, "mounts": [r.to_wire() for r in sorted(records.values(), key=lambda r: r.target)]},
        use_bin_type=True,
    )
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
