"""Registry, partition examine and re-examine: real sgdisk/sfdisk tables (fixtures and tables made
here with sgdisk), a corrupt table, fake parsers, diffs, and removal order."""

from __future__ import annotations

import errno
import gzip
import json
import logging
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import trio

from bdev import BdevError, BdevRegistry, MallocBdev, PartBdev, PartitionExamine, read_partition_table

pytestmark = pytest.mark.trio

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "partitions"
needs_sgdisk = pytest.mark.skipif(shutil.which("sgdisk") is None, reason="sgdisk (gdisk) not installed")


def malloc_from_fixture(name: str, bdev_name: str = "disk") -> tuple[MallocBdev, dict]:
    doc = json.loads(gzip.decompress((FIXTURES / f"{name}.json.gz").read_bytes()))
    b = MallocBdev(bdev_name, doc["num_blocks"], doc["block_size"])
    for off, data in doc["extents"]:
        raw = bytes.fromhex(data)
        b._buf[off : off + len(raw)] = raw
    return b, doc


def sgdisk(image: MallocBdev, tmp_path: Path, *args: str) -> None:
    """Run sgdisk on a file holding the bdev's bytes, then copy them back (as a user would through
    the FUSE file)."""
    f = tmp_path / "img"
    f.write_bytes(bytes(image._buf))
    subprocess.run(["sgdisk", *args, str(f)], check=True, capture_output=True)
    image._buf[:] = f.read_bytes()


class Recorder:
    def __init__(self, registry: BdevRegistry) -> None:
        self.events: list[tuple[str, str]] = []
        registry.add_listener(lambda ev, b: self.events.append((ev, b.name)))


def parts(registry: BdevRegistry) -> dict[str, tuple[int, int]]:
    return {b.name: (b.offset_blocks, b.num_blocks) for b in registry.bdevs() if isinstance(b, PartBdev)}


@pytest.mark.parametrize("fixture", ["gpt_512", "gpt_4k", "gpt_hybrid_512", "mbr_primary_512", "mbr_logical_4k"])
async def test_register_examines_real_tables(fixture):
    b, doc = malloc_from_fixture(fixture)
    reg = BdevRegistry()
    rec = Recorder(reg)
    await reg.register(b)
    expected = {f"diskp{p['number']}": (p["start"], p["size"]) for p in doc["expected"]["partitions"]
                if p.get("type") not in ("5", "f", "85")}  # MBR extended containers are not listed
    assert parts(reg) == expected
    assert rec.events[0] == ("add", "disk")  # the disk first, then its partitions (like udev)
    assert sorted(rec.events[1:]) == sorted(("add", n) for n in expected)
    p1 = reg.get("diskp1")
    assert p1.base is b and p1.number == 1


async def test_gpt_partition_data_lands_at_the_right_offset():
    b, doc = malloc_from_fixture("gpt_512")
    reg = BdevRegistry()
    await reg.register(b)
    p2 = reg.get("diskp2")
    ch = p2.get_io_channel()
    await ch.write(1000, b"hello partition")
    bch = b.get_io_channel()
    assert bytes(await bch.read(p2.offset_blocks * 512 + 1000, 15)) == b"hello partition"


async def test_no_table_and_corrupt_table_give_no_partitions(caplog):
    caplog.set_level(logging.INFO, logger="bdev.examine")
    reg = BdevRegistry()
    await reg.register(MallocBdev("blank", 2048, 512))
    assert parts(reg) == {}
    assert "blank: no partition table" in caplog.text
    b, _ = malloc_from_fixture("gpt_512", "bad")
    b._buf[512 + 100] ^= 0xFF  # primary header outside its CRC'd bytes is fine: break the CRC'd part
    b._buf[512 + 24] ^= 0xFF  # MyLBA of the primary
    last = b.num_blocks - 1
    b._buf[last * 512 + 24] ^= 0xFF  # and of the backup
    caplog.clear()
    await reg.register(b)
    assert parts(reg) == {}
    assert any(r.levelno == logging.WARNING and "bad: corrupt partition table" in r.getMessage()
               for r in caplog.records)


async def test_bad_primary_uses_backup_with_a_warning(caplog):
    b, doc = malloc_from_fixture("gpt_512")
    b._buf[512:1024] = bytes(512)  # wipe the primary header
    reg = BdevRegistry()
    await reg.register(b)
    assert len(parts(reg)) == len(doc["expected"]["partitions"])
    assert "using the backup" in caplog.text


@needs_sgdisk
async def test_reexamine_adds_resizes_moves_and_removes(tmp_path):
    b = MallocBdev("nvme0n1", 32768, 512)
    sgdisk(b, tmp_path, "-o", "-n", "1:2048:+2M", "-n", "2:0:+2M", "-n", "3:0:+1M")
    reg = BdevRegistry()
    rec = Recorder(reg)
    await reg.register(b)
    assert parts(reg) == {"nvme0n1p1": (2048, 4096), "nvme0n1p2": (6144, 4096), "nvme0n1p3": (10240, 2048)}
    p1, p2, p3 = (reg.get(f"nvme0n1p{i}") for i in (1, 2, 3))
    p1_events = []
    p1.open(p1_events.append)
    rec.events.clear()
    # p1 shrinks in place, p2 goes away, p3 moves (same number, new start), p4 appears
    sgdisk(b, tmp_path, "-d", "1", "-n", "1:2048:+1M", "-d", "2", "-d", "3", "-n", "3:20480:+1M",
           "-n", "4:24576:+1M", "-u", "1:" + p1.uuid)
    await reg.reexamine("nvme0n1")
    assert parts(reg) == {"nvme0n1p1": (2048, 2048), "nvme0n1p3": (20480, 2048), "nvme0n1p4": (24576, 2048)}
    assert reg.get("nvme0n1p1") is p1 and [e.type for e in p1_events] == ["resize"]
    assert p2.removed and p3.removed and reg.get("nvme0n1p3") is not p3
    assert sorted(rec.events) == sorted([
        ("resize", "nvme0n1p1"), ("remove", "nvme0n1p2"), ("remove", "nvme0n1p3"),
        ("add", "nvme0n1p3"), ("add", "nvme0n1p4"),
    ])
    rec.events.clear()
    await reg.reexamine("nvme0n1")  # nothing changed: nothing happens
    assert rec.events == []
    sgdisk(b, tmp_path, "-Z")
    await reg.reexamine("nvme0n1")
    assert parts(reg) == {}


async def test_io_error_during_reexamine_keeps_partitions(caplog):
    b, doc = malloc_from_fixture("gpt_512")
    reg = BdevRegistry()
    await reg.register(b)
    before = parts(reg)

    async def broken(ctx, lba, nblocks, buf):
        raise BdevError(errno.EIO, "cable pulled")

    b._submit_read = broken
    await reg.reexamine("disk")
    assert parts(reg) == before and "cannot read the partition table" in caplog.text


async def test_unregister_and_hot_remove_take_partitions_first():
    for direct in (False, True):
        b, _ = malloc_from_fixture("gpt_512")
        reg = BdevRegistry()
        rec = Recorder(reg)
        await reg.register(b)
        children = [x for x in reg.bdevs() if x.base is b]
        rec.events.clear()
        if direct:
            b.hot_remove()  # the owner (e.g. the NVMe layer) removes it behind the registry's back
        else:
            await reg.unregister("disk")
        assert reg.bdevs() == [] and all(c.removed for c in children)
        assert rec.events[-1] == ("remove", "disk")
        assert sorted(rec.events[:-1]) == sorted(("remove", c.name) for c in children)
        assert b._descs == []


async def test_registry_rules():
    reg = BdevRegistry(examine_modules=[])
    b = MallocBdev("m", 8)
    await reg.register(b)
    with pytest.raises(BdevError) as ei:
        await reg.register(MallocBdev("m", 8))
    assert ei.value.errno == errno.EEXIST
    for coro in (reg.unregister("nope"), reg.reexamine("nope")):
        with pytest.raises(BdevError) as ei:
            await coro
        assert ei.value.errno == errno.ENODEV
    gone = MallocBdev("gone", 8)
    gone.hot_remove()
    with pytest.raises(BdevError):
        await reg.register(gone)
    events = []
    cb = lambda ev, bd: events.append((ev, bd.name))  # noqa: E731
    reg.add_listener(cb)
    reg.add_listener(lambda ev, bd: 1 / 0)  # a broken listener is logged, not fatal
    b.resize(16)
    reg.remove_listener(cb)
    b.resize(4)
    assert events == [("resize", "m")]
    assert "m" in reg and len(reg) == 1 and reg.get("m") is b
    assert reg.statistics()["m"]["num_read_ops"] == 0


# -- fake parsers: the examine glue against the parser API alone --------------------------------


class FakeError(Exception):
    pass


class FakeCorrupt(FakeError):
    pass


FAKE_ERRORS = types.SimpleNamespace(PartitionTableError=FakeError, CorruptTableError=FakeCorrupt)


class FakeParser:
    """Block 0 holds b"FAKE" then (start, count) pairs as text: b"FAKE 10,5 20,5"."""

    def __init__(self, block_size, num_blocks):
        self.bs = block_size
        self.done = False
        self.data = b""

    def next_read(self):
        return None if self.done else (0, self.bs)

    def feed(self, offset, data):
        self.done = True
        self.data = bytes(data).rstrip(b"\0")

    def result(self):
        if not self.data.startswith(b"FAKE"):
            raise FakeError("no FAKE signature")
        if b"!" in self.data:
            raise FakeCorrupt("bang")
        ps = []
        for i, item in enumerate(self.data.split()[1:], 1):
            s, n = map(int, item.split(b","))
            ps.append(types.SimpleNamespace(number=i, start_lba=s, num_blocks=n, type="t", uuid=None,
                                            name="", attributes=0))
        return types.SimpleNamespace(scheme="fake", partitions=tuple(ps), used_backup=False, warnings=("w",))


async def test_examine_with_fake_parser_and_out_of_range_partitions(caplog):
    reg = BdevRegistry(examine_modules=[PartitionExamine(parsers=(FakeParser,), errors=FAKE_ERRORS)])
    b = MallocBdev("f", 100, 512)
    b._buf[:40] = b"FAKE 10,5 20,5 90,20 0,0".ljust(40, b"\0")
    await reg.register(b)
    assert parts(reg) == {"fp1": (10, 5), "fp2": (20, 5)}
    assert "does not fit" in caplog.text
    b._buf[:40] = b"FAKE ! corrupt".ljust(40, b"\0")
    await reg.reexamine("f")
    assert parts(reg) == {}
    assert "corrupt partition table" in caplog.text
    # a name clash with an existing bdev is logged and skipped, never fatal
    await reg.register(MallocBdev("fp1", 4))
    b._buf[:40] = b"FAKE 10,5 20,5".ljust(40, b"\0")
    await reg.reexamine("f")
    assert parts(reg) == {"fp2": (20, 5)}
    assert "cannot register partition fp1" in caplog.text


async def test_read_partition_table_on_blank_disk_returns_none():
    assert await read_partition_table(MallocBdev("z", 64, 4096)) is None


async def test_concurrent_reexamines_are_serialized():
    b, doc = malloc_from_fixture("gpt_512")
    reg = BdevRegistry()
    await reg.register(b)
    before = parts(reg)
    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(reg.reexamine, "disk")
    assert parts(reg) == before
