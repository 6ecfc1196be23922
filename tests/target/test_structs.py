"""Golden-offset and round-trip tests for initiator/_structs.py (built by the target, parsed by the host)."""

import struct

import pytest

from initiator import _structs as S


def test_identify_controller_offsets_and_roundtrip():
    b = S.build_identify_controller(vid=0x1B36, sn="SN1", mn="blockfs", fr="0.1", cntlid=7,
                                    ver=0x00010400, mdts=5, oaes=S.OAES_NS_ATTR, kas=1,
                                    nn=1024, oncs=S.ONCS_DSM | S.ONCS_WRITE_ZEROES,
                                    sgls=S.SGLS_SUPPORTED | S.SGLS_OFFSET, subnqn="nqn.x",
                                    ioccsz=260, iorcsz=1, cntrltype=S.CNTRLTYPE_IO, aerl=3, vwc=1)
    assert len(b) == 4096
    assert b[4:24] == b"SN1".ljust(20)
    assert b[24:64] == b"blockfs".ljust(40)
    assert b[77] == 5
    assert struct.unpack_from("<H", b, 78)[0] == 7
    assert struct.unpack_from("<I", b, 80)[0] == 0x00010400
    assert struct.unpack_from("<I", b, 92)[0] == 1 << 8
    assert b[111] == 1
    assert b[259] == 3
    assert struct.unpack_from("<H", b, 320)[0] == 1
    assert b[512] == 0x66 and b[513] == 0x44
    assert struct.unpack_from("<I", b, 516)[0] == 1024
    assert struct.unpack_from("<H", b, 520)[0] == 0x0C
    assert b[525] == 1
    assert struct.unpack_from("<I", b, 536)[0] == 0x100001
    assert b[768:773] == b"nqn.x" and b[773] == 0
    assert struct.unpack_from("<I", b, 1792)[0] == 260
    c = S.IdentifyController.from_bytes(b)
    assert (c.sn, c.mn, c.fr, c.cntlid, c.subnqn, c.ioccsz) == ("SN1", "blockfs", "0.1", 7, "nqn.x", 260)
    assert c.io_in_capsule_bytes == 260 * 16 - 64
    assert c.max_transfer_bytes() == 4096 << 5
    assert c.to_bytes() == b


def test_identify_namespace_roundtrip():
    b = S.build_identify_namespace(nsze=1000, block_size=4096, nguid=bytes(range(16)),
                                   eui64=bytes(range(8)), dlfeat=0x09)
    assert struct.unpack_from("<QQQ", b, 0) == (1000, 1000, 1000)
    assert b[25] == 0 and b[26] == 0 and b[33] == 0x09
    assert b[104:120] == bytes(range(16)) and b[120:128] == bytes(range(8))
    assert struct.unpack_from("<I", b, 128)[0] == 12 << 16
    ns = S.IdentifyNamespace.from_bytes(b)
    assert (ns.nsze, ns.block_size, ns.lbads, ns.active) == (1000, 4096, 12, True)
    assert ns.nguid == bytes(range(16))
    assert S.IdentifyNamespace.from_bytes(bytes(4096)).active is False
    with pytest.raises(ValueError):
        S.build_identify_namespace(nsze=1, block_size=1000)


def test_ns_descriptors_and_lists():
    b = S.build_ns_descriptors(eui64=b"E" * 8, nguid=b"N" * 16, uuid=b"U" * 16, csi=0)
    assert b[0:4] == bytes([1, 8, 0, 0]) and b[4:12] == b"E" * 8
    assert b[12:16] == bytes([2, 16, 0, 0])
    d = S.parse_ns_descriptors(b)
    assert d == {S.NIDT_EUI64: b"E" * 8, S.NIDT_NGUID: b"N" * 16, S.NIDT_UUID: b"U" * 16,
                 S.NIDT_CSI: b"\0"}
    assert S.parse_ns_list(S.build_ns_list([5, 1, 3], greater_than=1)) == [3, 5]
    assert S.parse_changed_ns_list(S.build_changed_ns_list([2, 9])) == [2, 9]
    assert S.parse_changed_ns_list(S.build_changed_ns_list(range(1, 1100))) is None
    assert S.parse_changed_ns_list(bytes(4096)) == []


def test_discovery_log_roundtrip():
    e = S.DiscoveryLogEntry(subnqn="nqn.a", traddr="127.0.0.1", trsvcid="4420", portid=1,
                            treq=S.TREQ_NOT_REQUIRED)
    b = S.build_discovery_log(7, [e, e])
    assert len(b) == 1024 * 3
    assert struct.unpack_from("<QQH", b, 0) == (7, 2, 0)
    assert b[1024] == 3 and b[1026] == 2 and b[1024 + 32:1024 + 36] == b"4420"
    assert b[1024 + 256:1024 + 261] == b"nqn.a" and b[1024 + 512:1024 + 521] == b"127.0.0.1"
    hdr, ents = S.parse_discovery_log(b)
    assert hdr.genctr == 7 and ents == [e, e]
    hdr, ents = S.parse_discovery_log(b[:2048])
    assert hdr.numrec == 2 and len(ents) == 1


def test_smart_error_connect_aen():
    b = S.build_smart_log(temperature=300, data_units_read=2 ** 70, host_write_commands=5)
    assert len(b) == 512 and struct.unpack_from("<H", b, 1)[0] == 300
    assert int.from_bytes(b[32:48], "little") == 2 ** 70
    assert S.SmartLog.from_bytes(b).host_write_commands == 5
    e = S.ErrorLogEntry(error_count=3, sqid=1, cid=9, status=0x4, nsid=1)
    log = S.build_error_log([e], 4)
    assert len(log) == 256 and S.parse_error_log(log) == [e]
    assert S.DSM_RANGE.pack(0, 8, 100)[:8] == bytes([0, 0, 0, 0, 8, 0, 0, 0])
    dw0 = S.aen_dw0(2, 0, 4)
    assert dw0 == 0x040002 and S.parse_aen_dw0(dw0) == (2, 0, 4)
    assert S.aen_dw0(2, 0xF0, 0x70) == 0x70F002
