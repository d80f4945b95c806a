"""The kernel's readdir cache on a gfuse mount: kept while coherent, dropped by any other client's change.

With cache-invalidation on, gfuse answers OPENDIR with FOPEN_CACHE_DIR, so the kernel keeps each listing in
the directory's page cache and the next ``ls`` costs no READDIR; at every open it keeps that listing only if
md-cache vouches the directory did not change (upcalls, our own entry fops, and the bricks' mtime/ctime of the
directory asked at the open: a rename or hard link into it of an inode this client never touched is told by
no upcall). Observer: gfuse1; writers: gfuse2 and the native client. Without cache-invalidation nothing is
cached (gluster's 1 s semantics): every listing is a READDIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from testkit import cluster as tc

pytestmark = pytest.mark.timeout(600)

METADATA_CACHE = {"group": "metadata-cache"}
NO_INVALIDATION = {"group": "metadata-cache", "features.cache-invalidation": "off",
                   "performance.cache-invalidation": "off"}
#: md-cache's STAMP_SETTLE (a directory changed less than this ago cannot vouch for a listing), plus slack
SETTLE = 2.5


def _readdirs(mount: Path) -> int:
    """READDIR(PLUS) requests the gfuse mount answered so far (its status socket)."""
    out = subprocess.run([sys.executable, "-m", "gfuse.cli", "status", "--json", str(mount)], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    d = json.loads(out)
    m = d[0] if isinstance(d, list) else d
    return int(m["fuse"]["ops"].get("readdir", {}).get("requests", 0))


def _change(change: str, w: Path, elsewhere: Path) -> str | None:
    """Make ``change`` in directory ``w``; the name that must now be listed (None: f1 must be gone)."""
    if change == "create":
        (w / "new").write_bytes(b"")
        return "new"
    if change == "unlink":
        os.unlink(w / "f1")
        return None
    if change == "rename-within":
        os.rename(w / "f1", w / "g1")
        return "g1"
    if change == "rename-in":  # the observer never looked at elsewhere/x
        os.rename(elsewhere / "x", w / "x")
        return "x"
    if change == "link-in":
        os.link(elsewhere / "y", w / "y")
        return "y"
    raise AssertionError(change)


CHANGES = ("create", "unlink", "rename-within", "rename-in", "link-in")


def _setup(vol: tc.Volume, gfuse_mount: Callable[..., tc.NativeMount],
           native_mount: Callable[..., tc.NativeMount]) -> dict[str, Path]:
    return {"gfuse1": gfuse_mount(vol).path, "gfuse2": gfuse_mount(vol).path, "native": native_mount(vol).path}


# One kind (the suite's time budget, as in test_cache_coherence): 2 x 3 has distribute's merged listing over
# replicate; the readdir cache and md-cache's vouching are above both (tests/unit/test_xlator_mdcache.py has
# the rules over in-memory bricks).
def test_a_cached_listing_never_hides_another_clients_change(make_volume, gfuse_mount, native_mount) -> None:
    vol = make_volume("distrep", options=METADATA_CACHE)
    mounts = _setup(vol, gfuse_mount, native_mount)
    obs = mounts["gfuse1"]
    cases = [(c, w) for c in CHANGES for w in ("gfuse2", "native")]
    for i, (_, writer) in enumerate(cases):
        for sub in (f"d{i}", f"e{i}"):
            (mounts[writer] / sub).mkdir()
        for n in range(5):
            (mounts[writer] / f"d{i}" / f"f{n}").write_bytes(b"x")
        (mounts[writer] / f"e{i}" / "x").write_bytes(b"x")
        (mounts[writer] / f"e{i}" / "y").write_bytes(b"y")
    time.sleep(SETTLE)
    problems = []
    for i, (change, writer) in enumerate(cases):
        o = obs / f"d{i}"
        want = sorted(f"f{n}" for n in range(5))
        assert sorted(os.listdir(o)) == want
        before = _readdirs(obs)
        assert sorted(os.listdir(o)) == want
        if _readdirs(obs) != before:
            problems.append(f"{change} by {writer}: the second listing of an unchanged directory was a READDIR "
                            "(no kernel readdir cache)")
        name = _change(change, mounts[writer] / f"d{i}", mounts[writer] / f"e{i}")
        # no settle time: the check at the next open asks the bricks, whatever the upcalls do
        got = os.listdir(o)
        ok = ("f1" not in got and (name is None or name in got)) if change in ("unlink", "rename-within") \
            else name in got
        if not ok:
            problems.append(f"{change} by {writer}: gfuse1 listed {sorted(got)} right after it")
    time.sleep(SETTLE)  # and later (once for all the directories: each has its own case)
    for i, (change, writer) in enumerate(cases):
        again = os.listdir(obs / f"d{i}")
        if sorted(again) != sorted(os.listdir(mounts[writer] / f"d{i}")):
            problems.append(f"{change} by {writer}: gfuse1 lists {sorted(again)} {SETTLE} s later")
    assert not problems, "\n".join(problems)


def test_without_cache_invalidation_every_listing_is_read(make_volume, gfuse_mount, native_mount) -> None:
    vol = make_volume("replica3", options=NO_INVALIDATION)
    mounts = _setup(vol, gfuse_mount, native_mount)
    obs = mounts["gfuse1"]
    (mounts["native"] / "d").mkdir()
    (mounts["native"] / "d" / "f").write_bytes(b"x")
    time.sleep(SETTLE)
    os.listdir(obs / "d")
    before = _readdirs(obs)
    os.listdir(obs / "d")
    assert _readdirs(obs) > before, "a listing was cached without cache-invalidation"
    (mounts["gfuse2"] / "d" / "g").write_bytes(b"x")
    assert sorted(os.listdir(obs / "d")) == ["f", "g"]
