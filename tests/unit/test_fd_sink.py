"""`initiator._sink.FdSink`: a read destination that is a pipe.

- It stands where a memoryview would: `nbytes`, `len()`, slices that keep the root.
- Slice assignment appends to the pipe in order; once the pipe is full (a small pipe here) the
  rest goes to `spill` at the same offsets, and `drain_into_spill` gives back the whole
  transfer, byte for byte.
"""

from __future__ import annotations

import fcntl
import os

import pytest

from initiator._sink import FdSink

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@pytest.fixture
def pipe():
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    yield r, w
    os.close(r)
    os.close(w)


def read_all(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += os.read(fd, n - len(out))
    return bytes(out)


def test_it_looks_like_a_destination(pipe):
    r, w = pipe
    s = FdSink(w, 8192)
    assert len(s) == s.nbytes == 8192
    part = s[4096:]
    assert part.nbytes == 4096 and part.root is s
    assert s[8000:9000].nbytes == 192
    assert s[9000:].nbytes == 0


def test_assignments_append_to_the_pipe_in_order(pipe):
    r, w = pipe
    s = FdSink(w, 3000)
    data = os.urandom(3000)
    s[0:1000] = data[:1000]
    s[1000:3000] = memoryview(data)[1000:]
    assert s.written == 3000 and not s.overflow and s.spilled == 0
    assert read_all(r, 3000) == data


def test_a_full_pipe_spills_and_drain_restores_the_transfer(pipe):
    r, w = pipe
    size = fcntl.fcntl(w, F_SETPIPE_SZ, 4096)      # one page: the smallest pipe
    n = 64 * 1024
    data = os.urandom(n)
    s = FdSink(w, n)
    for off in range(0, n, 5000):                   # pieces that do not align with pages
        s[off:min(off + 5000, n)] = data[off:off + 5000]
    assert s.overflow
    assert s.written == size and s.written + s.spilled == n
    whole = s.drain_into_spill(r)
    assert bytes(whole) == data


def test_overflowed_by_the_caller_keeps_offsets(pipe):
    """The transport marks the overflow itself when splice finds the pipe full; later bytes go
    to `spill_view` at the offset after those in the pipe."""
    r, w = pipe
    s = FdSink(w, 100)
    s[0:10] = b"0123456789"
    s.overflowed()
    view = s.spill_view(90)
    view[:] = bytes(range(90))
    s.root.spilled += 90
    assert bytes(s.drain_into_spill(r)) == b"0123456789" + bytes(range(90))
