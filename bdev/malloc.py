"""`MallocBdev`: a RAM-backed bdev (SPDK's malloc bdev), the reference backend for tests and demos.

What it does: keeps the blocks in one bytearray, supports every IoType (unmapped blocks read back as
zeroes), and can be resized in place (`resize()`, which fires the resize event like an NVMe
namespace change would).

What it does not do: persistence, or any real concurrency: each command is one memory copy done
synchronously, followed by a trio checkpoint (as every async call should have), so other tasks run
between the commands of a read-modify-write exactly as they would with a device. Reads can also
start without a waiting task (`read_blocks_nowait`): copied at once, completed a pass later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from ._base import Bdev, IoType
from ._soon import call_soon

__all__ = ["MallocBdev"]

_ALL_IO_TYPES = frozenset(IoType)
_ZEROES = memoryview(bytes(1 << 20))


class MallocBdev(Bdev):
    def __init__(
        self,
        name: str,
        num_blocks: int,
        block_size: int = 512,
        *,
        uuid: str | None = None,
        max_io_bytes: int = 0,
        optimal_io_boundary: int = 0,
        read_only: bool = False,
    ) -> None:
        super().__init__(
            name,
            block_size,
            num_blocks,
            uuid=uuid,
            product_name="Malloc disk",
            optimal_io_boundary=optimal_io_boundary,
            max_io_bytes=max_io_bytes,
            read_only=read_only,
            unmap_zeroes=True,
        )
        self._buf = bytearray(num_blocks * block_size)
        self._mv = memoryview(self._buf)
        self.flushes = 0  # lets tests see that a flush reached the device

    def io_type_supported(self, io_type: IoType) -> bool:
        return io_type in _ALL_IO_TYPES

    def resize(self, new_num_blocks: int) -> None:
        """Grow (new blocks read as zeroes) or shrink (data past the new end is gone) and notify."""
        bs = self.block_size
        new = bytearray(new_num_blocks * bs)
        keep = min(new_num_blocks, self.num_blocks) * bs
        new[:keep] = self._mv[:keep]
        self._mv.release()
        self._buf = new
        self._mv = memoryview(new)
        self.notify_resize(new_num_blocks)

    # The copy happens right after the base's bounds check, before the checkpoint, so a resize
    # can never slip in between the check and the copy.

    async def _submit_read(self, ctx: Any, lba: int, nblocks: int, buf: memoryview) -> None:
        bs = self.block_size
        buf[:] = self._mv[lba * bs : (lba + nblocks) * bs]
        await trio.lowlevel.checkpoint()

    def _submit_read_nowait(self, ctx: Any, lba: int, nblocks: int, buf: memoryview,
                            on_done: Callable[[Any], None]) -> bool:
        # Copied now (as `_submit_read` does), completed a scheduler pass later from another
        # task, as the nowait contract wants: frontends get the same path as for an NVMe bdev.
        # A subclass that changes how reads work (`_submit_read`) keeps them on that path.
        if type(self)._submit_read is not MallocBdev._submit_read:
            return False
        bs = self.block_size
        buf[:] = self._mv[lba * bs : (lba + nblocks) * bs]
        call_soon(on_done, None)
        return True

    async def _submit_write(self, ctx: Any, lba: int, nblocks: int, data: memoryview, fua: bool) -> None:
        bs = self.block_size
        self._mv[lba * bs : (lba + nblocks) * bs] = data
        await trio.lowlevel.checkpoint()

    async def _submit_flush(self, ctx: Any) -> None:
        self.flushes += 1
        await trio.lowlevel.checkpoint()

    async def _submit_write_zeroes(self, ctx: Any, lba: int, nblocks: int) -> None:
        bs = self.block_size
        pos, stop = lba * bs, (lba + nblocks) * bs
        mv = self._mv
        while pos < stop:
            n = min(stop - pos, len(_ZEROES))
            mv[pos : pos + n] = _ZEROES[:n]
            pos += n
        await trio.lowlevel.checkpoint()

    async def _submit_unmap(self, ctx: Any, lba: int, nblocks: int) -> None:
        await self._submit_write_zeroes(ctx, lba, nblocks)
