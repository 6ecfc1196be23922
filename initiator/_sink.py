"""`FdSink`: a read destination that is a pipe, so a payload can go socket -> pipe with splice(2).

What it does: stands where a read's `memoryview` would (`Queue.read_nowait(..., buf=FdSink)`):
it has the `nbytes`, `len()`, slicing and slice assignment that the sans-IO core uses on a
destination, but its bytes are appended to the pipe `fd` in order (the core checks that a
command's data arrives at consecutive offsets: NVMe/TCP 3.6.2.9 DATAO, so position needs no
tracking). The transport shell moves large payloads with `os.splice` from the socket straight
into the pipe (page references, no copy in user space); the rare bytes already in the receive
buffer are written with `os.write`. A consumer then splices the pipe onward (FUSE: to /dev/fuse,
one copy in the kernel instead of two in all).

`overflow`: the pipe ran out of room (each of the socket's page fragments takes one of its
slots), so the rest of the transfer went to `spill`, a buffer of the transfer's size, at the
same offsets: the consumer moves the `written` bytes from the pipe to the start of `spill`
(`drain_into_spill`) and has the whole transfer in memory. The pipe write end must be
non-blocking. Overflow is the safety net, not the plan: size the pipe (F_SETPIPE_SZ).

What it does not do: digests (the CRC needs the bytes in user space: callers only use it with
digests off), seeking, or reading.
"""

from __future__ import annotations

import os

__all__ = ["FdSink"]


class FdSink:
    __slots__ = ("fd", "nbytes", "root", "overflow", "written", "spill", "spilled")

    def __init__(self, fd: int, nbytes: int, root: "FdSink | None" = None) -> None:
        self.fd = fd
        self.nbytes = nbytes
        self.root = self if root is None else root
        # Meaningful on the root:
        self.overflow = False
        self.written = 0           # bytes that reached the pipe
        self.spill: memoryview | None = None   # after an overflow: the transfer's bytes
        self.spilled = 0           # bytes in spill after the `written` ones

    def __len__(self) -> int:
        return self.nbytes

    def __getitem__(self, key: slice) -> "FdSink":
        start, stop, _ = key.indices(self.nbytes)
        return FdSink(self.fd, max(stop - start, 0), self.root)

    def __setitem__(self, key: slice, data) -> None:
        """Append `data` (the next bytes of the transfer) to the pipe, or to `spill` once the
        pipe is full."""
        root = self.root
        mv = memoryview(data).cast("B")
        while len(mv) and not root.overflow:
            try:
                n = os.write(self.fd, mv)
            except BlockingIOError:
                self.overflowed()
                break
            root.written += n
            mv = mv[n:]
        if len(mv):
            root.spill_view(len(mv))[:] = mv
            root.spilled += len(mv)

    def overflowed(self) -> None:
        """The pipe is full: the rest of the transfer goes to `spill`."""
        root = self.root
        if not root.overflow:
            root.overflow = True
            root.spill = memoryview(bytearray(root.nbytes))

    def spill_view(self, n: int) -> memoryview:
        """Where the next `n` bytes go after an overflow (the root's `spill`)."""
        root = self.root
        pos = root.written + root.spilled
        return root.spill[pos:pos + n]

    def drain_into_spill(self, rfd: int) -> memoryview:
        """After an overflowed transfer: read the `written` bytes back from the pipe's read end
        `rfd` (which must hold nothing before them) into the start of `spill`; returns it."""
        root = self.root
        pos = 0
        while pos < root.written:
            pos += os.readv(rfd, [root.spill[pos:root.written]])
        return root.spill
