"""Each fault switch toggled through the control socket and observed on the wire."""

import pytest
import trio

from helpers.jsonlines import exchange
from initiator import _structs as st
from initiator._errors import RemoteProtocolError
from initiator._pdu import sqe
from initiator._spec import AdminOpcode, PduType, TermReqFes
from rawclient import Closed, NQN, RawClient, TermReqReceived, io_client
from target.control import RpcError, acall, call

pytestmark = pytest.mark.trio


async def _io(target, **kw):
    a = await RawClient.open(target.port)
    await a.bring_up(NQN, **{k: v for k, v in kw.items() if k in ("hdgst", "ddgst")})
    io = await io_client(target.port, NQN, a.cntlid, 1, **kw)
    return a, io


async def test_list_and_errors(target):
    ctl = target.control_path
    info = await acall(ctl, "list")
    assert info["subsystems"][0]["nqn"] == NQN
    assert [n["nsid"] for n in info["subsystems"][0]["namespaces"]] == [1, 2]
    with pytest.raises(RpcError) as e:
        await acall(ctl, "no_such_method")
    assert e.value.code == -32601
    with pytest.raises(RpcError) as e:
        await acall(ctl, "remove_ns", nsid=42)
    assert e.value.code == -32602
    with pytest.raises(RpcError):
        await acall(ctl, "fault_command", action="explode")
    # The synchronous client works from a thread too.
    stats = await trio.to_thread.run_sync(call, ctl, "stats")
    assert "cpu_s" in stats and stats["poll_idle_s"] >= 0


async def test_malformed_control_requests_leave_the_target_serving(target):
    """JSON nested deeper than the parser goes (RecursionError, not ValueError) used to kill
    the control connection's task and with it the target."""
    stream = await trio.open_unix_socket(target.control_path)
    async with stream:
        for line, code in ((b"[" * 100_000, -32700), (b'{"method": {"a": 1}}', -32600),
                           (b"[1]", -32600)):
            assert (await exchange(stream, line))["error"]["code"] == code
    assert (await acall(target.control_path, "list"))["subsystems"][0]["nqn"] == NQN


async def test_delay_command(target):
    with trio.fail_after(10):
        a, io = await _io(target)
        await acall(target.control_path, "fault_command", action="delay", opcode=0x02,
                    queue="io", delay_ms=300, count=1)
        t0 = trio.current_time()
        slow = await io.send_cmd(sqe(0x02, 0, 1, 0, 0, 0, data_len=512))
        fast = await io.send_cmd(sqe(0x00, 0, 1))                     # flush, not delayed
        r = await io.wait(fast)
        assert r.status == 0 and slow not in io.done
        r = await io.wait(slow)
        assert r.status == 0 and len(r.data) == 512
        assert trio.current_time() - t0 >= 0.29
        assert (await acall(target.control_path, "fault_list"))["rules"] == []   # count used up


async def test_drop_command_never_completes(target):
    with trio.fail_after(10):
        a, io = await _io(target)
        rule = await acall(target.control_path, "fault_command", action="drop",
                           opcode=AdminOpcode.KEEP_ALIVE)
        cid = await a.send_cmd(sqe(AdminOpcode.KEEP_ALIVE))
        with trio.move_on_after(0.5):
            await a.wait(cid)
            pytest.fail("dropped command completed")
        assert (await a.identify(1)).status == 0                   # others still complete
        await acall(target.control_path, "fault_clear", id=rule["id"])
        assert (await a.keep_alive()).status == 0
        info = await acall(target.control_path, "list")
        held = [c["held"] for c in info["connections"] if c["qid"] == 0]
        assert held == [[cid]]


async def test_error_status_rule(target):
    with trio.fail_after(10):
        a, io = await _io(target)
        await acall(target.control_path, "fault_command", action="error", opcode=0x01,
                    nsid=1, sct=2, sc=0x80, count=2)     # media: write fault
        for _ in range(2):
            r = await io.write(1, 0, bytes(512), 512)
            assert (r.sct, r.sc) == (2, 0x80)
        assert (await io.write(1, 0, bytes(512), 512)).status == 0
        assert (await io.write(2, 0, bytes(4096), 4096)).status == 0


async def test_silent_then_resume(target):
    with trio.fail_after(10):
        a, io = await _io(target)
        r = await acall(target.control_path, "fault_silent", cntlid=a.cntlid, qid=1)
        assert r == [{"cntlid": a.cntlid, "qid": 1, "peer": r[0]["peer"]}]
        cid = await io.send_cmd(sqe(0x02, 0, 1, 0, 0, 0, data_len=512))
        with trio.move_on_after(0.4):
            await io.wait(cid)
            pytest.fail("silent connection answered")
        assert (await a.identify(1)).status == 0     # admin queue not silenced
        await acall(target.control_path, "fault_silent", enable=False)
        assert (await io.wait(cid)).status == 0


async def test_silent_admin_is_not_expired_by_keep_alive(target):
    with trio.fail_after(10):
        c = await RawClient.open(target.port)
        await c.bring_up(NQN, kato=200)
        await acall(target.control_path, "fault_silent", cntlid=c.cntlid)
        await trio.sleep(0.6)                         # three KATOs: still open, just silent
        assert target.controllers()
        await acall(target.control_path, "fault_silent", enable=False)
        assert await c.expect_eof(timeout=2)          # now the expired timer fires


async def test_reset(target):
    with trio.fail_after(10):
        a, io = await _io(target)
        await acall(target.control_path, "fault_reset", cntlid=a.cntlid, qid=1)
        with pytest.raises(Closed) as e:
            await io.recv_pdu()
        assert "reset" in str(e.value).lower() or "EOF" in str(e.value)
        assert (await a.identify(1)).status == 0


async def test_term_req(target):
    with trio.fail_after(10):
        a, io = await _io(target)
        await acall(target.control_path, "fault_term_req", cntlid=a.cntlid, qid=1,
                    fes=TermReqFes.PDU_SEQUENCE_ERROR, fei=0)
        with pytest.raises(TermReqReceived) as e:
            await io.pump()
        assert e.value.fes == TermReqFes.PDU_SEQUENCE_ERROR
        assert await io.expect_eof()


async def test_corrupt_header_digest(target):
    with trio.fail_after(10):
        a, io = await _io(target, hdgst=True)
        await acall(target.control_path, "fault_corrupt_digest", kind="header", cntlid=a.cntlid,
                    qid=1)
        with pytest.raises(RemoteProtocolError) as e:
            await io.read(1, 0, 1, 512)
        assert e.value.fes == TermReqFes.HEADER_DIGEST_ERROR


async def test_corrupt_data_digest(target):
    with trio.fail_after(10):
        a, io = await _io(target, ddgst=True)
        await acall(target.control_path, "fault_corrupt_digest", kind="data", count=1)
        r = await io.read(1, 0, 1, 512)
        assert r.ddgst_ok is False
        await io.pump()                                  # the CapsuleResp that follows
        r = await io.read(1, 0, 1, 512)                  # only one was corrupted
        assert r.ddgst_ok and r.status == 0


@pytest.mark.parametrize("kind", ["bad_type", "h2c_type", "icresp_again", "bad_hlen",
                                  "bad_plen", "bad_pdo", "success_without_last"])
async def test_malformed_pdus_rejected_by_host_framing(target, kind):
    with trio.fail_after(10):
        a, io = await _io(target)
        await acall(target.control_path, "fault_malformed", kind=kind, cntlid=a.cntlid, qid=1)
        with pytest.raises(RemoteProtocolError):
            await io.recv_pdu()


@pytest.mark.parametrize("kind", ["unknown_cid", "unknown_r2t", "unknown_cid_data", "garbage",
                                  "truncated"])
async def test_malformed_semantic_pdus_arrive(target, kind):
    with trio.fail_after(10):
        a, io = await _io(target)
        await acall(target.control_path, "fault_malformed", kind=kind, cntlid=a.cntlid, qid=1)
        if kind == "truncated":
            with trio.move_on_after(0.3):
                await io.recv_pdu()
                pytest.fail("a truncated header parsed")
            return
        try:
            t, f, h, d, ok = await io.recv_pdu()
        except RemoteProtocolError:
            assert kind == "garbage"
            return
        assert struct_cid(h) == 0xFFFE


def struct_cid(h):
    import struct
    if h[0] == PduType.CAPSULE_RESP:
        return struct.unpack_from("<H", h, 20)[0]
    return struct.unpack_from("<H", h, 8)[0]


async def test_refuse_connect(target):
    with trio.fail_after(10):
        await acall(target.control_path, "fault_refuse_connect", sct=1, sc=0x81, count=1,
                    queue="admin")
        c = await RawClient.open(target.port)
        await c.icreq()
        r = await c.connect(NQN)
        assert (r.sct, r.sc) == (1, 0x81)
        r = await c.connect(NQN)
        assert r.status == 0
        # I/O queue refusal with a given DW0.
        await c.enable()
        await acall(target.control_path, "fault_refuse_connect", sct=1, sc=0x82, dw0=42 << 16,
                    queue="io")
        d = await RawClient.open(target.port)
        await d.icreq()
        r = await d.connect(NQN, 1, cntlid=c.cntlid)
        assert (r.sct, r.sc, r.dw0) == (1, 0x82, 42 << 16)
        await acall(target.control_path, "fault_clear")
        assert (await d.connect(NQN, 1, cntlid=c.cntlid)).status == 0


async def test_post_any_aen(target):
    with trio.fail_after(10):
        c = await RawClient.open(target.port)
        await c.bring_up(NQN)
        cid = await c.send_cmd(sqe(AdminOpcode.ASYNC_EVENT_REQUEST))
        await acall(target.control_path, "post_aen", type=1, info=0x01, lid=0x02,
                    cntlid=c.cntlid)                      # SMART: temperature threshold
        r = await c.wait(cid)
        assert st.parse_aen_dw0(r.dw0) == (1, 1, 2)
        # Forced notices bypass masks: two in a row both arrive.
        c1 = await c.send_cmd(sqe(AdminOpcode.ASYNC_EVENT_REQUEST))
        c2 = await c.send_cmd(sqe(AdminOpcode.ASYNC_EVENT_REQUEST))
        for _ in range(2):
            await acall(target.control_path, "post_aen", type=2, info=0, lid=4)
        assert st.parse_aen_dw0((await c.wait(c1)).dw0) == (2, 0, 4)
        assert st.parse_aen_dw0((await c.wait(c2)).dw0) == (2, 0, 4)


async def test_keep_alive_expire_rpc(target):
    with trio.fail_after(10):
        c = await RawClient.open(target.port)
        await c.bring_up(NQN)
        await acall(target.control_path, "keep_alive_expire", cntlid=c.cntlid)
        assert await c.expect_eof()
