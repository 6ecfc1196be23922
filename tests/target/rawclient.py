"""A raw NVMe/TCP test host built from the initiator's role-neutral codecs (no initiator logic):
it sends exactly what a test tells it to and shows every PDU that comes back, so tests can check
the target on the wire (and send what no real host would)."""

from __future__ import annotations

import struct
import uuid

import trio

from initiator import _fabrics as fab
from initiator import _structs as st
from initiator._framing import HOST_ACCEPTS, PduReceiver
from initiator._pdu import (
    DATA_HDR, build_icreq, capsule_cmd_header, data_pdu_header, digest_bytes, parse_ic,
    parse_term_req, sqe,
)
from initiator._spec import (
    AdminOpcode, CC_EN, CC_IOCQES, CC_IOSQES, CSTS_RDY, PduType, Property,
)

NQN = "nqn.2026-01.io.blockfs:test"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
HOSTID = "11111111-2222-3333-4444-555555555555"
C2H = int(PduType.C2H_DATA)
RESP = int(PduType.CAPSULE_RESP)
R2T = int(PduType.R2T)
TERM = int(PduType.C2H_TERM_REQ)


class TermReqReceived(Exception):
    def __init__(self, fes, fei):
        super().__init__(f"C2HTermReq fes={fes} fei={fei}")
        self.fes = fes
        self.fei = fei


class Closed(Exception):
    pass


class Completion:
    __slots__ = ("cid", "status", "dw0", "dw1", "sqhd", "sqid", "data", "success_flag", "ddgst_ok")

    def __init__(self, cid, status, dw0=0, dw1=0, sqhd=None, sqid=None, data=b"",
                 success_flag=False, ddgst_ok=True):
        self.cid, self.status, self.dw0, self.dw1 = cid, status, dw0, dw1
        self.sqhd, self.sqid, self.data = sqhd, sqid, data
        self.success_flag, self.ddgst_ok = success_flag, ddgst_ok

    @property
    def sct(self):
        return (self.status >> 9) & 7

    @property
    def sc(self):
        return (self.status >> 1) & 0xFF

    @property
    def dnr(self):
        return bool(self.status & 0x8000)

    def __repr__(self):
        return (f"Completion(cid={self.cid}, sct={self.sct}, sc=0x{self.sc:02x}, dw0=0x{self.dw0:x}, "
                f"sqhd={self.sqhd}, data={len(self.data)}B, success_flag={self.success_flag})")


class RawClient:
    def __init__(self, stream: trio.SocketStream):
        self.s = stream
        self.rx = PduReceiver(HOST_ACCEPTS, bufsize=4 << 20, max_capsule_data=16384)
        self._cid = 0
        self.done: dict[int, Completion] = {}
        self.data: dict[int, bytearray] = {}
        self.writes: dict[int, bytes] = {}
        self.r2ts: list[tuple] = []
        self.hdgst = self.ddgst = False
        self.maxh2cdata = 0
        self.cntlid = None
        self.pdus: list[tuple] = []     # every PDU received: (type, flags, header bytes)

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> "RawClient":
        return cls(await trio.open_tcp_stream(host, port))

    async def aclose(self):
        await self.s.aclose()

    # -- raw I/O --------------------------------------------------------------------------
    async def send(self, *bufs):
        try:
            await self.s.send_all(b"".join(bytes(b) for b in bufs))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise Closed(str(e))

    async def recv_pdu(self, timeout: float = 5.0):
        """-> (ptype, flags, header bytes, data bytes | None, ddgst_ok); raises Closed on EOF."""
        with trio.fail_after(timeout):
            while True:
                pdu = self.rx.next_pdu()
                if pdu is not None:
                    t, f, h, d, ok = pdu
                    rec = (t, f, bytes(h), None if d is None else bytes(d), ok)
                    self.pdus.append(rec[:3])
                    return rec
                buf = self.rx.buffer()
                try:
                    data = await self.s.receive_some(len(buf))
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    raise Closed(str(e))
                if not data:
                    raise Closed("EOF")
                buf[:len(data)] = data
                self.rx.received(len(data))

    async def expect_eof(self, timeout: float = 5.0) -> bool:
        with trio.fail_after(timeout):
            try:
                while True:
                    d = await self.s.receive_some(65536)
                    if not d:
                        return True
            except trio.BrokenResourceError:
                return True

    async def expect_term_req(self, timeout: float = 5.0) -> tuple[int, int]:
        while True:
            t, f, h, d, ok = await self.recv_pdu(timeout)
            if t == TERM:
                return parse_term_req(h)

    # -- connection set-up ---------------------------------------------------------------
    async def icreq(self, hdgst=False, ddgst=False, hpda=0):
        await self.send(build_icreq(hpda=hpda, hdgst=hdgst, ddgst=ddgst))
        t, f, h, d, ok = await self.recv_pdu()
        assert t == PduType.IC_RESP, t
        pfv, cpda, hd, dd, maxh2c = parse_ic(h)
        self.rx.ic_done = True
        self.rx.hdgst = self.hdgst = hd
        self.rx.ddgst = self.ddgst = dd
        self.maxh2cdata = maxh2c
        return pfv, cpda, hd, dd, maxh2c

    def next_cid(self) -> int:
        self._cid = (self._cid + 1) & 0xFFFF
        return self._cid

    async def send_cmd(self, cmd: bytearray, data: bytes = b"", in_capsule: bool = True) -> int:
        """Send a 64-byte SQE (CID filled in here); returns the CID."""
        cid = self.next_cid()
        struct.pack_into("<H", cmd, 2, cid)
        if data and in_capsule:
            struct.pack_into("<QI3xB", cmd, 24, 0, len(data), 0x01)
            hdr = capsule_cmd_header(cmd, len(data), self.hdgst, self.ddgst)
            await self.send(hdr, data, digest_bytes(data) if self.ddgst else b"")
        else:
            if data:
                self.writes[cid] = bytes(data)
                struct.pack_into("<QI3xB", cmd, 24, 0, len(data), 0x5A)
            await self.send(capsule_cmd_header(cmd, 0, self.hdgst, self.ddgst))
        return cid

    async def pump(self, timeout: float = 5.0) -> None:
        """Receive one PDU and account for it."""
        t, f, h, d, ok = await self.recv_pdu(timeout)
        if t == RESP:
            dw0, dw1, sqhd, sqid, cid, status = struct.unpack_from("<IIHHHH", h, 8)
            data = bytes(self.data.pop(cid, b""))
            self.done[cid] = Completion(cid, status & 0xFFFE, dw0, dw1, sqhd, sqid, data)
        elif t == C2H:
            cccid, ttag, datao, datal = DATA_HDR.unpack_from(h)[5:9]
            buf = self.data.setdefault(cccid, bytearray())
            assert datao == len(buf), (datao, len(buf))
            buf += d
            if not ok:
                self.done[cccid] = Completion(cccid, -1, data=bytes(buf), ddgst_ok=False)
            elif f & 0x08:
                self.done[cccid] = Completion(cccid, 0, data=bytes(self.data.pop(cccid)),
                                              success_flag=True)
        elif t == R2T:
            cccid, ttag, r2to, r2tl = DATA_HDR.unpack_from(h)[5:9]
            self.r2ts.append((cccid, ttag, r2to, r2tl))
            payload = self.writes[cccid]
            await self.send_h2c(cccid, ttag, payload[r2to:r2to + r2tl], r2to)
        elif t == TERM:
            raise TermReqReceived(*parse_term_req(h))
        else:
            raise AssertionError(f"unexpected PDU type {t}")

    async def send_h2c(self, cccid, ttag, payload: bytes, base: int = 0, chunk: int | None = None,
                       corrupt_ddgst: bool = False):
        chunk = chunk or self.maxh2cdata
        off = 0
        while off < len(payload):
            part = payload[off:off + chunk]
            last = off + len(part) >= len(payload)
            hdr = data_pdu_header(PduType.H2C_DATA, cccid, ttag, base + off, len(part), last=last,
                                  hdgst=self.hdgst, ddgst=self.ddgst)
            dd = b""
            if self.ddgst:
                dd = digest_bytes(part)
                if corrupt_ddgst:
                    dd = bytes(x ^ 0xFF for x in dd)
            await self.send(hdr, part, dd)
            off += len(part)

    async def wait(self, cid: int, timeout: float = 5.0) -> Completion:
        with trio.fail_after(timeout):
            while cid not in self.done:
                await self.pump(timeout)
        return self.done.pop(cid)

    async def submit(self, cmd, data: bytes = b"", in_capsule: bool = True, timeout: float = 5.0):
        cid = await self.send_cmd(cmd, data, in_capsule)
        return await self.wait(cid, timeout)

    # -- fabrics and admin helpers ---------------------------------------------------------
    async def connect(self, subnqn: str, qid: int = 0, *, hostnqn: str = HOSTNQN,
                      cntlid: int | None = None, sqsize: int = 31, kato: int = 0,
                      disable_sqflow: bool = False, in_capsule: bool = True,
                      hostid: str = HOSTID) -> Completion:
        cmd = fab.connect_sqe(qid, sqsize, kato, disable_sqflow=disable_sqflow)
        if cntlid is None:
            cntlid = 0xFFFF if qid == 0 else self.cntlid
        data = fab.connect_data(hostid, cntlid, subnqn, hostnqn)
        c = await self.submit(cmd, data, in_capsule=in_capsule)
        if c.status == 0 and qid == 0:
            self.cntlid = c.dw0 & 0xFFFF
        return c

    async def prop_get(self, offset: int, size8: bool = False) -> Completion:
        return await self.submit(fab.property_get_sqe(offset, size8))

    async def prop_set(self, offset: int, value: int, size8: bool = False) -> Completion:
        return await self.submit(fab.property_set_sqe(offset, value, size8))

    async def enable(self) -> None:
        c = await self.prop_set(Property.CC, CC_EN | CC_IOSQES | CC_IOCQES)
        assert c.status == 0, c
        c = await self.prop_get(Property.CSTS)
        assert c.dw0 & CSTS_RDY, c

    async def admin(self, opc, nsid=0, cdw10=0, cdw11=0, cdw12=0, cdw13=0, data_len=0,
                    timeout: float = 5.0) -> Completion:
        return await self.submit(sqe(opc, 0, nsid, cdw10, cdw11, cdw12, cdw13, data_len=data_len),
                                 timeout=timeout)

    async def identify(self, cns: int, nsid: int = 0) -> Completion:
        return await self.admin(AdminOpcode.IDENTIFY, nsid, cns, data_len=4096)

    async def get_log_page(self, lid: int, length: int, offset: int = 0, rae: bool = False,
                           nsid: int = 0xFFFFFFFF) -> Completion:
        numd = length // 4 - 1
        c10 = lid | (0x8000 if rae else 0) | ((numd & 0xFFFF) << 16)
        return await self.admin(AdminOpcode.GET_LOG_PAGE, nsid, c10, numd >> 16,
                                offset & 0xFFFFFFFF, offset >> 32, data_len=length)

    async def set_features(self, fid: int, cdw11: int) -> Completion:
        return await self.admin(AdminOpcode.SET_FEATURES, 0, fid, cdw11)

    async def get_features(self, fid: int, data_len: int = 0) -> Completion:
        return await self.admin(AdminOpcode.GET_FEATURES, 0, fid, data_len=data_len)

    async def keep_alive(self) -> Completion:
        return await self.admin(AdminOpcode.KEEP_ALIVE)

    async def bring_up(self, subnqn: str, kato: int = 0, disable_sqflow: bool = False,
                       hdgst=False, ddgst=False) -> st.IdentifyController:
        await self.icreq(hdgst, ddgst)
        c = await self.connect(subnqn, 0, kato=kato, disable_sqflow=disable_sqflow)
        assert c.status == 0, c
        await self.enable()
        c = await self.identify(1)
        assert c.status == 0, c
        return st.IdentifyController.from_bytes(c.data)

    # -- I/O helpers -------------------------------------------------------------------------
    async def read(self, nsid: int, slba: int, nlb: int, bs: int, timeout: float = 5.0):
        return await self.submit(sqe(0x02, 0, nsid, slba & 0xFFFFFFFF, slba >> 32, nlb - 1,
                                     data_len=nlb * bs), timeout=timeout)

    async def write(self, nsid: int, slba: int, data: bytes, bs: int, in_capsule: bool = True,
                    fua: bool = False, timeout: float = 5.0):
        nlb = len(data) // bs
        cmd = sqe(0x01, 0, nsid, slba & 0xFFFFFFFF, slba >> 32,
                  (nlb - 1) | ((1 << 30) if fua else 0), data_len=len(data))
        return await self.submit(cmd, data, in_capsule=in_capsule, timeout=timeout)


async def io_client(port: int, subnqn: str, cntlid: int, qid: int = 1, *, disable_sqflow=False,
                    hdgst=False, ddgst=False, sqsize: int = 127) -> RawClient:
    c = await RawClient.open(port)
    await c.icreq(hdgst, ddgst)
    c.cntlid = cntlid
    r = await c.connect(subnqn, qid, cntlid=cntlid, disable_sqflow=disable_sqflow, sqsize=sqsize)
    assert r.status == 0, r
    return c


def hostid() -> str:
    return str(uuid.UUID(HOSTID))

