"""Bench-only: the run loop the helper FUSE processes share (scripts/_malloc_fuse.py,
scripts/_pyfuse3_ceiling.py). Not a user command."""

from __future__ import annotations

import signal
from typing import Any, Awaitable, Callable

import trio


async def run_until_stopped(serve: Callable[[Any], Awaitable[None]]) -> None:
    """Run `serve(task_status)` and print "READY" once it calls task_status.started(); exit on
    SIGTERM/SIGINT, or when `serve` returns (unmounted from outside, fusermount3 -u)."""
    async with trio.open_nursery() as nursery:
        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
            await serve(task_status)
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_on_signal)
        await nursery.start(run)
        print("READY", flush=True)
