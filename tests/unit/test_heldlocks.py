"""HeldLocks: the lock ranges one fd holds per owner, kept the way the brick's posix-locks keeps them."""

from __future__ import annotations

from gfuse.heldlocks import EOF_, HeldLocks, Segment

RD, WR, UN = 0, 1, 2


def segs(h: HeldLocks) -> list[tuple[bytes, int, int, int]]:
    return [(o, s.start, s.end, s.type) for o, s in h.items()]


def test_lock_split_and_unlock() -> None:
    h = HeldLocks()
    h.apply(b"a", WR, 0, 100, 7)
    h.apply(b"a", UN, 40, 20, 7)           # a hole in the middle
    assert segs(h) == [(b"a", 0, 39, WR), (b"a", 60, 99, WR)]
    h.apply(b"a", RD, 30, 40, 7)           # downgrade across the hole
    assert segs(h) == [(b"a", 0, 29, WR), (b"a", 30, 69, RD), (b"a", 70, 99, WR)]
    h.apply(b"a", UN, 0, 0, 7)             # unlock to EOF: nothing left
    assert segs(h) == [] and not h


def test_owners_are_separate_and_eof_ranges() -> None:
    h = HeldLocks()
    h.apply(b"a", WR, 10, 0, 1)
    h.apply(b"b", RD, 0, 5, 2)
    h.apply(b"a", UN, 0, 20, 1)
    assert segs(h) == [(b"a", 20, EOF_, WR), (b"b", 0, 4, RD)]
    assert [s.len for _, s in h.items()] == [0, 5]
    h.drop_owner(b"b")
    assert segs(h) == [(b"a", 20, EOF_, WR)]
    assert Segment(20, EOF_, WR, 1).len == 0
