"""Golden bytes for every NVMe/TCP PDU the initiator builds or parses, SQE/CQE encodings, the
Fabrics commands, and CRC32C digest vectors.

Expected bytes are written out by hand from the specification layouts (NVMe/TCP 1.0 section 3.6,
NVMe Base 4.2/4.6, NVMe-oF 1.1 section 3.3); digests come from the reference CRC32C in
tests/helpers (a table implementation, checked here against published vectors), never from the
code under test.
"""

from __future__ import annotations

import pytest

from helpers.nvme_tcp_wire import COMPLETION, SEND, connected, crc32c_ref, dgst, r2t
from initiator import _fabrics as fab
from initiator import _pdu as pdu
from initiator._spec import AdminOpcode, FabricsType, IoOpcode, PduType, Property
from initiator._errors import LocalProtocolError
from initiator._tcp import HostQueue


def h(s: str) -> bytes:
    """Hex with spaces and newlines for readability."""
    return bytes.fromhex("".join(s.split()))


# ---------------------------------------------------------------------------------------------
# CRC32C vectors (RFC 3720 B.4, the iSCSI/NVMe/TCP polynomial) and the digest helpers.

CRC_VECTORS = [
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"", 0x00000000),
]


@pytest.mark.parametrize("data,crc", CRC_VECTORS)
def test_crc32c_reference_vectors(data, crc):
    assert crc32c_ref(data) == crc          # the test oracle itself
    assert pdu.crc32c(data) == crc          # the initiator's


def test_crc32c_continues_a_running_value():
    data = bytes(range(256)) * 3
    partial = pdu.crc32c(data[:100])
    assert pdu.crc32c(data[100:], partial) == crc32c_ref(data)


def test_digest_bytes_are_little_endian():
    assert pdu.digest_bytes(b"123456789") == h("83 92 06 e3")
    assert dgst(bytes(32)) == h("aa 36 91 8a")


def test_data_offset_rounds_up_to_the_pda():
    # (CPDA + 1) * 4 bytes alignment, after the header and its digest.
    assert pdu.data_offset(24, False, 0) == 24
    assert pdu.data_offset(24, True, 0) == 28
    assert pdu.data_offset(24, True, 3) == 32
    assert pdu.data_offset(72, False, 3) == 80
    assert pdu.data_offset(72, True, 0) == 76
    assert pdu.data_offset(72, True, 31) == 128


# ---------------------------------------------------------------------------------------------
# ICReq / ICResp (NVMe/TCP 3.6.2.2, 3.6.2.3): 128 bytes; PFV @8, HPDA/CPDA @10, DGST @11,
# MAXR2T/MAXH2CDATA @12, 112 reserved bytes.

def test_icreq_plain():
    s = HostQueue(1, 4).icreq()
    assert s == h("00 00 80 00 80000000  0000 00 00 00000000") + bytes(112)


def test_icreq_with_digests_and_maxr2t():
    assert pdu.build_icreq(hdgst=True, ddgst=True, maxr2t=3) == (
        h("00 00 80 00 80000000  0000 00 03 03000000") + bytes(112))
    assert HostQueue(0, 4, hdgst=True).icreq() == (
        h("00 00 80 00 80000000  0000 00 01 00000000") + bytes(112))
    assert HostQueue(0, 4, ddgst=True, maxr2t=0xFFFF).icreq() == (
        h("00 00 80 00 80000000  0000 00 02 ffff0000") + bytes(112))


def test_icresp():
    s = pdu.build_icresp(cpda=2, hdgst=True, maxh2cdata=0x20000)
    assert s == h("01 00 80 00 80000000  0000 02 01 00000200") + bytes(112)
    assert pdu.parse_ic(s) == (0, 2, True, False, 0x20000)
    assert pdu.parse_ic(h("01 00 80 00 80000000  0100 1f 03 00100000") + bytes(112)) == (
        1, 31, True, True, 4096)


# ---------------------------------------------------------------------------------------------
# TermReq (NVMe/TCP 3.6.2.4/3.6.2.5): FES @8 (16 bits), FEI @10 (32 bits), 10 reserved bytes,
# then the header of the PDU in error (at most 128 bytes, so PLEN 24..152).

def test_h2c_term_req_with_offending_header():
    offending = h("05 00 17 00 18000000") + bytes(16)       # a CapsuleResp with HLEN 23
    s = pdu.build_term_req(PduType.H2C_TERM_REQ, 1, 2, offending)
    assert s == h("02 00 18 00 30000000  0100 02000000") + bytes(10) + offending
    assert pdu.parse_term_req(s) == (1, 2)


def test_term_req_without_header_and_truncated_header():
    assert pdu.build_term_req(PduType.C2H_TERM_REQ, 2) == (
        h("03 00 18 00 18000000  0200 00000000") + bytes(10))
    big = bytes(range(200))
    s = pdu.build_term_req(PduType.H2C_TERM_REQ, 1, 0, big)
    assert s[:8] == h("02 00 18 00 98000000")                   # PLEN 152
    assert s[24:] == big[:128]


def test_term_req_fei_only_for_header_field_and_parameter_errors():
    # FEI is a byte offset for FES 01h and 06h, reserved (zero) for the others.
    for fes in (2, 3, 4, 5):
        assert pdu.build_term_req(PduType.H2C_TERM_REQ, fes, 12) == (
            h("02 00 18 00 18000000") + bytes([fes, 0]) + bytes(14))
    assert pdu.build_term_req(PduType.C2H_TERM_REQ, 6, 8) == (
        h("03 00 18 00 18000000  0600 08000000") + bytes(10))


# ---------------------------------------------------------------------------------------------
# CapsuleCmd (NVMe/TCP 3.6.2.6): CH + the 64-byte SQE. SQE: OPC @0, byte 1 = PSDT 01b in bits
# 7:6 (0x40), CID @2, NSID @4, CDW2/3 @8, MPTR @16, SGL1 @24 (address 8, length 4, 3 reserved,
# type/subtype @39), CDW10..15 @40.

READ_SQE = h("""
    02 40 0000  01000000  00000000 00000000  0000000000000000
    0000000000000000  00100000 000000 5a
    34120000 00000000 07000000 00000000 00000000 00000000
""")


def test_sqe_builder_read():
    s = pdu.sqe(IoOpcode.READ, cid=0, nsid=1, cdw10=0x1234, cdw12=7, data_len=4096)
    assert bytes(s) == READ_SQE
    pdu.sqe_set_cid(s, 0xBEEF)
    assert s[2:4] == h("efbe")
    assert pdu.parse_sqe(s)[:10] == (2, 0x40, 0xBEEF, 1, 0, 0, 0, 0, 4096, 0x5A)


def test_capsule_cmd_read_72_bytes():
    q = connected()
    cid = q.alloc_cid()
    assert cid == 0
    bufs = q.command(cid, IoOpcode.READ, 1, cdw10=0x1234, cdw12=7,
                     read_buf=memoryview(bytearray(4096)))
    assert [bytes(b) for b in bufs] == [h("04 00 48 00 48000000") + READ_SQE]


def test_hot_path_read_capsule_golden_bytes():
    q = connected()
    out: list = []
    buf = bytearray(4096)
    q.read_cmd(q.alloc_cid(), 1, 0x1234, 7, buf, out)
    assert [bytes(b) for b in out] == [h("04 00 48 00 48000000") + READ_SQE]
    assert q.outstanding == 1 and q.active_cids() == [0]


@pytest.mark.parametrize("slba,cdw12", [(0, 0), (0x1234, 7), ((1 << 64) - 8, 0xFFFF),
                                         (0x89ABCDEF01234567, (1 << 30) | 3)])
@pytest.mark.parametrize("size", [512, 4096, 1 << 20])
def test_hot_path_read_is_the_general_read(slba, cdw12, size):
    a, b = connected(depth=4), connected(depth=4)
    ca, cb = a.alloc_cid(), b.alloc_cid()
    out: list = []
    a.read_cmd(ca, 7, slba, cdw12, memoryview(bytearray(size)), out)
    ref = b.command(cb, IoOpcode.READ, 7, slba & 0xFFFFFFFF, slba >> 32, cdw12,
                    read_buf=memoryview(bytearray(size)))
    assert [bytes(x) for x in out] == [bytes(x) for x in ref]


@pytest.mark.parametrize("size,cpda,in_capsule_max", [(512, 0, 8192), (4096, 0, 8192),
                                                      (8192, 0, 8192), (8704, 0, 8192),
                                                      (4096, 3, 8192), (65536, 0, 16384)])
def test_hot_path_write_is_the_general_write(size, cpda, in_capsule_max):
    a = connected(cpda=cpda, in_capsule_max=in_capsule_max)
    b = connected(cpda=cpda, in_capsule_max=in_capsule_max)
    data = bytes(range(256)) * (size // 256)
    out: list = []
    a.write_cmd(a.alloc_cid(), 1, 0x42, (size // 512 - 1) | (1 << 30), data, out)
    ref = b.command(b.alloc_cid(), IoOpcode.WRITE, 1, 0x42, 0, (size // 512 - 1) | (1 << 30),
                    data=data)
    assert [bytes(x) for x in out] == [bytes(x) for x in ref]
    assert len(out) == (2 if size <= in_capsule_max else 1)


@pytest.mark.parametrize("hd,dd", [(True, False), (False, True), (True, True)])
def test_hot_path_commands_with_digests_are_the_general_ones(hd, dd):
    a, b = connected(hdgst=hd, ddgst=dd), connected(hdgst=hd, ddgst=dd)
    out: list = []
    a.read_cmd(a.alloc_cid(), 1, 9, 7, bytearray(4096), out)
    a.write_cmd(a.alloc_cid(), 1, 9, 7, bytes(4096), out)
    ref = b.command(b.alloc_cid(), IoOpcode.READ, 1, 9, 0, 7, read_buf=bytearray(4096))
    ref += b.command(b.alloc_cid(), IoOpcode.WRITE, 1, 9, 0, 7, data=bytes(4096))
    assert [bytes(x) for x in out] == [bytes(x) for x in ref]


def test_hot_path_refuses_a_cid_in_flight():
    q = connected()
    cid = q.alloc_cid()
    out: list = []
    q.read_cmd(cid, 1, 0, 0, bytearray(512), out)
    with pytest.raises(LocalProtocolError):
        q.read_cmd(cid, 1, 0, 0, bytearray(512), out)
    with pytest.raises(LocalProtocolError):
        q.write_cmd(cid, 1, 0, 0, bytes(512), out)
    assert len(out) == 1


def test_hot_path_read_into_a_non_byte_view_lands_in_the_buffer():
    import array
    q = connected()
    dest = array.array("I", [0] * 128)                  # 512 bytes, 4-byte items
    out: list = []
    cid = q.alloc_cid()
    q.read_cmd(cid, 1, 0, 0, memoryview(dest), out)
    q.receive_data(bytes(c2h_pdu(cid, bytes(range(256)) * 2)))
    done: list = []
    assert q.completions(done) == 1 and done == [cid]
    assert dest.tobytes() == bytes(range(256)) * 2


def c2h_pdu(cid: int, data: bytes) -> bytes:
    from helpers.nvme_tcp_wire import c2h
    return c2h(cid, 0, data, success=True)


def test_capsule_cmd_with_64bit_fields_and_high_dwords():
    q = connected()
    bufs = q.command(q.alloc_cid(), IoOpcode.WRITE, 0xFFFFFFFF, cdw10=-1, cdw11=0x89ABCDEF,
                     cdw12=(1 << 30) | 0xFFFF, cdw13=0x11, cdw14=0x22, cdw15=0x33,
                     cdw2=0xAAAAAAAA, cdw3=0xBBBBBBBB, data=bytes(16))
    s = bytes(bufs[0])
    assert s[:8] == h("04 00 48 48 58000000")                      # PDO 72, PLEN 72+16
    assert s[8:] == h("""
        01 40 0000  ffffffff  aaaaaaaa bbbbbbbb  0000000000000000
        0000000000000000  10000000 000000 01
        ffffffff efcdab89 ffff0040 11000000 22000000 33000000
    """)


def test_capsule_cmd_write_in_capsule():
    q = connected()
    q.alloc_cid()
    cid = q.alloc_cid()
    data = bytes(range(256)) * 2
    bufs = q.command(cid, IoOpcode.WRITE, 1, cdw10=8, cdw12=0, data=data)
    assert len(bufs) == 2
    assert bytes(bufs[0]) == h("""
        04 00 48 48 48020000
        01 40 0100  01000000  00000000 00000000  0000000000000000
        0000000000000000  00020000 000000 01
        08000000 00000000 00000000 00000000 00000000 00000000
    """)
    assert bytes(bufs[1]) == data


def test_capsule_cmd_write_in_capsule_padded_to_cpda():
    q = connected(cpda=3)                                   # 16-byte alignment: PDO 80
    bufs = q.command(q.alloc_cid(), IoOpcode.WRITE, 1, data=b"\xab" * 8)
    assert bytes(bufs[0]) == h("04 00 48 50 58000000") + h("""
        01 40 0000  01000000  00000000 00000000  0000000000000000
        0000000000000000  08000000 000000 01
        00000000 00000000 00000000 00000000 00000000 00000000
    """) + bytes(8)
    assert bytes(bufs[1]) == b"\xab" * 8


def test_capsule_cmd_with_header_digest():
    q = connected(hdgst=True)
    bufs = q.command(q.alloc_cid(), IoOpcode.READ, 1, cdw10=0x1234, cdw12=7,
                     read_buf=memoryview(bytearray(4096)))
    hdr = h("04 01 48 00 4c000000") + READ_SQE               # HDGSTF, PLEN 76
    assert [bytes(b) for b in bufs] == [hdr + dgst(hdr)]
    assert len(bufs[0]) == 76


def test_capsule_cmd_with_data_digest():
    q = connected(ddgst=True)
    data = b"0123456789abcdef" * 32
    bufs = q.command(q.alloc_cid(), IoOpcode.WRITE, 1, data=data)
    assert [bytes(b) for b in bufs] == [
        h("04 02 48 48 4c020000") + h("""
            01 40 0000  01000000  00000000 00000000  0000000000000000
            0000000000000000  00020000 000000 01
        """) + bytes(24),
        data,
        dgst(data),
    ]


def test_capsule_cmd_with_both_digests():
    q = connected(hdgst=True, ddgst=True)
    data = bytes(512)
    bufs = [bytes(b) for b in q.command(q.alloc_cid(), IoOpcode.WRITE, 1, data=data)]
    hdr = h("04 03 48 4c 50020000") + h("""
        01 40 0000  01000000  00000000 00000000  0000000000000000
        0000000000000000  00020000 000000 01
    """) + bytes(24)
    assert bufs == [hdr + dgst(hdr), data, dgst(data)]
    assert len(bufs[0]) == 76                                 # PDO 76: digest, no pad


def test_capsule_cmd_header_builder_matches_queue():
    # The role-neutral builder the embedded target's tests use.
    sqe = pdu.sqe(IoOpcode.WRITE, cid=3, nsid=1, data_len=512, in_capsule=True)
    s = pdu.capsule_cmd_header(sqe, 512, hdgst=True, ddgst=True, cpda=3)
    hdr = h("04 03 48 50 54020000") + bytes(sqe)              # PDO 80, PLEN 80+512+4
    assert s == hdr + dgst(hdr) + bytes(4)
    s = pdu.capsule_cmd_header(sqe, 0, hdgst=False, ddgst=True)
    assert s == h("04 00 48 00 48000000") + bytes(sqe)        # no data: no DDGSTF, PDO 0


def test_write_too_big_for_the_capsule_uses_a_transport_sgl():
    q = connected(in_capsule_max=4096)
    bufs = q.command(q.alloc_cid(), IoOpcode.WRITE, 1, data=bytes(4097))
    assert len(bufs) == 1
    assert bytes(bufs[0])[8 + 24:8 + 40] == h("0000000000000000 01100000 000000 5a")
    bufs = q.command(q.alloc_cid(), IoOpcode.WRITE, 1, data=bytes(4096))
    assert bytes(bufs[0])[8 + 24:8 + 40] == h("0000000000000000 00100000 000000 01")


# ---------------------------------------------------------------------------------------------
# Fabrics commands (NVMe-oF 1.1 3.3): opcode 7Fh, FCTYPE @4; Connect RECFMT @40, QID @42,
# SQSIZE @44, CATTR @46, KATO @48; Property Get/Set ATTRIB @40, OFST @44, VALUE @48.

HOSTID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
SUBNQN = "nqn.2024-01.io.blockfs:sub1"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:" + HOSTID


def test_connect_sqe_admin_queue():
    s = fab.connect_sqe(qid=0, sqsize=31, kato_ms=120000)
    assert bytes(s) == h("7f 40 0000 01") + bytes(35) + h("""
        0000 0000  1f00 04 00  c0d40100
    """) + bytes(12)
    assert fab.fabrics_type(s) == FabricsType.CONNECT
    assert fab.parse_connect_sqe(s) == (0, 0, 31, 4, 120000)


def test_connect_sqe_io_queue_has_no_kato():
    s = fab.connect_sqe(qid=3, sqsize=127, kato_ms=5000, disable_sqflow=False)
    assert bytes(s[40:52]) == h("0000 0300  7f00 00 00  00000000")


def test_connect_sqe_rejects_bad_sqsize():
    with pytest.raises(fab.LocalProtocolError):
        fab.connect_sqe(qid=1, sqsize=0, kato_ms=0)


def test_connect_data_1024_bytes():
    d = fab.connect_data(HOSTID, 0xFFFF, SUBNQN, HOSTNQN)
    expect = bytearray(1024)
    expect[0:16] = h("0f1e2d3c 4b5a 6978 8796 a5b4c3d2e1f0")    # HOSTID @0
    expect[16:18] = h("ffff")                                  # CNTLID @16
    expect[256:256 + len(SUBNQN)] = SUBNQN.encode()            # SUBNQN @256
    expect[512:512 + len(HOSTNQN)] = HOSTNQN.encode()          # HOSTNQN @512
    assert d == bytes(expect)
    assert fab.parse_connect_data(d) == (HOSTID, 0xFFFF, SUBNQN, HOSTNQN)


@pytest.mark.parametrize("sub,host", [("", HOSTNQN), (SUBNQN, "n" * 224)])
def test_connect_data_rejects_bad_nqns(sub, host):
    with pytest.raises(fab.LocalProtocolError):
        fab.connect_data(HOSTID, 0xFFFF, sub, host)


def test_connect_capsule_through_the_admin_queue():
    q = connected(qid=0, depth=32)
    cid = q.alloc_cid()
    sqe = fab.connect_sqe(qid=0, sqsize=31, kato_ms=120000)
    data = fab.connect_data(HOSTID, 0xFFFF, SUBNQN, HOSTNQN)
    bufs = q.command(cid, AdminOpcode.FABRICS, fabrics_raw=sqe, data=data)
    assert bytes(bufs[0]) == h("04 00 48 48 48040000") + h("""
        7f 40 0000 01 000000  00000000 00000000  0000000000000000
        0000000000000000  00040000 000000 01
        0000 0000  1f00 04 00  c0d40100
    """) + bytes(12)
    assert bytes(bufs[1]) == data
    # The caller's SQE is not modified (CID and SGL are the queue's).
    assert bytes(sqe[24:40]) == bytes(16)


def test_connect_result():
    assert fab.connect_result(0x0001_00A5) == (0xA5, 1)


def test_property_get_cap():
    s = fab.property_get_sqe(Property.CAP, size8=True)
    assert bytes(s) == h("7f 40 0000 04") + bytes(35) + h("01 000000 00000000") + bytes(16)
    assert fab.parse_property_sqe(s) == (True, 0, 0)


def test_property_get_csts():
    s = fab.property_get_sqe(Property.CSTS, size8=False)
    assert bytes(s[40:56]) == h("00 000000 1c000000 0000000000000000")


def test_property_set_cc():
    s = fab.property_set_sqe(Property.CC, 0x00460001)
    assert bytes(s) == h("7f 40 0000 00") + bytes(35) + h("""
        00 000000 14000000 0100460000000000
    """) + bytes(8)
    assert fab.parse_property_sqe(s) == (False, 0x14, 0x00460001)


def test_property_get_through_the_queue_fills_cid_and_sgl():
    q = connected(qid=0, depth=32)
    for _ in range(5):
        cid = q.alloc_cid()
    assert cid == 4
    bufs = q.command(cid, AdminOpcode.FABRICS, fabrics_raw=fab.property_get_sqe(Property.VS, False))
    assert bytes(bufs[0]) == h("04 00 48 00 48000000") + h("""
        7f 40 0400 04 000000  00000000 00000000  0000000000000000
        0000000000000000  00000000 000000 5a
        00 000000 08000000 0000000000000000 0000000000000000
    """)


def test_disconnect_sqe():
    assert bytes(fab.disconnect_sqe()) == h("7f 40 0000 08") + bytes(59)


# ---------------------------------------------------------------------------------------------
# CapsuleResp (NVMe/TCP 3.6.2.7): CH + CQE (DW0 @8, DW1 @12, SQHD @16, SQID @18, CID @20,
# status @22 with the phase tag in bit 0).

def test_capsule_resp():
    st = pdu.make_status(0, 0x0B, dnr=True)
    assert st == 0x8016
    s = pdu.build_capsule_resp(0x1234, st, dw0=0xAABBCCDD, dw1=1, sqhd=5, sqid=2)
    assert s == h("05 00 18 00 18000000  ddccbbaa 01000000 0500 0200 3412 1680")
    assert pdu.parse_capsule_resp(s) == (0xAABBCCDD, 1, 5, 2, 0x1234, 0x8016)


def test_capsule_resp_with_header_digest():
    s = pdu.build_capsule_resp(7, hdgst=True)
    hdr = h("05 01 18 00 1c000000  00000000 00000000 0000 0000 0700 0000")
    assert s == hdr + dgst(hdr)


def test_make_status_fields():
    assert pdu.make_status(1, 0x80) == 0x0300           # SCT 1 @11:9, SC 80h @8:1
    assert pdu.make_status(3, 0x71, more=True) == 0x46E2


def test_cqe_struct_layout():
    assert pdu.CQE.pack(1, 2, 3, 4, 5, 6) == h("01000000 02000000 0300 0400 0500 0600")


# ---------------------------------------------------------------------------------------------
# C2HData / H2CData / R2T (NVMe/TCP 3.6.2.8-3.6.2.10): CCCID @8, TTAG @10, DATAO/R2TO @12,
# DATAL/R2TL @16, 4 reserved bytes.

def test_c2h_data_header():
    s = pdu.data_pdu_header(PduType.C2H_DATA, 3, 0, 4096, 512, last=True, success=True)
    assert s == h("07 0c 18 18 18020000  0300 0000 00100000 00020000 00000000")
    assert pdu.parse_data_hdr(s) == (3, 0, 4096, 512)


def test_c2h_data_header_with_digests_and_padding():
    s = pdu.data_pdu_header(PduType.C2H_DATA, 3, 0, 0, 512, last=False, hdgst=True, ddgst=True)
    hdr = h("07 03 18 1c 20020000  0300 0000 00000000 00020000 00000000")
    assert s == hdr + dgst(hdr)
    s = pdu.data_pdu_header(PduType.H2C_DATA, 1, 9, 0, 16, last=True, hdgst=True, cpda=3)
    hdr = h("06 05 18 20 30000000  0100 0900 00000000 10000000 00000000")
    assert s == hdr + dgst(hdr) + bytes(4)                  # PDO 32: 4 bytes of padding


def test_r2t():
    s = pdu.build_r2t(2, 0x0102, 0, 8192)
    assert s == h("09 00 18 00 18000000  0200 0201 00000000 00200000 00000000")
    assert pdu.parse_data_hdr(s) == (2, 0x102, 0, 8192)
    s = pdu.build_r2t(2, 0x0102, 0, 8192, hdgst=True)
    hdr = h("09 01 18 00 1c000000  0200 0201 00000000 00200000 00000000")
    assert s == hdr + dgst(hdr)


def test_h2c_data_answering_an_r2t():
    # 10000 bytes with MAXH2CDATA 4096: three H2CData PDUs, LAST_PDU on the last.
    q = connected(maxh2cdata=4096)
    data = bytes(i * 7 & 0xFF for i in range(10000))
    cid = q.alloc_cid()
    bufs = q.command(cid, IoOpcode.WRITE, 1, cdw12=19, data=data)
    assert bytes(bufs[0])[8 + 24:8 + 40] == h("0000000000000000 10270000 000000 5a")
    q.receive_data(r2t(cid, 0x55, 0, 10000))
    ev = q.next_event()
    assert ev[0] == SEND
    assert [bytes(b) for b in ev[1]] == [
        h("06 00 18 18 18100000  0000 5500 00000000 00100000 00000000"), data[:4096],
        h("06 00 18 18 18100000  0000 5500 00100000 00100000 00000000"), data[4096:8192],
        h("06 04 18 18 28070000  0000 5500 00200000 10070000 00000000"), data[8192:],
    ]
    assert q.next_event() is None


def test_h2c_data_with_digests_and_cpda():
    q = connected(hdgst=True, ddgst=True, cpda=3, maxh2cdata=4096)
    data = b"\x5a" * 100
    cid = q.alloc_cid()
    q.in_capsule_max = 0
    q.command(cid, IoOpcode.WRITE, 1, data=data)
    q.receive_data(r2t(cid, 0xABCD, 0, 100, hdgst=True))
    kind, bufs = q.next_event()
    assert kind == SEND
    hdr = h("06 07 18 20 88000000  0000 cdab 00000000 64000000 00000000")  # PDO 32, PLEN 136
    assert [bytes(b) for b in bufs] == [hdr + dgst(hdr) + bytes(4), data, dgst(data)]


def test_h2c_last_pdu_is_per_r2t():
    # NVMe/TCP 3.6.2.8: LAST_PDU marks the last H2CData PDU of the transfer for *this* R2T.
    q = connected(maxh2cdata=4096, in_capsule_max=0)
    data = bytes(6000)
    cid = q.alloc_cid()
    q.command(cid, IoOpcode.WRITE, 1, data=data)
    q.receive_data(r2t(cid, 1, 0, 5000) + r2t(cid, 2, 5000, 1000))
    _, first = q.next_event()
    _, second = q.next_event()
    assert [bytes(b)[:24] for b in first[::2]] == [
        h("06 00 18 18 18100000  0000 0100 00000000 00100000 00000000"),
        h("06 04 18 18 a0030000  0000 0100 00100000 88030000 00000000"),
    ]
    assert [bytes(b)[:24] for b in second[::2]] == [
        h("06 04 18 18 00040000  0000 0200 88130000 e8030000 00000000"),
    ]


def test_completion_event_tuple():
    q = connected()
    cid = q.alloc_cid()
    q.command(cid, AdminOpcode.KEEP_ALIVE)
    q.receive_data(pdu.build_capsule_resp(cid, 1, dw0=5, dw1=6))   # phase bit set: stripped
    assert q.next_event() == (COMPLETION, cid, 0, 5, 6)
