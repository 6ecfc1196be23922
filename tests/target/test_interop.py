"""blockfs's own initiator against the embedded target (the same peer the suite uses instead of
the kernel target): bring-up, I/O with and without digests, AEN on resize, keep-alive kept fed."""

import os

import pytest
import trio

from initiator import _structs as st
from initiator.controller import ControllerOptions, open_controller
from rawclient import NQN
from target.control import acall

pytestmark = pytest.mark.trio


@pytest.mark.parametrize("digests", [False, True])
async def test_initiator_io(target, digests):
    opts = ControllerOptions(nr_io_queues=2, keep_alive_tmo=1, hdr_digest=digests,
                             data_digest=digests)
    with trio.fail_after(20):
        async with open_controller("127.0.0.1", target.port, NQN, opts) as c:
            assert await c.active_namespaces() == [1, 2]
            for nlb, q in ((1, 0), (64, 1), (1024, 0)):           # in-capsule, R2T, 512 KiB
                data = os.urandom(nlb * 512)
                await c.write(1, 7, nlb, data, qidx=q)
                buf = bytearray(nlb * 512)
                await c.read(1, 7, nlb, memoryview(buf), qidx=1 - q)
                assert buf == data
            await c.flush(1)
            await c.write_zeroes(1, 7, 1)
            buf = bytearray(512)
            await c.read(1, 7, 1, memoryview(buf))
            assert buf == bytes(512)
            await trio.sleep(1.5)          # longer than KATO: the initiator keeps it fed
            assert not c.lost
            assert target.stats()["keep_alive_expiries"] == 0


async def test_initiator_sees_resize_event(target):
    events = []
    with trio.fail_after(20):
        async with open_controller("127.0.0.1", target.port, NQN,
                                   ControllerOptions(keep_alive_tmo=2)) as c:
            c.on_async_event = events.append
            await acall(target.control_path, "resize_ns", nsid=2, size="16M")
            while not events:
                await trio.sleep(0.02)
            assert (events[0].type, events[0].info, events[0].log_page) == (2, 0, 4)
            assert await c.changed_ns_list() == [2]
            ns = await c.identify_namespace(2)
            assert isinstance(ns, st.IdentifyNamespace) and ns.nsze == 16 * 256


async def test_initiator_mixed_null_reads(make_target):
    """Concurrent small and large reads of a null namespace on one queue: the target sends the
    large ones with sendfile (--sendfile-min 64K) between the small ones' buffers; each read gets
    its own zeros (the buffers start dirty)."""
    t = await make_target(namespaces=["null:1G:4096"], sendfile_min=64 << 10)
    with trio.fail_after(20):
        async with open_controller("127.0.0.1", t.port, NQN, ControllerOptions()) as c:
            results = []

            async def rd(i, nlb):
                buf = bytearray(b"\xEE" * (nlb * 4096))
                await c.read(1, i * 300, nlb, memoryview(buf))
                results.append(buf == bytes(nlb * 4096))
            for _ in range(3):
                async with trio.open_nursery() as n:
                    for i, nlb in enumerate([1, 32, 2, 64, 256, 1, 16, 128, 3, 255]):
                        n.start_soon(rd, i, nlb)
            assert results == [True] * 30
        # Polling stretches end with the queues' readers: no idle time accrues after close.
        from initiator.transport import POLL_IDLE
        assert not POLL_IDLE.since
        assert not t.idle.since
