"""The bdev core: `Bdev`, `IoChannel`, `BdevDesc`, `BdevEvent`, `IoType`, `BdevError`.

What it does: everything a block device has in common, whatever is behind it. A subclass implements
the `_submit_*` hooks for whole, in-range, size-limited commands; the base does the rest:
- bounds checks against the *current* `num_blocks` (after a shrink, I/O past the new end fails with
  EINVAL and never reaches the subclass), removed -> ENODEV, read-only -> EROFS;
- splitting of commands larger than `max_io_bytes` (and across `optimal_io_boundary`), the pieces
  run concurrently;
- emulation of what the subclass does not support: WRITE_ZEROES by writing zeroes, FUA by a write
  then a flush, FLUSH by nothing (no volatile cache);
- the byte API (any offset and length) with read-modify-write for unaligned edges, under a per-bdev
  block-range lock shared by a bdev and its partitions, so that two concurrent byte-API writes
  touching one block never lose either's data;
- statistics (`statistics()`), descriptors and resize/remove events.

What it does not do: partitions (part.py, examine.py), naming and lookup (registry.py), or any
transport. Only byte-API writes take the range lock; the block API is the hot path and takes none
(like O_DIRECT against buffered I/O on Linux, a block-API write racing a byte-API write on the same
block has no defined order).

Hot path: a channel call does a few attribute checks, one `perf_counter_ns()` pair and the subclass
call; no per-I/O objects beyond the caller's buffer (see docs/hot-path.md).
"""

from __future__ import annotations

import enum
import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

import trio

# A read destination that is a pipe (splice from the socket): defined by the initiator, whose
# transport fills it, and part of this layer's contract (read_blocks_nowait, `fd_reads`).
from initiator._sink import FdSink

# The batches of completion callbacks that `read_blocks_nowait`'s on_done may run in, and the
# work a consumer defers to a batch's end: the initiator's (its queues' readers run them).
from initiator._batch import CALLBACKS

__all__ = ["CALLBACKS", "Bdev", "BdevDesc", "BdevError", "BdevEvent", "IoChannel", "IoType"]

log = logging.getLogger(__name__)

# Largest number of split pieces in flight at once for one oversized request.
_SPLIT_WINDOW = 32
# Unaligned byte writes up to this size are patched into one buffer and written with one command;
# larger ones write the aligned middle straight from the caller's data (no copy) and RMW the edges.
_RMW_COALESCE_BYTES = 128 * 1024
# Chunk used to emulate WRITE_ZEROES with ordinary writes.
_ZERO_CHUNK = 1 << 20


class IoType(enum.IntEnum):
    READ = 1
    WRITE = 2
    FLUSH = 3
    WRITE_ZEROES = 4
    UNMAP = 5
    FUA = 6


class BdevError(Exception):
    """The only error bdev I/O raises. `.errno` is what a frontend hands to its client."""

    def __init__(self, errno_value: int, message: str = "") -> None:
        super().__init__(errno_value, message or errno.errorcode.get(errno_value, str(errno_value)))
        self.errno = errno_value
        self.message = message

    def __str__(self) -> str:
        name = errno.errorcode.get(self.errno, str(self.errno))
        return f"[{name}] {self.message}" if self.message else name


@dataclass(frozen=True, slots=True)
class BdevEvent:
    type: str  # "resize" | "remove"
    bdev: Bdev
    old_num_blocks: int
    new_num_blocks: int


class BdevDesc:
    """An open of a bdev: the way to hear about its resize and removal (SPDK's spdk_bdev_desc)."""

    __slots__ = ("bdev", "write", "_event_cb", "_closed")

    def __init__(self, bdev: Bdev, event_cb: Callable[[BdevEvent], None] | None, write: bool) -> None:
        self.bdev = bdev
        self.write = write
        self._event_cb = event_cb
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.bdev._descs.remove(self)

    def _deliver(self, event: BdevEvent) -> None:
        cb = self._event_cb
        if cb is None or self._closed:
            return
        try:
            cb(event)
        except Exception:  # one consumer's bug must not stop the event reaching the others
            log.exception("%s: %s event callback %r failed", self.bdev.name, event.type, cb)


class _RangeLock:
    """Block-range lock for read-modify-write. Entries are [start, end, Event | None] lists; the
    Event is only made when somebody has to wait, so an uncontended write allocates one small list.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: list[list[Any]] = []

    async def acquire(self, start: int, end: int) -> list[Any]:
        held = self._held
        while True:
            for ent in held:
                if ent[0] < end and start < ent[1]:
                    ev = ent[2]
                    if ev is None:
                        ev = ent[2] = trio.Event()
                    await ev.wait()
                    break
            else:
                ent = [start, end, None]
                held.append(ent)
                return ent

    def release(self, ent: list[Any]) -> None:
        held = self._held
        for i, e in enumerate(held):
            if e is ent:
                del held[i]
                break
        if ent[2] is not None:
            ent[2].set()

    def locked(self) -> int:
        return len(self._held)


class Bdev:
    """Base class of every block device. See docs/bdev-interface.md for the contract."""

    # Extension: `read_blocks_nowait` also takes an `FdSink` (the data goes socket -> pipe with
    # splice, no copy in this process). NVMe bdevs without digests and their partitions.
    fd_reads = False

    def __init__(
        self,
        name: str,
        block_size: int,
        num_blocks: int,
        *,
        uuid: str | None = None,
        product_name: str = "",
        optimal_io_boundary: int = 0,
        max_io_bytes: int = 0,
        read_only: bool = False,
        unmap_zeroes: bool = False,
    ) -> None:
        if block_size <= 0 or num_blocks < 0:
            raise ValueError(f"bad geometry: {num_blocks} blocks of {block_size} bytes")
        if max_io_bytes and max_io_bytes < block_size:
            raise ValueError(f"max_io_bytes {max_io_bytes} is smaller than a block ({block_size})")
        self.name = name
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.uuid = uuid
        self.product_name = product_name
        self.optimal_io_boundary = optimal_io_boundary
        self.max_io_bytes = max_io_bytes
        self.read_only = read_only
        # Extension: unmapped blocks read back as zeroes (NVMe DLFEAT "read 00h"); a FUSE punch-hole
        # may then use UNMAP, otherwise it has to write zeroes.
        self.unmap_zeroes = unmap_zeroes
        self.removed = False
        self.claimed_by: str | None = None
        # Extension: the bdev this one is a window on (PartBdev), else None.
        self.base: Bdev | None = None
        self._descs: list[BdevDesc] = []
        self._lock = _RangeLock()
        self._lock_shift = 0  # a partition shares its base's lock, shifted by its offset
        # statistics
        self._bytes_read = 0
        self._num_read_ops = 0
        self._bytes_written = 0
        self._num_write_ops = 0
        self._bytes_unmapped = 0
        self._num_unmap_ops = 0
        self._num_flush_ops = 0
        self._bytes_zeroed = 0
        self._num_write_zeroes_ops = 0
        self._read_latency_ticks = 0
        self._write_latency_ticks = 0
        self._unmap_latency_ticks = 0
        self._flush_latency_ticks = 0
        self._write_zeroes_latency_ticks = 0
        self._errors = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.num_blocks}x{self.block_size}>"

    # -- description -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.num_blocks * self.block_size

    def io_type_supported(self, io_type: IoType) -> bool:
        """Subclasses override; the base knows only READ and WRITE."""
        return io_type in (IoType.READ, IoType.WRITE)

    def statistics(self) -> dict[str, int]:
        return {
            "bytes_read": self._bytes_read,
            "num_read_ops": self._num_read_ops,
            "bytes_written": self._bytes_written,
            "num_write_ops": self._num_write_ops,
            "bytes_unmapped": self._bytes_unmapped,
            "num_unmap_ops": self._num_unmap_ops,
            "num_flush_ops": self._num_flush_ops,
            "bytes_zeroed": self._bytes_zeroed,
            "num_write_zeroes_ops": self._num_write_zeroes_ops,
            "read_latency_ticks": self._read_latency_ticks,
            "write_latency_ticks": self._write_latency_ticks,
            "unmap_latency_ticks": self._unmap_latency_ticks,
            "flush_latency_ticks": self._flush_latency_ticks,
            "write_zeroes_latency_ticks": self._write_zeroes_latency_ticks,
            "errors": self._errors,
        }

    # -- descriptors, claims, channels -------------------------------------------------------------

    def open(self, event_cb: Callable[[BdevEvent], None] | None = None, *, write: bool = False) -> BdevDesc:
        if self.removed:
            raise BdevError(errno.ENODEV, f"{self.name} has been removed")
        if write and self.read_only:
            raise BdevError(errno.EROFS, f"{self.name} is read-only")
        if write and self.claimed_by is not None:
            raise BdevError(errno.EPERM, f"{self.name} is claimed by {self.claimed_by}")
        desc = BdevDesc(self, event_cb, write)
        self._descs.append(desc)
        return desc

    def claim(self, module_name: str) -> None:
        if self.claimed_by is not None and self.claimed_by != module_name:
            raise BdevError(errno.EBUSY, f"{self.name} is already claimed by {self.claimed_by}")
        self.claimed_by = module_name

    def release_claim(self) -> None:
        self.claimed_by = None

    def get_io_channel(self) -> IoChannel:
        if self.removed:
            raise BdevError(errno.ENODEV, f"{self.name} has been removed")
        return IoChannel(self, self._create_channel_ctx())

    # -- events (called by the owner) --------------------------------------------------------------

    def notify_resize(self, new_num_blocks: int) -> None:
        """The device now has `new_num_blocks`; I/O is checked against the new size from now on."""
        if new_num_blocks < 0:
            raise ValueError(f"negative size {new_num_blocks}")
        old = self.num_blocks
        if self.removed or new_num_blocks == old:
            return
        self.num_blocks = new_num_blocks
        log.info("%s: resized from %d to %d blocks", self.name, old, new_num_blocks)
        event = BdevEvent("resize", self, old, new_num_blocks)
        for desc in list(self._descs):
            desc._deliver(event)

    def hot_remove(self) -> None:
        """The device is gone: new I/O fails with ENODEV, every open descriptor hears "remove"."""
        if self.removed:
            return
        self.removed = True
        log.info("%s: removed", self.name)
        event = BdevEvent("remove", self, self.num_blocks, self.num_blocks)
        for desc in list(self._descs):
            desc._deliver(event)

    # -- subclass hooks ----------------------------------------------------------------------------

    def _create_channel_ctx(self) -> Any:
        return None

    def _destroy_channel_ctx(self, ctx: Any) -> None:
        """Extension: undo `_create_channel_ctx` (called by `IoChannel.close`)."""

    async def _submit_read(self, ctx: Any, lba: int, nblocks: int, buf: memoryview) -> None:
        raise BdevError(errno.EOPNOTSUPP, "read not implemented")

    def _submit_read_nowait(self, ctx: Any, lba: int, nblocks: int, buf: memoryview,
                            on_done: Callable[[Any], None]) -> bool:
        """Extension: start a read that completes through `on_done(err)` without a task waiting
        on it; False if it cannot start now (the caller then awaits `_submit_read`). `err` is
        None on success (the NVMe queue's own callback convention, so its completion calls the
        channel's closure with no adapter between), else what failed (any object, only tested
        against None): redo it with the awaited path, which applies the full error handling."""
        return False

    async def _submit_write(self, ctx: Any, lba: int, nblocks: int, data: memoryview, fua: bool) -> None:
        raise BdevError(errno.EOPNOTSUPP, "write not implemented")

    async def _submit_flush(self, ctx: Any) -> None:
        raise BdevError(errno.EOPNOTSUPP, "flush not implemented")

    async def _submit_write_zeroes(self, ctx: Any, lba: int, nblocks: int) -> None:
        raise BdevError(errno.EOPNOTSUPP, "write zeroes not implemented")

    async def _submit_unmap(self, ctx: Any, lba: int, nblocks: int) -> None:
        raise BdevError(errno.EOPNOTSUPP, "unmap not implemented")

    # -- checks and splitting (internal) -----------------------------------------------------------

    def _check(self, lba: int, nblocks: int, write: bool) -> None:
        if self.removed:
            raise BdevError(errno.ENODEV, f"{self.name} has been removed")
        if write and self.read_only:
            raise BdevError(errno.EROFS, f"{self.name} is read-only")
        if lba < 0 or nblocks < 0 or lba + nblocks > self.num_blocks:
            raise BdevError(
                errno.EINVAL, f"{self.name}: blocks {lba}+{nblocks} outside 0..{self.num_blocks}"
            )

    def _pieces(self, lba: int, nblocks: int, max_blocks: int) -> list[tuple[int, int]] | None:
        """None when (lba, nblocks) can go as one command, else the split."""
        boundary = self.optimal_io_boundary
        if (max_blocks == 0 or nblocks <= max_blocks) and (
            boundary == 0 or nblocks == 0 or lba // boundary == (lba + nblocks - 1) // boundary
        ):
            return None
        out = []
        end = lba + nblocks
        while lba < end:
            n = end - lba
            if max_blocks and n > max_blocks:
                n = max_blocks
            if boundary:
                n = min(n, boundary - lba % boundary)
            out.append((lba, n))
            lba += n
        return out

    def _max_blocks(self) -> int:
        return self.max_io_bytes // self.block_size if self.max_io_bytes else 0


async def _fanout(calls: list[tuple[Callable[..., Awaitable[None]], tuple[Any, ...]]]) -> None:
    """Run the calls concurrently, `_SPLIT_WINDOW` at a time; re-raise the first BdevError."""
    first: list[BdevError] = []

    async def one(fn: Callable[..., Awaitable[None]], args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        except BdevError as e:
            if not first:
                first.append(e)

    for i in range(0, len(calls), _SPLIT_WINDOW):
        async with trio.open_nursery() as nursery:
            for fn, args in calls[i : i + _SPLIT_WINDOW]:
                nursery.start_soon(one, fn, args)
        if first:
            raise first[0]


def _as_bytes_view(data: Any) -> memoryview:
    mv = data if type(data) is memoryview else memoryview(data)
    if mv.itemsize != 1 or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class IoChannel:
    """A consumer's handle for I/O on one bdev (SPDK's spdk_io_channel). All I/O goes through one."""

    __slots__ = ("bdev", "_ctx", "_closed")

    def __init__(self, bdev: Bdev, ctx: Any) -> None:
        self.bdev = bdev
        self._ctx = ctx
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.bdev._destroy_channel_ctx(self._ctx)

    def _closed_error(self) -> BdevError:
        return BdevError(errno.EBADF, f"I/O on a closed channel of {self.bdev.name}")

    # -- block API ---------------------------------------------------------------------------------

    async def read_blocks(self, lba: int, nblocks: int, buf: memoryview | None = None) -> memoryview:
        bdev = self.bdev
        nbytes = nblocks * bdev.block_size
        if buf is None:
            buf = memoryview(bytearray(nbytes))
        elif buf.nbytes != nbytes:
            raise BdevError(errno.EINVAL, f"buffer of {buf.nbytes} bytes for {nblocks} blocks")
        if self._closed:
            raise self._closed_error()
        bdev._check(lba, nblocks, False)
        t0 = perf_counter_ns()
        try:
            pieces = bdev._pieces(lba, nblocks, bdev._max_blocks())
            if pieces is None:
                await bdev._submit_read(self._ctx, lba, nblocks, buf)
            else:
                bs = bdev.block_size
                await _fanout(
                    [
                        (bdev._submit_read, (self._ctx, p, n, buf[(p - lba) * bs : (p - lba + n) * bs]))
                        for p, n in pieces
                    ]
                )
        except BdevError:
            bdev._errors += 1
            raise
        bdev._read_latency_ticks += perf_counter_ns() - t0
        bdev._num_read_ops += 1
        bdev._bytes_read += nbytes
        return buf

    def read_blocks_nowait(self, lba: int, nblocks: int, buf: memoryview,
                           on_done: Callable[[bool], None]) -> bool:
        """Extension: start reading `nblocks` at `lba` into `buf` without a task waiting on it.

        Returns False, having done nothing, when the bdev cannot start it at once (no support,
        not connected, no free command slot, a split, a closed channel, out of range...): use
        `await read_blocks(...)` instead. Otherwise `on_done(ok)` is called later, from another
        task (never from inside this call): True once `buf` holds the data; False when the read
        failed, and the caller redoes it with `read_blocks`, which applies the bdev's full error
        handling (retries, reconnects) and raises the final BdevError. `on_done` must not block
        or raise. NVMe bdevs implement it (a callback from the queue's reader); others say no.
        `buf` may be an `FdSink` where `bdev.fd_reads` says so; after on_done(True) check its
        `overflow` (the pipe had no room: the transfer is whole after `drain_into_spill`).
        """
        # The FUSE and NBD read hot path: checks inlined (the `_pieces` test: one command only)
        # and a wrapper whose state rides in default arguments, not closure cells (about 0.25 us
        # per read less than a `_pieces` call and a closure; CPython 3.11).
        bdev = self.bdev
        if (self._closed or bdev.removed or lba < 0 or nblocks <= 0
                or lba + nblocks > bdev.num_blocks):
            return False
        nbytes = nblocks * bdev.block_size
        if buf.nbytes != nbytes:
            return False
        boundary = bdev.optimal_io_boundary
        if boundary and lba // boundary != (lba + nblocks - 1) // boundary:
            return False
        max_blocks = bdev._max_blocks()
        if max_blocks and nblocks > max_blocks:
            return False
        if type(buf) is FdSink and not bdev.fd_reads:
            return False

        def done(err: Any, bdev: Bdev = bdev, t0: int = perf_counter_ns(), nbytes: int = nbytes,
                 on_done: Callable[[bool], None] = on_done) -> None:
            if err is None:
                bdev._read_latency_ticks += perf_counter_ns() - t0
                bdev._num_read_ops += 1
                bdev._bytes_read += nbytes
                on_done(True)
            else:
                on_done(False)

        return bdev._submit_read_nowait(self._ctx, lba, nblocks, buf, done)

    async def write_blocks(self, lba: int, nblocks: int, data: Any, *, fua: bool = False) -> None:
        bdev = self.bdev
        data = _as_bytes_view(data)
        nbytes = nblocks * bdev.block_size
        if data.nbytes != nbytes:
            raise BdevError(errno.EINVAL, f"{data.nbytes} bytes of data for {nblocks} blocks")
        if self._closed:
            raise self._closed_error()
        bdev._check(lba, nblocks, True)
        t0 = perf_counter_ns()
        try:
            emulate_fua = fua and not bdev.io_type_supported(IoType.FUA)
            if emulate_fua:
                fua = False
            pieces = bdev._pieces(lba, nblocks, bdev._max_blocks())
            if pieces is None:
                await bdev._submit_write(self._ctx, lba, nblocks, data, fua)
            else:
                bs = bdev.block_size
                await _fanout(
                    [
                        (bdev._submit_write, (self._ctx, p, n, data[(p - lba) * bs : (p - lba + n) * bs], fua))
                        for p, n in pieces
                    ]
                )
            if emulate_fua and bdev.io_type_supported(IoType.FLUSH):
                await bdev._submit_flush(self._ctx)
        except BdevError:
            bdev._errors += 1
            raise
        bdev._write_latency_ticks += perf_counter_ns() - t0
        bdev._num_write_ops += 1
        bdev._bytes_written += nbytes

    async def write_zeroes_blocks(self, lba: int, nblocks: int) -> None:
        bdev = self.bdev
        if self._closed:
            raise self._closed_error()
        bdev._check(lba, nblocks, True)
        t0 = perf_counter_ns()
        try:
            if bdev.io_type_supported(IoType.WRITE_ZEROES):
                pieces = bdev._pieces(lba, nblocks, bdev._max_blocks())
                try:
                    if pieces is None:
                        await bdev._submit_write_zeroes(self._ctx, lba, nblocks)
                    else:
                        await _fanout([(bdev._submit_write_zeroes, (self._ctx, p, n))
                                       for p, n in pieces])
                except BdevError as e:
                    # A device may learn only when asked that it cannot zero (an NVMe backend
                    # rejecting the Write Zeroes its ONCS advertised): it answers EOPNOTSUPP and
                    # stops claiming WRITE_ZEROES; the whole range is then zeroed by writes.
                    if e.errno != errno.EOPNOTSUPP or bdev.io_type_supported(IoType.WRITE_ZEROES):
                        raise
                    await self._emulate_write_zeroes(lba, nblocks)
            else:
                await self._emulate_write_zeroes(lba, nblocks)
        except BdevError:
            bdev._errors += 1
            raise
        bdev._write_zeroes_latency_ticks += perf_counter_ns() - t0
        bdev._num_write_zeroes_ops += 1
        bdev._bytes_zeroed += nblocks * bdev.block_size

    async def _emulate_write_zeroes(self, lba: int, nblocks: int) -> None:
        bdev = self.bdev
        bs = bdev.block_size
        chunk = max(1, min(nblocks, _ZERO_CHUNK // bs, bdev._max_blocks() or nblocks))
        zeroes = memoryview(bytes(chunk * bs))
        end = lba + nblocks
        calls = []
        while lba < end:
            n = min(chunk, end - lba)
            calls.append((bdev._submit_write, (self._ctx, lba, n, zeroes[: n * bs], False)))
            lba += n
        await _fanout(calls)

    async def unmap_blocks(self, lba: int, nblocks: int) -> None:
        bdev = self.bdev
        if self._closed:
            raise self._closed_error()
        bdev._check(lba, nblocks, True)
        if not bdev.io_type_supported(IoType.UNMAP):
            raise BdevError(errno.EOPNOTSUPP, f"{bdev.name} does not support unmap")
        t0 = perf_counter_ns()
        try:
            pieces = bdev._pieces(lba, nblocks, 0)
            if pieces is None:
                await bdev._submit_unmap(self._ctx, lba, nblocks)
            else:
                await _fanout([(bdev._submit_unmap, (self._ctx, p, n)) for p, n in pieces])
        except BdevError:
            bdev._errors += 1
            raise
        bdev._unmap_latency_ticks += perf_counter_ns() - t0
        bdev._num_unmap_ops += 1
        bdev._bytes_unmapped += nblocks * bdev.block_size

    async def flush(self) -> None:
        bdev = self.bdev
        if self._closed:
            raise self._closed_error()
        if bdev.removed:
            raise BdevError(errno.ENODEV, f"{bdev.name} has been removed")
        t0 = perf_counter_ns()
        if bdev.io_type_supported(IoType.FLUSH):
            try:
                await bdev._submit_flush(self._ctx)
            except BdevError:
                bdev._errors += 1
                raise
        else:
            await trio.lowlevel.checkpoint()
        bdev._flush_latency_ticks += perf_counter_ns() - t0
        bdev._num_flush_ops += 1

    # -- byte API ----------------------------------------------------------------------------------

    def _byte_range(self, offset: int, length: int) -> tuple[int, int]:
        """(first block, end block) covering [offset, offset + length); EINVAL outside the bdev."""
        bdev = self.bdev
        if offset < 0 or length < 0 or offset + length > bdev.num_blocks * bdev.block_size:
            raise BdevError(
                errno.EINVAL, f"{bdev.name}: bytes {offset}+{length} outside 0..{bdev.size}"
            )
        bs = bdev.block_size
        return offset // bs, -(-(offset + length) // bs)

    async def read(self, offset: int, length: int) -> memoryview:
        """Exactly `length` bytes from byte `offset` (a memoryview; it may be a slice of a larger
        buffer, so copy it if you keep it long)."""
        bs = self.bdev.block_size
        if offset % bs == 0 and length % bs == 0:
            return await self.read_blocks(offset // bs, length // bs)
        first, end = self._byte_range(offset, length)
        buf = await self.read_blocks(first, end - first)
        skip = offset - first * bs
        return buf[skip : skip + length]

    async def readinto(self, offset: int, buf: memoryview) -> None:
        buf = _as_bytes_view(buf)
        bs = self.bdev.block_size
        length = buf.nbytes
        if offset % bs == 0 and length % bs == 0:
            await self.read_blocks(offset // bs, length // bs, buf)
            return
        first, end = self._byte_range(offset, length)
        tmp = await self.read_blocks(first, end - first)
        skip = offset - first * bs
        buf[:] = tmp[skip : skip + length]

    async def _lock(self, first: int, end: int) -> list[Any]:
        bdev = self.bdev
        shift = bdev._lock_shift
        return await bdev._lock.acquire(first + shift, end + shift)

    async def write(self, offset: int, data: Any, *, fua: bool = False) -> None:
        """Write `data` at byte `offset`; unaligned edges are read-modify-written under the lock."""
        data = _as_bytes_view(data)
        length = data.nbytes
        first, end = self._byte_range(offset, length)
        if length == 0:
            await trio.lowlevel.checkpoint()
            return
        bdev = self.bdev
        bdev._check(first, end - first, True)  # fail before reading anything
        bs = bdev.block_size
        head = offset - first * bs  # bytes of the first block before the data
        tail = end * bs - (offset + length)  # bytes of the last block after the data
        ent = await self._lock(first, end)
        try:
            if head == 0 and tail == 0:
                await self.write_blocks(first, end - first, data, fua=fua)
            elif length <= _RMW_COALESCE_BYTES or end - first <= 2:
                await self._rmw(first, end, head, tail, data, fua)
            else:
                # Split: the aligned middle goes straight from the caller's buffer.
                mid_first = first + (1 if head else 0)
                mid_end = end - (1 if tail else 0)
                skip = (mid_first * bs) - offset
                calls = []
                if head:
                    calls.append((self._rmw, (first, first + 1, head, 0, data[: bs - head], fua)))
                if mid_end > mid_first:
                    mid = data[skip : skip + (mid_end - mid_first) * bs]
                    calls.append((self._write_blocks_fua, (mid_first, mid_end - mid_first, mid, fua)))
                if tail:
                    calls.append((self._rmw, (end - 1, end, 0, tail, data[length - (bs - tail) :], fua)))
                await _fanout(calls)
        finally:
            bdev._lock.release(ent)

    async def _write_blocks_fua(self, lba: int, nblocks: int, data: memoryview, fua: bool) -> None:
        await self.write_blocks(lba, nblocks, data, fua=fua)

    async def _rmw(self, first: int, end: int, head: int, tail: int, data: memoryview | None, fua: bool) -> None:
        """Write blocks [first, end) whose first `head` and last `tail` bytes keep their old content;
        the bytes in between are `data` (or zeroes when data is None). Caller holds the lock."""
        bs = self.bdev.block_size
        nblocks = end - first
        buf = memoryview(bytearray(nblocks * bs))
        if head and tail and nblocks <= 2:
            await self.read_blocks(first, nblocks, buf)
        else:
            if head:
                await self.read_blocks(first, 1, buf[:bs])
            if tail:
                await self.read_blocks(end - 1, 1, buf[(nblocks - 1) * bs :])
        stop = nblocks * bs - tail
        # data None: zero the range (only edge blocks get here, so the zero buffer is small)
        buf[head:stop] = data if data is not None else bytes(stop - head)
        await self.write_blocks(first, nblocks, buf, fua=fua)

    async def _edges_then(self, offset: int, length: int, middle: Callable[[int, int], Awaitable[None]]) -> None:
        """Zero the unaligned edges of [offset, offset+length) by RMW and hand the aligned middle to
        `middle(lba, nblocks)`; all under the range lock."""
        first, end = self._byte_range(offset, length)
        if length == 0:
            await trio.lowlevel.checkpoint()
            return
        bdev = self.bdev
        bdev._check(first, end - first, True)
        bs = bdev.block_size
        head = offset - first * bs
        tail = end * bs - (offset + length)
        ent = await self._lock(first, end)
        try:
            if end - first == 1 and (head or tail):
                await self._rmw(first, end, head, tail, None, False)
                return
            mid_first = first + (1 if head else 0)
            mid_end = end - (1 if tail else 0)
            calls: list[tuple[Callable[..., Awaitable[None]], tuple[Any, ...]]] = []
            if head:
                calls.append((self._rmw, (first, first + 1, head, 0, None, False)))
            if tail:
                calls.append((self._rmw, (end - 1, end, 0, tail, None, False)))
            if mid_end > mid_first:
                calls.append((middle, (mid_first, mid_end - mid_first)))
            await _fanout(calls)
        finally:
            bdev._lock.release(ent)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._edges_then(offset, length, self.write_zeroes_blocks)

    async def unmap(self, offset: int, length: int) -> None:
        """Unmap the aligned middle; unaligned edges are zeroed by RMW writes."""
        if not self.bdev.io_type_supported(IoType.UNMAP):
            raise BdevError(errno.EOPNOTSUPP, f"{self.bdev.name} does not support unmap")
        await self._edges_then(offset, length, self.unmap_blocks)
