"""Build gfuse's translator stack from a volfile graph.

Each translator type gfuse implements becomes its layer; the rest (performance
translators, io-stats, utime — whose job the credential's ctime flags do) are passed
through to their single child and named once in the log.
"""

from __future__ import annotations

import functools
import logging

import trio

from .mgmt import Server
from .options import parse_bool
from .tls import TlsConfig
from .volfile import Graph, VolfileError, Xlator
from .volfile_policy import check_graph
from .xlators.api import Brick, Subvolume
from .xlators.client import BrickClient
from .xlators.distribute import Distribute
from .xlators.cachemode import probe_bricks
from .xlators.mdcache import CacheOptions, MdCache
from .xlators.replicate import Replicate

log = logging.getLogger(__name__)

PASS_THROUGH = {"debug/io-stats", "features/utime", "performance/write-behind", "performance/open-behind",
                "performance/quick-read", "performance/md-cache", "performance/io-cache", "performance/read-ahead",
                "performance/readdir-ahead", "performance/nl-cache", "performance/io-threads",
                "features/read-only", "features/worm", "features/snapview-client", "meta-autoload/meta",
                "system/posix-acl"}


class ClientGraph:
    """The live stack for one volume: brick sessions at the bottom, ``top`` for the filesystem."""

    def __init__(self, graph: Graph, server: Server, volume: str, *, process_name: str = "gfuse",
                 ping_timeout: float | None = None, tls: TlsConfig | None = None) -> None:
        self.graph = graph
        self._tls = tls
        self.volume = volume
        self.bricks: list[BrickClient] = []
        self._built: dict[str, Subvolume] = {}
        self._server = server
        self._process_name = process_name
        self._ping_timeout = ping_timeout
        self.skipped: list[str] = []
        self.replicas: list[Replicate] = []
        self._stopping = trio.Event()
        check_graph(graph)  # a volume gfuse would serve wrongly (shard, disperse, …) is refused in one line
        #: md-cache on top of it all, above distribute/replicate (see xlators/mdcache.py)
        child = self._build(graph.top)
        mdc = next((x.options for x in graph.xlators.values() if x.type == "performance/md-cache"), None)
        nlc = next((x.options for x in graph.xlators.values() if x.type == "performance/nl-cache"), None)
        self.mdcache = MdCache(child, options=CacheOptions.from_xlators(mdc, nlc), bricks=self.bricks,
                               probe=functools.partial(probe_bricks, self.bricks, volume))
        self.top = self.mdcache

    def _build(self, xl: Xlator) -> Subvolume:
        if xl.name in self._built:
            return self._built[xl.name]
        kids = [self._build(s) for s in xl.subvolumes]
        node: Subvolume
        if xl.type == "protocol/client":
            brick = BrickClient(xl, self._server, volfile_key=self.volume, process_name=self._process_name,
                                ping_timeout=self._ping_timeout, tls=self._tls)
            self.bricks.append(brick)
            node = brick
        elif xl.type == "cluster/replicate":
            pend = xl.options.get("afr-pending-xattr")
            replica = Replicate(xl.name, _bricks(xl, kids), pend.split(",") if pend else None,
                                quorum=_quorum(xl.options, len(kids)), arbiter=_arbiter(xl, len(kids)))
            self.replicas.append(replica)
            node = replica
        elif xl.type == "cluster/distribute":
            optimize = parse_bool(xl.options.get("lookup-optimize", "on"), default=True)
            node = Distribute(xl.name, kids, lookup_optimize=optimize)
        elif len(kids) == 1:
            if xl.type not in PASS_THROUGH:
                log.info("translator %s (%s) is not implemented by gfuse; passing through", xl.name, xl.type)
            self.skipped.append(f"{xl.name} ({xl.type})")
            node = kids[0]
        else:
            raise VolfileError(f"gfuse cannot serve translator {xl.name!r} of type {xl.type} "
                               f"with {len(kids)} children (e.g. disperse volumes are not supported)")
        self._built[xl.name] = node
        return node

    async def start(self, nursery: trio.Nursery, timeout: float = 10.0) -> None:
        """Start every brick session and wait (up to ``timeout``) for each one's first attempt."""
        for b in self.bricks:
            nursery.start_soon(b.run)
        for r in self.replicas:
            await nursery.start(r.run)
        with trio.move_on_after(timeout):
            for b in self.bricks:
                await b.first_attempt_done.wait()
        await nursery.start(self.mdcache.run)  # reads the bricks' cache-invalidation settings first

    async def serve(self, timeout: float = 10.0, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Run the graph's sessions in a nursery of its own until :meth:`stop` (then finish delayed work)."""
        async with trio.open_nursery() as nursery:
            await self.start(nursery, timeout)
            task_status.started()
            await self._stopping.wait()
            with trio.move_on_after(10):
                await self.flush()
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        self._stopping.set()

    async def flush(self) -> None:
        """Finish delayed work (eager-lock post-ops) while the bricks are still connected."""
        for r in self.replicas:
            await r.release_all()

    def status(self) -> list[tuple[str, str, bool, str]]:
        return [(b.name, f"{b.host}:{b.brick_path}", b.is_up, "" if b.is_up else b.last_error) for b in self.bricks]


def _bricks(xl: Xlator, kids: list[Subvolume]) -> list[Brick]:
    """Replicate watches each child's connection (up/down, generations): its children are brick sessions."""
    out: list[Brick] = []
    for k in kids:
        if not isinstance(k, BrickClient):
            raise VolfileError(f"gfuse cannot serve {xl.name!r}: a child of cluster/replicate is not a "
                               f"protocol/client ({k!r})")
        out.append(k)
    return out


def _arbiter(xl: Xlator, n: int) -> int:
    """``arbiter-count`` (replica 3 arbiter 1: the last child keeps no data, and must never be read)."""
    raw = xl.options.get("arbiter-count", "0").strip() or "0"
    if raw not in ("0", "1") or (raw == "1" and n != 3):
        raise VolfileError(f"gfuse cannot serve {xl.name!r}: arbiter-count {raw!r} with {n} children "
                           f"(only replica 3 arbiter 1)")
    return int(raw)


def _quorum(options: dict[str, str], n: int) -> str | int:
    qt = options.get("quorum-type", "auto" if n >= 3 else "none")
    if qt == "fixed":
        return int(options.get("quorum-count", n // 2 + 1))
    return qt
