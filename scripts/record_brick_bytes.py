#!/usr/bin/env python3
"""Record real RPC records from a live GlusterFS 10.3 brick into tests/data/ (run as root).

What it does, step by step:

1. Creates a throwaway 1-brick volume ``gfuserec<pid>`` (brick ``$(hostname):/var/tmp/gfuserec<pid>/b``)
   with ``features.cache-invalidation on`` and starts it. It also creates (never starts) a replica-3
   and a 2 x 3 volume only to copy their client volfiles (``<vol>.tcp-fuse.vol``, the untrusted one,
   which carries no username/password).
2. Talks to glusterd and the brick with gfuse's own client (``gfuse.mgmt.fetch_graph``,
   ``gfuse.xlators.client.BrickClient``) while every ``RpcConnection``'s socket stream is wrapped
   by a recorder: every byte sent and received is kept per connection, exactly as it crossed the
   socket. Afterwards the streams are cut into records with ``RecordReader``, calls are paired with
   replies by xid *per connection*, and the chosen records are written to ``tests/data/``.
3. Stops and deletes every volume it created and removes ``/var/tmp/gfuserec<pid>``, even on error.
   No other volume is touched.

Files written (each a complete RPC message, i.e. one record *without* its 4-byte record mark):
``<name>.reply.bin`` for replies, ``<name>.call.bin`` for calls (brick callbacks, and the WRITE request
our client sent, which the brick accepted), ``brick_stream.bin`` (every byte one brick connection
received, record marks included), ``volfile_*.vol`` texts and ``facts.json`` (what the script did:
written payload, names, gfids, ... so tests can assert real facts). Files of an earlier run are removed first.

The GETSPEC reply holds the *trusted* volfile (glusterd sends it to local clients) with the brick's
``username``/``password``: both are random uuids of a volume deleted right after recording, but they are
replaced anyway by same-length placeholders (``0000…``), so the record still decodes and op_ret still
equals the spec length.

Usage: ``sudo python3 scripts/record_brick_bytes.py [--out tests/data]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from gfuse import fops as F
from gfuse import handshake as hs
from gfuse import rpc, transport
from gfuse.iatt import ROOT_GFID
from gfuse.mgmt import Server, fetch_graph
from gfuse.cred import now_cred
from gfuse.xlators.client import BrickClient

# ------------------------------------------------------------------------- recording


class Recorder:
    """Everything every connection sent and received, and which label each call was made under."""

    def __init__(self) -> None:
        self.conns: list[RecordingStream] = []
        self.label = "?"


REC = Recorder()


class RecordingStream:
    """Wraps a trio SocketStream: same interface as far as RpcConnection uses it."""

    def __init__(self, inner: trio.SocketStream, name: str) -> None:
        self._inner = inner
        self.name = name
        self.sent = bytearray()
        self.received = bytearray()
        self.labels: dict[int, str] = {}  # xid -> label at the time the call was sent
        self._sent_reader = rpc.RecordReader()
        REC.conns.append(self)

    @property
    def socket(self):
        return self._inner.socket

    async def send_all(self, data: bytes) -> None:
        self.sent += data
        for record in self._sent_reader.feed(bytes(data)):
            msg = rpc.decode_message(record)
            if isinstance(msg, rpc.Call):
                self.labels[msg.xid] = REC.label
        await self._inner.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self._inner.receive_some(max_bytes)
        self.received += data
        return data

    async def aclose(self) -> None:
        await self._inner.aclose()


_orig_init = transport.RpcConnection.__init__


def _recording_init(self, stream, name, *args, **kwargs):
    _orig_init(self, RecordingStream(stream, name), name, *args, **kwargs)


transport.RpcConnection.__init__ = _recording_init  # type: ignore[method-assign]


def records(stream: bytes) -> list[bytes]:
    r = rpc.RecordReader()
    out = r.feed(stream)
    if r.pending:
        raise RuntimeError(f"{r.pending} bytes of an unfinished record at the end of a stream")
    return out


def collect() -> tuple[dict[str, list[tuple[rpc.Call, bytes]]], list[tuple[str, bytes, bytes]]]:
    """{label: [(call, reply record)]} and the callbacks [(connection name, call record, body)]."""
    by_label: dict[str, list[tuple[rpc.Call, bytes]]] = {}
    callbacks: list[tuple[str, bytes, bytes]] = []
    for conn in REC.conns:
        calls = {}
        for rec in records(bytes(conn.sent)):
            msg = rpc.decode_message(rec)
            assert isinstance(msg, rpc.Call)
            calls[msg.xid] = (msg, rec)
        for rec in records(bytes(conn.received)):
            msg = rpc.decode_message(rec)
            if isinstance(msg, rpc.Call):
                callbacks.append((conn.name, rec, msg.body))
                continue
            call, call_rec = calls[msg.xid]
            label = conn.labels.get(msg.xid, "?")
            by_label.setdefault(label, []).append((call, rec))
            by_label.setdefault(label + ".call", []).append((call, call_rec))
    return by_label, callbacks


# ------------------------------------------------------------------------- gluster CLI


def gluster(*args: str, check: bool = True) -> str:
    cmd = ["gluster", *args, "--mode=script"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout.strip()} {p.stderr.strip()}")
    return p.stdout


def delete_volume(name: str, started: bool) -> None:
    if started:
        gluster("volume", "stop", name, check=False)
    gluster("volume", "delete", name, check=False)


# ------------------------------------------------------------------------- the session

PAYLOAD = b"gfuse recorded payload: hello, brick\n" * 3  # 111 bytes: not a multiple of 4 on purpose
XATTR_NAME = "user.gfuse-rec"
XATTR_VALUE = b"recorded-value"
DIR_FILES = ("alpha", "beta", "gamma")


async def session(volume: str, facts: dict) -> None:
    REC.label = "getspec"
    srv, graph = await fetch_graph([Server("127.0.0.1")], volume)
    facts["shape"] = graph.shape()
    xl = graph.clients()[0]
    facts["remote_subvolume"] = xl.options["remote-subvolume"]
    facts["client_name"] = xl.name
    async with trio.open_nursery() as nursery:
        REC.label = "handshake"
        a = BrickClient(xl, srv, volfile_key=volume)
        await nursery.start(a.run)
        if not a.is_up:
            raise RuntimeError(f"brick not up: {a.last_error}")
        b = BrickClient(xl, srv, volfile_key=volume)
        await nursery.start(b.run)
        if not b.is_up:
            raise RuntimeError(f"second client not up: {b.last_error}")

        REC.label = "lookup_root"
        await a.lookup_root()
        REC.label = "lookup_enoent"
        try:
            await a.lookup(ROOT_GFID, "no-such-file")
        except OSError as e:
            facts["lookup_enoent_errno"] = e.errno

        gfid = uuid.uuid4().bytes
        facts["file_name"] = "hello.txt"
        facts["file_gfid"] = gfid.hex()
        REC.label = "create"
        r = await a.create(ROOT_GFID, "hello.txt", os.O_RDWR | os.O_CREAT, stat.S_IFREG | 0o644, gfid)
        fd = r.fd
        REC.label = "write"
        await a.write(fd, 0, PAYLOAD)
        facts["payload"] = PAYLOAD.decode()
        REC.label = "read"
        await a.read(fd, 0, 4096)
        REC.label = "setxattr"
        await a.setxattr(gfid, {XATTR_NAME: XATTR_VALUE})
        REC.label = "getxattr"
        await a.getxattr(gfid, XATTR_NAME)
        facts["xattr"] = [XATTR_NAME, XATTR_VALUE.decode()]
        REC.label = "statfs"
        await a.statfs()
        REC.label = "release"
        await a.release(fd)

        # a directory with three files, listed with READDIRP
        dgfid = uuid.uuid4().bytes
        facts["dir_name"], facts["dir_gfid"] = "d", dgfid.hex()
        REC.label = "mkdir"
        await a.mkdir(ROOT_GFID, "d", stat.S_IFDIR | 0o755, dgfid)
        REC.label = "setup"
        facts["dir_files"] = {}
        for name in DIR_FILES:
            g = uuid.uuid4().bytes
            facts["dir_files"][name] = g.hex()
            r = await a.create(dgfid, name, os.O_RDWR | os.O_CREAT, stat.S_IFREG | 0o600, g)
            await a.release(r.fd)
        REC.label = "opendir"
        dfd = (await a.opendir(dgfid)).fd
        REC.label = "readdirp"
        await a.readdirp(dfd)
        REC.label = "setup"
        await a.release(dfd)

        # an upcall: client a has touched hello.txt, client b appends to it -> a is told
        got_upcall = trio.Event()
        a.subscribe_callbacks(lambda proc, _d: got_upcall.set() if proc == F.Cbk.CACHE_INVALIDATION else None)
        REC.label = "setup"
        await a.lookup(ROOT_GFID, "hello.txt")
        rb = await b.open(gfid, os.O_RDWR)
        await b.write(rb.fd, len(PAYLOAD), b"more\n")
        await b.release(rb.fd)
        with trio.move_on_after(10):
            await got_upcall.wait()
        facts["got_cache_invalidation"] = got_upcall.is_set()

        # inodelk contention: a holds a lock, b blocks on it, the brick tells a (after ~5 s)
        got_contention = trio.Event()
        a.subscribe_callbacks(lambda proc, _d: got_contention.set() if proc == F.Cbk.INODELK_CONTENTION else None)
        domain = "gfuse-rec-domain"
        facts["inodelk_domain"] = domain
        # the brick refuses (EINVAL) inode locks whose credential lk_owner is all zeros
        cred_a = lambda: now_cred(F.Proc.INODELK, lk_owner=b"ownerAAA")  # noqa: E731
        cred_b = lambda: now_cred(F.Proc.INODELK, lk_owner=b"ownerBBB")  # noqa: E731
        await a.inodelk(gfid, domain, F.SETLK, F.Flock(type=F.WRLCK, owner=b"ownerAAA"), cred=cred_a())

        async def blocker() -> None:
            await b.inodelk(gfid, domain, F.SETLKW, F.Flock(type=F.WRLCK, owner=b"ownerBBB"), cred=cred_b())

        nursery.start_soon(blocker)
        with trio.move_on_after(15):
            await got_contention.wait()
        facts["got_inodelk_contention"] = got_contention.is_set()
        await a.inodelk(gfid, domain, F.SETLK, F.Flock(type=F.UNLCK, owner=b"ownerAAA"), cred=cred_a())
        await trio.sleep(0.5)
        await b.inodelk(gfid, domain, F.SETLK, F.Flock(type=F.UNLCK, owner=b"ownerBBB"), cred=cred_b())
        nursery.cancel_scope.cancel()


SAVE = {  # file name -> (label, expected prog, proc)
    "getspec.reply.bin": ("getspec", hs.HANDSHAKE_PROGRAM, hs.GETSPEC),
    "portbybrick.reply.bin": ("handshake", hs.PORTMAP_PROGRAM, hs.PORTBYBRICK),
    "dump.reply.bin": ("handshake", hs.DUMP_PROGRAM, hs.DUMP),
    "setvolume.reply.bin": ("handshake", hs.HANDSHAKE_PROGRAM, hs.SETVOLUME),
    "lookup_root.reply.bin": ("lookup_root", F.FOP_PROGRAM, F.Proc.LOOKUP),
    "lookup_enoent.reply.bin": ("lookup_enoent", F.FOP_PROGRAM, F.Proc.LOOKUP),
    "create.reply.bin": ("create", F.FOP_PROGRAM, F.Proc.CREATE),
    "write.call.bin": ("write.call", F.FOP_PROGRAM, F.Proc.WRITE),
    "write.reply.bin": ("write", F.FOP_PROGRAM, F.Proc.WRITE),
    "read.reply.bin": ("read", F.FOP_PROGRAM, F.Proc.READ),
    "getxattr.reply.bin": ("getxattr", F.FOP_PROGRAM, F.Proc.GETXATTR),
    "statfs.reply.bin": ("statfs", F.FOP_PROGRAM, F.Proc.STATFS),
    "mkdir.reply.bin": ("mkdir", F.FOP_PROGRAM, F.Proc.MKDIR),
    "opendir.reply.bin": ("opendir", F.FOP_PROGRAM, F.Proc.OPENDIR),
    "readdirp.reply.bin": ("readdirp", F.FOP_PROGRAM, F.Proc.READDIRP),
}


def scrub_getspec(record: bytes) -> bytes:
    """Same-length placeholders for the trusted volfile's username/password."""
    def blank(m: re.Match[bytes]) -> bytes:
        return m.group(1) + re.sub(rb"[0-9a-f]", b"0", m.group(2))
    out = re.sub(rb"(option (?:username|password) )(\S+)", blank, record)
    assert len(out) == len(record)
    return out


def save(out: Path, facts: dict) -> None:
    by_label, callbacks = collect()
    out.mkdir(parents=True, exist_ok=True)
    for fname, (label, prog, proc) in SAVE.items():
        matches = [rec for call, rec in by_label.get(label, []) if call.prog == prog and call.proc == proc]
        if not matches:
            raise RuntimeError(f"no record for {fname} (label {label})")
        rec = matches[0]
        if fname == "getspec.reply.bin":
            rec = scrub_getspec(rec)
        (out / fname).write_bytes(rec)
    kinds = {F.Cbk.CACHE_INVALIDATION: "cbk_cache_invalidation.call.bin",
             F.Cbk.INODELK_CONTENTION: "cbk_inodelk_contention.call.bin"}
    for _conn, rec, _body in callbacks:
        msg = rpc.decode_message(rec)
        assert isinstance(msg, rpc.Call)
        fname = kinds.pop(msg.proc, None) if msg.prog == F.CBK_PROGRAM else None
        if fname:
            (out / fname).write_bytes(rec)
    # the raw byte stream the first brick connection received, record marks included (how the bytes
    # really arrived; RecordReader tests feed it in arbitrary chunks)
    brick = next(c for c in REC.conns if not c.name.startswith("glusterd"))
    (out / "brick_stream.bin").write_bytes(bytes(brick.received))
    facts["files"] = sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".vol"))
    (out / "facts.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")


def copy_volfile(vol: str, dest: Path) -> None:
    text = Path(f"/var/lib/glusterd/vols/{vol}/{vol}.tcp-fuse.vol").read_text()
    if "password" in text or "username" in text:
        raise RuntimeError(f"{vol}.tcp-fuse.vol carries credentials; not copying it")
    dest.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "data"))
    args = ap.parse_args()
    out = Path(args.out)
    if os.geteuid() != 0:
        print("must run as root (gluster volume create)", file=sys.stderr)
        return 2
    name = f"gfuserec{os.getpid()}"
    base = Path(f"/var/tmp/{name}")
    host = socket.gethostname()
    made: list[tuple[str, bool]] = []
    facts: dict = {"volume": name, "glusterfs": gluster("--version").splitlines()[0].strip()}
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.bin"), *out.glob("*.vol"), out / "facts.json"]:
        old.unlink(missing_ok=True)
    try:
        base.mkdir(parents=True)
        gluster("volume", "create", name, f"{host}:{base}/b", "force")
        made.append((name, False))
        gluster("volume", "set", name, "features.cache-invalidation", "on")
        gluster("volume", "start", name)
        made[-1] = (name, True)

        for kind, bricks in (("replica3", [f"{host}:{base}/r{i}" for i in range(3)]),
                             ("distrep", [f"{host}:{base}/d{i}" for i in range(6)])):
            vol = f"{name}{kind}"
            gluster("volume", "create", vol, "replica", "3", *bricks, "force")
            made.append((vol, False))
            copy_volfile(vol, out / f"volfile_{kind}.vol")
        copy_volfile(name, out / "volfile_dist1.vol")
        facts["volfiles"] = {"replica3": f"{name}replica3", "distrep": f"{name}distrep", "dist1": name}

        trio.run(session, name, facts)
        save(out, facts)
    finally:
        for vol, started in reversed(made):
            delete_volume(vol, started)
        shutil.rmtree(base, ignore_errors=True)
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {len(facts['files'])} files to {out} ({total} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
