"""`PartBdev`: a window (offset, length) over a base bdev, as SPDK's part.c / Linux partitions.

What it does: remaps every command by `offset_blocks` onto a channel of the base (one base channel
per PartBdev channel), checks bounds against its own size (and the base checks against the base's,
so a partition left past the end of a shrunk base fails instead of reading stale data), shares the
base's RMW range lock (a byte write through a partition and one through the whole disk on the same
block are serialized), and removes itself when its base is removed.

What it does not do: decide its geometry. The partition examine module (examine.py) creates, resizes
(`notify_resize`) and unregisters PartBdevs when the table changes; a resize of the base does not
re-read the table by itself (call `BdevRegistry.reexamine`).
"""

from __future__ import annotations

from typing import Any

from ._base import Bdev, BdevEvent, IoChannel, IoType

__all__ = ["PartBdev"]

# What a partition's nowait read reports when its base's failed (the hook wants a non-None err).
_FAILED = "read failed on the base bdev"


class PartBdev(Bdev):
    def __init__(
        self,
        base: Bdev,
        name: str,
        offset_blocks: int,
        num_blocks: int,
        *,
        number: int = 0,
        part_type: str = "",
        part_uuid: str | None = None,
        part_name: str = "",
        attributes: int = 0,
    ) -> None:
        super().__init__(
            name,
            base.block_size,
            num_blocks,
            uuid=part_uuid,
            product_name="Partition",
            optimal_io_boundary=0,
            max_io_bytes=base.max_io_bytes,
            read_only=base.read_only,
            unmap_zeroes=base.unmap_zeroes,
        )
        if offset_blocks < 0:
            raise ValueError(f"negative partition offset {offset_blocks}")
        self.base = base
        self.offset_blocks = offset_blocks
        self.number = number
        self.part_type = part_type
        self.part_name = part_name
        self.attributes = attributes
        # One lock per physical device: byte writes through the partition and through the base
        # must exclude each other on shared blocks.
        self._lock = base._lock
        self._lock_shift = base._lock_shift + offset_blocks
        self._base_desc = base.open(self._on_base_event)

    def io_type_supported(self, io_type: IoType) -> bool:
        return self.base.io_type_supported(io_type)

    def hot_remove(self) -> None:
        super().hot_remove()
        self._base_desc.close()

    def _on_base_event(self, event: BdevEvent) -> None:
        if event.type == "remove":
            self.hot_remove()

    # -- hooks: each command is the same command on the base, shifted ------------------------------

    def _create_channel_ctx(self) -> IoChannel:
        return self.base.get_io_channel()

    def _destroy_channel_ctx(self, ctx: IoChannel) -> None:
        ctx.close()

    async def _submit_read(self, ctx: IoChannel, lba: int, nblocks: int, buf: memoryview) -> None:
        await ctx.read_blocks(lba + self.offset_blocks, nblocks, buf)

    @property
    def fd_reads(self) -> bool:            # type: ignore[override]
        return self.base.fd_reads

    def _submit_read_nowait(self, ctx: IoChannel, lba: int, nblocks: int, buf: memoryview,
                            on_done) -> bool:
        # The base channel counts its own statistics and answers ok; the hook answers err.
        return ctx.read_blocks_nowait(lba + self.offset_blocks, nblocks, buf,
                                      lambda ok: on_done(None if ok else _FAILED))

    async def _submit_write(self, ctx: IoChannel, lba: int, nblocks: int, data: memoryview, fua: bool) -> None:
        await ctx.write_blocks(lba + self.offset_blocks, nblocks, data, fua=fua)

    async def _submit_flush(self, ctx: IoChannel) -> None:
        await ctx.flush()

    async def _submit_write_zeroes(self, ctx: IoChannel, lba: int, nblocks: int) -> None:
        await ctx.write_zeroes_blocks(lba + self.offset_blocks, nblocks)

    async def _submit_unmap(self, ctx: IoChannel, lba: int, nblocks: int) -> None:
        await ctx.unmap_blocks(lba + self.offset_blocks, nblocks)

    def describe(self) -> dict[str, Any]:
        return {
            "base": self.base.name,
            "number": self.number,
            "offset_blocks": self.offset_blocks,
            "num_blocks": self.num_blocks,
            "type": self.part_type,
            "uuid": self.uuid,
            "name": self.part_name,
            "attributes": self.attributes,
        }
