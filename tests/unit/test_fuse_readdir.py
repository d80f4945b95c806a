"""The FUSE bridge's readdir ids: one directory's names keep their ids across handles.

With FOPEN_CACHE_DIR the kernel keeps a listing with the ids (FUSE offsets) one handle gave, and when its
cache ends before the directory does it continues with a READDIR on a later handle from one of those ids.
The layer's offsets are per handle (distribute's cookies), so the bridge must resume from the name.
"""

from __future__ import annotations

import stat as st
from typing import Any

import pyfuse3
import pytest

from gfuse.cred import new_gfid
from gfuse.fops import DirEntry, Result
from gfuse.fuse import GlusterOperations, _DirHandle
from gfuse.iatt import Iatt

NAMES = [f"n{i}" for i in range(10)]


class Top:
    """readdirp with offsets private to each fd (fd * 1000 + position), as distribute's cookies."""

    def __init__(self) -> None:
        self.stats = {n: Iatt(gfid=new_gfid(), mode=st.S_IFREG | 0o644) for n in NAMES}

    async def readdirp(self, fd: int, offset: int, size: int) -> Result:
        if offset == 0:
            i = 0
        else:
            assert offset // 1000 == fd, f"fd {fd} was given another fd's offset {offset}"
            i = offset % 1000
        return Result(0, 0, entries=[DirEntry(0, fd * 1000 + j + 1, 8, NAMES[j], self.stats[NAMES[j]])
                                     for j in range(i, min(i + 4, len(NAMES)))])


async def test_a_listing_continues_on_another_handle_from_an_id_the_first_gave(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ops = GlusterOperations(Top())
    dg = new_gfid()
    ops.dirs[1] = _DirHandle(7, dg)
    ops.dirs[2] = _DirHandle(9, dg)
    got: list[tuple[str, int]] = []
    room = [3]

    def reply(token: Any, name: bytes, attrs: pyfuse3.EntryAttributes, nid: int) -> bool:
        if room[0] == 0:
            return False
        room[0] -= 1
        got.append((name.decode(), nid))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    await ops.readdir(1, 0, None)  # type: ignore[arg-type]
    assert [n for n, _ in got] == NAMES[:3]
    first = dict(got)
    got.clear()
    room[0] = 100
    await ops.readdir(2, first["n2"], None)  # type: ignore[arg-type]
    assert [n for n, _ in got] == NAMES[3:], "the second handle did not continue after n2"
    got.clear()
    room[0] = 100
    await ops.readdir(2, 0, None)  # type: ignore[arg-type]
    assert {n: i for n, i in got if n in first} == first, "a name got another id on another handle"
