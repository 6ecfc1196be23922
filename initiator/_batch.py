"""Work deferred to the end of a batch of completion callbacks (`CALLBACKS`).

What it does: a loop that runs many completion callbacks in a row (a queue's reader with a
receive's worth of completions, the RAM bdev's deferred-call task) brackets them with
`CALLBACKS.begin()` / `CALLBACKS.end()`. A callback that has work better done once for the
whole batch, or after the batch's bookkeeping, hands it over with `CALLBACKS.defer(fn)`:
`fn()` then runs from `end()`, after the last callback of the batch. Outside a batch `defer`
returns False and queues nothing, so the callback does the work itself: a callback never
depends on the loop that calls it.

Why: each FUSE reply's `writev` completes the reading program's aio, and that program (fio,
qemu, on the same core) preempts the mount there. Written one per callback, every callback
after the first ran after such a preemption, on caches the reader had used; deferred to the
batch's end, the callbacks' Python runs in one go and the replies in one tight loop
(docs/performance.md, stop 20: FUSE 4K +3-5% on both files, fio's own CPU per I/O -10%). The
NBD server sends a batch's replies with one sendmsg at its end instead of waking its writer
task for them (NBD 4K +11-12%). Both then take the requests the program sent meanwhile right
there (FUSE +23%, NBD +16-18%: blockfs/_fuse_inline.py, the NBD server's `_take_now`).

What it does not do: threads (the trio thread only; a batch never spans a checkpoint, so two
trio runs never see each other's), or error handling: a deferred call should not raise (if
one does, the others still run and the error goes on to the loop, as a callback's would).
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
        if not self.depth and self.deferred:
            self.run_deferred()

    def run_deferred(self) -> None:
        """Run the deferred calls now (`end()` does, at depth 0; a hot loop that counts `depth`
        itself calls this when it has brought it to 0 with calls queued). Every one runs even
        if an earlier one raises (a consumer that deferred its flush relies on it); then the
        first error is re-raised."""
        calls = self.deferred
        self.deferred = []
        error = None
        for fn in calls:
            try:
                fn()
            except BaseException as e:     # re-raised below, after the rest have run
                if error is None:
                    error = e
        if error is not None:
            raise error

    def defer(self, fn: Callable[[], None]) -> bool:
        """Run `fn()` once the current batch has run; False (nothing queued) outside a batch."""
        if not self.depth:
            return False
        self.deferred.append(fn)
        return True


CALLBACKS = CallbackBatch()
