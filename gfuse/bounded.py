"""A dict that forgets its oldest entries past a size: per-inode knowledge must not grow without end."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedDict(dict[K, V]):
    def __init__(self, limit: int = 100_000) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: K, value: V) -> None:
        if key in self:
            super().__delitem__(key)  # refresh: becomes the newest
        super().__setitem__(key, value)
        while len(self) > self.limit:
            super().__delitem__(next(iter(self)))
