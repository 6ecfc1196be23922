"""Sans-IO NVMe/TCP receive framing: bytes in, validated PDUs out.

Theory of operation
-------------------
`PduReceiver` owns one preallocated receive buffer. The shell either copies bytes in with
`receive_data(data)` or, without a copy, asks `buffer()` for the free region, `recv_into`s it and
reports `received(n)`. `next_pdu()` then returns one PDU at a time as a tuple

    (pdu_type, flags, header, data, data_digest_ok)

or None when more bytes are needed. `header` is the PDU header (common header included, so byte
offsets match the specification; header digest and padding excluded); `data` is the payload or
None. Both are memoryviews into the receive buffer, valid only until the next call to `buffer()` /
`receive_data()`: parse them first.

Data PDUs (H2CData, C2HData) can stream straight into their destination: the owner sets
`sink_resolver(pdu_type, header) -> memoryview | None`; a returned view of exactly `datal` bytes
receives the payload as it arrives (the receive buffer never has to hold a large PDU), and the
PDU is returned with that view as `data` once it and its digest are complete.

Every check here is a rule of NVMe/TCP 1.0 section 3.6 (quoted where enforced). A violation
raises RemoteProtocolError(fes, fei) naming the offending header field and moves the receiver to
a terminal ERROR state: the owner answers with a TermReq and closes (NVMe/TCP 3.6.2.9).
A data digest mismatch is not fatal here: the PDU is returned with data_digest_ok False so the
owner can fail that one command (as the Linux host does) and never hand its data out.

Does not: send anything, track commands, or know which side of the connection it is.
"""

from __future__ import annotations

from typing import Callable

from ._errors import LocalProtocolError, RemoteProtocolError
from ._pdu import CH, DATA_HDR, DDGSTF, DIGEST, HAS_DATA, HAS_HDGST, HDGSTF, HLEN, LAST_PDU, \
    SUCCESS, TERM_REQ_MAX_PLEN
from ._spec import PduType, TermReqFes

import crc32c as _crc32c

_crc = _crc32c.crc32c

ST_HEADER = 0
ST_PAYLOAD = 1
ST_ERROR = 2

HOST_ACCEPTS = frozenset({PduType.IC_RESP, PduType.C2H_TERM_REQ, PduType.CAPSULE_RESP,
                          PduType.C2H_DATA, PduType.R2T})
TARGET_ACCEPTS = frozenset({PduType.IC_REQ, PduType.H2C_TERM_REQ, PduType.CAPSULE_CMD,
                            PduType.H2C_DATA})
_IC_TYPES = (PduType.IC_REQ, PduType.IC_RESP)
_TERM_TYPES = (PduType.H2C_TERM_REQ, PduType.C2H_TERM_REQ)
_DATA_TYPES = (PduType.H2C_DATA, PduType.C2H_DATA)

RECV_CHUNK = 64 * 1024   # cap per recv so completions are handed out while data still arrives


def _quoted(mv, r: int, avail: int, hlen: int):
    """The header a TermReq quotes (NVMe/TCP 3.6.2.4): the offending PDU's HLEN bytes, at most
    128 and at least its common header; never its payload or the next PDU, whatever recv()
    happened to coalesce. Only built on the error path."""
    return mv[r:r + min(avail, max(hlen, 8), 128)]


class PduReceiver:
    __slots__ = ("_accepts", "_buf", "_mv", "_r", "_w", "_cap", "_state", "hdgst", "ddgst",
                 "ic_done", "pda", "max_capsule_data", "sink_resolver", "_sink", "_sink_pos",
                 "_pad", "_dd", "_crc", "_cur", "_max_cap", "pdus_received")

    def __init__(self, accepts: frozenset, *, bufsize: int = 256 * 1024,
                 max_capsule_data: int = 16384):
        self._accepts = accepts
        self._cap = bufsize
        self._max_cap = max(bufsize, TERM_REQ_MAX_PLEN + 256, 72 + 8 + max_capsule_data + 256)
        self._buf = bytearray(bufsize)
        self._mv = memoryview(self._buf)
        self._r = 0
        self._w = 0
        self._state = ST_HEADER
        self.hdgst = False
        self.ddgst = False
        self.ic_done = False
        self.pda = 0                      # the peer's required data alignment is ours to check: HPDA/CPDA we sent
        self.max_capsule_data = max_capsule_data
        self.sink_resolver: Callable | None = None
        self._sink = None
        self._sink_pos = 0
        self._pad = 0
        self._dd = 0
        self._crc = 0
        self._cur = None
        self.pdus_received = 0

    # -- feeding ---------------------------------------------------------------------------
    def buffer(self) -> memoryview:
        """The free region to `recv_into`; compacts consumed bytes first."""
        r, w = self._r, self._w
        if r == w:
            self._r = self._w = r = w = 0
        elif self._cap - w < RECV_CHUNK and r:
            self._buf[:w - r] = self._mv[r:w]
            self._w = w = w - r
            self._r = r = 0
        end = min(self._cap, w + RECV_CHUNK)
        return self._mv[w:end]

    def received(self, n: int) -> None:
        self._w += n

    def receive_data(self, data) -> None:
        """Copy `data` in (tests, and peers that hand over bytes)."""
        data = memoryview(data)
        while len(data):
            room = self.buffer()
            if not len(room):
                self._grow(self._w - self._r + len(data))
                continue
            n = min(len(room), len(data))
            room[:n] = data[:n]
            self._w += n
            data = data[n:]

    def payload_sink(self) -> memoryview | None:
        """While streaming a data PDU with nothing buffered: the caller's destination, to
        `recv_into` directly (zero copy). Report with `received_into_sink(n)`."""
        if self._state == ST_PAYLOAD and self._r == self._w and self._pad == 0:
            sink = self._sink
            if sink is not None and self._sink_pos < len(sink):
                return sink[self._sink_pos:]
        return None

    def received_into_sink(self, n: int) -> None:
        if self._dd:
            self._crc = _crc(self._sink[self._sink_pos:self._sink_pos + n], self._crc)
        self._sink_pos += n

    def buffered(self) -> int:
        return self._w - self._r

    def _grow(self, need: int) -> None:
        if need > self._max_cap:
            raise LocalProtocolError("receive buffer limit exceeded")
        newcap = max(need, self._cap * 2)
        nb = bytearray(newcap)
        nb[:self._w - self._r] = self._mv[self._r:self._w]
        self._w -= self._r
        self._r = 0
        self._buf, self._mv, self._cap = nb, memoryview(nb), newcap

    # -- parsing ---------------------------------------------------------------------------
    def _fail(self, msg: str, fes: int, fei: int, header=b""):
        self._state = ST_ERROR
        raise RemoteProtocolError(msg, fes, fei, bytes(header))

    def next_pdu(self):
        if self._state == ST_PAYLOAD:
            return self.continue_payload()
        if self._state == ST_ERROR:
            raise LocalProtocolError("receiver is in the ERROR state")
        r = self._r
        avail = self._w - r
        if avail < 8:
            return None
        mv = self._mv
        ptype, flags, hlen, pdo, plen = CH.unpack_from(mv, r)
        if ptype not in self._accepts:
            self._fail(f"unexpected PDU type 0x{ptype:02x}", TermReqFes.INVALID_HEADER_FIELD, 0,
                       _quoted(mv, r, avail, hlen))
        # NVMe/TCP 3.3: "the ICReq/ICResp exchange ... shall be the first PDUs" and never repeat.
        if (ptype in _IC_TYPES) == self.ic_done and ptype not in _TERM_TYPES:
            self._fail(f"PDU type 0x{ptype:02x} out of sequence", TermReqFes.PDU_SEQUENCE_ERROR, 0,
                       _quoted(mv, r, avail, hlen))
        # NVMe/TCP 3.6.1: HLEN is fixed per PDU type.
        if hlen != HLEN[ptype]:
            self._fail(f"bad HLEN {hlen} for PDU type 0x{ptype:02x}", TermReqFes.INVALID_HEADER_FIELD,
                       2, _quoted(mv, r, avail, hlen))
        hd = 4 if (self.hdgst and ptype in HAS_HDGST) else 0
        # NVMe/TCP 3.6.1: HDGSTF "shall be set" when header digests were negotiated, and clear otherwise.
        if ptype in HAS_HDGST and bool(flags & HDGSTF) != self.hdgst:
            self._fail("HDGSTF does not match the negotiated header digest",
                       TermReqFes.INVALID_HEADER_FIELD, 1, _quoted(mv, r, avail, hlen))
        if ptype in _TERM_TYPES:
            if not 24 <= plen <= TERM_REQ_MAX_PLEN:
                self._fail(f"TermReq PLEN {plen} out of range", TermReqFes.INVALID_HEADER_FIELD, 4,
                           _quoted(mv, r, avail, hlen))
        hend = hlen + hd
        if ptype in HAS_DATA and plen > hend:
            # PDO must leave room for the header (and digest) and meet our PDA (NVMe/TCP 3.6.1).
            if pdo < hend or pdo % ((self.pda + 1) * 4) or pdo > plen:
                self._fail(f"bad PDO {pdo}", TermReqFes.INVALID_HEADER_FIELD, 3,
                           _quoted(mv, r, avail, hlen))
            dd = 4 if self.ddgst else 0
            if bool(flags & DDGSTF) != self.ddgst:
                self._fail("DDGSTF does not match the negotiated data digest",
                           TermReqFes.INVALID_HEADER_FIELD, 1, _quoted(mv, r, avail, hlen))
            dlen = plen - pdo - dd
            if dlen <= 0:
                self._fail(f"bad PLEN {plen}", TermReqFes.INVALID_HEADER_FIELD, 4,
                           _quoted(mv, r, avail, hlen))
        else:
            if pdo != 0 and ptype not in _TERM_TYPES:
                self._fail(f"bad PDO {pdo}", TermReqFes.INVALID_HEADER_FIELD, 3,
                           _quoted(mv, r, avail, hlen))
            if ptype not in _TERM_TYPES and plen != hend:
                self._fail(f"bad PLEN {plen} for PDU type 0x{ptype:02x}",
                           TermReqFes.INVALID_HEADER_FIELD, 4, _quoted(mv, r, avail, hlen))
            dd = 0
            dlen = plen - hend if ptype in _TERM_TYPES else 0
            pdo = hend
        if ptype in _DATA_TYPES:
            # SUCCESS "shall not be set" unless LAST_PDU is (NVMe/TCP 3.6.2.9); only C2H has it.
            if flags & SUCCESS and (ptype != PduType.C2H_DATA or not flags & LAST_PDU):
                self._fail("SUCCESS flag without LAST_PDU", TermReqFes.INVALID_HEADER_FIELD, 1,
                           _quoted(mv, r, avail, hlen))
        if avail < hend:
            return None
        if hd:
            # NVMe/TCP 3.6.1: HDGST is CRC32C over the header.
            if _crc(mv[r:r + hlen]) != DIGEST.unpack_from(mv, r + hlen)[0]:
                self._fail("header digest mismatch", TermReqFes.HEADER_DIGEST_ERROR, 0,
                           mv[r:r + hlen])
        if ptype in _DATA_TYPES:
            datal = DATA_HDR.unpack_from(mv, r)[8]
            if datal != dlen:
                self._fail(f"DATAL {datal} does not match PLEN", TermReqFes.INVALID_HEADER_FIELD, 4,
                           mv[r:r + hlen])
            resolver = self.sink_resolver
            if resolver is not None:
                try:
                    sink = resolver(ptype, mv[r:r + hlen])   # may raise RemoteProtocolError
                except RemoteProtocolError:
                    self._state = ST_ERROR   # the owner's verdict is as fatal as ours
                    raise
                if sink is not None:
                    if len(sink) != dlen:
                        raise LocalProtocolError("sink length differs from DATAL")
                    self.stream(ptype, flags, bytes(mv[r:r + hlen]), r + hend, pdo - hend,
                                sink, dd)
                    return self.continue_payload()
        elif ptype == PduType.CAPSULE_CMD and dlen > self.max_capsule_data:
            self._fail(f"in-capsule data {dlen} exceeds the limit",
                       TermReqFes.DATA_TRANSFER_LIMIT_EXCEEDED, 4, mv[r:r + hlen])
        if avail < plen:
            if plen > self._cap:
                self._grow(plen)
            return None
        self._r = r + plen
        self.pdus_received += 1
        hdr = mv[r:r + hlen]
        if not dlen:
            return (ptype, flags, hdr, None, True)
        data = mv[r + pdo:r + pdo + dlen]
        ok = True
        if dd:
            ok = _crc(data) == DIGEST.unpack_from(mv, r + pdo + dlen)[0]
        return (ptype, flags, hdr, data, ok)

    def stream(self, ptype: int, flags: int, header: bytes, r: int, pad: int, sink,
               dd: int) -> None:
        """Stream the payload of the data PDU whose validated `header` ends at buffer offset
        `r` (padding `pad`, data digest `dd` bytes) into `sink`: the state next_pdu sets up for
        a resolved sink, also for an owner that validated the header itself (the host's hot
        path). `continue_payload()` then moves what is buffered and finishes the PDU."""
        self._cur = (ptype, flags, header)
        self._r = r
        self._pad = pad
        self._sink = sink
        self._sink_pos = 0
        self._dd = dd
        self._crc = 0
        self._state = ST_PAYLOAD

    def continue_payload(self):
        """While streaming: move the buffered bytes into the sink; the PDU tuple once it is
        complete (as next_pdu returns it), else None."""
        mv = self._mv
        if self._pad:
            n = min(self._pad, self._w - self._r)
            self._r += n
            self._pad -= n
            if self._pad:
                return None
        sink = self._sink
        want = len(sink) - self._sink_pos
        if want:
            n = min(want, self._w - self._r)
            if n:
                chunk = mv[self._r:self._r + n]
                sink[self._sink_pos:self._sink_pos + n] = chunk
                if self._dd:
                    self._crc = _crc(chunk, self._crc)
                self._r += n
                self._sink_pos += n
            if n < want:
                return None
        ok = True
        if self._dd:
            if self._w - self._r < 4:
                return None
            ok = DIGEST.unpack_from(mv, self._r)[0] == self._crc
            self._r += 4
        self._state = ST_HEADER
        self._sink = None
        self.pdus_received += 1
        ptype, flags, hdr = self._cur
        self._cur = None
        return (ptype, flags, memoryview(hdr), sink, ok)
