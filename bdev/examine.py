"""The partition examine module: reads a bdev's partition table and keeps its `PartBdev`s in step.

What it does: `read_partition_table()` drives the pure parsers of `bdev/gpt.py` and `bdev/mbr.py`
(GPT first, then MBR; a protective MBR never falls back to MBR) through an ordinary I/O channel.
`PartitionExamine.examine()` (run by the registry on register and on `reexamine`) diffs the table
against the partitions already registered on that base:
- a partition that vanished is unregistered;
- one whose start or unique GUID changed is unregistered and registered again (a new bdev);
- one whose length changed is resized in place (`notify_resize`, so open users see it);
- a new one is registered as `<base>p<N>`.
A missing or corrupt table means no partitions, with the reason logged; it never raises. An I/O
error while reading the table keeps the partitions that were there (a flaky read must not tear
down a mounted filesystem) and is logged.

What it does not do: parse bytes (that is gpt.py / mbr.py, sans-IO), examine partitions for nested
tables, or write tables.
"""

from __future__ import annotations

import dataclasses

import logging
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._base import Bdev, BdevError, IoChannel
from .part import PartBdev

if TYPE_CHECKING:
    from .registry import BdevRegistry

__all__ = ["PartitionExamine", "read_partition_table", "partition_name"]

log = logging.getLogger(__name__)

# A parser bug on hostile bytes must cost the partitions of one disk, not the registration.
_PARSER_BUGS = (ValueError, IndexError, KeyError, struct.error, UnicodeDecodeError)


def partition_name(base_name: str, number: int) -> str:
    return f"{base_name}p{number}"


def _default_parsers() -> tuple[Sequence[type], Any]:
    from . import gpt, mbr

    return (gpt.GptParser, mbr.MbrParser), mbr


async def _drive(parser: Any, ch: IoChannel) -> Any:
    while (req := parser.next_read()) is not None:
        offset, length = req
        parser.feed(offset, await ch.read(offset, length))
    return parser.result()


async def read_partition_table(
    bdev: Bdev, parsers: Sequence[type] | None = None, errors: Any = None
) -> Any | None:
    """The bdev's PartitionTable, or None when it has none (or a corrupt one: logged).

    Raises BdevError when the table could not be read (I/O error, removed bdev).
    `parsers`/`errors` are for tests: parser classes tried in order, and the module holding the
    `PartitionTableError` / `ProtectiveMbrError` / `CorruptTableError` classes.
    """
    if parsers is None:
        parsers, errors = _default_parsers()
    table_error = errors.PartitionTableError
    protective = getattr(errors, "ProtectiveMbrError", ())
    corrupt = getattr(errors, "CorruptTableError", ())
    reasons: list[str] = []
    corrupt_seen = False
    ch = bdev.get_io_channel()
    try:
        for cls in parsers:
            scheme = getattr(cls, "__name__", "parser").replace("Parser", "").upper()
            try:
                parser = cls(bdev.block_size, bdev.num_blocks)
                table = await _drive(parser, ch)
            except protective:
                # An MBR protecting a GPT: the GPT verdict stands, never read the disk as MBR.
                break
            except table_error as e:
                reasons.append(f"{scheme}: {e}")
                corrupt_seen = corrupt_seen or isinstance(e, corrupt)
                continue
            except _PARSER_BUGS as e:
                log.exception("%s: %s parser failed", bdev.name, scheme)
                reasons.append(f"{scheme}: parser error {e!r}")
                corrupt_seen = True
                continue
            for w in table.warnings:
                log.warning("%s: %s partition table: %s", bdev.name, table.scheme, w)
            if getattr(table, "used_backup", False):
                log.warning("%s: primary GPT is bad, using the backup table", bdev.name)
            return table
        if bdev.block_size > 512 and not self_test_parsers(parsers):
            table = await _gpt_in_512_byte_sectors(bdev, ch)
            if table is not None:
                return table
    finally:
        ch.close()
    why = "; ".join(reasons) or "no parser"
    if corrupt_seen:
        log.warning("%s: corrupt partition table, no partitions: %s", bdev.name, why)
    else:
        log.info("%s: no partition table (%s)", bdev.name, why)
    return None


def self_test_parsers(parsers) -> bool:
    """True when a test passed its own parser classes (then no 512-byte fallback)."""
    from . import gpt, mbr
    return any(cls not in (gpt.GptParser, mbr.MbrParser) for cls in parsers)


async def _gpt_in_512_byte_sectors(bdev: Bdev, ch: IoChannel) -> Any | None:
    """A GPT laid out in 512-byte sectors on a device with larger blocks.

    Partitioning tools run on a *file* (sgdisk, sfdisk, parted on MOUNT/nvme0n1) cannot ask for
    the logical block size and assume 512 bytes. Such a table is read here and its partitions
    converted to device blocks; a partition that does not start and end on a device block
    boundary cannot be a window of whole blocks and is skipped with a warning.
    """
    from . import gpt
    scale = bdev.block_size // 512
    try:
        table = await _drive(gpt.GptParser(512, bdev.size // 512), ch)
    except gpt.PartitionTableError:
        return None
    parts = []
    for p in table.partitions:
        if p.start_lba % scale or p.num_blocks % scale:
            log.warning("%s: GPT partition %d (512-byte sectors %d+%d) is not aligned to the "
                        "%d-byte blocks, skipped", bdev.name, p.number, p.start_lba,
                        p.num_blocks, bdev.block_size)
            continue
        parts.append(dataclasses.replace(p, start_lba=p.start_lba // scale,
                                         num_blocks=p.num_blocks // scale))
    log.info("%s: GPT written with 512-byte sectors on a %d-byte-block device: %d partitions",
             bdev.name, bdev.block_size, len(parts))
    return dataclasses.replace(table, partitions=tuple(parts),
                               warnings=table.warnings + ("GPT uses 512-byte sectors",))


class PartitionExamine:
    """Examine module: keeps `<base>p<N>` PartBdevs matching the base's partition table."""

    name = "part"

    def __init__(self, parsers: Sequence[type] | None = None, errors: Any = None) -> None:
        self._parsers = parsers
        self._errors = errors

    async def examine(self, registry: BdevRegistry, bdev: Bdev) -> None:
        if isinstance(bdev, PartBdev) or bdev.removed:
            return
        try:
            table = await read_partition_table(bdev, self._parsers, self._errors)
        except BdevError as e:
            log.warning("%s: cannot read the partition table, partitions left as they are: %s", bdev.name, e)
            return
        except ImportError as e:  # the parsers are another module: a broken install costs partitions only
            log.error("%s: partition parsers unavailable: %s", bdev.name, e)
            return
        if bdev.removed:
            return
        wanted = {p.number: p for p in self._usable(bdev, table)}
        have = {
            b.number: b for b in registry.bdevs() if isinstance(b, PartBdev) and b.base is bdev and not b.removed
        }
        # removals (and starts that moved / partitions replaced) first, so names are free for adds
        for number, part in sorted(have.items(), reverse=True):
            p = wanted.get(number)
            if p is None or p.start_lba != part.offset_blocks or p.uuid != part.uuid:
                log.info("%s: partition %s removed", bdev.name, part.name)
                await registry.unregister(part.name)
                del have[number]
        for number, p in sorted(wanted.items()):
            part = have.get(number)
            if part is not None:
                part.part_type, part.part_name, part.attributes = p.type, p.name, p.attributes
                if part.num_blocks != p.num_blocks:
                    log.info("%s: partition %s resized to %d blocks", bdev.name, part.name, p.num_blocks)
                    part.notify_resize(p.num_blocks)
                continue
            name = partition_name(bdev.name, number)
            try:
                part = PartBdev(
                    bdev,
                    name,
                    p.start_lba,
                    p.num_blocks,
                    number=number,
                    part_type=p.type,
                    part_uuid=p.uuid,
                    part_name=p.name,
                    attributes=p.attributes,
                )
            except BdevError as e:  # base removed meanwhile
                log.warning("%s: cannot create partition %s: %s", bdev.name, name, e)
                return
            try:
                await registry.register(part)
            except BdevError as e:  # name taken by another bdev
                log.warning("%s: cannot register partition %s: %s", bdev.name, name, e)
                part.hot_remove()  # closes its descriptor on the base
                continue
            log.info(
                "%s: partition %s: blocks %d+%d type %s", bdev.name, name, p.start_lba, p.num_blocks, p.type
            )

    @staticmethod
    def _usable(bdev: Bdev, table: Any | None) -> list[Any]:
        if table is None:
            return []
        out = []
        for p in table.partitions:
            if p.num_blocks <= 0 or p.start_lba < 0 or p.start_lba + p.num_blocks > bdev.num_blocks:
                log.warning(
                    "%s: partition %d (blocks %d+%d) does not fit in %d blocks, skipped",
                    bdev.name, p.number, p.start_lba, p.num_blocks, bdev.num_blocks,
                )
                continue
            out.append(p)
        return out
