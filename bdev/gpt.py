"""Pure (sans-IO) parser for GUID Partition Tables (UEFI 2.10 chapter 5.3), plus a sync `probe()`.

What it does: checks the protective MBR at LBA 0, validates the primary GPT header at LBA 1 and its
partition entry array, falls back to the backup header at the last LBA when the primary is bad, and
returns every used entry whatever its type GUID (unlike SPDK's gpt module, which keeps only its own
type). GUIDs are decoded mixed-endian (UEFI Appendix A: first three fields little-endian) into
lowercase canonical strings. 512- and 4096-byte (any power of two) logical blocks are supported.

What it does not do: any I/O. `GptParser.next_read()` names the byte range it needs, the caller reads
it (from a bdev, a file, a test buffer) and hands it back with `feed()`; `result()` gives the table
or raises `PartitionTableError`. Reads are block-aligned, never past the disk, and at most
`READ_CHUNK` bytes; the entry array is checksummed and parsed as it streams in, so a hostile header
cannot make the parser allocate more than one chunk. No trio, sockets or files here; the async glue
lives in `bdev/examine.py`. Writing or repairing tables is out of scope.

Decisions:
- Header problems (signature, revision, size, CRCs, MyLBA, usable range, array placement, entry
  size/count) reject that copy of the table; if the primary is rejected the backup is tried
  (`used_backup=True`, with the primary's fault in `warnings`).
- Entry problems (start > end, outside FirstUsableLBA..LastUsableLBA, overlapping an earlier entry)
  skip that entry with a warning and keep the rest, as Linux does for out-of-range entries: one bad
  entry should not hide every other partition. Numbers stay entry index + 1 either way.
- A valid primary is cross-checked against the backup header; a missing or different backup is
  only a warning.
"""

from __future__ import annotations

import bisect
import struct
import uuid
import zlib
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass

from .mbr import (
    GPT_PROTECTIVE_TYPE,
    CorruptTableError,
    MbrParser,
    NoTableError,
    Partition,
    PartitionTable,
    PartitionTableError,
    ProtectiveMbrError,
    parse_mbr_records,
)

__all__ = [
    "CorruptTableError",
    "GptParser",
    "MAX_ARRAY_BYTES",
    "MAX_ENTRIES",
    "NoTableError",
    "Partition",
    "PartitionTable",
    "PartitionTableError",
    "ProtectiveMbrError",
    "READ_CHUNK",
    "probe",
]

MAX_ENTRIES = 65536  # NumberOfPartitionEntries above this is treated as corruption
MAX_ARRAY_BYTES = 8 << 20  # and so is an entry array larger than this (65536 x 128 bytes)
READ_CHUNK = 1 << 20  # largest single read the parser asks for (a multiple of every block size)

SIGNATURE = b"EFI PART"
REVISION_1_0 = 0x00010000
HEADER_MIN_SIZE = 92
ENTRY_MIN_SIZE = 128

# §5.3.2 Table 5-5 "GPT Header": Signature, Revision, HeaderSize, HeaderCRC32, Reserved, MyLBA,
# AlternateLBA, FirstUsableLBA, LastUsableLBA, DiskGUID, PartitionEntryLBA,
# NumberOfPartitionEntries, SizeOfPartitionEntry, PartitionEntryArrayCRC32.
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_HEADER_CRC_OFFSET = 16
# §5.3.3 Table 5-6 "GPT Partition Entry": PartitionTypeGUID, UniquePartitionGUID, StartingLBA,
# EndingLBA, Attributes, PartitionName (36 UTF-16LE code units).
_ENTRY = struct.Struct("<16s16sQQQ72s")
_ZERO_GUID = bytes(16)


def guid_str(raw: bytes) -> str:
    """EFI_GUID bytes -> "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (first three fields little-endian)."""
    return str(uuid.UUID(bytes_le=bytes(raw)))


@dataclass(slots=True, frozen=True)
class GptHeader:
    my_lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    disk_guid: str
    entry_lba: int
    num_entries: int
    entry_size: int
    array_crc: int

    @property
    def array_bytes(self) -> int:
        return self.num_entries * self.entry_size


def parse_header(block: bytes, block_size: int, num_blocks: int, expected_lba: int) -> GptHeader:
    """Validate the GPT header in `block` (one whole block read at `expected_lba`).

    Raises CorruptTableError naming the first rule broken.
    """
    if len(block) < block_size:
        raise CorruptTableError(f"short read of GPT header at LBA {expected_lba}")
    (sig, revision, header_size, header_crc, _reserved, my_lba, alt_lba, first, last, disk_guid,
     entry_lba, num_entries, entry_size, array_crc) = _HEADER.unpack_from(block)
    where = f"GPT header at LBA {expected_lba}"
    # §5.3.2: "Signature: Identifies EFI-compatible partition table header. This value must contain
    # the ASCII string 'EFI PART'".
    if sig != SIGNATURE:
        raise CorruptTableError(f"{where}: no 'EFI PART' signature")
    # §5.3.2 Table 5-5 Revision: "This header is version 1.0, so the correct value is 0x00010000".
    # A future minor revision must stay compatible, so only the major number is enforced.
    if revision >> 16 != 1:
        raise CorruptTableError(f"{where}: unsupported revision 0x{revision:08x}")
    # §5.3.2 Table 5-5 HeaderSize: "must be greater than or equal to 92 and must be less than or
    # equal to the logical block size".
    if not HEADER_MIN_SIZE <= header_size <= block_size:
        raise CorruptTableError(f"{where}: header size {header_size} not in 92..{block_size}")
    # §5.3.2 Table 5-5 HeaderCRC32: "CRC32 checksum for the GPT Header structure. This value is
    # computed by setting this field to 0, and computing the 32-bit CRC for HeaderSize bytes."
    crc = zlib.crc32(block[:_HEADER_CRC_OFFSET])
    crc = zlib.crc32(bytes(4), crc)
    crc = zlib.crc32(block[_HEADER_CRC_OFFSET + 4 : header_size], crc)
    if crc != header_crc:
        raise CorruptTableError(f"{where}: header CRC32 0x{header_crc:08x} != computed 0x{crc:08x}")
    # §5.3.2 validation: "Check that the MyLBA entry points to the LBA that contains the GPT".
    if my_lba != expected_lba:
        raise CorruptTableError(f"{where}: MyLBA is {my_lba}")
    # §5.3.1: LBA 0 holds the protective MBR, LBA 1 the primary header and the last LBA the backup
    # header, so the usable range FirstUsableLBA..LastUsableLBA must lie strictly between them.
    if not 2 <= first <= last <= num_blocks - 2:
        raise CorruptTableError(
            f"{where}: usable range {first}..{last} invalid for a disk of {num_blocks} blocks"
        )
    # §5.3.2 Table 5-5 SizeOfPartitionEntry: "shall be set to a value of 128 x 2^n" (older
    # revisions: "must be a multiple of 8"); we accept any multiple of 8 from 128 up.
    if entry_size < ENTRY_MIN_SIZE or entry_size % 8:
        raise CorruptTableError(f"{where}: partition entry size {entry_size} invalid")
    # Not a spec rule: a bound so that a corrupt count cannot make us read or keep huge arrays.
    if num_entries > MAX_ENTRIES or num_entries * entry_size > MAX_ARRAY_BYTES:
        raise CorruptTableError(f"{where}: {num_entries} entries of {entry_size} bytes is too many")
    header = GptHeader(my_lba, alt_lba, first, last, guid_str(disk_guid), entry_lba, num_entries,
                       entry_size, array_crc)
    if header.array_bytes:
        # §5.3.1: the primary array lies after the primary header and ends before FirstUsableLBA;
        # the backup array starts after LastUsableLBA and ends before the backup header. We check
        # the copy-independent part: inside the disk, clear of LBA 0, of this header and of the
        # usable range.
        end = entry_lba + -(-header.array_bytes // block_size) - 1
        if entry_lba < 1 or end > num_blocks - 1 or entry_lba <= my_lba <= end or (
            entry_lba <= last and first <= end
        ):
            raise CorruptTableError(f"{where}: partition entry array at LBA {entry_lba}..{end} misplaced")
    return header


def check_protective_mbr(sector: bytes, num_blocks: int) -> list[str]:
    """Warnings for the protective MBR at LBA 0; NoTableError if it is not one (§5.2.3)."""
    try:
        records = parse_mbr_records(sector)
    except NoTableError as e:
        raise NoTableError(f"no protective MBR: {e.reason}") from None
    # §5.2.3 Table 5-4: a protective MBR has a partition record with OSType 0xEE ("GPT Protective").
    pmbr = [r for r in records if r.os_type == GPT_PROTECTIVE_TYPE]
    if not pmbr:
        raise NoTableError("MBR has no 0xEE protective entry: not a GPT disk")
    warnings = []
    others = [r for r in records if not r.empty and r.os_type != GPT_PROTECTIVE_TYPE]
    if others:
        # A hybrid MBR (§5.2.3 allows only the one 0xEE record; tools like gdisk write more).
        warnings.append(f"hybrid MBR: {len(others)} partition(s) besides the 0xEE entry are ignored")
    r = pmbr[0]
    # §5.2.3 Table 5-4: StartingLBA "Set to 0x00000001"; SizeInLBA "Set to the size of the disk
    # minus one. Set to 0xFFFFFFFF if the size of the disk is too large to be represented".
    if r.start_lba != 1:
        warnings.append(f"protective MBR entry starts at LBA {r.start_lba}, not 1")
    if not others and r.num_blocks != min(num_blocks - 1, 0xFFFFFFFF):
        warnings.append(
            f"protective MBR covers {r.num_blocks} blocks, the disk has {num_blocks - 1} after LBA 0"
        )
    return warnings


class _EntryArray:
    """Streams one entry array in: CRC32 over the whole array, entries checked one by one."""

    def __init__(self, header: GptHeader, label: str) -> None:
        self.header = header
        self.label = label
        self.done = 0  # bytes of the array consumed so far
        self.crc = 0
        self.partitions: list[Partition] = []
        self.warnings: list[str] = []
        self._pending = b""
        self._index = 0
        self._starts: list[int] = []  # accepted ranges, sorted by start (inclusive ends)
        self._ends: list[int] = []
        self._uuids: set[str] = set()

    @property
    def remaining(self) -> int:
        return self.header.array_bytes - self.done

    def feed(self, chunk: bytes | memoryview) -> None:
        self.crc = zlib.crc32(chunk, self.crc)
        self.done += len(chunk)
        buf = self._pending + bytes(chunk)
        size = self.header.entry_size
        pos = 0
        while len(buf) - pos >= size:
            self._entry(buf, pos)
            pos += size
        self._pending = buf[pos:]

    def _entry(self, buf: bytes, pos: int) -> None:
        h = self.header
        number = self._index + 1
        self._index += 1
        type_raw, uniq_raw, start, end, attrs, name_raw = _ENTRY.unpack_from(buf, pos)
        # §5.3.3 Table 5-6 PartitionTypeGUID: "A value of zero defines that this partition entry is
        # not being used."
        if type_raw == _ZERO_GUID:
            return
        where = f"GPT entry {number}"
        # §5.3.3 Table 5-6: StartingLBA and EndingLBA are both inclusive, so a partition needs
        # StartingLBA <= EndingLBA.
        if start > end:
            self.warnings.append(f"{where}: starts at LBA {start} after its end {end}, skipped")
            return
        # §5.3.2 Table 5-5: FirstUsableLBA/LastUsableLBA bound the blocks "that may be used by a
        # partition described by a GUID Partition Entry"; §5.3.1 (overview, paraphrased): partitions
        # do not overlap the GPT's own structures or each other.
        if start < h.first_usable or end > h.last_usable:
            self.warnings.append(
                f"{where}: LBA {start}..{end} outside usable {h.first_usable}..{h.last_usable}, skipped"
            )
            return
        i = bisect.bisect_right(self._starts, start)
        if (i and self._ends[i - 1] >= start) or (i < len(self._starts) and self._starts[i] <= end):
            j = i - 1 if i and self._ends[i - 1] >= start else i
            self.warnings.append(
                f"{where}: LBA {start}..{end} overlaps LBA {self._starts[j]}..{self._ends[j]}, skipped"
            )
            return
        self._starts.insert(i, start)
        self._ends.insert(i, end)
        uniq = guid_str(uniq_raw)
        if uniq in self._uuids:
            self.warnings.append(f"{where}: unique partition GUID {uniq} is not unique")
        self._uuids.add(uniq)
        self.partitions.append(
            Partition(
                number=number,
                start_lba=start,
                num_blocks=end - start + 1,
                type=guid_str(type_raw),
                uuid=uniq,
                name=name_raw.decode("utf-16-le", errors="replace").split("\x00", 1)[0],
                attributes=attrs,
            )
        )

    def check_crc(self) -> None:
        # §5.3.2 validation: "Check the CRC of the GPT Partition Entry Array"; PartitionEntryArrayCRC32
        # is computed over NumberOfPartitionEntries * SizeOfPartitionEntry bytes.
        if self.crc != self.header.array_crc:
            raise CorruptTableError(
                f"{self.label} partition entry array CRC32 0x{self.header.array_crc:08x} "
                f"!= computed 0x{self.crc:08x}"
            )


# Parser stages.
_HEAD, _PRIMARY_ARRAY, _BACKUP_CHECK, _BACKUP_HEADER, _BACKUP_ARRAY, _DONE = range(6)


class GptParser:
    """Sans-IO GPT reader: loop `while (r := p.next_read()): p.feed(r[0], read(*r))`, then `result()`."""

    def __init__(self, block_size: int, num_blocks: int) -> None:
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 512, not {block_size}")
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, not {num_blocks}")
        self._bs = block_size
        self._nb = num_blocks
        self._last = num_blocks - 1
        self._warnings: list[str] = []
        self._error: PartitionTableError | None = None
        self._table: PartitionTable | None = None
        self._primary_error: CorruptTableError | None = None
        self._primary: GptHeader | None = None
        self._array: _EntryArray | None = None
        self._check_lba = 0
        self._stage = _HEAD
        # LBA 0 (protective MBR), LBA 1 (primary header) and at least one more block (array or backup).
        if num_blocks < 3:
            self._finish(NoTableError(f"disk of {num_blocks} blocks is too small for a GPT"))

    # -- sans-IO protocol -------------------------------------------------------------------------

    def next_read(self) -> tuple[int, int] | None:
        """(byte offset, byte length) the parser needs next, or None when it is done."""
        bs = self._bs
        if self._stage == _HEAD:
            return (0, 2 * bs)  # protective MBR + primary header
        if self._stage in (_PRIMARY_ARRAY, _BACKUP_ARRAY):
            a = self._array
            assert a is not None
            length = min(max(READ_CHUNK // bs, 1) * bs, -(-a.remaining // bs) * bs)
            return (a.header.entry_lba * bs + a.done, length)
        if self._stage == _BACKUP_CHECK:
            return (self._check_lba * bs, bs)
        if self._stage == _BACKUP_HEADER:
            return (self._last * bs, bs)
        return None

    def feed(self, offset: int, data: bytes | memoryview) -> None:
        """Hand over the bytes read for the last `next_read()`; a short read counts as bad data."""
        want = self.next_read()
        if want is None or offset != want[0]:
            raise ValueError(f"feed({offset}) does not answer next_read() = {want}")
        data = memoryview(data)[: want[1]]
        stage = self._stage
        try:
            if stage == _HEAD:
                self._feed_head(data)
            elif stage == _BACKUP_CHECK:
                self._feed_backup_check(data)
            elif stage == _BACKUP_HEADER:
                self._feed_backup_header(data)
            else:
                self._feed_array(data, full=len(data) == want[1])
        except CorruptTableError as e:
            if stage in (_HEAD, _PRIMARY_ARRAY):
                self._primary_error = e
                self._stage = _BACKUP_HEADER  # §5.3.2: then "check the last LBA of the device"
            else:
                self._finish(CorruptTableError(f"no valid GPT: primary: {self._primary_error}; backup: {e}"))
        except NoTableError as e:
            self._finish(e)

    def result(self) -> PartitionTable:
        """The table, or PartitionTableError (NoTableError / CorruptTableError) saying why not."""
        if self._stage != _DONE:
            raise RuntimeError("result() called before next_read() returned None")
        if self._error is not None:
            raise self._error
        assert self._table is not None
        return dataclasses.replace(self._table, warnings=tuple(self._warnings))

    # -- stages -----------------------------------------------------------------------------------

    def _finish(self, error: PartitionTableError | None = None) -> None:
        self._stage = _DONE
        self._error = error
        self._array = None

    def _feed_head(self, data: memoryview) -> None:
        bs = self._bs
        # §5.2.3: a GPT disk starts with a protective MBR; without one this is not a GPT disk.
        self._warnings += check_protective_mbr(bytes(data[:bs]), self._nb)
        header = parse_header(bytes(data[bs : 2 * bs]), bs, self._nb, 1)
        self._start_array(header, "primary", _PRIMARY_ARRAY)

    def _start_array(self, header: GptHeader, label: str, stage: int) -> None:
        self._array = _EntryArray(header, label)
        self._stage = stage
        if not header.array_bytes:
            self._array_done()

    def _feed_array(self, data: memoryview, full: bool) -> None:
        a = self._array
        assert a is not None
        if not full:
            raise CorruptTableError(f"short read of the {a.label} partition entry array")
        a.feed(data[: a.remaining])
        if not a.remaining:
            self._array_done()

    def _array_done(self) -> None:
        a = self._array
        assert a is not None
        a.check_crc()
        if self._stage == _BACKUP_ARRAY:
            self._warnings.append(f"primary GPT unusable ({self._primary_error}); using the backup")
            self._make_table(a, used_backup=True)
            self._finish()
            return
        self._make_table(a, used_backup=False)
        self._primary = a.header
        # §5.3.2 validation: for the primary, "Check the AlternateLBA to see if it is a valid GPT".
        alt = a.header.alternate_lba
        if alt == self._last:
            self._check_lba, self._stage = alt, _BACKUP_CHECK
        elif 1 < alt < self._last:
            self._warnings.append(
                f"backup GPT header at LBA {alt}, not at the last LBA {self._last} (disk grown?)"
            )
            self._check_lba, self._stage = alt, _BACKUP_CHECK
        elif alt > self._last:
            self._warnings.append(
                f"backup GPT header LBA {alt} is past the end of the disk (disk truncated?)"
            )
            self._finish()
        else:
            self._warnings.append(f"primary GPT header names LBA {alt} as its backup, which cannot be")
            self._finish()

    def _make_table(self, a: _EntryArray, used_backup: bool) -> None:
        self._table = PartitionTable(
            scheme="gpt",
            disk_uuid=a.header.disk_guid,
            partitions=tuple(a.partitions),
            used_backup=used_backup,
            warnings=(),  # result() fills in every warning, including the backup check's
        )
        self._warnings += a.warnings

    def _feed_backup_check(self, data: memoryview) -> None:
        p = self._primary
        assert p is not None
        try:
            b = parse_header(bytes(data), self._bs, self._nb, self._check_lba)
        except CorruptTableError as e:
            self._warnings.append(f"backup GPT header is bad: {e}")
        else:
            same = (b.disk_guid, b.first_usable, b.last_usable, b.num_entries, b.entry_size, b.array_crc) == (
                p.disk_guid, p.first_usable, p.last_usable, p.num_entries, p.entry_size, p.array_crc)
            if not same or b.alternate_lba != 1:
                self._warnings.append("backup GPT header does not match the primary")
        self._finish()

    def _feed_backup_header(self, data: memoryview) -> None:
        # §5.3.1: "the backup GPT Header must be located in the last LBA of the device".
        header = parse_header(bytes(data), self._bs, self._nb, self._last)
        self._start_array(header, "backup", _BACKUP_ARRAY)


def _drive(parser: GptParser | MbrParser, read: Callable[[int, int], bytes]) -> PartitionTable:
    while (req := parser.next_read()) is not None:
        parser.feed(req[0], read(*req))
    return parser.result()


def probe(block_size: int, num_blocks: int, read: Callable[[int, int], bytes]) -> PartitionTable:
    """Sync driver (tests, tools): GPT first, then MBR; `read(offset, length) -> bytes`.

    Raises the GPT error when the disk has a protective MBR (a GPT disk whose GPT is broken must not
    be read as MBR), else NoTableError naming both failures when neither scheme is present.
    """
    try:
        return _drive(GptParser(block_size, num_blocks), read)
    except PartitionTableError as gpt_error:
        try:
            return _drive(MbrParser(block_size, num_blocks), read)
        except ProtectiveMbrError:
            raise gpt_error from None
        except PartitionTableError as mbr_error:
            raise NoTableError(f"no partition table: GPT: {gpt_error}; MBR: {mbr_error}") from None
