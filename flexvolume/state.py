"""The agent's mount table on disk: a msgpack file written atomically (temp file + fsync + rename).

Layout (msgpack map)::

    {"version": 1,
     "mounts": [{"source": "server:/vol[/sub]", "target": "/abs/path", "options": ["opt", …],
                 "readonly": bool, "pid": int | None, "since": float (unix time),
                 "context": {str: str}, "repairs": int, "restartable": bool,
                 "pool": "/pool/dir", "subdir": "sub"}, …],
     "pools": [{…the same fields, for the pool mounts…}, …]}

``restartable``: mounted with ``-o restartable`` (issue 12): the node's holder keeps a copy of its FUSE fd, and
the agent takes the connection over when its server dies instead of repairing it with a fresh mount. Absent
(a file of an older agent): False, the repair of before.

``pool``/``subdir`` (issue 13, :mod:`flexvolume.pools`): the mount is a bind of ``subdir`` of the agent's gfuse
mount of the whole pool volume at ``pool``; ``pools`` lists those pool mounts (their reference counts are the
entries naming them). Absent (an older agent's file): "" -- a mount of its own.
"""

from __future__ import annotations

import math
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
    restartable: bool = False
    #: a PV served by a pool mount: the pool's mount directory and the PV's subdirectory of it ("" otherwise)
    pool: str = ""
    subdir: str = ""

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: Any) -> MountRecord:
        """A record from its map; ValueError (saying what is wrong) for anything but the layout above."""
        if not isinstance(d, dict):
            raise ValueError(f"a mount entry must be a map, not {type(d).__name__}")
        src, tgt = d.get("source"), d.get("target")
        if not isinstance(src, str) or not src or not isinstance(tgt, str) or not tgt.startswith("/") \
                or "\0" in tgt or "\0" in src:
            raise ValueError(f"mount entry without a valid source/target: {_short(d)}")
        opts = d.get("options") or []
        if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
            raise ValueError(f"mount entry for {tgt}: options must be a list of strings")
        pid = d.get("pid")
        ctx = d.get("context") or {}
        since = d.get("since")
        repairs = d.get("repairs") or 0
        if since is not None and (isinstance(since, bool) or not isinstance(since, (int, float))
                                  or not math.isfinite(since)):
            raise ValueError(f"mount entry for {tgt}: since must be a time, not {_short(since)}")
        if isinstance(repairs, bool) or not isinstance(repairs, int) or repairs < 0:
            raise ValueError(f"mount entry for {tgt}: repairs must be a count, not {_short(repairs)}")
        if not isinstance(ctx, dict):
            raise ValueError(f"mount entry for {tgt}: context must be a map, not {_short(ctx)}")
        return cls(
            source=src,
            target=tgt,
            options=list(opts),
            readonly=d.get("readonly", False) is True,
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 1 << 31 else None,
            since=float(since) if since else time.time(),
            context={str(k): str(v) for k, v in ctx.items()},
            repairs=repairs,
            restartable=d.get("restartable", False) is True,
            pool=_path_or_empty(d.get("pool")),
            subdir=_str_or_empty(d.get("subdir")),
        )


def _str_or_empty(v: Any) -> str:
    return v if isinstance(v, str) and "\0" not in v else ""


def _path_or_empty(v: Any) -> str:
    return v if isinstance(v, str) and v.startswith("/") and "\0" not in v else ""


def _short(v: Any) -> str:
    return f"{v!r:.200}"


def load_state(path: str, dropped: list[str] | None = None,
               pools: dict[str, MountRecord] | None = None) -> dict[str, MountRecord]:
    """The mount table by target; an absent file is an empty table. ``pools`` (when given) gets the pool
    mounts by directory.

    A file that cannot be read as a whole (not msgpack, not this layout, another version) is a
    :class:`StateError`. A single record that is not valid is left out, and the others are kept: each
    one left out is described in ``dropped`` (when given) so the caller can say which.
    """
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
            raise ValueError(f"unknown version {_short(obj.get('version'))} (this agent reads {STATE_VERSION})")
        mounts = obj.get("mounts") or []
        if not isinstance(mounts, list):
            raise TypeError(f"'mounts' is not a list but {type(mounts).__name__}")
    except Exception as e:  # noqa: BLE001 - any decoding problem is the same problem for the admin
        raise StateError(f"state file {path} is corrupt: {e}") from None
    table = _records(mounts, "entry", dropped)
    pool_list = obj.get("pools") or []
    if pools is not None and isinstance(pool_list, list):
        pools.update(_records(pool_list, "pool entry", dropped))
    return table


def _records(entries: list[Any], what: str, dropped: list[str] | None) -> dict[str, MountRecord]:
    """The valid records of ``entries`` by target; each invalid one is said in ``dropped``."""
    table: dict[str, MountRecord] = {}
    for i, m in enumerate(entries):
        try:
            r = MountRecord.from_wire(m)
        except (ValueError, TypeError, OverflowError) as e:
            if dropped is not None:
                dropped.append(f"{what} {i}: {e}")
            continue
        table[r.target] = r
    return table


def save_state(path: str, records: dict[str, MountRecord], pools: dict[str, MountRecord] | None = None) -> None:
    """Write the table atomically: a crash leaves either the old or the new file, never a torn one."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    obj: dict[str, Any] = {"version": STATE_VERSION,
                           "mounts": [r.to_wire() for r in sorted(records.values(), key=lambda r: r.target)]}
    if pools:
        obj["pools"] = [r.to_wire() for r in sorted(pools.values(), key=lambda r: r.target)]
    body = msgpack.packb(obj, use_bin_type=True)
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
