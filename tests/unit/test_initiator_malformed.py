"""Every malformed PDU the host can receive maps to RemoteProtocolError with the TermReq FES/FEI
of NVMe/TCP 1.0 3.6.2.4 (FEI = byte offset of the offending header field for FES 01h/06h), fed
whole, coalesced with the next PDU, byte by byte and via recv_into; the receiver then stays in
ERROR; and `HostQueue.term_req(err)` answers with an H2CTermReq carrying FES, FEI and the
offending PDU header (and nothing else).
"""

from __future__ import annotations

import struct

import pytest

from helpers.nvme_tcp_wire import (
    C2H, C2H_TERM, CMD, F_DDGST, F_HDGST, F_LAST, F_SUCCESS, H2C, H2C_TERM, IC_REQ, IC_RESP,
    MODES, R2T, RESP, c2h, ch, connected, dgst, feed, icresp, r2t, resp,
)
from initiator._errors import LocalProtocolError, RemoteProtocolError
from initiator._spec import IoOpcode
from initiator._tcp import HostQueue

FES_HDR, FES_SEQ, FES_HDGST, FES_RANGE, FES_PARAM = 1, 2, 3, 4, 6

READ_CID, WRITE_CID, FLUSH_CID, IDLE_CID = 0, 1, 2, 5
DEPTH = 8


def queue(*, hdgst=False, ddgst=False):
    """Connected; outstanding: a 1 KiB read (CID 0), an 8 KiB write awaiting R2T (CID 1) and a
    flush (CID 2)."""
    q = connected(hdgst=hdgst, ddgst=ddgst, depth=DEPTH, in_capsule_max=0, maxh2cdata=4096)
    for _ in range(3):
        q.alloc_cid()
    q.command(READ_CID, IoOpcode.READ, 1, read_buf=memoryview(bytearray(1024)))
    q.command(WRITE_CID, IoOpcode.WRITE, 1, data=bytes(8192))
    q.command(FLUSH_CID, IoOpcode.FLUSH, 1)
    return q


def fresh(*, hdgst=False, ddgst=False):
    return HostQueue(1, DEPTH, hdgst=hdgst, ddgst=ddgst)


def data_hdr(ptype, flags, hlen, pdo, plen, cid, datao, datal, ttag=0):
    return ch(ptype, flags, hlen, pdo, plen) + struct.pack("<HHIII", cid, ttag, datao, datal, 0)


def corrupt_digest(p: bytes, at: int) -> bytes:
    return p[:at] + bytes([p[at] ^ 0xFF]) + p[at + 1:]


# (id, queue factory kwargs and kind, PDUs fed first, the bad PDU, FES, FEI)
CASES = [
    # -- PDU type (FEI 0: the PDU-type byte)
    ("type-08-reserved", "conn", {}, [], ch(0x08, 0, 24, 0, 24) + bytes(16), FES_HDR, 0),
    ("type-ff", "conn", {}, [], ch(0xFF, 0, 24, 0, 24) + bytes(16), FES_HDR, 0),
    ("icreq-to-host", "fresh", {}, [], ch(IC_REQ, 0, 128, 0, 128) + bytes(120), FES_HDR, 0),
    ("capsule-cmd-to-host", "conn", {}, [], ch(CMD, 0, 72, 0, 72) + bytes(64), FES_HDR, 0),
    ("h2c-data-to-host", "conn", {}, [], data_hdr(H2C, F_LAST, 24, 24, 28, 0, 0, 4) + bytes(4),
     FES_HDR, 0),
    ("h2c-term-to-host", "conn", {}, [], ch(H2C_TERM, 0, 24, 0, 24) + bytes(16), FES_HDR, 0),
    # -- sequence: the IC exchange comes first and only once
    ("icresp-after-ic", "conn", {}, [], icresp(), FES_SEQ, 0),
    ("resp-before-ic", "fresh", {}, [], resp(0), FES_SEQ, 0),
    ("c2h-before-ic", "fresh", {}, [], c2h(0, 0, bytes(8)), FES_SEQ, 0),
    ("r2t-before-ic", "fresh", {}, [], r2t(1, 0, 0, 8), FES_SEQ, 0),
    # -- HLEN (FEI 2)
    ("hlen-resp-23", "conn", {}, [], ch(RESP, 0, 23, 0, 24) + bytes(16), FES_HDR, 2),
    ("hlen-resp-128", "conn", {}, [], ch(RESP, 0, 128, 0, 128) + bytes(120), FES_HDR, 2),
    ("hlen-c2h-28", "conn", {}, [], data_hdr(C2H, F_LAST, 28, 28, 32, 0, 0, 4) + bytes(8),
     FES_HDR, 2),
    ("hlen-r2t-16", "conn", {}, [], ch(R2T, 0, 16, 0, 24) + bytes(16), FES_HDR, 2),
    ("hlen-icresp-127", "fresh", {}, [], ch(IC_RESP, 0, 127, 0, 128) + bytes(120), FES_HDR, 2),
    ("hlen-c2h-term-28", "conn", {}, [], ch(C2H_TERM, 0, 28, 0, 28) + bytes(20), FES_HDR, 2),
    # -- PDO (FEI 3)
    ("pdo-resp-24", "conn", {}, [], ch(RESP, 0, 24, 24, 24) + bytes(16), FES_HDR, 3),
    ("pdo-r2t-4", "conn", {}, [], ch(R2T, 0, 24, 4, 24) + bytes(16), FES_HDR, 3),
    ("pdo-icresp-8", "fresh", {}, [], ch(IC_RESP, 0, 128, 8, 128) + bytes(120), FES_HDR, 3),
    ("pdo-c2h-inside-header", "conn", {}, [],
     data_hdr(C2H, F_LAST, 24, 20, 28, 0, 0, 8) + bytes(4), FES_HDR, 3),
    ("pdo-c2h-zero-with-data", "conn", {}, [],
     data_hdr(C2H, F_LAST, 24, 0, 32, 0, 0, 8) + bytes(8), FES_HDR, 3),
    ("pdo-c2h-misaligned", "conn", {}, [],
     data_hdr(C2H, F_LAST, 24, 26, 34, 0, 0, 8) + bytes(10), FES_HDR, 3),
    ("pdo-c2h-beyond-plen", "conn", {}, [],
     data_hdr(C2H, F_LAST, 24, 64, 32, 0, 0, 8) + bytes(8), FES_HDR, 3),
    ("pdo-c2h-hdgst-not-left-room", "conn", {"hdgst": True}, [],
     (lambda hdr: hdr + dgst(hdr) + bytes(4))(data_hdr(C2H, F_LAST | F_HDGST, 24, 24, 32, 0, 0, 8)),
     FES_HDR, 3),
    # -- PLEN (FEI 4)
    ("plen-resp-28-no-hdgst", "conn", {}, [], ch(RESP, 0, 24, 0, 28) + bytes(20), FES_HDR, 4),
    ("plen-resp-20", "conn", {}, [], ch(RESP, 0, 24, 0, 20) + bytes(16), FES_HDR, 4),
    ("plen-r2t-32", "conn", {}, [], ch(R2T, 0, 24, 0, 32) + bytes(24), FES_HDR, 4),
    ("plen-resp-hdgst-24", "conn", {"hdgst": True}, [],
     ch(RESP, F_HDGST, 24, 0, 24) + bytes(16), FES_HDR, 4),
    ("plen-icresp-132", "fresh", {}, [], ch(IC_RESP, 0, 128, 0, 132) + bytes(124), FES_HDR, 4),
    ("plen-c2h-only-ddgst", "conn", {"ddgst": True}, [],
     data_hdr(C2H, F_LAST | F_DDGST, 24, 24, 28, 0, 0, 0) + bytes(4), FES_HDR, 4),
    ("plen-c2h-term-23", "conn", {}, [], ch(C2H_TERM, 0, 24, 0, 23) + bytes(16), FES_HDR, 4),
    ("plen-c2h-term-153", "conn", {}, [], ch(C2H_TERM, 0, 24, 0, 153) + bytes(145), FES_HDR, 4),
    # -- flags (FEI 1): digests present iff negotiated; SUCCESS only with LAST_PDU
    ("hdgstf-set-not-negotiated", "conn", {}, [],
     (lambda hdr: hdr + dgst(hdr))(
         ch(RESP, F_HDGST, 24, 0, 28) + struct.pack("<IIHHHH", 0, 0, 0, 0, FLUSH_CID, 0)),
     FES_HDR, 1),
    ("hdgstf-clear-negotiated", "conn", {"hdgst": True}, [], resp(FLUSH_CID), FES_HDR, 1),
    ("hdgstf-clear-negotiated-r2t", "conn", {"hdgst": True}, [], r2t(WRITE_CID, 0, 0, 8),
     FES_HDR, 1),
    ("ddgstf-set-not-negotiated", "conn", {}, [],
     data_hdr(C2H, F_LAST | F_DDGST, 24, 24, 36, 0, 0, 8) + bytes(12), FES_HDR, 1),
    ("ddgstf-clear-negotiated", "conn", {"ddgst": True}, [], c2h(READ_CID, 0, bytes(8)),
     FES_HDR, 1),
    ("success-without-last", "conn", {}, [],
     data_hdr(C2H, F_SUCCESS, 24, 24, 32, 0, 0, 8) + bytes(8), FES_HDR, 1),
    # -- header digest (FES 3)
    ("hdgst-bad-resp", "conn", {"hdgst": True}, [], corrupt_digest(resp(FLUSH_CID, hdgst=True), 25),
     FES_HDGST, 0),
    ("hdgst-bad-r2t", "conn", {"hdgst": True}, [],
     corrupt_digest(r2t(WRITE_CID, 0, 0, 8, hdgst=True), 27), FES_HDGST, 0),
    ("hdgst-bad-c2h", "conn", {"hdgst": True, "ddgst": True}, [],
     corrupt_digest(c2h(READ_CID, 0, bytes(8), hdgst=True, ddgst=True), 24), FES_HDGST, 0),
    ("hdgst-header-changed", "conn", {"hdgst": True}, [],
     corrupt_digest(resp(FLUSH_CID, hdgst=True), 8), FES_HDGST, 0),
    # -- DATAL must match the PDU length (NVMe/TCP 3.6.2.9)
    ("datal-too-big", "conn", {}, [], data_hdr(C2H, F_LAST, 24, 24, 32, 0, 0, 9) + bytes(8),
     FES_HDR, 4),
    ("datal-too-small", "conn", {}, [], data_hdr(C2H, F_LAST, 24, 24, 32, 0, 0, 4) + bytes(8),
     FES_HDR, 4),
    # -- C2HData for a command that cannot take it
    ("c2h-idle-cid", "conn", {}, [], c2h(IDLE_CID, 0, bytes(8)), FES_HDR, 8),
    ("c2h-cid-beyond-depth", "conn", {}, [], c2h(999, 0, bytes(8)), FES_HDR, 8),
    ("c2h-wrong-datao", "conn", {}, [], c2h(READ_CID, 512, bytes(8)), FES_RANGE, None),
    ("c2h-repeated-datao", "conn", {}, [c2h(READ_CID, 0, bytes(512), last=False)],
     c2h(READ_CID, 0, bytes(8)), FES_RANGE, None),
    ("c2h-beyond-buffer", "conn", {}, [], c2h(READ_CID, 0, bytes(1028)), FES_RANGE, None),
    ("c2h-for-a-write", "conn", {}, [], c2h(WRITE_CID, 0, bytes(8)), FES_RANGE, None),
    ("c2h-for-a-flush", "conn", {}, [], c2h(FLUSH_CID, 0, bytes(8)), FES_RANGE, None),
    ("c2h-after-completion", "conn", {}, [c2h(READ_CID, 0, bytes(1024), success=True)],
     c2h(READ_CID, 0, bytes(8)), FES_HDR, 8),
    # -- R2T (NVMe/TCP 3.6.2.10)
    ("r2t-for-a-read", "conn", {}, [], r2t(READ_CID, 0, 0, 8), FES_HDR, 8),
    ("r2t-for-a-flush", "conn", {}, [], r2t(FLUSH_CID, 0, 0, 8), FES_HDR, 8),
    ("r2t-idle-cid", "conn", {}, [], r2t(IDLE_CID, 0, 0, 8), FES_HDR, 8),
    ("r2t-cid-beyond-depth", "conn", {}, [], r2t(0xFFFF, 0, 0, 8), FES_HDR, 8),
    ("r2t-beyond-transfer", "conn", {}, [], r2t(WRITE_CID, 0, 0, 8193), FES_RANGE, None),
    ("r2t-beyond-transfer-2", "conn", {}, [r2t(WRITE_CID, 0, 0, 4096)],
     r2t(WRITE_CID, 0, 4096, 4097), FES_RANGE, None),
    ("r2t-zero-length", "conn", {}, [], r2t(WRITE_CID, 0, 0, 0), FES_RANGE, None),
    ("r2t-out-of-order", "conn", {}, [], r2t(WRITE_CID, 0, 4096, 4096), FES_RANGE, None),
    ("r2t-repeated", "conn", {}, [r2t(WRITE_CID, 0, 0, 4096)], r2t(WRITE_CID, 0, 0, 4096),
     FES_RANGE, None),
    # -- CapsuleResp for a CID with nothing outstanding (FEI 20: the CQE's CID)
    ("resp-idle-cid", "conn", {}, [], resp(IDLE_CID), FES_HDR, 20),
    ("resp-cid-beyond-depth", "conn", {}, [], resp(1000), FES_HDR, 20),
    ("resp-twice", "conn", {}, [resp(FLUSH_CID)], resp(FLUSH_CID), FES_HDR, 20),
    # -- ICResp parameters (NVMe/TCP 3.6.2.3)
    ("icresp-pfv-1", "fresh", {}, [], icresp(pfv=1), FES_PARAM, 8),
    ("icresp-cpda-32", "fresh", {}, [], icresp(cpda=32), FES_HDR, 10),
    ("icresp-maxh2cdata-4092", "fresh", {}, [], icresp(maxh2cdata=4092), FES_HDR, 12),
    ("icresp-maxh2cdata-4098", "fresh", {}, [], icresp(maxh2cdata=4098), FES_HDR, 12),
    ("icresp-maxh2cdata-0", "fresh", {}, [], icresp(maxh2cdata=0), FES_HDR, 12),
    ("icresp-hdgst-not-echoed", "fresh", {"hdgst": True}, [], icresp(), FES_HDR, 11),
    ("icresp-ddgst-not-asked", "fresh", {}, [], icresp(ddgst=True), FES_HDR, 11),
]


def _make(kind, kw):
    return queue(**kw) if kind == "conn" else fresh(**kw)


def _trailer(kind, kw):
    """A valid PDU that follows the bad one in the same stream."""
    if kind == "fresh":
        return icresp(hdgst=kw.get("hdgst", False), ddgst=kw.get("ddgst", False))
    return resp(FLUSH_CID, hdgst=kw.get("hdgst", False))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,kind,kw,before,bad,fes,fei", CASES, ids=[c[0] for c in CASES])
def test_malformed(name, kind, kw, before, bad, fes, fei, mode):
    q = _make(kind, kw)
    trailer = _trailer(kind, kw)
    events, err = feed(q, [*before, bad, trailer], mode)
    assert isinstance(err, RemoteProtocolError), (events, err)
    assert err.fes == fes
    if fei is not None:
        assert err.fei == fei
    # Everything before the bad PDU was handled; nothing after it was.
    assert len(events) == len([p for p in before if p[0] in (R2T, RESP) or p[1] & F_SUCCESS])
    # The TermReq carries the offending PDU's header: at least its common header, at most
    # min(HLEN, 128) bytes, and never bytes of a later PDU.
    assert 8 <= len(err.header) <= 128
    if bad[2] <= len(bad):
        assert bad.startswith(err.header)
        assert len(err.header) <= bad[2]
    if mode == "whole" and bad[2] <= len(bad):
        # With the whole PDU at hand: the complete header (HLEN bytes, at most 128).
        assert err.header == bad[:min(bad[2], 128)]
    # The receiver is now in ERROR for good: more valid bytes do not bring it back.
    q.receive_data(trailer)
    with pytest.raises(LocalProtocolError):
        q.next_event()
    with pytest.raises(LocalProtocolError):
        q.next_event()


@pytest.mark.parametrize("name,kind,kw,before,bad,fes,fei", CASES, ids=[c[0] for c in CASES])
def test_term_req_answers_the_error(name, kind, kw, before, bad, fes, fei):
    q = _make(kind, kw)
    _, err = feed(q, [*before, bad], "whole")
    assert isinstance(err, RemoteProtocolError)
    s = q.term_req(err)
    hdr = err.header
    ptype, flags, hlen, pdo, plen = struct.unpack_from("<BBBBI", s)
    assert (ptype, flags, hlen, pdo, plen) == (0x02, 0, 24, 0, 24 + len(hdr))
    wire_fes, wire_fei = struct.unpack_from("<HI", s, 8)
    assert wire_fes == fes
    # NVMe/TCP 3.6.2.4: FEI is the field offset for FES 01h/06h and reserved (zero) otherwise.
    assert wire_fei == (err.fei if fes in (FES_HDR, FES_PARAM) else 0)
    if fei is not None:
        assert wire_fei == fei
    assert s[14:24] == bytes(10)
    assert s[24:] == hdr and 24 <= len(s) <= 152


def test_term_req_golden_for_a_bad_hlen():
    q = queue()
    bad = ch(RESP, 0, 23, 0, 24) + struct.pack("<IIHHHH", 0, 0, 0, 0, FLUSH_CID, 0)
    q.receive_data(bad)
    with pytest.raises(RemoteProtocolError) as ei:
        q.next_event()
    assert q.term_req(ei.value) == bytes.fromhex(
        "02 00 18 00 2f000000 0100 02000000 00000000000000000000".replace(" ", "")) + bad[:23]


def test_term_req_golden_for_a_data_transfer_out_of_range():
    q = queue()
    bad = c2h(READ_CID, 512, bytes(8))
    q.receive_data(bad)
    with pytest.raises(RemoteProtocolError) as ei:
        q.next_event()
    assert q.term_req(ei.value) == bytes.fromhex(
        "02 00 18 00 30000000 0400 00000000 00000000000000000000".replace(" ", "")) + bad[:24]


def test_partial_header_is_not_an_error_yet():
    # Only the common header has arrived: CH checks run, the rest waits for more bytes.
    q = queue(hdgst=True)
    good = resp(FLUSH_CID, hdgst=True)
    for i in range(len(good) - 1):
        q.receive_data(good[i:i + 1])
        assert q.next_event() is None
    q.receive_data(good[-1:])
    assert q.next_event() == (0, FLUSH_CID, 0, 0, 0)
