"""The trio shell of the embedded target: listeners, one task per connection, batched writes,
a keep-alive timer task per controller, and the control socket.

Theory of operation
-------------------
Each accepted connection gets a `Connection`: a reader task that `recv_into`s the queue core's
receive buffer (or, for large H2CData payloads, straight into the destination), runs
`TargetQueue.process()` over everything buffered and then sends everything the batch produced with
one non-blocking `sendmsg`. Only when the socket buffer is full does a writer task wait for
writability, so a QD32 batch costs one recv and one send (hot-path.md items 2 and 4). Output that
appears outside a batch (AER completions from the control socket, delayed completions, fault
PDUs) is sent by the same synchronous `flush()`; everything runs on one trio thread, so sends never
interleave.

Closing: the core sets `closing` (protocol error -> C2HTermReq, Disconnect, keep-alive expiry,
controller teardown, faults); the connection then sends what is queued (at most one second) and
closes, with an RST for the reset fault. A broken or hostile connection never affects another.

Keep-alive: one task per controller sleeps until `last_keep_alive + KATO` and tears the
controller down when no Keep Alive pushed the deadline (nvmet `nvmet_keep_alive_timer`, SPDK
`nvmf_ctrlr_keep_alive_poll`). A controller whose admin connection was made silent by a fault
is not expired meanwhile: silence means a black hole, not a close.

Does not: parse PDUs or commands (`_queue.py`), or know fault semantics beyond applying them.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time
from time import perf_counter

import trio

from initiator._util import IdleMeter, drop_sent, set_tcp_congestion, system_congestion

from ._queue import TargetQueue
from .backends import FileRange
from ._subsystem import TargetState
from .config import TargetConfig
from .faults import MALFORMED

log = logging.getLogger("blockfs.target")

IOV_MAX = 512
YIELD_EVERY = 8         # batches a busy connection handles between scheduler passes
DRAIN_TIMEOUT = 1.0


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"bad listen address {text!r}: want HOST:PORT")
    host = host.strip("[]")
    return host or "127.0.0.1", int(port)


class Connection:
    def __init__(self, server: "TargetServer", sock: socket.socket, peer: str):
        self.server = server
        self.sock = sock
        self.peer = peer
        q = self.q = TargetQueue(server.state, peer)
        q.wake = self.flush
        q.defer = self.defer
        q.on_close = self._on_close
        self.silent = False
        self._unsilence = trio.Event()
        self._need_write = trio.Event()
        self._blocked = False
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    # -- tasks -----------------------------------------------------------------------------
    async def run(self) -> None:
        q = self.q
        try:
            async with trio.open_nursery() as n:
                self._nursery = n
                self._scope = n.cancel_scope
                n.start_soon(self._writer)
                await self._reader()
                n.cancel_scope.cancel()
        finally:
            try:
                if not q.rst:
                    with trio.move_on_after(DRAIN_TIMEOUT) as cs:
                        cs.shield = True
                        await self._drain()
            finally:
                idle = self.server.idle
                if idle.since:
                    idle.work(perf_counter())     # a polling stretch ends with its connection
                self._close_socket()
                q.finished()
                self.server.conns.discard(self)
                if q.error is not None or q.close_reason not in ("", "peer closed"):
                    log.info("connection %s closed: %s", self.peer, q.close_reason or "?")

    async def _reader(self) -> None:
        sock = self.sock
        q = self.q
        rx = q.rx
        recv_into = sock.recv_into
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
        poll = self.server.config.poll_us / 1e6
        last_data = 0.0
        idle = self.server.idle
        unyielded = 0
        while not q.closing:
            if self.silent:
                await self._unsilence.wait()
                continue
            try:
                sink = rx.payload_sink()
                if sink is not None:
                    n = recv_into(sink)
                    if n:
                        rx.received_into_sink(n)
                else:
                    n = recv_into(rx.buffer())
                    if n:
                        rx.received(n)
            except BlockingIOError:
                # Poll while the host is busy (SPDK's targets always poll): an epoll sleep and
                # its wake-up cost 15-20 us of latency on these VMs, and the host pays for the
                # wake-up in its send. A connection quiet for `poll_us` sleeps.
                unyielded = 0
                if poll:
                    now = perf_counter()
                    if now - last_data < poll:
                        if not idle.since:
                            idle.since = now
                        await checkpoint()
                        continue
                    idle.work(now)
                await wait_readable(sock)
                continue
            except OSError as e:
                q.close(f"receive failed: {e}")
                return
            if not n:
                q.close("peer closed")
                return
            if poll:
                last_data = perf_counter()
                if idle.since:
                    idle.work(last_data)
            try:
                q.process()
            except Exception as e:      # a bug must cost one connection, not the target
                log.exception("connection %s: internal error", self.peer)
                q.out.clear()
                q.files = 0
                q.fatal(1, 0, b"", f"internal error: {e!r}", e)
            self.flush()
            # While data keeps coming, give the other tasks (connections, timers, the control
            # socket) a turn every few batches rather than after each: a scheduler pass costs
            # about as much as a batch's own Python work (hot-path.md: batching).
            unyielded += 1
            if unyielded >= YIELD_EVERY:
                unyielded = 0
                await checkpoint()

    async def _writer(self) -> None:
        while True:
            await self._need_write.wait()
            self._need_write = trio.Event()
            while self._blocked and not self.silent:
                await trio.lowlevel.wait_writable(self.sock)
                self._blocked = False
                self.flush()

    async def _drain(self) -> None:
        while self.q.out and not self.silent:
            self._blocked = False
            self.flush()
            if self._blocked:
                await trio.lowlevel.wait_writable(self.sock)
            elif self.q.out:     # flush gave up (socket error)
                return

    # -- sending ---------------------------------------------------------------------------
    def flush(self) -> None:
        """Send as much of the queue's output as the socket takes now (never blocks)."""
        out = self.q.out
        if not out or self.silent or self._blocked or self.sock.fileno() < 0:
            return
        sendmsg = self.sock.sendmsg
        try:
            if self.q.files:
                self._flush_files(out)
            while out:
                batch = out if len(out) <= IOV_MAX else out[:IOV_MAX]
                sent = sendmsg(batch)
                if sent == sum(map(len, batch)):
                    if batch is out:
                        out.clear()
                    else:
                        del out[:IOV_MAX]
                    continue
                drop_sent(out, sent)
                raise BlockingIOError
            self.q.views = False
            self.q.files = 0
        except BlockingIOError:
            # Other queues run before the rest goes out: keep read data as it is now.
            self.q.materialize()
            self._blocked = True
            self._need_write.set()
        except OSError as e:
            out.clear()
            self.q.files = 0
            self.q.close(f"send failed: {e}")

    def _flush_files(self, out: list) -> None:
        """`flush` while `out` holds FileRanges: the buffers before each go out with one sendmsg
        (MSG_MORE: the range follows), the range with sendfile. Raises BlockingIOError when
        the socket is full; returns when no FileRange is left (plain buffers may remain)."""
        q = self.q
        sock = self.sock
        fd = sock.fileno()
        while out and q.files:
            first = out[0]
            if type(first) is FileRange:
                sent = os.sendfile(fd, first.fd, first.off, first.n)
                if sent < first.n:
                    first.off += sent
                    first.n -= sent
                    raise BlockingIOError
                del out[0]
                q.files -= 1
                continue
            j = 1
            while j < IOV_MAX and type(out[j]) is not FileRange:
                j += 1
            batch = out[:j]
            sent = sock.sendmsg(batch, (), socket.MSG_MORE)
            if sent == sum(map(len, batch)):
                del out[:j]
                continue
            drop_sent(out, sent)
            raise BlockingIOError

    def defer(self, seconds: float, bufs: list) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._deferred, seconds, bufs)

    async def _deferred(self, seconds: float, bufs: list) -> None:
        await trio.sleep(seconds)
        if not self.q.closing:
            self.q.out.extend(bufs)
            self.flush()

    def _on_close(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def _close_socket(self) -> None:
        try:
            if self.q.rst:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass

    # -- faults ----------------------------------------------------------------------------
    def set_silent(self, on: bool) -> None:
        if on == self.silent:
            return
        self.silent = on
        if not on:
            ev, self._unsilence = self._unsilence, trio.Event()
            ev.set()
            self.flush()

    def send_raw(self, data: bytes) -> None:
        self.q.out.append(data)
        self.flush()

    def info(self) -> dict:
        d = self.q.info()
        d["silent"] = self.silent
        return d


class TargetServer:
    def __init__(self, config: TargetConfig):
        self.config = config
        self.state = TargetState(config, clock=trio.current_time)
        self.faults = self.state.faults
        self.conns: set[Connection] = set()
        self.addresses: list[tuple[str, int]] = []
        self.control_path: str | None = config.control
        self._nursery: trio.Nursery | None = None
        self._listen_socks: list[socket.socket] = []
        self.started_at = time.time()
        self.port_state = "up"     # up | down (refuse: close at once) | blackhole (silent)
        self.idle = IdleMeter()    # polling that found nothing (stats: busy = CPU - idle)

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        for text in self.config.listen:
            host, port = parse_hostport(text)
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                if self.config.tcp_congestion:
                    set_tcp_congestion(s, self.config.tcp_congestion)
                s.bind((host, port))
            except (OSError, ValueError) as e:
                s.close()
                for o in self._listen_socks:
                    o.close()
                if isinstance(e, OSError) and e.errno is not None:
                    raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
                raise
            s.listen(512)
            s.setblocking(False)
            self._listen_socks.append(s)
            self.addresses.append((host, s.getsockname()[1]))
        if self.config.sendfile_min and (self.config.tcp_congestion
                                         or system_congestion()) == "bbr":
            log.warning("--sendfile-min with BBR congestion control: the kernel paces each "
                        "send, and sendfile costs more than copying (docs/target.md); "
                        "--tcp-congestion cubic avoids that")
        self.state.set_listeners(self.addresses)
        self.state.on_controller_added = self._controller_added
        try:
            async with trio.open_nursery() as n:
                self._nursery = n
                for s in self._listen_socks:
                    n.start_soon(self._accept_loop, s)
                if self.control_path:
                    from .control import serve_control
                    await n.start(serve_control, self, self.control_path)
                task_status.started(self)
        finally:
            for s in self._listen_socks:
                s.close()
            for sub in list(self.state.subsystems.values()):
                for ns in sub.namespaces.values():
                    ns.backend.close()

    async def _accept_loop(self, ls: socket.socket) -> None:
        while True:
            try:
                c, addr = ls.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(ls)
                continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept failed: %s", e)
                    await trio.sleep(0.1)
                    continue
                raise
            if self.port_state == "down":
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
                continue
            c.setblocking(False)
            if c.family in (socket.AF_INET, socket.AF_INET6):
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # (--tcp-congestion: set on the listener, which its connections inherit)
            conn = Connection(self, c, f"{addr[0]}:{addr[1]}")
            if self.port_state == "blackhole":
                conn.silent = True
            self.conns.add(conn)
            self._nursery.start_soon(conn.run)

    def set_port_state(self, state: str) -> int:
        """up; down: close every connection and reset new ones (nvmet port unlinked);
        blackhole: every connection, new ones too, goes silent (a network partition).
        -> the number of connections affected."""
        if state not in ("up", "down", "blackhole"):
            raise ValueError("port state must be up, down or blackhole")
        self.port_state = state
        conns = list(self.conns)
        for c in conns:
            if state == "down":
                c.set_silent(False)
                c.q.close("port down")
            else:
                c.set_silent(state == "blackhole")
        return len(conns)

    # -- keep-alive -------------------------------------------------------------------------
    def _controller_added(self, ctrl) -> None:
        self._nursery.start_soon(self._keep_alive_timer, ctrl)

    def _silent(self, ctrl) -> bool:
        q = ctrl.admin_queue
        return any(c.silent for c in self.conns if c.q is q)

    async def _keep_alive_timer(self, ctrl) -> None:
        while not ctrl.closed:
            deadline = ctrl.keep_alive_deadline()
            now = trio.current_time()
            if deadline is None or self._silent(ctrl):
                await trio.sleep(0.1 if deadline is not None else 0.5)
                continue
            if now < deadline:
                await trio.sleep(min(deadline - now, 1.0))
                continue
            log.info("controller %d (%s): no Keep Alive within KATO %d ms: tearing down",
                     ctrl.cntlid, ctrl.hostnqn, ctrl.kato_ms)
            self.state.keep_alive_expiries += 1
            ctrl.teardown(f"keep-alive timeout (KATO {ctrl.kato_ms} ms)")

    # -- selection for control-plane actions ------------------------------------------------
    def select(self, cntlid: int | None = None, qid: int | None = None) -> list[Connection]:
        out = []
        for c in self.conns:
            q = c.q
            if cntlid is not None and (q.ctrl is None or q.ctrl.cntlid != cntlid):
                continue
            if qid is not None and (not q.connected or q.qid != qid):
                continue
            out.append(c)
        return sorted(out, key=lambda c: (c.q.ctrl.cntlid if c.q.ctrl else 0, c.q.qid))

    def controllers(self, cntlid: int | None = None) -> list:
        out = []
        for sub in (self.state.discovery, *self.state.subsystems.values()):
            for c in sub.controllers.values():
                if cntlid is None or c.cntlid == cntlid:
                    out.append(c)
        return out

    def stats(self) -> dict:
        r, w, br, bw = self.state.io_totals()
        ru = os.times()
        return {"cpu_s": ru.user + ru.system, "user_s": ru.user, "system_s": ru.system,
                "poll_idle_s": round(self.idle.total, 6),
                "reads": r, "writes": w, "bytes_read": br, "bytes_written": bw,
                "connections": len(self.conns), "pid": os.getpid(),
                "keep_alive_expiries": self.state.keep_alive_expiries}

    def malformed(self, conn: Connection, kind: str) -> None:
        if kind not in MALFORMED:
            raise ValueError(f"unknown malformed PDU {kind!r}: one of {sorted(MALFORMED)}")
        conn.send_raw(MALFORMED[kind](conn.q))


async def serve_target(config: TargetConfig, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the target until cancelled. `task_status.started(server)` hands out the running
    `TargetServer` (bound `addresses`, `state`, `faults`) once listening."""
    server = TargetServer(config)
    await server.run(task_status=task_status)
