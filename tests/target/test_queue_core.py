"""The sans-IO queue core without sockets: feeding byte by byte gives the same bytes out as
feeding everything at once (the hot-path read loop and the general parser agree)."""

import struct

from initiator import _fabrics as fab
from initiator._pdu import build_icreq, capsule_cmd_header, sqe
from initiator._spec import CC_EN, CC_IOCQES, CC_IOSQES, Property
from target._queue import TargetQueue
from target._subsystem import TargetState
from target.config import SubsystemConfig, TargetConfig

NQN = "nqn.core"
HOSTID = "11111111-2222-3333-4444-555555555555"


def _cap(cmd, data=b""):
    if data:
        struct.pack_into("<QI3xB", cmd, 24, 0, len(data), 0x01)
    return capsule_cmd_header(cmd, len(data), False, False) + data


def _stream(disable_sqflow):
    s = _cap(fab.connect_sqe(1, 15, 0, disable_sqflow=disable_sqflow),
             fab.connect_data(HOSTID, 1, NQN, "nqn.h"))
    cid = 0
    parts = [build_icreq(), s]
    for i in range(40):
        cid += 1
        if i % 7 == 3:
            parts.append(_cap(sqe(0x01, cid, 1, i, 0, 0, data_len=512), bytes([i]) * 512))
        elif i % 11 == 5:
            parts.append(_cap(sqe(0x02, cid, 9, 0, 0, 0, data_len=512)))          # bad NSID
        elif i % 13 == 6:
            parts.append(_cap(sqe(0x02, cid, 1, 10 ** 8, 0, 0, data_len=512)))    # out of range
        elif i % 17 == 8:
            parts.append(_cap(sqe(0x00, cid, 1)))
        else:
            parts.append(_cap(sqe(0x02, cid, 1, i % 8, 0, 1, data_len=1024)))
    return b"".join(parts)


def _target():
    st = TargetState(TargetConfig(subsystems=[SubsystemConfig(nqn=NQN, namespaces=["ram:1M"])]))
    a = TargetQueue(st)
    a.rx.receive_data(build_icreq())
    a.rx.receive_data(_cap(fab.connect_sqe(0, 31, 0), fab.connect_data(HOSTID, 0xFFFF, NQN, "nqn.h")))
    a.rx.receive_data(_cap(fab.property_set_sqe(Property.CC, CC_EN | CC_IOSQES | CC_IOCQES)))
    a.process()
    assert a.ctrl.cntlid == 1 and a.ctrl.ready
    st.subsystems[NQN].namespaces[1].backend.write(0, bytes(range(256)) * 4096)
    return st


def _run(chunk, disable_sqflow):
    st = _target()
    q = TargetQueue(st)
    data = _stream(disable_sqflow)
    out = []
    for i in range(0, len(data), chunk):
        q.rx.receive_data(data[i:i + chunk])
        q.process()
        out += [bytes(b) for b in q.out]
        q.out.clear()
    assert not q.closing, q.close_reason
    return b"".join(out), q


def test_byte_at_a_time_equals_bulk():
    for dis in (False, True):
        bulk, q1 = _run(1 << 20, dis)
        trickle, q2 = _run(1, dis)
        odd, _ = _run(37, dis)
        assert bulk == trickle == odd
        assert q1.n_read == q2.n_read > 20


def test_fast_path_consumes_reads_in_bulk():
    st = _target()
    q = TargetQueue(st)
    q.rx.receive_data(build_icreq() + _cap(fab.connect_sqe(1, 63, 0, disable_sqflow=True),
                                           fab.connect_data(HOSTID, 1, NQN, "nqn.h")))
    q.process()
    q.out.clear()
    q.rx.receive_data(b"".join(_cap(sqe(0x02, c, 1, c, 0, 0, data_len=512)) for c in range(32)))
    q.process()
    assert len(q.out) == 64 and q.n_read == 32
    assert all(struct.unpack_from("<BB", b)[0:2] == (7, 0x0C) for b in q.out[0::2])
