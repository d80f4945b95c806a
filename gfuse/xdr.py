"""XDR (RFC 4506) encoding and decoding: pure functions over bytes, no I/O.

Every decoder in gfuse is built on :class:`Unpacker`, which raises
:class:`ProtocolError` (never ``struct.error`` or ``IndexError``) on truncated or
malformed input, so a bad peer can only ever produce that one exception.
"""

from __future__ import annotations

import struct
from typing import Any

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")

#: Ceiling on any single variable-length item we accept from a peer. Gluster's
#: largest messages are 16 MiB READ payloads (outside the XDR) and volfiles.
MAX_ITEM = 64 * 1024 * 1024


class ProtocolError(Exception):
    """The peer sent bytes that do not follow the protocol (truncated, malformed, unexpected)."""


def pad4(n: int) -> int:
    """Bytes of padding that follow an item of length ``n``."""
    return (4 - n % 4) % 4


class Packer:
    """Accumulates XDR-encoded items."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u32(self, v: int) -> "Packer":
        self._parts.append(_U32.pack(v & 0xFFFFFFFF))
        return self

    def i32(self, v: int) -> "Packer":
        self._parts.append(_I32.pack(v))
        return self

    def u64(self, v: int) -> "Packer":
        self._parts.append(_U64.pack(v & 0xFFFFFFFFFFFFFFFF))
        return self

    def i64(self, v: int) -> "Packer":
        self._parts.append(_I64.pack(v))
        return self

    def f64(self, v: float) -> "Packer":
        self._parts.append(_F64.pack(v))
        return self

    def fixed(self, data: bytes, size: int) -> "Packer":
        """Fixed-length opaque (e.g. a 16-byte gfid)."""
        if len(data) != size:
            raise ValueError(f"fixed opaque needs {size} bytes, got {len(data)}")
        self._parts.append(bytes(data) + b"\0" * pad4(size))
        return self

    def opaque(self, data: bytes) -> "Packer":
        """Variable-length opaque: length, bytes, padding."""
        self._parts.append(_U32.pack(len(data)))
        self._parts.append(bytes(data) + b"\0" * pad4(len(data)))
        return self

    def string(self, s: str | bytes) -> "Packer":
        return self.opaque(s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s)

    def raw(self, data: bytes) -> "Packer":
        """Bytes already in XDR form."""
        self._parts.append(bytes(data))
        return self

    def bytes(self) -> bytes:
        return b"".join(self._parts)


class Unpacker:
    """Reads XDR items from a buffer; every failure is a :class:`ProtocolError`."""

    __slots__ = ("_buf", "pos")

    def __init__(self, data: bytes | memoryview, pos: int = 0) -> None:
        self._buf = memoryview(data)
        self.pos = pos

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self._buf):
            raise ProtocolError(
                f"truncated message: need {n} bytes at offset {self.pos}, have {len(self._buf) - self.pos}"
            )
        mv = self._buf[self.pos : self.pos + n]
        self.pos += n
        return mv

    def u32(self) -> int:
        v: int = _U32.unpack(self._take(4))[0]
        return v

    def struct(self, st: struct.Struct) -> tuple[Any, ...]:
        """Several fixed-size items at once (a hot path: iatt decoding)."""
        return st.unpack(self._take(st.size))

    def i32(self) -> int:
        v: int = _I32.unpack(self._take(4))[0]
        return v

    def u64(self) -> int:
        v: int = _U64.unpack(self._take(8))[0]
        return v

    def i64(self) -> int:
        v: int = _I64.unpack(self._take(8))[0]
        return v

    def f64(self) -> float:
        v: float = _F64.unpack(self._take(8))[0]
        return v

    def fixed(self, size: int) -> bytes:
        data = bytes(self._take(size))
        self._take(pad4(size))
        return data

    def opaque(self, limit: int = MAX_ITEM) -> bytes:
        n = self.u32()
        if n > limit:
            raise ProtocolError(f"opaque of {n} bytes exceeds limit {limit}")
        return self.fixed(n)

    def string(self, limit: int = MAX_ITEM) -> str:
        data = self.opaque(limit)
        try:
            return data.decode("utf-8", "surrogateescape")
        except UnicodeDecodeError as e:  # pragma: no cover - surrogateescape never fails
            raise ProtocolError(str(e)) from e

    def bool_(self) -> bool:
        v = self.u32()
        if v > 1:
            raise ProtocolError(f"XDR bool must be 0 or 1, got {v}")
        return v == 1

    def remaining(self) -> int:
        return len(self._buf) - self.pos

    def rest(self) -> bytes:
        return bytes(self._take(self.remaining()))

    def done(self) -> None:
        """Assert the whole buffer was consumed."""
        if self.remaining():
            raise ProtocolError(f"{self.remaining()} unexpected trailing bytes")
