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
from ..volfile import parse
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
