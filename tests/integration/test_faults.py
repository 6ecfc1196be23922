"""The initiator's reaction to every fault the embedded target can inject (issue 7).

One embedded target (`target.testing.EmbeddedTarget`, a subprocess on 127.0.0.1) per test, so no
fault, silent connection or namespace change leaks into the next; each session's teardown also
clears the faults and brings the port up before closing. The FES/FEI of the host's H2CTermReqs
are read on the target's side, which only logs them: those tests run the same target in-process
(`serve_target`) and read its log.

Per fault switch (docs/target.md):
- fault_command delay: late but fine; later than io_timeout: aborted, no reset if it completes.
- fault_command drop: timeout -> Abort -> reset -> reconnect -> the I/O completes.
- fault_command error: typed NvmeStatusError (sct/sc/dnr); retryable without DNR: retried, bounded.
- fault_refuse_connect: typed error naming the status, first connect fails fast; a refused
  reconnect is retried.
- fault_silent, set_port blackhole: keep-alive notices within KATO + 1 s, reconnect, I/O survives.
- fault_reset, set_port down, keep_alive_expire, fault_term_req: reconnect, I/O resubmitted.
- fault_corrupt_digest header: H2CTermReq (FES 3), reconnect; data: DigestError, never bad data.
- fault_malformed (12 kinds): H2CTermReq with the FES/FEI of the violation, reconnect.
- post_aen: namespace notice -> log 04h read, rescan, events; error/SMART -> logged and counted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile

import pytest
import trio

from initiator._errors import ConnectionLost, DigestError, NvmeStatusError
from initiator._spec import AdminOpcode
from initiator.controller import ControllerOptions, open_controller
from initiator.session import MAX_RETRIES, ControllerUnavailable, CtrlState, ReconnectPolicy, \
    Session
from target import SubsystemConfig, TargetConfig, serve_target
from target._subsystem import Namespace
from target.backends import parse_ns_spec

BS = 4096                       # namespace 1: 16 MiB of 4096-byte blocks
OPC_READ, OPC_WRITE = 0x02, 0x01
FES_HDR, FES_SEQ, FES_HDGST = 1, 2, 3


@pytest.fixture
def et():
    from target.testing import start_embedded_target
    with start_embedded_target(ns=("16M", "8M:512")) as t:
        yield t


def options(**kw) -> ControllerOptions:
    kw.setdefault("keep_alive_tmo", 2.0)
    kw.setdefault("connect_timeout", 2.0)
    return ControllerOptions(**kw)


@contextlib.asynccontextmanager
async def session(t, *, delay=0.2, loss=30.0, fast=-1.0, **kw):
    """A live Session on target `t`; on exit the target's faults are cleared, its port is up,
    and the session is closed (CC.SHN, Disconnect)."""
    s = Session(t.host, t.port, t.nqn, options(**kw),
                ReconnectPolicy(reconnect_delay=delay, ctrl_loss_tmo=loss, fast_io_fail_tmo=fast),
                rescan_interval=0)
    async with trio.open_nursery() as n:
        await s.start(n)
        try:
            yield s
        finally:
            with trio.move_on_after(10) as cs:
                cs.shield = True
                await t.arpc("set_port", state="up")
                await t.arpc("fault_clear")
                await s.aclose()
            n.cancel_scope.cancel()


async def wait_for(pred, timeout: float, what=lambda: "the condition"):
    with trio.move_on_after(timeout):
        while not pred():
            await trio.sleep(0.02)
        return
    pytest.fail(f"no {what()} within {timeout:g} s")


async def wait_state(s, state, timeout: float):
    await wait_for(lambda: s.state is state, timeout, lambda:
                   f"{state.value} state (still {s.state.value}, last error {s.last_error})")


async def wait_reconnected(s, n: int = 1, timeout: float = 10.0):
    await wait_for(lambda: s.reconnects >= n and s.state is CtrlState.LIVE, timeout, lambda:
                   f"reconnect #{n} (state {s.state.value}, last error {s.last_error})")


async def rule_hits(t, rule_id: int) -> int | None:
    """Hits of a command rule (None once its count is used up and it is gone)."""
    for r in (await t.arpc("fault_list"))["rules"]:
        if r["id"] == rule_id:
            return r["hits"]
    return None


async def counter(t, opcode: int, queue: str):
    """A rule that delays matching commands by 0 ms: its `hits` count them at the target."""
    return (await t.arpc("fault_command", action="delay", opcode=opcode, queue=queue,
                         delay_ms=0))["id"]


async def write_pattern(s, lba: int, nblocks: int = 1) -> bytes:
    data = os.urandom(nblocks * BS)
    await s.write(1, lba, nblocks, data)
    return data


async def read_back(s, lba: int, nblocks: int = 1) -> bytes:
    buf = bytearray(b"\xa5" * (nblocks * BS))         # a pattern no read may leave behind
    await s.read(1, lba, nblocks, memoryview(buf))
    return bytes(buf)


# -- fault_command: delay -------------------------------------------------------------------------

async def test_delayed_completion_arrives_late_but_fine(et):
    async with session(et) as s:
        data = await write_pattern(s, 10)
        await et.arpc("fault_command", action="delay", opcode=OPC_READ, queue="io",
                      delay_ms=400, count=1)
        t0 = trio.current_time()
        assert await read_back(s, 10) == data
        assert trio.current_time() - t0 >= 0.39
        assert s.reconnects == 0 and s.ctrl.timeouts == 0


async def test_delay_past_io_timeout_is_aborted_but_not_reset(et):
    """Abort after io_timeout (the target answers 'not aborted'); the completion arrives before
    the second timeout, so the controller is not reset and the read returns its data."""
    async with session(et, io_timeout=2.0) as s:
        data = await write_pattern(s, 11)
        aborts = await counter(et, AdminOpcode.ABORT, "admin")
        await et.arpc("fault_command", action="delay", opcode=OPC_READ, queue="io",
                      delay_ms=3300, count=1)
        assert await read_back(s, 11) == data
        assert await rule_hits(et, aborts) == 1
        assert s.ctrl.timeouts == 1
        assert s.reconnects == 0 and s.state is CtrlState.LIVE


# -- fault_command: drop --------------------------------------------------------------------------

async def test_dropped_io_times_out_aborts_resets_and_completes_on_the_new_connection(et):
    async with session(et, io_timeout=1.0) as s:
        data = await write_pattern(s, 12)
        first = s.ctrl
        aborts = await counter(et, AdminOpcode.ABORT, "admin")
        await et.arpc("fault_command", action="drop", opcode=OPC_READ, queue="io", count=1)
        t0 = trio.current_time()
        with trio.fail_after(10):
            got = await read_back(s, 12)
        took = trio.current_time() - t0
        assert got == data                              # the caller saw no error
        assert await rule_hits(et, aborts) == 1         # Abort first...
        assert first.timeouts == 1
        assert s.reconnects == 1 and s.ctrl is not first            # ...then the reset
        assert "outstanding" in s.last_error and "resetting" in s.last_error
        assert took >= 2.0                              # not reset before twice io_timeout


# -- fault_command: error -------------------------------------------------------------------------

async def test_error_status_is_a_typed_error(et):
    async with session(et) as s:
        await write_pattern(s, 13)
        rule = await et.arpc("fault_command", action="error", opcode=OPC_READ, queue="io",
                             sct=2, sc=0x81, dnr=True)
        with pytest.raises(NvmeStatusError) as e:
            await read_back(s, 13)
        err = e.value
        assert (err.sct, err.sc, err.dnr) == (2, 0x81, True)
        assert err.name == "UNRECOVERED_READ_ERROR" and "UNRECOVERED_READ_ERROR" in str(err)
        assert await rule_hits(et, rule["id"]) == 1             # DNR: not retried
        assert s.reconnects == 0 and s.state is CtrlState.LIVE


async def test_error_status_on_the_controller_directly(et):
    async with open_controller(et.host, et.port, et.nqn, options()) as c:
        await et.arpc("fault_command", action="error", opcode=OPC_WRITE, queue="io", nsid=1,
                      sct=2, sc=0x80, count=1)
        with pytest.raises(NvmeStatusError) as e:
            await c.write(1, 0, 1, bytes(BS))
        assert (e.value.sct, e.value.sc, e.value.dnr, e.value.name) == \
            (2, 0x80, False, "WRITE_FAULT")
        await c.write(1, 0, 1, bytes(BS))                       # the next one is fine
        assert not c.lost


async def test_retryable_status_without_dnr_is_retried(et):
    async with session(et) as s:
        data = await write_pattern(s, 14)
        # Transient Transport Error, DNR clear, twice: the caller sees the data.
        await et.arpc("fault_command", action="error", opcode=OPC_READ, queue="io",
                      sct=0, sc=0x22, count=2)
        assert await read_back(s, 14) == data
        assert (await et.arpc("fault_list"))["rules"] == []      # both failures were used
        # Forever: bounded (kernel max_retries), then the caller gets the typed error.
        rule = await et.arpc("fault_command", action="error", opcode=OPC_READ, queue="io",
                             sct=0, sc=0x22)
        with pytest.raises(NvmeStatusError) as e:
            await read_back(s, 14)
        assert (e.value.sct, e.value.sc, e.value.dnr) == (0, 0x22, False)
        assert await rule_hits(et, rule["id"]) == MAX_RETRIES + 1
        assert s.reconnects == 0


# -- fault_refuse_connect -------------------------------------------------------------------------

@pytest.mark.parametrize("queue", ["admin", "io"])
async def test_refused_connect_fails_fast_with_the_status(et, queue):
    await et.arpc("fault_refuse_connect", sct=1, sc=0x84, dnr=True, queue=queue)
    s = Session(et.host, et.port, et.nqn, options(), ReconnectPolicy(0.2, 30))
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        with pytest.raises(NvmeStatusError) as e:
            await s.start(n)
    assert trio.current_time() - t0 < 1.0                          # no retries
    err = e.value
    assert (err.sct, err.sc, err.dnr) == (1, 0x84, True)
    assert err.name == "CONNECT_INVALID_HOST"
    assert "CONNECT_INVALID_HOST" in str(err) and "refused" in str(err)
    assert "not allowed" in str(err)                               # the hint for 0x84
    with pytest.raises(ControllerUnavailable):
        await s.read(1, 0, 1, bytearray(BS))


async def test_refused_connect_with_invalid_parameters(et):
    await et.arpc("fault_refuse_connect", sct=1, sc=0x82, dnr=True, dw0=1 | 256 << 16)
    with pytest.raises(NvmeStatusError) as e:
        async with open_controller(et.host, et.port, et.nqn, options()):
            pass
    assert e.value.name == "CONNECT_INVALID_PARAMETERS" and e.value.sc == 0x82


async def test_refused_reconnect_is_retried(et):
    async with session(et) as s:
        data = await write_pattern(s, 15)
        await et.arpc("fault_refuse_connect", sct=1, sc=0x81, count=1, queue="admin")
        await et.arpc("fault_reset")
        await wait_reconnected(s)
        assert "CONNECT_CONTROLLER_BUSY" in s.last_error           # the refused attempt
        assert (await et.arpc("fault_list"))["refuse_connect"] is None
        assert await read_back(s, 15) == data


# -- fault_silent, set_port blackhole: keep-alive -------------------------------------------------

async def _silence_then_recover(et, silence, restore, *, kato=1.0):
    async with session(et, keep_alive_tmo=kato, connect_timeout=1.0) as s:
        data = await write_pattern(s, 16)
        await silence()
        t0 = trio.current_time()
        got = []

        async def pending_read():              # issued while the target says nothing
            got.append(await read_back(s, 16))
        async with trio.open_nursery() as n:
            n.start_soon(pending_read)
            await wait_state(s, CtrlState.RESETTING, kato + 1.5)
            detected = trio.current_time() - t0
            assert detected <= kato + 1.0, detected
            assert "keep-alive" in s.last_error
            await restore()
        assert got == [data]
        await wait_reconnected(s)
        assert s.state is CtrlState.LIVE


async def test_silent_target_is_detected_by_keep_alive(et):
    async def silence():
        await et.arpc("fault_silent", enable=True)

    async def restore():
        pass                                   # new connections are not silent
    await _silence_then_recover(et, silence, restore)


async def test_blackholed_port_is_detected_and_reconnects_after_up(et):
    async def silence():
        await et.arpc("set_port", state="blackhole")

    async def restore():
        await trio.sleep(1.5)                  # reconnect attempts time out meanwhile
        await et.arpc("set_port", state="up")
    await _silence_then_recover(et, silence, restore)


async def test_unanswered_keep_alive_loses_the_controller(et):
    """The target takes the Keep Alive (its timer is fed) but never answers: the host's own
    keep-alive timeout fires within KATO and it reconnects."""
    async with session(et, keep_alive_tmo=1.0) as s:
        await et.arpc("fault_command", action="drop", opcode=AdminOpcode.KEEP_ALIVE,
                      queue="admin", count=1)
        t0 = trio.current_time()
        await wait_state(s, CtrlState.RESETTING, 3.0)
        assert trio.current_time() - t0 <= 1.0 + 1.0
        assert "keep-alive got no answer" in s.last_error
        await wait_reconnected(s)


# -- connection loss: reset, port down, keep-alive expiry, C2HTermReq -----------------------------

async def test_reset_connection_io_resubmitted_without_error(et):
    async with session(et, nr_io_queues=2) as s:
        blocks = {lba: os.urandom(BS) for lba in range(100, 108)}
        rule = await et.arpc("fault_command", action="delay", opcode=OPC_WRITE, queue="io",
                             delay_ms=500)
        errors = []

        async def writer(lba):
            try:
                await s.write(1, lba, 1, blocks[lba], qhint=lba)
            except Exception as e:      # noqa: BLE001 - any error fails the test
                errors.append(e)
        async with trio.open_nursery() as n:
            for lba in blocks:
                n.start_soon(writer, lba)
            await trio.sleep(0.2)                       # all eight in flight at the target
            await et.arpc("fault_clear", id=rule["id"])
            await et.arpc("fault_reset")
        assert errors == []
        assert s.reconnects == 1
        for lba, data in blocks.items():
            assert await read_back(s, lba) == data


async def test_port_down_then_up_reconnects(et):
    async with session(et) as s:
        await et.arpc("set_port", state="down")
        await wait_state(s, CtrlState.RESETTING, 2.0)
        done = []

        async def writer():
            await s.write(1, 20, 1, b"\x5a" * BS)
            done.append(trio.current_time())
        async with trio.open_nursery() as n:
            n.start_soon(writer)
            await trio.sleep(1.0)                       # several refused attempts
            assert s.state is CtrlState.RESETTING and not done
            assert (await et.arpc("stats"))["connections"] == 0
            await et.arpc("set_port", state="up")
        await wait_reconnected(s)
        assert await read_back(s, 20) == b"\x5a" * BS


async def test_keep_alive_expiry_at_the_target_reconnects(et):
    async with session(et) as s:
        data = await write_pattern(s, 21)
        old = s.ctrl.cntlid
        await et.arpc("keep_alive_expire", cntlid=old)
        await wait_reconnected(s)
        assert s.ctrl.cntlid != old
        assert [c["cntlid"] for c in (await et.arpc("list"))["subsystems"][0]["controllers"]] \
            == [s.ctrl.cntlid]
        assert await read_back(s, 21) == data


@pytest.mark.parametrize("qid", [0, 1])
async def test_c2h_term_req_is_connection_lost_and_reconnects(et, qid):
    async with session(et) as s:
        data = await write_pattern(s, 22)
        first = s.ctrl
        await et.arpc("fault_command", action="delay", opcode=OPC_READ, queue="io",
                      delay_ms=500, count=1)
        got = []
        async with trio.open_nursery() as n:
            async def reader():
                got.append(await read_back(s, 22))
            n.start_soon(reader)
            await trio.sleep(0.1)
            await et.arpc("fault_term_req", fes=1, fei=5, qid=qid)
        assert got == [data]                             # resubmitted, no error
        reason = await first.wait_lost()
        assert isinstance(reason, ConnectionLost)
        if qid:
            assert "C2HTermReq (FES 0x1" in str(reason)
        else:
            # The target then tears the controller down, closing the I/O queue too: its EOF
            # may reach the host before the admin queue's reader gets to the TermReq.
            assert "C2HTermReq (FES 0x1" in str(reason) or "closed by the target" in str(reason)
        assert s.reconnects == 1


# -- identity across reconnects ------------------------------------------------------------------

async def test_io_waiting_for_a_reconnect_never_reaches_a_replaced_namespace(et):
    """The reconnect finds other identifiers behind NSID 1 (a different namespace: the kernel's
    nvme_validate_ns removes it, "identifiers changed for nsid"): a write that was in flight
    when the port went down and one issued during the outage fail with ENODEV; neither is
    resubmitted into the new namespace. A namespace that is only resized keeps its bdev."""
    from bdev import BdevError
    from bdev.nvme import NvmeController
    from bdev.registry import BdevRegistry
    async with session(et) as s, trio.open_nursery() as n:
        reg = BdevRegistry(examine_modules=[])
        ctrl = NvmeController(reg, s, 0)
        await ctrl.start(n)
        old = reg.get("nvme0n1")
        ch = old.get_io_channel()
        await ch.write_blocks(9, 1, b"\x11" * BS)
        results = {}

        async def writer(lba):
            try:
                await ch.write_blocks(lba, 1, b"\x77" * BS)
                results[lba] = "ok"
            except BdevError as e:
                results[lba] = e.errno
        await et.arpc("fault_command", action="drop", opcode=OPC_WRITE, queue="io", count=1)
        n.start_soon(writer, 10)                        # in flight, never completed
        await trio.sleep(0.2)
        await et.arpc("set_port", state="down")
        await wait_state(s, CtrlState.RESETTING, 2.0)
        n.start_soon(writer, 11)                        # issued during the outage
        await et.arpc("remove_ns", nsid=1)
        await et.arpc("add_ns", nsid=1, spec="ram:8M:4096")
        await trio.sleep(0.2)
        await et.arpc("set_port", state="up")
        await wait_reconnected(s)
        await wait_for(lambda: len(results) == 2, 5, lambda: f"both writes done ({results})")
        assert results == {10: errno.ENODEV, 11: errno.ENODEV}
        assert old.removed
        await wait_for(lambda: reg.get("nvme0n1") not in (None, old), 5, lambda: "the new bdev")
        new = reg.get("nvme0n1")
        assert new.num_blocks == (8 << 20) // BS
        assert await read_back(s, 10, 3) == bytes(3 * BS)    # nothing landed in the new one
        with pytest.raises(BdevError) as ei:
            await ch.read_blocks(9, 1)
        assert ei.value.errno == errno.ENODEV

        # Same namespace, resized during an outage: the bdev and its handles stay.
        ch2 = new.get_io_channel()
        await et.arpc("set_port", state="down")
        await wait_state(s, CtrlState.RESETTING, 2.0)
        await et.arpc("resize_ns", nsid=1, size="12M")
        await et.arpc("set_port", state="up")
        await wait_reconnected(s, 2)
        await ch2.write_blocks(5, 1, b"\x55" * BS)
        assert await read_back(s, 5) == b"\x55" * BS
        await wait_for(lambda: new.num_blocks == (12 << 20) // BS, 5, lambda: "the resize")
        assert reg.get("nvme0n1") is new and not new.removed
        n.cancel_scope.cancel()


async def test_namespace_recreated_with_the_same_spec_is_a_new_namespace(et):
    """remove_ns + add_ns of the same spec at the same NSID while the host is away: a new
    namespace (empty RAM), so new identifiers (Base: NGUID/UUID are assigned when a namespace
    is created; nvmet generates a UUID per namespace), and the host sees a remove and an add.
    The namespaces of the command line keep identifiers derived from it (stable restarts)."""
    spec = "ram:16M:4096"
    before = (await et.arpc("list"))["subsystems"][0]["namespaces"][0]
    async with session(et) as s:
        events = []
        s.on_namespace = lambda kind, nsid, info: events.append((kind, nsid))
        await et.arpc("set_port", state="down")
        await wait_state(s, CtrlState.RESETTING, 2.0)
        await et.arpc("remove_ns", nsid=1)
        after = await et.arpc("add_ns", nsid=1, spec=spec)
        await et.arpc("set_port", state="up")
        await wait_reconnected(s)
        assert (after["nguid"], after["uuid"]) != (before["nguid"], before["uuid"])
        assert events == [("remove", 1), ("add", 1)]
    ns0 = Namespace(1, parse_ns_spec(spec)[0], 4096, et.nqn, spec)
    assert ns0.nguid.hex() == before["nguid"]              # generation 0: from the config


# -- fault_corrupt_digest -------------------------------------------------------------------------

async def test_corrupted_header_digest_host_terminates_and_recovers(et):
    async with session(et, hdr_digest=True) as s:
        data = await write_pattern(s, 23)
        assert (await et.arpc("stats"))["connections"] == 2
        await et.arpc("fault_corrupt_digest", kind="header", count=1, qid=1)
        assert await read_back(s, 23) == data           # after the reconnect
        assert s.reconnects == 1
        assert "header digest" in s.last_error


async def test_corrupted_data_digest_is_never_data(et):
    async with session(et, data_digest=True) as s:
        data = await write_pattern(s, 24)
        reads = (await et.arpc("stats"))["reads"]
        await et.arpc("fault_corrupt_digest", kind="data", count=1, qid=1)
        assert await read_back(s, 24) == data           # retried once
        assert (await et.arpc("stats"))["reads"] == reads + 2
        # Every answer corrupt: bounded retries, then DigestError, never the bytes.
        await et.arpc("fault_corrupt_digest", kind="data", count=100, qid=1)
        with pytest.raises(DigestError):
            await read_back(s, 24)
        assert (await et.arpc("stats"))["reads"] == reads + 2 + MAX_RETRIES + 1
        assert s.reconnects == 0                        # a data digest error is not fatal
        await et.arpc("fault_clear")
        assert await read_back(s, 24) == data


async def test_corrupted_data_digest_on_the_controller_directly(et):
    async with open_controller(et.host, et.port, et.nqn, options(data_digest=True)) as c:
        await c.write(1, 25, 1, b"\x11" * BS)
        await et.arpc("fault_corrupt_digest", kind="data", count=1, qid=1)
        with pytest.raises(DigestError):
            await c.read(1, 25, 1, memoryview(bytearray(BS)))
        buf = bytearray(BS)
        await c.read(1, 25, 1, memoryview(buf))
        assert buf == b"\x11" * BS and not c.lost


# -- fault_malformed ------------------------------------------------------------------------------

MALFORMED = ["bad_type", "h2c_type", "icresp_again", "bad_hlen", "bad_plen", "bad_pdo",
             "success_without_last", "unknown_cid", "unknown_cid_data", "unknown_r2t",
             "garbage", "truncated"]
@pytest.mark.parametrize("kind", MALFORMED)
async def test_malformed_pdu_host_terminates_and_reconnects(et, kind):
    async with session(et) as s:
        data = await write_pattern(s, 26)
        await et.arpc("fault_malformed", kind=kind, qid=1)
        # A read now: on the dying connection (resubmitted) or the next one. `truncated` only
        # shows up when the next PDU arrives, so the read is what exposes it.
        assert await read_back(s, 26) == data
        await wait_reconnected(s)
        assert "protocol violation by the target" in s.last_error
        assert await read_back(s, 26) == data


def test_every_malformed_kind_is_covered():
    from target.faults import MALFORMED as TARGET_KINDS
    assert sorted(MALFORMED) == sorted(TARGET_KINDS)


# -- post_aen -------------------------------------------------------------------------------------

async def test_namespace_notice_reads_the_changed_list_and_rescans(et):
    async with session(et) as s:
        logs = await counter(et, 0x02, "admin")                 # Get Log Page
        idents = await counter(et, AdminOpcode.IDENTIFY, "admin")
        await et.arpc("post_aen", type=2, info=0x00, lid=0x04)
        await wait_for(lambda: "type=2 info=0x00 log=0x04" in s.statistics()["async_events"], 3)
        with trio.fail_after(3):
            while (await rule_hits(et, idents) or 0) < 3:       # NS list + 2 namespaces...
                await trio.sleep(0.05)
        assert await rule_hits(et, logs) == 1                   # ...after the log 04h read
        assert sorted(s.namespaces) == [1, 2] and s.reconnects == 0


async def test_namespace_changes_reach_the_session(et):
    """Add, resize, remove at the target: each notice is followed by the log 04h read that
    re-arms the next one (no periodic rescan here), so every change arrives."""
    async with session(et) as s:
        events = []
        s.on_namespace = lambda kind, nsid, info: events.append((kind, nsid, info.size))
        await et.arpc("add_ns", nsid=3, spec="ram:4M:512")
        await wait_for(lambda: ("add", 3, 4 << 20) in events, 5, lambda: f"add in {events}")
        await et.arpc("resize_ns", nsid=3, size="6M")
        await wait_for(lambda: ("resize", 3, 6 << 20) in events, 5, lambda: f"resize in {events}")
        await et.arpc("remove_ns", nsid=3)
        await wait_for(lambda: ("remove", 3, 6 << 20) in events, 5, lambda: f"remove in {events}")
        assert events == [("add", 3, 4 << 20), ("resize", 3, 6 << 20), ("remove", 3, 6 << 20)]
        ctrl = (await et.arpc("list"))["subsystems"][0]["controllers"][0]
        assert ctrl["aen_masked"] == [] and ctrl["changed_ns"] == []
        assert sorted(s.namespaces) == [1, 2]


@pytest.mark.parametrize("etype, info, lid",
                         [(0, 0x01, 0x01), (1, 0x01, 0x02), (7, 0x42, 0xC0)])
async def test_other_events_are_logged_and_counted(et, caplog, etype, info, lid):
    caplog.set_level(logging.INFO, logger="initiator.controller")
    async with session(et) as s:
        seen = []
        s.on_async_event = seen.append
        logs = await counter(et, 0x02, "admin")
        for _ in range(6):                      # more than the AERs outstanding: re-armed
            await et.arpc("post_aen", type=etype, info=info, lid=lid)
            await trio.sleep(0.05)
        text = f"type={etype} info=0x{info:02x} log=0x{lid:02x}"
        await wait_for(lambda: s.statistics()["async_events"].count(text) == 6, 3)
        assert [(e.type, e.info, e.log_page) for e in seen] == [(etype, info, lid)] * 6
        assert f"asynchronous event: type {etype} info 0x{info:02x} log page 0x{lid:02x}" \
            in caplog.text
        if etype in (0, 1):
            # Base 5.2: error/SMART events stay masked until their log page is read: the session
            # reads it once per event (no namespace rescan, which would read log 04h as well).
            await wait_for(lambda: s.statistics()["health" if etype == 1 else "error_log"]
                           is not None, 3)
            hits = await rule_hits(et, logs)
            assert hits >= 1
            if etype == 1:
                assert s.statistics()["health"]["critical_warning"] == 0
        else:
            assert await rule_hits(et, logs) == 0       # vendor: nothing to read, no rescan
        assert s.reconnects == 0 and s.state is CtrlState.LIVE
        ctrl = (await et.arpc("list"))["subsystems"][0]["controllers"][0]
        assert ctrl["aens_sent"] == 6 and ctrl["aers_held"] >= 1


# -- the H2CTermReqs on the wire (in-process target: it only logs what it received) ---------------

NQN = "nqn.2026-01.io.blockfs:faults"


@pytest.fixture
def sockdir_fresh():
    d = tempfile.mkdtemp(prefix="bff", dir="/tmp")       # unix socket paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def inproc(nursery, sockdir_fresh):
    d = sockdir_fresh
    cfg = TargetConfig(listen=["127.0.0.1:0"],
                       subsystems=[SubsystemConfig(nqn=NQN, namespaces=["ram:16M:4096"])],
                       control=os.path.join(d, "ctl.sock"))
    server = await nursery.start(serve_target, cfg)
    server.host, server.nqn = "127.0.0.1", NQN

    async def arpc(method, **params):
        from target.control import acall
        return await acall(cfg.control, method, **params)
    server.arpc = arpc
    return server


def host_term_reqs(caplog) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for m in
            re.finditer(r"host sent H2CTermReq \(FES (\d+), FEI (\d+)\)", caplog.text)]


# kind -> (FES, FEI) of NVMe/TCP 1.0 3.6.2.4 (FEI: offset of the offending header field;
# reserved, so 0, for other FES), as tests/unit/test_initiator_malformed.py expects of the host.
EXPECTED_TERM = {
    "bad_type": (FES_HDR, 0),                 # reserved PDU type
    "h2c_type": (FES_HDR, 0),                 # CapsuleCmd is host-to-controller only
    "icresp_again": (FES_SEQ, 0),
    "bad_hlen": (FES_HDR, 2),
    "bad_pdo": (FES_HDR, 3),
    "bad_plen": (FES_HDR, 4),
    "success_without_last": (FES_HDR, 1),     # FLAGS
    "unknown_cid_data": (FES_HDR, 8),         # CCCID
    "unknown_cid": (FES_HDR, 20),             # CQE CID
    "unknown_r2t": (FES_HDR, 8),              # CCCID
    "garbage": None,                          # random: any FES, but a TermReq
    "truncated": (FES_HDR, 0),                # the next PDU's tail parses as a type-0 header
}


@pytest.mark.parametrize("kind", MALFORMED)
async def test_malformed_pdu_is_answered_with_h2c_term_req(inproc, caplog, kind):
    caplog.set_level(logging.INFO, logger="blockfs.target")
    async with session(inproc) as s:
        await inproc.arpc("fault_malformed", kind=kind, qid=1)
        if kind == "truncated":
            with contextlib.suppress(Exception):
                await s.ctrl.read(1, 0, 1, memoryview(bytearray(BS)))
        await wait_reconnected(s, timeout=5)
        await wait_for(lambda: host_term_reqs(caplog), 2, lambda: "H2CTermReq at the target")
        got = host_term_reqs(caplog)
        assert len(got) == 1, got
        if EXPECTED_TERM[kind] is None:
            assert got[0][0] in (1, 2, 4, 5, 6), got
        else:
            assert got[0] == EXPECTED_TERM[kind]


async def test_corrupted_header_digest_is_answered_with_fes_3(inproc, caplog):
    caplog.set_level(logging.INFO, logger="blockfs.target")
    async with session(inproc, hdr_digest=True) as s:
        await inproc.arpc("fault_corrupt_digest", kind="header", count=1, qid=0)
        await s.admin(lambda c: c.identify(1))            # its CapsuleResp is corrupted
        await wait_reconnected(s, timeout=5)
        await wait_for(lambda: host_term_reqs(caplog), 2, lambda: "H2CTermReq at the target")
        assert host_term_reqs(caplog) == [(FES_HDGST, 0)]


# -- a target restarted with other limits (in-process: two targets on one port) ------------------

async def test_target_restarted_with_a_smaller_mdts_gets_io_that_fits(sockdir_fresh):
    """The target behind the address restarts with MDTS 128 KiB instead of 1 MiB: after the
    reconnect, bdev I/O is split for the new limit (the kernel host re-reads MDTS on every
    reset and updates the queue limits), it does not fail with Invalid Field (EINVAL)."""
    from bdev.nvme import NvmeController
    from bdev.registry import BdevRegistry
    d = sockdir_fresh
    ns = ["ram:16M:4096"]

    def cfg(port, mdts, n):
        return TargetConfig(listen=[f"127.0.0.1:{port}"], mdts=mdts,
                            subsystems=[SubsystemConfig(nqn=NQN, namespaces=ns)],
                            control=os.path.join(d, f"ctl{n}.sock"))
    async def serve(config, *, task_status):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                task_status.started((await inner.start(serve_target, config), scope))
    async with trio.open_nursery() as n:
        t1, first = await n.start(serve, cfg(0, 8, 1))
        port = t1.port
        s = Session("127.0.0.1", port, NQN, options(),
                    ReconnectPolicy(reconnect_delay=0.2, ctrl_loss_tmo=30), rescan_interval=0)
        await s.start(n)
        reg = BdevRegistry(examine_modules=[])
        await NvmeController(reg, s, 0).start(n)
        ch = reg.get("nvme0n1").get_io_channel()
        data = os.urandom(512 << 10)
        await ch.write_blocks(0, len(data) // BS, data)
        first.cancel()                                   # the target goes away...
        await wait_state(s, CtrlState.RESETTING, 3.0)
        t2, _ = await n.start(serve, cfg(port, 5, 2))   # ...and comes back, MDTS 5
        await wait_reconnected(s)
        assert s.io_max_bytes == 128 << 10
        await ch.write_blocks(256, len(data) // BS, data)
        assert bytes(await ch.read_blocks(256, len(data) // BS)) == data
        assert bytes(t2.state.subsystem(NQN).namespaces[1].backend.mv[1 << 20:][:len(data)]) \
            == data
        await s.aclose()
        n.cancel_scope.cancel()
