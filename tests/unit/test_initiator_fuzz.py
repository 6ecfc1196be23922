"""Property tests (hypothesis) for the host queue's receive path.

- A valid stream cut anywhere, fed by receive_data or the zero-copy recv_into path, gives the
  same events and the same read data as the stream fed whole.
- Random bytes, mutated valid streams and streams of random-but-plausible PDUs never raise
  anything but the typed errors (RemoteProtocolError, whose FES/FEI feed a well-formed
  H2CTermReq; LocalProtocolError only once the receiver is in ERROR), and after a
  RemoteProtocolError the receiver stays in ERROR whatever arrives next.
- The hot path (`HostQueue.completions()` before each `next_event()`, as the trio shell drains)
  gives exactly the events, errors and read data of `next_event()` alone, for valid, mutated and
  plausible streams cut anywhere, with and without large reads (whose payloads it streams).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.nvme_tcp_wire import COMPLETION, c2h, c2h_term, connected, dgst, icresp, r2t, resp
from initiator._errors import LocalProtocolError, RemoteProtocolError
from initiator._spec import IoOpcode
from initiator._tcp import HostQueue

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DIGESTS = st.sampled_from([(False, False), (True, False), (False, True), (True, True)])

READ_A, READ_B, WRITE, FLUSH, SMALL_WRITE = 0, 1, 2, 3, 4


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 13 + seed) & 0xFF for i in range(n))


def busy_queue(hd: bool, dd: bool):
    """Connected, with two reads, an R2T write, a flush and an in-capsule write outstanding."""
    q = connected(hdgst=hd, ddgst=dd, maxh2cdata=4096, in_capsule_max=512, depth=8)
    for _ in range(5):
        q.alloc_cid()
    bufs = {READ_A: bytearray(3000), READ_B: bytearray(512)}
    q.command(READ_A, IoOpcode.READ, 1, read_buf=memoryview(bufs[READ_A]))
    q.command(READ_B, IoOpcode.READ, 1, read_buf=memoryview(bufs[READ_B]))
    q.command(WRITE, IoOpcode.WRITE, 1, data=pattern(6000, 3))
    q.command(FLUSH, IoOpcode.FLUSH, 1)
    q.command(SMALL_WRITE, IoOpcode.WRITE, 1, data=pattern(100, 4))
    return q, bufs


def valid_pdus(hd: bool, dd: bool) -> list[bytes]:
    a, b = pattern(3000, 1), pattern(512, 2)
    return [
        c2h(READ_A, 0, a[:1000], last=False, hdgst=hd, ddgst=dd),
        r2t(WRITE, 1, 0, 4096, hdgst=hd),
        c2h(READ_B, 0, b, success=True, hdgst=hd, ddgst=dd),
        resp(FLUSH, hdgst=hd),
        c2h(READ_A, 1000, a[1000:], hdgst=hd, ddgst=dd, pad=4),
        r2t(WRITE, 2, 4096, 1904, hdgst=hd),
        resp(READ_A, dw0=5, hdgst=hd),
        resp(WRITE, hdgst=hd),
        resp(SMALL_WRITE, 0x8016, hdgst=hd),
        c2h_term(1, 2, bytes(24)),
    ]


def norm(ev):
    return (ev[0], [bytes(b) for b in ev[1]]) if ev[0] == 1 else ev


def run(q: HostQueue, stream: bytes, cuts: list[int], recv_into: bool, fast: bool = False):
    """Feed `stream` cut at `cuts`; -> (events, error or None). `fast`: drain the way the shell
    does, plain completions through `completions()` first."""
    events: list = []
    done: list = []
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    try:
        for lo, hi in zip(bounds, bounds[1:]):
            pos = lo
            while pos < hi:
                if recv_into:
                    sink = q.rx.payload_sink()
                    room = sink if sink is not None else q.buffer()
                    n = min(len(room), hi - pos)
                    room[:n] = stream[pos:pos + n]
                    if sink is not None:
                        q.rx.received_into_sink(n)
                    else:
                        q.received(n)
                else:
                    n = hi - pos
                    q.receive_data(stream[pos:hi])
                pos += n
                while True:
                    if fast and q.completions(done):
                        events.extend((COMPLETION, cid, 0, 0, 0) for cid in done)
                        done.clear()
                    ev = q.next_event()
                    if ev is None:
                        break
                    events.append(norm(ev))
    except (RemoteProtocolError, LocalProtocolError) as e:
        return events, e
    return events, None


def check_error(q: HostQueue, err, trailer: bytes) -> None:
    """The typed-error contract."""
    if err is None:
        return
    assert isinstance(err, RemoteProtocolError), f"unexpected {err!r}"
    assert 1 <= err.fes <= 6
    assert 8 <= len(err.header) <= 128
    t = q.term_req(err)
    ptype, flags, hlen, pdo, plen = struct.unpack_from("<BBBBI", t)
    assert (ptype, flags, hlen, pdo, plen) == (2, 0, 24, 0, len(t)) and 24 <= plen <= 152
    assert struct.unpack_from("<H", t, 8)[0] == err.fes
    # Sticky: nothing gets the receiver out of ERROR.
    q.receive_data(trailer)
    for _ in range(2):
        with pytest.raises(LocalProtocolError):
            q.next_event()


# ---------------------------------------------------------------------------------------------
# Valid streams: any cut, same result.

@FUZZ
@given(digests=DIGESTS, cuts=st.lists(st.integers(0, 20000), max_size=30),
       recv_into=st.booleans())
def test_valid_stream_any_chunking(digests, cuts, recv_into):
    hd, dd = digests
    stream = b"".join(valid_pdus(hd, dd))
    q0, bufs0 = busy_queue(hd, dd)
    expect, err0 = run(q0, stream, [], False)
    assert err0 is None
    assert [e[0] for e in expect] == [1, 0, 0, 1, 0, 0, 0, 3]
    q, bufs = busy_queue(hd, dd)
    got, err = run(q, stream, cuts, recv_into)
    assert err is None
    assert got == expect
    assert bufs == bufs0
    assert bytes(bufs[READ_A]) == pattern(3000, 1) and bytes(bufs[READ_B]) == pattern(512, 2)
    assert q.outstanding == 0


# ---------------------------------------------------------------------------------------------
# Random bytes.

@FUZZ
@given(digests=DIGESTS, data=st.binary(max_size=400),
       cuts=st.lists(st.integers(0, 400), max_size=8), recv_into=st.booleans())
def test_random_bytes_before_icresp(digests, data, cuts, recv_into):
    hd, dd = digests
    q = HostQueue(1, 8, hdgst=hd, ddgst=dd)
    _, err = run(q, data, cuts, recv_into)
    check_error(q, err, icresp(hdgst=hd, ddgst=dd))


@FUZZ
@given(digests=DIGESTS, data=st.binary(max_size=400),
       cuts=st.lists(st.integers(0, 400), max_size=8), recv_into=st.booleans())
def test_random_bytes_after_icresp(digests, data, cuts, recv_into):
    hd, dd = digests
    q, _ = busy_queue(hd, dd)
    _, err = run(q, data, cuts, recv_into)
    check_error(q, err, resp(FLUSH, hdgst=hd))


@FUZZ
@given(digests=DIGESTS, data=st.binary(min_size=1, max_size=200))
def test_random_bytes_after_a_valid_prefix(digests, data):
    hd, dd = digests
    q, _ = busy_queue(hd, dd)
    stream = b"".join(valid_pdus(hd, dd)[:4]) + data
    _, err = run(q, stream, [len(stream) // 2], False)
    check_error(q, err, resp(READ_A, hdgst=hd))


# ---------------------------------------------------------------------------------------------
# Mutations of valid streams.

MUTATION = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate",
                                      "dup_pdu", "drop_pdu", "swap_pdus"]),
                     st.integers(0, 1 << 16), st.integers(0, 255), st.integers(1, 64))


def mutate(pdus: list[bytes], muts) -> bytes:
    pdus = list(pdus)
    for kind, pos, val, n in muts:
        if kind in ("dup_pdu", "drop_pdu", "swap_pdus") and pdus:
            i = pos % len(pdus)
            if kind == "dup_pdu":
                pdus.insert(i, pdus[i])
            elif kind == "drop_pdu":
                del pdus[i]
            else:
                j = (i + 1) % len(pdus)
                pdus[i], pdus[j] = pdus[j], pdus[i]
            continue
        s = bytearray(b"".join(pdus))
        if not s:
            break
        p = pos % len(s)
        if kind == "flip":
            s[p] ^= (val or 1)
        elif kind == "set":
            s[p] = val
        elif kind == "insert":
            s[p:p] = bytes([val]) * n
        elif kind == "delete":
            del s[p:p + n]
        else:
            del s[p:]
        pdus = [bytes(s)]
    return b"".join(pdus)


def header_mutation():
    # Aim at the headers: type, flags, hlen, pdo, plen and the CID/offset/length fields.
    return st.tuples(st.sampled_from(["flip", "set"]), st.integers(0, 23), st.integers(0, 255),
                     st.just(1))


@FUZZ
@given(digests=DIGESTS, muts=st.lists(MUTATION, min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 20000), max_size=10), recv_into=st.booleans())
def test_mutated_valid_stream(digests, muts, cuts, recv_into):
    hd, dd = digests
    q, _ = busy_queue(hd, dd)
    stream = mutate(valid_pdus(hd, dd), muts)
    _, err = run(q, stream, cuts, recv_into)
    check_error(q, err, resp(FLUSH, hdgst=hd))


@FUZZ
@given(digests=DIGESTS, which=st.integers(0, 9), mut=header_mutation(),
       cuts=st.lists(st.integers(0, 20000), max_size=6), recv_into=st.booleans())
def test_one_header_byte_changed(digests, which, mut, cuts, recv_into):
    hd, dd = digests
    pdus = valid_pdus(hd, dd)
    kind, pos, val, _ = mut
    p = bytearray(pdus[which])
    p[pos] = (p[pos] ^ (val or 1)) if kind == "flip" else val
    pdus[which] = bytes(p)
    q, _ = busy_queue(hd, dd)
    _, err = run(q, b"".join(pdus), cuts, recv_into)
    check_error(q, err, resp(FLUSH, hdgst=hd))


# ---------------------------------------------------------------------------------------------
# Streams of random but plausible PDUs: right framing most of the time, random fields.

@st.composite
def plausible_pdu(draw, hd: bool, dd: bool):
    kind = draw(st.sampled_from(["resp", "c2h", "c2h", "r2t", "term", "icresp"]))
    cid = draw(st.integers(0, 9))
    if kind == "resp":
        p = resp(cid, draw(st.integers(0, 0xFFFF)), dw0=draw(st.integers(0, 0xFFFFFFFF)), hdgst=hd)
    elif kind == "c2h":
        datao = draw(st.sampled_from([0, 0, 512, 1000, 2999, 4096]))
        n = draw(st.integers(0, 1200))
        p = c2h(cid, datao, pattern(n, cid), last=draw(st.booleans()),
                success=draw(st.booleans()), hdgst=hd, ddgst=dd,
                pad=draw(st.sampled_from([0, 0, 4, 8])), bad_ddgst=dd and draw(st.booleans()))
        if p[1] & 0x08 and not p[1] & 0x04:
            p = p[:1] + bytes([p[1] | 0x04]) + p[2:]   # keep SUCCESS legal most of the time
            if hd:   # and the header digest right
                p = p[:24] + dgst(p[:24]) + p[28:]
    elif kind == "r2t":
        p = r2t(cid, draw(st.integers(0, 0xFFFF)), draw(st.sampled_from([0, 4096, 100])),
                draw(st.sampled_from([0, 1, 1904, 4096, 6000, 8192])), hdgst=hd)
    elif kind == "term":
        p = c2h_term(draw(st.integers(0, 7)), draw(st.integers(0, 200)),
                     bytes(draw(st.integers(0, 128))))
    else:
        p = icresp(hdgst=hd, ddgst=dd)
    if draw(st.integers(0, 4)) == 0:                   # now and then, one header byte off
        b = bytearray(p)
        b[draw(st.integers(0, min(23, len(b) - 1)))] = draw(st.integers(0, 255))
        p = bytes(b)
    return p


@FUZZ
@given(digests=DIGESTS, data=st.data(), cuts=st.lists(st.integers(0, 20000), max_size=10),
       recv_into=st.booleans())
def test_plausible_pdu_streams(digests, data, cuts, recv_into):
    hd, dd = digests
    pdus = data.draw(st.lists(plausible_pdu(hd, dd), min_size=1, max_size=12))
    q, _ = busy_queue(hd, dd)
    events, err = run(q, b"".join(pdus), cuts, recv_into)
    check_error(q, err, resp(FLUSH, hdgst=hd))
    # Completions only ever name commands that were outstanding, each once.
    done = [e[1] for e in events if e[0] == COMPLETION]
    assert len(done) == len(set(done)) and set(done) <= {READ_A, READ_B, WRITE, FLUSH, SMALL_WRITE}



# ---------------------------------------------------------------------------------------------
# The hot path against the general one: same events, same errors, same data.

def _differential(hd: bool, dd: bool, stream: bytes, cuts: list[int], recv_into: bool,
                  queue=None) -> None:
    queue = queue or busy_queue
    q0, bufs0 = queue(hd, dd)
    expect, err0 = run(q0, stream, cuts, recv_into)
    q1, bufs1 = queue(hd, dd)
    got, err1 = run(q1, stream, cuts, recv_into, fast=True)
    assert got == expect
    assert type(err1) is type(err0)
    if isinstance(err0, RemoteProtocolError):
        assert (err1.fes, err1.fei, err1.header) == (err0.fes, err0.fei, err0.header)
    assert bufs1 == bufs0
    assert q1.outstanding == q0.outstanding and q1.active_cids() == q0.active_cids()


@FUZZ
@given(digests=DIGESTS, muts=st.lists(MUTATION, max_size=4),
       cuts=st.lists(st.integers(0, 20000), max_size=10), recv_into=st.booleans())
def test_fast_path_equivalent_on_mutated_streams(digests, muts, cuts, recv_into):
    hd, dd = digests
    _differential(hd, dd, mutate(valid_pdus(hd, dd), muts), cuts, recv_into)


@FUZZ
@given(digests=DIGESTS, which=st.integers(0, 9), mut=header_mutation(),
       cuts=st.lists(st.integers(0, 20000), max_size=6), recv_into=st.booleans())
def test_fast_path_equivalent_with_one_header_byte_changed(digests, which, mut, cuts, recv_into):
    hd, dd = digests
    pdus = valid_pdus(hd, dd)
    kind, pos, val, _ = mut
    p = bytearray(pdus[which])
    p[pos] = (p[pos] ^ (val or 1)) if kind == "flip" else val
    pdus[which] = bytes(p)
    _differential(hd, dd, b"".join(pdus), cuts, recv_into)


@FUZZ
@given(digests=DIGESTS, data=st.data(), cuts=st.lists(st.integers(0, 20000), max_size=10),
       recv_into=st.booleans())
def test_fast_path_equivalent_on_plausible_streams(digests, data, cuts, recv_into):
    hd, dd = digests
    pdus = data.draw(st.lists(plausible_pdu(hd, dd), min_size=1, max_size=12))
    _differential(hd, dd, b"".join(pdus), cuts, recv_into)


# Large reads: completions() streams their payloads (STREAM_MIN) and finishes them itself.
READ_L = 5
LARGE = 40000


def large_queue(hd: bool, dd: bool):
    """busy_queue plus a 40000-byte read outstanding (CID 5)."""
    q, bufs = busy_queue(hd, dd)
    assert q.alloc_cid() == READ_L
    bufs[READ_L] = bytearray(LARGE)
    q.command(READ_L, IoOpcode.READ, 1, read_buf=memoryview(bufs[READ_L]))
    return q, bufs


def large_pdus(hd: bool, dd: bool, split: int) -> list[bytes]:
    """The large read's data: one C2HData, or two split at `split` (the second one streamable
    when it is the last and large)."""
    data = pattern(LARGE, 9)
    if not split:
        return [c2h(READ_L, 0, data, success=True, hdgst=hd, ddgst=dd)]
    return [c2h(READ_L, 0, data[:split], last=False, hdgst=hd, ddgst=dd),
            c2h(READ_L, split, data[split:], success=True, hdgst=hd, ddgst=dd)]


@FUZZ
@given(digests=DIGESTS, at=st.integers(0, 9), split=st.sampled_from([0, 0, 1000, 30000]),
       muts=st.lists(MUTATION, max_size=3), cuts=st.lists(st.integers(0, 90000), max_size=12),
       recv_into=st.booleans())
def test_fast_path_equivalent_with_large_reads(digests, at, split, muts, cuts, recv_into):
    hd, dd = digests
    pdus = valid_pdus(hd, dd)
    pdus[at:at] = large_pdus(hd, dd, split)
    _differential(hd, dd, mutate(pdus, muts), cuts, recv_into, queue=large_queue)


@FUZZ
@given(at=st.integers(0, 9), which=st.integers(0, 10), mut=header_mutation(),
       cuts=st.lists(st.integers(0, 90000), max_size=8), recv_into=st.booleans())
def test_fast_path_equivalent_with_a_large_read_and_one_header_byte_changed(at, which, mut, cuts,
                                                                            recv_into):
    pdus = valid_pdus(False, False)
    pdus[at:at] = large_pdus(False, False, 0)
    kind, pos, val, _ = mut
    p = bytearray(pdus[which])
    p[pos] = (p[pos] ^ (val or 1)) if kind == "flip" else val
    pdus[which] = bytes(p)
    _differential(False, False, b"".join(pdus), cuts, recv_into, queue=large_queue)
