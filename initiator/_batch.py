"""Work deferred to the end of a batch of completion callbacks (`CALLBACKS`).

What it does: a loop that runs many completion callbacks in a row (a queue's reader with a
receive's worth of completions, the RAM bdev's deferred-call task) brackets them with
`CALLBACKS.begin()` / `CALLBACKS.end()`. A callback that has work better done once for the
whole batch, or after the batch's bookkeeping, hands it over with `CALLBACKS.defer(fn)`:
`fn()` then runs from `end()`, after the last callback of the batch. Outside a batch `defer`
returns False and queues nothing, so the callback does the work itself: a callback never
depends on the loop that calls it.

Why: the FUSE mount's replies. Each reply's `writev` completes the reading program's aio, and
that program (fio, qemu) preempts the mount there, on the same core. With the replies written
one per callback, the mount's Python between two replies (the next callback's bookkeeping)
runs with the caches the reader just used; deferred to the batch's end, the replies go out
in a tight loop after all of it (docs/performance.md, stop 20: FUSE 4K +4-5% on both files).

What it does not do: threads (the trio thread only; a batch never spans a checkpoint, so two
trio runs never see each other's), or error handling: a deferred call must not raise.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["CALLBACKS", "CallbackBatch"]


class CallbackBatch:
    """The batch being run (nesting counted) and the calls deferred to its end."""

    __slots__ = ("depth", "deferred")

    def __init__(self) -> None:
        self.depth = 0
        self.deferred: list[Callable[[], None]] = []

    def begin(self) -> None:
        self.depth += 1

    def end(self) -> None:
        """Leave the batch; the outermost end runs the deferred calls (outside the batch: what
        they would defer, they do at once)."""
        self.depth -= 1
        if self.depth or not self.deferred:
            return
        calls = self.deferred
        self.deferred = []
        for fn in calls:
            fn()

    def defer(self, fn: Callable[[], None]) -> bool:
        """Run `fn()` once the current batch has run; False (nothing queued) outside a batch."""
        if not self.depth:
            return False
        self.deferred.append(fn)
        return True


CALLBACKS = CallbackBatch()
