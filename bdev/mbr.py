"""Pure (sans-IO) parser for DOS/MBR partition tables, and the result types shared with GPT.

What it does: decodes the Master Boot Record at LBA 0 (UEFI 2.10 §5.2.1 "Legacy Master Boot Record",
the classic PC layout), its four primary entries and the chain of Extended Boot Records (EBRs) that
describes logical partitions inside an extended partition (types 0x05, 0x0F, 0x85). It also defines
`Partition`, `PartitionTable` and the `PartitionTableError` family that `bdev.gpt` re-exports.

What it does not do: any I/O. The parser says which bytes it needs next (`next_read()`), the caller
reads them from wherever it likes (a bdev, a file, a test buffer) and hands them back with `feed()`.
It never touches trio, sockets or files. It does not parse GPT: an MBR holding a 0xEE entry (a
protective or hybrid MBR) is left to `bdev.gpt.GptParser` and `MbrParser` raises `ProtectiveMbrError`.

Decisions:
- Bad entries are skipped with a warning, never fatal: an entry starting at LBA 0, running past the
  end of the disk (Linux would truncate it; we do not expose a partition shorter than its table says),
  or overlapping an entry accepted before it. A broken EBR ends the chain with a warning.
- The extended container itself is not listed (only its logicals); its slot number stays unused.
- Numbering follows Linux: primaries are 1-4 by slot, logicals count from 5 in chain order, a number
  is consumed by every non-empty logical entry even if it is then skipped as out of range.
- The EBR walk is bounded: at most `MAX_LOGICALS` EBRs, each visited once (loop detection), and
  every EBR must lie inside the extended partition.
- `uuid`/`disk_uuid` follow Linux PARTUUID: "SSSSSSSS-NN" from the 32-bit disk signature at byte
  440, or None when the signature is zero.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "CorruptTableError",
    "EXTENDED_TYPES",
    "MAX_LOGICALS",
    "MbrParser",
    "NoTableError",
    "Partition",
    "PartitionTable",
    "PartitionTableError",
    "ProtectiveMbrError",
    "parse_mbr_records",
]


class PartitionTableError(Exception):
    """No usable partition table; `reason` says why in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoTableError(PartitionTableError):
    """The device carries no partition table of this scheme (e.g. no 0x55AA, no "EFI PART")."""


class ProtectiveMbrError(NoTableError):
    """The MBR holds a 0xEE entry: it protects a GPT, so it is not an MBR-partitioned disk."""


class CorruptTableError(PartitionTableError):
    """A table of this scheme is present but fails validation (CRC, bounds, ...)."""


@dataclass(slots=True, frozen=True)
class Partition:
    number: int  # Linux numbering: GPT entry index + 1; MBR primaries 1-4, logicals 5+
    start_lba: int  # in the base device's logical blocks
    num_blocks: int
    type: str  # GPT: type GUID, lowercase canonical; MBR: "0x83" style
    uuid: str | None  # GPT unique partition GUID; MBR: "SSSSSSSS-NN" (Linux PARTUUID) or None
    name: str  # GPT partition name; MBR: ""
    attributes: int  # GPT attribute bits; MBR: boot flag (0x80) or 0


@dataclass(slots=True, frozen=True)
class PartitionTable:
    scheme: str  # "gpt" | "mbr"
    disk_uuid: str | None
    partitions: tuple[Partition, ...]
    used_backup: bool  # GPT only: the primary header or array was bad, the backup was used
    warnings: tuple[str, ...]


MBR_SIZE = 512
_TABLE_OFFSET = 446  # four 16-byte partition records
_SIGNATURE_OFFSET = 510
_DISK_SIGNATURE = struct.Struct("<I")  # at byte 440 ("UniqueMBRDiskSignature", §5.2.1)
_DISK_SIGNATURE_OFFSET = 440
# BootIndicator, StartingCHS[3], OSType, EndingCHS[3], StartingLBA, SizeInLBA (§5.2.1 Table 5-2)
_RECORD = struct.Struct("<B3sB3sII")
_SIGNATURE = b"\x55\xaa"

GPT_PROTECTIVE_TYPE = 0xEE
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
MAX_LOGICALS = 128


@dataclass(slots=True, frozen=True)
class MbrRecord:
    slot: int  # 0..3
    boot: int
    os_type: int
    start_lba: int
    num_blocks: int

    @property
    def empty(self) -> bool:
        return self.os_type == 0 or self.num_blocks == 0


def parse_mbr_records(sector: bytes | memoryview) -> tuple[MbrRecord, ...]:
    """Decode the four records of an MBR or EBR sector; NoTableError unless it ends in 0x55AA.

    UEFI 2.10 §5.2.1: "Signature: Set to 0xAA55 (i.e., byte 510 contains 0x55 and byte 511 contains
    0xAA)". Records with a BootIndicator other than 0x00/0x80 mean this is no partition table (a FAT
    boot sector also ends in 0x55AA), as Linux's msdos parser also decides.
    """
    if len(sector) < MBR_SIZE:
        raise NoTableError(f"short MBR sector ({len(sector)} bytes)")
    if bytes(sector[_SIGNATURE_OFFSET:MBR_SIZE]) != _SIGNATURE:
        raise NoTableError("no MBR signature 0x55AA at byte 510")
    records = []
    for slot in range(4):
        boot, _, os_type, _, start, size = _RECORD.unpack_from(sector, _TABLE_OFFSET + 16 * slot)
        if boot not in (0x00, 0x80):
            raise NoTableError(f"MBR entry {slot + 1} has boot indicator 0x{boot:02x}: not a partition table")
        records.append(MbrRecord(slot, boot, os_type, start, size))
    return tuple(records)


class MbrParser:
    """Sans-IO MBR reader: loop `while (r := p.next_read()): p.feed(r[0], read(*r))`, then `result()`."""

    def __init__(self, block_size: int, num_blocks: int) -> None:
        if block_size < MBR_SIZE or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 512, not {block_size}")
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, not {num_blocks}")
        self._bs = block_size
        self._nb = num_blocks
        self._next: int | None = 0 if num_blocks > 0 else None  # LBA of the next sector to read
        self._error: PartitionTableError | None = None if num_blocks > 0 else NoTableError("empty disk")
        self._warnings: list[str] = []
        self._parts: list[Partition] = []
        self._ranges: list[tuple[int, int]] = []  # accepted partitions, [start, end)
        self._disk_sig = 0
        self._ext: tuple[int, int] | None = None  # extended container [start, end)
        self._visited: set[int] = set()
        self._next_logical = 5

    # -- sans-IO protocol -------------------------------------------------------------------------

    def next_read(self) -> tuple[int, int] | None:
        """(byte offset, byte length) of the next block needed, or None when parsing is over."""
        return None if self._next is None else (self._next * self._bs, self._bs)

    def feed(self, offset: int, data: bytes | memoryview) -> None:
        """Hand over the bytes of the last `next_read()`; a short read counts as a failed one."""
        if self._next is None or offset != self._next * self._bs:
            raise ValueError(f"feed({offset}) does not answer next_read() = {self.next_read()}")
        lba, self._next = self._next, None
        data = bytes(data[: self._bs])
        if lba == 0:
            try:
                self._parse_mbr(data)
            except PartitionTableError as e:
                self._error = e
        else:
            self._parse_ebr(lba, data)

    def result(self) -> PartitionTable:
        if self._next is not None:
            raise RuntimeError("result() called before next_read() returned None")
        if self._error is not None:
            raise self._error
        sig = self._disk_sig
        return PartitionTable(
            scheme="mbr",
            disk_uuid=f"{sig:08x}" if sig else None,
            partitions=tuple(sorted(self._parts, key=lambda p: p.number)),
            used_backup=False,
            warnings=tuple(self._warnings),
        )

    # -- parsing ----------------------------------------------------------------------------------

    def _parse_mbr(self, sector: bytes) -> None:
        records = parse_mbr_records(sector)
        if any(r.os_type == GPT_PROTECTIVE_TYPE for r in records):
            # §5.2.3: an OSType of 0xEE marks a protective MBR; the disk is GPT-partitioned.
            raise ProtectiveMbrError("MBR has a 0xEE (GPT protective) entry: the disk uses GPT")
        (self._disk_sig,) = _DISK_SIGNATURE.unpack_from(sector, _DISK_SIGNATURE_OFFSET)
        for r in records:
            if r.empty:
                continue
            number = r.slot + 1
            where = f"MBR partition {number}"
            if r.os_type in EXTENDED_TYPES and self._ext is not None:
                self._warnings.append(f"{where}: second extended partition ignored")
                continue
            # Primaries start after the MBR itself, end inside the disk, and overlap neither each
            # other nor the extended container.
            if not self._check_range(where, r.start_lba, r.num_blocks, 1, self._nb, primary=True):
                continue
            if r.os_type in EXTENDED_TYPES:
                self._ext = (r.start_lba, r.start_lba + r.num_blocks)
                self._next = r.start_lba  # the first EBR is the extended partition's first block
                continue
            self._add(number, r.start_lba, r.num_blocks, r)

    def _parse_ebr(self, lba: int, sector: bytes) -> None:
        assert self._ext is not None
        self._visited.add(lba)
        try:
            records = parse_mbr_records(sector)
        except NoTableError as e:
            self._warnings.append(f"EBR at LBA {lba}: {e.reason}; logical partition chain ends")
            return
        ext_start, ext_end = self._ext
        link: MbrRecord | None = None
        for r in records:
            if r.empty:
                continue
            if r.os_type in EXTENDED_TYPES:
                link = link or r
                continue
            if r.slot >= 2:
                self._warnings.append(f"EBR at LBA {lba}: data entry in slot {r.slot + 1} ignored")
                continue
            number = self._next_logical
            if number >= 5 + MAX_LOGICALS:
                self._warnings.append(f"more than {MAX_LOGICALS} logical partitions: the rest ignored")
                return
            self._next_logical += 1
            # A logical's start is relative to its own EBR and it must stay inside the container.
            start = lba + r.start_lba
            if self._check_range(f"logical partition {number}", start, r.num_blocks, lba + 1, ext_end):
                self._add(number, start, r.num_blocks, r)
        if link is None:
            return
        nxt = ext_start + link.start_lba  # links are relative to the extended partition's start
        if self._next_logical >= 5 + MAX_LOGICALS:
            self._warnings.append(f"more than {MAX_LOGICALS} logical partitions: the rest ignored")
        elif len(self._visited) >= MAX_LOGICALS:
            self._warnings.append(f"more than {MAX_LOGICALS} EBRs: logical partition chain cut")
        elif nxt in self._visited:
            self._warnings.append(f"EBR at LBA {lba} links back to LBA {nxt}: loop, chain ends")
        elif not ext_start <= nxt < ext_end:
            self._warnings.append(f"EBR at LBA {lba} links to LBA {nxt}, outside the extended partition")
        else:
            self._next = nxt

    def _check_range(
        self, where: str, start: int, size: int, lo: int, hi: int, primary: bool = False
    ) -> bool:
        """True if [start, start+size) lies in [lo, hi) and overlaps nothing accepted, else warn.

        A primary is also checked against the extended container; a logical lies inside it.
        """
        end = start + size
        if start < lo or end > hi:
            self._warnings.append(f"{where}: blocks {start}..{end - 1} outside {lo}..{hi - 1}, skipped")
            return False
        others = self._ranges + [self._ext] if primary and self._ext else self._ranges
        for s, e in others:
            if start < e and s < end:
                self._warnings.append(f"{where}: blocks {start}..{end - 1} overlap {s}..{e - 1}, skipped")
                return False
        return True

    def _add(self, number: int, start: int, size: int, r: MbrRecord) -> None:
        self._ranges.append((start, start + size))
        sig = self._disk_sig
        self._parts.append(
            Partition(
                number=number,
                start_lba=start,
                num_blocks=size,
                type=f"0x{r.os_type:02x}",
                uuid=f"{sig:08x}-{number:02x}" if sig else None,
                name="",
                attributes=r.boot,
            )
        )
