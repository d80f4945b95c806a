"""The fd table of one layer: the handles it hands up, and what it keeps for each.

Every layer that opens files numbers its own handles (the protocol client, replicate, distribute,
the graph switch): the handle in ``Result.fd`` of an open/create/opendir is replaced by the layer's
own before the reply goes up, and the layer finds its state for a handle here on every later call.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import ItemsView, Iterator, ValuesView
from typing import Generic, TypeVar

from ..fops import Result

T = TypeVar("T")


class Handles(Generic[T]):
    """Handles 1, 2, 3… of layer ``owner``, each mapped to its state (never reused while the layer lives)."""

    def __init__(self, owner: str, what: str = "fd") -> None:
        self.owner = owner
        self.what = what
        self._items: dict[int, T] = {}
        self._numbers = itertools.count(1)

    def add(self, state: T) -> int:
        handle = next(self._numbers)
        self._items[handle] = state
        return handle

    def adopt(self, r: Result, state: T) -> Result:
        """Give the reply of an opening fop this layer's handle for ``state`` (in place; returns ``r``)."""
        r.fd = self.add(state)
        return r

    def get(self, handle: int) -> T:
        """The state of ``handle``; ``EBADF`` for a handle this layer never gave or already released."""
        try:
            return self._items[handle]
        except KeyError:
            raise OSError(errno.EBADF, f"{self.owner}: unknown {self.what} {handle}") from None

    def put(self, handle: int, state: T) -> None:
        """Give ``state`` a chosen handle (a successor process reopening what the kernel holds, gfuse.takeover);
        later handles are numbered above it."""
        self._items[handle] = state
        self.skip_to(handle)

    def skip_to(self, handle: int) -> None:
        """Number every later handle above ``handle``."""
        nxt = next(self._numbers)
        self._numbers = itertools.count(max(nxt, handle + 1))

    def find(self, handle: int) -> T | None:
        return self._items.get(handle)

    def pop(self, handle: int) -> T | None:
        return self._items.pop(handle, None)

    def values(self) -> ValuesView[T]:
        return self._items.values()

    def items(self) -> ItemsView[int, T]:
        return self._items.items()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[int]:
        return iter(self._items)
