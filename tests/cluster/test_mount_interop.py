"""A gfuse mount and a native ``mount -t glusterfs`` of the same volume see the same filesystem.

Trees of files, directories, symlinks, hard links, fifos and user xattrs are made through one
client and compared, attribute by attribute, through both; then the bricks are checked the way
gluster's self-heal would: one gfid per entry on every replica of its set (directories: on every
brick), no ``trusted.afr.*`` changelog left pending after a quiet write, ``heal info`` empty.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import cluster as tc

#: arbiter: a private volume (no shared one); its third brick keeps names and xattrs, never data
KINDS = ["replica3", "distrep", "arbiter"]


class Pair:
    def __init__(self, vol: tc.Volume) -> None:
        self.vol = vol
        self.native = tc.NativeMount(vol)
        self.gfuse = tc.GfuseMount(vol)

    def start(self) -> None:
        self.native.mount()
        self.gfuse.mount()

    def stop(self) -> None:
        self.gfuse.unmount()
        self.native.unmount()


@pytest.fixture(scope="module", params=KINDS)
def pair(request: pytest.FixtureRequest, glusterd: tc.GlusterdProcess) -> Iterator[Pair]:
    if tc.native_mount_unavailable_reason():
        pytest.skip(f"native glusterfs mount: {tc.native_mount_unavailable_reason()}")
    own = request.param == "arbiter"
    vol = tc.create_volume("arbiter") if own else request.getfixturevalue(f"vol_{request.param}")
    p = Pair(vol)
    try:
        p.start()
        yield p
    finally:
        p.stop()
        if own:
            vol.delete()


@pytest.fixture
def top(pair: Pair, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh top-level directory name for this test; removed (through the native mount) afterwards."""
    name = f"interop-{request.node.originalname[:40]}-{uuid.uuid4().hex[:8]}"
    yield name
    for base in (pair.native.path, pair.gfuse.path):
        p = base / name
        if os.path.lexists(p):
            shutil.rmtree(p)
            break


# ------------------------------------------------------------------------------------------
# snapshots


def snapshot(root: Path) -> dict[str, dict]:
    """Everything a user can see of the tree under ``root``, keyed by relative path."""
    out: dict[str, dict] = {}

    def visit(p: Path, rel: str) -> None:
        s = os.lstat(p)
        e: dict = {"mode": stat.S_IMODE(s.st_mode), "uid": s.st_uid, "gid": s.st_gid,
                   "mtime_ns": s.st_mtime_ns}
        if stat.S_ISDIR(s.st_mode):
            e["type"] = "dir"
            with os.scandir(p) as it:
                names = sorted(x.name for x in it)
            e["entries"] = names
        elif stat.S_ISLNK(s.st_mode):
            e["type"] = "symlink"
            e["target"] = os.readlink(p)
            e["size"] = s.st_size
            del e["mode"]  # 0777 on Linux, whatever the brick says
        else:
            e["type"] = "file" if stat.S_ISREG(s.st_mode) else stat.S_IFMT(s.st_mode)
            e["size"] = s.st_size
            e["nlink"] = s.st_nlink
            if stat.S_ISREG(s.st_mode):
                e["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
        if not stat.S_ISLNK(s.st_mode):
            e["xattrs"] = {n: os.getxattr(p, n) for n in sorted(os.listxattr(p)) if n.startswith("user.")}
        out[rel] = e
        if e["type"] == "dir":
            for n in e["entries"]:
                visit(p / n, f"{rel}/{n}" if rel else n)

    visit(root, "")
    return out


def build_tree(base: Path, tag: str) -> None:
    """The same tree whichever client makes it (``tag`` only goes into the contents)."""
    os.mkdir(base)
    os.chmod(base, 0o755)
    big = (tag.encode() * 60000)[:300_000]
    (base / "big.bin").write_bytes(big)
    os.chmod(base / "big.bin", 0o640)
    (base / "empty").write_bytes(b"")
    (base / "owned").write_bytes(b"owned by someone else\n")
    os.chown(base / "owned", 1000, 1000)
    os.chmod(base / "owned", 0o604)
    os.makedirs(base / "sub" / "deeper")
    os.chmod(base / "sub", 0o750)
    for i in range(12):  # enough names to land on both replica sets of a 2 x 3 volume
        (base / "sub" / f"f{i:02d}.txt").write_text(f"{tag} file {i}\n")
    (base / "sub" / "deeper" / "leaf").write_bytes(b"leaf")
    os.symlink("big.bin", base / "rel-link")
    os.symlink("sub/deeper/leaf", base / "deep-link")
    os.symlink("/nonexistent/target", base / "dangling")
    os.link(base / "big.bin", base / "hard-1")
    os.link(base / "big.bin", base / "sub" / "hard-2")
    os.mkfifo(base / "fifo", 0o600)
    os.setxattr(base / "big.bin", "user.origin", tag.encode())
    os.setxattr(base / "big.bin", "user.binary", b"\x00\x01\xfe\xff")
    os.setxattr(base / "sub", "user.kind", b"directory")
    os.setxattr(base / "empty", "user.empty", b"")
    os.utime(base / "sub" / "deeper" / "leaf", ns=(1_600_000_000_111_111_111, 1_600_000_000_222_222_222))


def check_tree_contents(snap: dict[str, dict], tag: str) -> None:
    """The snapshot holds what build_tree made (so two equal snapshots are not trivially equal)."""
    assert snap["big.bin"]["nlink"] == 3 and snap["big.bin"]["size"] == 300_000
    assert snap["big.bin"]["mode"] == 0o640
    assert snap["big.bin"]["xattrs"] == {"user.origin": tag.encode(), "user.binary": b"\x00\x01\xfe\xff"}
    assert snap["hard-1"]["sha256"] == snap["big.bin"]["sha256"] == snap["sub/hard-2"]["sha256"]
    assert snap["owned"]["uid"] == 1000 and snap["owned"]["mode"] == 0o604
    assert snap["sub"]["mode"] == 0o750 and snap["sub"]["xattrs"] == {"user.kind": b"directory"}
    assert snap["empty"]["xattrs"] == {"user.empty": b""} and snap["empty"]["size"] == 0
    assert snap["rel-link"]["target"] == "big.bin" and snap["dangling"]["target"] == "/nonexistent/target"
    assert snap["fifo"]["type"] == stat.S_IFIFO
    assert snap["sub/deeper/leaf"]["mtime_ns"] == 1_600_000_000_222_222_222
    assert snap[""]["entries"] == sorted(["big.bin", "empty", "owned", "sub", "rel-link", "deep-link", "dangling",
                                          "hard-1", "fifo"])
    assert len(snap["sub"]["entries"]) == 14


def diff(a: dict[str, dict], b: dict[str, dict], dir_times: bool = True) -> list[str]:
    """Differences between the gfuse (a) and native (b) snapshots.

    ``dir_times=False`` leaves directory mtimes out: on a distributed volume gfuse reports a
    directory's times from one subvolume instead of merging them (an xfail of its own:
    test_dht_placement.py::test_directory_times_merge_subvolumes).
    """
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            out.append(f"{k!r}: only through {'gfuse' if k in a else 'native'}")
            continue
        for f in sorted(set(a[k]) | set(b[k])):
            if f == "mtime_ns" and not dir_times and a[k].get("type") == "dir":
                continue
            if a[k].get(f) != b[k].get(f):
                out.append(f"{k!r} {f}: gfuse {a[k].get(f)!r} != native {b[k].get(f)!r}")
    return out


# ------------------------------------------------------------------------------------------
# brick checks


def _is_linkto(p: Path, s: os.stat_result) -> bool:
    if not (stat.S_ISREG(s.st_mode) and stat.S_IMODE(s.st_mode) == stat.S_ISVTX and s.st_size == 0):
        return False
    try:
        os.getxattr(p, "trusted.glusterfs.dht.linkto", follow_symlinks=False)
        return True
    except OSError:
        return False


def brick_report(vol: tc.Volume, top: str) -> tuple[list[str], list[str], dict[str, bytes]]:
    """(gfid problems, pending afr changelogs, gfid of every entry) for the tree ``top`` on the bricks."""
    nsets = len(vol.brick_dirs) // vol.replica
    rels: set[str] = set()
    for b in vol.brick_dirs:
        base = b / top
        if not base.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            for n in dirnames + filenames:
                rels.add(os.path.relpath(os.path.join(dirpath, n), b))
    rels.add(top)
    gfid_problems: list[str] = []
    pending: list[str] = []
    gfids: dict[str, bytes] = {}
    for rel in sorted(rels):
        per_brick: dict[int, tuple[bytes | None, bool, bool]] = {}
        for i, b in enumerate(vol.brick_dirs):
            p = b / rel
            try:
                s = os.lstat(p)
            except FileNotFoundError:
                continue
            try:
                g = os.getxattr(p, "trusted.gfid", follow_symlinks=False)
            except OSError:
                g = None
            per_brick[i] = (g, stat.S_ISDIR(s.st_mode), _is_linkto(p, s))
            for name in os.listxattr(p, follow_symlinks=False):
                if name.startswith("trusted.afr."):
                    v = os.getxattr(p, name, follow_symlinks=False)
                    if any(v):
                        pending.append(f"brick {i}: {rel}: {name}={v.hex()}")
        is_dir = any(x[1] for x in per_brick.values())
        want = range(len(vol.brick_dirs)) if is_dir else sorted(
            {j for i in per_brick for j in range(i // vol.replica * vol.replica, (i // vol.replica + 1) * vol.replica)})
        missing = [i for i in want if i not in per_brick]
        if missing:
            gfid_problems.append(f"{rel}: missing on bricks {missing} (present on {sorted(per_brick)})")
        distinct = {x[0] for x in per_brick.values()}
        if len(distinct) != 1 or None in distinct:
            gfids = [(i, x[0].hex() if x[0] else None) for i, x in sorted(per_brick.items())]
            gfid_problems.append(f"{rel}: gfids {gfids}")
        if not is_dir:
            data_sets = {i // vol.replica for i, x in per_brick.items() if not x[2]}
            if len(data_sets) != 1:
                gfid_problems.append(f"{rel}: data on replica sets {sorted(data_sets)} of {nsets}")
        g = next(iter(distinct))
        if g:
            gfids[rel] = g
    return gfid_problems, pending, gfids


def heal_info(vol: tc.Volume) -> tuple[int, list[str]]:
    out = tc.gluster("volume", "heal", vol.name, "info", timeout=60)
    counts = [int(x) for x in re.findall(r"Number of entries:\s*(\d+)", out)]
    assert len(counts) == len(vol.bricks), out
    entries = [ln.strip() for ln in out.splitlines()
               if ln.strip().startswith(("/", "<gfid:"))]
    return sum(counts), entries


def check_bricks(vol: tc.Volume, top: str, timeout: float = 20.0) -> None:
    """gfids agree; afr changelogs settle to zero (the native client delays its post-op ~1 s); heal info
    lists nothing of ours."""
    deadline = time.monotonic() + timeout
    while True:
        problems, pending, gfids = brick_report(vol, top)
        assert not problems, "\n".join(problems)
        if not pending:
            break
        assert time.monotonic() < deadline, "afr changelogs still pending:\n" + "\n".join(pending)
        time.sleep(0.5)
    if vol.kind == "arbiter":  # the arbiter brick (the last) holds the names, never the data
        arb = vol.brick_dirs[-1]
        full = [str(p.relative_to(arb)) for p in (arb / top).rglob("*")
                if p.is_file() and not p.is_symlink() and p.stat().st_size]
        assert not full, f"data on the arbiter brick: {full}"
    gfid_texts = {str(uuid.UUID(bytes=g)) for g in gfids.values()}
    while True:
        total, entries = heal_info(vol)
        ours = [e for e in entries if e.startswith(f"/{top}") or e[6:42] in gfid_texts]
        if total == 0:
            return
        if time.monotonic() >= deadline:
            assert not ours, f"heal info lists entries of this test: {ours}"
            pytest.fail(f"heal info still lists {total} entries (not of this test): {entries[:10]}")
        time.sleep(1.0)


# ------------------------------------------------------------------------------------------
# tests


def test_gfuse_writes_native_sees(pair: Pair, top: str) -> None:
    build_tree(pair.gfuse.path / top, "gfuse")
    via_gfuse = snapshot(pair.gfuse.path / top)
    check_tree_contents(via_gfuse, "gfuse")
    via_native = snapshot(pair.native.path / top)
    assert diff(via_gfuse, via_native, dir_times=pair.vol.kind != "distrep") == []
    check_bricks(pair.vol, top)
    # the native client's idea of the gfid is the brick's
    g = os.getxattr(pair.native.path / top / "big.bin", "glusterfs.gfid.string").rstrip(b"\0").decode()
    _, _, gfids = brick_report(pair.vol, top)
    assert uuid.UUID(g).bytes == gfids[f"{top}/big.bin"]


def test_native_writes_gfuse_sees(pair: Pair, top: str) -> None:
    build_tree(pair.native.path / top, "native")
    via_native = snapshot(pair.native.path / top)
    check_tree_contents(via_native, "native")
    via_gfuse = snapshot(pair.gfuse.path / top)
    assert diff(via_gfuse, via_native, dir_times=pair.vol.kind != "distrep") == []
    check_bricks(pair.vol, top)


def test_changes_cross_both_ways(pair: Pair, top: str) -> None:
    """Changes to existing entries: each client sees what the other did (after the 1 s attribute cache)."""
    g, n = pair.gfuse.path / top, pair.native.path / top
    build_tree(g, "gfuse")
    # native changes gfuse's entries
    with open(n / "big.bin", "r+b") as fh:
        fh.seek(100)
        fh.write(b"NATIVE")
    os.chmod(n / "sub", 0o700)
    os.setxattr(n / "empty", "user.empty", b"filled")
    os.removexattr(n / "big.bin", "user.binary")
    os.rename(n / "sub" / "f00.txt", n / "renamed.txt")
    os.unlink(n / "hard-1")
    os.symlink("renamed.txt", n / "new-link")
    time.sleep(1.2)  # gfuse's kernel attribute/entry cache (1 s by default)
    assert diff(snapshot(g), snapshot(n), dir_times=pair.vol.kind != "distrep") == []
    assert (g / "big.bin").read_bytes()[100:106] == b"NATIVE"
    assert os.stat(g / "big.bin").st_nlink == 2
    # gfuse changes them back the other way
    os.truncate(g / "big.bin", 1000)
    os.chmod(g / "renamed.txt", 0o600)
    os.setxattr(g / "sub", "user.kind", b"changed")
    os.rename(g / "renamed.txt", g / "sub" / "back.txt")
    os.unlink(g / "sub" / "deeper" / "leaf")
    os.rmdir(g / "sub" / "deeper")
    time.sleep(1.2)  # the native client's md-cache (1 s)
    assert diff(snapshot(g), snapshot(n), dir_times=pair.vol.kind != "distrep") == []
    assert os.stat(n / "big.bin").st_size == 1000
    assert os.getxattr(n / "sub", "user.kind") == b"changed"
    check_bricks(pair.vol, top)


def test_statvfs_matches_native(pair: Pair) -> None:
    a, b = os.statvfs(pair.gfuse.path), os.statvfs(pair.native.path)
    assert (a.f_bsize, a.f_frsize, a.f_blocks, a.f_files, a.f_namemax) == (
        b.f_bsize, b.f_frsize, b.f_blocks, b.f_files, b.f_namemax)
    assert a.f_bfree == pytest.approx(b.f_bfree, rel=0.01)
    assert a.f_ffree == pytest.approx(b.f_ffree, rel=0.01)


def test_truncate_past_the_brick_limit_fails_alike(pair: Pair, top: str) -> None:
    """pjdfstest truncate/12.t and ftruncate/12.t: a length past the bricks' maximum file size is EFBIG on
    both clients and changes nothing. On arbiter the arbiter brick takes any truncate (it keeps no data) while
    the data bricks refuse it: AFR answers the data bricks' errno, gfuse answered EIO."""
    errs = {}
    for who, base in (("gfuse", pair.gfuse.path), ("native", pair.native.path)):
        os.makedirs(base / top, exist_ok=True)
        f = base / top / f"big-{who}"
        f.write_bytes(b"12345")
        with pytest.raises(OSError) as exc:
            os.truncate(f, 999_999_999_999_999)
        with open(f, "r+b") as fh, pytest.raises(OSError) as fexc:
            os.ftruncate(fh.fileno(), 999_999_999_999_999)
        errs[who] = (exc.value.errno, fexc.value.errno, os.stat(f).st_size, f.read_bytes())
    assert errs["gfuse"] == errs["native"] == (errno.EFBIG, errno.EFBIG, 5, b"12345"), errs
