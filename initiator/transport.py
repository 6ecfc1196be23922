"""The trio shell around one NVMe/TCP queue: a socket, a reader task and a writer task.

What it does: connects (with a timeout), runs the ICReq/ICResp exchange, then carries commands.
These are the choices measured in docs/hot-path.md, with figures in docs/performance.md:

- Submitting encodes the capsule into the CID's preallocated buffer and queues it; `read`,
  `write` and `submit` then park the calling task with trio's low-level
  `wait_task_rescheduled` (its message preallocated per CID), `read_nowait`/`write_nowait`
  register a completion callback instead (no task per I/O).
- The reader task receives with `recv_into` a preallocated buffer (or, for large payloads,
  straight into the destination with the next PDU header behind it in one `recvmsg_into`, or
  with `splice` into the pipe of an `FdSink` destination),
  takes every plain completion in one pass (`HostQueue.completions`), the rest through
  `next_event()`, and wakes each waiter with `reschedule` and one shared wake value, or runs
  its callback. While commands are outstanding it polls (yields and retries) for `spin`
  seconds before sleeping in epoll; never when idle.
- Output goes out with one `sendmsg` per batch, sent by the reader itself whenever it is running
  or polling (what callbacks and tasks submitted since its last pass); the writer task sends
  only while the reader sleeps, and waits for room when the socket is full.

On a protocol violation by the target the shell sends an H2CTermReq and closes; on EOF, a socket
error, a C2HTermReq or `aclose()`, every command in flight fails with ConnectionLost (the layer
above resubmits or fails them). What it does not do: Fabrics Connect, timers, keep-alive, reconnect
(see `controller.py`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import termios
import types
from time import perf_counter

import outcome
import trio
from trio.lowlevel import (
    Abort, ParkingLot, checkpoint, current_task, reschedule, wait_readable,
    wait_task_rescheduled, wait_writable,
)

from ._batch import CALLBACKS
from ._errors import (
    ConnectionLost, ConnectTimeout, DigestError, NvmeError, NvmeStatusError,
    RemoteProtocolError, TransportError,
)
from ._sink import FdSink
from ._spec import RW_FUA
from ._tcp import COMPLETION, DIGEST_ERROR_STATUS, IC_DONE, SEND, TERM, HostQueue
from ._util import IdleMeter, drop_sent, set_tcp_congestion

_OPC_READ = 0x02
_OPC_WRITE = 0x01
# Reader polling budget while commands are outstanding (see Queue.spin).
SPIN_SECONDS = 50e-6
# The process's polling idle time (blockfs bench reports CPU minus it as busy time).
POLL_IDLE = IdleMeter()
# A payload rest smaller than this is received into the receive buffer with what follows it
# (one recv) rather than straight into its destination (zero copy, one recv for it alone).
_ZERO_COPY_MIN = 16384
# Every PDU header the host receives after the ICResp is 24 bytes (NVMe/TCP 3.6.2).
_HEADER = 24
# While received data keeps coming, the reader sends once this many buffers are queued (else
# when the socket runs dry): fewer, larger sendmsg calls.
_SEND_BATCH = 8
# The reader yields after this many receive batches in a row that woke no task.
_YIELD_EVERY = 8

log = logging.getLogger(__name__)

_IOV_MAX = 512
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# Splice at least this much at a time (or the payload's rest): a splice of what just arrived
# cuts the socket's pages into more pipe slots, and a pipe that runs out of slots overflows
# (FdSink). 1 MiB O_DIRECT dd through FUSE: 8 of the first 13 transfers overflowed without
# it (and FUSE switched splicing off), none of 32 with it. A receive window smaller than a
# step (a young connection before autotuning, a small SO_RCVBUF) never lets a step arrive: the
# kernel then reports the socket readable below SO_RCVLOWAT (tcp_epollin_ready: the window is
# about to close), and the reader splices what is there once woken so (`_splice_short`).
_SPLICE_STEP = 64 * 1024


async def open_socket(host: str, port: int, timeout: float,
                      tcp_congestion: str | None = None) -> socket.socket:
    """A connected non-blocking TCP socket, or ConnectTimeout/ConnectionLost (also for a name
    that cannot be encoded for a lookup), or socket.gaierror. Never blocks trio.
    `tcp_congestion` picks the socket's congestion control before the handshake (ValueError
    when this kernel does not offer it)."""
    try:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
        except socket.gaierror:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError as e:
        # Both encode the name with IDNA, which refuses an empty or over-long label ("a..b";
        # a discovery log's TRADDR is free text) before any lookup.
        raise ConnectionLost(f"cannot resolve {host!r}: {e}") from None
    family, stype, proto, _cn, addr = infos[0]
    sock = socket.socket(family, stype, proto)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if tcp_congestion:
            set_tcp_congestion(sock, tcp_congestion)
        with trio.fail_after(timeout):
            err = sock.connect_ex(addr)
            if err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                await wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise ConnectionLost(f"connect to {host}:{port}: {errno.errorcode.get(err, err)}: "
                                     f"{socket.os.strerror(err)}")
    except trio.TooSlowError:
        sock.close()
        raise ConnectTimeout(f"connect to {host}:{port} timed out after {timeout:g} s") from None
    except BaseException:
        sock.close()
        raise
    return sock


try:
    # trio's own trap message for wait_task_rescheduled (trio._core._traps, private). Yielding a
    # preallocated one per CID skips an attrs object and two coroutine frames per I/O (0.6 of
    # the 1.9 us a park/wake costs; docs/performance.md). Without it (another trio, a surprise
    # at import), the public wait_task_rescheduled is used.
    from trio._core._traps import WaitTaskRescheduled as _WTR
    _WTR(lambda _rc: Abort.SUCCEEDED)
except Exception:   # noqa: BLE001 - any surprise means: use the public API
    _WTR = None


def _parking(private: bool):
    """-> (park, make_msg): `await park(make_msg(abort_fn))` is
    `await wait_task_rescheduled(abort_fn)`, the message made once per CID."""
    if private:
        @types.coroutine
        def park(msg):
            return (yield msg).unwrap()
        return park, _WTR

    async def park_public(abort_fn):
        return await wait_task_rescheduled(abort_fn)
    return park_public, lambda abort_fn: abort_fn


_park, _park_msg = _parking(_WTR is not None)


class _Wake(outcome.Value):
    """A reusable wake-up value: `unwrap()` without outcome's single-use check, so one shared
    instance wakes every plain successful completion (no per-I/O allocation; docs/hot-path.md
    item 3: +10%)."""

    __slots__ = ()

    def unwrap(self):
        return self.value


_WAKE_OK = _Wake(None)


class Queue:
    """One connected NVMe/TCP queue. Create with `await Queue.connect(...)`, then `start(nursery)`.

    Three ways to run a command:
    - `submit(opc, ...)`: any command; waits and returns (dw0, dw1).
    - `read(...)` / `write(...)`: the hot path for whole-buffer Read/Write; waits.
    - `read_nowait(...)` / `write_nowait(...)`: the same without a task per I/O (SPDK-style):
      `on_done(exc)` runs in the reader task when the command completes (`exc` None on success).
      For callers with many I/Os and nobody waiting on each (benchmarks, readahead, batches).
    """

    # Slots, not instance dicts, on the NVMe path's per-queue objects (also HostQueue, Session,
    # Controller): fewer cache lines touched per I/O (docs/performance.md, stop 17).
    __slots__ = (
        "_aborts", "_callback", "_closed", "_closed_event", "_done", "_fd", "_inq_buf",
        "_lowat_honoured", "_opcode", "_parks", "_reader_active", "_ready", "_sendq", "_slots",
        "_splice_short", "_waiter", "_writer_blocked", "_writer_parked", "_writer_task", "aborted",
        "commands", "completions", "core", "epoch", "peer", "qid", "short_splices", "sock", "spin",
        "submit_epoch"
    )

    def __init__(self, sock: socket.socket, core: HostQueue, peer: str):
        self.sock = sock
        self.core = core
        self.qid = core.qid
        self.peer = peer
        depth = core.depth
        self._waiter: list = [None] * depth
        self._callback: list = [None] * depth
        self._aborts = [self._make_abort(c) for c in range(depth)]
        self._parks = [_park_msg(a) for a in self._aborts]
        self._opcode = [0] * depth
        self._sendq: list = []
        self._done: list = []
        self._ready: list = []
        self._writer_task = None
        self._writer_parked = False
        self._writer_blocked = False
        # True while the reader task runs or polls (it comes back within a scheduler pass and
        # sends what is queued): submitters then need not wake the writer task.
        self._reader_active = False
        self._slots = ParkingLot()
        self._closed: TransportError | None = None
        self._closed_event = trio.Event()
        self.commands = 0
        self.completions = 0
        # Seconds the reader polls (yields and retries recv) before sleeping in epoll while
        # commands are outstanding; never when idle (docs/hot-path.md item 6).
        self.spin = SPIN_SECONDS
        # Coarse command ages for timeout detection: the controller's checker bumps `epoch`
        # every tick; submit records it (an int store, no clock read on the hot path).
        self.epoch = 0
        self.submit_epoch = [0] * depth
        self.aborted = [False] * depth
        # Reads into pipes (FdSink): the socket's descriptor for splice and SIOCINQ.
        self._fd = sock.fileno()
        self._inq_buf = bytearray(4)
        # Woken from a sleep on SO_RCVLOWAT: splice what is there even if less than a step
        # (the window may be too small for a step to ever arrive). TCP only: its poll honours
        # SO_RCVLOWAT, so such a wake-up below it means window pressure; AF_UNIX (the unit
        # tests' socketpairs) ignores it and wakes on every byte.
        self._lowat_honoured = sock.family in (socket.AF_INET, socket.AF_INET6)
        self._splice_short = False
        self.short_splices = 0

    def _make_abort(self, cid: int):
        waiter = self._waiter

        def abort(_raise_cancel):
            # The command stays in flight at the target: keep the CID, drop the waiter.
            waiter[cid] = None
            return Abort.SUCCEEDED
        return abort


    # -- set-up -----------------------------------------------------------------------------
    @classmethod
    async def connect(cls, host: str, port: int, qid: int, depth: int, *, hdgst: bool = False,
                      ddgst: bool = False, timeout: float = 10.0,
                      in_capsule_max: int = 8192, tcp_congestion: str | None = None) -> "Queue":
        """Connect a socket and finish the ICReq/ICResp exchange (NVMe/TCP 3.3), within `timeout`."""
        sock = await open_socket(host, port, timeout, tcp_congestion)
        core = HostQueue(qid, depth, hdgst=hdgst, ddgst=ddgst, in_capsule_max=in_capsule_max)
        q = cls(sock, core, f"{host}:{port}")
        try:
            with trio.fail_after(timeout):
                await q._send_all([core.icreq()])
                while True:
                    ev = await q._recv_event()
                    if ev[0] == IC_DONE:
                        break
                    if ev[0] == TERM:
                        raise ConnectionLost(f"target terminated the connection during ICReq "
                                             f"(FES 0x{ev[1]:x})")
        except trio.TooSlowError:
            sock.close()
            raise ConnectTimeout(f"no ICResp from {host}:{port} within {timeout:g} s") from None
        except RemoteProtocolError as e:
            await q._send_term_req(e)
            sock.close()
            raise
        except BaseException:
            sock.close()
            raise
        return q

    async def _recv_event(self):
        """Set-up only: block for the next event."""
        core = self.core
        while True:
            ev = core.next_event()
            if ev is not None:
                return ev
            try:
                n = self.sock.recv_into(core.buffer())
            except BlockingIOError:
                await wait_readable(self.sock)
                continue
            except OSError as e:
                raise ConnectionLost(f"{self.peer}: {e.strerror}") from None
            if n == 0:
                raise ConnectionLost(f"{self.peer}: connection closed by the target")
            core.received(n)

    async def _send_all(self, bufs) -> None:
        bufs = [memoryview(b).cast("B") for b in bufs]
        while bufs:
            try:
                n = self.sock.sendmsg(bufs[:_IOV_MAX])
            except BlockingIOError:
                await wait_writable(self.sock)
                continue
            except OSError as e:
                raise ConnectionLost(f"{self.peer}: {e.strerror}") from None
            while n:
                b = bufs[0]
                if n >= len(b):
                    n -= len(b)
                    bufs.pop(0)
                else:
                    bufs[0] = b[n:]
                    n = 0

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._reader, name=f"nvme-tcp-reader-q{self.qid}")
        nursery.start_soon(self._writer, name=f"nvme-tcp-writer-q{self.qid}")

    # -- commands ---------------------------------------------------------------------------
    @property
    def closed(self) -> TransportError | None:
        return self._closed

    async def _wait_cid(self) -> int:
        """Every CID is busy: wait for one (woken as completions free them)."""
        while True:
            await self._slots.park()
            if self._closed is not None:
                raise self._closed
            cid = self.core.alloc_cid()
            if cid >= 0:
                return cid

    def _error(self, ev, opc: int) -> NvmeError | None:
        """The error a non-plain completion event stands for, or None (success)."""
        status = ev[2]
        if not status:
            return None
        if status == DIGEST_ERROR_STATUS:
            return DigestError(f"data digest mismatch on queue {self.qid} (opcode 0x{opc:02x})")
        return NvmeStatusError.from_status_field(status, opcode=opc, cid=ev[1])

    def _sent(self, cid: int, opc: int) -> None:
        self._opcode[cid] = opc
        self.submit_epoch[cid] = self.epoch
        self.aborted[cid] = False
        self.commands += 1
        if self._writer_parked and not self._reader_active:
            self._writer_parked = False
            reschedule(self._writer_task)

    async def submit(self, opc: int, nsid: int = 0, cdw10: int = 0, cdw11: int = 0,
                     cdw12: int = 0, cdw13: int = 0, cdw14: int = 0, cdw15: int = 0, *,
                     data=None, read_buf=None, fabrics_raw=None) -> tuple:
        """Send one command and wait for its completion -> (dw0, dw1).

        Raises NvmeStatusError for a non-zero status, DigestError for a data digest mismatch,
        ConnectionLost if the queue dies first. A cancelled caller leaves its CID reserved until
        the completion arrives (the CID must not be reused while the target may still answer).
        """
        core = self.core
        if self._closed is not None:
            raise self._closed
        cid = core.alloc_cid()
        if cid < 0:
            cid = await self._wait_cid()
        try:
            bufs = core.command(cid, opc, nsid, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15,
                                data=data, read_buf=read_buf, fabrics_raw=fabrics_raw)
        except BaseException:
            core.release_cid(cid)
            raise
        self._sendq.extend(bufs)
        self._sent(cid, opc)
        self._waiter[cid] = current_task()
        ev = await _park(self._parks[cid])
        if ev is None:
            return 0, 0
        err = self._error(ev, opc)
        if err is not None:
            raise err
        return ev[3], ev[4]

    async def read(self, nsid: int, slba: int, nlb: int, buf) -> None:
        """Read `nlb` blocks at `slba` into `buf` (exactly their size) and wait. Hot path: the
        same command and errors as `submit(READ, ...)`, with fewer steps per I/O."""
        core = self.core
        if self._closed is not None:
            raise self._closed
        cid = core.alloc_cid()
        if cid < 0:
            cid = await self._wait_cid()
        try:
            core.read_cmd(cid, nsid, slba, nlb - 1, buf, self._sendq)
        except BaseException:
            core.release_cid(cid)
            raise
        self._sent(cid, _OPC_READ)
        self._waiter[cid] = current_task()
        ev = await _park(self._parks[cid])
        if ev is not None:
            err = self._error(ev, _OPC_READ)
            if err is not None:
                raise err

    async def write(self, nsid: int, slba: int, nlb: int, data, *, fua: bool = False) -> None:
        """Write `data` (exactly `nlb` blocks) at `slba` and wait (hot path, as `read`)."""
        core = self.core
        if self._closed is not None:
            raise self._closed
        cid = core.alloc_cid()
        if cid < 0:
            cid = await self._wait_cid()
        try:
            core.write_cmd(cid, nsid, slba, (nlb - 1) | (RW_FUA if fua else 0), data,
                           self._sendq)
        except BaseException:
            core.release_cid(cid)
            raise
        self._sent(cid, _OPC_WRITE)
        self._waiter[cid] = current_task()
        ev = await _park(self._parks[cid])
        if ev is not None:
            err = self._error(ev, _OPC_WRITE)
            if err is not None:
                raise err

    def read_nowait(self, nsid: int, slba: int, nlb: int, buf, on_done) -> None:
        """Start a read without waiting; `on_done(exc)` runs in the reader task on completion
        (`exc` None, or the NvmeError / TransportError `read` would raise). It must not block
        and should not raise. Raises trio.WouldBlock when every CID is busy, the queue's error
        when it is closed. A command that never completes is failed by the controller's
        timeout handling (abort, then reset) like any other."""
        core = self.core
        if self._closed is not None:
            raise self._closed
        free = core.free_cids       # alloc_cid() without a call: this is the FUSE/NBD hot path
        if not free:
            raise trio.WouldBlock
        cid = free.pop()
        try:
            core.read_cmd(cid, nsid, slba, nlb - 1, buf, self._sendq)
        except BaseException:
            core.release_cid(cid)
            raise
        self._callback[cid] = on_done
        self._sent(cid, _OPC_READ)

    def write_nowait(self, nsid: int, slba: int, nlb: int, data, on_done, *,
                     fua: bool = False) -> None:
        """Start a write without waiting (see `read_nowait`)."""
        core = self.core
        if self._closed is not None:
            raise self._closed
        cid = core.alloc_cid()
        if cid < 0:
            raise trio.WouldBlock
        try:
            core.write_cmd(cid, nsid, slba, (nlb - 1) | (RW_FUA if fua else 0), data,
                           self._sendq)
        except BaseException:
            core.release_cid(cid)
            raise
        self._callback[cid] = on_done
        self._sent(cid, _OPC_WRITE)

    # -- tasks ------------------------------------------------------------------------------
    def _flush(self) -> bool:
        """Send as much queued output as the socket takes, with one sendmsg per _IOV_MAX
        buffers; True when all of it went. Everything queued is bytes-like with 1-byte items
        (len() is its size). Raises OSError for a dead socket."""
        bufs = self._sendq
        sendmsg = self.sock.sendmsg
        while bufs:
            whole = len(bufs) <= _IOV_MAX
            try:
                n = sendmsg(bufs if whole else bufs[:_IOV_MAX])
            except BlockingIOError:
                return False
            if whole and n == sum(map(len, bufs)):
                bufs.clear()
                return True
            drop_sent(bufs, n)
        return True

    async def _writer(self) -> None:
        self._writer_task = current_task()
        sock = self.sock
        try:
            while True:
                if not self._sendq:
                    self._writer_parked = True
                    await wait_task_rescheduled(self._writer_abort)
                    continue
                if not self._flush():
                    self._writer_blocked = True
                    try:
                        await wait_writable(sock)
                    finally:
                        self._writer_blocked = False
        except OSError as e:
            self._die(ConnectionLost(f"{self.peer}: send failed: {e.strerror or e}"))
        except trio.ClosedResourceError:
            self._die(ConnectionLost(f"{self.peer}: queue closed"))

    def _writer_abort(self, _raise_cancel):
        self._writer_parked = False
        return Abort.SUCCEEDED

    async def _reader(self) -> None:
        sock = self.sock
        core = self.core
        rx = core.rx
        recv_into = sock.recv_into
        recvmsg_into = sock.recvmsg_into
        sendq = self._sendq
        spin_end = 0.0
        idle = POLL_IDLE
        unyielded = 0
        more = False        # the last recv filled its buffer: more is probably waiting
        self._reader_active = True
        try:
            while True:
                if sendq and (not more or len(sendq) >= _SEND_BATCH) and not self._writer_blocked:
                    # What tasks and callbacks submitted since the last send, with one sendmsg
                    # (no writer task); while data keeps coming, up to _SEND_BATCH buffers.
                    self._send_or_hand_over()
                sink = rx.payload_sink()
                try:
                    if sink is None or len(sink) < _ZERO_COPY_MIN and (
                            core.last_streamed < _ZERO_COPY_MIN or type(sink) is FdSink):
                        if core.last_streamed >= _ZERO_COPY_MIN and not rx.buffered():
                            # Large reads: take the next PDU header alone, so its payload goes
                            # straight into the destination (hot-path.md: 231 against 271 us
                            # per MiB). Any small payload switches this off again.
                            view = rx.buffer()[:_HEADER]
                        else:
                            # A small rest of a payload comes with what follows it in one recv.
                            view = rx.buffer()
                        n = recv_into(view)
                        rx.received(n)
                        more = n == len(view)
                    elif type(sink) is FdSink:
                        n = self._splice(sink)
                        if n:
                            rx.received_into_sink(n)
                        more = n == len(sink)
                    else:
                        # The payload's rest straight into its destination and the next PDU
                        # header behind it in the receive buffer, with one recvmsg (scatter):
                        # one receive per large read instead of two. While payloads are large,
                        # a small rest goes so too: received into the buffer with what follows,
                        # it would bring part of the next payload, copied again from there.
                        view = rx.buffer()[:_HEADER]
                        n = recvmsg_into((sink, view))[0]
                        k = len(sink)
                        if n > k:
                            rx.received_into_sink(k)
                            rx.received(n - k)
                        elif n:
                            rx.received_into_sink(n)
                        more = n == k + len(view)
                except BlockingIOError:
                    if core.outstanding and self.spin:
                        # Poll while commands are outstanding (SPDK style): on these VMs an
                        # epoll sleep costs 15-20 us of wake-up latency (docs/hot-path.md 6).
                        now = perf_counter()
                        if not spin_end:
                            spin_end = now + self.spin
                        if now < spin_end:
                            if not idle.since:
                                idle.since = now
                            unyielded = 0
                            await checkpoint()
                            continue
                        idle.work(now)
                    spin_end = 0.0
                    unyielded = 0
                    if sendq and not self._writer_blocked:
                        self._send_or_hand_over()
                    self._reader_active = False
                    # Into a pipe: sleep until a whole splice step is there (SO_RCVLOWAT
                    # holds back epoll's readiness until then).
                    lowat = (self._splice_step(sink) if type(sink) is FdSink
                             and not sink.root.overflow else 0)
                    try:
                        if lowat:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                        await wait_readable(sock)
                        if lowat and self._lowat_honoured:
                            self._splice_short = True
                    finally:
                        self._reader_active = True
                        if lowat:
                            try:
                                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                            except OSError:
                                pass          # closed meanwhile: the wait's error says so
                    continue
                spin_end = 0.0
                if idle.since:
                    idle.work(perf_counter())    # the polling since the first miss was idle
                if n == 0:
                    self._die(ConnectionLost(f"{self.peer}: connection closed by the target"))
                    return
                woke = self._dispatch()
                if woke < 0:
                    return
                unyielded += 1
                if woke or unyielded >= _YIELD_EVERY:
                    # Let the woken tasks run (and submit) before the next recv; never hold the
                    # thread for long while data keeps coming (callbacks wake no task).
                    unyielded = 0
                    await checkpoint()
        except RemoteProtocolError as e:
            log.error("queue %d: protocol violation by the target: %s", self.qid, e)
            try:
                self.sock.send(core.term_req(e))
            except OSError:
                pass
            self._die(ConnectionLost(f"{self.peer}: protocol violation by the target: {e}"))
        except OSError as e:
            self._die(ConnectionLost(f"{self.peer}: {e.strerror or e}"))
        except trio.ClosedResourceError:
            self._die(ConnectionLost(f"{self.peer}: queue closed"))
        finally:
            self._reader_active = False
            if idle.since:
                idle.work(perf_counter())     # a stretch this reader opened ends with it
            if self._sendq and self._writer_parked:
                self._writer_parked = False
                reschedule(self._writer_task)

    def _splice(self, sink: FdSink) -> int:
        """Move the next bytes of a payload whose destination is a pipe straight from the socket
        into it (splice(2): page references, no copy); `_reader`'s recv_into for an FdSink.
        Raises BlockingIOError while less than a splice step is waiting (on TCP, once woken
        below SO_RCVLOWAT, what is there goes: the window may be smaller than a step). When
        the pipe is full the rest of the transfer is received into the sink's `spill` buffer
        instead (FdSink.overflow)."""
        root = sink.root
        if not root.overflow:
            inq = self._inq()
            if inq < self._splice_step(sink):
                if not (inq and self._splice_short):
                    raise BlockingIOError     # less than a step is there: wait as for recv
                self.short_splices += 1
            self._splice_short = False
            try:
                n = os.splice(self._fd, root.fd, len(sink), flags=_SPLICE_FLAGS)
            except BlockingIOError:
                sink.overflowed()             # data is waiting (SIOCINQ), so the pipe is full
            else:
                root.written += n
                return n
        n = self.sock.recv_into(sink.spill_view(len(sink)))
        root.spilled += n
        return n

    @staticmethod
    def _splice_step(sink: FdSink) -> int:
        n = len(sink)
        return n if n < _SPLICE_STEP else _SPLICE_STEP

    def _inq(self) -> int:
        """Bytes waiting in the socket's receive queue (SIOCINQ)."""
        fcntl.ioctl(self._fd, termios.FIONREAD, self._inq_buf, True)
        return int.from_bytes(self._inq_buf, "little")

    def _send_or_hand_over(self) -> None:
        """Send what is queued now; if the socket is full, the writer task waits for room."""
        if not self._flush() and self._writer_parked:
            self._writer_parked = False
            reschedule(self._writer_task)

    def _dispatch(self) -> int:
        """Hand out every complete PDU buffered: wake waiters, run callbacks, queue H2CData.
        Returns how many tasks were woken, plus one when the callbacks of plain completions
        (those `HostQueue.completions` takes) ran and submitted nothing (their follow-up work
        comes from other tasks, e.g. the FUSE mount's next requests: the reader lets them run;
        callbacks that resubmit, as in `blockfs bench`, keep it going), or -1 when the target
        terminated the connection. Callbacks of completions taken by next_event() (errors,
        spliced reads, PDUs off the plain path) do not count: with them counting, FUSE 1 MiB
        reads (spliced) were 3-6% slower (docs/performance.md).
        Raises RemoteProtocolError (fatal) and, from callbacks, whatever they raise."""
        core = self.core
        done = self._done
        waiter = self._waiter
        callback = self._callback
        ready = self._ready
        batch = CALLBACKS
        woke = 0
        freed = 0
        ran = False
        try:
            while True:
                if core.completions(done):
                    for cid in done:
                        task = waiter[cid]
                        if task is not None:
                            waiter[cid] = None
                            reschedule(task, _WAKE_OK)
                            woke += 1
                        else:
                            cb = callback[cid]
                            if cb is not None:
                                callback[cid] = None
                                ready.append(cb)
                    freed += len(done)
                    done.clear()
                    if ready:
                        # Callbacks run once the whole batch is taken off its CIDs: a callback
                        # that submits may reuse a CID freed later in the same batch. What
                        # they defer (the FUSE mount's replies) runs after the last of them.
                        # (CALLBACKS.begin() / end() inlined: 100 ns a batch less)
                        batch.depth += 1
                        try:
                            for cb in ready:
                                cb(None)
                        finally:
                            batch.depth -= 1
                            if batch.deferred and not batch.depth:
                                batch.run_deferred()
                        ready.clear()
                        ran = True
                cut = core.cut
                if cut < 0 or 0 < cut < _ZERO_COPY_MIN:
                    # A small plain C2HData cut by the recv boundary: receive its rest with
                    # what follows and take it here whole next time, instead of streaming
                    # it through next_event's general path (about 1 PDU in 16 at QD32); or a
                    # large one that completions() streams and will finish (cut -1).
                    break
                ev = core.next_event()
                if ev is None:
                    break
                kind = ev[0]
                if kind == COMPLETION:
                    freed += 1
                    cid = ev[1]
                    task = waiter[cid]
                    if task is not None:
                        waiter[cid] = None
                        reschedule(task, outcome.Value(ev))
                        woke += 1
                    else:
                        cb = callback[cid]
                        if cb is not None:
                            callback[cid] = None
                            cb(self._error(ev, self._opcode[cid]))
                elif kind == SEND:
                    self._sendq.extend(ev[1])
                elif kind == TERM:
                    self._die(ConnectionLost(
                        f"{self.peer}: target sent C2HTermReq (FES 0x{ev[1]:x}, FEI {ev[2]})"))
                    return -1
        finally:
            done.clear()
            ready.clear()
        if freed:
            self.completions += freed
            if self._slots:
                self._slots.unpark(count=freed)
        if ran and not self._sendq:
            woke += 1
        return woke

    async def _send_term_req(self, e: RemoteProtocolError) -> None:
        try:
            self.sock.send(self.core.term_req(e))
        except OSError:
            pass

    def _die(self, exc: TransportError) -> None:
        """Mark the queue dead and fail every waiter and callback with `exc` (idempotent)."""
        if self._closed is not None:
            return
        self._closed = exc
        failed = []
        for cid in self.core.fail_all():
            task = self._waiter[cid]
            if task is not None:
                self._waiter[cid] = None
                reschedule(task, outcome.Error(exc))
            else:
                cb = self._callback[cid]
                if cb is not None:
                    self._callback[cid] = None
                    failed.append(cb)
        self._sendq.clear()
        self._slots.unpark_all()
        if self._writer_parked:
            self._writer_parked = False
            reschedule(self._writer_task, outcome.Error(trio.ClosedResourceError()))
        try:
            trio.lowlevel.notify_closing(self.sock)
        except (RuntimeError, ValueError):
            pass
        self.sock.close()
        self._closed_event.set()
        for cb in failed:
            cb(exc)

    def close(self, reason: str = "queue closed") -> None:
        self._die(ConnectionLost(f"{self.peer}: {reason}"))

    async def wait_closed(self) -> TransportError:
        await self._closed_event.wait()
        return self._closed

    def overdue(self, max_age: int) -> list[tuple[int, int]]:
        """(cid, opcode) of commands outstanding for more than `max_age` epochs."""
        core = self.core
        limit = self.epoch - max_age
        return [(c, self._opcode[c]) for c in core.active_cids() if self.submit_epoch[c] < limit]

    def statistics(self) -> dict:
        return {"qid": self.qid, "depth": self.core.depth, "outstanding": self.core.outstanding,
                "commands": self.commands, "short_splices": self.short_splices,
                "streamed": self.core.streamed,
                "closed": str(self._closed) if self._closed else None}
