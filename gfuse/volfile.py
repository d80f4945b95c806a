"""Volfile parsing: the translator graph glusterd hands out with GETSPEC.

A volfile is a list of blocks::

    volume NAME
        type CATEGORY/TYPE
        option KEY VALUE
        subvolumes A B C
    end-volume

Each block may only name subvolumes defined above it; the last block is the top.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


class VolfileError(ValueError):
    """The volfile text is not a valid translator graph."""


@dataclass
class Xlator:
    name: str
    type: str = ""
    options: dict[str, str] = field(default_factory=dict)
    subvolumes: list["Xlator"] = field(default_factory=list)

    def walk(self) -> list["Xlator"]:
        """This translator and everything below it, depth first, each once."""
        seen: dict[str, Xlator] = {}

        def visit(x: Xlator) -> None:
            if x.name in seen:
                return
            seen[x.name] = x
            for s in x.subvolumes:
                visit(s)

        visit(self)
        return list(seen.values())

    def find(self, type_: str) -> list["Xlator"]:
        return [x for x in self.walk() if x.type == type_]


@dataclass
class Graph:
    top: Xlator
    xlators: dict[str, Xlator]
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8", "surrogateescape")).hexdigest()

    def clients(self) -> list[Xlator]:
        """The ``protocol/client`` translators in volfile order (= brick order)."""
        return [x for x in self.xlators.values() if x.type == "protocol/client"]

    def shape(self) -> str:
        """Human description such as ``replicate 1 x 3`` or ``distribute 2 x 3``."""
        nclients = len(self.clients())
        dht = [x for x in self.xlators.values() if x.type == "cluster/distribute"]
        afr = [x for x in self.xlators.values() if x.type == "cluster/replicate"]
        disperse = [x for x in self.xlators.values() if x.type == "cluster/disperse"]
        if afr:
            width = len(afr[0].subvolumes)
            kind = "distributed-replicate" if len(afr) > 1 else "replicate"
            return f"{kind} {len(afr)} x {width}"
        if disperse:
            return f"disperse {len(disperse)} x {len(disperse[0].subvolumes)}"
        if dht:
            return f"distribute {nclients} x 1"
        return f"single brick ({nclients} x 1)"


def parse(text: str) -> Graph:
    xlators: dict[str, Xlator] = {}
    cur: Xlator | None = None
    last: Xlator | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        key = words[0]
        if key == "volume":
            if cur is not None:
                raise VolfileError(f"line {lineno}: 'volume' inside volume {cur.name!r}")
            if len(words) != 2:
                raise VolfileError(f"line {lineno}: expected 'volume NAME'")
            if words[1] in xlators:
                raise VolfileError(f"line {lineno}: volume {words[1]!r} defined twice")
            cur = Xlator(words[1])
        elif cur is None:
            raise VolfileError(f"line {lineno}: {key!r} outside a volume block")
        elif key == "type":
            if len(words) != 2:
                raise VolfileError(f"line {lineno}: expected 'type CATEGORY/NAME'")
            cur.type = words[1]
        elif key == "option":
            if len(words) < 2:
                raise VolfileError(f"line {lineno}: option without a key")
            cur.options[words[1]] = line.split(None, 2)[2] if len(words) > 2 else ""
        elif key == "subvolumes":
            for name in words[1:]:
                if name not in xlators:
                    raise VolfileError(f"line {lineno}: subvolume {name!r} of {cur.name!r} is not defined above it")
                cur.subvolumes.append(xlators[name])
        elif key == "end-volume":
            if not cur.type:
                raise VolfileError(f"line {lineno}: volume {cur.name!r} has no type")
            xlators[cur.name] = cur
            last, cur = cur, None
        else:
            raise VolfileError(f"line {lineno}: unknown keyword {key!r}")
    if cur is not None:
        raise VolfileError(f"volume {cur.name!r} is missing 'end-volume'")
    if last is None:
        raise VolfileError("volfile defines no volume")
    return Graph(last, xlators, text)
