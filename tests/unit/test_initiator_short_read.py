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


# A successful status (SCT 0, SC 0) with DNR, More or CRD set is still a success (Base 4.2.3:
# those bits qualify an error), as SPDK's spdk_nvme_cpl_is_error reads it; a read short of data
# still fails with Data Transfer Error.
QUALIFIERS = {"dnr": 0x8000, "more": 0x4000, "crd": 0x1000, "all": 0xF000}


def test_success_with_dnr_more_or_crd_is_success():
    for name, bits in QUALIFIERS.items():
        q = _queue()
        cid, buf = _read(q)
        q.receive_data(data_pdu_header(PduType.C2H_DATA, cid, 0, 0, 4096, last=True)
                       + b"\xcd" * 4096)
        q.receive_data(build_capsule_resp(cid, status=bits))
        done = []
        q.completions(done)
        ev = q.next_event()
        assert ev == (COMPLETION, cid, 0, 0, 0), name
        assert bytes(buf) == b"\xcd" * 4096


def test_success_with_dnr_but_no_data_is_a_data_transfer_error():
    for name, bits in QUALIFIERS.items():
        q = _queue()
        cid, buf = _read(q)
        q.receive_data(build_capsule_resp(cid, status=bits))
        assert q.next_event() == (COMPLETION, cid, DATA_TRANSFER_ERROR, 0, 0), name
