"""protocol/client: a session with one brick, as typed async fops.

The client owns its reconnect loop (:meth:`BrickClient.run`, started in a nursery):
portmap → connect → DUMP → SETVOLUME → *up*; on disconnect every waiting call fails
with ``ENOTCONN``, the brick is *down*, and the loop retries with backoff. fds handed
out by :meth:`open`/:meth:`create`/:meth:`opendir` are the client's own handles: after
a reconnect they are reopened by gfid on the new connection, as gluster's client does.
Upper layers subscribe to up/down events with :meth:`subscribe`.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

import trio

from .. import fops as F
from .. import handshake as hs
from .. import rpc
from ..dicts import Dict, encode_gfx, old_str
from ..cred import now_cred
from ..errors import leaf
from ..fops import Flock, Proc, Result
from ..iatt import NULL_GFID, ROOT_GFID, Iatt
from ..mgmt import MgmtError, Server, port_by_brick
from ..tls import DEFAULT as DEFAULT_TLS, TlsConfig
from ..transport import RpcConnection, not_connected
from ..volfile import Xlator
from ..xdr import Packer
from .api import BrickEvents, Fops
from .handles import Handles

log = logging.getLogger(__name__)

_instance = itertools.count(1)


class BrickError(Exception):
    """The brick refused the session (authentication, unknown brick); meant for a user."""

    def __init__(self, message: str, errno_: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno_


@dataclass
class _Fd:
    gfid: bytes
    flags: int
    is_dir: bool
    remote: int | None  # None: lost and could not be reopened
    generation: int


class BrickClient(BrickEvents, Fops):
    """One brick of a volume; implements the fop interface of the translator graph."""

    def __init__(self, xl: Xlator, mgmt: Server | None = None, *, volfile_key: str = "",
                 process_name: str = "gfuse", ping_timeout: float | None = None,
                 backoff: tuple[float, float] = (0.2, 5.0), tls: TlsConfig | None = None) -> None:
        self.name = xl.name
        self.options = dict(xl.options)
        self.host = xl.options.get("remote-host", "")
        self.brick_path = xl.options.get("remote-subvolume", "")
        if not self.host or not self.brick_path:
            raise BrickError(f"{xl.name}: volfile lacks remote-host/remote-subvolume", errno.EINVAL)
        self.mgmt = Server(self.host, mgmt.port if mgmt else hs.GLUSTERD_PORT)
        self.volfile_key = volfile_key
        self.process_name = process_name
        opt_timeout = xl.options.get("ping-timeout")
        self.ping_timeout = ping_timeout if ping_timeout is not None else float(opt_timeout or 42)
        self.backoff = backoff
        self.port: int | None = int(xl.options["remote-port"]) if xl.options.get("remote-port") else None
        #: the node's TLS choices (glusterd's TLS for the portmap call) and, from the volfile, this brick's
        self.tls_config = tls or DEFAULT_TLS
        self.tls = self.tls_config.brick(self.options, volfile_key)
        self.conn: RpcConnection | None = None
        BrickEvents.__init__(self)
        self.last_error: str = "not connected yet"
        self.handshake_rtt: float | None = None
        self.generation = 0
        self._instance = next(_instance)
        self._fds: Handles[_Fd] = Handles(self.name)
        self.first_attempt_done = trio.Event()
        #: lock owner for lock fops sent without a credential (bricks refuse a null owner)
        self.lk_owner = os.urandom(8)

    def __repr__(self) -> str:
        return f"<BrickClient {self.name} {self.host}:{self.brick_path} {'up' if self.is_up else 'down'}>"

    # ---------------------------------------------------------------- events

    def _label(self) -> str:
        return f"{self.name} ({self.host}:{self.brick_path})"

    def _on_callback(self, call: rpc.Call) -> None:
        if call.prog != F.CBK_PROGRAM:
            log.debug("%s: callback for unknown program %d", self.name, call.prog)
            return
        try:
            decoded = F.decode_callback(call.proc, call.body)
        except Exception as e:  # noqa: BLE001 - a malformed callback is logged, never fatal
            log.warning("%s: undecodable callback %d: %s", self.name, call.proc, e)
            return
        if call.proc == F.Cbk.CHILD_DOWN:
            log.warning("%s: brick reports its child down", self.name)
        self._deliver(call.proc, decoded)

    # ---------------------------------------------------------------- session

    async def wait_up(self, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            await self.up.wait()
        return self.is_up

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and stay connected until cancelled. ``started()`` after the first attempt."""
        delay = self.backoff[0]
        started = False
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    conn = await self._connect(nursery)
                    self.conn = conn
                    self.generation += 1
                    await self._reopen_fds(conn)
                    self._emit(True, "")
                    if not started:
                        started = True
                        self.first_attempt_done.set()
                        task_status.started()
                    delay = self.backoff[0]
                    await conn.closed.wait()
                    self.last_error = conn.close_reason
                    self._emit(False, conn.close_reason)
                    nursery.cancel_scope.cancel()
            except Exception as exc:  # nursery-wrapped connect/handshake failures (others re-raised)
                e = leaf(exc)
                if not isinstance(e, (OSError, MgmtError, BrickError, rpc.RPCError, trio.TooSlowError)):
                    raise
                self.last_error = str(e)
                self._emit(False, str(e))
                log.debug("%s: connect failed: %s", self.name, e)
            finally:
                if self.conn is not None and not self.conn.closed.is_set():
                    self.conn._fail("client shutting down")
            if not started:
                started = True
                self.first_attempt_done.set()
                task_status.started()
            await trio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def _connect(self, nursery: trio.Nursery) -> RpcConnection:
        port = self.port or await port_by_brick(self.mgmt, self.brick_path, tls=self.tls_config)
        conn = await RpcConnection.connect(nursery, self.host, port, name=f"{self.name}@{self.host}:{port}",
                                           on_callback=self._on_callback, ping_timeout=self.ping_timeout,
                                           tls=self.tls)
        try:
            with trio.fail_after(max(self.ping_timeout, 5.0)):
                t0 = time.perf_counter()
                progs = hs.dump_rsp(await conn.call(hs.DUMP_PROGRAM, hs.DUMP_VERSION, hs.DUMP, hs.dump_req()))
                if not any(p == F.FOP_PROGRAM and v == F.FOP_VERSION for _, p, v in progs):
                    raise BrickError(f"{self.name}: brick does not offer GlusterFS fops v4 (has {progs})",
                                     errno.EPROTONOSUPPORT)
                body = await conn.call(hs.HANDSHAKE_PROGRAM, hs.HANDSHAKE_VERSION, hs.SETVOLUME,
                                       hs.setvolume_req(self._setvolume_options()),
                                       cred_flavor=rpc.AUTH_GLUSTERFS_V3, cred_body=now_cred().encode_v3())
                ret, err, reply = hs.setvolume_rsp(body)
                self.handshake_rtt = time.perf_counter() - t0
        except trio.TooSlowError:
            await conn.aclose("handshake timed out")
            raise OSError(errno.ETIMEDOUT, f"{self.name}: handshake timed out") from None
        except BaseException:
            await conn.aclose("handshake failed")
            raise
        if ret < 0:
            msg = old_str(reply.get("ERROR", b"")) or os.strerror(err)
            await conn.aclose("SETVOLUME refused")
            if err == errno.EACCES or "auth" in msg.lower():
                hint = f" ({self.tls.auth_hint()})" if self.tls is not None else ""
                raise BrickError(f"{self.name}: authentication refused by brick {self.host}:{self.brick_path}: "
                                 f"{msg}{hint}", errno.EACCES)
            raise BrickError(f"{self.name}: brick {self.host}:{self.brick_path} refused the session: {msg}", err)
        self.port = self.port if self.options.get("remote-port") else None  # re-ask portmap after a restart
        self.setvolume_reply = {k: v for k, v in reply.items()}
        return conn

    def _setvolume_options(self) -> dict[str, str | bytes]:
        opts: dict[str, str | bytes] = dict(self.options)
        opts.update({
            "process-uuid": f"{socket.gethostname()}-{os.getpid()}-{self._instance}-{self.name}-{uuid.uuid4()}",
            "fops-version": str(F.FOP_PROGRAM),
            "opversion": "100000",
            "clnt-lk-version": "1",
            "volfile-key": self.volfile_key,
            "volfile-checksum": "0",
            "client-version": "10.3",
            "process-name": self.process_name,
            "remote-subvolume": self.brick_path,
        })
        return opts

    async def _reopen_fds(self, conn: RpcConnection) -> None:
        """After a reconnect the brick has forgotten our fds: open them again by gfid."""
        for handle, fd in list(self._fds.items()):
            if fd.generation == self.generation:
                continue
            try:
                if fd.is_dir:
                    r = await self._call_on(conn, Proc.OPENDIR, F.opendir_req(fd.gfid), None)
                else:
                    flags = fd.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
                    r = await self._call_on(conn, Proc.OPEN, F.open_req(fd.gfid, flags), None)
                fd.remote, fd.generation = r.fd, self.generation
            except OSError as e:
                log.warning("%s: could not reopen fd %d (%s): %s", self.name, handle, fd.gfid.hex(), e)
                fd.remote, fd.generation = None, self.generation

    # ---------------------------------------------------------------- calls

    async def _call_on(self, conn: RpcConnection, proc: Proc, body: bytes, cred: rpc.Credential | None,
                       valid: int = 0) -> Result:
        c = cred if cred is not None else now_cred(proc, valid=valid)
        try:
            raw = await conn.call(F.FOP_PROGRAM, F.FOP_VERSION, proc, body,
                                  cred_flavor=rpc.AUTH_GLUSTERFS_V3, cred_body=c.encode_v3())
        except rpc.RPCError as e:
            raise OSError(errno.EPROTO, f"{self.name}: {proc.name} {e}") from e
        r = F.DECODERS[proc](raw)
        if r.ret < 0:
            err = r.errno or errno.EIO
            raise OSError(err, f"{os.strerror(err)} ({self.name} {proc.name})")
        return r

    async def call(self, proc: Proc, body: bytes, cred: rpc.Credential | None = None, valid: int = 0) -> Result:
        """One fop on the current connection. ``OSError`` with the brick's errno on failure."""
        conn = self.conn
        if conn is None or not self.is_up or conn.closed.is_set():
            raise not_connected(f"{self.name} ({self.last_error})")
        return await self._call_on(conn, proc, body, cred, valid)

    def _lock_cred(self, cred: rpc.Credential | None) -> rpc.Credential:
        return cred if cred is not None else now_cred(lk_owner=self.lk_owner)

    def _remote_fd(self, handle: int) -> tuple[bytes, int]:
        fd = self._fds.get(handle)
        if fd.remote is None or fd.generation != self.generation:
            raise OSError(errno.EBADFD, f"{self.name}: fd {handle} was lost when the brick restarted")
        return fd.gfid, fd.remote

    def _new_fd(self, r: Result, gfid: bytes, flags: int, is_dir: bool) -> Result:
        """Replace the brick's fd in ``r`` by a handle of ours (valid across reconnects)."""
        assert r.fd is not None
        return self._fds.adopt(r, _Fd(gfid, flags, is_dir, r.fd, self.generation))

    # ---------------------------------------------------------------- fops: inode

    async def lookup(self, pargfid: bytes, name: str, xdata: Dict | None = None, *, gfid: bytes = NULL_GFID,
                     cred: rpc.Credential | None = None) -> Result:
        """Named lookup (``pargfid``+``name``), or nameless (``gfid`` only, pargfid NULL)."""
        return await self.call(Proc.LOOKUP, F.lookup_req(gfid, pargfid, name, 0, xdata), cred)

    async def lookup_gfid(self, gfid: bytes, xdata: Dict | None = None, cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.LOOKUP, F.lookup_req(gfid, NULL_GFID, "", 0, xdata), cred)

    async def lookup_root(self, xdata: Dict | None = None) -> Result:
        return await self.lookup_gfid(ROOT_GFID, xdata)

    async def stat(self, gfid: bytes, xdata: Dict | None = None, cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.STAT, F.stat_req(gfid, xdata), cred)

    async def readlink(self, gfid: bytes, size: int = 4096, cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.READLINK, F.readlink_req(gfid, size), cred)

    async def mknod(self, pargfid: bytes, name: str, mode: int, rdev: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.MKNOD, F.mknod_req(pargfid, name, mode, rdev, umask, _req(gfid, xdata)), cred)

    async def mkdir(self, pargfid: bytes, name: str, mode: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.MKDIR, F.mkdir_req(pargfid, name, mode, umask, _req(gfid, xdata)), cred)

    async def symlink(self, pargfid: bytes, name: str, target: str, gfid: bytes, umask: int = 0,
                      xdata: Dict | None = None, cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.SYMLINK, F.symlink_req(pargfid, name, target, umask, _req(gfid, xdata)), cred)

    async def unlink(self, pargfid: bytes, name: str, xdata: Dict | None = None,
                     cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.UNLINK, F.unlink_req(pargfid, name, 0, xdata), cred)

    async def rmdir(self, pargfid: bytes, name: str, flags: int = 0, xdata: Dict | None = None,
                    cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.RMDIR, F.rmdir_req(pargfid, name, flags, xdata), cred)

    async def rename(self, oldpar: bytes, oldname: str, newpar: bytes, newname: str, xdata: Dict | None = None,
                     cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.RENAME, F.rename_req(oldpar, oldname, newpar, newname, xdata), cred)

    async def link(self, gfid: bytes, newpar: bytes, newname: str, xdata: Dict | None = None,
                   cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.LINK, F.link_req(gfid, newpar, newname, xdata), cred)

    async def truncate(self, gfid: bytes, size: int, xdata: Dict | None = None,
                       cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.TRUNCATE, F.truncate_req(gfid, size, xdata), cred)

    async def setattr(self, gfid: bytes, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                      cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.SETATTR, F.setattr_req(gfid, stbuf, valid, xdata), cred, valid)

    async def statfs(self, gfid: bytes = ROOT_GFID, xdata: Dict | None = None) -> Result:
        return await self.call(Proc.STATFS, F.stat_req(gfid, xdata))

    async def access(self, gfid: bytes, mask: int, cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.ACCESS, F.access_req(gfid, mask), cred)

    async def getxattr(self, gfid: bytes, name: str = "", xdata: Dict | None = None,
                       cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.GETXATTR, F.getxattr_req(gfid, name, xdata), cred)

    async def setxattr(self, gfid: bytes, d: Dict, flags: int = 0, xdata: Dict | None = None,
                       cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.SETXATTR, F.setxattr_req(gfid, d, flags, xdata), cred)

    async def removexattr(self, gfid: bytes, name: str, xdata: Dict | None = None,
                          cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.REMOVEXATTR, F.removexattr_req(gfid, name, xdata), cred)

    async def inodelk(self, gfid: bytes, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                      cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.INODELK, F.inodelk_req(gfid, domain, cmd, flock, xdata), self._lock_cred(cred))

    async def entrylk(self, gfid: bytes, domain: str, name: str | None, cmd: int, type_: int = F.ENTRYLK_WRLCK,
                      xdata: Dict | None = None, cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.ENTRYLK, F.entrylk_req(gfid, domain, name, cmd, type_, xdata),
                               self._lock_cred(cred))

    async def xattrop(self, gfid: bytes, op: int, d: Dict, xdata: Dict | None = None,
                      cred: rpc.Credential | None = None) -> Result:
        return await self.call(Proc.XATTROP, F.xattrop_req(gfid, op, d, xdata), cred)

    async def ipc(self, op: int, xdata: Dict | None = None) -> Result:
        """IPC (``gfx_ipc_req``: op, xdata); op 2 registers xattr key patterns with the brick's upcall
        translator, whose XATTR callbacks then carry those keys (md-cache sends it on every connect)."""
        return await self.call(Proc.IPC, Packer().i32(op).raw(encode_gfx(xdata)).bytes())

    # ---------------------------------------------------------------- fops: fd

    async def create(self, pargfid: bytes, name: str, flags: int, mode: int, gfid: bytes, umask: int = 0,
                     xdata: Dict | None = None, cred: rpc.Credential | None = None) -> Result:
        """CREATE; ``result.fd`` is replaced by a client handle valid across reconnects."""
        r = await self.call(Proc.CREATE, F.create_req(pargfid, name, flags, mode, umask, _req(gfid, xdata)), cred)
        assert r.stat is not None
        return self._new_fd(r, r.stat.gfid, flags, False)

    async def open(self, gfid: bytes, flags: int, xdata: Dict | None = None,
                   cred: rpc.Credential | None = None) -> Result:
        r = await self.call(Proc.OPEN, F.open_req(gfid, flags, xdata), cred)
        return self._new_fd(r, gfid, flags, False)

    async def opendir(self, gfid: bytes, xdata: Dict | None = None, cred: rpc.Credential | None = None) -> Result:
        r = await self.call(Proc.OPENDIR, F.opendir_req(gfid, xdata), cred)
        return self._new_fd(r, gfid, 0, True)

    async def read(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                   cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.READ, F.read_req(gfid, rfd, offset, size, 0, xdata), cred)

    async def write(self, fd: int, offset: int, data: bytes, xdata: Dict | None = None,
                    cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.WRITE, F.write_req(gfid, rfd, offset, data, 0, xdata), cred)

    async def fstat(self, fd: int, xdata: Dict | None = None, cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.FSTAT, F.fd_req(gfid, rfd, xdata), cred)

    async def flush(self, fd: int, xdata: Dict | None = None, cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.FLUSH, F.fd_req(gfid, rfd, xdata), cred)

    async def fsync(self, fd: int, datasync: bool = False, xdata: Dict | None = None,
                    cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.FSYNC, F.fsync_req(gfid, rfd, int(datasync), xdata), cred)

    async def ftruncate(self, fd: int, size: int, xdata: Dict | None = None,
                        cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.FTRUNCATE, F.ftruncate_req(gfid, rfd, size, xdata), cred)

    async def fsetattr(self, fd: int, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                       cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.FSETATTR, F.fsetattr_req(gfid, rfd, stbuf, valid, xdata), cred, valid)

    async def fgetxattr(self, fd: int, name: str = "", xdata: Dict | None = None,
                        cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.FGETXATTR, F.fgetxattr_req(gfid, rfd, name, xdata), cred)

    async def fsetxattr(self, fd: int, d: Dict, flags: int = 0, xdata: Dict | None = None,
                        cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.FSETXATTR, F.fsetxattr_req(gfid, rfd, d, flags, xdata), cred)

    async def fremovexattr(self, fd: int, name: str, xdata: Dict | None = None,
                           cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.FREMOVEXATTR, F.fremovexattr_req(gfid, rfd, name, xdata), cred)

    async def readdirp(self, fd: int, offset: int = 0, size: int = 128 * 1024, xdata: Dict | None = None,
                       cred: rpc.Credential | None = None) -> Result:
        """One page; ``entries[-1].off`` is the offset of the next page, an empty page is the end."""
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.READDIRP, F.readdir_req(gfid, rfd, offset, size, xdata), cred)

    async def readdir(self, fd: int, offset: int = 0, size: int = 128 * 1024, xdata: Dict | None = None,
                      cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.READDIR, F.readdir_req(gfid, rfd, offset, size, xdata), cred)

    async def readdirp_all(self, fd: int, page: int = 128 * 1024, xdata: Dict | None = None) -> list[F.DirEntry]:
        """Every entry of an open directory, page by page."""
        out: list[F.DirEntry] = []
        offset = 0
        while True:
            r = await self.readdirp(fd, offset, page, xdata)
            if not r.entries:
                return out
            out.extend(r.entries)
            offset = r.entries[-1].off

    async def lk(self, fd: int, cmd: int, flock: Flock, xdata: Dict | None = None,
                 cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.LK, F.lk_req(gfid, rfd, cmd, flock, xdata), self._lock_cred(cred))

    async def finodelk(self, fd: int, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                       cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.FINODELK, F.finodelk_req(gfid, rfd, domain, cmd, flock, xdata),
                               self._lock_cred(cred))

    async def fentrylk(self, fd: int, domain: str, name: str | None, cmd: int, type_: int = F.ENTRYLK_WRLCK,
                       xdata: Dict | None = None, cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.FENTRYLK, F.fentrylk_req(gfid, rfd, domain, name, cmd, type_, xdata),
                               self._lock_cred(cred))

    async def fxattrop(self, fd: int, op: int, d: Dict, xdata: Dict | None = None,
                       cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.FXATTROP, F.fxattrop_req(gfid, rfd, op, d, xdata), cred)

    async def fallocate(self, fd: int, mode: int, offset: int, size: int, xdata: Dict | None = None,
                        cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.FALLOCATE, F.fallocate_req(gfid, rfd, mode, offset, size, xdata), cred)

    async def discard(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                      cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.DISCARD, F.discard_req(gfid, rfd, offset, size, xdata), cred)

    async def zerofill(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                       cred: rpc.Credential | None = None) -> Result:
        gfid, rfd = self._remote_fd(fd)
        return await self.call(Proc.ZEROFILL, F.discard_req(gfid, rfd, offset, size, xdata), cred)

    async def release(self, fd: int) -> None:
        """Close a handle; the brick is told if it still knows the fd. Never raises for a lost connection."""
        f = self._fds.pop(fd)
        if f is None:
            raise OSError(errno.EBADF, f"{self.name}: unknown fd {fd}")
        if f.remote is None or f.generation != self.generation or not self.is_up:
            return  # the brick dropped it with the old connection
        proc = Proc.RELEASEDIR if f.is_dir else Proc.RELEASE
        try:
            await self.call(proc, F.fd_req(f.gfid, f.remote))
        except OSError as e:
            log.debug("%s: %s of fd %d failed: %s", self.name, proc.name, fd, e)

    releasedir = release

    @property
    def open_fds(self) -> int:
        return len(self._fds)


def _req(gfid: bytes, xdata: Dict | None) -> Dict:
    """xdata carrying the mandatory ``gfid-req`` of entry-creating fops."""
    if len(gfid) != 16 or gfid == NULL_GFID:
        raise ValueError("a non-zero 16-byte gfid is required to create an entry")
    out: Dict = dict(xdata or {})
    out["gfid-req"] = uuid.UUID(bytes=gfid)
    return out
