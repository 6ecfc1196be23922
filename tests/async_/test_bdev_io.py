"""Async tests of the bdev I/O path on MallocBdev: block and byte API, bounds after resize,
splitting, emulation, statistics, and the RMW range lock under many concurrent writers."""

from __future__ import annotations

import errno
import random
from typing import Any

import pytest
import trio

from bdev import Bdev, BdevError, IoType, MallocBdev, PartBdev

pytestmark = pytest.mark.trio


def errno_of(excinfo: pytest.ExceptionInfo[BdevError]) -> int:
    return excinfo.value.errno


class RecordingMalloc(MallocBdev):
    """Records every command the base hands to the subclass; can drop io types to test emulation."""

    def __init__(self, *a: Any, unsupported: tuple[IoType, ...] = (), **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.cmds: list[tuple] = []
        self._unsupported = unsupported

    def io_type_supported(self, io_type: IoType) -> bool:
        return io_type not in self._unsupported and super().io_type_supported(io_type)

    async def _submit_read(self, ctx, lba, nblocks, buf):
        self.cmds.append(("read", lba, nblocks))
        await super()._submit_read(ctx, lba, nblocks, buf)

    async def _submit_write(self, ctx, lba, nblocks, data, fua):
        self.cmds.append(("write", lba, nblocks, fua))
        await super()._submit_write(ctx, lba, nblocks, data, fua)

    async def _submit_write_zeroes(self, ctx, lba, nblocks):
        self.cmds.append(("zeroes", lba, nblocks))
        await super()._submit_write_zeroes(ctx, lba, nblocks)

    async def _submit_unmap(self, ctx, lba, nblocks):
        self.cmds.append(("unmap", lba, nblocks))
        await super()._submit_unmap(ctx, lba, nblocks)

    async def _submit_flush(self, ctx):
        self.cmds.append(("flush",))
        await super()._submit_flush(ctx)


class FailingMalloc(MallocBdev):
    async def _submit_read(self, ctx, lba, nblocks, buf):
        await trio.lowlevel.checkpoint()
        raise BdevError(errno.EIO, "media error")


async def test_block_round_trip_and_caller_buffer():
    b = MallocBdev("m", 64, 512)
    ch = b.get_io_channel()
    data = bytes(random.randbytes(4 * 512))
    await ch.write_blocks(10, 4, data)
    assert bytes(await ch.read_blocks(10, 4)) == data
    buf = memoryview(bytearray(2 * 512))
    got = await ch.read_blocks(11, 2, buf)
    assert got is buf and bytes(buf) == data[512:1536]
    with pytest.raises(BdevError) as ei:
        await ch.read_blocks(0, 2, memoryview(bytearray(100)))
    assert errno_of(ei) == errno.EINVAL
    with pytest.raises(BdevError) as ei:
        await ch.write_blocks(0, 1, b"short")
    assert errno_of(ei) == errno.EINVAL


@pytest.mark.parametrize("lba,n", [(64, 1), (63, 2), (-1, 1), (0, 65)])
async def test_out_of_range_is_einval(lba, n):
    ch = MallocBdev("m", 64, 512).get_io_channel()
    for call in (
        ch.read_blocks(lba, n),
        ch.write_blocks(lba, n, bytes(max(n, 0) * 512)),
        ch.write_zeroes_blocks(lba, n),
        ch.unmap_blocks(lba, n),
    ):
        with pytest.raises(BdevError) as ei:
            await call
        assert errno_of(ei) == errno.EINVAL


async def test_shrink_then_io_past_new_end_fails_and_never_returns_old_data():
    b = MallocBdev("m", 64, 512)
    ch = b.get_io_channel()
    await ch.write_blocks(60, 4, b"\xaa" * 2048)
    b.resize(32)
    for coro in (ch.read_blocks(60, 1), ch.read(32 * 512 - 1, 2), ch.write(40 * 512, b"x")):
        with pytest.raises(BdevError) as ei:
            await coro
        assert errno_of(ei) == errno.EINVAL
    b.resize(64)  # grows back: the old bytes are gone for good
    assert bytes(await ch.read_blocks(60, 4)) == bytes(2048)


async def test_removed_and_read_only_and_closed_channel():
    b = MallocBdev("m", 16, 512)
    ch = b.get_io_channel()
    b.hot_remove()
    for coro in (ch.read_blocks(0, 1), ch.write_blocks(0, 1, bytes(512)), ch.flush(), ch.read(1, 1)):
        with pytest.raises(BdevError) as ei:
            await coro
        assert errno_of(ei) == errno.ENODEV
    ro = MallocBdev("ro", 16, 512, read_only=True)
    ch = ro.get_io_channel()
    assert bytes(await ch.read(3, 5)) == bytes(5)
    for coro in (
        ch.write_blocks(0, 1, bytes(512)),
        ch.write(3, b"abc"),
        ch.write_zeroes(0, 512),
        ch.unmap_blocks(0, 1),
    ):
        with pytest.raises(BdevError) as ei:
            await coro
        assert errno_of(ei) == errno.EROFS
    ch.close()
    ch.close()
    with pytest.raises(BdevError) as ei:
        await ch.read_blocks(0, 1)
    assert errno_of(ei) == errno.EBADF


async def test_large_io_is_split_by_max_io_bytes_and_boundary():
    b = RecordingMalloc("m", 256, 512, max_io_bytes=4 * 512, optimal_io_boundary=16)
    ch = b.get_io_channel()
    data = random.randbytes(20 * 512)
    await ch.write_blocks(14, 20, data)
    writes = sorted(c[1:3] for c in b.cmds if c[0] == "write")
    assert writes == [(14, 2), (16, 4), (20, 4), (24, 4), (28, 4), (32, 2)]
    b.cmds.clear()
    assert bytes(await ch.read_blocks(14, 20)) == data
    assert sorted(c[1:3] for c in b.cmds if c[0] == "read") == writes
    st = b.statistics()
    assert st["num_write_ops"] == 1 and st["bytes_written"] == 20 * 512  # one request, six commands
    assert st["num_read_ops"] == 1 and st["bytes_read"] == 20 * 512


async def test_split_error_is_a_single_bdev_error():
    b = FailingMalloc("m", 64, 512, max_io_bytes=1024)
    ch = b.get_io_channel()
    with pytest.raises(BdevError) as ei:
        await ch.read_blocks(0, 16)
    assert errno_of(ei) == errno.EIO
    assert b.statistics()["errors"] == 1


async def test_emulated_write_zeroes_fua_and_flush():
    b = RecordingMalloc(
        "m", 64, 512, unsupported=(IoType.WRITE_ZEROES, IoType.FUA, IoType.FLUSH), max_io_bytes=8 * 512
    )
    ch = b.get_io_channel()
    await ch.write_blocks(0, 64, b"\xff" * 64 * 512)
    b.cmds.clear()
    await ch.write_zeroes_blocks(4, 20)
    assert bytes(await ch.read_blocks(0, 64)) == b"\xff" * 2048 + bytes(20 * 512) + b"\xff" * 40 * 512
    assert {c[0] for c in b.cmds if c[0] != "read"} == {"write"}
    b.cmds.clear()
    await ch.write_blocks(0, 1, bytes(512), fua=True)
    await ch.flush()
    assert b.cmds == [("write", 0, 1, False)]  # no FUA bit, no flush command: device has no cache
    full = RecordingMalloc("f", 64, 512, unsupported=(IoType.FUA,))
    fch = full.get_io_channel()
    await fch.write_blocks(0, 1, bytes(512), fua=True)
    assert full.cmds == [("write", 0, 1, False), ("flush",)]
    no_unmap = RecordingMalloc("u", 64, 512, unsupported=(IoType.UNMAP,))
    with pytest.raises(BdevError) as ei:
        await no_unmap.get_io_channel().unmap(0, 512)
    assert errno_of(ei) == errno.EOPNOTSUPP


@pytest.mark.parametrize("bs", [512, 4096])
async def test_byte_api_matches_a_bytearray_model(bs):
    rng = random.Random(bs)
    nblocks = 32
    b = MallocBdev("m", nblocks, bs)
    ch = b.get_io_channel()
    model = bytearray(nblocks * bs)
    size = nblocks * bs
    for _ in range(300):
        off = rng.randrange(size)
        length = rng.randrange(0, min(size - off, 3 * bs) + 1)
        op = rng.randrange(4)
        if op == 0:
            data = rng.randbytes(length)
            await ch.write(off, data)
            model[off : off + length] = data
        elif op == 1:
            assert bytes(await ch.read(off, length)) == model[off : off + length]
        elif op == 2:
            await ch.write_zeroes(off, length)
            model[off : off + length] = bytes(length)
        else:
            await ch.unmap(off, length)
            model[off : off + length] = bytes(length)
    buf = memoryview(bytearray(1000))
    await ch.readinto(7, buf)
    assert bytes(buf) == model[7:1007]
    assert bytes(await ch.read(0, size)) == model


async def test_large_unaligned_write_goes_straight_for_the_middle():
    b = RecordingMalloc("m", 1024, 512)
    ch = b.get_io_channel()
    data = random.randbytes(300 * 1024)
    await ch.write(100, data)
    writes = sorted(c[1:3] for c in b.cmds if c[0] == "write")
    assert writes == [(0, 1), (1, 599), (600, 1)]
    assert bytes(await ch.read(100, len(data))) == data
    assert bytes(await ch.read(0, 100)) == bytes(100)


async def test_byte_range_checks():
    ch = MallocBdev("m", 4, 512).get_io_channel()
    assert bytes(await ch.read(2048, 0)) == b""
    await ch.write(2048, b"")
    for coro in (ch.read(2047, 2), ch.write(2040, bytes(9)), ch.read(-1, 1), ch.write_zeroes(2000, 49)):
        with pytest.raises(BdevError) as ei:
            await coro
        assert errno_of(ei) == errno.EINVAL


@pytest.mark.parametrize("bs", [512, 4096])
async def test_concurrent_unaligned_writes_to_one_block_never_lose_data(bs):
    """Many tasks each own a few bytes of the same two blocks and write them at once, with random
    extra scheduling between; without the range lock the RMWs overwrite each other."""
    b = MallocBdev("m", 8, bs)
    ch = b.get_io_channel()
    writers = 64
    width = (2 * bs) // writers  # each writer's stripe, spread over blocks 1 and 2
    base = bs

    async def writer(i: int, rounds: int) -> None:
        my_ch = b.get_io_channel()  # half the writers use their own channel
        c = my_ch if i % 2 else ch
        for r in range(rounds):
            await trio.sleep(0)
            await c.write(base + i * width, bytes([(i * 7 + r) % 251 + 1]) * width)

    async with trio.open_nursery() as n:
        for i in range(writers):
            n.start_soon(writer, i, 5)
    got = bytes(await ch.read(base, writers * width))
    for i in range(writers):
        assert got[i * width : (i + 1) * width] == bytes([(i * 7 + 4) % 251 + 1]) * width, i
    assert b._lock.locked() == 0


async def test_partition_and_base_share_the_range_lock():
    base = MallocBdev("d", 64, 512)
    p = PartBdev(base, "dp1", 8, 16)
    bch, pch = base.get_io_channel(), p.get_io_channel()

    async def via_base(i):
        await bch.write(8 * 512 + 2 * i, bytes([i + 1, i + 1]))

    async def via_part(i):
        await pch.write(2 * i, bytes([i + 1, i + 1]))

    async with trio.open_nursery() as n:
        for i in range(0, 100, 2):
            n.start_soon(via_base, i)
            n.start_soon(via_part, i + 1)
    got = bytes(await pch.read(0, 200))
    assert got == b"".join(bytes([i + 1, i + 1]) for i in range(100))


async def test_statistics_count_every_kind():
    b = MallocBdev("m", 64, 512)
    ch = b.get_io_channel()
    await ch.write_blocks(0, 2, bytes(1024))
    await ch.read_blocks(0, 1)
    await ch.write_zeroes_blocks(0, 4)
    await ch.unmap_blocks(4, 4)
    await ch.flush()
    st = b.statistics()
    assert st["num_write_ops"] == 1 and st["bytes_written"] == 1024
    assert st["num_read_ops"] == 1 and st["bytes_read"] == 512
    assert st["num_write_zeroes_ops"] == 1 and st["num_unmap_ops"] == 1 and st["num_flush_ops"] == 1
    assert st["read_latency_ticks"] > 0 and st["errors"] == 0
    assert b.flushes == 1


async def test_partition_io_is_remapped_and_bounded():
    base = MallocBdev("d", 100, 512)
    p = PartBdev(base, "dp1", 10, 20)
    pch, bch = p.get_io_channel(), base.get_io_channel()
    await pch.write_blocks(0, 1, b"\x11" * 512)
    await pch.write(19 * 512 + 500, b"\x22" * 12)
    assert bytes(await bch.read_blocks(10, 1)) == b"\x11" * 512
    assert bytes(await bch.read(29 * 512 + 500, 12)) == b"\x22" * 12
    with pytest.raises(BdevError) as ei:
        await pch.read_blocks(20, 1)
    assert errno_of(ei) == errno.EINVAL
    base.resize(25)  # the partition now runs past the base: the base refuses, no stale data
    with pytest.raises(BdevError) as ei:
        await pch.read_blocks(18, 1)
    assert errno_of(ei) == errno.EINVAL
    await pch.unmap(0, 512)
    assert bytes(await bch.read_blocks(10, 1)) == bytes(512)
    await pch.flush()
    pch.close()
    base.hot_remove()
    with pytest.raises(BdevError) as ei:
        p.get_io_channel()
    assert errno_of(ei) == errno.ENODEV


# -- read_blocks_nowait (extension) -----------------------------------------------------------

class CallbackBdev(MallocBdev):
    """A MallocBdev whose reads can also start without a waiting task: the data is copied and
    `on_done` runs from a background task (as NVMe's reader task does); reads touching
    `fail_lba` complete with ok False."""

    fail_lba = -1

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.pending: list = []
        self.nowait_calls = 0

    def _submit_read_nowait(self, ctx, lba, nblocks, buf, on_done) -> bool:
        self.nowait_calls += 1
        ok = not lba <= self.fail_lba < lba + nblocks
        if ok:
            bs = self.block_size
            buf[:] = self._mv[lba * bs:(lba + nblocks) * bs]
        self.pending.append((on_done, ok))
        return True

    def complete_all(self) -> None:
        pending, self.pending = self.pending, []
        for cb, ok in pending:
            cb(None if ok else "injected failure")   # the hook's convention: err or None


async def test_read_blocks_nowait_completes_later_and_counts():
    b = CallbackBdev("cb0", 64, 512)
    ch = b.get_io_channel()
    await ch.write_blocks(4, 2, bytes(range(256)) * 4)
    buf = memoryview(bytearray(1024))
    got = []
    assert ch.read_blocks_nowait(4, 2, buf, got.append)
    assert got == [] and b.statistics()["num_read_ops"] == 0    # never from inside the call
    b.complete_all()
    assert got == [True] and bytes(buf) == bytes(range(256)) * 4
    st = b.statistics()
    assert st["num_read_ops"] == 1 and st["bytes_read"] == 1024


async def test_read_blocks_nowait_failure_is_reported_and_not_counted():
    b = CallbackBdev("cb0", 64, 512)
    b.fail_lba = 10
    ch = b.get_io_channel()
    got = []
    assert ch.read_blocks_nowait(9, 2, memoryview(bytearray(1024)), got.append)
    b.complete_all()
    assert got == [False] and b.statistics()["num_read_ops"] == 0


@pytest.mark.parametrize("lba,n,size", [(-1, 1, 512), (63, 2, 1024), (0, 0, 0), (0, 1, 1024)])
async def test_read_blocks_nowait_declines_what_the_awaited_path_must_judge(lba, n, size):
    b = CallbackBdev("cb0", 64, 512)
    ch = b.get_io_channel()
    assert not ch.read_blocks_nowait(lba, n, memoryview(bytearray(size)), lambda ok: None)
    assert b.nowait_calls == 0


async def test_read_blocks_nowait_declines_splits_closed_removed_and_unsupported():
    b = CallbackBdev("cb0", 64, 512, max_io_bytes=1024)
    ch = b.get_io_channel()
    assert not ch.read_blocks_nowait(0, 4, memoryview(bytearray(2048)), lambda ok: None)
    ch.close()
    assert not ch.read_blocks_nowait(0, 1, memoryview(bytearray(512)), lambda ok: None)
    ch = b.get_io_channel()
    b.hot_remove()
    assert not ch.read_blocks_nowait(0, 1, memoryview(bytearray(512)), lambda ok: None)
    assert b.nowait_calls == 0
    m = Bdev("plain0", 512, 64)                        # the base class: not supported
    assert not m.get_io_channel().read_blocks_nowait(0, 1, memoryview(bytearray(512)),
                                                     lambda ok: None)


async def test_read_blocks_nowait_declines_a_read_across_the_optimal_io_boundary():
    b = CallbackBdev("cb0", 64, 512, optimal_io_boundary=8)
    ch = b.get_io_channel()
    assert not ch.read_blocks_nowait(6, 4, memoryview(bytearray(2048)), lambda ok: None)
    assert b.nowait_calls == 0
    assert ch.read_blocks_nowait(8, 8, memoryview(bytearray(4096)), lambda ok: None)
    assert ch.read_blocks_nowait(15, 1, memoryview(bytearray(512)), lambda ok: None)
    assert b.nowait_calls == 2


async def test_read_blocks_nowait_reads_in_flight_keep_their_own_callback_and_size():
    b = CallbackBdev("cb0", 64, 512)
    ch = b.get_io_channel()
    got = []
    assert ch.read_blocks_nowait(0, 1, memoryview(bytearray(512)), lambda ok: got.append(("a", ok)))
    assert ch.read_blocks_nowait(8, 4, memoryview(bytearray(2048)), lambda ok: got.append(("b", ok)))
    b.pending.reverse()
    b.complete_all()
    assert got == [("b", True), ("a", True)]
    st = b.statistics()
    assert st["num_read_ops"] == 2 and st["bytes_read"] == 2560 and st["read_latency_ticks"] > 0


async def test_malloc_read_nowait_copies_now_and_completes_a_pass_later():
    m = MallocBdev("m0", 64, 512)
    ch = m.get_io_channel()
    await ch.write_blocks(3, 2, bytes(range(256)) * 4)
    got = []
    bufs = [memoryview(bytearray(1024)) for _ in range(3)]
    for buf in bufs:
        assert ch.read_blocks_nowait(3, 2, buf, got.append)
    assert got == []                                   # never from inside the call
    with trio.fail_after(5):
        while len(got) < 3:
            await trio.sleep(0)
    assert got == [True] * 3
    assert all(bytes(b) == bytes(range(256)) * 4 for b in bufs)
    assert m.statistics()["num_read_ops"] == 3


async def test_call_soon_runs_in_order_from_another_task_and_survives_a_failing_call():
    from bdev._soon import call_soon
    seen = []
    me = trio.lowlevel.current_task()

    def rec(x):
        seen.append((x, trio.lowlevel.current_task() is me))

    def boom(_x):
        raise RuntimeError("consumer bug")
    for i in range(3):
        call_soon(rec, i)
    call_soon(boom, None)
    call_soon(rec, 3)
    assert seen == []
    with trio.fail_after(5):
        while len(seen) < 4:
            await trio.sleep(0)
    assert seen == [(0, False), (1, False), (2, False), (3, False)]
    call_soon(rec, 4)                                  # the parked task wakes again
    with trio.fail_after(5):
        while len(seen) < 5:
            await trio.sleep(0)


async def test_one_pass_of_call_soon_is_one_batch_of_completion_callbacks():
    """The calls one pass of call_soon's task takes run as one batch (bdev.CALLBACKS): what
    they defer runs after the last of them, as for an NVMe queue's receive."""
    from bdev import CALLBACKS
    from bdev._soon import call_soon
    seen = []

    def rec(x):
        seen.append(x)
        assert CALLBACKS.defer(lambda: seen.append(("deferred", x)))
    for i in range(3):
        call_soon(rec, i)
    with trio.fail_after(5):
        while len(seen) < 6:
            await trio.sleep(0)
    assert seen == [0, 1, 2, ("deferred", 0), ("deferred", 1), ("deferred", 2)]
    assert CALLBACKS.depth == 0


async def test_partition_read_nowait_goes_to_the_base_at_its_offset():
    b = CallbackBdev("cb0", 64, 512)
    ch = b.get_io_channel()
    await ch.write_blocks(20, 1, b"\x5a" * 512)
    p = PartBdev(b, "cb0p1", 16, 32)
    got = []
    buf = memoryview(bytearray(512))
    assert p.get_io_channel().read_blocks_nowait(4, 1, buf, got.append)
    b.complete_all()
    assert got == [True] and bytes(buf) == b"\x5a" * 512
    assert not p.get_io_channel().read_blocks_nowait(31, 2, memoryview(bytearray(1024)),
                                                     lambda ok: None)


class _ZeroesRefusedOnFirstUse(MallocBdev):
    """Claims WRITE_ZEROES until asked, then answers EOPNOTSUPP and stops claiming it (what
    NvmeBdev does for an nvmet backend that rejects the Write Zeroes its ONCS advertised)."""

    refused = False
    submits = 0

    def io_type_supported(self, io_type: IoType) -> bool:
        if io_type == IoType.WRITE_ZEROES and self.refused:
            return False
        return super().io_type_supported(io_type)

    async def _submit_write_zeroes(self, ctx: Any, lba: int, nblocks: int) -> None:
        self.submits += 1
        self.refused = True
        raise BdevError(errno.EOPNOTSUPP, "write zeroes refused by the backend")


async def test_write_zeroes_refused_on_first_use_is_emulated_by_writes():
    b = _ZeroesRefusedOnFirstUse("m0", 64, 512)
    ch = b.get_io_channel()
    await ch.write_blocks(0, 64, b"\xaa" * (64 * 512))
    await ch.write_zeroes_blocks(8, 16)             # refused, then zeroed by writes
    await ch.write_zeroes_blocks(40, 8)             # no longer claimed: emulated directly
    data = bytes(await ch.read_blocks(0, 64))
    assert data[:8 * 512] == b"\xaa" * (8 * 512)
    assert data[8 * 512:24 * 512] == bytes(16 * 512)
    assert data[40 * 512:48 * 512] == bytes(8 * 512)
    assert data[48 * 512:] == b"\xaa" * (16 * 512)
    assert b.submits == 1
    # through a partition (it asks its base): the same
    b2 = _ZeroesRefusedOnFirstUse("m1", 64, 512)
    await b2.get_io_channel().write_blocks(0, 64, b"\xbb" * (64 * 512))
    part = PartBdev(b2, "m1p1", 16, 32, number=1)
    await part.get_io_channel().write_zeroes_blocks(0, 4)
    assert bytes(await b2.get_io_channel().read_blocks(16, 4)) == bytes(4 * 512)


async def test_write_zeroes_failing_for_another_reason_is_not_emulated():
    class Broken(MallocBdev):
        async def _submit_write_zeroes(self, ctx, lba, nblocks):
            raise BdevError(errno.EIO, "media error")
    b = Broken("m2", 16, 512)
    with pytest.raises(BdevError) as ei:
        await b.get_io_channel().write_zeroes_blocks(0, 4)
    assert ei.value.errno == errno.EIO
