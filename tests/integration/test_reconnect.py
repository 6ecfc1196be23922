"""Keep-alive, loss detection and reconnect against the real kernel target (issue 4).

These change the target (port cut, link cut), so they get their own VM, shared by this module
only. Each test leaves the port linked and the link up.
"""

from __future__ import annotations

import os

import pytest
import trio

from initiator.controller import ControllerOptions
from initiator.session import ControllerUnavailable, CtrlState, ReconnectPolicy, Session

pytestmark = [pytest.mark.ktarget, pytest.mark.slow]


@pytest.fixture(scope="module")
def fault_target():
    from kernel_target import require_kernel_target, start_kernel_target
    require_kernel_target()
    with start_kernel_target(ns=("32M",)) as kt:
        yield kt


async def _session(kt, nursery, *, kato=2.0, delay=1.0, loss=60.0, fast_fail=-1.0, **kw):
    s = Session(kt.host, kt.port, kt.nqn,
                ControllerOptions(keep_alive_tmo=kato, nr_io_queues=2, **kw),
                ReconnectPolicy(reconnect_delay=delay, ctrl_loss_tmo=loss,
                                fast_io_fail_tmo=fast_fail), rescan_interval=0)
    await s.start(nursery)
    return s


async def _wait_state(s, state, timeout):
    with trio.fail_after(timeout):
        while s.state is not state:
            await trio.sleep(0.05)


async def test_idle_for_three_katos_is_never_dropped(fault_target):
    kt = fault_target
    async with trio.open_nursery() as n:
        s = await _session(kt, n, kato=2.0)
        await trio.sleep(6.5)                       # 3 x KATO with no I/O at all
        assert s.state is CtrlState.LIVE
        assert s.reconnects == 0
        assert s.ctrl.keep_alives_sent >= 4          # every KATO/2
        buf = bytearray(4096)
        await s.read(1, 0, 1, memoryview(buf))       # the controller is still there
        assert await trio.to_thread.run_sync(kt.connections) == 3
        await s.aclose()


async def test_silent_target_detected_by_keep_alive_and_io_survives(fault_target):
    kt = fault_target
    data = os.urandom(8192)
    async with trio.open_nursery() as n:
        s = await _session(kt, n, kato=2.0, delay=1.0)
        await s.write(1, 100, 2, data)
        await trio.to_thread.run_sync(kt.link_down)
        t0 = trio.current_time()
        got = bytearray(8192)
        done = trio.Event()

        async def pending_read():
            await s.read(1, 100, 2, memoryview(got))     # issued while the link is down
            done.set()
        n.start_soon(pending_read)
        await _wait_state(s, CtrlState.RESETTING, 2.0 + 1.0 + 0.5)
        detected = trio.current_time() - t0
        assert detected <= 2.0 + 1.0, detected            # within KATO + 1 s
        assert not done.is_set()
        await trio.to_thread.run_sync(kt.link_up)
        with trio.fail_after(30):
            await done.wait()
        assert got == data
        assert s.state is CtrlState.LIVE and s.reconnects >= 1
        await s.aclose()


async def test_port_cut_longer_than_reconnect_delay(fault_target):
    kt = fault_target
    blocks = {i: os.urandom(4096) for i in range(32)}
    async with trio.open_nursery() as n:
        s = await _session(kt, n, kato=2.0, delay=1.0)
        await trio.to_thread.run_sync(kt.kill_port)
        errors = []

        async def writer(i):
            try:
                await s.write(1, 1000 + i, 1, blocks[i], qhint=i)
            except Exception as e:   # noqa: BLE001 - any error fails the test below
                errors.append(e)
        async with trio.open_nursery() as w:
            for i in blocks:
                w.start_soon(writer, i)
            await trio.sleep(3.0)                      # > reconnect delay: several attempts
            assert s.state is CtrlState.RESETTING
            await trio.to_thread.run_sync(kt.restore_port)
        assert errors == []
        for i, data in blocks.items():
            buf = bytearray(4096)
            await s.read(1, 1000 + i, 1, memoryview(buf))
            assert buf == data
        assert s.reconnects >= 1
        await s.aclose()


async def test_ctrl_loss_tmo_fails_io_within_the_bound(fault_target):
    kt = fault_target
    async with trio.open_nursery() as n:
        s = await _session(kt, n, kato=2.0, delay=1.0, loss=3.0)
        await trio.to_thread.run_sync(kt.kill_port)
        try:
            t0 = trio.current_time()
            with pytest.raises(ControllerUnavailable):
                with trio.fail_after(15):
                    while True:
                        await s.read(1, 0, 1, memoryview(bytearray(4096)))
                        await trio.sleep(0.1)
            # loss noticed at once (EOF), then ctrl-loss-tmo (3 s) + one attempt's slack
            assert trio.current_time() - t0 <= 3.0 + 2.0
            assert s.state is CtrlState.FAILED
        finally:
            await trio.to_thread.run_sync(kt.restore_port)
        await s.aclose()


async def test_fast_io_fail_fails_queued_io_but_keeps_reconnecting(fault_target):
    kt = fault_target
    async with trio.open_nursery() as n:
        s = await _session(kt, n, kato=2.0, delay=1.0, loss=60.0, fast_fail=1.0)
        await trio.to_thread.run_sync(kt.kill_port)
        try:
            with trio.fail_after(10):
                with pytest.raises(ControllerUnavailable):
                    while True:
                        await s.read(1, 0, 1, memoryview(bytearray(4096)))
                        await trio.sleep(0.1)
            assert s.state is CtrlState.RESETTING
        finally:
            await trio.to_thread.run_sync(kt.restore_port)
        await _wait_state(s, CtrlState.LIVE, 10)
        await s.read(1, 0, 1, memoryview(bytearray(4096)))
        await s.aclose()


async def test_write_waiting_for_a_reconnect_never_reaches_a_replaced_namespace(fault_target):
    """While the port is cut, namespace 1 is removed and created again (nvmet gives it a new
    UUID: a different namespace). The write issued during the outage fails with ENODEV
    instead of being resubmitted by NSID into the new namespace, and the old bdev is replaced
    by a new one of the new size. Last in this module: it puts namespace 1 back as it was."""
    kt = fault_target
    size = kt.namespaces[0]["bytes"]
    try:
        await _write_into_replaced_namespace(kt)
    finally:
        # Namespace 1 as the module's VM had it.
        await trio.to_thread.run_sync(kt.restore_port)
        await trio.to_thread.run_sync(kt.remove_ns, 1)
        await trio.to_thread.run_sync(kt.add_ns, 1, size)


async def _write_into_replaced_namespace(kt) -> None:
    import errno

    from bdev import BdevError
    from bdev.nvme import NvmeController
    from bdev.registry import BdevRegistry
    async with trio.open_nursery() as n:
        s = await _session(kt, n, kato=2.0, delay=1.0)
        reg = BdevRegistry(examine_modules=[])
        ctrl = NvmeController(reg, s, 0)
        await ctrl.start(n)
        old = reg.get("nvme0n1")
        bs = old.block_size
        ch = old.get_io_channel()
        result = []

        async def writer():
            try:
                await ch.write_blocks(11, 1, b"\x77" * bs)
                result.append("ok")
            except BdevError as e:
                result.append(e.errno)
        await trio.to_thread.run_sync(kt.kill_port)
        try:
            await _wait_state(s, CtrlState.RESETTING, 10)
            n.start_soon(writer)                        # waits for the reconnect
            await trio.to_thread.run_sync(kt.remove_ns, 1)
            await trio.to_thread.run_sync(kt.add_ns, 1, "16M")
        finally:
            await trio.to_thread.run_sync(kt.restore_port)
        with trio.fail_after(20):
            while not result:
                await trio.sleep(0.1)
        assert result == [errno.ENODEV]
        with trio.fail_after(10):
            while reg.get("nvme0n1") in (None, old):
                await trio.sleep(0.1)
        new = reg.get("nvme0n1")
        assert old.removed and new.num_blocks * new.block_size == 16 << 20
        buf = bytearray(bs)
        await s.read(1, 11, 1, memoryview(buf))
        assert buf != b"\x77" * bs                      # the write never reached it
        await s.aclose()
        n.cancel_scope.cancel()
