"""Small helpers for errors that cross trio nurseries."""

from __future__ import annotations


def leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (possibly nested) exception groups.

    trio wraps anything raised in a nursery body in an ExceptionGroup; the code that
    turns errors into user messages wants the error itself.
    """
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
