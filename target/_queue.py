"""Sans-IO state of one target-side NVMe/TCP queue (one TCP connection): bytes in, bytes out.

Theory of operation
-------------------
The shell feeds received bytes to `rx` (an `initiator._framing.PduReceiver` accepting the H2C PDU
types, which validates every header and raises RemoteProtocolError) and calls `process()`, which
handles every complete PDU and appends the PDUs to send to `out` (a list of buffers for one
`sendmsg`). `process()` never raises for peer misbehaviour: a protocol violation becomes a
C2HTermReq with the receiver's FES/FEI in `out` and `closing` set (NVMe/TCP 3.6.2.9); the shell
sends what is in `out` and closes. Other connections are not affected.

- ICReq -> ICResp (digests echoed, CPDA 0, our MAXH2CDATA); the receiver is then switched to
  the negotiated digests.
- Before Connect only Connect is accepted (Command Sequence Error otherwise). Connect on QID 0
  creates a `Controller`; on QID > 0 joins one (same host NQN, enabled, QID within the
  Number of Queues answer).
- Admin commands go to the controller; Property Get/Set are handled here with its registers.
- I/O: Read answers with one C2HData (LAST_PDU; SUCCESS when the host disabled SQ flow control in
  Connect CATTR bit 2, with no CapsuleResp, as SPDK and nvmet do), Write takes in-capsule data or
  sends one R2T for the whole transfer and collects H2CData PDUs (each checked against the R2T:
  TTAG, CCCID, contiguous DATAO, DATAL <= MAXH2CDATA), Flush, Write Zeroes, Dataset Management.
- A data digest error on a capsule or H2CData fails that command with Transient Transport Error
  and keeps the connection (a header digest error is fatal, FES 3).
- SQ flow control: SQHD advances per command (mod SQSIZE + 1) and is reported in each CQE.
- Completions that happen later (AERs, fault delays) use `complete_async` / the shell's `defer`
  and `wake` hooks; `close()` asks the shell to drop the connection (keep-alive expiry...).

Hot path (a 4 KiB read with no digests): one `unpack_from` of the capsule's header and SQE fields,
a dict lookup for the namespace and its precomputed `hot` tuple, a cached C2HData header (same CID
and length: same bytes) and a zero-copy view of the RAM backend (0.73 us per read in Python,
was 1.0).

Does not: touch sockets or clocks, or run tasks: see `server.py`.
"""

from __future__ import annotations

import struct

import crc32c as _crc32c

from initiator._errors import LocalProtocolError, RemoteProtocolError
from initiator._fabrics import parse_connect_data
from initiator._framing import PduReceiver, ST_HEADER as _RX_HEADER, TARGET_ACCEPTS
from initiator._pdu import (
    CMD_PDU, DATA_HDR, DIGEST, RESP_PDU, build_capsule_resp, build_icresp, build_r2t,
    build_term_req, data_offset, data_pdu_header, parse_ic, parse_term_req,
)
from initiator._spec import (
    ADMIN_QUEUE_IN_CAPSULE, AdminOpcode, CONNECT_CATTR_DISABLE_SQ_FLOW_CONTROL, FabricsType,
    IoOpcode, PduType, RW_FUA, SGL_DATA_BLOCK_OFFSET, SGL_TRANSPORT_DATA_BLOCK, TermReqFes,
)
from initiator._structs import DSM_RANGE

from . import _controller as C
from ._controller import HOLD, Controller
from .backends import FileRange

_crc = _crc32c.crc32c
_CMD_UNPACK = CMD_PDU.unpack_from
# opc, cid, nsid, SGL length, SGL type, CDW10, CDW11, CDW12 from a 64-byte SQE.
# A CapsuleCmd's common header and the SQE fields above, in one call.
_FAST_CMD = struct.Struct("<BBBBIBxHI16x8xI3xBIII").unpack_from
_FAST_SGL_ADDR = struct.Struct("<Q").unpack_from
_SGL_IN_CAPSULE = SGL_DATA_BLOCK_OFFSET
_C2H_PACK = DATA_HDR.pack
_RESP_PACK = RESP_PDU.pack
_DATA_HDR_UNPACK = DATA_HDR.unpack_from

_T_CMD = int(PduType.CAPSULE_CMD)
_T_H2C = int(PduType.H2C_DATA)
_T_ICREQ = int(PduType.IC_REQ)
_T_C2H = int(PduType.C2H_DATA)
_T_RESP = int(PduType.CAPSULE_RESP)
_OPC_READ = int(IoOpcode.READ)
_OPC_WRITE = int(IoOpcode.WRITE)
_OPC_FABRICS = int(AdminOpcode.FABRICS)
_F_LAST = 0x04
_SGL_TRANSPORT = SGL_TRANSPORT_DATA_BLOCK
_F_LAST_SUCCESS = 0x0C
# C2HData headers (LAST_PDU|SUCCESS) by (length << 16 | CID): a read's header is the same bytes
# every time its CID reads the same length (shared by all queues; immutable).
_C2H_SUCCESS_HEADERS: dict[int, bytes] = {}
DSM_AD = 1 << 2


def _noop(*_a, **_k):
    return None


def _ipo(iattr: int, offset: int) -> int:
    """Connect Invalid Parameters DW0: IATTR (1 = in the data) and the parameter's byte offset."""
    return iattr | (offset << 16)


class TargetQueue:
    __slots__ = (
        "t", "peer", "rx", "out", "qid", "ctrl", "nss", "connected", "io", "hdgst", "ddgst",
        "hpda", "fast", "sqflow", "sqsize1", "sqhd", "icd_limit", "xfers", "_ttag", "held",
        "closing", "close_reason", "rst", "error", "wake", "defer", "on_close", "corrupt_hd",
        "corrupt_dd", "n_read", "n_write", "b_read", "b_written", "faults", "max_io",
        "maxh2cdata", "ic_done", "_finished", "views", "files",
    )

    def __init__(self, target, peer: str = ""):
        self.t = target
        self.peer = peer
        self.rx = PduReceiver(TARGET_ACCEPTS,
                              max_capsule_data=max(ADMIN_QUEUE_IN_CAPSULE, target.io_in_capsule))
        self.rx.sink_resolver = self._h2c_sink
        self.out: list = []
        self.qid = 0
        self.ctrl: Controller | None = None
        self.nss: dict = {}
        self.connected = False
        self.io = False
        self.hdgst = False
        self.ddgst = False
        self.hpda = 0
        self.fast = True
        self.sqflow = True
        self.sqsize1 = 1
        self.sqhd = 0
        self.icd_limit = ADMIN_QUEUE_IN_CAPSULE
        self.xfers: dict = {}       # ttag -> [cid, buffer, received, length, digest_failed, cont]
        self._ttag = 0
        self.held: set = set()      # CIDs a fault keeps from ever completing
        self.closing = False
        self.close_reason = ""
        self.rst = False
        self.error: Exception | None = None
        self.wake = _noop           # shell: output was appended outside process()
        self.defer = None           # shell: defer(seconds, buffers) sends them later
        self.on_close = _noop       # shell: drop the connection (after sending `out`)
        self.corrupt_hd = 0
        self.corrupt_dd = 0
        self.n_read = self.n_write = self.b_read = self.b_written = 0
        self.faults = target.faults
        self.max_io = target.max_io_bytes
        self.maxh2cdata = target.max_h2c_data
        self.ic_done = False
        self._finished = False
        self.views = False          # `out` may hold zero-copy views of a backend's memory
        self.files = 0              # FileRanges in `out` (the shell sends those with sendfile)
        target.queues.add(self)

    # -- driving ---------------------------------------------------------------------------
    def process(self) -> None:
        """Handle every complete PDU in the receive buffer."""
        next_pdu = self.rx.next_pdu
        try:
            while not self.closing:
                if self.io and self.fast and not self.faults.rules:
                    self._fast_io()
                pdu = next_pdu()
                if pdu is None:
                    return
                ptype = pdu[0]
                if ptype == _T_CMD:
                    self._capsule(pdu[2], pdu[3], pdu[4])
                elif ptype == _T_H2C:
                    self._h2c_done(pdu[1], pdu[2], pdu[4])
                elif ptype == _T_ICREQ:
                    self._icreq(pdu[2])
                else:
                    fes, fei = parse_term_req(pdu[2])
                    self.close(f"host sent H2CTermReq (FES {fes}, FEI {fei})")
        except RemoteProtocolError as e:
            self.fatal(e.fes, e.fei, e.header, str(e), e)
        except LocalProtocolError as e:
            self.fatal(TermReqFes.DATA_TRANSFER_LIMIT_EXCEEDED, 0, b"", str(e), e)

    def _fast_io(self) -> None:
        """Hot path: consume consecutive plain reads and in-capsule writes straight from the
        receive buffer.

        A CapsuleCmd whose common header is type 4, no flags, HLEN 72, PDO 0 and PLEN 72 (no
        data), or PDO 72 and PLEN 72 + n with 0 < n <= the in-capsule limit (in-capsule data),
        passes every framing check `PduReceiver.next_pdu` makes once the IC exchange is done
        without digests, so it is taken here without the general parser. Anything else (another
        PDU type, another opcode, an error case, a partial PDU) stops the loop and goes through
        `next_pdu`, byte for byte as before. Relies on PduReceiver's buffer layout (`_buf`,
        `_mv`, `_r`, `_w`, `_state`).
        """
        rx = self.rx
        if rx._state != _RX_HEADER:
            return
        buf = rx._buf
        r = r0 = rx._r
        w = rx._w
        nss = self.nss
        out = self.out
        append = out.append
        max_io = self.max_io
        icd = self.icd_limit
        sqflow = self.sqflow
        qid = self.qid
        nrd = nwr = brd = bwr = 0
        views = self.views
        hdrs = _C2H_SUCCESS_HEADERS
        while w - r >= 72:
            t, f, hl, pdo, plen, opc, cid, nsid, sgl_len, sgl_type, c10, c11, c12 = _FAST_CMD(buf, r)
            if t != _T_CMD or f or hl != 72:
                break
            ns = nss.get(nsid)
            if ns is None:
                break
            hot = ns.hot
            if hot is None:
                break
            nblocks, lbads, view, mask = hot
            nlb = (c12 & 0xFFFF) + 1
            slba = c10 | (c11 << 32)
            n = nlb << lbads
            if slba + nlb > nblocks or n > max_io:
                break
            if opc == _OPC_READ:
                if pdo or plen != 72 or sgl_type != _SGL_TRANSPORT or n > sgl_len:
                    break
                r += 72
                nrd += 1
                brd += n
                if not mask and ns.zero_fd is not None and n >= ns.sendfile_min:
                    # A large null read: the socket takes the zero pages by reference.
                    data = FileRange(ns.zero_fd, 0, n)
                    self.files += 1
                else:
                    o = (slba << lbads) & mask
                    data = view[o:o + n]
                    views = True
                if sqflow:
                    self.sqhd = sqhd = (self.sqhd + 1) % self.sqsize1
                    out += (_C2H_PACK(_T_C2H, _F_LAST, 24, 24, 24 + n, cid, 0, 0, n), data,
                            _RESP_PACK(_T_RESP, 0, 24, 0, 24, 0, 0, sqhd, qid, cid, 0))
                else:
                    key = n << 16 | cid
                    h = hdrs.get(key)
                    if h is None:
                        if len(hdrs) >= 4096:
                            hdrs.clear()
                        hdrs[key] = h = _C2H_PACK(_T_C2H, _F_LAST_SUCCESS, 24, 24, 24 + n, cid, 0,
                                                  0, n)
                    out += (h, data)
            elif opc == _OPC_WRITE:
                if (pdo != 72 or plen != 72 + n or sgl_type != _SGL_IN_CAPSULE or sgl_len != n
                        or n > icd or w - r < plen or c12 & RW_FUA or _FAST_SGL_ADDR(buf, r + 32)[0]):
                    break
                if views:
                    self.views = True
                    self.materialize()
                    views = False
                ns.backend.write(slba << lbads, rx._mv[r + 72:r + plen])
                r += plen
                nwr += 1
                bwr += n
                if sqflow:
                    self.sqhd = (self.sqhd + 1) % self.sqsize1
                append(_RESP_PACK(_T_RESP, 0, 24, 0, 24, 0, 0, self.sqhd, qid, cid, 0))
            else:
                break
        self.views = views
        if r != r0:
            rx._r = r
            rx.pdus_received += nrd + nwr
            self.n_read += nrd
            self.b_read += brd
            self.n_write += nwr
            self.b_written += bwr

    def materialize(self) -> None:
        """Copy zero-copy read data still waiting in `out` (before a write changes the memory
        behind it, or when the socket is full and other queues may run first): a read returns
        the data as of its own processing, never a later write's."""
        if self.views:
            self.views = False
            self.out[:] = [bytes(b) if type(b) is memoryview else b for b in self.out]

    def fatal(self, fes: int, fei: int, header: bytes, msg: str, err: Exception | None = None):
        """Answer a protocol violation: C2HTermReq, then close (NVMe/TCP 3.6.2.9)."""
        self.error = err or RemoteProtocolError(msg, fes, fei, header)
        self.out.append(build_term_req(PduType.C2H_TERM_REQ, fes, fei, header))
        self.close(f"protocol error: {msg} (FES {fes}, FEI {fei})")

    def close(self, reason: str, rst: bool = False) -> None:
        if self.closing:
            return
        self.closing = True
        self.close_reason = reason
        self.rst = rst
        self.on_close()

    def finished(self) -> None:
        """The shell closed the connection: detach from the controller, keep the counters."""
        if self._finished:
            return
        self._finished = True
        self.closing = True
        t = self.t
        t.queues.discard(self)
        tot = t.totals
        tot[0] += self.n_read
        tot[1] += self.n_write
        tot[2] += self.b_read
        tot[3] += self.b_written
        self.n_read = self.n_write = self.b_read = self.b_written = 0
        self.xfers.clear()
        if self.ctrl is not None:
            self.ctrl.detach(self.qid, self)

    def complete_async(self, cid: int, status: int, dw0: int = 0, dw1: int = 0) -> None:
        if self.closing:
            return
        self._resp(cid, status, dw0, dw1)
        self.wake()

    def set_corrupt(self, header: int = 0, data: int = 0) -> None:
        self.corrupt_hd += header
        self.corrupt_dd += data
        self._update_fast()

    def _update_fast(self) -> None:
        self.fast = not (self.hdgst or self.ddgst or self.corrupt_hd or self.corrupt_dd
                         or data_offset(24, False, self.hpda) != 24)

    # -- emitting --------------------------------------------------------------------------
    def _resp(self, cid: int, status: int, dw0: int = 0, dw1: int = 0) -> None:
        if self.fast:
            self.out.append(_RESP_PACK(_T_RESP, 0, 24, 0, 24, dw0 & 0xFFFFFFFF, dw1 & 0xFFFFFFFF,
                                       self.sqhd, self.qid, cid, status))
        else:
            pdu = build_capsule_resp(cid, status, dw0, dw1, self.sqhd, self.qid, hdgst=self.hdgst)
            if self.hdgst and self.corrupt_hd:
                pdu = self._corrupt_tail(pdu)
            self.out.append(pdu)
        if status and self.ctrl is not None:
            self.ctrl.record_error(self.qid, cid, status)

    def _corrupt_tail(self, pdu: bytes) -> bytes:
        """Flip the header digest at the end of a 24+4 byte PDU header."""
        self.corrupt_hd -= 1
        self._update_fast()
        b = bytearray(pdu)
        b[24] ^= 0xFF
        return bytes(b)

    def _send_data(self, cid: int, buf, dw0: int = 0, dw1: int = 0) -> None:
        """C2HData carrying `buf` (LAST_PDU), then the CapsuleResp unless SUCCESS applies
        (SQ flow control disabled and nothing to report in DW0/DW1: the implicit CQE is zero)."""
        n = len(buf)
        success = not self.sqflow and not (dw0 or dw1)
        out = self.out
        if self.fast:
            out.append(_C2H_PACK(_T_C2H, _F_LAST_SUCCESS if success else _F_LAST, 24, 24, 24 + n,
                                 cid, 0, 0, n))
            out.append(buf)
        else:
            hdr = data_pdu_header(_T_C2H, cid, 0, 0, n, last=True, success=success,
                                  hdgst=self.hdgst, ddgst=self.ddgst, cpda=self.hpda)
            if self.hdgst and self.corrupt_hd:
                hdr = self._corrupt_tail(hdr)
            out.append(hdr)
            out.append(buf)
            if self.ddgst:
                d = DIGEST.pack(_crc(buf))
                if self.corrupt_dd:
                    self.corrupt_dd -= 1
                    self._update_fast()
                    d = bytes(x ^ 0xFF for x in d)
                out.append(d)
        if not success:
            self._resp(cid, 0, dw0, dw1)

    def _r2t(self, cid: int, n: int, cont) -> None:
        ttag = self._ttag
        xfers = self.xfers
        while True:
            ttag = ttag + 1 if ttag < 0xFFFE else 1
            if ttag not in xfers:
                break
        self._ttag = ttag
        buf = bytearray(n)
        xfers[ttag] = [cid, buf, 0, n, False, cont]
        pdu = build_r2t(cid, ttag, 0, n, hdgst=self.hdgst)
        if self.hdgst and self.corrupt_hd:
            pdu = self._corrupt_tail(pdu)
        self.out.append(pdu)

    # -- receiving -------------------------------------------------------------------------
    def _icreq(self, hdr) -> None:
        pfv, hpda, hd, dd, _maxr2t = parse_ic(hdr)
        if pfv != 0:
            raise RemoteProtocolError(f"unsupported PFV {pfv}", TermReqFes.INVALID_HEADER_FIELD,
                                      8, bytes(hdr))
        if hpda > 31:
            raise RemoteProtocolError(f"HPDA {hpda} out of range",
                                      TermReqFes.INVALID_HEADER_FIELD, 10, bytes(hdr))
        self.out.append(build_icresp(cpda=0, hdgst=hd, ddgst=dd, maxh2cdata=self.maxh2cdata))
        rx = self.rx
        rx.ic_done = True
        rx.hdgst = self.hdgst = hd
        rx.ddgst = self.ddgst = dd
        self.hpda = hpda
        self.ic_done = True
        self._update_fast()

    def _h2c_sink(self, ptype, hdr):
        _t, _f, _hl, _pdo, _pl, cccid, ttag, datao, datal = _DATA_HDR_UNPACK(hdr, 0)
        x = self.xfers.get(ttag)
        if x is None:
            raise RemoteProtocolError(f"H2CData for unknown TTAG {ttag}",
                                      TermReqFes.INVALID_HEADER_FIELD, 10, bytes(hdr))
        if x[0] != cccid:
            raise RemoteProtocolError(f"H2CData CCCID {cccid} does not match TTAG {ttag}",
                                      TermReqFes.INVALID_HEADER_FIELD, 8, bytes(hdr))
        if datao != x[2]:
            raise RemoteProtocolError(f"H2CData DATAO {datao}, expected {x[2]}",
                                      TermReqFes.DATA_TRANSFER_OUT_OF_RANGE, 12, bytes(hdr))
        if datal > self.maxh2cdata:
            raise RemoteProtocolError(f"H2CData DATAL {datal} exceeds MAXH2CDATA",
                                      TermReqFes.DATA_TRANSFER_LIMIT_EXCEEDED, 16, bytes(hdr))
        if datao + datal > x[3]:
            raise RemoteProtocolError("H2CData beyond the R2T",
                                      TermReqFes.DATA_TRANSFER_OUT_OF_RANGE, 16, bytes(hdr))
        return memoryview(x[1])[datao:datao + datal]

    def _h2c_done(self, flags: int, hdr, ok: bool) -> None:
        ttag, datal = _DATA_HDR_UNPACK(hdr, 0)[6], _DATA_HDR_UNPACK(hdr, 0)[8]
        x = self.xfers[ttag]
        x[2] += datal
        if not ok:
            x[4] = True
        if x[2] < x[3]:
            if flags & _F_LAST:
                raise RemoteProtocolError("LAST_PDU before the R2T was satisfied",
                                          TermReqFes.INVALID_HEADER_FIELD, 1, bytes(hdr))
            return
        del self.xfers[ttag]
        if x[4]:
            self._resp(x[0], C.TRANSIENT_TRANSPORT_ERROR)
        else:
            x[5](x[1])

    def _capsule(self, hdr, data, ok: bool) -> None:
        (_t, _f, _hl, _pdo, _pl, opc, _fl, cid, nsid, _c2, _c3, _mptr, sgl_addr, sgl_len,
         sgl_type, c10, c11, c12, c13, _c14, _c15) = _CMD_UNPACK(hdr, 0)
        if self.sqflow:
            self.sqhd = (self.sqhd + 1) % self.sqsize1
        if self.faults.rules and self.connected:
            rule = self.faults.match(self.qid, self.ctrl.cntlid, opc, nsid)
            if rule is not None:
                self._faulted(rule, opc, cid, nsid, sgl_addr, sgl_len, sgl_type, c10, c11, c12,
                              c13, data, ok)
                return
        if self.io and opc == _OPC_READ and self.fast and ok:
            # Hot path: a read with no digests.
            ns = self.nss.get(nsid)
            if ns is not None and ns.fast:
                nlb = (c12 & 0xFFFF) + 1
                slba = c10 | (c11 << 32)
                lbads = ns.lbads
                n = nlb << lbads
                if (slba + nlb <= ns.nblocks and n <= sgl_len and n <= self.max_io
                        and sgl_type == _SGL_TRANSPORT):
                    buf = ns.backend.read(slba << lbads, n)
                    self.n_read += 1
                    self.b_read += n
                    self.views = True
                    out = self.out
                    if self.sqflow:
                        out.append(_C2H_PACK(_T_C2H, _F_LAST, 24, 24, 24 + n, cid, 0, 0, n))
                        out.append(buf)
                        out.append(_RESP_PACK(_T_RESP, 0, 24, 0, 24, 0, 0, self.sqhd, self.qid,
                                              cid, 0))
                    else:
                        out.append(_C2H_PACK(_T_C2H, _F_LAST_SUCCESS, 24, 24, 24 + n, cid, 0, 0,
                                             n))
                        out.append(buf)
                    return
        self._dispatch(opc, cid, nsid, sgl_addr, sgl_len, sgl_type, c10, c11, c12, c13, data, ok)

    def _faulted(self, rule, opc, cid, nsid, sgl_addr, sgl_len, sgl_type, c10, c11, c12, c13,
                 data, ok) -> None:
        if rule.action == "error":
            self._resp(cid, rule.status)
            return
        saved = self.out
        self.out = tmp = []
        try:
            self._dispatch(opc, cid, nsid, sgl_addr, sgl_len, sgl_type, c10, c11, c12, c13, data,
                           ok)
        finally:
            self.out = saved
        if rule.action == "drop":
            self.held.add(cid)
            return
        bufs = [bytes(b) for b in tmp]
        if self.defer is None:
            saved.extend(bufs)
        else:
            self.defer(rule.delay_ms / 1000.0, bufs)

    def _dispatch(self, opc, cid, nsid, sgl_addr, sgl_len, sgl_type, c10, c11, c12, c13, data,
                  ok) -> None:
        if not ok:
            self._resp(cid, C.TRANSIENT_TRANSPORT_ERROR)       # data digest error
            return
        if opc == _OPC_FABRICS:
            self._fabrics(cid, nsid & 0xFF, sgl_addr, sgl_len, sgl_type, c10, c11, c12, c13, data)
            return
        if not self.connected:
            self._resp(cid, C.COMMAND_SEQUENCE_ERROR)
            return
        if self.io:
            self._io(opc, cid, nsid, sgl_addr, sgl_len, sgl_type, c10, c11, c12, c13, data)
            return
        ctrl = self.ctrl
        if not ctrl.ready:
            self._resp(cid, C.COMMAND_SEQUENCE_ERROR)     # nvmet_check_ctrl_status
            return
        r = ctrl.admin(opc, cid, nsid, c10, c11, c12, c13, sgl_len)
        if r is HOLD:
            return
        status, dw0, dw1, payload = r
        if payload is not None and status == 0 and sgl_len:
            if len(payload) > sgl_len:
                payload = payload[:sgl_len]
            self._send_data(cid, payload, dw0, dw1)
        else:
            self._resp(cid, status, dw0, dw1)

    def _with_data(self, cid, sgl_addr, sgl_len, sgl_type, data, cont) -> None:
        """Run `cont(data)` with the command's host-to-controller data: in-capsule or via R2T."""
        if sgl_type == SGL_DATA_BLOCK_OFFSET:
            if sgl_addr != 0:
                self._resp(cid, C.SGL_OFFSET_INVALID)
            elif data is None or len(data) != sgl_len or sgl_len > self.icd_limit:
                self._resp(cid, C.SGL_LENGTH_INVALID)
            else:
                cont(data)
        elif sgl_type == SGL_TRANSPORT_DATA_BLOCK:
            if data is not None:
                self._resp(cid, C.SGL_TYPE_INVALID)
            elif sgl_len == 0:
                cont(b"")
            else:
                self._r2t(cid, sgl_len, cont)
        else:
            self._resp(cid, C.SGL_TYPE_INVALID)

    # -- fabrics commands ------------------------------------------------------------------
    def _fabrics(self, cid, fctype, sgl_addr, sgl_len, sgl_type, c10, c11, c12, c13, data):
        if fctype == FabricsType.CONNECT:
            if self.connected:
                self._resp(cid, C.COMMAND_SEQUENCE_ERROR)
                return
            if sgl_len < 1024:
                self._resp(cid, C.CONNECT_INVALID_PARAMETERS, _ipo(0, 32))
                return
            self._with_data(cid, sgl_addr, sgl_len, sgl_type, data,
                            lambda d: self._connect(cid, c10, c11, c12, d))
            return
        if not self.connected:
            self._resp(cid, C.COMMAND_SEQUENCE_ERROR)
            return
        if fctype == FabricsType.PROPERTY_GET and self.qid == 0:
            status, value = self.ctrl.prop_get(bool(c10 & 7), c11)
            self._resp(cid, status, value & 0xFFFFFFFF, value >> 32)
        elif fctype == FabricsType.PROPERTY_SET and self.qid == 0:
            self._resp(cid, self.ctrl.prop_set(bool(c10 & 7), c11, c12 | (c13 << 32)))
        elif fctype == FabricsType.DISCONNECT:
            self._resp(cid, 0)
            self.close("host sent Disconnect")
        else:
            self._resp(cid, C.INVALID_OPCODE)

    def _connect(self, cid, c10, c11, c12, data) -> None:
        t = self.t
        recfmt, qid = c10 & 0xFFFF, c10 >> 16
        sqsize, cattr, kato = c11 & 0xFFFF, (c11 >> 16) & 0xFF, c12
        hostid, cntlid, subnqn, hostnqn = parse_connect_data(bytes(data[:1024]))
        refusal = t.faults.take_refusal(qid)
        if refusal is not None:
            self._resp(cid, refusal[0], refusal[1])
            return
        if recfmt != 0:
            self._resp(cid, C.CONNECT_INCOMPATIBLE_FORMAT)
            return
        sub = t.find_subsystem(subnqn)
        if sub is None:
            self._resp(cid, C.CONNECT_INVALID_PARAMETERS, _ipo(1, 256))
            return
        if not sub.discovery and not sub.host_allowed(hostnqn):
            self._resp(cid, C.CONNECT_INVALID_HOST, _ipo(1, 512))
            return
        if sqsize == 0 or sqsize > t.mqes:
            self._resp(cid, C.CONNECT_INVALID_PARAMETERS, _ipo(0, 44))
            return
        if qid == 0:
            if cntlid != 0xFFFF:
                self._resp(cid, C.CONNECT_INVALID_PARAMETERS, _ipo(1, 16))
                return
            ctrl = Controller(sub, t.alloc_cntlid(), hostnqn, hostid, kato)
            sub.controllers[ctrl.cntlid] = ctrl
            ctrl.attach(0, self)
            if t.on_controller_added is not None:
                t.on_controller_added(ctrl)
        else:
            ctrl = sub.controllers.get(cntlid)
            if sub.discovery:
                self._resp(cid, C.CONNECT_INVALID_PARAMETERS, _ipo(0, 42))
                return
            if ctrl is None or ctrl.closed:
                self._resp(cid, C.CONNECT_INVALID_PARAMETERS, _ipo(1, 16))
                return
            if ctrl.hostnqn != hostnqn:
                self._resp(cid, C.CONNECT_INVALID_PARAMETERS, _ipo(1, 512))
                return
            if ctrl.hostid != hostid:     # nvmet: "hostid mismatch"
                self._resp(cid, C.CONNECT_INVALID_PARAMETERS, _ipo(1, 0))
                return
            if not ctrl.ready:
                self._resp(cid, C.COMMAND_SEQUENCE_ERROR)
                return
            if qid > ctrl.max_qid or qid in ctrl.queues:
                self._resp(cid, C.CONNECT_INVALID_PARAMETERS, _ipo(0, 42))
                return
            ctrl.attach(qid, self)
        self.connected = True
        self.qid = qid
        self.ctrl = ctrl
        self.nss = sub.namespaces
        self.io = qid > 0
        self.icd_limit = t.io_in_capsule if qid else ADMIN_QUEUE_IN_CAPSULE
        self.sqflow = not cattr & CONNECT_CATTR_DISABLE_SQ_FLOW_CONTROL
        self.sqsize1 = sqsize + 1
        self.sqhd = 1 % self.sqsize1 if self.sqflow else 0
        self._resp(cid, 0, ctrl.cntlid)

    # -- I/O commands ----------------------------------------------------------------------
    def _io(self, opc, cid, nsid, sgl_addr, sgl_len, sgl_type, c10, c11, c12, c13, data):
        try:
            self._io_inner(opc, cid, nsid, sgl_addr, sgl_len, sgl_type, c10, c11, c12, c13, data)
        except OSError as e:
            # A file backend failed (EIO, ENOSPC...): the command fails, the queue lives on.
            self._resp(cid, C.UNRECOVERED_READ_ERROR if opc == IoOpcode.READ else C.WRITE_FAULT)
            self.t.backend_errors.append(f"nsid {nsid} opcode {opc}: {e}")

    def _io_inner(self, opc, cid, nsid, sgl_addr, sgl_len, sgl_type, c10, c11, c12, c13, data):
        ns = self.nss.get(nsid)
        if opc == IoOpcode.FLUSH:
            if nsid == 0xFFFFFFFF:
                for n in list(self.nss.values()):
                    n.backend.flush()
            elif ns is None:
                self._resp(cid, C.INVALID_NS)
                return
            else:
                ns.backend.flush()
            self._resp(cid, 0)
            return
        if ns is None:
            self._resp(cid, C.INVALID_NS)
            return
        if opc in (IoOpcode.READ, IoOpcode.WRITE, IoOpcode.WRITE_ZEROES):
            slba = c10 | (c11 << 32)
            nlb = (c12 & 0xFFFF) + 1
            if slba + nlb > ns.nblocks:
                self._resp(cid, C.LBA_OUT_OF_RANGE)
                return
            off, n = slba << ns.lbads, nlb << ns.lbads
            if opc == IoOpcode.WRITE_ZEROES:
                self.materialize()
                ns.backend.zero(off, n)
                self._resp(cid, 0)
                return
            if n > self.max_io:
                self._resp(cid, C.INVALID_FIELD)
                return
            if sgl_len < n:
                self._resp(cid, C.SGL_LENGTH_INVALID)
                return
            if opc == IoOpcode.READ:
                if sgl_type != SGL_TRANSPORT_DATA_BLOCK:
                    self._resp(cid, C.SGL_TYPE_INVALID)
                    return
                buf = ns.backend.read(off, n)
                self.n_read += 1
                self.b_read += n
                self.views = True
                self._send_data(cid, buf)
                return
            if sgl_len != n:
                self._resp(cid, C.SGL_LENGTH_INVALID)
                return
            fua = bool(c12 & RW_FUA)
            self._with_data(cid, sgl_addr, sgl_len, sgl_type, data,
                            lambda d: self._write(cid, ns, off, d, fua))
            return
        if opc == IoOpcode.DATASET_MANAGEMENT:
            nr = (c10 & 0xFF) + 1
            if sgl_len < nr * 16:
                self._resp(cid, C.SGL_LENGTH_INVALID)
                return
            self._with_data(cid, sgl_addr, sgl_len, sgl_type, data,
                            lambda d: self._dsm(cid, ns, nr, c11, d))
            return
        self._resp(cid, C.INVALID_OPCODE)

    def _write(self, cid, ns, off, data, fua) -> None:
        try:
            self._write_inner(cid, ns, off, data, fua)
        except OSError as e:
            self._resp(cid, C.WRITE_FAULT)
            self.t.backend_errors.append(f"nsid {ns.nsid} write: {e}")

    def _write_inner(self, cid, ns, off, data, fua) -> None:
        if self.nss.get(ns.nsid) is not ns:
            self._resp(cid, C.INVALID_NS)        # removed while the data was in flight
            return
        if off + len(data) > ns.nblocks << ns.lbads:
            self._resp(cid, C.LBA_OUT_OF_RANGE)  # shrunk meanwhile
            return
        self.materialize()
        ns.backend.write(off, data)
        if fua and ns.backend.volatile_cache:
            ns.backend.flush()
        self.n_write += 1
        self.b_written += len(data)
        self._resp(cid, 0)

    def _dsm(self, cid, ns, nr, c11, data) -> None:
        try:
            self._dsm_inner(cid, ns, nr, c11, data)
        except OSError as e:
            self._resp(cid, C.WRITE_FAULT)
            self.t.backend_errors.append(f"nsid {ns.nsid} deallocate: {e}")

    def _dsm_inner(self, cid, ns, nr, c11, data) -> None:
        ranges = [DSM_RANGE.unpack_from(data, 16 * i) for i in range(nr)]
        for _attr, nlb, slba in ranges:
            if slba + nlb > ns.nblocks:
                self._resp(cid, C.LBA_OUT_OF_RANGE)
                return
        if c11 & DSM_AD:
            self.materialize()
            for _attr, nlb, slba in ranges:
                if nlb:
                    ns.backend.zero(slba << ns.lbads, nlb << ns.lbads)
        self._resp(cid, 0)

    def info(self) -> dict:
        return {"peer": self.peer, "qid": self.qid if self.connected else None,
                "cntlid": self.ctrl.cntlid if self.ctrl else None, "hdgst": self.hdgst,
                "ddgst": self.ddgst, "sq_flow_control": self.sqflow,
                "sqsize": self.sqsize1 - 1, "reads": self.n_read, "writes": self.n_write,
                "held": sorted(self.held)}

