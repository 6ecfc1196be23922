"""A read completed successfully without all of its data must fail, never hand out the buffer
untouched: the CapsuleResp path (both the one-pass fast path and next_event) and the C2HData
SUCCESS path end in Data Transfer Error (sct 0, sc 0x04)."""

from initiator._pdu import build_capsule_resp, build_icresp, data_pdu_header
from initiator._spec import IoOpcode, PduType
from initiator._tcp import COMPLETION, IC_DONE, HostQueue

DATA_TRANSFER_ERROR = 0x04 << 1


def _queue() -> HostQueue:
    q = HostQueue(1, 8)
    q.icreq()
    q.receive_data(build_icresp(maxh2cdata=65536))
    assert q.next_event()[0] == IC_DONE
    return q


def _read(q: HostQueue, size: int = 4096):
    buf = memoryview(bytearray(size))
    cid = q.alloc_cid()
    q.command(cid, IoOpcode.READ, 1, 0, 0, size // 512 - 1, read_buf=buf)
    return cid, buf


def test_capsule_resp_without_data_fails_the_read_slow_path():
    q = _queue()
    cid, buf = _read(q)
    q.receive_data(build_capsule_resp(cid))
    assert q.next_event() == (COMPLETION, cid, DATA_TRANSFER_ERROR, 0, 0)


def test_capsule_resp_without_data_fails_the_read_fast_path():
    q = _queue()
    cid, buf = _read(q)
    q.receive_data(build_capsule_resp(cid))
    done = []
    assert q.completions(done) == 0 and done == []      # the fast path leaves it alone
    assert q.next_event() == (COMPLETION, cid, DATA_TRANSFER_ERROR, 0, 0)


def test_capsule_resp_after_partial_data_fails_the_read():
    q = _queue()
    cid, buf = _read(q, 8192)
    q.receive_data(data_pdu_header(PduType.C2H_DATA, cid, 0, 0, 4096, last=False)
                   + b"\xab" * 4096)
    q.receive_data(build_capsule_resp(cid))
    assert q.next_event() == (COMPLETION, cid, DATA_TRANSFER_ERROR, 0, 0)


def test_capsule_resp_after_all_data_succeeds():
    q = _queue()
    cid, buf = _read(q)
    q.receive_data(data_pdu_header(PduType.C2H_DATA, cid, 0, 0, 4096, last=True)
                   + b"\xcd" * 4096)
    q.receive_data(build_capsule_resp(cid))
    ev = q.next_event()
    if ev is None or ev[0] != COMPLETION:
        done = []
        q.completions(done)
        assert done == [cid]
    else:
        assert ev == (COMPLETION, cid, 0, 0, 0)
    assert bytes(buf) == b"\xcd" * 4096
