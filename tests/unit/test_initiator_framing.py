"""PduReceiver (initiator/_framing.py) on its own: the paths a HostQueue does not take (no sink
resolver, buffer growth), buffer compaction on long streams, the zero-copy sink, and the
caller-misuse errors (LocalProtocolError).
"""

from __future__ import annotations

import pytest

from helpers.nvme_tcp_wire import C2H, CMD, RESP, c2h, ch, dgst, resp
from initiator import _fabrics as fab
from initiator._errors import LocalProtocolError, RemoteProtocolError
from initiator._framing import HOST_ACCEPTS, TARGET_ACCEPTS, PduReceiver


def host_rx(**kw) -> PduReceiver:
    rx = PduReceiver(HOST_ACCEPTS, **kw)
    rx.ic_done = True
    return rx


def pdus_of(rx: PduReceiver) -> list:
    out = []
    while (p := rx.next_pdu()) is not None:
        ptype, flags, hdr, data, ok = p
        out.append((ptype, flags, bytes(hdr), None if data is None else bytes(data), ok))
    return out


@pytest.mark.parametrize("bytewise", [False, True])
def test_data_pdu_without_a_resolver_is_returned_from_the_buffer(bytewise):
    rx = host_rx()
    rx.ddgst = True
    good = c2h(3, 0, b"abcdefgh", ddgst=True, pad=4)
    bad = c2h(3, 8, b"ijkl", ddgst=True, bad_ddgst=True)
    stream = good + bad
    got = []
    for chunk in ([stream[i:i + 1] for i in range(len(stream))] if bytewise else [stream]):
        rx.receive_data(chunk)
        got += pdus_of(rx)
    assert got == [
        (C2H, 0x06, good[:24], b"abcdefgh", True),
        (C2H, 0x06, bad[:24], b"ijkl", False),     # digest mismatch: returned, flagged, not fatal
    ]
    assert rx.pdus_received == 2 and rx.buffered() == 0


@pytest.mark.parametrize("declining_resolver", [False, True])
def test_data_pdu_larger_than_the_buffer_grows_it(declining_resolver):
    rx = host_rx(bufsize=4096)
    if declining_resolver:
        rx.sink_resolver = lambda ptype, hdr: None      # the owner wants it buffered
    data = bytes(range(256)) * 40                        # 10240 bytes > 4096
    pdu = c2h(1, 0, data)
    rx.receive_data(pdu[:24])
    assert rx.next_pdu() is None                         # header seen: room made for PLEN
    rx.receive_data(pdu[24:])
    assert pdus_of(rx) == [(C2H, 0x04, pdu[:24], data, True)]


def test_receive_data_grows_the_buffer_up_to_its_limit():
    rx = host_rx(bufsize=4096)                           # limit: 72 + 8 + 16 KiB + 256
    stream = b"".join(resp(i) for i in range(600))       # 14400 bytes in one call
    rx.receive_data(stream)
    assert len(pdus_of(rx)) == 600


def test_receive_data_beyond_the_buffer_limit_is_a_local_error():
    # receive_data copies; a caller handing over more than the buffer limit (256 KiB by
    # default) without draining gets a typed caller error. The shell's recv_into path reads
    # at most RECV_CHUNK at a time and never hits this.
    rx = host_rx()
    with pytest.raises(LocalProtocolError):
        rx.receive_data(resp(0) * 12000)         # 288000 bytes


def test_long_stream_of_small_pdus_compacts_the_buffer():
    # 20000 CapsuleResps (480 KB) through buffer()/received(), every read ending in the middle
    # of a PDU so the buffer never drains: the consumed prefix is compacted away, the buffer
    # never grows, no PDU is lost or torn.
    rx = host_rx()
    stream = b"".join(resp(i % 65536, dw0=i) for i in range(20000))
    got = 0
    pos = 0
    while pos < len(stream):
        room = rx.buffer()
        n = min(len(room), 12 if pos == 0 else 1008, len(stream) - pos)
        room[:n] = stream[pos:pos + n]
        rx.received(n)
        pos += n
        for ptype, _f, hdr, _d, _ok in pdus_of(rx):
            assert ptype == RESP and int.from_bytes(hdr[8:12], "little") == got
            got += 1
    assert got == 20000 and rx.buffered() == 0
    assert len(rx.buffer()) == 64 * 1024


def test_zero_copy_sink_with_padding_and_digest():
    rx = host_rx()
    rx.hdgst = rx.ddgst = True
    dest = bytearray(100)
    calls = []

    def resolver(ptype, hdr):
        calls.append((ptype, bytes(hdr)))
        return memoryview(dest)[:64]

    rx.sink_resolver = resolver
    data = bytes(range(64))
    pdu = c2h(2, 0, data, hdgst=True, ddgst=True, pad=4)
    # Header + digest + 2 pad bytes arrive; the rest goes straight into the sink.
    rx.receive_data(pdu[:30])
    assert rx.next_pdu() is None and rx.payload_sink() is None        # padding still pending
    rx.receive_data(pdu[30:32])
    assert rx.next_pdu() is None
    sink = rx.payload_sink()
    assert sink is not None and len(sink) == 64
    sink[:40] = data[:40]
    rx.received_into_sink(40)
    sink = rx.payload_sink()
    assert len(sink) == 24
    sink[:] = data[40:]
    rx.received_into_sink(24)
    assert rx.payload_sink() is None
    rx.receive_data(pdu[-4:])                                          # the data digest
    ptype, flags, hdr, got, ok = rx.next_pdu()
    assert (ptype, flags, bytes(hdr), bytes(got), ok) == (C2H, 0x07, pdu[:24], data, True)
    assert bytes(dest[:64]) == data and calls == [(C2H, pdu[:24])]


def test_sink_of_the_wrong_length_is_a_local_error():
    rx = host_rx()
    rx.sink_resolver = lambda ptype, hdr: memoryview(bytearray(7))
    rx.receive_data(c2h(1, 0, bytes(8)))
    with pytest.raises(LocalProtocolError):
        rx.next_pdu()


def test_resolver_verdict_moves_the_receiver_to_error():
    rx = host_rx()

    def resolver(ptype, hdr):
        raise RemoteProtocolError("no such command", 1, 8, bytes(hdr))

    rx.sink_resolver = resolver
    rx.receive_data(c2h(1, 0, bytes(8)) + resp(0))
    with pytest.raises(RemoteProtocolError):
        rx.next_pdu()
    with pytest.raises(LocalProtocolError):
        rx.next_pdu()


def test_capsule_with_too_much_in_capsule_data_is_fes_5():
    # Role-neutral framing on the target side: in-capsule data beyond what was offered.
    rx = PduReceiver(TARGET_ACCEPTS, max_capsule_data=1024)
    rx.ic_done = True
    sqe = bytes(fab.property_get_sqe(0, True))
    pdu = ch(CMD, 0, 72, 72, 72 + 1028) + sqe + bytes(1028)
    rx.receive_data(pdu)
    with pytest.raises(RemoteProtocolError) as ei:
        rx.next_pdu()
    assert ei.value.fes == 5 and ei.value.header == pdu[:72]


def test_capsule_within_the_limit():
    rx = PduReceiver(TARGET_ACCEPTS, max_capsule_data=1024)
    rx.ic_done = True
    rx.hdgst = True
    sqe = bytes(fab.property_get_sqe(0, True))
    hdr = ch(CMD, 1, 72, 76, 76 + 1024) + sqe
    rx.receive_data(hdr + dgst(hdr) + b"\x77" * 1024)
    assert pdus_of(rx) == [(CMD, 1, hdr, b"\x77" * 1024, True)]


def test_host_side_hostnqn_and_hostid_helpers():
    hostid = fab.random_hostid()
    assert len(hostid) == 36 and hostid[14] == "4"                  # a version-4 UUID
    assert fab.default_hostnqn(hostid) == "nqn.2014-08.org.nvmexpress:uuid:" + hostid
