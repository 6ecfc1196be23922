"""HostQueue end to end without sockets: ICResp, reads, writes via R2T, completions, digests and
C2HTermReq, each stream fed whole, coalesced across PDU boundaries, one byte at a time, and
through the zero-copy recv_into path. Every feeding must give the same events and the same data.

Target PDUs are built by hand (tests/helpers/nvme_tcp_wire.py), not by the code under test.
"""

from __future__ import annotations

import struct

import pytest

from helpers.nvme_tcp_wire import (
    COMPLETION, IC_DONE, MODES, SEND, TERM, c2h, c2h_term, connected, dgst, feed, icresp, r2t,
    resp, status,
)
from initiator._errors import LocalProtocolError
from initiator._spec import IoOpcode
from initiator._tcp import DIGEST_ERROR_STATUS, HostQueue

DIGESTS = [(False, False), (True, False), (False, True), (True, True)]
DIGEST_IDS = ["nodgst", "hdgst", "ddgst", "hdgst+ddgst"]


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed * 17 + (i >> 8)) & 0xFF for i in range(n))


def ok(events, err):
    assert err is None, repr(err)
    return events


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


@pytest.fixture(params=DIGESTS, ids=DIGEST_IDS)
def digests(request):
    return request.param


# ---------------------------------------------------------------------------------------------
# Connection set-up

def test_icresp(mode, digests):
    hd, dd = digests
    q = HostQueue(1, 4, hdgst=hd, ddgst=dd)
    events = ok(*feed(q, [icresp(cpda=1, hdgst=hd, ddgst=dd, maxh2cdata=8192)], mode))
    assert events == [(IC_DONE, 8192, 1, hd, dd)]
    assert (q.hdgst, q.ddgst, q.cpda, q.maxh2cdata) == (hd, dd, 1, 8192)


def test_icresp_and_completions_in_one_stream(mode):
    # Without digests commands may be encoded before the ICResp arrives.
    q = HostQueue(1, 4)
    a, b = q.alloc_cid(), q.alloc_cid()
    q.command(a, IoOpcode.FLUSH, 1)
    q.command(b, IoOpcode.FLUSH, 1)
    events = ok(*feed(q, [icresp(), resp(b, dw0=7), resp(a)], mode))
    assert events == [(IC_DONE, 131072, 0, False, False), (COMPLETION, b, 0, 7, 0),
                      (COMPLETION, a, 0, 0, 0)]


def test_c2h_term_req_before_icresp(mode):
    q = HostQueue(1, 4)
    off = bytes(range(24))
    events = ok(*feed(q, [c2h_term(6, 8, off)], mode))
    assert events == [(TERM, 6, 8)]


# ---------------------------------------------------------------------------------------------
# Reads

def test_read_completed_by_c2h_success(mode, digests):
    hd, dd = digests
    q = connected(hdgst=hd, ddgst=dd)
    buf = bytearray(3000)                    # not a multiple of 4: the digest follows unaligned
    cid = q.alloc_cid()
    q.command(cid, IoOpcode.READ, 1, cdw12=5, read_buf=memoryview(buf))
    assert q.outstanding == 1
    data = pattern(3000)
    events = ok(*feed(q, [c2h(cid, 0, data, success=True, hdgst=hd, ddgst=dd)], mode))
    assert events == [(COMPLETION, cid, 0, 0, 0)]
    assert bytes(buf) == data
    assert q.outstanding == 0 and q.active_cids() == []
    assert q.alloc_cid() == cid                # freed, and reused first (LIFO)


def test_read_then_capsule_resp(mode, digests):
    hd, dd = digests
    q = connected(hdgst=hd, ddgst=dd)
    buf = bytearray(512)
    cid = q.alloc_cid()
    q.command(cid, IoOpcode.READ, 1, read_buf=memoryview(buf))
    data = pattern(512, 2)
    events = ok(*feed(q, [c2h(cid, 0, data, hdgst=hd, ddgst=dd),
                          resp(cid, dw0=0x11, dw1=0x22, sqhd=3, sqid=1, hdgst=hd)], mode))
    assert events == [(COMPLETION, cid, 0, 0x11, 0x22)]
    assert bytes(buf) == data
    assert q.outstanding == 0


def test_read_in_several_c2h_pdus_with_padding(mode, digests):
    hd, dd = digests
    q = connected(hdgst=hd, ddgst=dd)
    buf = bytearray(4096)
    cid = q.alloc_cid()
    q.alloc_cid()
    q.command(cid, IoOpcode.READ, 1, cdw12=7, read_buf=memoryview(buf))
    data = pattern(4096, 3)
    pdus = [
        c2h(cid, 0, data[:1000], last=False, hdgst=hd, ddgst=dd),
        c2h(cid, 1000, data[1000:2000], last=False, hdgst=hd, ddgst=dd, pad=8),  # PDO + 8
        c2h(cid, 2000, data[2000:], success=True, hdgst=hd, ddgst=dd, ttag=0x1234),
    ]
    events = ok(*feed(q, pdus, mode))
    assert events == [(COMPLETION, cid, 0, 0, 0)]
    assert bytes(buf) == data


def test_short_read_with_success_is_a_data_transfer_error(mode):
    q = connected()
    buf = bytearray(1024)
    cid = q.alloc_cid()
    q.command(cid, IoOpcode.READ, 1, read_buf=memoryview(buf))
    events = ok(*feed(q, [c2h(cid, 0, pattern(512), success=True)], mode))
    assert events == [(COMPLETION, cid, status(0, 0x04), 0, 0)]   # Data Transfer Error


def test_interleaved_commands(mode, digests):
    hd, dd = digests
    q = connected(hdgst=hd, ddgst=dd, maxh2cdata=4096, in_capsule_max=1024)
    ra, rb = bytearray(2048), bytearray(1024)
    a, b, w, f = (q.alloc_cid() for _ in range(4))
    q.command(a, IoOpcode.READ, 1, read_buf=memoryview(ra))
    q.command(b, IoOpcode.READ, 2, read_buf=memoryview(rb))
    wdata = pattern(5000, 9)
    q.command(w, IoOpcode.WRITE, 1, data=wdata)
    q.command(f, IoOpcode.FLUSH, 1)
    da, db = pattern(2048, 4), pattern(1024, 5)
    pdus = [
        c2h(a, 0, da[:1024], last=False, hdgst=hd, ddgst=dd),
        c2h(b, 0, db, hdgst=hd, ddgst=dd),
        r2t(w, 7, 0, 5000, hdgst=hd),
        resp(f, status(0, 0x02), hdgst=hd),                    # Invalid Field
        c2h(a, 1024, da[1024:], success=True, hdgst=hd, ddgst=dd),
        resp(b, hdgst=hd),
        resp(w, dw0=1, hdgst=hd),
    ]
    events = ok(*feed(q, pdus, mode))
    assert [e[0] for e in events] == [SEND, COMPLETION, COMPLETION, COMPLETION, COMPLETION]
    assert events[1:] == [(COMPLETION, f, status(0, 0x02), 0, 0), (COMPLETION, a, 0, 0, 0),
                          (COMPLETION, b, 0, 0, 0), (COMPLETION, w, 0, 1, 0)]
    assert bytes(ra) == da and bytes(rb) == db
    sent = events[0][1]
    step = 3 if dd else 2
    payloads = sent[1::step]
    assert b"".join(payloads) == wdata and [len(p) for p in payloads] == [4096, 904]
    assert q.outstanding == 0


# ---------------------------------------------------------------------------------------------
# Writes answered by R2T

@pytest.mark.parametrize("maxh2cdata", [4096, 8192, 131072])
def test_write_via_r2t(mode, digests, maxh2cdata):
    hd, dd = digests
    q = connected(hdgst=hd, ddgst=dd, maxh2cdata=maxh2cdata, in_capsule_max=0)
    data = pattern(20000, 6)
    cid = q.alloc_cid()
    q.command(cid, IoOpcode.WRITE, 1, cdw12=39, data=data)
    events = ok(*feed(q, [r2t(cid, 0x4242, 0, 12000, hdgst=hd),
                          r2t(cid, 0x4343, 12000, 8000, hdgst=hd),
                          resp(cid, hdgst=hd)], mode))
    assert [e[0] for e in events] == [SEND, SEND, COMPLETION]
    assert events[2] == (COMPLETION, cid, 0, 0, 0)
    got = bytearray()
    for (_, bufs), (ttag, start, length) in zip(events[:2], [(0x4242, 0, 12000),
                                                             (0x4343, 12000, 8000)]):
        step = 3 if dd else 2
        assert len(bufs) % step == 0
        pdus = [bufs[i:i + step] for i in range(0, len(bufs), step)]
        expect_n = -(-length // maxh2cdata)
        assert len(pdus) == expect_n
        off = start
        for i, p in enumerate(pdus):
            hdr, payload = p[0], p[1]
            ptype, flags, hlen, pdo, plen = struct.unpack_from("<BBBBI", hdr)
            cccid, tt, datao, datal = struct.unpack_from("<HHII", hdr, 8)
            last = i == expect_n - 1
            assert (ptype, hlen, cccid, tt, datao) == (6, 24, cid, ttag, off)
            assert flags == (1 if hd else 0) | (2 if dd else 0) | (4 if last else 0)
            assert datal == len(payload) <= maxh2cdata
            assert pdo == len(hdr) == (28 if hd else 24)
            assert plen == pdo + datal + (4 if dd else 0)
            if hd:
                assert hdr[24:28] == dgst(hdr[:24])
            if dd:
                assert p[2] == dgst(payload)
            assert payload == data[off:off + datal]
            got += payload
            off += datal
        assert off == start + length
    assert bytes(got) == data


def test_write_in_capsule_completes_on_resp(mode):
    q = connected()
    cid = q.alloc_cid()
    q.command(cid, IoOpcode.WRITE, 1, data=pattern(4096))
    assert ok(*feed(q, [resp(cid)], mode)) == [(COMPLETION, cid, 0, 0, 0)]


# ---------------------------------------------------------------------------------------------
# Status and digest errors

def test_error_status_in_capsule_resp(mode, digests):
    hd, dd = digests
    q = connected(hdgst=hd, ddgst=dd)
    cid = q.alloc_cid()
    q.command(cid, IoOpcode.WRITE, 1, data=bytes(512))
    st = status(2, 0x81, dnr=True) | 1                     # Unrecovered Read Error, DNR, phase
    events = ok(*feed(q, [resp(cid, st, hdgst=hd)], mode))
    assert events == [(COMPLETION, cid, st & 0xFFFE, 0, 0)]
    assert q.outstanding == 0


@pytest.mark.parametrize("hd", [False, True])
def test_data_digest_mismatch_with_success(mode, hd):
    q = connected(hdgst=hd, ddgst=True)
    buf = bytearray(1024)
    cid = q.alloc_cid()
    q.command(cid, IoOpcode.READ, 1, read_buf=memoryview(buf))
    events = ok(*feed(q, [c2h(cid, 0, pattern(1024), success=True, hdgst=hd, ddgst=True,
                              bad_ddgst=True)], mode))
    # The command fails; its buffer must not be handed out (the shell raises DigestError).
    assert events == [(COMPLETION, cid, DIGEST_ERROR_STATUS, 0, 0)]
    assert q.outstanding == 0


def test_data_digest_mismatch_then_capsule_resp(mode):
    q = connected(ddgst=True)
    buf = bytearray(2048)
    cid = q.alloc_cid()
    q.command(cid, IoOpcode.READ, 1, read_buf=memoryview(buf))
    data = pattern(2048)
    events = ok(*feed(q, [c2h(cid, 0, data[:1024], last=False, ddgst=True, bad_ddgst=True),
                          c2h(cid, 1024, data[1024:], ddgst=True),
                          resp(cid, dw0=9)], mode))
    assert events == [(COMPLETION, cid, DIGEST_ERROR_STATUS, 9, 0)]


def test_data_digest_mismatch_keeps_an_nvme_error_status(mode):
    q = connected(ddgst=True)
    cid = q.alloc_cid()
    q.command(cid, IoOpcode.READ, 1, read_buf=memoryview(bytearray(64)))
    st = status(0, 0x06)
    events = ok(*feed(q, [c2h(cid, 0, bytes(64), ddgst=True, bad_ddgst=True), resp(cid, st)],
                      mode))
    assert events == [(COMPLETION, cid, st, 0, 0)]


def test_digest_error_flag_does_not_leak_to_the_next_command(mode):
    q = connected(ddgst=True)
    cid = q.alloc_cid()
    q.command(cid, IoOpcode.READ, 1, read_buf=memoryview(bytearray(64)))
    feed(q, [c2h(cid, 0, bytes(64), success=True, ddgst=True, bad_ddgst=True)], "whole")
    assert q.alloc_cid() == cid
    buf = bytearray(64)
    q.command(cid, IoOpcode.READ, 1, read_buf=memoryview(buf))
    events = ok(*feed(q, [c2h(cid, 0, pattern(64), success=True, ddgst=True)], mode))
    assert events == [(COMPLETION, cid, 0, 0, 0)] and bytes(buf) == pattern(64)


def test_c2h_term_req_is_a_term_event(mode, digests):
    hd, dd = digests
    q = connected(hdgst=hd, ddgst=dd)
    cid = q.alloc_cid()
    q.command(cid, IoOpcode.FLUSH, 1)
    offending = bytes(range(24))
    events = ok(*feed(q, [resp(cid, hdgst=hd), c2h_term(3, 0, offending)], mode))
    assert events == [(COMPLETION, cid, 0, 0, 0), (TERM, 3, 0)]


def test_c2h_term_req_with_a_long_header(mode):
    q = connected()
    events = ok(*feed(q, [c2h_term(1, 2, bytes(128))], mode))       # PLEN 152, the maximum
    assert events == [(TERM, 1, 2)]


# ---------------------------------------------------------------------------------------------
# Command slots (local misuse is a LocalProtocolError)

def test_cid_allocation_and_release():
    q = connected(depth=3)
    cids = [q.alloc_cid() for _ in range(3)]
    assert cids == [0, 1, 2] and q.alloc_cid() == -1
    q.release_cid(1)
    assert q.alloc_cid() == 1
    q.command(2, IoOpcode.FLUSH, 1)
    with pytest.raises(LocalProtocolError):
        q.release_cid(2)
    with pytest.raises(LocalProtocolError):
        q.command(2, IoOpcode.FLUSH, 1)
    q.command(0, IoOpcode.FLUSH, 1)
    assert q.active_cids() == [0, 2]
    assert q.fail_all() == [0, 2]
    assert q.outstanding == 0 and q.active_cids() == []


@pytest.mark.parametrize("depth", [0, 65536])
def test_depth_out_of_range(depth):
    with pytest.raises(LocalProtocolError):
        HostQueue(1, depth)


def test_large_read_streams_straight_into_the_buffer():
    # A 1 MiB C2HData never has to fit in the 256 KiB receive buffer: the payload goes to the sink.
    q = connected()
    buf = bytearray(1 << 20)
    cid = q.alloc_cid()
    q.command(cid, IoOpcode.READ, 1, read_buf=memoryview(buf))
    data = pattern(1 << 20, 7)
    stream = c2h(cid, 0, data, success=True)
    events = []
    for i in range(0, len(stream), 65536):
        q.receive_data(stream[i:i + 65536])
        while (ev := q.next_event()) is not None:
            events.append(ev)
    assert events == [(COMPLETION, cid, 0, 0, 0)]
    assert buf == data


def test_a_large_c2hdata_arriving_in_pieces_is_streamed_and_finished_by_the_hot_path():
    """completions() starts streaming a large plain C2HData from its header (the general
    parser and sink resolver never see it), the rest of the payload goes straight into the
    destination (payload_sink), bytes left in the receive buffer are moved into it, and a later
    completions() call finishes the read and goes on with the PDUs behind it."""
    q = connected()
    resolved = []
    general = q.rx.sink_resolver
    q.rx.sink_resolver = lambda *a: resolved.append(a) or general(*a)
    n = 65536
    big = memoryview(bytearray(n))
    small = memoryview(bytearray(512))
    cid, cid2 = q.alloc_cid(), q.alloc_cid()
    q.command(cid, IoOpcode.READ, 1, read_buf=big)
    q.command(cid2, IoOpcode.READ, 1, read_buf=small)
    data = pattern(n, 3)
    stream = c2h(cid, 0, data, success=True) + c2h(cid2, 0, pattern(512, 4), success=True)
    done: list = []
    q.receive_data(stream[:24 + 1000])                  # the header and some payload
    assert q.completions(done) == 0 and q.cut == -1 and q.next_event() is None
    sink = q.rx.payload_sink()                           # the rest: straight into `big`
    assert sink is not None and len(sink) == n - 1000
    sink[:30000] = data[1000:31000]
    q.rx.received_into_sink(30000)
    assert q.completions(done) == 0 and q.cut == -1
    q.receive_data(stream[24 + 31000:])                  # the rest in the buffer, then cid2
    assert q.completions(done) == 2 and done == [cid, cid2] and q.cut == 0
    assert bytes(big) == data and bytes(small) == pattern(512, 4)
    assert resolved == [] and q.outstanding == 0 and q.next_event() is None and q.streamed == 1
    assert q.rx.pdus_received == 3                       # ICResp and the two C2HData
