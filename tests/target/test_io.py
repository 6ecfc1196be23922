"""Read/Write/Flush/Write Zeroes/DSM, in-capsule and R2T data, SUCCESS flag, digests, MDTS,
SQ flow control (SQHD)."""

import os
import struct

import pytest
import trio

from initiator import _structs as st
from initiator._pdu import sqe
from initiator._spec import FeatureId
from rawclient import NQN, RawClient, io_client

pytestmark = pytest.mark.trio


async def _setup(target, **kw):
    a = await RawClient.open(target.port)
    await a.bring_up(NQN)
    await a.set_features(FeatureId.NUMBER_OF_QUEUES, (1 << 16) | 1)
    io = await io_client(target.port, NQN, a.cntlid, 1, **kw)
    return a, io


async def test_write_read_in_capsule_and_sqhd(target):
    with trio.fail_after(10):
        a, io = await _setup(target, sqsize=7)
        data = os.urandom(4096)
        w = await io.write(1, 8, data, 512)
        assert w.status == 0 and not io.r2ts
        assert w.sqhd == 2 and w.sqid == 1         # Connect was entry 1, the write entry 2
        r = await io.read(1, 8, 8, 512)
        assert r.status == 0 and r.data == data and not r.success_flag and r.sqhd == 3
        sqhds = []
        for _ in range(8):
            sqhds.append((await io.read(1, 0, 1, 512)).sqhd)
        assert sqhds == [4, 5, 6, 7, 0, 1, 2, 3]   # wraps at SQSIZE + 1 = 8
        await io.aclose()
        await a.aclose()


async def test_success_flag_only_without_sq_flow_control(target):
    with trio.fail_after(10):
        a, io = await _setup(target, disable_sqflow=True)
        data = os.urandom(8192)
        assert (await io.write(2, 0, data, 4096)).status == 0
        r = await io.read(2, 0, 2, 4096)
        assert r.success_flag and r.data == data
        # No CapsuleResp followed the C2HData: the next PDU belongs to the next command.
        w = await io.write(2, 0, data, 4096)
        assert w.status == 0
        types = [p[0] for p in io.pdus]
        assert types.count(5) == 3   # Connect response + two write completions only
        await io.aclose()
        await a.aclose()


async def test_r2t_write_large(target):
    with trio.fail_after(10):
        a, io = await _setup(target)
        data = os.urandom(512 * 1024)
        w = await io.write(1, 100, data, 512, in_capsule=False)
        assert w.status == 0
        assert io.r2ts[-1][2:] == (0, len(data))
        # H2CData split in MAXH2CDATA pieces by the client; read back in two halves.
        r1 = await io.read(1, 100, 512, 512)
        r2 = await io.read(1, 612, 512, 512)
        assert r1.data + r2.data == data
        await io.aclose()
        await a.aclose()


async def test_in_capsule_over_limit_and_sgl_errors(target):
    with trio.fail_after(10):
        a, io = await _setup(target)
        # 16 KiB in-capsule is the limit we announced (IOCCSZ); 8 KiB fits.
        assert (await io.write(1, 0, bytes(8192), 512)).status == 0
        # SGL length that does not match NLB.
        cmd = sqe(0x01, 0, 1, 0, 0, 0, data_len=1024)
        r = await io.submit(cmd, bytes(1024))
        assert (r.sct, r.sc) == (0, 0x0F)
        # Unknown SGL type.
        cmd = sqe(0x02, 0, 1, 0, 0, 0, data_len=512)
        cmd[39] = 0x30
        r = await io.submit(cmd)
        assert (r.sct, r.sc) == (0, 0x11)
        await io.aclose()
        await a.aclose()


async def test_errors_lba_ns_mdts_opcode(target):
    with trio.fail_after(10):
        a, io = await _setup(target)
        r = await io.read(1, 16 * 2048 - 1, 2, 512)
        assert (r.sct, r.sc, r.dnr) == (0, 0x80, True)
        r = await io.read(9, 0, 1, 512)
        assert (r.sct, r.sc, r.dnr) == (0, 0x0B, True)
        r = await io.read(2, 0, 257, 4096)                 # 1 MiB + 4 KiB > MDTS
        assert (r.sct, r.sc) == (0, 0x02)
        r = await io.submit(sqe(0x7E, 0, 1))
        assert (r.sct, r.sc) == (0, 0x01)
        # The I/O queue takes no admin commands.
        r = await io.submit(sqe(0x06, 0, 0, 1, data_len=4096))
        assert r.status != 0
        await io.aclose()
        await a.aclose()


async def test_flush_write_zeroes_dsm(target):
    with trio.fail_after(10):
        a, io = await _setup(target)
        assert (await io.write(1, 0, b"\xAA" * 8192, 512)).status == 0
        assert (await io.submit(sqe(0x00, 0, 1))).status == 0
        assert (await io.submit(sqe(0x00, 0, 0xFFFFFFFF))).status == 0
        r = await io.submit(sqe(0x08, 0, 1, 2, 0, 1))       # zero LBAs 2..3
        assert r.status == 0
        d = (await io.read(1, 0, 16, 512)).data
        assert d[:1024] == b"\xAA" * 1024 and d[1024:2048] == bytes(1024)
        assert d[2048:] == b"\xAA" * (8192 - 2048)
        rng = st.DSM_RANGE.pack(0, 4, 8) + st.DSM_RANGE.pack(0, 2, 14)
        r = await io.submit(sqe(0x09, 0, 1, 1, 1 << 2, data_len=32), rng)
        assert r.status == 0
        d = (await io.read(1, 0, 16, 512)).data
        assert d[8 * 512:12 * 512] == bytes(2048) and d[14 * 512:] == bytes(1024)
        assert d[12 * 512:14 * 512] == b"\xAA" * 1024
        r = await io.submit(sqe(0x09, 0, 1, 0, 1 << 2, data_len=16),
                            st.DSM_RANGE.pack(0, 4, 10 ** 9))
        assert (r.sct, r.sc) == (0, 0x80)
        await io.aclose()
        await a.aclose()


@pytest.mark.parametrize("hd,dd", [(True, False), (False, True), (True, True)])
async def test_digests_io(target, hd, dd):
    with trio.fail_after(10):
        a, io = await _setup(target, hdgst=hd, ddgst=dd)
        data = os.urandom(4096)
        assert (await io.write(2, 1, data, 4096)).status == 0
        big = os.urandom(256 * 1024)
        assert (await io.write(2, 10, big, 4096, in_capsule=False)).status == 0
        r = await io.read(2, 1, 1, 4096)
        assert r.data == data and r.ddgst_ok
        assert (await io.read(2, 10, 64, 4096)).data == big
        await io.aclose()
        await a.aclose()


async def test_data_digest_error_fails_command_not_queue(target):
    from initiator._pdu import capsule_cmd_header
    with trio.fail_after(10):
        a, io = await _setup(target, ddgst=True)
        # In-capsule write with a wrong data digest.
        cmd = sqe(0x01, 0, 1, 0, 0, 0, data_len=512, in_capsule=True)
        cid = io.next_cid()
        struct.pack_into("<H", cmd, 2, cid)
        await io.send(capsule_cmd_header(cmd, 512, False, True), bytes(512), b"\0\0\0\0")
        r = await io.wait(cid)
        assert (r.sct, r.sc) == (0, 0x22)
        # H2CData with a wrong digest.
        cmd = sqe(0x01, 0, 1, 0, 0, 63, data_len=32768)
        cid = io.next_cid()
        struct.pack_into("<H", cmd, 2, cid)
        await io.send(capsule_cmd_header(cmd, 0, False, True))
        t, f, h, d, ok = await io.recv_pdu()
        cccid, ttag, r2to, r2tl = struct.unpack_from("<HHII", h, 8)
        await io.send_h2c(cccid, ttag, bytes(32768), corrupt_ddgst=True)
        r = await io.wait(cid)
        assert (r.sct, r.sc) == (0, 0x22)
        # The queue still works.
        assert (await io.read(1, 0, 1, 512)).status == 0
        await io.aclose()
        await a.aclose()


async def test_two_io_queues_and_reconnect(target):
    with trio.fail_after(10):
        a = await RawClient.open(target.port)
        await a.bring_up(NQN)
        qs = [await io_client(target.port, NQN, a.cntlid, q) for q in (1, 2)]
        assert (await qs[0].write(1, 0, b"x" * 512, 512)).status == 0
        assert (await qs[1].read(1, 0, 1, 512)).data == b"x" * 512
        await qs[1].aclose()
        await trio.sleep(0.05)
        q2 = await io_client(target.port, NQN, a.cntlid, 2)     # QID free again
        assert (await q2.read(1, 0, 1, 512)).status == 0
        # Closing the admin queue tears the controller down: I/O queues are closed.
        await a.aclose()
        assert await qs[0].expect_eof()
        assert await q2.expect_eof()


async def test_file_backend(make_target, tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(b"\x11" * (1 << 20))
    t = await make_target(namespaces=[f"file:{p}", f"file:{tmp_path / 'new.img'}:4096:2M"])
    with trio.fail_after(10):
        a, io = await _setup(t)
        assert (await io.read(1, 0, 1, 512)).data == b"\x11" * 512
        assert (await io.write(1, 1, b"\x22" * 512, 512, fua=True)).status == 0
        assert (await io.write(2, 1, b"\x33" * 4096, 4096)).status == 0
        assert (await io.submit(sqe(0x00, 0, 2))).status == 0
        await io.aclose()
        await a.aclose()
    assert p.read_bytes()[512:1024] == b"\x22" * 512
    assert (tmp_path / "new.img").stat().st_size == 2 << 20
    assert (tmp_path / "new.img").read_bytes()[4096:8192] == b"\x33" * 4096


@pytest.mark.parametrize("sendfile_min", [0, 64 << 10])
async def test_null_backend(make_target, sendfile_min):
    t = await make_target(namespaces=["null:1G:4096"], sendfile_min=sendfile_min)
    assert (t.state.subsystems[NQN].namespaces[1].zero_fd is None) == (not sendfile_min)
    with trio.fail_after(10):
        a, io = await _setup(t)
        assert (await io.write(1, 5, b"\x55" * 4096, 4096)).status == 0
        assert (await io.read(1, 5, 1, 4096)).data == bytes(4096)
        # With sendfile_min, large reads go out with sendfile from a zero memfd
        # (tests/target/test_sendfile.py); else a zero buffer is sent.
        assert (await io.read(1, 0, 256, 4096)).data == bytes(1 << 20)
        await io.aclose()
        await a.aclose()


async def test_file_backend_errors_fail_the_command_only(make_target, tmp_path):
    import errno
    t = await make_target(namespaces=[f"file:{tmp_path / 'e.img'}:512:1M"])
    be = t.state.subsystems[NQN].namespaces[1].backend

    def fail(*_a):
        raise OSError(errno.EIO, "injected")
    with trio.fail_after(10):
        a, io = await _setup(t)
        be.read = fail
        r = await io.read(1, 0, 1, 512)
        assert (r.sct, r.sc) == (2, 0x81)
        be.write = fail
        r = await io.write(1, 0, bytes(512), 512)
        assert (r.sct, r.sc) == (2, 0x80)
        assert (await io.submit(sqe(0x00, 0, 1))).status == 0
        assert t.state.backend_errors
        await io.aclose()
        await a.aclose()
