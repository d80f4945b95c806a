"""``SERVER[:PORT]:/VOLUME[/SUBDIR]`` and server lists as users write them; pure (the FlexVolume driver,
the CSI plugin and the agent parse specs without starting anything).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .handshake import GLUSTERD_PORT

#: characters a subdirectory may not hold: ',' would split the FUSE ``-o`` list (fsname=…), the rest are
#: control characters or whitespace that mount tables escape
_BAD_SUBDIR = re.compile(r"[,\x00-\x20\x7f\\]")


def check_subdir(sub: str, text: str = "") -> None:
    """A subdirectory names a directory of the volume and nothing else: no ``..``/``.``, no empty parts."""
    if not sub:
        return
    where = f" in {text!r}" if text else ""
    if _BAD_SUBDIR.search(sub):
        raise ValueError(f"subdirectory {sub!r}{where} holds a comma, a backslash, a space or a control "
                         f"character")
    for part in sub.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"subdirectory {sub!r}{where} must be a plain path inside the volume "
                             f"(no '.', '..' or empty parts)")


@dataclass(frozen=True)
class Server:
    host: str
    port: int = GLUSTERD_PORT

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class VolumeSpec:
    """``SERVER[:PORT]:/VOLUME[/SUBDIR]`` as users write it."""

    server: Server
    volume: str
    subdir: str = ""


_SPEC = re.compile(r"^(?P<host>\[[^\]]+\]|[^:/\s]+)(?::(?P<port>\d+))?:/?(?P<vol>[A-Za-z0-9_.-]+)(?P<sub>/[^\s]*)?$")


def parse_volume_spec(text: str) -> VolumeSpec:
    m = _SPEC.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not SERVER[:PORT]:/VOLUME[/SUBDIR]")
    port = int(m["port"]) if m["port"] else GLUSTERD_PORT
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range in {text!r}")
    sub = (m["sub"] or "").strip("/")
    check_subdir(sub, text)
    return VolumeSpec(Server(m["host"].strip("[]"), port), m["vol"], sub)


def parse_servers(text: str, default_port: int = GLUSTERD_PORT) -> list[Server]:
    """``backup-volfile-servers`` value: hosts separated by ':' or ',' (optionally host:port with ',')."""
    out = []
    sep = "," if "," in text else ":"
    for item in filter(None, (t.strip() for t in text.split(sep))):
        if sep == "," and ":" in item:
            h, p = item.rsplit(":", 1)
            out.append(Server(h, int(p)))
        else:
            out.append(Server(item, default_port))
    return out
