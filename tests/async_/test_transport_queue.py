"""The trio shell of one queue (`initiator.transport.Queue`) against a scripted peer on a
socketpair: hand-built target PDUs (tests/helpers/nvme_tcp_wire.py), no target code.

- `read`/`write` (the hot path) and `submit` carry the right capsules and return or raise as
  the completion says; a cancelled `read` keeps its CID until the target answers.
- `read_nowait` callbacks: each runs once, with its own data, even when the callbacks of one
  receive batch submit again and reuse CIDs freed later in that batch; a lost connection fails
  callbacks and waiters alike; the callbacks of one receive run as one batch (what they defer
  runs after the last of them, initiator._batch).
- Output submitted by tasks or callbacks reaches the peer whether the reader is polling or
  asleep; the reader polls only while commands are outstanding, never when idle.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct

import pytest
import trio
import trio.testing

from helpers.nvme_tcp_wire import c2h, icresp, resp, status
from initiator._batch import CALLBACKS
from initiator._errors import ConnectionLost, NvmeStatusError
from initiator._sink import FdSink
from initiator._tcp import IC_DONE, HostQueue
from initiator._util import single_errors
from initiator.transport import Queue

SQE = struct.Struct("<BBBBIBBHI24xI3xBQI12x")   # as the spec lays out a Read/Write capsule


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


class Peer:
    """The target side: reads capsules, answers with raw PDUs."""

    def __init__(self, sock: socket.socket):
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.buf = bytearray()

    async def capsules(self, n: int) -> list[tuple]:
        """The next `n` capsules -> (opcode, cid, nsid, sgl length, slba, cdw12, data)."""
        out = []
        while len(out) < n:
            while len(self.buf) < 8:
                self.buf += await self.sock.recv(65536)
            plen = struct.unpack_from("<I", self.buf, 4)[0]
            while len(self.buf) < plen:
                self.buf += await self.sock.recv(65536)
            f = SQE.unpack_from(self.buf, 0)
            assert f[0] == 4 and f[2] == 72
            out.append((f[5], f[7], f[8], f[9], f[11], f[12], bytes(self.buf[72:plen])))
            del self.buf[:plen]
        return out

    async def send(self, *pdus: bytes) -> None:
        data = memoryview(b"".join(pdus))
        while data:
            data = data[await self.sock.send(data):]


def open_queue(sock: socket.socket, nursery) -> Queue:
    """A started Queue on `sock`, past the ICReq/ICResp exchange."""
    sock.setblocking(False)
    core = HostQueue(1, 8)
    core.receive_data(icresp())
    assert core.next_event()[0] == IC_DONE
    q = Queue(sock, core, "peer")
    q.start(nursery)
    return q


@pytest.fixture
async def pair(nursery):
    a, b = socket.socketpair()
    q = open_queue(a, nursery)
    yield q, Peer(b)
    q.close()
    b.close()


async def test_read_returns_the_data(pair):
    q, peer = pair
    buf = bytearray(4096)
    async with trio.open_nursery() as n:
        n.start_soon(q.read, 3, 0x1_0000_0010, 8, buf)
        [(opc, cid, nsid, length, slba, cdw12, _)] = await peer.capsules(1)
        assert (opc, nsid, length, slba, cdw12) == (2, 3, 4096, 0x1_0000_0010, 7)
        await peer.send(c2h(cid, 0, pattern(4096, 1), success=True))
    assert buf == pattern(4096, 1)
    assert q.core.outstanding == 0 and q.completions == 1


async def test_a_small_c2hdata_cut_by_the_recv_boundary_is_taken_whole(pair):
    """Half a 4 KiB C2HData, then (a moment later) the rest with a second one: the reader
    waits for the cut PDU's rest in its buffer and takes both on the hot path
    (HostQueue.completions, `cut`), never streaming through next_event's general path."""
    q, peer = pair
    resolved = []
    general = q.core.rx.sink_resolver
    q.core.rx.sink_resolver = lambda *a: resolved.append(a) or general(*a)
    bufs = [bytearray(4096), bytearray(4096)]
    got: list = []
    for i, b in enumerate(bufs):
        q.read_nowait(1, i * 8, 8, b, got.append)
    caps = await peer.capsules(2)
    pdus = b"".join(c2h(cap[1], 0, pattern(4096, 5 + k), success=True)
                    for k, cap in enumerate(caps))
    await peer.send(pdus[:2000])
    await trio.sleep(0.01)
    assert got == [] and q.core.cut == 24 + 4096
    await peer.send(pdus[2000:])
    with trio.fail_after(5):
        while len(got) < 2:
            await trio.sleep(0.001)
    assert got == [None, None] and resolved == []
    assert bufs == [pattern(4096, 5), pattern(4096, 6)] and q.core.outstanding == 0


async def test_callbacks_of_one_receive_run_as_one_batch_and_what_they_defer_after_it(pair):
    """The callbacks of the completions one receive brings run inside one batch
    (initiator._batch.CALLBACKS): what they defer runs once, after the last of them (the FUSE
    mount's replies); a completion of its own receive is its own batch."""
    q, peer = pair
    events: list = []

    def on_done(i):
        def cb(exc):
            events.append(("done", i, exc))
            assert CALLBACKS.defer(lambda: events.append(("deferred", i)))
        return cb
    bufs = [bytearray(4096) for _ in range(3)]
    for i, b in enumerate(bufs):
        q.read_nowait(1, i * 8, 8, b, on_done(i))
    caps = await peer.capsules(3)
    await peer.send(b"".join(c2h(cap[1], 0, pattern(4096, k), success=True)
                             for k, cap in enumerate(caps[:2])))
    with trio.fail_after(5):
        while len(events) < 4:
            await trio.sleep(0.001)
    assert events == [("done", 0, None), ("done", 1, None), ("deferred", 0), ("deferred", 1)]
    await peer.send(c2h(caps[2][1], 0, pattern(4096, 2), success=True))
    with trio.fail_after(5):
        while len(events) < 6:
            await trio.sleep(0.001)
    assert events[4:] == [("done", 2, None), ("deferred", 2)]
    assert CALLBACKS.depth == 0 and not CALLBACKS.deferred
    assert not CALLBACKS.defer(lambda: None)          # outside a batch: nothing queued


async def test_a_callback_that_raises_still_lets_the_batch_deferred_work_run():
    """A callback's error still escapes the reader (a consumer bug is not hidden), and the work
    the batch's earlier callbacks deferred runs all the same; the batch is closed, so later
    ones defer again."""
    ran = []

    def good(exc):
        CALLBACKS.defer(lambda: ran.append("deferred"))

    def bad(exc):
        raise RuntimeError("consumer bug")
    a, b = socket.socketpair()
    peer = Peer(b)
    with pytest.raises(RuntimeError, match="consumer bug"), single_errors():
        async with trio.open_nursery() as n:
            q = open_queue(a, n)
            q.read_nowait(1, 0, 8, bytearray(4096), good)
            q.read_nowait(1, 8, 8, bytearray(4096), bad)
            caps = await peer.capsules(2)
            await peer.send(b"".join(c2h(cap[1], 0, pattern(4096, 1), success=True)
                                     for cap in caps))
            with trio.fail_after(5):
                await trio.sleep_forever()
    b.close()
    assert ran == ["deferred"] and CALLBACKS.depth == 0 and not CALLBACKS.deferred


class CountingSocket(socket.socket):
    """Records what each scatter receive (`recvmsg_into`) took: (bytes, first buffer's size)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.scatters: list[tuple[int, int]] = []
        self.plain = []      # what each plain recv_into took

    def recvmsg_into(self, buffers, *a):
        res = super().recvmsg_into(buffers, *a)
        self.scatters.append((res[0], len(buffers[0])))
        return res

    def recv_into(self, buffer, *a):
        n = super().recv_into(buffer, *a)
        self.plain.append(n)
        return n


@pytest.fixture
async def counted(nursery):
    """A started Queue on a CountingSocket, its scripted peer and the socket."""
    a, b = socket.socketpair()
    sock = CountingSocket(fileno=a.detach())
    q = open_queue(sock, nursery)
    yield q, Peer(b), sock
    q.close()
    b.close()


async def large_reads(q: Queue, peer: Peer, count: int, n: int):
    """`count` nowait reads of `n` bytes -> (buffers, completion list, their capsules)."""
    bufs = [bytearray(n) for _ in range(count)]
    got: list = []
    for i, buf in enumerate(bufs):
        q.read_nowait(1, i * 64, n // 512, buf, got.append)
    return bufs, got, await peer.capsules(count)


async def completed(got: list, count: int) -> None:
    with trio.fail_after(5):
        while len(got) < count:
            await trio.sleep(0.001)


async def test_a_large_payload_and_the_next_header_come_in_one_receive(counted):
    """Large reads: the rest of a payload goes straight into its buffer and the next PDU's
    header into the receive buffer with one recvmsg (one receive per read, not two); every
    byte lands where it belongs, across back-to-back PDUs and a CapsuleResp behind them."""
    q, peer, sock = counted
    n = 32768
    bufs, got, caps = await large_reads(q, peer, 4, n)
    # The first one whole (it switches the reader to taking headers alone), then the others
    # together, the last one's status in a CapsuleResp of its own.
    await peer.send(c2h(caps[0][1], 0, pattern(n, 0), success=True))
    await completed(got, 1)
    await peer.send(c2h(caps[1][1], 0, pattern(n, 1), success=True),
                    c2h(caps[2][1], 0, pattern(n, 2), success=True),
                    c2h(caps[3][1], 0, pattern(n, 3)), resp(caps[3][1]))
    await completed(got, 4)
    assert got == [None] * 4
    assert bufs == [pattern(n, k) for k in range(4)] and q.core.outstanding == 0
    assert any(took > first for took, first in sock.scatters), sock.scatters


async def test_a_small_rest_of_a_large_payload_does_not_pull_in_the_next_one(counted):
    """While payloads are large, a rest smaller than the zero-copy threshold also goes straight
    into its destination with the next header (scatter): received into the receive buffer with
    what follows it, it would bring part of the next payload along, to be copied again."""
    q, peer, sock = counted
    n = 32768
    bufs, got, caps = await large_reads(q, peer, 2, n)
    first = c2h(caps[0][1], 0, pattern(n, 4), success=True)
    await peer.send(first[:24 + 20000])            # a rest of 12768 bytes to come
    with trio.fail_after(5):
        while q.core.rx.payload_sink() is None:
            await trio.sleep(0.001)
    plain = len(sock.plain)
    await peer.send(first[24 + 20000:], c2h(caps[1][1], 0, pattern(n, 5), success=True))
    await completed(got, 2)
    assert got == [None, None] and bufs == [pattern(n, 4), pattern(n, 5)]
    assert sock.plain[plain:] == [], sock.plain       # no plain receive once streaming
    assert sock.scatters


async def test_read_with_data_then_capsule_resp(pair):
    q, peer = pair
    buf = bytearray(1024)
    async with trio.open_nursery() as n:
        n.start_soon(q.read, 1, 0, 2, buf)
        [(_, cid, *_rest)] = await peer.capsules(1)
        await peer.send(c2h(cid, 0, pattern(512, 2), last=False),
                        c2h(cid, 512, pattern(512, 3)), resp(cid))
    assert buf == pattern(512, 2) + pattern(512, 3)


async def test_read_error_status_raises(pair):
    q, peer = pair

    async def answer():
        [(_, cid, *_rest)] = await peer.capsules(1)
        await peer.send(resp(cid, status(0, 0x80, dnr=True)))

    async with trio.open_nursery() as n:
        n.start_soon(answer)
        with pytest.raises(NvmeStatusError) as ei:
            await q.read(1, 10**9, 1, bytearray(512))
    assert (ei.value.sct, ei.value.sc, ei.value.dnr) == (0, 0x80, True)


async def test_write_in_capsule_and_submit(pair):
    q, peer = pair

    async def answer():
        caps = await peer.capsules(2)
        by_opc = {c[0]: c for c in caps}
        assert by_opc[1][6] == pattern(4096, 4) and by_opc[1][5] == 7 | (1 << 30)
        await peer.send(*(resp(c[1], dw0=5 if c[0] == 0 else 0) for c in caps))

    async with trio.open_nursery() as n:
        n.start_soon(answer)
        n.start_soon(lambda: q.write(1, 100, 8, pattern(4096, 4), fua=True))
        assert await q.submit(0x00, 1) == (5, 0)          # Flush


async def test_cancelled_read_keeps_its_cid_until_the_answer(pair):
    q, peer = pair
    with trio.move_on_after(0.05):
        await q.read(1, 0, 1, bytearray(512))
    [(_, cid, *_rest)] = await peer.capsules(1)
    assert q.core.active_cids() == [cid]
    other = bytearray(512)
    async with trio.open_nursery() as n:
        n.start_soon(q.read, 1, 1, 1, other)
        [(_, cid2, *_rest)] = await peer.capsules(1)
        assert cid2 != cid
        await peer.send(c2h(cid, 0, pattern(512, 5), success=True),
                        c2h(cid2, 0, pattern(512, 6), success=True))
    assert other == pattern(512, 6)
    assert q.core.outstanding == 0


async def test_callbacks_that_resubmit_reuse_cids_of_the_same_batch(pair):
    """Eight reads complete in one receive batch; each callback starts another read, which
    takes a CID freed by the same batch. Every callback must still run once, for its read."""
    q, peer = pair
    got: dict[int, list] = {}
    bufs: dict[int, bytearray] = {}

    def start(slba: int) -> None:
        bufs[slba] = buf = bytearray(512)

        def done(exc, slba=slba, buf=buf):
            got.setdefault(slba, []).append(exc)
            assert buf == pattern(512, slba)
            if slba < 8:
                start(slba + 8)
        q.read_nowait(1, slba, 1, buf, done)

    for i in range(8):
        start(i)
    for _round in range(2):
        caps = await peer.capsules(8)
        await peer.send(*(c2h(c[1], 0, pattern(512, c[4]), success=True) for c in caps))
    with trio.fail_after(5):
        while len(got) < 16:
            await trio.sleep(0.001)
    assert got == {i: [None] for i in range(16)}
    assert q.core.outstanding == 0


async def test_callback_gets_the_status_error(pair):
    q, peer = pair
    got = []
    q.read_nowait(1, 0, 1, bytearray(512), got.append)
    [(_, cid, *_rest)] = await peer.capsules(1)
    await peer.send(resp(cid, status(0, 0x02)))
    with trio.fail_after(5):
        while not got:
            await trio.sleep(0.001)
    assert isinstance(got[0], NvmeStatusError) and got[0].sc == 0x02


async def test_read_nowait_without_a_free_cid_would_block(pair):
    q, peer = pair
    for i in range(8):
        q.read_nowait(1, i, 1, bytearray(512), lambda exc: None)
    with pytest.raises(trio.WouldBlock):
        q.read_nowait(1, 9, 1, bytearray(512), lambda exc: None)
    await peer.capsules(8)


async def test_connection_loss_fails_waiters_and_callbacks(pair):
    q, peer = pair
    got = []
    q.read_nowait(1, 0, 1, bytearray(512), got.append)

    async def lose():
        await peer.capsules(2)
        peer.sock.close()

    async with trio.open_nursery() as n:
        n.start_soon(lose)
        with pytest.raises(ConnectionLost):
            await q.read(1, 1, 1, bytearray(512))
    assert len(got) == 1 and isinstance(got[0], ConnectionLost)
    with pytest.raises(ConnectionLost):
        q.read_nowait(1, 0, 1, bytearray(512), got.append)


async def test_reader_sleeps_when_idle_and_after_polling_briefly(pair):
    q, peer = pair
    buf = bytearray(512)
    async with trio.open_nursery() as n:
        n.start_soon(q.read, 1, 0, 1, buf)
        [(_, cid, *_rest)] = await peer.capsules(1)
        # A command is outstanding and the peer is silent: the reader polls for `spin`
        # seconds, then sleeps in epoll like every other task.
        with trio.fail_after(5):
            await trio.testing.wait_all_tasks_blocked(cushion=10 * q.spin)
        await peer.send(c2h(cid, 0, pattern(512, 7), success=True))
    assert buf == pattern(512, 7)
    # Idle: nothing outstanding, nothing to poll for.
    with trio.fail_after(5):
        await trio.testing.wait_all_tasks_blocked()


async def test_many_commands_from_tasks_all_reach_the_peer(pair):
    q, peer = pair
    results: dict[int, bytearray] = {}

    async def one(i):
        results[i] = b = bytearray(512)
        await q.read(1, i, 1, b)

    async def answer():
        served = 0
        while served < 40:
            caps = await peer.capsules(1)
            await peer.send(*(c2h(c[1], 0, pattern(512, c[4] & 0xFF), success=True)
                              for c in caps))
            served += len(caps)

    async with trio.open_nursery() as n:
        n.start_soon(answer)
        for i in range(40):                # more than the 8 CIDs: some wait for a free one
            n.start_soon(one, i)
    assert all(results[i] == pattern(512, i) for i in range(40))


async def test_public_trio_parking_works_too(monkeypatch, nursery):
    """Without trio's private trap message the queue parks with wait_task_rescheduled."""
    import initiator.transport as transport
    park, make = transport._parking(False)
    monkeypatch.setattr(transport, "_park", park)
    monkeypatch.setattr(transport, "_park_msg", make)
    a, b = socket.socketpair()
    a.setblocking(False)
    core = HostQueue(1, 4)
    core.receive_data(icresp())
    core.next_event()
    q = Queue(a, core, "peer")
    q.start(nursery)
    peer = Peer(b)
    buf = bytearray(512)
    with trio.move_on_after(0.05):
        await q.read(1, 0, 1, buf)                       # cancelled: the CID stays reserved
    async with trio.open_nursery() as n:
        n.start_soon(q.read, 1, 1, 1, buf)
        caps = await peer.capsules(2)
        await peer.send(*(c2h(c[1], 0, pattern(512, c[4]), success=True) for c in caps))
    assert buf == pattern(512, 1) and core.outstanding == 0
    q.close()
    b.close()



@contextlib.contextmanager
def sized_pipe(size: int):
    """A non-blocking pipe of `size` bytes (skips where pipe-max-size is smaller)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
        except PermissionError:
            pytest.skip("pipe-max-size below 1 MiB")   # never on CI's root container
        yield r, w
    finally:
        os.close(r)
        os.close(w)


async def start_pipe_read(q, peer, w: int, n: int):
    """A read of `n` bytes into an FdSink on `w`: (sink, completion list, the capsule's CID)."""
    sink = FdSink(w, n)
    got: list = []
    q.read_nowait(1, 0, n // 512, sink, got.append)
    (cap,) = await peer.capsules(1)
    assert cap[3] == n
    return sink, got, cap[1]


async def wait_draining(r: int, sink: FdSink, got: list, timeout: float = 5) -> bytearray:
    """Wait for the read's completion, taking what reaches the pipe meanwhile (until the sink
    overflows: then the pipe is left for drain_into_spill)."""
    out = bytearray()
    with trio.fail_after(timeout):
        while not got:
            if not sink.overflow:
                try:
                    out += os.read(r, 1 << 20)
                except BlockingIOError:
                    pass
            await trio.sleep(0.001)
    return out


def read_pipe(r: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += os.read(r, n)
    return bytes(out)


@pytest.mark.parametrize("pipe_size", [1 << 20, 4096], ids=["roomy-pipe", "tiny-pipe"])
async def test_read_into_a_pipe_sink(pair, pipe_size):
    """A read whose destination is an FdSink: the payload goes socket -> pipe (splice), or,
    once a tiny pipe is full, into the sink's spill buffer; either way the bytes the consumer
    gets back are the transfer's, in order."""
    q, peer = pair
    n = 256 * 1024
    data = os.urandom(n)
    with sized_pipe(pipe_size) as (r, w):
        sink, got, cid = await start_pipe_read(q, peer, w, n)
        await peer.send(c2h(cid, 0, data[:n // 2], last=False),
                        c2h(cid, n // 2, data[n // 2:], success=True))
        out = await wait_draining(r, sink, got)       # a roomy pipe: drained as we go
        assert got == [None]
        if pipe_size == 4096:
            assert sink.overflow and sink.written + sink.spilled == n
            assert bytes(sink.drain_into_spill(r)) == data
        else:
            assert not sink.overflow
            assert bytes(out) + read_pipe(r, n - len(out)) == data
        assert q.core.outstanding == 0


async def test_a_payload_trickling_in_is_spliced_in_whole_steps(pair, monkeypatch):
    """A payload that arrives 1 KiB at a time must not be spliced 1 KiB at a time: each splice
    takes pipe slots for the pages it cuts, and 256 small pieces would overflow a 1 MiB pipe.
    The reader waits for a splice step (64 KiB, or the rest) before it splices."""
    q, peer = pair
    moved = []
    real_splice = os.splice

    def splice(*args, **kw):
        k = real_splice(*args, **kw)
        moved.append(k)
        return k
    monkeypatch.setattr(os, "splice", splice)
    n = 256 * 1024
    data = os.urandom(n)
    with sized_pipe(1 << 20) as (r, w):
        sink, got, cid = await start_pipe_read(q, peer, w, n)
        pdu = c2h(cid, 0, data, success=True)
        await peer.send(pdu[:24])
        for off in range(24, len(pdu), 1024):
            await peer.send(pdu[off:off + 1024])
            await trio.sleep(0)                     # let the reader see each piece
        with trio.fail_after(5):
            while not got:
                await trio.sleep(0.001)
        assert got == [None]
        assert not sink.overflow and sink.written == n
        # (the first bytes may come with the header's recv and be written, not spliced)
        assert min(moved[:-1], default=65536) >= 65536 and sum(moved) > n - 65536, moved
        assert read_pipe(r, n) == data


async def test_a_receive_window_smaller_than_a_splice_step_still_completes(nursery):
    """Over TCP with a receive buffer too small for a 64 KiB step to ever be waiting (a young
    connection before autotuning, or a fixed SO_RCVBUF), the reader must splice what is there
    once the kernel wakes it below SO_RCVLOWAT: waiting for a whole step deadlocked (the
    target waits for window, the reader for a step). Found as a fresh mount whose first 1 MiB
    fio reads at QD4 hung until the 30 s I/O timeout."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    a = socket.socket()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)    # fixed: no autotuning
    a.connect(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    q = open_queue(a, nursery)
    peer = Peer(b)
    try:
        n = 256 * 1024
        data = os.urandom(n)
        with sized_pipe(1 << 20) as (r, w):
            sink, got, cid = await start_pipe_read(q, peer, w, n)
            async with trio.open_nursery() as inner:
                inner.start_soon(peer.send, c2h(cid, 0, data, success=True))
                out = await wait_draining(r, sink, got, timeout=10)
            assert got == [None]
            if sink.overflow:
                assert bytes(sink.drain_into_spill(r)) == data
            else:
                assert bytes(out) + read_pipe(r, n - len(out)) == data
            assert q.statistics()["short_splices"] > 0
            assert q.core.outstanding == 0
    finally:
        q.close()
        b.close()


@pytest.mark.parametrize("host", ["a..b", "a" * 64 + ".example", ".", "\ufffd"])
async def test_a_host_name_idna_cannot_encode_is_a_transport_error(host):
    # trio's getaddrinfo encodes names with IDNA, which raises UnicodeError (a ValueError) on
    # an empty or over-long label: that must arrive as the typed error every caller handles.
    from initiator.transport import open_socket
    with pytest.raises(ConnectionLost, match="cannot resolve"):
        await open_socket(host, 4420, 1.0)
