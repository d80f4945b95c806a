"""The credential each brick call carries: caller ids, lock owner, and the ctime gluster's utime uses."""

from __future__ import annotations

import os
import time
import uuid

from . import fops as F
from . import rpc


def now_cred(proc: int | None = None, *, valid: int = 0, uid: int = 0, gid: int = 0, groups: tuple[int, ...] = (),
             pid: int | None = None, lk_owner: bytes = b"\0\0\0\0") -> rpc.Credential:
    """A credential stamped with the current time and the utime flags of ``proc``."""
    t = time.time_ns()
    return rpc.Credential(pid=os.getpid() if pid is None else pid, uid=uid, gid=gid, groups=groups,
                          lk_owner=lk_owner, flags=F.ctime_flags(proc, valid) if proc is not None else 0,
                          ctime_sec=t // 1_000_000_000, ctime_nsec=t % 1_000_000_000)


def new_gfid() -> bytes:
    """A fresh gfid for a new inode (random, as gluster's clients make them)."""
    return uuid.uuid4().bytes
