"""`call_soon(fn, arg)`: run `fn(arg)` on the trio thread a scheduler pass later, from a task.

What it does: bdevs that finish a command at once (the RAM bdev) still have to keep the
`read_blocks_nowait` promise that `on_done` runs later and from another task, never inside the
call that started the I/O. One system task per trio run takes the queued calls in batches; it
parks when there is nothing to do (`wait_task_rescheduled`), so a call costs a list append and,
for the first of a batch, one `reschedule`. Each batch is one batch of completion callbacks
(`initiator._batch.CALLBACKS`): what its calls defer runs after the last of them.

What it does not do: threads (call it from the trio thread only), ordering between different
runs, or error handling: `fn` must not raise (a bdev completion callback never does); if one
does, the error is logged and the rest of the batch still runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio
from trio.lowlevel import Abort, RunVar, current_task, reschedule, spawn_system_task, wait_task_rescheduled

from initiator._batch import CALLBACKS

__all__ = ["call_soon"]

log = logging.getLogger(__name__)


class _Soon:
    __slots__ = ("calls", "task", "parked")

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[[Any], None], Any]] = []
        self.task: Any = None
        self.parked = False

    async def run(self) -> None:
        self.task = current_task()
        while True:
            if not self.calls:
                self.parked = True
                await wait_task_rescheduled(self._abort)
                continue
            calls, self.calls = self.calls, []
            CALLBACKS.begin()       # one batch of completion callbacks (initiator._batch)
            try:
                for fn, arg in calls:
                    try:
                        fn(arg)
                    except Exception:   # a consumer's bug must not kill the run's system task
                        log.exception("deferred call %r failed", fn)
            finally:
                CALLBACKS.end()
            await trio.lowlevel.checkpoint()

    def _abort(self, _raise_cancel: Any) -> Abort:
        self.parked = False
        return Abort.SUCCEEDED


_SOON: RunVar[_Soon] = RunVar("bdev_call_soon")


def call_soon(fn: Callable[[Any], None], arg: Any) -> None:
    """Queue `fn(arg)` to run from this run's deferred-call task (trio thread only)."""
    try:
        soon = _SOON.get()
    except LookupError:
        soon = _Soon()
        _SOON.set(soon)
        spawn_system_task(soon.run, name="bdev-call-soon")
    soon.calls.append((fn, arg))
    if soon.parked:
        soon.parked = False
        reschedule(soon.task)
