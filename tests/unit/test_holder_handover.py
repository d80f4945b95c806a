"""The holder's bookkeeping of standbys across a hand-over (an in-place upgrade), without FUSE or processes.

A hand-over replaces the mount's standby with the new version's server. A standby the holder started just
before, still starting up when it was replaced, asks to stand by later: it must be refused, else the old
code would be the successor after the upgrade (seen in test_agent_takeover's upgrade test: the holder log
said 'replaced by pid N', then 'pid M stands by' for the replaced one).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gfuse import holder as hd


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[hd.Holder]:
    h = hd.Holder(str(tmp_path / "holder.sock"), idle_exit=0, standby=True, restart=True)
    try:
        yield h
    finally:
        h.sock.close()


def _conn() -> tuple[hd.Conn, socket.socket]:
    a, b = socket.socketpair()
    return hd.Conn(a), b


def test_a_standby_replaced_while_starting_is_refused_later(holder: hd.Holder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hd.os, "kill", lambda pid, sig: None)  # the 'servers' here are not processes
    mp = "/mnt/x"
    r, w = os.pipe()
    server, _s = _conn()
    server.fds.append(os.dup(r))
    assert holder._put(server, mp, {"op": "put", "pid": 100, "python": "/usr/bin/python3", "path": "/old"})["ok"]
    h = holder.held[mp]
    ready_r, ready_w = os.pipe()
    h.standby = hd.Successor(200, ready_r)  # started by the holder, not connected yet
    new, _n = _conn()
    reply, _fd = holder._take(new, mp, {"op": "take", "pid": 300, "wait": True, "handover": True,
                                        "python": "/usr/bin/python3", "path": "/new"})
    assert reply is hd.NO_REPLY and h.standby is not None and h.standby.pid == 300
    # the old server leaves; the new one serves, from the new code
    monkeypatch.setattr(hd, "_connection_ended", lambda fd: False)
    holder._server_died(h)
    assert h.pid == 300 and h.path == "/new"
    # the replaced standby finally connects and asks to stand by: refused, and it is not the standby
    late, _l = _conn()
    reply, fd = holder._take(late, mp, {"op": "take", "pid": 200, "wait": True, "python": "/usr/bin/python3",
                                        "path": "/old"})
    assert not reply["ok"] and "replaced" in reply["error"] and fd is None
    assert h.standby is None or h.standby.pid != 200
    assert h.path == "/new"
    for fd_ in (r, w, ready_w):
        os.close(fd_)
