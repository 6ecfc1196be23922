"""Hand-built NVMe/TCP PDUs and feeding harnesses for the initiator's sans-IO unit tests.

Everything here is written from the specification layouts (NVMe/TCP 1.0 section 3.6, NVMe Base
4.2 / 4.6), independently of `initiator._pdu`, so tests can check the code under test against it.
The CRC32C is a plain table implementation of the Castagnoli polynomial (reflected 0x82F63B78,
seed ~0, final xor ~0), not the `crc32c` package the initiator uses.

No sockets, no clock.
"""

from __future__ import annotations

import struct

from initiator._tcp import COMPLETION, IC_DONE, SEND, TERM, HostQueue

# ---------------------------------------------------------------------------------------------
# CRC32C (RFC 3720 appendix B.4 / NVMe/TCP 3.6.1: HDGST and DDGST).

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c_ref(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in bytes(data):
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def dgst(data: bytes) -> bytes:
    """A digest as it goes on the wire: little-endian."""
    return struct.pack("<I", crc32c_ref(data))


# ---------------------------------------------------------------------------------------------
# PDU types and flags (NVMe/TCP 3.3), spelled out again on purpose.

IC_REQ, IC_RESP, H2C_TERM, C2H_TERM, CMD, RESP, H2C, C2H, R2T = 0, 1, 2, 3, 4, 5, 6, 7, 9
F_HDGST, F_DDGST, F_LAST, F_SUCCESS = 0x01, 0x02, 0x04, 0x08


def ch(ptype: int, flags: int, hlen: int, pdo: int, plen: int) -> bytes:
    """Common header: type @0, flags @1, hlen @2, pdo @3, plen @4 (le32)."""
    return struct.pack("<BBBBI", ptype, flags, hlen, pdo, plen)


def icresp(*, pfv: int = 0, cpda: int = 0, hdgst: bool = False, ddgst: bool = False,
           maxh2cdata: int = 131072) -> bytes:
    """ICResp (128 B): pfv @8 (le16), cpda @10, dgst @11 (bit0 HDGST, bit1 DDGST),
    maxh2cdata @12 (le32), 112 reserved bytes."""
    d = (1 if hdgst else 0) | (2 if ddgst else 0)
    return (ch(IC_RESP, 0, 128, 0, 128) + struct.pack("<HBBI", pfv, cpda, d, maxh2cdata)
            + bytes(112))


def resp(cid: int, status: int = 0, *, dw0: int = 0, dw1: int = 0, sqhd: int = 0,
         sqid: int = 0, hdgst: bool = False) -> bytes:
    """CapsuleResp: CH + 16-byte CQE (dw0, dw1, sqhd, sqid, cid, status incl. phase bit 0)."""
    hdr = (ch(RESP, F_HDGST if hdgst else 0, 24, 0, 28 if hdgst else 24)
           + struct.pack("<IIHHHH", dw0, dw1, sqhd, sqid, cid, status))
    return hdr + dgst(hdr) if hdgst else hdr


def c2h(cid: int, datao: int, data: bytes, *, last: bool = True, success: bool = False,
        hdgst: bool = False, ddgst: bool = False, pad: int = 0, ttag: int = 0,
        bad_ddgst: bool = False) -> bytes:
    """C2HData: cccid @8, ttag @10, datao @12, datal @16, rsvd @20;
    then [HDGST] [padding up to PDO] data [DDGST]."""
    flags = ((F_LAST if last else 0) | (F_SUCCESS if success else 0)
             | (F_HDGST if hdgst else 0) | (F_DDGST if ddgst else 0))
    pdo = 24 + (4 if hdgst else 0) + pad
    plen = pdo + len(data) + (4 if ddgst else 0)
    hdr = ch(C2H, flags, 24, pdo, plen) + struct.pack("<HHIII", cid, ttag, datao, len(data), 0)
    out = hdr + (dgst(hdr) if hdgst else b"") + bytes(pad) + data
    if ddgst:
        d = crc32c_ref(data) ^ (0xDEADBEEF if bad_ddgst else 0)
        out += struct.pack("<I", d)
    return out


def r2t(cid: int, ttag: int, r2to: int, r2tl: int, *, hdgst: bool = False) -> bytes:
    """R2T: cccid @8, ttag @10, r2to @12, r2tl @16, rsvd @20."""
    hdr = ch(R2T, F_HDGST if hdgst else 0, 24, 0, 28 if hdgst else 24) + struct.pack(
        "<HHIII", cid, ttag, r2to, r2tl, 0)
    return hdr + dgst(hdr) if hdgst else hdr


def c2h_term(fes: int, fei: int = 0, offending: bytes = b"") -> bytes:
    """C2HTermReq: fes @8 (le16), fei @10 (le32), 10 reserved bytes, then the offending header."""
    return (ch(C2H_TERM, 0, 24, 0, 24 + len(offending)) + struct.pack("<HI", fes, fei)
            + bytes(10) + offending)


def status(sct: int, sc: int, dnr: bool = False) -> int:
    """CQE status field (dword 3 bits 31:16): P bit0, SC 8:1, SCT 11:9, DNR 15."""
    return (sc << 1) | (sct << 9) | (0x8000 if dnr else 0)


# ---------------------------------------------------------------------------------------------
# Driving a HostQueue.

def norm(ev):
    """Events with their buffers turned into bytes (SEND carries memoryviews into our data)."""
    if ev[0] == SEND:
        return (SEND, [bytes(b) for b in ev[1]])
    return ev


def drain(q: HostQueue, out: list) -> None:
    """Every event now, the way the trio shell takes them: plain completions through the hot
    path (`completions()`, each one the event `next_event()` would give) before each
    `next_event()`. tests/unit/test_initiator_fuzz.py checks the two agree."""
    done: list = []
    while True:
        if q.completions(done):
            out.extend((COMPLETION, cid, 0, 0, 0) for cid in done)
            done.clear()
        ev = q.next_event()
        if ev is None:
            return
        out.append(norm(ev))


def feed_chunks(q: HostQueue, chunks) -> tuple[list, Exception | None]:
    """receive_data each chunk, draining events after each; stop at the first error."""
    events: list = []
    try:
        for c in chunks:
            q.receive_data(c)
            drain(q, events)
    except Exception as e:  # noqa: BLE001 - the caller asserts on the type
        return events, e
    return events, None


def feed_recv_into(q: HostQueue, stream: bytes, step: int) -> tuple[list, Exception | None]:
    """The shell's zero-copy path: recv_into the payload sink when there is one, else buffer()."""
    events: list = []
    pos = 0
    rx = q.rx
    try:
        while pos < len(stream):
            sink = rx.payload_sink()
            if sink is not None:
                n = min(len(sink), step, len(stream) - pos)
                sink[:n] = stream[pos:pos + n]
                rx.received_into_sink(n)
            else:
                room = q.buffer()
                n = min(len(room), step, len(stream) - pos)
                room[:n] = stream[pos:pos + n]
                q.received(n)
            pos += n
            drain(q, events)
    except Exception as e:  # noqa: BLE001
        return events, e
    return events, None


MODES = ("whole", "coalesced", "bytewise", "recv_into_7", "recv_into_4k")


def split(pdus: list[bytes], mode: str) -> list[bytes]:
    """The stream of `pdus` cut the way `mode` says.

    whole: one chunk. coalesced: cuts in the middle of every PDU, so each chunk carries the end
    of one PDU and the start of the next. bytewise: one byte per chunk.
    """
    stream = b"".join(pdus)
    if mode == "whole":
        return [stream]
    if mode == "bytewise":
        return [stream[i:i + 1] for i in range(len(stream))]
    if mode == "coalesced":
        cuts, off = [], 0
        for p in pdus:
            cuts.append(off + len(p) // 2)
            off += len(p)
        bounds = [0, *cuts, len(stream)]
        return [stream[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    raise ValueError(mode)


def feed(q: HostQueue, pdus: list[bytes], mode: str) -> tuple[list, Exception | None]:
    if mode.startswith("recv_into_"):
        step = 4096 if mode.endswith("4k") else int(mode.rsplit("_", 1)[1])
        return feed_recv_into(q, b"".join(pdus), step)
    return feed_chunks(q, split(pdus, mode))


def connected(*, hdgst: bool = False, ddgst: bool = False, cpda: int = 0,
              maxh2cdata: int = 131072, depth: int = 8, qid: int = 1,
              in_capsule_max: int = 8192) -> HostQueue:
    """A HostQueue past the ICReq/ICResp exchange."""
    q = HostQueue(qid, depth, hdgst=hdgst, ddgst=ddgst, in_capsule_max=in_capsule_max)
    q.receive_data(icresp(cpda=cpda, hdgst=hdgst, ddgst=ddgst, maxh2cdata=maxh2cdata))
    ev = q.next_event()
    assert ev == (IC_DONE, maxh2cdata, cpda, hdgst, ddgst)
    assert q.next_event() is None
    return q


__all__ = [
    "COMPLETION", "IC_DONE", "SEND", "TERM", "MODES", "crc32c_ref", "dgst", "ch", "icresp",
    "resp", "c2h", "r2t", "c2h_term", "status", "norm", "drain", "feed", "feed_chunks",
    "feed_recv_into", "split", "connected",
]
