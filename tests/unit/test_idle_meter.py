"""Busy time (CPU minus polling that found nothing, initiator._util.IdleMeter): whatever finds
work ends the process's polling stretch, not only the NVMe readers' next receive. Without
that, a FUSE mount's work between two NVMe receives counted as idle (a fifth of its CPU at 4K
QD32): here the FUSE workers' pre-read check (`ReadWithoutWaiting`); the NBD reader's receive
in tests/integration/test_nbd.py."""

from __future__ import annotations

import os
from time import perf_counter

import pytest
import trio

from blockfs._libfuse import ReadWithoutWaiting
from initiator._util import IdleMeter
from initiator.transport import POLL_IDLE


@pytest.fixture
def stretch():
    """An open polling stretch of 10 ms; the meter as it was afterwards."""
    saved = (POLL_IDLE.since, POLL_IDLE.total)
    POLL_IDLE.since = perf_counter() - 0.010
    POLL_IDLE.total = 0.0
    yield POLL_IDLE
    POLL_IDLE.since, POLL_IDLE.total = saved


def test_meter_opens_on_the_first_miss_and_closes_on_work():
    m = IdleMeter()
    m.miss(10.0)
    m.miss(10.5)             # still the same stretch
    m.work(11.0)
    m.work(12.0)             # nothing open: nothing added
    assert (m.since, m.total) == (0.0, 1.0)
    m.work_found()           # nothing open: nothing added, no clock read
    assert (m.since, m.total) == (0.0, 1.0)
    m.since = perf_counter() - 0.010
    m.work_found()
    assert m.since == 0.0 and 1.009 < m.total < 6


async def test_a_queued_fuse_request_ends_the_polling_stretch(stretch):
    r, w = os.pipe()
    try:
        os.write(w, b"x")                         # a request waiting on the descriptor
        assert await ReadWithoutWaiting(r)._wait_fuse_readable() is True
        assert stretch.since == 0.0 and 0.009 < stretch.total < 5
    finally:
        os.close(r)
        os.close(w)


async def test_a_fuse_request_announced_by_epoll_ends_the_polling_stretch(stretch):
    r, w = os.pipe()
    rw = ReadWithoutWaiting(r)

    async def orig() -> bool:                     # pyfuse3's wait, woken by a request
        os.write(w, b"x")
        await trio.lowlevel.checkpoint()
        return True
    rw._orig = orig
    try:
        assert await rw._wait_fuse_readable() is True
        assert stretch.since == 0.0 and stretch.total > 0.009
    finally:
        os.close(r)
        os.close(w)
