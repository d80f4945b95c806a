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


#: a host is a DNS name or IPv4 address, or an IPv6 address in brackets: nothing that could end or split a
#: FUSE option (``fsname=`` carries the spec), a mount-table field or a command line
_HOST = r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+"
_SPEC = re.compile(rf"^(?P<host>{_HOST})(?::(?P<port>\d+))?:/?(?P<vol>[A-Za-z0-9_.-]+)(?P<sub>/[^\s]*)?$")
_HOST_RE = re.compile(rf"(?:{_HOST})")
_HOST_PART = re.compile(r"\[[^\]]*\]?|[^:]*")


def parse_volume_spec(text: str) -> VolumeSpec:
    """``SERVER[:PORT]:/VOLUME[/SUBDIR]``; a ValueError for anything else, including a subdirectory that is
    not a plain path inside the volume (:func:`check_subdir`) and a server name with characters no host name
    has (a comma would end ``fsname=`` in the FUSE options)."""
    m = _SPEC.match(text.strip())
    if not m:
        host = _HOST_PART.match(text.strip())
        if host and host[0] and not _HOST_RE.fullmatch(host[0]):
            raise ValueError(f"{text!r} is not SERVER[:PORT]:/VOLUME[/SUBDIR]: the server {host[0]!r} is not a "
                             f"host name or address")
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
            server = Server(h, int(p) if p.isdigit() else -1)
        else:
            server = Server(item, default_port)
        if not _HOST_RE.fullmatch(server.host) or not 0 < server.port < 65536:
            raise ValueError(f"{item!r} in {text!r} is not a server (HOST or HOST:PORT)")
        out.append(Server(server.host.strip("[]"), server.port))
    return out
