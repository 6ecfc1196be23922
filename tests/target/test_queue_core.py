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


def _target(ns="ram:1M", **cfg):
    """A target state with `ns` as namespace 1 and a controller enabled on its admin queue."""
    st = TargetState(TargetConfig(subsystems=[SubsystemConfig(nqn=NQN, namespaces=[ns])], **cfg))
    a = TargetQueue(st)
    a.rx.receive_data(build_icreq())
    a.rx.receive_data(_cap(fab.connect_sqe(0, 31, 0), fab.connect_data(HOSTID, 0xFFFF, NQN, "nqn.h")))
    a.rx.receive_data(_cap(fab.property_set_sqe(Property.CC, CC_EN | CC_IOSQES | CC_IOCQES)))
    a.process()
    assert a.ctrl.cntlid == 1 and a.ctrl.ready
    if ns.startswith("ram:"):
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


def _io_queue(st, sqflow_off=True):
    q = TargetQueue(st)
    q.rx.receive_data(build_icreq() + _cap(fab.connect_sqe(1, 63, 0, disable_sqflow=sqflow_off),
                                           fab.connect_data(HOSTID, 1, NQN, "nqn.h")))
    q.process()
    q.out.clear()
    return q


def _replies(q):
    """Process and split `out` into (C2HData payloads by CID, CapsuleResp statuses by CID)."""
    q.process()
    raw = b"".join(bytes(b) for b in q.out)
    q.out.clear()
    data, status = {}, {}
    i = 0
    while i < len(raw):
        ptype, _f, hlen, _pdo, plen = struct.unpack_from("<BBBBI", raw, i)
        if ptype == 7:
            cid, _, _, datal = struct.unpack_from("<HHII", raw, i + 8)
            data[cid] = raw[i + hlen:i + hlen + datal]
        elif ptype == 5:
            cid, st_ = struct.unpack_from("<HH", raw, i + 8 + 12)
            status[cid] = (st_ >> 1) & 0x7FF
        i += plen
    return data, status


def test_read_then_write_in_one_batch_reads_the_old_data():
    """The hot path hands out views of the RAM: a write later in the same batch must not
    change what an earlier read sends (nor may a later read miss the write)."""
    for sqflow_off in (True, False):
        st = _target()
        q = _io_queue(st, sqflow_off)
        old = bytes(st.subsystems[NQN].namespaces[1].backend.read(0, 512))
        new = b"\xAB" * 512
        q.rx.receive_data(_cap(sqe(0x02, 1, 1, 0, 0, 0, data_len=512))
                          + _cap(sqe(0x01, 2, 1, 0, 0, 0, data_len=512), new)
                          + _cap(sqe(0x02, 3, 1, 0, 0, 0, data_len=512)))
        data, status = _replies(q)
        assert data[1] == old and data[3] == new
        assert status.get(2) == 0


def test_null_namespace_fast_path_and_its_limit():
    for mdts, hot in ((8, True), (0, False)):     # mdts 0: transfers beyond the zero buffer
        st = _target("null:8M:512", mdts=mdts)
        assert (st.subsystems[NQN].namespaces[1].hot is not None) == hot
        q = _io_queue(st)
        big = 1 << 20 if hot else 4 << 20           # the largest transfer / beyond 2 MiB
        q.rx.receive_data(_cap(sqe(0x02, 1, 1, 100, 0, 7, data_len=4096))
                          + _cap(sqe(0x02, 2, 1, 200, 0, big // 512 - 1, data_len=big)))
        data, status = _replies(q)
        assert data[1] == bytes(4096)
        assert data[2] == bytes(big), status


def test_hot_path_follows_resize():
    st = _target()
    q = _io_queue(st)
    sub = st.subsystems[NQN]
    end = 2048                                       # 1 MiB of 512-byte blocks
    q.rx.receive_data(_cap(sqe(0x02, 1, 1, end, 0, 0, data_len=512)))
    _, status = _replies(q)
    assert status[1] == 0x80                          # LBA Out of Range
    sub.resize_ns(1, "2M")
    sub.namespaces[1].backend.write(end * 512, b"\x5A" * 512)
    q.rx.receive_data(_cap(sqe(0x02, 2, 1, end, 0, 0, data_len=512)))
    data, _ = _replies(q)
    assert data[2] == b"\x5A" * 512
    sub.resize_ns(1, "512K")
    q.rx.receive_data(_cap(sqe(0x02, 3, 1, 1024, 0, 0, data_len=512)))
    _, status = _replies(q)
    assert status[3] == 0x80
