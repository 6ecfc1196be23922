"""Sans-IO state of one host-side NVMe/TCP queue (admin or I/O): framing plus command slots.

Theory of operation
-------------------
A `HostQueue` turns commands into bytes to send and received bytes into events. It never touches
a socket or a clock. The trio shell (`transport.py`) feeds it and acts on its events.

- Connection set-up: `icreq()` gives the ICReq; the ICResp comes back as an IC_DONE event after
  the checks of NVMe/TCP 3.6.2.3 (PFV, CPDA, MAXH2CDATA, digest echo).
- Commands: `alloc_cid()` takes a free command identifier; `command(cid, ...)` returns the list of
  buffers that carry the CapsuleCmd (header, digest, in-capsule data). A read registers its
  destination, into which C2HData payloads are streamed (`_framing.PduReceiver` sinks), so no
  payload is copied twice; `read_cmd` also takes an `FdSink` (a pipe) as destination. A write
  whose data does not fit in the capsule is answered by R2Ts: each R2T becomes a SEND event
  with H2CData PDUs no larger than MAXH2CDATA.
- Completions: a CapsuleResp, or a C2HData with SUCCESS (an implicit CQE when SQ flow control is
  disabled), becomes a COMPLETION event; the command identifier is then free again. A command
  whose data digest failed completes with status DIGEST_ERROR_STATUS and its data is not to be used.
- Errors: a PDU that breaks the rules raises RemoteProtocolError; `term_req(err)` builds the
  H2CTermReq the host must send before closing (NVMe/TCP 3.6.2.9). A C2HTermReq from the target
  is a TERM event. Either way the queue is finished; the shell fails all outstanding commands.

Events are plain tuples (kind, ...) for speed: no per-I/O objects.
"""

from __future__ import annotations

import struct

from ._errors import LocalProtocolError, RemoteProtocolError
from ._framing import HOST_ACCEPTS, ST_ERROR, ST_HEADER, ST_PAYLOAD, PduReceiver
from ._sink import FdSink
from ._pdu import (
    CH, CMD_PDU, DATA_HDR, DDGSTF, DIGEST, HDGSTF, LAST_PDU, RESP_PDU, SUCCESS, build_icreq,
    build_term_req, data_offset, parse_ic, parse_term_req,
)
from ._spec import (
    NVME_TCP_PFV_1_0, PduType, PSDT_SGL, SGL_DATA_BLOCK_OFFSET, SGL_TRANSPORT_DATA_BLOCK,
    TermReqFes,
)

import crc32c as _crc32c

_crc = _crc32c.crc32c
SGL_DESC = struct.Struct("<QI3xB")
CID_FIELD = struct.Struct("<H")
# Hot-path Read/Write CapsuleCmd (no digests): CH + opcode, PSDT, CID, NSID, (CDW2, CDW3, MPTR,
# SGL address: zero), SGL length, SGL type, SLBA (CDW10/11), CDW12; CDW13-15 zero. One pack_into
# of 13 fields: 0.19 us against 0.27 us for the 24 of CMD_PDU (timeit, docs/performance.md).
RW_CMD = struct.Struct("<BBBBIBBHI24xI3xBQI12x")
assert RW_CMD.size == 72
# A 24-byte host-bound PDU header as six dwords: PDU-TYPE | FLAGS << 8 | HLEN << 16 | PDO << 24,
# PLEN, then a CapsuleResp's (DW0, DW1, SQHD | SQID << 16, CID | STATUS << 16) or a C2HData's
# (CCCID | reserved << 16, DATAO, DATAL, reserved).
_HDR24W = struct.Struct("<IIIIII")
assert _HDR24W.size == 24

# Event kinds
COMPLETION = 0    # (COMPLETION, cid, status, dw0, dw1)
_SCT_SC = 0x0FFE  # CQE status field: SC bits 8:1, SCT bits 11:9 (Base 4.2.3)
SEND = 1          # (SEND, [buffers])  H2CData answering an R2T
IC_DONE = 2       # (IC_DONE, maxh2cdata, cpda, hdgst, ddgst)
TERM = 3          # (TERM, fes, fei)  C2HTermReq received

DIGEST_ERROR_STATUS = -1
# A short C2HData transfer followed by SUCCESS: fail the command with Data Transfer Error.
_SC_DATA_TRANSFER_ERROR = 0x04 << 1

_C2H = int(PduType.C2H_DATA)
_RESP = int(PduType.CAPSULE_RESP)
_R2T = int(PduType.R2T)
_ICRESP = int(PduType.IC_RESP)
_CMD = int(PduType.CAPSULE_CMD)
_H2C = int(PduType.H2C_DATA)
_OPC_READ = 0x02
_OPC_WRITE = 0x01
# A plain C2HData whose payload is at least this large and not all received yet is streamed
# into its destination by completions() itself (the shell's zero-copy threshold).
STREAM_MIN = 16384
_LAST_SUCCESS = LAST_PDU | SUCCESS
# completions() knows the two PDUs it takes by their first 32-bit word (PDU-TYPE, FLAGS, HLEN,
# PDO; little-endian): one comparison instead of four. C2HData flagged LAST_PDU | SUCCESS with
# HLEN 24 and PDO 24; CapsuleResp with no flags, HLEN 24, PDO 0.
_W_C2H_LAST_SUCCESS = _C2H | _LAST_SUCCESS << 8 | 24 << 16 | 24 << 24
_W_RESP = _RESP | 24 << 16


class HostQueue:
    """One host queue's protocol state. `depth` is the number of command slots (CIDs)."""

    __slots__ = (
        "_active", "_cmd72", "_cmdbuf", "_cmdmv", "_derr", "_events", "_rbuf", "_rxoff",
        "_stream_cid", "_stream_sink", "_txoff", "_wdata", "cpda", "cut", "ddgst", "depth",
        "free_cids", "hdgst", "in_capsule_max", "last_streamed", "maxh2cdata", "maxr2t",
        "outstanding", "qid", "rx", "streamed", "want_ddgst", "want_hdgst"
    )

    def __init__(self, qid: int, depth: int, *, hdgst: bool = False, ddgst: bool = False,
                 in_capsule_max: int = 8192, maxr2t: int = 0):
        if not 1 <= depth <= 65535:
            raise LocalProtocolError("queue depth out of range")
        self.qid = qid
        self.depth = depth
        self.want_hdgst = hdgst
        self.want_ddgst = ddgst
        self.hdgst = False
        self.ddgst = False
        self.cpda = 0
        self.maxh2cdata = 0
        self.maxr2t = maxr2t
        self.in_capsule_max = in_capsule_max
        self.rx = PduReceiver(HOST_ACCEPTS)
        self.rx.sink_resolver = self._resolve_sink
        # Per-CID state, preallocated (hot path: list indexing, no per-I/O objects).
        # The free CIDs; alloc_cid() pops one. A shell may pop from it itself where a call
        # costs too much (Queue.read_nowait); anything else goes through the methods.
        self.free_cids = list(range(depth - 1, -1, -1))
        self._active = [False] * depth
        self._rbuf = [None] * depth      # read destination (memoryview) or None
        self._rxoff = [0] * depth        # bytes of read data received so far
        self._wdata = [None] * depth     # write data still to be sent by R2T/H2CData
        self._txoff = [0] * depth        # H2C data offset expected next
        self._derr = [False] * depth     # data digest failed
        self._cmdbuf = [bytearray(72 + 4 + 128) for _ in range(depth)]
        self._cmdmv = [memoryview(b) for b in self._cmdbuf]
        self._cmd72 = [mv[:72] for mv in self._cmdmv]   # hot-path capsules, no per-I/O slicing
        self._events: list = []
        self.outstanding = 0
        # Size of the last C2HData payload that was streamed into its destination: the shell
        # receives PDU headers on their own while payloads are large (zero copy for all of it).
        self.last_streamed = 0
        # Set by completions(): the PLEN of the plain C2HData at the head of the buffer that is
        # not wholly received yet (0: none). The shell may then receive more before calling
        # next_event(), which would stream the rest through the general path. -1: a payload
        # completions() streams is still arriving (next_event() has nothing to give).
        self.cut = 0
        # The destination of a large plain C2HData that completions() started streaming (the
        # receiver's `_sink` while it streams), and its CID: completions() also finishes it.
        self._stream_sink = None
        self._stream_cid = -1
        self.streamed = 0                # how many payloads completions() streamed (statistics)

    # -- connection set-up ------------------------------------------------------------------
    def icreq(self) -> bytes:
        # NVMe/TCP 3.6.2.2: HPDA 0 (no alignment), digests as wanted, MAXR2T 0's based.
        return build_icreq(hpda=0, hdgst=self.want_hdgst, ddgst=self.want_ddgst,
                           maxr2t=self.maxr2t)

    def _on_icresp(self, hdr) -> None:
        pfv, cpda, hdgst, ddgst, maxh2cdata = parse_ic(hdr)
        # NVMe/TCP 3.6.2.3: PFV 0 is the only version; CPDA at most 31; MAXH2CDATA at least
        # 4096 and dword aligned; the digests "shall" be the ones requested.
        if pfv != NVME_TCP_PFV_1_0:
            raise RemoteProtocolError(f"ICResp PFV {pfv} unsupported",
                                      TermReqFes.UNSUPPORTED_PARAMETER, 8, bytes(hdr))
        if cpda > 31:
            raise RemoteProtocolError(f"ICResp CPDA {cpda} out of range",
                                      TermReqFes.INVALID_HEADER_FIELD, 10, bytes(hdr))
        if maxh2cdata < 4096 or maxh2cdata % 4:
            raise RemoteProtocolError(f"ICResp MAXH2CDATA {maxh2cdata} invalid",
                                      TermReqFes.INVALID_HEADER_FIELD, 12, bytes(hdr))
        if hdgst != self.want_hdgst or ddgst != self.want_ddgst:
            raise RemoteProtocolError("ICResp digest settings do not echo the ICReq",
                                      TermReqFes.INVALID_HEADER_FIELD, 11, bytes(hdr))
        self.cpda, self.maxh2cdata = cpda, maxh2cdata
        self.hdgst, self.ddgst = hdgst, ddgst
        self.rx.hdgst, self.rx.ddgst = hdgst, ddgst
        self.rx.ic_done = True
        self._events.append((IC_DONE, maxh2cdata, cpda, hdgst, ddgst))

    # -- commands ---------------------------------------------------------------------------
    def alloc_cid(self) -> int:
        """A free command identifier, or -1 if every slot is busy."""
        free = self.free_cids
        if not free:
            return -1
        return free.pop()

    def release_cid(self, cid: int) -> None:
        """Give back a CID that was allocated but never sent."""
        if self._active[cid]:
            raise LocalProtocolError("CID is in flight")
        self.free_cids.append(cid)

    def read_cmd(self, cid: int, nsid: int, slba: int, cdw12: int, buf, out: list) -> None:
        """Hot path: encode a Read of `buf.nbytes` bytes into `buf` and append its buffers to
        `out`. The same PDU as `command(cid, READ, nsid, slba & 0xFFFFFFFF, slba >> 32, cdw12,
        read_buf=buf)`, with one pack_into into the CID's preallocated capsule."""
        if self.hdgst or self.ddgst:
            out.extend(self.command(cid, _OPC_READ, nsid, slba & 0xFFFFFFFF, slba >> 32, cdw12,
                                    read_buf=buf))
            return
        if self._active[cid]:
            raise LocalProtocolError(f"CID {cid} already in flight")
        if type(buf) is not memoryview or buf.format != "B":
            if type(buf) is not FdSink:
                buf = memoryview(buf).cast("B")
        cap = self._cmd72[cid]
        RW_CMD.pack_into(cap, 0, _CMD, 0, 72, 0, 72, _OPC_READ, PSDT_SGL, cid, nsid, buf.nbytes,
                         SGL_TRANSPORT_DATA_BLOCK, slba, cdw12 & 0xFFFFFFFF)
        self._active[cid] = True
        self.outstanding += 1
        self._rbuf[cid] = buf
        self._rxoff[cid] = 0
        self._derr[cid] = False
        out.append(cap)

    def write_cmd(self, cid: int, nsid: int, slba: int, cdw12: int, data, out: list) -> None:
        """Hot path: encode a Write of `data` and append its buffers to `out` (in-capsule when
        it fits, else the data waits for R2Ts). Same PDUs as `command(cid, WRITE, ...)`."""
        if type(data) is not memoryview or data.format != "B":
            data = memoryview(data).cast("B")
        n = data.nbytes
        if self.hdgst or self.ddgst or not n or n > self.in_capsule_max or self.cpda:
            out.extend(self.command(cid, _OPC_WRITE, nsid, slba & 0xFFFFFFFF, slba >> 32, cdw12,
                                    data=data))
            return
        if self._active[cid]:
            raise LocalProtocolError(f"CID {cid} already in flight")
        cap = self._cmd72[cid]
        # In-capsule data right after the 72-byte header (PDO 72: CPDA 0, no header digest).
        RW_CMD.pack_into(cap, 0, _CMD, 0, 72, 72, 72 + n, _OPC_WRITE, PSDT_SGL, cid, nsid, n,
                         SGL_DATA_BLOCK_OFFSET, slba, cdw12 & 0xFFFFFFFF)
        self._active[cid] = True
        self.outstanding += 1
        self._rbuf[cid] = None
        self._wdata[cid] = None
        self._derr[cid] = False
        out.append(cap)
        out.append(data)

    def command(self, cid: int, opc: int, nsid: int = 0, cdw10: int = 0, cdw11: int = 0,
                cdw12: int = 0, cdw13: int = 0, cdw14: int = 0, cdw15: int = 0, *,
                data=None, read_buf=None, cdw2: int = 0, cdw3: int = 0,
                fabrics_raw=None) -> list:
        """Encode a command; returns the buffers to send, in order.

        `data`: host-to-controller payload (in-capsule if it fits, else sent on R2T).
        `read_buf`: writable memoryview that receives controller-to-host data.
        `fabrics_raw`: a complete 64-byte SQE (Fabrics commands lay out dwords their own way);
        its CID and SGL are filled in here.
        """
        if self._active[cid]:
            raise LocalProtocolError(f"CID {cid} already in flight")
        dlen = 0
        in_capsule = False
        if data is not None:
            if type(data) is not memoryview or data.format != "B":
                data = memoryview(data).cast("B")
            dlen = data.nbytes
            in_capsule = dlen <= self.in_capsule_max
        elif read_buf is not None:
            if type(read_buf) is not memoryview or read_buf.format != "B":
                # Slicing a bytearray copies: data would land in the copy, never in the buffer.
                read_buf = memoryview(read_buf).cast("B")
            dlen = read_buf.nbytes
        buf = self._cmdbuf[cid]
        hd = 4 if self.hdgst else 0
        if in_capsule and dlen:
            pdo = data_offset(72, self.hdgst, self.cpda)
            dd = 4 if self.ddgst else 0
            plen = pdo + dlen + dd
            flags = (HDGSTF if hd else 0) | (DDGSTF if dd else 0)
        else:
            pdo = 0
            plen = 72 + hd
            flags = HDGSTF if hd else 0
        sgl_type = SGL_DATA_BLOCK_OFFSET if in_capsule else SGL_TRANSPORT_DATA_BLOCK
        if fabrics_raw is None:
            CMD_PDU.pack_into(buf, 0, _CMD, flags, 72, pdo, plen, opc, PSDT_SGL, cid, nsid, cdw2,
                              cdw3, 0, 0, dlen, sgl_type, cdw10 & 0xFFFFFFFF,
                              cdw11 & 0xFFFFFFFF, cdw12 & 0xFFFFFFFF, cdw13 & 0xFFFFFFFF,
                              cdw14 & 0xFFFFFFFF, cdw15 & 0xFFFFFFFF)
        else:
            # Fabrics commands lay out their dwords differently; only CID and SGL are ours.
            CH.pack_into(buf, 0, _CMD, flags, 72, pdo, plen)
            buf[8:72] = fabrics_raw
            SGL_DESC.pack_into(buf, 8 + 24, 0, dlen, sgl_type)
            CID_FIELD.pack_into(buf, 8 + 2, cid)
        end = 72
        if hd:
            DIGEST.pack_into(buf, 72, _crc(self._cmdmv[cid][:72]))
            end = 76
        self._active[cid] = True
        self.outstanding += 1
        self._rbuf[cid] = read_buf
        self._rxoff[cid] = 0
        self._derr[cid] = False
        if in_capsule and dlen:
            if pdo > end:
                buf[end:pdo] = bytes(pdo - end)
                end = pdo
            self._wdata[cid] = None
            if self.ddgst:
                return [self._cmdmv[cid][:end], data, DIGEST.pack(_crc(data))]
            return [self._cmdmv[cid][:end], data]
        self._wdata[cid] = memoryview(data) if (data is not None and dlen) else None
        self._txoff[cid] = 0
        return [self._cmdmv[cid][:end]]

    # -- receiving --------------------------------------------------------------------------
    def buffer(self) -> memoryview:
        return self.rx.buffer()

    def received(self, n: int) -> None:
        self.rx.received(n)

    def receive_data(self, data) -> None:
        self.rx.receive_data(data)

    def _resolve_sink(self, ptype, hdr):
        # Only C2HData reaches here on the host side (H2CData is not accepted).
        cid, _ttag, datao, datal = DATA_HDR.unpack_from(hdr, 0)[5:9]
        if cid >= self.depth or not self._active[cid]:
            raise RemoteProtocolError(f"C2HData for unknown CID {cid}",
                                      TermReqFes.INVALID_HEADER_FIELD, 8, bytes(hdr))
        dest = self._rbuf[cid]
        # NVMe/TCP 3.6.2.9 / SPDK nvme_tcp.c: DATAO must be the next expected offset and the
        # transfer must stay inside the command's buffer.
        if dest is None or datao != self._rxoff[cid] or datao + datal > len(dest):
            raise RemoteProtocolError(
                f"C2HData out of range (cid {cid}, datao {datao}, datal {datal})",
                TermReqFes.DATA_TRANSFER_OUT_OF_RANGE, 12, bytes(hdr))
        self._rxoff[cid] = datao + datal
        self.last_streamed = datal
        return dest[datao:datao + datal]

    def completions(self, done: list) -> int:
        """Hot path: consume the plain completions at the head of the receive buffer and append
        their CIDs to `done`; returns how many. Each one is exactly the event `next_event()`
        would return as (COMPLETION, cid, 0, 0, 0).

        Taken here: a whole C2HData (no digests) flagged LAST_PDU | SUCCESS with HLEN 24, PDO 24
        and PLEN 24 + DATAL that completes an outstanding read at the next expected offset, and
        a CapsuleResp (flags 0, HLEN 24, PDO 0, PLEN 24) for an outstanding command with a
        successful status and DW0 = DW1 = 0. Such a PDU passes every check of
        `PduReceiver.next_pdu` and of this class's slow path, so the outcome is the same. Any
        other PDU stops the loop: `next_event()` handles it (and its errors). Such a C2HData
        not wholly received stops it too: one of at least STREAM_MIN bytes of data into a
        memoryview is then streamed (the receiver set up as `next_pdu` and `_resolve_sink` would
        set it, `PduReceiver.stream`) and finished by a later call once all of it is in
        (`PduReceiver.continue_payload`, then the CID as next_event() would complete it).
        Digests negotiated: nothing is taken here. Relies on PduReceiver's buffer layout
        (`_mv`, `_r`, `_w`, `_state`, `_sink`), as target/_queue.py does. `cut` tells whether the loop stopped at a smaller such C2HData
        whose bytes are not all here yet (its PLEN), or while a streamed payload arrives (-1).
        """
        rx = self.rx
        self.cut = 0
        if self.hdgst or self.ddgst or rx.pda or self._events:
            return 0
        mv = rx._mv
        r = rx._r
        w = rx._w
        depth = self.depth
        active = self._active
        rbuf = self._rbuf
        rxoff = self._rxoff
        derr = self._derr
        free = self.free_cids
        wdata = self._wdata
        n = 0
        streamed = 0
        if rx._state != ST_HEADER:
            # A payload this method started streaming: the receiver moves what is buffered
            # and finishes the PDU; its CID completes here, as next_event() would complete it
            # (the PDU's checks were made at its start).
            if rx._state != ST_PAYLOAD or rx._sink is None or rx._sink is not self._stream_sink:
                return 0
            if rx.continue_payload() is None:
                self.cut = -1
                return 0
            r = rx._r
            cid = self._stream_cid
            self._stream_sink = None
            self._stream_cid = -1
            rbuf[cid] = None
            active[cid] = False
            free.append(cid)
            done.append(cid)
            self.outstanding -= 1
            streamed = 1
        unpack = _HDR24W.unpack_from
        while w - r >= 24:
            w0, plen, d0, d1, d2, d3 = unpack(mv, r)
            if w0 == _W_C2H_LAST_SUCCESS:
                cid = d0 & 0xFFFF
                if plen != 24 + d2 or not d2 or cid >= depth or not active[cid]:
                    break
                dest = rbuf[cid]
                if dest is None or d1 != rxoff[cid] or d1 + d2 != dest.nbytes or derr[cid]:
                    break
                if w - r < plen:
                    if d2 >= STREAM_MIN and type(dest) is memoryview:
                        # A large payload still arriving: stream it into the destination
                        # (the state next_pdu and _resolve_sink would set), and finish it
                        # here once it is all in (the top of this method).
                        sink = self._stream_sink = dest[d1:]
                        rxoff[cid] = d1 + d2
                        self.last_streamed = d2
                        rx.stream(_C2H, _LAST_SUCCESS, bytes(mv[r:r + 24]), r + 24, 0, sink, 0)
                        if w - r > 24:
                            rx.continue_payload()    # what is buffered; not all of it is here
                        r = rx._r
                        self._stream_cid = cid
                        self.streamed += 1
                        self.cut = -1
                    else:
                        self.cut = plen
                    break
                dest[d1:] = mv[r + 24:r + plen]
                rbuf[cid] = None
            elif w0 == _W_RESP:
                cid = d3 & 0xFFFF
                if (plen != 24 or d0 or d1 or d3 & 0xFFFE0000 or cid >= depth or not active[cid]
                        or derr[cid]):
                    break
                if rbuf[cid] is not None and rxoff[cid] != rbuf[cid].nbytes:
                    break      # a read short of data: the slow path fails it
                rbuf[cid] = None
                wdata[cid] = None
            else:
                break
            r += plen
            active[cid] = False
            free.append(cid)
            done.append(cid)
            n += 1
        rx._r = r
        if n:
            rx.pdus_received += n
            self.outstanding -= n
        return n + streamed

    def next_event(self):
        """The next event, or None when more bytes are needed. Raises RemoteProtocolError."""
        ev = self._events
        if ev:
            return ev.pop(0)
        rx = self.rx
        try:
            while True:
                pdu = rx.next_pdu()
                if pdu is None:
                    return None
                ptype, flags, hdr, data, dok = pdu
                if ptype == _RESP:
                    dw0, dw1, _sqhd, _sqid, cid, status = RESP_PDU.unpack_from(hdr, 0)[5:11]
                    if cid >= self.depth or not self._active[cid]:
                        raise RemoteProtocolError(f"CapsuleResp for unknown CID {cid}",
                                                  TermReqFes.INVALID_HEADER_FIELD, 20, bytes(hdr))
                    if status & _SCT_SC == 0:
                        # Base 4.2.3: SCT 0 / SC 0 is success. DNR, More and CRD qualify an
                        # error; on a success they mean nothing, and the command succeeded
                        # (SPDK's spdk_nvme_cpl_is_error looks at SCT and SC only).
                        status = 0
                        if self._derr[cid]:
                            status = DIGEST_ERROR_STATUS
                        elif self._rbuf[cid] is not None and \
                                self._rxoff[cid] != self._rbuf[cid].nbytes:
                            # A successful completion of a read whose data did not all arrive
                            # must not hand the caller an untouched buffer: Data Transfer Error,
                            # as for a short C2HData with SUCCESS.
                            status = _SC_DATA_TRANSFER_ERROR
                    self._finish(cid)
                    return (COMPLETION, cid, status & 0xFFFE if status >= 0 else status, dw0, dw1)
                if ptype == _C2H:
                    cid = DATA_HDR.unpack_from(hdr, 0)[5]
                    if not dok:
                        self._derr[cid] = True
                    if flags & SUCCESS:
                        status = 0
                        if self._derr[cid]:
                            status = DIGEST_ERROR_STATUS
                        elif self._rxoff[cid] != len(self._rbuf[cid]):
                            status = _SC_DATA_TRANSFER_ERROR
                        self._finish(cid)
                        return (COMPLETION, cid, status, 0, 0)
                    continue
                if ptype == _R2T:
                    out = self._on_r2t(hdr)
                    return (SEND, out)
                if ptype == _ICRESP:
                    self._on_icresp(hdr)
                    return ev.pop(0)
                # C2HTermReq
                fes, fei = parse_term_req(hdr)
                return (TERM, fes, fei)
        except RemoteProtocolError:
            # NVMe/TCP 3.6.2.4: a fatal transport error ends the connection. Violations found
            # here (CID, ranges, ICResp parameters) leave the receiver in ERROR like its own.
            rx._state = ST_ERROR
            raise

    def _finish(self, cid: int) -> None:
        self._active[cid] = False
        self._rbuf[cid] = None
        self._wdata[cid] = None
        self.outstanding -= 1
        self.free_cids.append(cid)

    def _on_r2t(self, hdr) -> list:
        cid, ttag, r2to, r2tl = DATA_HDR.unpack_from(hdr, 0)[5:9]
        data = self._wdata[cid] if cid < self.depth and self._active[cid] else None
        # NVMe/TCP 3.6.2.10: the R2T must name an outstanding write and ask for data in order,
        # inside the command's transfer.
        if data is None:
            raise RemoteProtocolError(f"R2T for CID {cid} with no data to send",
                                      TermReqFes.INVALID_HEADER_FIELD, 8, bytes(hdr))
        if r2tl == 0 or r2to != self._txoff[cid] or r2to + r2tl > len(data):
            raise RemoteProtocolError(f"R2T out of range (cid {cid}, r2to {r2to}, r2tl {r2tl})",
                                      TermReqFes.DATA_TRANSFER_OUT_OF_RANGE, 12, bytes(hdr))
        self._txoff[cid] = r2to + r2tl
        out = []
        off = r2to
        end = r2to + r2tl
        chunk = self.maxh2cdata
        hd = 4 if self.hdgst else 0
        pdo = data_offset(24, self.hdgst, self.cpda)
        dd = 4 if self.ddgst else 0
        flags0 = (HDGSTF if hd else 0) | (DDGSTF if dd else 0)
        while off < end:
            n = min(chunk, end - off)
            last = off + n == end
            h = bytearray(pdo)
            DATA_HDR.pack_into(h, 0, _H2C, flags0 | (LAST_PDU if last else 0), 24, pdo,
                               pdo + n + dd, cid, ttag, off, n)
            if hd:
                DIGEST.pack_into(h, 24, _crc(memoryview(h)[:24]))
            payload = data[off:off + n]
            out.append(h)
            out.append(payload)
            if dd:
                out.append(DIGEST.pack(_crc(payload)))
            off += n
        return out

    # -- teardown ---------------------------------------------------------------------------
    def term_req(self, err: RemoteProtocolError) -> bytes:
        """The H2CTermReq answering `err` (NVMe/TCP 3.6.2.4): FES, FEI and the offending header."""
        return build_term_req(PduType.H2C_TERM_REQ, err.fes, err.fei, err.header)

    def active_cids(self) -> list[int]:
        return [c for c in range(self.depth) if self._active[c]]

    def fail_all(self) -> list[int]:
        """Forget every outstanding command (the connection is gone); returns their CIDs."""
        cids = self.active_cids()
        for c in cids:
            self._finish(c)
        return cids
