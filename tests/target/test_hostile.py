"""Hostile initiators: malformed PDUs get a C2HTermReq with the right FES/FEI and a disconnect;
other connections are unharmed."""

import struct

import pytest
import trio

from initiator._pdu import (
    CH, IC, build_icreq, build_term_req, capsule_cmd_header, data_pdu_header, sqe,
)
from initiator._spec import PduType, TermReqFes
from rawclient import NQN, RawClient, io_client

pytestmark = pytest.mark.trio


async def _healthy(target):
    """A second host that must keep working whatever the hostile one did."""
    c = await RawClient.open(target.port)
    await c.bring_up(NQN)
    return c


async def _check_term(c, fes, fei=None):
    got_fes, got_fei = await c.expect_term_req()
    assert got_fes == fes, (got_fes, got_fei)
    if fei is not None:
        assert got_fei == fei, (got_fes, got_fei)
    assert await c.expect_eof()


def _capsule(cid=1):
    cmd = sqe(0x06, cid, 0, 1, data_len=4096)
    return capsule_cmd_header(cmd, 0, False, False)


CASES = {
    "unknown_type": (lambda: CH.pack(0x0A, 0, 24, 0, 24) + bytes(16), False,
                     TermReqFes.INVALID_HEADER_FIELD, 0),
    "c2h_type_from_host": (lambda: CH.pack(PduType.C2H_DATA, 4, 24, 24, 28) + bytes(20),
                           True, TermReqFes.INVALID_HEADER_FIELD, 0),
    "capsule_before_icreq": (_capsule, False, TermReqFes.PDU_SEQUENCE_ERROR, 0),
    "icreq_twice": (build_icreq, True, TermReqFes.PDU_SEQUENCE_ERROR, 0),
    "bad_pfv": (lambda: IC.pack(0, 0, 128, 0, 128, 1, 0, 0, 0), False,
                TermReqFes.INVALID_HEADER_FIELD, 8),
    "bad_hpda": (lambda: IC.pack(0, 0, 128, 0, 128, 0, 40, 0, 0), False,
                 TermReqFes.INVALID_HEADER_FIELD, 10),
    "bad_hlen": (lambda: CH.pack(PduType.CAPSULE_CMD, 0, 70, 0, 72) + bytes(64), True,
                 TermReqFes.INVALID_HEADER_FIELD, 2),
    "bad_plen": (lambda: CH.pack(PduType.CAPSULE_CMD, 0, 72, 0, 70) + bytes(64), True,
                 TermReqFes.INVALID_HEADER_FIELD, 4),
    "bad_pdo": (lambda: CH.pack(PduType.CAPSULE_CMD, 0, 72, 10, 72 + 512) + bytes(64 + 512),
                True, TermReqFes.INVALID_HEADER_FIELD, 3),
    "hdgstf_without_negotiation": (lambda: CH.pack(PduType.CAPSULE_CMD, 1, 72, 0, 76)
                                   + bytes(68), True, TermReqFes.INVALID_HEADER_FIELD, 1),
    "h2c_unknown_ttag": (lambda: data_pdu_header(PduType.H2C_DATA, 1, 77, 0, 512, last=True)
                         + bytes(512), True, TermReqFes.INVALID_HEADER_FIELD, 10),
    "in_capsule_too_large": (lambda: capsule_cmd_header(sqe(0x01, 1, 1, 0, 0, 63,
                                                            data_len=32768, in_capsule=True),
                                                        32768, False, False) + bytes(32768),
                             True, TermReqFes.DATA_TRANSFER_LIMIT_EXCEEDED, None),
    "term_req_plen": (lambda: CH.pack(PduType.H2C_TERM_REQ, 0, 24, 0, 400) + bytes(16), True,
                      TermReqFes.INVALID_HEADER_FIELD, 4),
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_malformed_from_host(target, name):
    build, after_ic, fes, fei = CASES[name]
    with trio.fail_after(10):
        good = await _healthy(target)
        bad = await RawClient.open(target.port)
        if after_ic:
            await bad.icreq()
        await bad.send(build())
        await _check_term(bad, fes, fei)
        assert (await good.identify(1)).status == 0
        await good.aclose()


async def test_header_digest_error(target):
    with trio.fail_after(10):
        bad = await RawClient.open(target.port)
        await bad.icreq(hdgst=True)
        hdr = bytearray(capsule_cmd_header(sqe(0x06, 1, 0, 1, data_len=4096), 0, True, False))
        hdr[72] ^= 0xFF
        await bad.send(hdr)
        await _check_term(bad, TermReqFes.HEADER_DIGEST_ERROR, 0)


async def _r2t_write(target):
    a = await _healthy(target)
    io = await io_client(target.port, NQN, a.cntlid, 1)
    cmd = sqe(0x01, 0, 1, 0, 0, 63, data_len=32768)
    cid = io.next_cid()
    struct.pack_into("<H", cmd, 2, cid)
    await io.send(capsule_cmd_header(cmd, 0, False, False))
    t, f, h, d, ok = await io.recv_pdu()
    assert t == PduType.R2T
    return a, io, cid, struct.unpack_from("<H", h, 10)[0]


async def test_h2c_out_of_order_offset(target):
    with trio.fail_after(10):
        a, io, cid, ttag = await _r2t_write(target)
        await io.send(data_pdu_header(PduType.H2C_DATA, cid, ttag, 4096, 4096, last=False),
                      bytes(4096))
        await _check_term(io, TermReqFes.DATA_TRANSFER_OUT_OF_RANGE, 0)   # FEI reserved for FES 4
        assert (await a.identify(1)).status == 0


async def test_h2c_wrong_cccid_and_beyond_r2t(target):
    with trio.fail_after(10):
        a, io, cid, ttag = await _r2t_write(target)
        await io.send(data_pdu_header(PduType.H2C_DATA, cid + 5, ttag, 0, 4096, last=False),
                      bytes(4096))
        await _check_term(io, TermReqFes.INVALID_HEADER_FIELD, 8)
        a2, io2, cid2, ttag2 = await _r2t_write(target)
        await io2.send(data_pdu_header(PduType.H2C_DATA, cid2, ttag2, 0, 65536, last=True),
                       bytes(65536))
        await _check_term(io2, TermReqFes.DATA_TRANSFER_OUT_OF_RANGE, 0)


async def test_h2c_last_too_early(target):
    with trio.fail_after(10):
        a, io, cid, ttag = await _r2t_write(target)
        await io.send(data_pdu_header(PduType.H2C_DATA, cid, ttag, 0, 4096, last=True),
                      bytes(4096))
        await _check_term(io, TermReqFes.INVALID_HEADER_FIELD, 1)


async def test_host_term_req_closes_quietly(target):
    with trio.fail_after(10):
        c = await RawClient.open(target.port)
        await c.icreq()
        await c.send(build_term_req(PduType.H2C_TERM_REQ, 1, 0))
        assert await c.expect_eof()
        assert all(p[0] != PduType.C2H_TERM_REQ for p in c.pdus)


async def test_half_header_then_close_and_garbage_flood(target):
    with trio.fail_after(10):
        good = await _healthy(target)
        c = await RawClient.open(target.port)
        await c.send(build_icreq()[:50])
        await c.aclose()
        for _ in range(5):
            c = await RawClient.open(target.port)
            await c.icreq()
            await c.send(bytes(range(256)) * 4)
            await c.expect_term_req()
            await c.aclose()
        await trio.sleep(0.1)
        assert (await good.identify(1)).status == 0
        assert target.stats()["connections"] == 1
