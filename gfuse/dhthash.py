"""Gluster's DHT name hash (Davies-Meyer over TEA rounds) and layout xattr codec — pure functions.

Compatibility matters more than elegance here: a file must land on the subvolume
the native client would pick, so this follows ``libglusterfs/src/hashfn.c`` and
``xlators/cluster/dht`` bit for bit, including the sign extension of the tail
bytes (``msg`` is a signed ``char *`` on x86) and rsync's temp-name munging.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

_M = 0xFFFFFFFF
_DELTA = 0x9E3779B9
_FULLROUNDS = 10
_PARTROUNDS = 6
#: Default ``rsync-hash-regex``: ``.name.XXXXXX`` hashes like ``name``, so rsync's rename keeps the file in place.
RSYNC_REGEX = re.compile(rb"^\.(.+)\.[^.]+$", re.DOTALL)

LAYOUT_XATTR = "trusted.glusterfs.dht"
LINKTO_XATTR = "trusted.glusterfs.dht.linkto"
HASH_TYPE_DM = 0


def _round(rounds: int, a: list[int], h0: int, h1: int) -> tuple[int, int]:
    b0, b1, s = h0, h1, 0
    for _ in range(rounds):
        s = (s + _DELTA) & _M
        b0 = (b0 + ((((b1 << 4) & _M) + a[0]) ^ ((b1 + s) & _M) ^ ((b1 >> 5) + a[1]))) & _M
        b1 = (b1 + ((((b0 << 4) & _M) + a[2]) ^ ((b0 + s) & _M) ^ ((b0 >> 5) + a[3]))) & _M
    return (h0 + b0) & _M, (h1 + b1) & _M


def dm_hash(msg: bytes) -> int:
    """``gf_dm_hashfn``."""
    n = len(msg)
    h0, h1 = 0x9464A485, 0x542E1A94
    pad = (n | (n << 8)) & _M
    pad = (pad | (pad << 16)) & _M
    words = [struct.unpack_from("<I", msg, 4 * i)[0] for i in range(n // 4)]
    full_quads = n // 16
    for q in range(full_quads):
        h0, h1 = _round(_PARTROUNDS, words[4 * q : 4 * q + 4], h0, h1)
    wi = 4 * full_quads
    remaining_words = n // 4 - wi
    full_bytes = n - 4 * wi
    arr = []
    for _ in range(4):
        if remaining_words:
            arr.append(words[wi])
            wi += 1
            remaining_words -= 1
            full_bytes -= 4
        else:
            v = pad
            while full_bytes:
                c = msg[n - full_bytes]
                if c >= 0x80:
                    c -= 0x100  # signed char, sign-extended by the C integer promotion
                v = ((v << 8) & _M) | (c & _M)
                full_bytes -= 1
            arr.append(v)
    h0, h1 = _round(_FULLROUNDS, arr, h0, h1)
    return h0 ^ h1


def name_hash(name: str | bytes, regex: re.Pattern[bytes] | None = RSYNC_REGEX) -> int:
    """The hash DHT places ``name`` by (after rsync temp-name munging)."""
    raw = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
    if regex is not None:
        m = regex.match(raw)
        if m and m.group(1) is not None and len(m.group(1)) < len(raw) + 1:
            raw = m.group(1)
    return dm_hash(raw)


@dataclass(frozen=True)
class Range:
    commit_hash: int
    type: int
    start: int
    stop: int

    @property
    def empty(self) -> bool:
        return self.start == 0 and self.stop == 0

    def holds(self, h: int) -> bool:
        return not self.empty and self.start <= h <= self.stop

    def encode(self) -> bytes:
        return struct.pack(">IIII", self.commit_hash, self.type, self.start, self.stop)

    @classmethod
    def decode(cls, value: bytes) -> "Range":
        if len(value) < 16:
            raise ValueError(f"layout xattr of {len(value)} bytes")
        return cls(*struct.unpack(">IIII", value[:16]))


def new_layout(count: int, start_index: int = 0, commit_hash: int = 0) -> list[Range]:
    """Even ranges over the 32-bit hash space, the first one on ``start_index`` (as gluster rotates them)."""
    chunk = (1 << 32) // count
    out: list[Range | None] = [None] * count
    start = 0
    for k in range(count):
        i = (start_index + k) % count
        stop = 0xFFFFFFFF if k == count - 1 else start + chunk - 1
        out[i] = Range(commit_hash, HASH_TYPE_DM, start, stop)
        start = stop + 1
    return [r for r in out if r is not None]


def pick(ranges: list[Range | None], name: str) -> int | None:
    """Index of the subvolume whose range holds ``name``'s hash, or None (a hole)."""
    h = name_hash(name)
    for i, r in enumerate(ranges):
        if r is not None and r.holds(h):
            return i
    return None
