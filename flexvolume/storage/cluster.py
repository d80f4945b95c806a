"""``gfuse cluster init NODE...`` (independent mode) and ``gfuse cluster status``.

Independent mode: nodes with GlusterFS installed and glusterd running, not configured. ``init`` is
run against the glusterd of the first node (its unix socket, see :mod:`.glusterd`) and, all through
glusterd, with no SSH:

1. **peers** the other nodes (``peer probe``; glusterd talks to glusterd over TCP 24007) and waits
   until every one is "Peer in Cluster (Connected)";
2. creates the **pool volume** (default ``gfuse-pool``, replica ``min(3, nodes)``, one brick per node
   under the node's brick pool directory, distributed over the nodes when there are more than the
   replica count), with quota sizing options, starts it and enables quota -- the subdir backend's
   volumes are its directories;
3. **registers the brick pools** (``NODE:/DIR``, default DIR ``/var/lib/gfuse/bricks``) in the pool
   volume's option ``user.gfuse.brick-pools`` -- the volume backend allocates bricks there.

Every step first looks at what is there, so ``init`` can be run again (after a crash, or with more
nodes: new nodes are peered and their pools registered; the pool volume is not reshaped).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .api import StorageError
from .backends import QUOTA_OPTIONS, REGISTRY_KEY, BrickPool, BrickPoolRegistry
from .glusterd import Brick, Glusterd

log = logging.getLogger(__name__)

DEFAULT_POOL = "gfuse-pool"
DEFAULT_BRICK_DIR = "/var/lib/gfuse/bricks"
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``100G``, ``512Mi``, ``1000000`` → bytes (binary units: k = 1024)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise StorageError("invalid-parameters", f"{text!r} is not a size (e.g. 100G, 512Mi, 1000000)")
    mult = 1024 ** " kmgtp".index((m.group(2) or " ").lower())
    return int(float(m.group(1)) * mult)


@dataclass
class NodeSpec:
    host: str
    brick_dir: str = DEFAULT_BRICK_DIR
    size_bytes: int = 0

    @classmethod
    def parse(cls, text: str, brick_dir: str = DEFAULT_BRICK_DIR, size_bytes: int = 0) -> NodeSpec:
        """``HOST`` or ``HOST:/BRICK_DIR``."""
        host, sep, path = text.partition(":")
        if not host or (sep and not path.startswith("/")):
            raise StorageError("invalid-parameters", f"node {text!r}: expected HOST or HOST:/BRICK_DIR")
        return cls(host, path.rstrip("/") if sep else brick_dir, size_bytes)


def _wait_peers(gd: Glusterd, hosts: Sequence[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        peers = {p.hostname: p for p in gd.peers()}
        missing = [h for h in hosts
                   if not (h in peers and peers[h].connected and peers[h].state.startswith("Peer in Cluster"))]
        if not missing:
            return
        if time.monotonic() > deadline:
            states = [f"{h}: {peers[h].state}, {'connected' if peers[h].connected else 'disconnected'}"
                      if h in peers else f"{h}: not a peer" for h in missing]
            raise StorageError("glusterd-unreachable",
                               f"node(s) {', '.join(missing)} did not become connected peers within {timeout:.0f}s: "
                               + "; ".join(states))
        time.sleep(0.3)


def init(gd: Glusterd, nodes: Sequence[NodeSpec], *, pool: str = DEFAULT_POOL, replica: int | None = None,
         peer_timeout: float = 60.0, say: Any = log.info) -> dict[str, Any]:
    """Peer ``nodes`` (the first is the one ``gd`` talks to), create the pool volume, register the
    brick pools. Idempotent. Returns :func:`status`."""
    if not nodes:
        raise StorageError("invalid-parameters", "give at least one node")
    hosts = [n.host for n in nodes]
    if len(set(hosts)) != len(hosts):
        raise StorageError("invalid-parameters", f"a node is named twice: {' '.join(hosts)}")
    gd.ping()
    # 1. peers
    known = {p.hostname for p in gd.peers()}
    for n in nodes[1:]:
        if n.host in known:
            continue
        say(f"peer probe {n.host}")
        try:
            gd.peer_probe(n.host)
        except StorageError as e:
            if "already in peer list" in e.message or "localhost not needed" in e.message:
                continue
            if re.search(r"not connected|connection refused|resolve|unreachable|timed? ?out", e.message, re.IGNORECASE):
                raise StorageError("glusterd-unreachable",
                                   f"node {n.host}: its glusterd does not answer on {n.host}:24007 (is glusterd "
                                   f"running there, is the port open, does the name resolve?): {e.message}") from None
            raise
    _wait_peers(gd, hosts[1:], peer_timeout)
    # 2. the pool volume
    r = replica or min(3, len(nodes))
    if r > len(nodes):
        raise StorageError("insufficient-nodes", f"replica {r} needs {r} nodes, {len(nodes)} given")
    info = gd.volume_info(pool)
    if info is None:
        count = r * (len(nodes) // r)
        bricks = [Brick(n.host, f"{n.brick_dir}/{pool}") for n in nodes[:count]]  # glusterd makes one level
        say(f"creating pool volume {pool}: replica {r}, bricks {' '.join(b.spec for b in bricks)}")
        gd.create_volume(pool, bricks, r)
        info = gd.volume_info(pool)
        assert info is not None
    missing_opts = {k: v for k, v in QUOTA_OPTIONS.items() if info.options.get(k) != v}
    if missing_opts:
        gd.set_options(pool, missing_opts)
    if not info.started:
        say(f"starting {pool}")
        gd.start_volume(pool)
    if not gd.quota_enabled(pool):
        say(f"enabling quota on {pool}")
        gd.quota_enable(pool)
    # 3. brick pools
    reg = BrickPoolRegistry(gd, pool)
    reg.register([BrickPool(n.host, n.brick_dir, n.size_bytes) for n in nodes])
    return status(gd, pool)


def status(gd: Glusterd, pool: str = DEFAULT_POOL) -> dict[str, Any]:
    """Peers, the pool volume (bricks online, quota), brick pools with what is allocated on them."""
    out: dict[str, Any] = {"peers": [{"host": p.hostname, "connected": p.connected, "state": p.state}
                                     for p in gd.peers()]}
    info = gd.volume_info(pool)
    if info is None:
        out["pool"] = None
        out["brick_pools"] = []
        return out
    online = {}
    if info.started:
        online = {b.spec: b.online for b in gd.brick_status(pool)}
    out["pool"] = {"name": pool, "status": info.status, "type": info.type, "replica": info.replica,
                   "quota": info.options.get("features.quota") == "on",
                   "bricks": [{"brick": b.spec, "online": online.get(b.spec)} for b in info.bricks]}
    pools = BrickPoolRegistry.parse(info.options.get(REGISTRY_KEY, ""))
    volumes = gd.all_volume_info()
    rows = []
    for p in pools:
        used, count = 0, 0
        for v in volumes:
            if any(b.host == p.host and b.path.startswith(p.path.rstrip("/") + "/") for b in v.bricks) \
                    and "user.gfuse.pv" in v.options:
                used += int(v.options.get("user.gfuse.size", "0") or 0)
                count += 1
        rows.append({"host": p.host, "path": p.path, "size_bytes": p.size_bytes, "allocated_bytes": used,
                     "volumes": count})
    out["brick_pools"] = rows
    out["volumes"] = sorted(v.name for v in volumes if "user.gfuse.pv" in v.options)
    return out


def gc(gd: Glusterd, host: str, pool: str = DEFAULT_POOL, dry_run: bool = False) -> list[str]:
    """On storage node ``host`` (run it there): remove brick directories of deleted per-PV volumes,
    i.e. entries ``gfuse_*-<tag>`` of this node's brick pools that no volume uses."""
    import shutil

    info = gd.volume_info(pool)
    if info is None:
        raise StorageError("pool-unavailable", f"no pool volume {pool}")
    in_use = {b.path for v in gd.all_volume_info() for b in v.bricks if b.host == host}
    removed = []
    for p in BrickPoolRegistry.parse(info.options.get(REGISTRY_KEY, "")):
        base = Path(p.path)
        if p.host != host or not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            if re.match(r"^gfuse_.+-[0-9a-f]{6}$", entry.name) and str(entry) not in in_use:
                removed.append(str(entry))
                if not dry_run:
                    shutil.rmtree(entry, ignore_errors=True)
    return removed
