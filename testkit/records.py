"""Checksummed fixed-size records, as the takeover tests' container writers append them: a reader can tell a
lost, repeated, reordered or damaged record from a whole stream."""

from __future__ import annotations

import struct
import zlib

RECORD = 32  # seq (8) + payload (20) + crc32 of the first 28 bytes (4)


def check_records(data: bytes, n: int) -> None:
    """``data`` is exactly records 0..n-1, in order, each intact."""
    assert len(data) == n * RECORD, f"{len(data)} bytes for {n} records of {RECORD}"
    for i in range(n):
        rec = data[i * RECORD:(i + 1) * RECORD]
        seq, = struct.unpack_from("<Q", rec)
        crc, = struct.unpack_from("<I", rec, 28)
        assert seq == i and zlib.crc32(rec[:28]) == crc, f"record {i} is damaged (seq {seq})"
