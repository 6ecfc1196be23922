"""Tests for bdev.gpt: real sgdisk-made tables, corrupted copies of them, and hypothesis fuzzing.

Fixtures (tests/fixtures/partitions/*.json.gz, from make_fixtures.sh) hold the non-zero extents of
images written by sgdisk plus `sfdisk --json`'s reading of them. Corruptions are made here by
patching those real tables; where a test needs the CRCs to stay valid (to reach entry checks), the
patch helpers re-sign the header and entry array.
"""

from __future__ import annotations

import functools
import gzip
import json
import struct
import uuid
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bdev.gpt import (
    MAX_ENTRIES,
    READ_CHUNK,
    CorruptTableError,
    GptParser,
    NoTableError,
    PartitionTableError,
    guid_str,
    probe,
)
from bdev.mbr import MbrParser

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "partitions"
GPT_FIXTURES = ["gpt_512", "gpt_4k", "gpt_hybrid_512"]
ALL_FIXTURES = sorted(p.name.removesuffix(".json.gz") for p in FIXTURES.glob("*.json.gz"))

HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
HEADER_FIELDS = ("sig", "revision", "header_size", "header_crc", "reserved", "my_lba", "alt_lba",
                 "first_usable", "last_usable", "disk_guid", "entry_lba", "num_entries", "entry_size",
                 "array_crc")
ENTRY = struct.Struct("<16s16sQQQ72s")
ENTRY_FIELDS = ("type", "uuid", "start", "end", "attrs", "name")
LINUX_DATA = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4").bytes_le


@functools.cache
def load_fixture(name: str) -> dict:
    return json.loads(gzip.decompress((FIXTURES / f"{name}.json.gz").read_bytes()))


class SparseDisk:
    """A zero-filled disk image that stores only written blocks; `read` checks every request."""

    def __init__(self, block_size: int, num_blocks: int) -> None:
        self.bs = block_size
        self.nb = num_blocks
        self.blocks: dict[int, bytes] = {}
        self.reads: list[tuple[int, int]] = []

    @classmethod
    def fixture(cls, name: str) -> tuple[SparseDisk, dict]:
        doc = load_fixture(name)
        disk = cls(doc["block_size"], doc["num_blocks"])
        for off, data in doc["extents"]:
            disk.write(off, bytes.fromhex(data))
        return disk, doc

    def copy(self, num_blocks: int | None = None) -> SparseDisk:
        d = SparseDisk(self.bs, self.nb if num_blocks is None else num_blocks)
        d.blocks = {lba: b for lba, b in self.blocks.items() if lba < d.nb}
        return d

    def write(self, off: int, data: bytes) -> None:
        bs = self.bs
        for lba in range(off // bs, (off + len(data) + bs - 1) // bs):
            block = bytearray(self.blocks.get(lba, bytes(bs)))
            lo, hi = max(off, lba * bs), min(off + len(data), (lba + 1) * bs)
            block[lo - lba * bs : hi - lba * bs] = data[lo - off : hi - off]
            self.blocks[lba] = bytes(block)

    def read(self, off: int, length: int) -> bytes:
        assert off >= 0 and length > 0 and off + length <= self.bs * self.nb, (off, length, self.nb)
        assert off % self.bs == 0 and length % self.bs == 0 and length <= READ_CHUNK, (off, length)
        assert len(self.reads) < 1000, "parser keeps on reading"
        self.reads.append((off, length))
        zero = bytes(self.bs)
        lbas = range(off // self.bs, (off + length) // self.bs)
        return b"".join(self.blocks.get(lba, zero) for lba in lbas)

    def read_bytes(self, off: int, length: int) -> bytes:
        """Unchecked byte-granular read for the test helpers (not counted as a parser read)."""
        bs = self.bs
        first, last = off // bs, (off + length - 1) // bs
        raw = b"".join(self.blocks.get(lba, bytes(bs)) for lba in range(first, last + 1))
        return raw[off - first * bs : off - first * bs + length]


def header(disk: SparseDisk, lba: int) -> dict:
    return dict(zip(HEADER_FIELDS, HEADER.unpack(disk.read_bytes(lba * disk.bs, 92)), strict=True))


def write_header(disk: SparseDisk, lba: int, resign: bool = True, **changes) -> None:
    """Patch fields of the header at `lba`, then recompute its CRC32 (unless resign=False)."""
    h = header(disk, lba) | changes
    raw = bytearray(disk.read_bytes(lba * disk.bs, disk.bs))
    raw[:92] = HEADER.pack(*(h[f] for f in HEADER_FIELDS))
    if resign and 92 <= h["header_size"] <= disk.bs:
        raw[16:20] = bytes(4)
        raw[16:20] = struct.pack("<I", zlib.crc32(raw[: h["header_size"]]))
    disk.write(lba * disk.bs, bytes(raw))


def write_entry(disk: SparseDisk, index: int, **changes) -> None:
    """Patch entry `index` in BOTH copies of the table, re-signing arrays and headers."""
    for lba in (1, disk.nb - 1):
        h = header(disk, lba)
        off = h["entry_lba"] * disk.bs + index * h["entry_size"]
        e = dict(zip(ENTRY_FIELDS, ENTRY.unpack(disk.read_bytes(off, ENTRY.size)), strict=True)) | changes
        disk.write(off, ENTRY.pack(*(e[f] for f in ENTRY_FIELDS)))
        array = disk.read_bytes(h["entry_lba"] * disk.bs, h["num_entries"] * h["entry_size"])
        write_header(disk, lba, array_crc=zlib.crc32(array))


def build_gpt(bs: int, nb: int, parts: dict[int, tuple[int, int]], num_entries: int = 128,
              entry_size: int = 128) -> SparseDisk:
    """A synthetic GPT (for layouts sgdisk will not write): parts = {index: (start, end)}."""
    disk = SparseDisk(bs, nb)
    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\0\x02\0", 0xEE, b"\xff" * 3, 1, min(nb - 1, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"
    disk.write(0, bytes(mbr))
    array = bytearray(num_entries * entry_size)
    for i, (start, end) in parts.items():
        name = f"part{i}".encode("utf-16-le")
        array[i * entry_size : i * entry_size + 128] = ENTRY.pack(
            LINUX_DATA, uuid.UUID(int=i + 1).bytes_le, start, end, 0, name)
    array_blocks = -(-len(array) // bs)
    first, last = 2 + array_blocks, nb - 2 - array_blocks
    for my, alt, entry_lba in ((1, nb - 1, 2), (nb - 1, 1, nb - 1 - array_blocks)):
        disk.write(entry_lba * bs, bytes(array))
        disk.write(my * bs, HEADER.pack(b"EFI PART", 0x10000, 92, 0, 0, my, alt, first, last,
                                        uuid.UUID(int=99).bytes_le, entry_lba, num_entries, entry_size,
                                        zlib.crc32(array)))
        write_header(disk, my)
    return disk


def parse(disk: SparseDisk, block_size: int | None = None):
    p = GptParser(block_size or disk.bs, disk.nb)
    while (req := p.next_read()) is not None:
        p.feed(req[0], disk.read(*req))
    return p.result()


# -- real tables ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GPT_FIXTURES)
def test_fixture_matches_sfdisk(name):
    disk, doc = SparseDisk.fixture(name)
    table = parse(disk)
    exp = doc["expected"]
    assert table.scheme == "gpt" and not table.used_backup
    assert table.disk_uuid == exp["id"].lower()
    got = [(p.number, p.start_lba, p.num_blocks, p.type, p.uuid, p.name) for p in table.partitions]
    want = [(p["number"], p["start"], p["size"], p["type"].lower(), p["uuid"].lower(), p.get("name", ""))
            for p in exp["partitions"]]
    assert got == want and len(got) == 3
    if name == "gpt_hybrid_512":
        assert len(table.warnings) == 1 and "hybrid MBR" in table.warnings[0]
    else:
        assert table.warnings == ()
    assert probe(disk.bs, disk.nb, disk.read) == table


def test_fixture_types_names_attributes():
    disk, _ = SparseDisk.fixture("gpt_512")
    p1, p2, p3 = parse(disk).partitions
    assert (p1.type, p1.name, p1.attributes) == ("c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "EFI System", 1)
    assert (p2.type, p2.name, p2.attributes) == ("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f", "swap", 0)
    assert (p3.type, p3.name, p3.attributes) == (
        "0fc63daf-8483-4772-8e79-3d69d8477de4", "Linux données", 1 << 60)


@pytest.mark.parametrize("name", ["gpt_512", "gpt_4k"])
def test_reads_head_array_then_backup_header(name):
    disk, _ = SparseDisk.fixture(name)
    bs = disk.bs
    parse(disk)
    array_len = -(-128 * 128 // bs) * bs
    assert disk.reads == [(0, 2 * bs), (2 * bs, array_len), ((disk.nb - 1) * bs, bs)]


def test_guid_is_mixed_endian():
    raw = bytes.fromhex("28732ac11ff8d211ba4b00a0c93ec93b")
    assert guid_str(raw) == "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"


# -- backup fallback --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt_512", "gpt_4k"])
def test_corrupt_primary_header_uses_backup(name):
    disk, _ = SparseDisk.fixture(name)
    good = parse(disk)
    write_header(disk, 1, resign=False, disk_guid=bytes(16))  # CRC no longer matches
    table = parse(disk)
    assert table.used_backup and table.partitions == good.partitions and table.disk_uuid == good.disk_uuid
    assert any("using the backup" in w and "CRC32" in w for w in table.warnings)


@pytest.mark.parametrize("changes", [
    {"sig": b"EFI ZZZZ"}, {"revision": 0x20000}, {"header_size": 91}, {"header_size": 513},
    {"my_lba": 2}, {"first_usable": 1}, {"first_usable": 40000}, {"last_usable": 32767},
    {"entry_size": 120}, {"entry_size": 132}, {"entry_lba": 20}, {"entry_lba": 32767},
    {"num_entries": MAX_ENTRIES + 1}, {"num_entries": 0xFFFFFFFF}, {"entry_size": 1 << 31},
])
def test_invalid_primary_header_field_uses_backup(changes):
    disk, _ = SparseDisk.fixture("gpt_512")
    write_header(disk, 1, **changes)  # re-signed: only the field itself is wrong
    table = parse(disk)
    assert table.used_backup and len(table.partitions) == 3
    assert all(length <= READ_CHUNK for _, length in disk.reads)


def test_zeroed_primary_header_uses_backup():
    disk, _ = SparseDisk.fixture("gpt_512")
    disk.write(512, bytes(512))
    assert parse(disk).used_backup


def test_bad_primary_array_crc_uses_backup():
    disk, _ = SparseDisk.fixture("gpt_512")
    disk.write(2 * 512 + 56, "EVIL".encode("utf-16-le"))  # entry 1's name, array CRC not updated
    table = parse(disk)
    assert table.used_backup and table.partitions[0].name == "EFI System"
    assert any("partition entry array CRC32" in w for w in table.warnings)


def test_both_headers_corrupt_is_an_error():
    disk, _ = SparseDisk.fixture("gpt_512")
    write_header(disk, 1, resign=False, my_lba=7)
    write_header(disk, disk.nb - 1, resign=False, my_lba=7)
    with pytest.raises(CorruptTableError) as e:
        parse(disk)
    assert "primary" in str(e.value) and "backup" in str(e.value)
    with pytest.raises(CorruptTableError):  # a protective MBR stops probe() from reading it as MBR
        probe(disk.bs, disk.nb, disk.read)


def test_bad_primary_and_bad_backup_array_is_an_error():
    disk, _ = SparseDisk.fixture("gpt_512")
    write_header(disk, 1, resign=False, my_lba=7)
    disk.write((disk.nb - 33) * 512, b"\x01")  # backup array, CRC not updated
    with pytest.raises(CorruptTableError, match="backup partition entry array CRC32"):
        parse(disk)


def test_bad_backup_only_warns():
    disk, _ = SparseDisk.fixture("gpt_512")
    write_header(disk, disk.nb - 1, resign=False, reserved=1)
    table = parse(disk)
    assert not table.used_backup and len(table.partitions) == 3
    assert any("backup GPT header is bad" in w for w in table.warnings)


def test_backup_that_differs_warns():
    disk, _ = SparseDisk.fixture("gpt_512")
    write_header(disk, disk.nb - 1, disk_guid=bytes(16))
    assert "backup GPT header does not match the primary" in parse(disk).warnings



def test_protective_mbr_and_alternate_lba_oddities_warn():
    disk, _ = SparseDisk.fixture("gpt_512")
    mbr = bytearray(disk.read_bytes(0, 512))
    mbr[446 + 8 : 446 + 12] = struct.pack("<I", 2)  # 0xEE entry's StartingLBA
    disk.write(0, bytes(mbr))
    write_header(disk, 1, alt_lba=0)
    table = parse(disk)
    assert len(table.partitions) == 3 and not table.used_backup
    assert any("starts at LBA 2" in w for w in table.warnings)
    assert any("names LBA 0 as its backup" in w for w in table.warnings)
    assert disk.reads[-1][0] == 2 * 512  # no backup check read

# -- bad entries are skipped, the rest of the table stays -------------------------------------------


def test_overlapping_entry_is_skipped():
    disk, _ = SparseDisk.fixture("gpt_512")
    write_entry(disk, 1, start=9000, end=12000)  # entry 2 now overlaps entry 1 (2048..10239)
    table = parse(disk)
    assert [p.number for p in table.partitions] == [1, 3] and not table.used_backup
    assert any("GPT entry 2" in w and "overlaps" in w for w in table.warnings)


def test_overlap_with_a_later_entry_keeps_the_first():
    disk, _ = SparseDisk.fixture("gpt_512")
    write_entry(disk, 0, start=15000, end=15100)  # entry 1 now lies inside entry 3 (14336..)
    table = parse(disk)
    assert [p.number for p in table.partitions] == [1, 2]
    assert any("GPT entry 3" in w and "overlaps" in w for w in table.warnings)


@pytest.mark.parametrize("index, start, end", [
    (0, 20, 100),  # before FirstUsableLBA (34)
    (2, 14336, 32735),  # past LastUsableLBA (32734)
    (1, 12000, 11000),  # start > end
    (1, 1 << 63, (1 << 64) - 1),
])
def test_out_of_range_entry_is_skipped(index, start, end):
    disk, _ = SparseDisk.fixture("gpt_512")
    write_entry(disk, index, start=start, end=end)
    table = parse(disk)
    numbers = [p.number for p in table.partitions]
    assert numbers == [n for n in (1, 2, 3) if n != index + 1]  # numbers stay entry index + 1
    assert any(f"GPT entry {index + 1}" in w and "skipped" in w for w in table.warnings)


def test_unused_entries_ignored_and_numbering_kept():
    disk, _ = SparseDisk.fixture("gpt_512")
    write_entry(disk, 1, type=bytes(16))
    write_entry(disk, 77, type=LINUX_DATA, uuid=uuid.UUID(int=5).bytes_le, start=100, end=2000,
                name="late".encode("utf-16-le"))
    table = parse(disk)
    assert [(p.number, p.name) for p in table.partitions] == [
        (1, "EFI System"), (3, "Linux données"), (78, "late")]


def test_garbage_name_does_not_raise():
    disk, _ = SparseDisk.fixture("gpt_512")
    write_entry(disk, 1, name=b"\x00\xd8" * 36)  # lone surrogates
    assert parse(disk).partitions[1].name == "\ufffd" * 36


def test_duplicate_unique_guid_warns():
    disk, _ = SparseDisk.fixture("gpt_512")
    write_entry(disk, 1, uuid=uuid.UUID("11111111-2222-4333-8444-555555555501").bytes_le)
    table = parse(disk)
    assert len(table.partitions) == 3 and any("not unique" in w for w in table.warnings)


# -- disk size mismatches, sizes, bounds --------------------------------------------------------------


def test_huge_entry_count_reads_nothing_big():
    disk, _ = SparseDisk.fixture("gpt_512")
    for lba in (1, disk.nb - 1):
        write_header(disk, lba, num_entries=0xFFFFFFFF)
    with pytest.raises(CorruptTableError, match="too many"):
        parse(disk)
    assert disk.reads == [(0, 1024), ((disk.nb - 1) * 512, 512)]


def test_large_array_streams_in_chunks_with_odd_entry_size():
    # 16384 entries of 136 bytes: a 2.1 MiB array read in <= 1 MiB chunks, entries straddling them.
    nb = 1 << 17
    disk = build_gpt(512, nb, {0: (5000, 5999), 16383: (6000, 9999), 7710: (10000, 10000)},
                     num_entries=16384, entry_size=136)
    table = parse(disk)
    assert [(p.number, p.start_lba, p.num_blocks, p.name) for p in table.partitions] == [
        (1, 5000, 1000, "part0"), (7711, 10000, 1, "part7710"), (16384, 6000, 4000, "part16383")]
    assert table.warnings == () and len(disk.reads) == 5
    assert all(length <= READ_CHUNK for _, length in disk.reads)


def test_entry_size_256_and_zero_entries():
    t = parse(build_gpt(4096, 4096, {0: (100, 199), 3: (200, 299)}, num_entries=4, entry_size=256))
    assert [(p.number, p.start_lba) for p in t.partitions] == [(1, 100), (4, 200)]
    t = parse(build_gpt(512, 100, {}, num_entries=0))
    assert t.partitions == () and t.scheme == "gpt"


def test_truncated_disk_backup_beyond_end():
    disk, _ = SparseDisk.fixture("gpt_512")
    # A few blocks shorter: the primary still fits, its backup does not.
    table = parse(disk.copy(disk.nb - 8))
    assert len(table.partitions) == 3 and not table.used_backup
    assert any("past the end of the disk" in w for w in table.warnings)
    # Much shorter: LastUsableLBA is past the end, and there is no backup at the new last LBA.
    short = disk.copy(disk.nb - 1024)
    with pytest.raises(CorruptTableError, match="usable range"):
        parse(short)
    assert all(off + n <= short.nb * 512 for off, n in short.reads)


def test_grown_disk_checks_backup_where_the_primary_says():
    disk, _ = SparseDisk.fixture("gpt_512")
    table = parse(disk.copy(disk.nb + 4096))
    assert len(table.partitions) == 3 and not table.used_backup
    assert any("disk grown" in w for w in table.warnings)
    assert not any("backup GPT header is bad" in w for w in table.warnings)


def test_wrong_block_size_finds_no_gpt_header():
    disk, _ = SparseDisk.fixture("gpt_4k")
    blocks512 = SparseDisk(512, disk.nb * 8)
    for lba, b in disk.blocks.items():
        blocks512.write(lba * 4096, b)
    with pytest.raises(CorruptTableError):
        parse(blocks512)


# -- no GPT ---------------------------------------------------------------------------------------------


def test_no_table_at_all():
    disk = SparseDisk(512, 32768)
    with pytest.raises(NoTableError):
        parse(disk)
    with pytest.raises(NoTableError, match="no partition table"):
        probe(512, 32768, disk.read)


@pytest.mark.parametrize("name", ["mbr_primary_512", "mbr_logical_512"])
def test_mbr_disk_is_not_gpt(name):
    disk, _ = SparseDisk.fixture(name)
    with pytest.raises(NoTableError, match="0xEE"):
        parse(disk)
    assert disk.reads == [(0, 1024)]
    assert probe(disk.bs, disk.nb, disk.read).scheme == "mbr"


def test_gpt_without_protective_mbr_is_not_gpt():
    disk, _ = SparseDisk.fixture("gpt_512")
    disk.write(0, bytes(512))
    with pytest.raises(NoTableError, match="no protective MBR"):
        parse(disk)


@pytest.mark.parametrize("nb", [0, 1, 2])
def test_tiny_disk(nb):
    p = GptParser(512, nb)
    assert p.next_read() is None
    with pytest.raises(NoTableError):
        p.result()


def test_protocol_misuse():
    with pytest.raises(ValueError):
        GptParser(520, 100)
    p = GptParser(512, 100)
    with pytest.raises(RuntimeError):
        p.result()
    with pytest.raises(ValueError):
        p.feed(512, bytes(512))


def test_short_reads_count_as_corrupt():
    disk, _ = SparseDisk.fixture("gpt_512")
    p = GptParser(512, disk.nb)
    p.feed(0, memoryview(disk.read(0, 1024))[:700])  # the header block is cut short
    assert p.next_read() == ((disk.nb - 1) * 512, 512)  # -> backup
    while (req := p.next_read()) is not None:
        p.feed(req[0], disk.read(*req))
    assert p.result().used_backup


# -- fuzzing --------------------------------------------------------------------------------------------


def drive_checked(parser, disk: SparseDisk):
    """Run a parser over `disk`; it may only raise PartitionTableError (SparseDisk checks the reads)."""
    try:
        while (req := parser.next_read()) is not None:
            parser.feed(req[0], disk.read(*req))
        return parser.result()
    except PartitionTableError:
        return None


INTERESTING = [0, 1, 2, 33, 34, 127, 128, 136, 255, 256, 4096, 32767, 32768, 65536, 65537,
               0xFFFFFFFF, 1 << 32, (1 << 63) - 1, (1 << 64) - 1]


@st.composite
def mutated_fixture(draw):
    disk, _ = SparseDisk.fixture(draw(st.sampled_from(ALL_FIXTURES)))
    disk = disk.copy(draw(st.sampled_from([disk.nb, disk.nb - 1, disk.nb - 40, disk.nb + 8, 3, 40])))
    written = sorted(disk.blocks)
    for _ in range(draw(st.integers(0, 4))):  # random byte flips in the non-zero blocks
        if written:
            lba = draw(st.sampled_from(written))
            disk.write(lba * disk.bs + draw(st.integers(0, disk.bs - 1)), bytes([draw(st.integers(0, 255))]))
    gpt = disk.nb > 40 and header(disk, 1)["sig"] == b"EFI PART"
    for _ in range(draw(st.integers(0, 3)) if gpt else 0):  # re-signed header / entry field changes
        lba = draw(st.sampled_from([1, disk.nb - 1]))
        field = draw(st.sampled_from(HEADER_FIELDS[5:9] + HEADER_FIELDS[10:13]))
        fmt_max = (1 << 32) - 1 if field in ("num_entries", "entry_size") else (1 << 64) - 1
        value = draw(st.sampled_from(INTERESTING) | st.integers(0, fmt_max))
        write_header(disk, lba, **{field: min(value, fmt_max)})
        h = header(disk, lba)
        size = h["num_entries"] * h["entry_size"]
        if draw(st.booleans()) and size <= 8 << 20 and h["entry_lba"] * disk.bs + size <= disk.nb * disk.bs:
            write_header(disk, lba, array_crc=zlib.crc32(disk.read_bytes(h["entry_lba"] * disk.bs, size)))
    return disk


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(disk=mutated_fixture())
def test_fuzz_mutated_fixtures(disk):
    result = drive_checked(GptParser(disk.bs, disk.nb), disk)
    if result is not None:
        for p in result.partitions:
            assert p.num_blocks >= 1 and p.start_lba + p.num_blocks <= disk.nb
    disk.reads.clear()
    drive_checked(MbrParser(disk.bs, disk.nb), disk)


@settings(max_examples=300, deadline=None)
@given(bs=st.sampled_from([512, 4096]), nb=st.integers(0, 80), data=st.data())
def test_fuzz_random_bytes(bs, nb, data):
    disk = SparseDisk(bs, nb)
    where = st.sampled_from([0, 1, 2, 3, nb - 1, nb - 2, nb - 33]) if nb else st.nothing()
    for lba in data.draw(st.sets(where)):
        if 0 <= lba < nb:
            disk.write(lba * bs, data.draw(st.binary(min_size=bs, max_size=bs)))
    if nb and data.draw(st.booleans()):  # a valid protective MBR, to get past LBA 0 more often
        disk.write(0, build_gpt(bs, max(nb, 3), {}, num_entries=0).blocks[0])
    drive_checked(GptParser(bs, nb), disk)
    disk.reads.clear()
    drive_checked(MbrParser(bs, nb), disk)
    disk.reads.clear()
    try:
        probe(bs, nb, disk.read)
    except PartitionTableError:
        pass
