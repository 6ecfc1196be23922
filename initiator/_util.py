"""Small shared helpers for the trio shells: turning nursery ExceptionGroups back into the
single typed error the caller expects (trio >= 0.25 always groups nursery errors)."""

from __future__ import annotations

import contextlib

import trio


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e)
    else:
        yield exc


def collapse(exc: BaseException) -> BaseException:
    """The one exception that matters in a group: KeyboardInterrupt/SystemExit first, then the
    first that is not a cancellation; a group of only cancellations stays a group."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = list(_leaves(exc))
    for kind in (KeyboardInterrupt, SystemExit):
        for e in leaves:
            if isinstance(e, kind):
                return e
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    return real[0] if real else exc


@contextlib.contextmanager
def single_errors():
    """`with single_errors(): async with trio.open_nursery() ...`: re-raise a group's one
    meaningful exception instead of the group."""
    try:
        yield
    except BaseExceptionGroup as eg:
        e = collapse(eg)
        if e is eg:
            raise
        raise e from None
