"""The top of the stack across volfile changes: new work goes to the newest graph.

When glusterd hands out a new volfile (add-brick, remove-brick, a changed option), the mount
builds a second graph beside the first; this layer then sends every new lookup, open and
gfid-based call to it. Open files and directories stay on the graph they were opened on until
they are released (their locks and eager-lock state live there), and an old graph is stopped when
its last handle is gone. Handles are numbered here, so two graphs' numbers never mix.
"""

from __future__ import annotations

import errno
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

#: fops whose first argument is an open handle
HANDLE_FOPS = frozenset({
    "read", "write", "flush", "fsync", "fstat", "ftruncate", "fsetattr", "fsetxattr", "fgetxattr",
    "fremovexattr", "lk", "fallocate", "discard", "zerofill", "readdirp", "readdir", "readdirp_all", "seek",
    "finodelk", "fentrylk", "fxattrop",
})
#: fops whose result carries a new handle in ``.fd``
OPENING_FOPS = frozenset({"open", "create", "opendir"})


@dataclass
class _Generation:
    top: Any
    on_idle: Callable[[], None] | None
    handles: int = 0
    #: calls in progress on this graph (a lookup that started before a switch must finish on it)
    busy: int = 0


class GraphSwitch:
    """Delegates to the current graph's top; handle-based fops to the graph that made the handle."""

    def __init__(self, top: Any) -> None:
        self._current = _Generation(top, None)
        self._handles: dict[int, tuple[_Generation, int]] = {}
        self._next = 0
        self.generation = 1

    @property
    def current(self) -> Any:
        return self._current.top

    def switch(self, top: Any, retire: Callable[[], None]) -> None:
        """Send new work to ``top``; ``retire()`` is called once the old graph has no open handle."""
        old = self._current
        self._current = _Generation(top, None)
        self.generation += 1
        old.on_idle = retire
        self._maybe_retire(old)

    def _maybe_retire(self, gen: _Generation) -> None:
        if gen is not self._current and gen.handles == 0 and gen.busy == 0 and gen.on_idle is not None:
            retire, gen.on_idle = gen.on_idle, None
            retire()

    async def _on(self, gen: _Generation, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        gen.busy += 1
        try:
            return await fn(*args, **kw)
        finally:
            gen.busy -= 1
            self._maybe_retire(gen)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in HANDLE_FOPS:
            async def by_handle(handle: int, *args: Any, **kw: Any) -> Any:
                gen, inner = self._lookup(handle)
                return await self._on(gen, getattr(gen.top, name), inner, *args, **kw)
            self.__dict__[name] = by_handle  # dispatches per call: safe to keep
            return by_handle
        if name in OPENING_FOPS:
            async def opening(*args: Any, **kw: Any) -> Any:
                gen = self._current
                gen.handles += 1  # reserved first: the graph must not be retired under the new handle
                try:
                    r = await self._on(gen, getattr(gen.top, name), *args, **kw)
                except BaseException:
                    gen.handles -= 1
                    self._maybe_retire(gen)
                    raise
                self._next += 1
                self._handles[self._next] = (gen, r.fd)
                r.fd = self._next
                return r
            self.__dict__[name] = opening
            return opening
        gen = self._current
        attr = getattr(gen.top, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def counted(*args: Any, **kw: Any) -> Any:
            return await self._on(gen, attr, *args, **kw)
        return counted

    def _lookup(self, handle: int) -> tuple[_Generation, int]:
        try:
            return self._handles[handle]
        except KeyError:
            raise OSError(errno.EBADF, f"unknown handle {handle}") from None

    async def release(self, handle: int) -> None:
        entry = self._handles.pop(handle, None)
        if entry is None:
            return
        gen, inner = entry
        try:
            await self._on(gen, gen.top.release, inner)
        finally:
            gen.handles -= 1
            self._maybe_retire(gen)
