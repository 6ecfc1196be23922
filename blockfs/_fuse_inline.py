"""Taking the FUSE requests queued behind a batch of read replies at once (`InlineRequests`).

What it does: when `FastReads` (blockfs/_libfuse.py) has written a batch of replies, the
reading program has already submitted its next requests (fio preempts the mount inside each
reply's writev and queues the next read), so that many requests wait in /dev/fuse. A pyfuse3
worker would take them a scheduler pass later, once epoll reported the descriptor; the NVMe
queue's reader meanwhile received again, so about a third of fio's 32 reads waited there and
each NVMe batch was about 8 requests instead of 14, sharing its receive, sendmsg and scheduler
passes among fewer (docs/performance.md, stop 20: taken here, fuse-nvme-4k +23%, the RAM
bdev's file +6%). `take()` reads and starts them from the task that wrote the replies.

How: libfuse's `fuse_session_receive_buf` and `fuse_session_process_buf` on pyfuse3's session
(ctypes, GIL held), with a worker's checks: `poll(fd, 0)` first, so the read never blocks (one
trio thread: nothing else reads in between), and a stop at any error (the session is ending:
the workers see it too) or once the session has exited. A read lands in the FastReads read slot
as it would from a worker. Any other request goes to pyfuse3's handler, which leaves its
coroutine in the module static `py_retval` for the worker that processed the request to await
(pyfuse3 3.x `_session_loop`): it is taken from there (the static reset to None, its reference
moved) and awaited by a task in the mount's nursery, where a worker would have awaited it. The
static is also reset before each request, as the worker resets it: a worker suspended inside a
handler holds its own reference. Awaiting the coroutine a pass later is safe for the same reason
it is for pyfuse3's workers, which await it only after `fuse_session_process_buf` has returned:
libfuse's request buffer (a write's data included) is reused by the next receive, so pyfuse3's
handlers copy what they need before they return (tests/fuse: verified mixed reads and writes). `locate` raises ValueError when the static is not found or not
None (another pyfuse3 layout): the mount then runs without this, as before.

What it does not do: anything after `close()`, outside a mounted session, or more than LIMIT
requests per call; it answers no request itself.
"""

from __future__ import annotations

import ctypes
import logging
import select
from typing import Any

from ._libfuse import FastReads, PyfuseSession, _ptr_at, pyfuse3_statics

__all__ = ["InlineRequests"]

log = logging.getLogger("blockfs.fuse")


class _FuseBuf(ctypes.Structure):
    """struct fuse_buf (fuse_common.h, libfuse 3): size, flags, mem, fd, pos."""

    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class InlineRequests:
    """The FUSE requests already waiting, read and started by the task that has just written a
    batch of replies (`FastReads._flush_replies`), as a pyfuse3 worker would read them (see the
    module docstring)."""

    LIMIT = 64

    def __init__(self, fs: Any, fast: FastReads, se: PyfuseSession, retval_addr: int) -> None:
        self.fs = fs
        self.fast = fast
        self._se = se.session
        self._retval = _ptr_at(retval_addr)
        self._none = id(None)
        libfuse = ctypes.PyDLL("libfuse3.so.3")     # PyDLL: the GIL stays held
        self._receive = libfuse.fuse_session_receive_buf
        self._receive.argtypes = (ctypes.c_void_p, ctypes.POINTER(_FuseBuf))
        self._receive.restype = ctypes.c_int
        self._process = libfuse.fuse_session_process_buf
        self._process.argtypes = (ctypes.c_void_p, ctypes.POINTER(_FuseBuf))
        self._process.restype = None
        self._exited = libfuse.fuse_session_exited
        self._exited.argtypes = (ctypes.c_void_p,)
        self._exited.restype = ctypes.c_int
        self._buf = ctypes.pointer(_FuseBuf())      # libfuse allocates its memory once
        poller = select.poll()
        poller.register(se.fd, select.POLLIN)
        self._poll = poller.poll
        self._busy = False
        self.closed = False
        self.taken = 0          # requests read here
        self.handed = 0         # ... of which pyfuse3's handler coroutines, awaited by a task

    @staticmethod
    def locate() -> int:
        """The address of pyfuse3's `py_retval` static; ValueError if it is not as expected."""
        addr = pyfuse3_statics("py_retval")["py_retval"][0]
        if _ptr_at(addr).value != id(None):
            raise ValueError("pyfuse3's py_retval does not hold None")
        return addr

    def install(self) -> None:
        self.fast.inline = self
        log.info("FUSE: requests queued behind a batch of replies are taken at once")

    def close(self) -> None:
        self.closed = True
        self.fast.inline = None

    def statistics(self) -> dict:
        return {"inline": self.taken, "inline_handed": self.handed}

    def take(self) -> int:
        """Read and start the requests waiting now (at most LIMIT); how many."""
        nursery = self.fs._nursery
        if self._busy or self.closed or nursery is None or self._exited(self._se):
            return 0
        self._busy = True
        try:
            poll = self._poll
            receive = self._receive
            process = self._process
            se = self._se
            buf = self._buf
            retval = self._retval
            none = self._none
            n = 0
            while n < self.LIMIT and poll(0):
                if receive(se, buf) <= 0:
                    break                           # -EINTR, -ENODEV...: leave it to a worker
                if retval.value != none:
                    self._reset_retval()
                process(se, buf)
                n += 1
                if retval.value != none:
                    coro = ctypes.cast(retval.value, ctypes.py_object).value
                    self._reset_retval()
                    self.handed += 1
                    nursery.start_soon(_await_handler, coro)
            self.taken += n
            return n
        finally:
            self._busy = False

    def _reset_retval(self) -> None:
        """py_retval = None, as Cython would assign it: a new reference to None, the old one
        dropped."""
        old = self._retval.value
        _incref(None)
        self._retval.value = self._none
        _decref(ctypes.c_void_p(old))


_incref = ctypes.pythonapi.Py_IncRef
_incref.argtypes = (ctypes.py_object,)
_incref.restype = None
_decref = ctypes.pythonapi.Py_DecRef
_decref.argtypes = (ctypes.c_void_p,)
_decref.restype = None


async def _await_handler(coro: Any) -> None:
    """A pyfuse3 handler's coroutine taken by InlineRequests (it replies to its request)."""
    await coro
