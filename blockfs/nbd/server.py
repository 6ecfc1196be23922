"""trio shell of the NBD server: sockets, tasks and bdev I/O around the sans-IO `_protocol`.

Exports every bdev of a `BdevRegistry` by name on a TCP port or a unix socket (`serve_nbd_unix`,
as `qemu-nbd -k` and `nbdkit -U` serve local clients).  It does not parse or build wire
bytes itself (that is `_protocol`), and it does not decide what a bdev is (that is `bdev/`).

Per connection:
- negotiation: `ServerHandshake` events answered from the registry; the export's size and flags
  are read when the client asks (NBD_OPT_INFO/GO), so a resized bdev shows its new size to new
  connections; GO opens a descriptor whose "remove" event closes the connection.
- transmission: on a plain non-blocking socket (a dup of the stream's descriptor; only an empty
  or full socket waits, 13.7 -> 11.7 us of server CPU per 4K read), one reader task (`recv_into`
  straight into the `RequestReader` buffer, every buffered request parsed per wakeup) feeding a
  queue; up to MAX_WORKERS worker tasks execute
  requests concurrently (replies go out of order; a pool, not a task per request: a busy worker
  takes the next request without a park/wake, and no Task is built per request); and one writer
  task that sends every reply queued since it last ran with a single `sendmsg` (the only task
  that waits to write to the socket, so it doubles as the send lock).  Block-aligned reads that
  the bdev can start without a waiting task (`IoChannel.read_blocks_nowait`: NVMe) skip the
  workers: the reply is queued from the completion callback, and the replies of one batch of
  completions (`bdev.CALLBACKS`: an NVMe receive's) are sent at its end with one `sendmsg`
  while the writer is idle, the rest left to it, and the plain reads the client sent meanwhile
  are taken from the socket right then (`_take_now`); a read that fails is redone by a worker.  The
  reader stops reading while MAX_INFLIGHT requests or INFLIGHT_BYTES of payload are unanswered.
- BdevError -> NBD error at one place (`_execute`), via `_protocol.nbd_errno`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from typing import Any

import trio
from trio.lowlevel import wait_readable, wait_writable

from bdev._base import CALLBACKS, BdevError, IoType
from initiator._util import SocketPathError, clear_stale_socket, drop_sent
from initiator.transport import POLL_IDLE

from ..control import bind_private_unix
from ._protocol import (
    MAX_BLOCK,
    NEED_DATA,
    REQUEST_SIZE,
    Opt,
    Closed,
    ExportInfo,
    ExportRequest,
    ListExports,
    Negotiated,
    ProtocolError,
    RemoteProtocolError,
    Rep,
    RequestReader,
    ServerHandshake,
    TransmissionFlag,
    error_chunk,
    export_flags,
    nbd_errno,
    none_chunk,
    plain_reads,
    read_chunk_header,
    simple_reply,
    validate_request,
)

__all__ = ["serve_nbd", "serve_nbd_unix", "NbdServer", "NbdAddressError"]

log = logging.getLogger(__name__)

#: A client must finish negotiating within this many seconds.
HANDSHAKE_TIMEOUT = 30.0
#: Requests received but not yet answered, per connection, before the reader pauses.
MAX_INFLIGHT = 256
#: READ/WRITE bytes received or to be sent, per connection, before the reader pauses.
INFLIGHT_BYTES = 64 * 1024 * 1024
#: Bytes of read buffers a connection keeps for reuse (enough for QD32 of 128 KiB reads).
POOL_BYTES = 8 * 1024 * 1024
#: Worker tasks per connection executing requests (bdev I/O) concurrently.
MAX_WORKERS = 64
#: recv batches a connection's reader takes before letting other tasks run.
_YIELD_EVERY = 8
#: Buffers per sendmsg() call (IOV_MAX is 1024 on Linux).
_IOV_BATCH = 512

_CMD_READ, _CMD_WRITE, _CMD_DISC, _CMD_FLUSH, _CMD_TRIM, _CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
_FLAG_FUA = 1


async def serve_nbd(
    registry: Any,
    host: str | None,
    port: int,
    *,
    read_only: bool = False,
    default_export: str | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every bdev of *registry* over NBD on *host*:*port* until cancelled.

    Args:
        registry: the process's `BdevRegistry`; exports are its bdevs, by name.
        host: address to bind (e.g. "127.0.0.1").
        port: TCP port, 0 for any free one.
        read_only: export everything read-only (writes fail with EPERM).
        default_export: bdev served for the empty export name (default: the first registered).
        task_status: receives the bound port (``port = await nursery.start(serve_nbd, ...)``).

    On cancellation every connection is closed (in-flight requests are abandoned).
    """
    server = NbdServer(registry, read_only=read_only, default_export=default_export)
    await server.serve(host, port, task_status=task_status)


async def serve_nbd_unix(
    registry: Any,
    path: str,
    *,
    read_only: bool = False,
    default_export: str | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every bdev of *registry* over NBD on the unix stream socket *path* until cancelled.

    Clients connect with ``nbd+unix:///EXPORT?socket=PATH``.  The socket is made mode 0600 (the
    exports are raw disks), its directory if missing, and it is removed on exit.  A socket left
    behind by a server that is gone is replaced; one a live server answers on is not.

    Raises:
        NbdAddressError: *path* is a live server's socket, is not a socket, or cannot be bound.
    """
    server = NbdServer(registry, read_only=read_only, default_export=default_export)
    await server.serve_unix(path, task_status=task_status)


class NbdAddressError(OSError):
    """The NBD listen address cannot be used (in use, not a socket, not bindable)."""


class NbdServer:
    """The registry-facing half: which exports exist and what each looks like."""

    def __init__(
        self, registry: Any, *, read_only: bool = False, default_export: str | None = None
    ) -> None:
        self.registry = registry
        self.read_only = read_only
        self.default_export = default_export

    async def serve(
        self,
        host: str | None,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        try:
            bound = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                log.info("NBD server listening on %s port %d", host, bound)
                task_status.started(bound)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def serve_unix(
        self, path: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            clear_stale_socket(path)
        except SocketPathError as exc:
            raise NbdAddressError(str(exc)) from None
        try:
            sock = await bind_private_unix(path)   # as the control socket: 0600, dir made
        except OSError as exc:
            raise NbdAddressError(f"cannot listen on {path}: {exc.strerror}") from None
        ino = os.stat(path).st_ino
        try:
            sock.listen(128)
            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, [listener])
                log.info("NBD server listening on unix socket %s", path)
                task_status.started(path)
        finally:
            sock.close()
            try:
                if os.stat(path).st_ino == ino:  # not a successor's socket
                    os.unlink(path)
            except OSError:
                pass

    # -- exports ---------------------------------------------------------------------------

    def lookup(self, name: str) -> Any | None:
        """The bdev exported as *name* ("" = the default export), or None."""
        if not name:
            if self.default_export is not None:
                name = self.default_export
            else:
                bdevs = self.registry.bdevs()
                return bdevs[0] if bdevs else None
        return self.registry.get(name)

    def export_info(self, bdev: Any) -> ExportInfo:
        """Describe *bdev* as it is now (size read at negotiation time)."""
        supported = bdev.io_type_supported
        # A bdev claimed by a module (SPDK-style) cannot be opened for writing: export it
        # read-only rather than refuse it.
        read_only = self.read_only or bool(bdev.read_only) or bdev.claimed_by is not None
        flags = export_flags(
            read_only=read_only,
            flush=True,  # a flush the bdev does not need is a no-op that succeeds
            fua=True,  # the bdev honours fua=True (natively or by flushing)
            trim=supported(IoType.UNMAP),
            write_zeroes=True,  # the byte API writes zeroes itself when the bdev cannot
            multi_conn=True,  # no cache here: flush/FUA go to the device for every connection
        )
        block_size = bdev.block_size
        # Minimum 1: unaligned I/O is done server-side by the bdev byte API's read-modify-write
        # under its block-range lock, which stays correct across connections (a client-side RMW
        # over several connections would not).  Preferred: the block size (at least 4 KiB).
        return ExportInfo(
            name=bdev.name,
            size=bdev.size,
            flags=flags,
            description=str(getattr(bdev, "product_name", "") or ""),
            min_block=1,
            preferred_block=max(4096, block_size),
            max_block=MAX_BLOCK,
        )

    def list_exports(self) -> list[tuple[str, str]]:
        return [
            (b.name, str(getattr(b, "product_name", "") or "")) for b in self.registry.bdevs()
        ]

    # -- connections -----------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername() or "unix"
        except OSError:
            peer = "?"
        conn: _Transmission | None = None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                conn = await self._negotiate(stream)
            if conn is not None:
                log.debug("NBD %s: transmission on %s", peer, conn.bdev.name)
                await conn.run()
        except trio.TooSlowError:
            log.info("NBD %s: negotiation timed out", peer)
        except ProtocolError as exc:
            log.info("NBD %s: protocol error: %s", peer, exc)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("NBD %s: connection lost: %r", peer, exc)
        except Exception:
            # The edge of one connection: a bug here must not take down the other connections.
            log.exception("NBD %s: connection failed", peer)
        finally:
            if conn is not None:
                conn.close()
            await trio.aclose_forcefully(stream)

    async def _negotiate(self, stream: trio.SocketStream) -> _Transmission | None:
        hs = ServerHandshake()
        conn: _Transmission | None = None
        try:
            await stream.send_all(hs.data_to_send())
            while True:
                try:
                    event = hs.next_event()
                except RemoteProtocolError:
                    out = hs.data_to_send()
                    if out:
                        await stream.send_all(out)
                    raise
                if event is NEED_DATA:
                    out = hs.data_to_send()
                    if out:
                        await stream.send_all(out)
                    data = await stream.receive_some(65536)
                    if not data:
                        return None
                    hs.receive_data(data)
                    continue
                if isinstance(event, ListExports):
                    hs.reply_list(self.list_exports())
                elif isinstance(event, ExportRequest):
                    conn = self._answer_export(hs, event, stream)
                elif isinstance(event, Negotiated):
                    await stream.send_all(hs.data_to_send())
                    assert conn is not None
                    conn.start(event, hs.trailing_data())
                    result, conn = conn, None
                    return result
                elif isinstance(event, Closed):
                    out = hs.data_to_send()
                    if out:
                        await stream.send_all(out)
                    log.debug("NBD negotiation closed: %s", event.reason)
                    return None
                out = hs.data_to_send()
                if out:
                    await stream.send_all(out)
        finally:
            if conn is not None:  # opened for a GO that did not complete
                conn.close()

    def _answer_export(
        self, hs: ServerHandshake, request: ExportRequest, stream: trio.SocketStream
    ) -> _Transmission | None:
        bdev = self.lookup(request.name)
        if bdev is None or bdev.removed:
            what = repr(request.name) if request.name else "default export"
            hs.reply_export(None, error=Rep.ERR_UNKNOWN, message=f"no such export: {what}")
            return None
        info = self.export_info(bdev)
        if request.option is Opt.INFO:
            hs.reply_export(info)
            return None
        # GO / EXPORT_NAME: open the bdev now, so that a failure can still be reported.
        try:
            conn = _Transmission(stream, bdev, info)
        except BdevError as exc:
            hs.reply_export(None, error=Rep.ERR_UNKNOWN, message=f"cannot open: {exc}")
            return None
        hs.reply_export(info)
        return conn


class _Transmission:
    """One connection in the transmission phase."""

    def __init__(self, stream: trio.SocketStream, bdev: Any, info: ExportInfo) -> None:
        self.stream = stream
        # Transmission uses a plain non-blocking socket on a dup of the stream's descriptor:
        # trio's socket methods pass through the scheduler on every call, even when the kernel
        # has data or room at once; here only an empty or full socket waits (`wait_*`).
        self.sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
        self.sock.setblocking(False)
        self.bdev = bdev
        self.info = info
        self.size = info.size
        self.tflags = info.flags
        self.max_block = info.max_block
        self.structured = False
        self.reader = RequestReader(max_block=info.max_block)
        self._scope: trio.CancelScope | None = None
        self._removed = False
        self._closed = False
        self._desc = bdev.open(self._on_event, write=not info.flags & TransmissionFlag.READ_ONLY)
        try:
            self.ch = bdev.get_io_channel()
        except BaseException:
            self._desc.close()
            raise
        # Outgoing replies (writer task) and flow control (reader task).
        self._out: list[Any] = []
        self._out_replies = 0
        self._out_cost = 0
        self._out_bytes = 0  # of _out: a sendmsg that took them all needs no drop_sent walk
        # Read buffers of `_read_nowait` go back to a pool by size once their reply is sent
        # (sendmsg copied them): no allocation, zero-fill or memoryview per read. A read
        # overwrites all of its buffer before the reply is queued (or fails and is not sent).
        self._pool: dict[int, list[memoryview]] = {}
        self._pooled = 0  # bytes in the pool
        self._out_recycle: list[memoryview] = []
        self._flush_deferred = False
        self._reader_waiting = False        # the reader task waits for the socket
        self._peek = bytearray(REQUEST_SIZE * 128)
        self.taken_now = 0                  # requests read by _take_now
        self._inflight = 0
        self._inflight_bytes = 0
        self._closing = False
        # Parsed requests waiting for a worker.
        self._work: deque[tuple[int, int, int, int, int, Any, int]] = deque()
        self._work_lot = trio.lowlevel.ParkingLot()
        self._workers = 0
        self._waking = 0  # workers started or unparked that have not run yet
        self._draining = False
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._reader_lot = trio.lowlevel.ParkingLot()
        # Reads in flight without a worker (`_read_nowait`), and who waits for them to end.
        self._nowait = 0
        self._nowait_lot = trio.lowlevel.ParkingLot()
        self._worker_nursery: trio.Nursery | None = None

    def start(self, negotiated: Negotiated, trailing: bytes) -> None:
        self.structured = negotiated.structured_replies
        if trailing:
            self.reader.receive_data(trailing)

    def _on_event(self, event: Any) -> None:
        # Called synchronously by the bdev; must not block.
        if getattr(event, "type", None) == "remove":
            self._removed = True
            if self._scope is not None:
                self._scope.cancel()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.ch.close()
        finally:
            self._desc.close()
            self.sock.close()

    async def run(self) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            if self._removed:
                scope.cancel()
            async with trio.open_nursery() as top:
                top.start_soon(self._writer)
                try:
                    async with trio.open_nursery() as workers:
                        try:
                            await self._read_loop(workers)
                            # Reads started without a worker answer (or go to one) first.
                            while self._nowait:
                                await self._nowait_lot.park()
                        finally:
                            # No more requests: workers finish the queue, then exit.
                            self._draining = True
                            self._waking += len(self._work_lot)
                            self._work_lot.unpark_all()
                finally:
                    # Every request has been answered (or cancelled): let the writer drain.
                    self._closing = True
                    self._writer_lot.unpark_all()
        if self._removed:
            log.info("NBD: export %s was removed; connection closed", self.bdev.name)

    # -- reader ----------------------------------------------------------------------------

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        reader = self.reader
        sock = self.sock
        lot = self._reader_lot
        size, tflags, max_block = self.size, self.tflags, self.max_block
        self._worker_nursery = nursery
        recv_into = sock.recv_into
        received = 0
        while True:
            while self._inflight >= MAX_INFLIGHT or self._inflight_bytes >= INFLIGHT_BYTES:
                await lot.park()
            try:
                req = reader.next_request()
            except RemoteProtocolError as exc:
                # Framing is lost: answer what is in flight, then hang up.
                log.info("NBD: %s; closing", exc)
                return
            if req is NEED_DATA:
                try:
                    n = recv_into(reader.get_buffer())
                except BlockingIOError:
                    received = 0
                    self._reader_waiting = True     # _take_now may read for it meanwhile
                    try:
                        await wait_readable(sock)
                    finally:
                        self._reader_waiting = False
                    continue
                except OSError as exc:
                    log.debug("NBD: receive failed: %r", exc)
                    return
                if not n:
                    return  # client hung up without NBD_CMD_DISC
                reader.commit(n)
                # Requests to handle: a polling stretch of the NVMe readers (busy time,
                # IdleMeter) ends here, not when their socket next has data.
                POLL_IDLE.work_found()
                received += 1
                if received >= _YIELD_EVERY:
                    # A client that keeps sending still lets the writer and the other
                    # connections run.
                    received = 0
                    await trio.lowlevel.checkpoint()
                continue
            cmd, flags, handle, offset, length, payload = req
            if cmd == _CMD_READ and not flags and 0 < length <= max_block and (
                    offset + length <= size):
                # A plain read that validate_request would let through: the common request.
                self._inflight += 1
                self._inflight_bytes += length
                if not self._read_nowait(handle, offset, length, length):
                    self._add_work((cmd, 0, handle, offset, length, None, length))
                continue
            if cmd == _CMD_DISC:
                return  # soft disconnect: answer outstanding requests, then close
            cost = length if cmd == _CMD_READ or cmd == _CMD_WRITE else 0
            self._inflight += 1
            self._inflight_bytes += cost
            err = validate_request(cmd, flags, offset, length, size, tflags, max_block)
            if err:
                self._queue_error(handle, cmd, err, "invalid request", cost)
                continue
            if cmd == _CMD_READ and length and self._read_nowait(handle, offset, length, cost):
                continue
            self._add_work((cmd, flags, handle, offset, length, payload, cost))

    def _add_work(self, req: tuple) -> None:
        work = self._work
        work.append(req)
        # Wake a worker only if the ones already woken will not cover the queue.
        if len(work) > self._waking:
            if self._work_lot:
                self._waking += 1
                self._work_lot.unpark()
            elif self._workers < MAX_WORKERS:
                self._workers += 1
                self._waking += 1
                self._worker_nursery.start_soon(self._worker)

    def _read_nowait(self, handle: int, offset: int, length: int, cost: int) -> bool:
        """A block-aligned read the bdev can start without a task waiting on it (NVMe: a
        completion callback from the queue's reader): no worker, no park/wake per request.
        False: a worker does it. A read that fails this way is redone by a worker, which
        applies the bdev's full error handling."""
        bs = self.bdev.block_size
        if offset % bs or length % bs:
            return False
        pool = self._pool.get(length)
        if pool:
            buf = pool.pop()
            self._pooled -= length
        else:
            buf = memoryview(bytearray(length))
        header = read_chunk_header if self.structured else None

        # State in default arguments, not closure cells: cheaper to make and to run (3.11).
        def done(ok: bool, self: _Transmission = self, handle: int = handle, offset: int = offset,
                 length: int = length, buf: memoryview = buf, cost: int = cost,
                 header: Any = header) -> None:
            self._nowait -= 1
            if ok:
                # `_queue([hdr, buf], cost)` inlined (the hot path), plus the buffer to recycle.
                hdr = simple_reply(handle) if header is None else header(handle, offset, length)
                out = self._out
                out.append(hdr)
                out.append(buf)
                self._out_recycle.append(buf)
                self._out_replies += 1
                self._out_cost += cost
                self._out_bytes += len(hdr) + length
                if not self._flush_deferred:
                    # In a batch of completions: sent at its end (_flush_now); else the writer.
                    if CALLBACKS.defer(self._flush_now):
                        self._flush_deferred = True
                    elif self._writer_lot:
                        self._writer_lot.unpark()
            else:
                self._add_work((_CMD_READ, 0, handle, offset, length, None, cost))
            if self._nowait_lot:
                self._nowait_lot.unpark_all()

        if not self.ch.read_blocks_nowait(offset // bs, length // bs, buf, done):
            self._recycle(buf)
            return False
        self._nowait += 1
        return True

    def _flush_now(self) -> None:
        """At the end of a batch of completions (bdev.CALLBACKS): send the replies queued in
        it with one sendmsg from here, instead of waking the writer task for them (NBD 4K
        +11-12%, docs/performance.md stop 20). Only while the writer is parked, so that
        replies never overtake one it is sending; what the socket does not take is left to it."""
        self._flush_deferred = False
        if not self._out or not self._writer_lot:
            return          # nothing queued, or the writer is busy: it takes these next
        buffers = self._out
        total = self._out_bytes
        if len(buffers) <= _IOV_BATCH:
            try:
                sent = self.sock.sendmsg(buffers)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._writer_lot.unpark()
                return
            if sent == total:
                self._out = []
                self._out_bytes = 0
                replies, self._out_replies = self._out_replies, 0
                cost, self._out_cost = self._out_cost, 0
                recycle, self._out_recycle = self._out_recycle, []
                self._replies_sent(replies, cost, recycle)
                if self._reader_waiting:
                    self._take_now()
                return
            drop_sent(buffers, sent)
            self._out_bytes = total - sent
        self._writer_lot.unpark()

    def _take_now(self) -> None:
        """After a batch's replies went out (`_flush_now`): the plain reads the client has sent
        meanwhile (fio sends its next ones as each reply arrives, on this core), read and
        started at once instead of a scheduler pass later by the reader task, which is waiting
        for the socket (NBD 4K +15-20%, docs/performance.md stop 20). Only whole plain reads at
        the head of the socket are taken (a MSG_PEEK looks first); anything else stays there
        and wakes the reader as before. Nothing while the reader holds part of a request or
        the in-flight budget is spent."""
        reader = self.reader
        if (self._inflight >= MAX_INFLIGHT or self._inflight_bytes >= INFLIGHT_BYTES
                or not reader.idle()):
            return
        sock = self.sock
        peek = self._peek
        try:
            n = sock.recv_into(peek, len(peek), socket.MSG_PEEK)
        except OSError:
            return          # BlockingIOError: nothing there; otherwise the reader finds out
        reads = plain_reads(peek, n, self.size, self.max_block)
        if not reads:
            return
        sock.recv_into(peek, len(reads) * REQUEST_SIZE)     # the peeked bytes: all there
        POLL_IDLE.work_found()
        self.taken_now += len(reads)
        read_nowait = self._read_nowait
        for handle, offset, length in reads:
            self._inflight += 1
            self._inflight_bytes += length
            if not read_nowait(handle, offset, length, length):
                self._add_work((_CMD_READ, 0, handle, offset, length, None, length))

    def _recycle(self, buf: memoryview) -> None:
        n = buf.nbytes
        if self._pooled + n <= POOL_BYTES:
            self._pool.setdefault(n, []).append(buf)
            self._pooled += n

    # -- requests --------------------------------------------------------------------------

    async def _worker(self) -> None:
        # A pool of long-lived workers rather than a task per request: a busy worker takes the
        # next request without being parked and woken, and no Task is built per request.
        work = self._work
        lot = self._work_lot
        execute = self._execute
        self._waking -= 1
        while True:
            if work:
                await execute(*work.popleft())
            elif self._draining:
                return
            else:
                await lot.park()
                self._waking -= 1

    async def _execute(
        self, cmd: int, flags: int, handle: int, offset: int, length: int, payload: Any, cost: int
    ) -> None:
        ch = self.ch
        try:
            if cmd == _CMD_READ:
                if not length:
                    self._queue([none_chunk(handle) if self.structured else simple_reply(handle)], 0)
                    return
                data = await ch.read(offset, length)
                if self.structured:
                    self._queue([read_chunk_header(handle, offset, length), data], cost)
                else:
                    self._queue([simple_reply(handle), data], cost)
                return
            if cmd == _CMD_WRITE:
                if length:
                    await ch.write(offset, payload, fua=bool(flags & _FLAG_FUA))
            elif cmd == _CMD_FLUSH:
                await ch.flush()
            elif cmd == _CMD_TRIM:
                if length:
                    await ch.unmap(offset, length)
                    if flags & _FLAG_FUA:
                        await ch.flush()
            else:  # _CMD_WRITE_ZEROES (validate_request let nothing else through)
                # With or without NO_HOLE: write_zeroes reads back as zeroes and does not
                # deallocate, which satisfies NO_HOLE and is allowed without it.
                if length:
                    await ch.write_zeroes(offset, length)
                    if flags & _FLAG_FUA:
                        await ch.flush()
        except BdevError as exc:
            self._queue_error(handle, cmd, nbd_errno(exc.errno), str(exc), cost)
            return
        self._queue([simple_reply(handle)], cost)

    def _queue_error(self, handle: int, cmd: int, err: int, message: str, cost: int) -> None:
        if self.structured:
            self._queue([error_chunk(handle, err, message)], cost)
        else:
            self._queue([simple_reply(handle, err)], cost)

    def _queue(self, buffers: list[Any], cost: int) -> None:
        self._out += buffers
        self._out_replies += 1
        self._out_cost += cost
        self._out_bytes += sum(map(len, buffers))
        if self._writer_lot:
            self._writer_lot.unpark()

    # -- writer ----------------------------------------------------------------------------

    async def _writer(self) -> None:
        lot = self._writer_lot
        while True:
            if not self._out:
                if self._closing:
                    return
                await lot.park()
                continue
            buffers, self._out = self._out, []
            replies, self._out_replies = self._out_replies, 0
            cost, self._out_cost = self._out_cost, 0
            total, self._out_bytes = self._out_bytes, 0
            recycle, self._out_recycle = self._out_recycle, []
            try:
                await self._send_all(buffers, total)
            except OSError as exc:
                log.debug("NBD: send failed: %r", exc)
                if self._scope is not None:
                    self._scope.cancel()
                return
            self._replies_sent(replies, cost, recycle)

    def _replies_sent(self, replies: int, cost: int, recycle: list[memoryview]) -> None:
        # Sent, so copied by the kernel: the read buffers can take the next reads, and the
        # reader more requests.
        if self._pooled < POOL_BYTES:
            for buf in recycle:
                self._recycle(buf)
        self._inflight -= replies
        self._inflight_bytes -= cost
        if self._reader_lot:
            self._reader_lot.unpark_all()

    async def _send_all(self, buffers: list[Any], total: int) -> None:
        """Send all of *buffers* (*total* bytes). When one sendmsg takes them all, the common
        case, nothing walks the list; otherwise `drop_sent` finds where to go on from."""
        sock = self.sock
        if len(buffers) <= _IOV_BATCH:
            try:
                sent = sock.sendmsg(buffers)
            except BlockingIOError:
                sent = 0
            if sent == total:
                return
            buffers = list(buffers)
            drop_sent(buffers, sent)
        else:
            buffers = list(buffers)
        while buffers:
            try:
                sent = sock.sendmsg(buffers[:_IOV_BATCH])
            except BlockingIOError:
                await wait_writable(sock)
                continue
            drop_sent(buffers, sent)
