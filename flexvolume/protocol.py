"""Wire format between the gfuse node agent and its clients.

A connection to the agent's unix socket carries any number of request/response pairs, strictly
alternating (the client sends one request and reads one response before sending the next). Each
message is a frame::

    uint32 big-endian N   (1 <= N <= MAX_FRAME)
    N bytes               a msgpack map with string keys (msgpack "str" type, UTF-8)

Every response map has ``"ok"`` (bool). When ``ok`` is false it also has ``"error"`` (one line an
admin can act on) and ``"code"`` (one of :data:`ERROR_CODES`, for programs mapping errors, e.g. to
gRPC status codes). The agent closes a connection after :data:`IDLE_TIMEOUT` seconds without a
request, or after a frame it cannot decode (answered with ``code: "invalid"`` first when possible).
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

DEFAULT_SOCKET = "/run/gfuse/agent.sock"
PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 20
IDLE_TIMEOUT = 60.0

#: error codes: the request is malformed; the target is mounted with something else; the volume
#: cannot be mounted (unreachable, unknown, refused); an operation ran out of time; the path is not
#: known; anything else
ERROR_CODES = ("invalid", "conflict", "unavailable", "timeout", "not_found", "internal")


class FrameError(ValueError):
    """A frame that is not a valid message."""


def encode(message: dict[str, Any]) -> bytes:
    """One frame: length prefix + msgpack body."""
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameError(f"message of {len(body)} bytes exceeds the limit of {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """The body length announced by a 4-byte header; raises :class:`FrameError` if out of range."""
    (n,) = HEADER.unpack(header)
    if not 1 <= n <= MAX_FRAME:
        raise FrameError(f"frame length {n} out of range (1..{MAX_FRAME})")
    return n


def decode(body: bytes) -> dict[str, Any]:
    """A frame body back to a map; raises :class:`FrameError` if it is not a msgpack map."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises many types (ExtraData, FormatError, ValueError, …)
        raise FrameError(f"not a msgpack message: {e}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"a message must be a msgpack map, not {type(obj).__name__}")
    return obj


def error(message: str, code: str = "internal") -> dict[str, Any]:
    """A failure response; the message is made one line."""
    assert code in ERROR_CODES, code
    return {"ok": False, "error": " ".join(str(message).split()), "code": code}
