"""NVMe/TCP PDU and NVMe SQE/CQE codecs: bytes in, ints and tuples out (and back).

Role-neutral: the initiator and the embedded target both build and parse with these. No state,
no I/O, no validation beyond what a codec needs; the framing state machine (`_framing.py`) and
the queue cores do the protocol checks. Layouts are NVMe/TCP 1.0 section 3.6 and NVMe Base 4.2.

Hot-path builders `pack_into` preallocated buffers and parsers `unpack_from` memoryviews
(hyperframe style); control-plane helpers return bytes.
"""

from __future__ import annotations

import struct

import crc32c as _crc32c

from ._spec import (
    NVME_TCP_DIGEST_LEN, PduFlags, PduType, PSDT_SGL, SGL_DATA_BLOCK_OFFSET,
    SGL_TRANSPORT_DATA_BLOCK, TermReqFes,
)

# ---------------------------------------------------------------------------------------------
# Wire structs (NVMe/TCP 3.6.1 common header is 8 bytes).
CH = struct.Struct("<BBBBI")                      # type, flags, hlen, pdo, plen
IC = struct.Struct("<BBBBIHBBI112x")              # ICReq/ICResp: + pfv, hpda|cpda, dgst, maxr2t|maxh2cdata
TERM = struct.Struct("<BBBBIHI10x")               # + fes, fei  (hlen 24)
DATA_HDR = struct.Struct("<BBBBIHHII4x")          # H2C/C2H data and R2T: + cccid, ttag, offset, length
SQE = struct.Struct("<BBHIIIQQI3xB6I")            # 64-byte submission queue entry
CQE = struct.Struct("<IIHHHH")                    # 16-byte completion queue entry
CMD_PDU = struct.Struct("<BBBBI" "BBHIIIQQI3xB6I")  # CapsuleCmd header: CH + SQE = 72 bytes
RESP_PDU = struct.Struct("<BBBBI" "IIHHHH")         # CapsuleResp: CH + CQE = 24 bytes
DIGEST = struct.Struct("<I")
assert CH.size == 8 and IC.size == 128 and TERM.size == 24 and DATA_HDR.size == 24
assert SQE.size == 64 and CQE.size == 16 and CMD_PDU.size == 72 and RESP_PDU.size == 24

HLEN = {
    PduType.IC_REQ: 128, PduType.IC_RESP: 128,
    PduType.H2C_TERM_REQ: 24, PduType.C2H_TERM_REQ: 24,
    PduType.CAPSULE_CMD: 72, PduType.CAPSULE_RESP: 24,
    PduType.H2C_DATA: 24, PduType.C2H_DATA: 24, PduType.R2T: 24,
}
# NVMe/TCP 3.6.1: IC and TermReq PDUs never carry digests.
HAS_HDGST = frozenset({PduType.CAPSULE_CMD, PduType.CAPSULE_RESP, PduType.H2C_DATA,
                       PduType.C2H_DATA, PduType.R2T})
HAS_DATA = frozenset({PduType.CAPSULE_CMD, PduType.H2C_DATA, PduType.C2H_DATA})
TERM_REQ_MAX_PLEN = 152   # NVMe/TCP 3.6.2.9: hlen 24 + up to 128 bytes of the offending PDU header

HDGSTF = int(PduFlags.HDGSTF)
DDGSTF = int(PduFlags.DDGSTF)
LAST_PDU = int(PduFlags.LAST_PDU)
SUCCESS = int(PduFlags.SUCCESS)


def crc32c(data, value: int = 0) -> int:
    """CRC32C as NVMe/TCP digests use it (seed ~0, final xor ~0; `value` continues a CRC)."""
    return _crc32c.crc32c(data, value)


def digest_bytes(data) -> bytes:
    return DIGEST.pack(_crc32c.crc32c(data))


def data_offset(hlen: int, hdgst: bool, cpda: int) -> int:
    """PDO for a PDU with data: header (+digest) rounded up to the (CPDA+1)*4 alignment."""
    end = hlen + (NVME_TCP_DIGEST_LEN if hdgst else 0)
    align = (cpda + 1) * 4
    return (end + align - 1) // align * align


# ---------------------------------------------------------------------------------------------
# Initialize Connection (NVMe/TCP 3.6.2.2 / 3.6.2.3)

def build_icreq(hpda: int = 0, hdgst: bool = False, ddgst: bool = False, maxr2t: int = 0) -> bytes:
    dgst = (1 if hdgst else 0) | (2 if ddgst else 0)
    return IC.pack(PduType.IC_REQ, 0, 128, 0, 128, 0, hpda, dgst, maxr2t)


def build_icresp(cpda: int = 0, hdgst: bool = False, ddgst: bool = False,
                 maxh2cdata: int = 131072) -> bytes:
    dgst = (1 if hdgst else 0) | (2 if ddgst else 0)
    return IC.pack(PduType.IC_RESP, 0, 128, 0, 128, 0, cpda, dgst, maxh2cdata)


def parse_ic(hdr) -> tuple[int, int, bool, bool, int]:
    """-> (pfv, hpda-or-cpda, hdgst, ddgst, maxr2t-or-maxh2cdata)."""
    _t, _f, _hl, _pdo, _pl, pfv, pda, dgst, last = IC.unpack_from(hdr, 0)
    return pfv, pda, bool(dgst & 1), bool(dgst & 2), last


# ---------------------------------------------------------------------------------------------
# Termination requests (NVMe/TCP 3.6.2.4 / 3.6.2.5)

def build_term_req(pdu_type: int, fes: int, fei: int = 0, offending: bytes = b"") -> bytes:
    """A TermReq carrying up to 128 bytes of the offending PDU header."""
    data = bytes(offending[:TERM_REQ_MAX_PLEN - 24])
    # NVMe/TCP 3.6.2.4: FEI is the offending field's byte offset for FES 01h (invalid header
    # field) and 06h (unsupported parameter); for every other FES it is reserved: send zero.
    if fes not in (TermReqFes.INVALID_HEADER_FIELD, TermReqFes.UNSUPPORTED_PARAMETER):
        fei = 0
    return TERM.pack(pdu_type, 0, 24, 0, 24 + len(data), fes, fei) + data


def parse_term_req(hdr) -> tuple[int, int]:
    """-> (fes, fei)."""
    return TERM.unpack_from(hdr, 0)[5:7]


# ---------------------------------------------------------------------------------------------
# Capsules (NVMe/TCP 3.6.2.6 / 3.6.2.7)

def sqe(opc: int, cid: int = 0, nsid: int = 0, cdw10: int = 0, cdw11: int = 0, cdw12: int = 0,
        cdw13: int = 0, cdw14: int = 0, cdw15: int = 0, *, data_len: int = 0,
        in_capsule: bool = False, cdw2: int = 0, cdw3: int = 0) -> bytearray:
    """A 64-byte SQE with the SGL descriptor a fabrics host uses (Base 4.3.2).

    In-capsule data: Data Block / Offset descriptor at offset 0. Data moved by C2HData/R2T
    (or no data): Transport Data Block descriptor, as the kernel and SPDK hosts send.
    """
    buf = bytearray(64)
    SQE.pack_into(buf, 0, opc, PSDT_SGL, cid, nsid, cdw2, cdw3, 0, 0, data_len,
                  SGL_DATA_BLOCK_OFFSET if in_capsule else SGL_TRANSPORT_DATA_BLOCK,
                  cdw10 & 0xFFFFFFFF, cdw11 & 0xFFFFFFFF, cdw12 & 0xFFFFFFFF,
                  cdw13 & 0xFFFFFFFF, cdw14 & 0xFFFFFFFF, cdw15 & 0xFFFFFFFF)
    return buf


def sqe_set_cid(buf: bytearray, cid: int, offset: int = 0) -> None:
    struct.pack_into("<H", buf, offset + 2, cid)


def parse_sqe(buf, offset: int = 0) -> tuple:
    """-> (opc, flags, cid, nsid, cdw2, cdw3, mptr, sgl_addr, sgl_len, sgl_type, cdw10..cdw15)."""
    return SQE.unpack_from(buf, offset)


def capsule_cmd_header(sqe_bytes, data_len: int, hdgst: bool, ddgst: bool, cpda: int = 0) -> bytes:
    """CapsuleCmd PDU header (+ header digest + padding) for `sqe_bytes` and `data_len` in-capsule bytes."""
    flags = (HDGSTF if hdgst else 0)
    hd = NVME_TCP_DIGEST_LEN if hdgst else 0
    if data_len:
        pdo = data_offset(72, hdgst, cpda)
        flags |= DDGSTF if ddgst else 0
        plen = pdo + data_len + (NVME_TCP_DIGEST_LEN if ddgst else 0)
    else:
        pdo = 0
        plen = 72 + hd
    hdr = bytearray(CH.pack(PduType.CAPSULE_CMD, flags, 72, pdo, plen))
    hdr += sqe_bytes
    if hdgst:
        hdr += digest_bytes(hdr)
    if data_len and pdo > 72 + hd:
        hdr += bytes(pdo - 72 - hd)
    return bytes(hdr)


def build_capsule_resp(cid: int, status: int = 0, dw0: int = 0, dw1: int = 0, sqhd: int = 0,
                       sqid: int = 0, hdgst: bool = False) -> bytes:
    """`status` is the 15-bit status field (sc << 1 | sct << 9 | ...), phase bit clear."""
    flags = HDGSTF if hdgst else 0
    plen = 24 + (4 if hdgst else 0)
    pdu = RESP_PDU.pack(PduType.CAPSULE_RESP, flags, 24, 0, plen, dw0 & 0xFFFFFFFF,
                        dw1 & 0xFFFFFFFF, sqhd, sqid, cid, status & 0xFFFF)
    return pdu + digest_bytes(pdu) if hdgst else pdu


def parse_capsule_resp(hdr) -> tuple[int, int, int, int, int, int]:
    """-> (dw0, dw1, sqhd, sqid, cid, status)."""
    return CQE.unpack_from(hdr, 8)


def make_status(sct: int, sc: int, dnr: bool = False, more: bool = False) -> int:
    """Status field value (CQE dword 3 bits 31:16, phase bit 0 clear)."""
    return (sc << 1) | (sct << 9) | (0x4000 if more else 0) | (0x8000 if dnr else 0)


# ---------------------------------------------------------------------------------------------
# Data transfer PDUs (NVMe/TCP 3.6.2.8 H2CData, 3.6.2.9 C2HData, 3.6.2.10 R2T)

def data_pdu_header(pdu_type: int, cccid: int, ttag: int, datao: int, datal: int, *,
                    last: bool, success: bool = False, hdgst: bool = False, ddgst: bool = False,
                    cpda: int = 0) -> bytes:
    """Header (+ header digest + padding) of an H2CData or C2HData PDU carrying `datal` bytes."""
    flags = (LAST_PDU if last else 0) | (SUCCESS if success else 0)
    flags |= (HDGSTF if hdgst else 0) | (DDGSTF if ddgst else 0)
    hd = NVME_TCP_DIGEST_LEN if hdgst else 0
    pdo = data_offset(24, hdgst, cpda)
    plen = pdo + datal + (NVME_TCP_DIGEST_LEN if ddgst else 0)
    hdr = DATA_HDR.pack(pdu_type, flags, 24, pdo, plen, cccid, ttag, datao, datal)
    if hdgst:
        hdr += digest_bytes(hdr)
    if pdo > 24 + hd:
        hdr += bytes(pdo - 24 - hd)
    return hdr


def build_r2t(cccid: int, ttag: int, r2to: int, r2tl: int, hdgst: bool = False) -> bytes:
    plen = 24 + (4 if hdgst else 0)
    hdr = DATA_HDR.pack(PduType.R2T, HDGSTF if hdgst else 0, 24, 0, plen, cccid, ttag, r2to, r2tl)
    return hdr + digest_bytes(hdr) if hdgst else hdr


def parse_data_hdr(hdr) -> tuple[int, int, int, int]:
    """H2CData/C2HData/R2T -> (cccid, ttag, offset, length)."""
    return DATA_HDR.unpack_from(hdr, 0)[5:9]
