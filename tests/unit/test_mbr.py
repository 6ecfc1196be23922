"""Tests for bdev.mbr: sfdisk-made tables, hand-built broken ones, and hypothesis fuzzing.

Fixtures (tests/fixtures/partitions/*.json.gz, from make_fixtures.sh) hold the non-zero extents of
images written by sfdisk plus `sfdisk --json`'s reading of them. Broken layouts sfdisk refuses to
write (loops, overlaps, out-of-range entries) are built here sector by sector.
"""

from __future__ import annotations

import functools
import gzip
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bdev.gpt import probe
from bdev.mbr import (
    MAX_LOGICALS,
    MbrParser,
    NoTableError,
    PartitionTableError,
    ProtectiveMbrError,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "partitions"
MBR_FIXTURES = ["mbr_primary_512", "mbr_logical_512", "mbr_logical_4k"]
ALL_FIXTURES = sorted(p.name.removesuffix(".json.gz") for p in FIXTURES.glob("*.json.gz"))
RECORD = struct.Struct("<B3sB3sII")


@functools.cache
def load_fixture(name: str) -> dict:
    return json.loads(gzip.decompress((FIXTURES / f"{name}.json.gz").read_bytes()))


class SparseDisk:
    """Zero-filled disk of whole blocks; `read` checks that every request is aligned and inside."""

    def __init__(self, block_size: int, num_blocks: int) -> None:
        self.bs, self.nb = block_size, num_blocks
        self.blocks: dict[int, bytes] = {}
        self.reads: list[tuple[int, int]] = []

    @classmethod
    def fixture(cls, name: str) -> tuple[SparseDisk, dict]:
        doc = load_fixture(name)
        disk = cls(doc["block_size"], doc["num_blocks"])
        for off, data in doc["extents"]:
            raw = bytes.fromhex(data)
            for i in range(0, len(raw), disk.bs):
                disk.blocks[(off + i) // disk.bs] = raw[i : i + disk.bs]
        return disk, doc

    def put(self, lba: int, sector: bytes) -> None:
        self.blocks[lba] = sector.ljust(self.bs, b"\0")

    def read(self, off: int, length: int) -> bytes:
        assert off >= 0 and length > 0 and off + length <= self.bs * self.nb, (off, length, self.nb)
        assert off % self.bs == 0 and length % self.bs == 0, (off, length)
        assert len(self.reads) <= MAX_LOGICALS + 1, "parser keeps on reading"
        self.reads.append((off, length))
        zero = bytes(self.bs)
        lbas = range(off // self.bs, (off + length) // self.bs)
        return b"".join(self.blocks.get(lba, zero) for lba in lbas)


def sector(*records: tuple[int, int, int, int], disk_sig: int = 0xDEADBEEF,
           magic: bytes = b"\x55\xaa") -> bytes:
    """An MBR/EBR sector from (boot, type, start_lba, num_blocks) records."""
    s = bytearray(512)
    struct.pack_into("<I", s, 440, disk_sig)
    for i, (boot, os_type, start, size) in enumerate(records):
        RECORD.pack_into(s, 446 + 16 * i, boot, bytes(3), os_type, bytes(3), start, size)
    s[510:512] = magic
    return bytes(s)


def parse(disk: SparseDisk):
    p = MbrParser(disk.bs, disk.nb)
    while (req := p.next_read()) is not None:
        p.feed(req[0], disk.read(*req))
    return p.result()


def layout(table) -> list[tuple[int, int, int, str]]:
    return [(p.number, p.start_lba, p.num_blocks, p.type) for p in table.partitions]


# -- real tables ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MBR_FIXTURES)
def test_fixture_matches_sfdisk(name):
    disk, doc = SparseDisk.fixture(name)
    table = parse(disk)
    exp = doc["expected"]
    sig = exp["id"].removeprefix("0x")
    assert (table.scheme, table.disk_uuid, table.used_backup, table.warnings) == ("mbr", sig, False, ())
    want = [(p["number"], p["start"], p["size"], f"0x{int(p['type'], 16):02x}", f"{sig}-{p['number']:02x}",
             0x80 if p.get("bootable") else 0)
            for p in exp["partitions"] if int(p["type"], 16) not in (0x05, 0x0F, 0x85)]
    got = [(p.number, p.start_lba, p.num_blocks, p.type, p.uuid, p.attributes) for p in table.partitions]
    assert got == want
    assert all(p.name == "" for p in table.partitions)
    assert probe(disk.bs, disk.nb, disk.read) == table


def test_logicals_follow_the_ebr_chain():
    disk, _ = SparseDisk.fixture("mbr_logical_512")
    table = parse(disk)
    assert [p.number for p in table.partitions] == [1, 5, 6]
    # MBR, then the EBR at the extended partition's start, then the one its link names.
    assert disk.reads == [(0, 512), (18432 * 512, 512), (53248 * 512, 512)]


def test_4k_sectors_use_4k_offsets():
    disk, _ = SparseDisk.fixture("mbr_logical_4k")
    parse(disk)
    assert disk.reads == [(0, 4096), (2304 * 4096, 4096), (6656 * 4096, 4096)]


@pytest.mark.parametrize("name", ["gpt_512", "gpt_4k", "gpt_hybrid_512"])
def test_protective_mbr_is_left_to_gpt(name):
    disk, _ = SparseDisk.fixture(name)
    with pytest.raises(ProtectiveMbrError, match="0xEE"):
        parse(disk)
    assert issubclass(ProtectiveMbrError, NoTableError)


# -- no table -------------------------------------------------------------------------------------


def test_no_table_at_all():
    with pytest.raises(NoTableError, match="0x55AA"):
        parse(SparseDisk(512, 1000))
    with pytest.raises(NoTableError):
        parse(SparseDisk(512, 0))


def test_boot_sector_without_table_is_not_mbr():
    disk = SparseDisk(512, 1000)
    disk.put(0, sector((0x12, 0x83, 1, 10)))
    with pytest.raises(NoTableError, match="boot indicator"):
        parse(disk)


def test_signature_but_no_entries_is_an_empty_table():
    disk = SparseDisk(512, 1000)
    disk.put(0, sector(disk_sig=0))
    table = parse(disk)
    assert (table.partitions, table.disk_uuid, table.warnings) == ((), None, ())


# -- bad primaries -------------------------------------------------------------------------------------


def test_overlapping_primary_skipped():
    disk = SparseDisk(512, 1000)
    disk.put(0, sector((0x80, 0x83, 10, 100), (0, 0x82, 50, 100), (0, 0x83, 110, 10)))
    table = parse(disk)
    assert layout(table) == [(1, 10, 100, "0x83"), (3, 110, 10, "0x83")]
    assert any("MBR partition 2" in w and "overlap" in w for w in table.warnings)


@pytest.mark.parametrize("start, size", [(0, 10), (990, 11), (2000, 5), (0xFFFFFFFF, 0xFFFFFFFF)])
def test_out_of_range_primary_skipped(start, size):
    disk = SparseDisk(512, 1000)
    disk.put(0, sector((0, 0x83, start, size), (0, 0x0C, 100, 100)))
    table = parse(disk)
    assert layout(table) == [(2, 100, 100, "0x0c")]
    assert any("MBR partition 1" in w and "outside" in w for w in table.warnings)


def test_empty_entries_skipped():
    disk = SparseDisk(512, 1000)
    disk.put(0, sector((0, 0, 10, 10), (0, 0x83, 0, 0), (0, 0x83, 30, 10)))
    assert layout(parse(disk)) == [(3, 30, 10, "0x83")]


def test_truncated_disk_drops_extended_without_reading_past_the_end():
    disk, _ = SparseDisk.fixture("mbr_logical_512")
    short = SparseDisk(512, 20000)
    short.blocks = {lba: b for lba, b in disk.blocks.items() if lba < 20000}
    table = parse(short)
    assert layout(table) == [(1, 2048, 16384, "0x83")]
    assert any("MBR partition 2" in w for w in table.warnings)
    assert short.reads == [(0, 512)]


# -- extended partitions and the EBR chain ---------------------------------------------------------------


def ext_disk(*ebrs: tuple[int, bytes], ext=(0, 0x05, 100, 800), nb=1000) -> SparseDisk:
    """Primary 1 at 10..59, the extended partition `ext` in slot 2, EBR sectors at given LBAs."""
    disk = SparseDisk(512, nb)
    disk.put(0, sector((0, 0x83, 10, 50), ext))
    for lba, s in ebrs:
        disk.put(lba, s)
    return disk


@pytest.mark.parametrize("ext_type", [0x05, 0x0F, 0x85])
def test_extended_types(ext_type):
    disk = ext_disk((100, sector((0, 0x83, 1, 99), (0, ext_type, 100, 100))),
                    (200, sector((0, 0x82, 2, 50))), ext=(0, ext_type, 100, 800))
    table = parse(disk)
    assert layout(table) == [(1, 10, 50, "0x83"), (5, 101, 99, "0x83"), (6, 202, 50, "0x82")]
    assert table.warnings == ()


def test_ebr_loop_is_detected():
    disk = ext_disk((100, sector((0, 0x83, 1, 50), (0, 0x05, 100, 100))),
                    (200, sector((0, 0x83, 1, 50), (0, 0x05, 0, 100))))  # links back to the first EBR
    table = parse(disk)
    assert [p.number for p in table.partitions] == [1, 5, 6]
    assert any("loop" in w for w in table.warnings) and len(disk.reads) == 3


def test_ebr_self_link_is_detected():
    disk = ext_disk((100, sector((0, 0x83, 1, 50), (0, 0x05, 0, 100))))
    table = parse(disk)
    assert [p.number for p in table.partitions] == [1, 5] and any("loop" in w for w in table.warnings)


def test_long_chain_is_cut_at_max_logicals():
    nb = 10 + 4 * 300
    disk = ext_disk(ext=(0, 0x05, 10, 4 * 300), nb=nb)
    disk.put(0, sector((0, 0x05, 10, 4 * 300)))
    for i in range(300):
        disk.put(10 + 4 * i, sector((0, 0x83, 1, 3), (0, 0x05, 4 * (i + 1), 4)))
    table = parse(disk)
    assert [p.number for p in table.partitions] == list(range(5, 5 + MAX_LOGICALS))
    assert any(f"more than {MAX_LOGICALS} logical partitions" in w for w in table.warnings)
    assert len(disk.reads) == 1 + MAX_LOGICALS


def test_chain_of_empty_ebrs_is_cut():
    disk = ext_disk(ext=(0, 0x05, 10, 300), nb=400)
    disk.put(0, sector((0, 0x05, 10, 300)))
    for i in range(300):
        disk.put(10 + i, sector((0, 0, 0, 0), (0, 0x05, i + 1, 1)))
    table = parse(disk)
    assert table.partitions == () and any("EBRs: logical partition chain cut" in w for w in table.warnings)
    assert len(disk.reads) == 1 + MAX_LOGICALS


def test_two_data_entries_per_ebr_and_slots_3_4_ignored():
    disk = ext_disk((100, sector((0, 0x83, 1, 20), (0, 0x82, 30, 20), (0, 0x83, 60, 5), (0, 0x05, 100, 100))),
                    (200, sector((0, 0x8E, 1, 50))))
    table = parse(disk)
    assert layout(table) == [
        (1, 10, 50, "0x83"), (5, 101, 20, "0x83"), (6, 130, 20, "0x82"), (7, 201, 50, "0x8e")]
    assert any("slot 3 ignored" in w for w in table.warnings)


def test_logical_count_is_bounded_with_two_per_ebr():
    nb = 10 + 8 * 100
    disk = ext_disk(ext=(0, 0x05, 10, 8 * 100), nb=nb)
    disk.put(0, sector((0, 0x05, 10, 8 * 100)))
    for i in range(100):
        disk.put(10 + 8 * i, sector((0, 0x83, 1, 3), (0, 0x83, 4, 3), (0, 0x05, 8 * (i + 1), 8)))
    table = parse(disk)
    assert [p.number for p in table.partitions] == list(range(5, 5 + MAX_LOGICALS))
    assert any(f"more than {MAX_LOGICALS} logical partitions" in w for w in table.warnings)
    assert len(disk.reads) == 1 + MAX_LOGICALS // 2


def test_ebr_link_outside_extended_stops_the_chain():
    disk = ext_disk((100, sector((0, 0x83, 1, 50), (0, 0x05, 900, 10))))
    table = parse(disk)
    assert [p.number for p in table.partitions] == [1, 5]
    assert any("outside the extended partition" in w for w in table.warnings)
    assert len(disk.reads) == 2


@pytest.mark.parametrize("start, size", [(0, 10), (1, 800), (850, 10)])
def test_logical_outside_extended_skipped_but_numbered(start, size):
    disk = ext_disk((100, sector((0, 0x83, start, size), (0, 0x05, 100, 100))),
                    (200, sector((0, 0x82, 1, 50))))
    table = parse(disk)
    assert layout(table) == [(1, 10, 50, "0x83"), (6, 201, 50, "0x82")]
    assert any("logical partition 5" in w and "outside" in w for w in table.warnings)


def test_overlapping_logicals_skipped():
    disk = ext_disk((100, sector((0, 0x83, 1, 150), (0, 0x05, 100, 100))),
                    (200, sector((0, 0x82, 1, 50))))  # 201.. lies inside logical 5 (101..250)
    table = parse(disk)
    assert [p.number for p in table.partitions] == [1, 5]
    assert any("logical partition 6" in w and "overlap" in w for w in table.warnings)


def test_primary_overlapping_extended_skipped():
    disk = ext_disk((100, sector((0, 0x83, 1, 50))))
    disk.put(0, sector((0, 0x83, 10, 50), (0, 0x05, 100, 800), (0, 0x83, 150, 10)))
    table = parse(disk)
    assert [p.number for p in table.partitions] == [1, 5]
    assert any("MBR partition 3" in w and "overlap" in w for w in table.warnings)


def test_second_extended_ignored():
    disk = ext_disk((100, sector((0, 0x83, 1, 50))))
    disk.put(0, sector((0, 0x83, 10, 50), (0, 0x05, 100, 400), (0, 0x0F, 500, 400)))
    table = parse(disk)
    assert [p.number for p in table.partitions] == [1, 5]
    assert any("second extended" in w for w in table.warnings)


def test_ebr_without_signature_ends_the_chain():
    disk = ext_disk((100, sector((0, 0x83, 1, 50), (0, 0x05, 100, 100))),
                    (200, sector((0, 0x83, 1, 50), magic=b"\0\0")))
    table = parse(disk)
    assert [p.number for p in table.partitions] == [1, 5]
    assert any("EBR at LBA 200" in w for w in table.warnings)


def test_zero_disk_signature_gives_no_uuids():
    disk = SparseDisk(512, 1000)
    disk.put(0, sector((0, 0x83, 10, 10), disk_sig=0))
    table = parse(disk)
    assert table.disk_uuid is None and table.partitions[0].uuid is None


def test_protocol_misuse():
    with pytest.raises(ValueError):
        MbrParser(100, 10)
    p = MbrParser(512, 10)
    with pytest.raises(RuntimeError):
        p.result()
    with pytest.raises(ValueError):
        p.feed(512, bytes(512))


def test_short_read_is_no_table():
    p = MbrParser(512, 10)
    p.feed(0, sector((0, 0x83, 1, 5))[:300])
    with pytest.raises(NoTableError):
        p.result()


# -- fuzzing --------------------------------------------------------------------------------------------


def check(disk: SparseDisk) -> None:
    """Parse `disk`: only PartitionTableError may escape; a table must be sane."""
    try:
        table = parse(disk)
    except PartitionTableError:
        return
    numbers = [p.number for p in table.partitions]
    assert len(set(numbers)) == len(numbers) and all(1 <= n <= 4 + MAX_LOGICALS for n in numbers)
    spans = sorted((p.start_lba, p.start_lba + p.num_blocks) for p in table.partitions)
    assert all(s >= 1 and e <= disk.nb for s, e in spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans


TYPES = st.sampled_from([0x00, 0x05, 0x0F, 0x85, 0x83, 0x82, 0x07, 0xEE]) | st.integers(0, 255)
LBAS = st.sampled_from([0, 1, 2, 10, 99, 100, 101, 199, 200, 999, 1000, 0xFFFFFFFF]) | st.integers(0, 1100)
RECORDS = st.lists(st.tuples(st.sampled_from([0, 0x80]) | st.integers(0, 255), TYPES, LBAS, LBAS),
                   max_size=4)


@settings(max_examples=300, deadline=None)
@given(nb=st.integers(0, 1100), mbr=RECORDS, ebrs=st.dictionaries(LBAS, RECORDS, max_size=8))
def test_fuzz_structured(nb, mbr, ebrs):
    disk = SparseDisk(512, nb)
    disk.put(0, sector(*mbr))
    for lba, recs in ebrs.items():
        disk.put(lba, sector(*recs))
    check(disk)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(ALL_FIXTURES), data=st.data())
def test_fuzz_mutated_fixtures(name, data):
    disk, _ = SparseDisk.fixture(name)
    disk.nb = data.draw(st.sampled_from([disk.nb, disk.nb // 2, 20000, 3, 1]))
    lbas = sorted(lba for lba in disk.blocks if lba < disk.nb)
    for _ in range(data.draw(st.integers(1, 8))):
        if lbas:
            lba = data.draw(st.sampled_from(lbas))
            off = data.draw(st.integers(440, 511))  # signature and table bytes
            block = bytearray(disk.blocks[lba])
            block[off] = data.draw(st.integers(0, 255))
            disk.blocks[lba] = bytes(block)
    check(disk)
