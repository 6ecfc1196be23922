"""Sync tests of the bdev core: errors, geometry, splitting arithmetic, descriptors and events."""

from __future__ import annotations

import errno

import pytest

from bdev import BdevError, BdevEvent, IoType, MallocBdev, PartBdev, partition_name
from bdev._base import Bdev


def test_bdev_error_carries_errno_and_message():
    e = BdevError(errno.ENOSPC, "full")
    assert e.errno == errno.ENOSPC
    assert "ENOSPC" in str(e) and "full" in str(e)
    assert str(BdevError(errno.EIO)) == "EIO"


def test_geometry_and_size():
    b = MallocBdev("m", 100, 4096)
    assert (b.name, b.block_size, b.num_blocks, b.size) == ("m", 4096, 100, 409600)
    assert not b.removed and b.claimed_by is None and b.base is None
    with pytest.raises(ValueError):
        Bdev("bad", 0, 1)
    with pytest.raises(ValueError):
        Bdev("bad", 512, 8, max_io_bytes=100)


@pytest.mark.parametrize(
    "lba,n,max_blocks,boundary,expected",
    [
        (0, 8, 8, 0, None),
        (0, 9, 8, 0, [(0, 8), (8, 1)]),
        (3, 20, 8, 0, [(3, 8), (11, 8), (19, 4)]),
        (6, 4, 0, 8, [(6, 2), (8, 2)]),
        (8, 8, 0, 8, None),
        (5, 20, 6, 8, [(5, 3), (8, 6), (14, 2), (16, 6), (22, 2), (24, 1)]),
        (0, 0, 8, 8, None),
    ],
)
def test_split_pieces(lba, n, max_blocks, boundary, expected):
    b = Bdev("b", 512, 1000, optimal_io_boundary=boundary)
    pieces = b._pieces(lba, n, max_blocks)
    assert pieces == expected
    if pieces:
        assert sum(p[1] for p in pieces) == n and pieces[0][0] == lba


def test_events_reach_open_descriptors_and_stop_after_close():
    b = MallocBdev("m", 16)
    seen: list[BdevEvent] = []
    d1 = b.open(seen.append)
    d2 = b.open(lambda ev: seen.append(("d2", ev.type)))
    b.notify_resize(32)
    assert seen[0] == BdevEvent("resize", b, 16, 32) and seen[1] == ("d2", "resize")
    assert b.num_blocks == 32
    b.notify_resize(32)  # no change, no event
    assert len(seen) == 2
    d2.close()
    d2.close()  # idempotent
    b.hot_remove()
    b.hot_remove()  # idempotent
    assert seen[2:] == [BdevEvent("remove", b, 32, 32)]
    assert b.removed
    d1.close()


def test_a_failing_event_callback_does_not_stop_the_others(caplog):
    b = MallocBdev("m", 16)
    seen = []

    def bad(ev):
        raise RuntimeError("bug")

    b.open(bad)
    b.open(seen.append)
    b.notify_resize(8)
    assert [e.type for e in seen] == ["resize"]
    assert "event callback" in caplog.text


def test_open_rules_claims_and_removed():
    b = MallocBdev("m", 16)
    b.claim("nbd")
    b.claim("nbd")  # same module again is fine
    with pytest.raises(BdevError) as ei:
        b.claim("other")
    assert ei.value.errno == errno.EBUSY
    with pytest.raises(BdevError) as ei:
        b.open(write=True)
    assert ei.value.errno == errno.EPERM
    b.open()  # read-only opens are fine
    b.release_claim()
    b.open(write=True).close()
    ro = MallocBdev("ro", 16, read_only=True)
    with pytest.raises(BdevError) as ei:
        ro.open(write=True)
    assert ei.value.errno == errno.EROFS
    b.hot_remove()
    for call in (b.open, b.get_io_channel):
        with pytest.raises(BdevError) as ei:
            call()
        assert ei.value.errno == errno.ENODEV


def test_partition_is_a_window_that_follows_its_base():
    base = MallocBdev("disk", 1000, 512, max_io_bytes=64 * 1024)
    p = PartBdev(base, partition_name("disk", 1), 100, 200, number=1, part_uuid="u-1")
    assert p.name == "diskp1" and p.base is base and p.offset_blocks == 100
    assert p.block_size == 512 and p.max_io_bytes == 64 * 1024 and p.uuid == "u-1"
    assert all(p.io_type_supported(t) for t in IoType)  # as its base
    events = []
    p.open(events.append)
    base.hot_remove()
    assert p.removed and [e.type for e in events] == ["remove"]
    assert base._descs == []  # the partition let go of its base
