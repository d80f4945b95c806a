"""Whether a volume's bricks tell clients about changes (features.cache-invalidation), from their volfiles.

The client volfile says what the *client* side wants (md-cache's ``cache-invalidation``, i.e.
``performance.cache-invalidation``); whether the bricks send upcalls at all is the upcall translator's
``cache-invalidation`` option in each brick's own volfile, which glusterd hands out by GETSPEC under the
key ``VOLUME.HOST.BRICK-PATH`` (slashes as dashes, as the brick processes ask for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import trio

from ..mgmt import getspec
from ..options import parse_bool
from ..volfile import Graph, parse
from .client import BrickClient

#: features.cache-invalidation-timeout when the brick volfile does not say (gluster's default)
DEFAULT_TIMEOUT = 60.0


def brick_volfile_key(volume: str, host: str, path: str) -> str:
    return f"{volume}.{host}.{path.strip('/').replace('/', '-')}"


@dataclass(frozen=True)
class BrickUpcall:
    brick: str
    invalidation: bool
    timeout: float


async def brick_upcall(b: BrickClient, volume: str, timeout: float = 10.0) -> BrickUpcall:
    """The upcall settings of one brick (OSError/MgmtError if glusterd cannot say)."""
    text = await getspec(b.mgmt, brick_volfile_key(volume, b.host, b.brick_path), timeout, b.tls_config)
    g = parse(text)
    for xl in g.xlators.values():
        if xl.type == "features/upcall":
            on = parse_bool(xl.options.get("cache-invalidation", "off"), default=False)
            try:
                t = float(xl.options.get("cache-invalidation-timeout", DEFAULT_TIMEOUT))
            except ValueError:
                t = DEFAULT_TIMEOUT
            return BrickUpcall(b.name, on, t)
    return BrickUpcall(b.name, False, DEFAULT_TIMEOUT)


async def bricks_upcall(bricks: Sequence[BrickClient], volume: str, timeout: float = 10.0) -> list[BrickUpcall]:
    out: list[BrickUpcall | None] = [None] * len(bricks)

    async def one(i: int) -> None:
        out[i] = await brick_upcall(bricks[i], volume, timeout)

    async with trio.open_nursery() as n:
        for i in range(len(bricks)):
            n.start_soon(one, i)
    return [u for u in out if u is not None]


async def probe_bricks(bricks: Sequence[BrickClient], volume: str) -> tuple[bool, float]:
    """(every brick sends cache-invalidation upcalls, the smallest cache-invalidation-timeout): md-cache's probe."""
    ups = await bricks_upcall(bricks, volume)
    if not ups:
        return False, DEFAULT_TIMEOUT
    return all(u.invalidation for u in ups), min(u.timeout for u in ups)


def describe_cache(graph: Graph, ups: Sequence[BrickUpcall], errors: Sequence[str] = ()) -> list[str]:
    """What ``gfuse probe`` says about caching: both switches, and what gfuse makes of them."""
    from .mdcache import INCOHERENT_MAX, CacheOptions

    mdc = next((x.options for x in graph.xlators.values() if x.type == "performance/md-cache"), None)
    nlc = next((x.options for x in graph.xlators.values() if x.type == "performance/nl-cache"), None)
    o = CacheOptions.from_xlators(mdc, nlc)
    on = [u for u in ups if u.invalidation]
    client = (f"performance.cache-invalidation {'on' if o.invalidation else 'off'}, "
              f"md-cache-timeout {o.timeout:g} s")
    if errors:
        bricks = f"unknown for {len(errors)} brick(s) ({errors[0]})"
    elif len(on) == len(ups) and ups:
        bricks = f"on at all {len(ups)} (cache-invalidation-timeout {min(u.timeout for u in ups):g} s)"
    else:
        bricks = f"on at {len(on)} of {len(ups)} brick(s)"
    lines = [f"cache-invalidation: clients {client}; bricks (features.cache-invalidation) {bricks}"]
    if o.invalidation and ups and len(on) == len(ups) and not errors:
        t = min(u.timeout for u in ups)
        life = min(o.timeout, max(0.0, t * 0.95 - 1.0))
        lines.append(f"  coherent: the bricks tell gfuse of other clients' changes, so it keeps attributes, "
                     f"security/ACL/user xattrs and names (negative ones up to {min(o.negative_timeout, life):g} s) "
                     f"for {life:g} s and gives the kernel timeouts as long, purging it on each change")
    else:
        hint = "gluster volume set VOLUME group metadata-cache"
        lines.append(f"  not coherent: nothing tells clients of each other's changes, so gfuse keeps attributes and "
                     f"xattrs at most {INCOHERENT_MAX:g} s and the kernel its 1 s timeouts; `{hint}` turns both on")
    return lines
