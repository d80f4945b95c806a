"""The POSIX byte-range locks one open file holds, per lock owner — to grant them again on a brick
that restarted (a restarted brick has forgotten every lock, so the other replicas alone would
carry them, and a few restarts later two clients could both hold one lock).

Pure bookkeeping, as the brick's posix-locks does it: a lock replaces whatever the same owner
held on its range (upgrade, downgrade, split); an unlock removes the range.
"""

from __future__ import annotations

from dataclasses import dataclass

EOF_ = 2**63 - 1  # "to the end of the file" (len 0)
UNLCK = 2


@dataclass(frozen=True)
class Segment:
    start: int
    end: int  # inclusive; EOF_ for "to the end of the file"
    type: int
    pid: int

    @property
    def len(self) -> int:
        return 0 if self.end == EOF_ else self.end - self.start + 1


class HeldLocks:
    def __init__(self) -> None:
        self._by_owner: dict[bytes, list[Segment]] = {}

    def apply(self, owner: bytes, type_: int, start: int, length: int, pid: int) -> None:
        """Record a granted lock (or an unlock) of ``owner`` on [start, start+length) (length 0: to EOF)."""
        end = EOF_ if length == 0 else start + length - 1
        kept: list[Segment] = []
        for s in self._by_owner.get(owner, []):
            if s.end < start or s.start > end:
                kept.append(s)
                continue
            if s.start < start:
                kept.append(Segment(s.start, start - 1, s.type, s.pid))
            if s.end > end:
                kept.append(Segment(end + 1, s.end, s.type, s.pid))
        if type_ != UNLCK:
            kept.append(Segment(start, end, type_, pid))
        if kept:
            self._by_owner[owner] = sorted(kept, key=lambda s: s.start)
        else:
            self._by_owner.pop(owner, None)

    def drop_owner(self, owner: bytes) -> None:
        """Everything of ``owner`` is gone (FLUSH with its lock owner: close() drops POSIX locks)."""
        self._by_owner.pop(owner, None)

    def items(self) -> list[tuple[bytes, Segment]]:
        return [(o, s) for o, segs in self._by_owner.items() for s in segs]

    def __bool__(self) -> bool:
        return bool(self._by_owner)
