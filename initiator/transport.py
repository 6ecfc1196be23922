"""The trio shell around one NVMe/TCP queue: a socket, a reader task and a writer task.

What it does: connects (with a timeout), runs the ICReq/ICResp exchange, then carries commands.
`submit()` parks the calling task with trio's low-level `wait_task_rescheduled`; the reader task
parses every buffered PDU per wake-up (`recv_into` a preallocated buffer, payloads streamed into
their destinations) and wakes each waiter with `reschedule`; the writer task sends everything
submitted during one scheduler tick with one `sendmsg`. These are the choices measured in
docs/hot-path.md (batched reader and writer, low-level reschedule).

On a protocol violation by the target the shell sends an H2CTermReq and closes; on EOF, a socket
error, a C2HTermReq or `aclose()`, every command in flight fails with ConnectionLost (the layer
above resubmits or fails them). What it does not do: Fabrics Connect, timers, keep-alive, reconnect
(see `controller.py`).
"""

from __future__ import annotations

import errno
import logging
import socket

import outcome
import trio
from trio.lowlevel import (
    Abort, ParkingLot, current_task, reschedule, wait_readable, wait_task_rescheduled,
    wait_writable,
)

from ._errors import (
    ConnectionLost, ConnectTimeout, DigestError, NvmeStatusError, RemoteProtocolError,
    TransportError,
)
from ._tcp import COMPLETION, DIGEST_ERROR_STATUS, IC_DONE, SEND, TERM, HostQueue

log = logging.getLogger(__name__)

_IOV_MAX = 512


async def open_socket(host: str, port: int, timeout: float) -> socket.socket:
    """A connected non-blocking TCP socket, or ConnectTimeout/ConnectionLost. Never blocks trio."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
    except socket.gaierror:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, stype, proto, _cn, addr = infos[0]
    sock = socket.socket(family, stype, proto)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
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


class Queue:
    """One connected NVMe/TCP queue. Create with `await Queue.connect(...)`, then `start(nursery)`."""

    def __init__(self, sock: socket.socket, core: HostQueue, peer: str):
        self.sock = sock
        self.core = core
        self.qid = core.qid
        self.peer = peer
        self._waiter: list = [None] * core.depth
        self._opcode = [0] * core.depth
        self._sendq: list = []
        self._writer_task = None
        self._writer_parked = False
        self._slots = ParkingLot()
        self._closed: TransportError | None = None
        self._closed_event = trio.Event()
        self.commands = 0
        self.completions = 0
        # Coarse command ages for timeout detection: the controller's checker bumps `epoch`
        # every tick; submit records it (an int store, no clock read on the hot path).
        self.epoch = 0
        self.submit_epoch = [0] * core.depth
        self.aborted = [False] * core.depth

    # -- set-up -----------------------------------------------------------------------------
    @classmethod
    async def connect(cls, host: str, port: int, qid: int, depth: int, *, hdgst: bool = False,
                      ddgst: bool = False, timeout: float = 10.0,
                      in_capsule_max: int = 8192) -> "Queue":
        """Connect a socket and finish the ICReq/ICResp exchange (NVMe/TCP 3.3), within `timeout`."""
        sock = await open_socket(host, port, timeout)
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
        while cid < 0:
            await self._slots.park()
            if self._closed is not None:
                raise self._closed
            cid = core.alloc_cid()
        bufs = core.command(cid, opc, nsid, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15,
                            data=data, read_buf=read_buf, fabrics_raw=fabrics_raw)
        self._opcode[cid] = opc
        self.submit_epoch[cid] = self.epoch
        self.aborted[cid] = False
        self.commands += 1
        sendq = self._sendq
        sendq.extend(bufs)
        if self._writer_parked:
            self._writer_parked = False
            reschedule(self._writer_task)
        self._waiter[cid] = current_task()
        waiter = self._waiter

        def abort(_raise_cancel):
            # The command stays in flight at the target: keep the CID, drop the waiter.
            waiter[cid] = None
            return Abort.SUCCEEDED

        ev = await wait_task_rescheduled(abort)
        status = ev[2]
        if status:
            if status == DIGEST_ERROR_STATUS:
                raise DigestError(f"data digest mismatch on queue {self.qid} (opcode 0x{opc:02x})")
            raise NvmeStatusError.from_status_field(status, opcode=opc, cid=cid)
        return ev[3], ev[4]

    # -- tasks ------------------------------------------------------------------------------
    async def _writer(self) -> None:
        self._writer_task = current_task()
        sock = self.sock
        try:
            while True:
                if not self._sendq:
                    self._writer_parked = True
                    await wait_task_rescheduled(self._writer_abort)
                    continue
                bufs = self._sendq
                self._sendq = []
                while bufs:
                    try:
                        n = sock.sendmsg(bufs[:_IOV_MAX])
                    except BlockingIOError:
                        await wait_writable(sock)
                        continue
                    if n == sum(len(b) for b in bufs[:_IOV_MAX]) and len(bufs) <= _IOV_MAX:
                        break
                    while n:
                        b = bufs[0]
                        lb = len(b)
                        if n >= lb:
                            n -= lb
                            bufs.pop(0)
                        else:
                            bufs[0] = memoryview(b).cast("B")[n:]
                            n = 0
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
        waiter = self._waiter
        try:
            while True:
                sink = rx.payload_sink()
                try:
                    if sink is not None:
                        n = sock.recv_into(sink)
                        if n:
                            rx.received_into_sink(n)
                    else:
                        n = sock.recv_into(core.buffer())
                        core.received(n)
                except BlockingIOError:
                    await wait_readable(sock)
                    continue
                if n == 0:
                    self._die(ConnectionLost(f"{self.peer}: connection closed by the target"))
                    return
                woke = False
                while True:
                    ev = core.next_event()
                    if ev is None:
                        break
                    kind = ev[0]
                    if kind == COMPLETION:
                        self.completions += 1
                        task = waiter[ev[1]]
                        if task is not None:
                            waiter[ev[1]] = None
                            reschedule(task, outcome.Value(ev))
                            woke = True
                        if self._slots:
                            self._slots.unpark()
                    elif kind == SEND:
                        self._sendq.extend(ev[1])
                        if self._writer_parked:
                            self._writer_parked = False
                            reschedule(self._writer_task)
                    elif kind == TERM:
                        self._die(ConnectionLost(
                            f"{self.peer}: target sent C2HTermReq (FES 0x{ev[1]:x}, FEI {ev[2]})"))
                        return
                if woke:
                    await trio.lowlevel.checkpoint()
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

    async def _send_term_req(self, e: RemoteProtocolError) -> None:
        try:
            self.sock.send(self.core.term_req(e))
        except OSError:
            pass

    def _die(self, exc: TransportError) -> None:
        """Mark the queue dead and fail every waiter with `exc` (idempotent)."""
        if self._closed is not None:
            return
        self._closed = exc
        for cid in self.core.fail_all():
            task = self._waiter[cid]
            if task is not None:
                self._waiter[cid] = None
                reschedule(task, outcome.Error(exc))
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
                "commands": self.commands, "closed": str(self._closed) if self._closed else None}
