"""What blockfs's FUSE mount adds below pyfuse3, in libfuse's own session (ctypes).

pyfuse3 (3.5) keeps its libfuse session in module statics and gives Python no handle on a
request, so four things a block-device mount needs are done here, next to it:

- `ConnLimits`: the FUSE_INIT answer asks for 128 background requests instead of the
  kernel's default 12 (asynchronous direct I/O is background I/O to FUSE), and for read
  requests no larger than half a pipe and 512 KiB (`blockfs.fuse.read_request_limit`).
- `FallocateHook`: a fallocate handler (pyfuse3 has none, so the kernel would answer
  EOPNOTSUPP): a ctypes callback in the session's `fallocate` slot starts a task that answers
  with `fuse_reply_err`.
- `ReadWithoutWaiting`: a worker that finds a request waiting reads it at once instead of
  waiting for the descriptor under pyfuse3's lock, so the requests queued by fio come in
  together (pyfuse3's module function `_wait_fuse_readable`, replaced).
- `FastReads`: the session's `read` slot. An aligned read of a bdev that can start one without
  a waiting task (`IoChannel.read_blocks_nowait`: NVMe, partitions, RAM) is started from the
  callback, and its completion writes the reply straight to /dev/fuse (`fuse_out_header` +
  data with one `writev`, the replies of a batch of completions together after its last one)
  and frees the request with `fuse_reply_none`; no pyfuse3 worker, coroutine or trio task per
  read. Reads of SPLICE_MIN bytes and more on a bdev with
  `fd_reads` (NVMe without digests) go socket -> pipe -> /dev/fuse instead: the reply header is
  written into a pipe, the payload spliced in behind it (`initiator._sink.FdSink`), and the
  pipe spliced to /dev/fuse; a pipe that overflowed is drained and the reply sent with writev.
  A failed read is redone by a task through `BlockFs.read_into` (FUSEError's one place).
  Anything else goes to pyfuse3's own handler. After a batch of replies, the requests queued
  behind them are read at once (`blockfs._fuse_inline.InlineRequests`).

How the session is found (`PyfuseSession.locate`): pyfuse3's statics `session` and
`fuse_ops` by name from its ELF symbol table; libfuse's copy of the ops table inside
`struct fuse_session` by its exact bytes; the slots around the ones patched must hold what
pyfuse3 3.x sets, or nothing is patched (a warning, and the feature is off). The two private
layouts read at run time are checked before use: `fuse_req` starts with its session pointer
and the request's `unique` (libfuse 3 fuse_i.h), checked against the session; `fh` sits at
byte 16 of `struct fuse_file_info` (fuse_common.h; tests/unit/test_libfuse_layout.py checks
it against the installed header), checked against the open handles.

What it does not do: anything when the checks fail (pyfuse3's plain paths then serve), or
any request type but read and fallocate.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import inspect
import logging
import os
import select
import struct
from typing import Any

import pyfuse3
import trio
from pyfuse3 import FUSEError

from bdev import CALLBACKS, FdSink
from initiator.transport import POLL_IDLE

__all__ = ["ConnLimits", "FallocateHook", "FastReads", "PyfuseSession", "ReadWithoutWaiting",
           "elf_symbols", "pyfuse3_statics", "splice_pipe_size"]

log = logging.getLogger("blockfs.fuse")

# struct fuse_lowlevel_ops slot numbers (fuse_lowlevel.h, libfuse 3.x; the ABI only appends)
_SLOTS = {"init": 0, "lookup": 2, "open": 14, "read": 15, "readdir": 21, "getlk": 31, "setlk": 32,
          "bmap": 33, "ioctl": 34, "poll": 35, "write_buf": 36, "retrieve_reply": 37,
          "forget_multi": 38, "flock": 39, "fallocate": 40, "readdirplus": 41}
_SET = ("init", "lookup", "open", "read", "poll", "write_buf", "forget_multi", "readdirplus")
_UNSET = ("readdir", "getlk", "setlk", "bmap", "ioctl", "retrieve_reply", "flock", "fallocate")

_FI_FH = 16              # offsetof(struct fuse_file_info, fh)
_CONN_MAX_READ = 12                  # offsetof(struct fuse_conn_info, max_read)
_CONN_MAX_BACKGROUND = 28            # offsetof(struct fuse_conn_info, max_background)
_CONN_CONGESTION_THRESHOLD = 32      # offsetof(struct fuse_conn_info, congestion_threshold)
_REQ_UNIQUE = 8          # offsetof(struct fuse_req, unique); the session pointer is at 0
_OUT_HEADER = struct.Struct("<IiQ")   # struct fuse_out_header: len, error, unique
_u64_at = ctypes.c_uint64.from_address
_ptr_at = ctypes.c_void_p.from_address


def elf_symbols(path: str, wanted: set[str]) -> dict[str, tuple[int, int]]:
    """{name: (st_value, st_size)} for `wanted` names in an ELF64 little-endian file's symbol tables."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found: dict[str, tuple[int, int]] = {}
    for _name, sh_type, _fl, _addr, offset, size, link, _info, _align, entsize in sections:
        if sh_type not in (2, 11) or entsize != 24:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        str_off = sections[link][4]
        for pos in range(offset, offset + size, 24):
            st_name, _info, _other, shndx, value, st_size = struct.unpack_from("<IBBHQQ", data, pos)
            if not st_name or not shndx:
                continue
            end = data.index(b"\0", str_off + st_name)
            name = data[str_off + st_name : end].decode("ascii", "replace")
            if name in wanted:
                found[name] = (value, st_size)
    return found


def pyfuse3_statics(*names: str) -> dict[str, tuple[int, int]]:
    """{name: (address, size)} of pyfuse3 module statics (Cython's `__pyx_v_7pyfuse3_NAME`) in
    this process, from its ELF symbol table and where the module is loaded; ValueError when one
    is missing."""
    path = pyfuse3.__file__
    wanted = {f"__pyx_v_7pyfuse3_{n}": n for n in names}
    syms = elf_symbols(path, {"PyInit_pyfuse3", *wanted})
    missing = [n for sym, n in wanted.items() if sym not in syms]
    if "PyInit_pyfuse3" not in syms or missing:
        raise ValueError(f"pyfuse3 symbols not found in {path}: {', '.join(missing) or 'PyInit'}")
    lib = ctypes.CDLL(path)
    bias = ctypes.cast(lib.PyInit_pyfuse3, ctypes.c_void_p).value - syms["PyInit_pyfuse3"][0]
    return {n: (bias + syms[sym][0], syms[sym][1]) for sym, n in wanted.items()}


class PyfuseSession:
    """pyfuse3's live libfuse session: its address, /dev/fuse descriptor, ops slots, replies."""

    def __init__(self, session: int, ops_addr: int, fd: int, libfuse: Any) -> None:
        self.session = session
        self.ops_addr = ops_addr          # &se->op, libfuse's copy of pyfuse3's fuse_ops
        self.fd = fd
        self.reply_err = libfuse.fuse_reply_err
        self.reply_err.argtypes = (ctypes.c_void_p, ctypes.c_int)
        self.reply_err.restype = ctypes.c_int
        self.reply_none = libfuse.fuse_reply_none
        self.reply_none.argtypes = (ctypes.c_void_p,)
        self.reply_none.restype = None

    @classmethod
    def locate(cls) -> "PyfuseSession":
        """Call after `pyfuse3.init`. Raises ValueError/OSError when anything is not as expected."""
        statics = pyfuse3_statics("fuse_ops", "session")
        ops_addr, ops_size = statics["fuse_ops"]
        if ops_size < (_SLOTS["readdirplus"] + 1) * 8:
            raise ValueError(f"fuse_lowlevel_ops of {ops_size} bytes is too small")

        def slot(name: str) -> int:
            return _ptr_at(ops_addr + 8 * _SLOTS[name]).value or 0
        if not (all(slot(n) for n in _SET) and not any(slot(n) for n in _UNSET)):
            raise ValueError("pyfuse3's fuse_ops does not have the expected layout")
        session = _ptr_at(statics["session"][0]).value
        if not session:
            raise ValueError("no FUSE session (call after pyfuse3.init)")
        ops = ctypes.string_at(ops_addr, ops_size)
        for off in range(0, 256, 8):  # `op` sits a few fields into struct fuse_session
            if ctypes.string_at(session + off, ops_size) == ops:
                break
        else:
            raise ValueError("the session's copy of fuse_ops was not found")
        libfuse = ctypes.CDLL("libfuse3.so.3")
        session_fd = libfuse.fuse_session_fd
        session_fd.argtypes = (ctypes.c_void_p,)
        session_fd.restype = ctypes.c_int
        fd = session_fd(session)
        if fd < 0 or os.path.realpath(f"/proc/self/fd/{fd}") != "/dev/fuse":
            raise ValueError(f"fuse_session_fd gave {fd}, not /dev/fuse")
        return cls(session, session + off, fd, libfuse)

    def slot(self, name: str) -> ctypes.c_void_p:
        """The session's function pointer for request `name` (read and write it via .value)."""
        return _ptr_at(self.ops_addr + 8 * _SLOTS[name])


class ConnLimits:
    """FUSE_INIT: the connection limits pyfuse3 leaves at libfuse's defaults.

    - `max_background` = n (congestion_threshold 3/4 of it, libfuse's own ratio), instead of
      the kernel's 12. Asynchronous direct I/O (fio's libaio, qemu's aio=native) reaches a FUSE
      daemon as background requests, and the kernel keeps at most `max_background` of them
      outstanding: the rest of a QD32 job waits in the kernel and NVMe sees QD12. fio 4K
      randread QD32 on an NVMe file: 36K -> 49-52K IOPS (docs/performance.md).
    - `max_read`, when given: the largest read request (the kernel splits larger direct
      reads). The same value must also be a mount option (`max_read=`): libfuse refuses a
      session whose init answer differs from it.
    The session's `init` slot is wrapped: pyfuse3's handler runs, then these fields of the
    `fuse_conn_info` that libfuse answers with are set.
    """

    _CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
    _ORIG = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)

    def __init__(self, se: PyfuseSession, max_background: int, max_read: int = 0) -> None:
        self.se = se
        self.max_background = max_background
        self.max_read = max_read
        self._cb = self._CB(self._on_init)   # must outlive the session
        self._orig: Any = None
        self.applied = False

    def install(self) -> None:
        slot = self.se.slot("init")
        self._orig = self._ORIG(slot.value)
        slot.value = ctypes.cast(self._cb, ctypes.c_void_p).value

    def close(self) -> None:
        pass

    def _on_init(self, userdata: int, conn: int) -> None:
        try:
            self._orig(userdata, conn)
        finally:
            # Called from C: set the limits whatever pyfuse3's handler did, and raise nothing.
            field = ctypes.c_uint.from_address
            field(conn + _CONN_MAX_BACKGROUND).value = self.max_background
            field(conn + _CONN_CONGESTION_THRESHOLD).value = self.max_background * 3 // 4
            if self.max_read:
                field(conn + _CONN_MAX_READ).value = self.max_read
            self.applied = True
            log.info("FUSE: up to %d background requests (asynchronous direct I/O)%s",
                     self.max_background,
                     f", reads of up to {self.max_read >> 10} KiB" if self.max_read else "")


class FallocateHook:
    """A fallocate handler in the session's `fallocate` slot: the callback runs on the trio
    thread inside `fuse_session_process_buf` and starts a task that does the I/O
    (`fs.fallocate`) and answers with `fuse_reply_err`."""

    _CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64,
                           ctypes.c_int64, ctypes.c_void_p)

    def __init__(self, fs: Any, se: PyfuseSession) -> None:
        self.fs = fs
        self.se = se
        self._cb = self._CB(self._on_fallocate)  # must outlive the session

    def install(self) -> None:
        self.se.slot("fallocate").value = ctypes.cast(self._cb, ctypes.c_void_p).value
        log.debug("fallocate handler installed in the FUSE session")

    def close(self) -> None:
        pass

    def _on_fallocate(self, req: int, ino: int, mode: int, offset: int, length: int, fi: int) -> None:
        # Called from C: nothing may escape. No nursery (not serving): fail the request.
        try:
            nursery = self.fs._nursery
            if nursery is None:
                self.se.reply_err(req, errno.EIO)
                return
            nursery.start_soon(self._run, req, ino, mode, offset, length)
        except BaseException:
            log.exception("fallocate dispatch failed")
            self.se.reply_err(req, errno.EIO)

    async def _run(self, req: int, ino: int, mode: int, offset: int, length: int) -> None:
        err = errno.EINTR  # cancelled (unmount): still answer, while the session exists
        try:
            await self.fs.fallocate(ino, mode, offset, length)
            err = 0
        except FUSEError as e:
            err = e.errno
        finally:
            self.se.reply_err(req, err)


class ReadWithoutWaiting:
    """Lets a pyfuse3 worker read the next FUSE request at once when one is already waiting.

    pyfuse3 (3.5) makes every worker wait for the /dev/fuse descriptor under one lock
    (`_wait_fuse_readable`: `trio.lowlevel.wait_readable`), so it takes one request per scheduler
    pass even when fio has 32 queued; each NVMe capsule then goes out in its own sendmsg. This
    replaces that module function (pyfuse3's Cython loop looks it up by name on each call) with
    one that first asks `poll(fd, 0)`: a waiting request is read in the same pass, so the workers
    woken by one batch of NVMe completions reply, read the next requests and submit their
    commands together (fuse-nvme-4k 13K -> 25K IOPS; the RAM bdev's file 27K -> 33K). Otherwise,
    and every BURST requests read this way, it falls back to pyfuse3's wait, re-checking with
    poll afterwards: a request announced by epoll may have been taken by a worker that did not
    wait, and pyfuse3's blocking read must only start when a request is there.
    `install` returns False (and changes nothing) when pyfuse3 lacks the function.
    """

    BURST = 16

    def __init__(self, fd: int) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        self._poll = poller.poll
        self._orig: Any = None
        self._burst = 0

    def install(self) -> bool:
        orig = getattr(pyfuse3, "_wait_fuse_readable", None)
        if not inspect.iscoroutinefunction(orig):
            log.info("pyfuse3 has no _wait_fuse_readable: one FUSE request per wake-up")
            return False
        self._orig = orig
        pyfuse3._wait_fuse_readable = self._wait_fuse_readable
        log.info("FUSE: queued requests are read without waiting (pyfuse3 hook installed)")
        return True

    def close(self) -> None:
        self.uninstall()

    def uninstall(self) -> None:
        if self._orig is not None:
            pyfuse3._wait_fuse_readable = self._orig
            self._orig = None

    async def _wait_fuse_readable(self) -> bool:
        poll = self._poll
        if poll(0):
            # A request to handle: work, so a polling stretch of the NVMe readers ends here
            # (the process's busy time, IdleMeter), not when their socket next has data.
            POLL_IDLE.work_found()
            self._burst += 1
            if self._burst < self.BURST:
                return True
            self._burst = 0
            await trio.lowlevel.checkpoint()     # let the rest of the process run now and then
            if poll(0):
                return True
        while True:
            if not await self._orig():
                return False
            if poll(0):
                POLL_IDLE.work_found()
                return True


# Read buffers kept for reuse: per size at most this many, in all at most _POOL_BYTES.
_POOL_PER_SIZE = 64
_POOL_BYTES = 64 << 20
# Reads of at least this many bytes from a bdev with `fd_reads` go socket -> pipe -> /dev/fuse.
SPLICE_MIN = 64 << 10
# Each such read has a pipe of its own (at most _PIPES of them idle), as large as F_SETPIPE_SZ
# allows up to _PIPE_SIZE: /proc/sys/fs/pipe-max-size (1 MiB by default) without
# CAP_SYS_RESOURCE. A pipe has one slot per 4 KiB of its size and each of the socket's page
# fragments takes one (loopback: up to 32 KiB each; about 4 KiB after the kernel collapses a
# full receive queue; with a NIC of MTU 1500, one per packet), so transfers are spliced only up
# to half a pipe (serve_fuse asks the kernel for reads no larger than that); one that does not
# fit overflows into memory (FdSink.spill), and after _OVERFLOWS_MAX overflows, if more than one
# in 8 spliced reads overflowed, splicing is switched off.
_PIPE_SIZE = 4 << 20
_PIPES = 64
_OVERFLOWS_MAX = 8
_pipe_size: int | None = None


def splice_pipe_size() -> int:
    """The pipe size this process gets (bytes; probed once): _PIPE_SIZE, else pipe-max-size,
    else 0 when that is too small to splice reads of SPLICE_MIN (large reads then go through
    memory)."""
    global _pipe_size
    if _pipe_size is None:
        r, w = os.pipe2(os.O_CLOEXEC)
        size, err = 0, None
        try:
            for want in (_PIPE_SIZE, _pipe_max_size()):
                try:
                    size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, want)
                    break
                except OSError as e:   # EPERM: beyond pipe-max-size; EBUSY: user's pipe pages
                    err = e
        finally:
            os.close(r)
            os.close(w)
        _pipe_size = size if size >= 2 * SPLICE_MIN else 0
        if not _pipe_size:
            log.warning("FUSE: large reads are copied through memory (no pipe of %d KiB: %s)",
                        2 * SPLICE_MIN >> 10, err or f"got {size} bytes")
    return _pipe_size


def _pipe_max_size() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


class FastReads:
    """The session's `read` slot: aligned reads of nowait-capable bdevs without pyfuse3.

    `_on_read` (called from C inside `fuse_session_process_buf`, on the trio thread) looks up
    the handle by the request's `fh`, and if the read is whole blocks within the device, starts
    it with `IoChannel.read_blocks_nowait`; the completion (from the bdev's task, e.g. the NVMe
    queue's reader) replies and frees the request (`fuse_reply_none`):
    - small reads, or bdevs without `fd_reads`: into a buffer, then one `writev` of header and
      data to /dev/fuse (the kernel copies the data into the caller's pages); a completion in a
      batch of them (an NVMe receive's, the RAM bdev's pass) defers its reply to the batch's
      end (`bdev.CALLBACKS`), where the batch's replies are written in one loop;
    - reads of SPLICE_MIN bytes and more from an NVMe bdev without digests: into a pipe that
      already holds the reply's header (`FdSink`: the transport splices the payload from the
      socket into it), then one splice of the pipe to /dev/fuse. The data is copied once, in
      the kernel, from the socket's pages into the caller's; never into this process.
    A read whose pipe overflowed is answered from memory (FdSink.drain_into_spill). A read
    that cannot start so is handed to pyfuse3's handler (`BlockFs.read`); one that the target
    answers with an error is redone by a task with the bdev's full error handling
    (`BlockFs.read_into`, errors translated at its one boundary).
    `close()` (before the session is destroyed) stops every later reply: a read completing after
    it frees nothing and writes nothing (the kernel has already failed it).
    """

    _CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t,
                           ctypes.c_int64, ctypes.c_void_p)
    # pyfuse3's own handler, called with the GIL held (it is Cython code that expects it)
    _ORIG = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t,
                              ctypes.c_int64, ctypes.c_void_p)

    def __init__(self, fs: Any, se: PyfuseSession, *, splice: bool = True) -> None:
        self.fs = fs
        self.se = se
        self._cb = self._CB(self._on_read)   # must outlive the session
        self._orig: Any = None
        self._pool: dict[int, list[bytearray]] = {}
        self._pool_bytes = 0
        self._pipes: list[tuple[int, int]] = []
        # The largest transfer spliced (half a pipe; 0: off), and the pipes' size.
        self._pipe_size = splice_pipe_size() if splice else 0
        self._splice_max = self._pipe_size // 2
        self.overflows = 0      # spliced reads whose pipe had no room (answered from memory)
        self._writev = os.writev
        self._fd = se.fd
        self._reply_none = se.reply_none
        self.closed = False
        self.inflight = 0
        self.max_inflight = 0   # the most reads in flight at once
        self.fast = 0           # reads answered by this path
        self.spliced = 0        # ... of which through a pipe
        self.batched = 0        # ... of which replied at the end of a batch of completions
        self.handed_over = 0    # reads given to pyfuse3's handler
        self.redone = 0         # reads that failed here and were redone with full error handling
        self._pending: list[tuple[int, int, bytearray]] = []   # replies deferred to a batch's end
        self._defer = CALLBACKS.defer
        self.inline: Any = None     # blockfs._fuse_inline.InlineRequests, when installed

    def install(self) -> None:
        slot = self.se.slot("read")
        self._orig = self._ORIG(slot.value)
        slot.value = ctypes.cast(self._cb, ctypes.c_void_p).value
        log.info("FUSE: aligned reads are started without a worker (read handler installed)")

    def close(self) -> None:
        self.closed = True
        for r, w in self._pipes:
            os.close(r)
            os.close(w)
        self._pipes.clear()

    def statistics(self) -> dict:
        stats = {"fast_reads": self.fast, "spliced": self.spliced, "batched": self.batched,
                 "overflows": self.overflows,
                 "handed_over": self.handed_over, "redone": self.redone,
                 "inflight": self.inflight, "max_inflight": self.max_inflight}
        if self.inline is not None:
            stats.update(self.inline.statistics())
        return stats

    def _on_read(self, req: int, ino: int, size: int, off: int, fi: int) -> None:
        try:
            if self._start(req, ino, size, off, _u64_at(fi + _FI_FH).value):
                return
            self.handed_over += 1
            self._orig(req, ino, size, off, fi)
        except BaseException:    # called from C: nothing may escape
            log.exception("FUSE read dispatch failed")
            self.se.reply_err(req, errno.EIO)

    def _start(self, req: int, ino: int, size: int, off: int, fh: int) -> bool:
        h = self.fs._handles.get(fh)
        if h is None or h.entry.inode != ino or self.closed:
            return False
        bdev = h.bdev
        bs = bdev.block_size
        n = bdev.size - off
        if n > size:
            n = size
        if n <= 0 or off % bs or n % bs:
            return False
        if _ptr_at(req).value != self.se.session:
            raise ValueError("fuse_req does not start with its session: layout changed?")
        unique = _u64_at(req + _REQ_UNIQUE).value
        if n >= SPLICE_MIN and n <= self._splice_max and bdev.fd_reads:
            pipe = self._pipe()
            if pipe is not None:
                if self._start_spliced(req, unique, h, off, n, pipe):
                    return True
                os.read(pipe[0], 16)             # the header: the pipe is empty again
                self._idle_pipe(pipe)
        buf = self._take(n)

        def done(ok: bool) -> None:
            self._done(ok, req, unique, h, off, buf)

        if not h.channel.read_blocks_nowait(off // bs, n // bs, memoryview(buf), done):
            self._give_back(buf)
            return False
        self._started()
        return True

    def _started(self) -> None:
        self.inflight += 1
        if self.inflight > self.max_inflight:
            self.max_inflight = self.inflight

    def _done(self, ok: bool, req: int, unique: int, h: Any, off: int, buf: bytearray) -> None:
        if self.closed:
            self.inflight -= 1
            return
        if not ok:
            self._redo_later(req, unique, h, off, buf)
            return
        self.fast += 1
        pending = self._pending
        if pending or self._defer(self._flush_replies):
            # Inside a batch of completions: replied after its last one (_flush_replies).
            pending.append((req, unique, buf))
            return
        self._reply(req, unique, buf)
        self.inflight -= 1
        self._give_back(buf)

    def _flush_replies(self) -> None:
        """The replies deferred to the end of a batch of completions (bdev.CALLBACKS): each
        reply's writev lets the reader of the data preempt this process (fio, on the same
        core), so they go out in one tight loop after the batch's Python, then the requests
        are freed. (Not `_reply` per request, which frees each between two writevs: the RAM
        bdev's file 82.0K against 78.8K IOPS and fio 2.5 against 2.9 us per I/O, stop 20's
        review.)"""
        pending = self._pending
        self._pending = []
        self.inflight -= len(pending)
        if self.closed:
            return
        self.batched += len(pending)
        writev = self._writev
        fd = self._fd
        pack = _OUT_HEADER.pack
        for _req, unique, buf in pending:
            try:
                writev(fd, (pack(16 + len(buf), 0, unique), buf))
            except OSError as e:
                # ENOENT: the request is gone (interrupted, or the caller was killed).
                log.debug("FUSE read reply for %d not delivered: %s", unique, e)
        reply_none = self._reply_none
        give_back = self._give_back
        for req, _unique, buf in pending:
            reply_none(req)
            give_back(buf)
        if self.inline is not None:
            # The reading program has submitted its next requests meanwhile: take them now.
            self.inline.take()

    def _redo_later(self, req: int, unique: int, h: Any, off: int, buf: bytearray) -> None:
        nursery = self.fs._nursery
        if nursery is None:
            self.inflight -= 1
            self.se.reply_err(req, errno.EIO)
            self._give_back(buf)
            return
        self.redone += 1
        nursery.start_soon(self._redo, req, unique, h, off, buf)

    def _reply(self, req: int, unique: int, buf: bytearray) -> None:
        try:
            self._writev(self._fd, (_OUT_HEADER.pack(16 + len(buf), 0, unique), buf))
        except OSError as e:
            # ENOENT: the request is gone (interrupted, or the caller was killed).
            log.debug("FUSE read reply for %d not delivered: %s", unique, e)
        self._reply_none(req)

    async def _redo(self, req: int, unique: int, h: Any, off: int, buf: bytearray) -> None:
        err = errno.EINTR     # cancelled (unmount): still answer, while the session exists
        try:
            await self.fs.read_into(h, off, buf)
            err = 0
        except FUSEError as e:
            err = e.errno
        finally:
            self.inflight -= 1
            if not self.closed:
                if err:
                    self.se.reply_err(req, err)
                else:
                    self._reply(req, unique, buf)
        self._give_back(buf)

    def _take(self, n: int) -> bytearray:
        pool = self._pool.get(n)
        if pool:
            self._pool_bytes -= n
            return pool.pop()
        return bytearray(n)

    def _give_back(self, buf: bytearray) -> None:
        n = len(buf)
        pool = self._pool.setdefault(n, [])
        if len(pool) < _POOL_PER_SIZE and self._pool_bytes + n <= _POOL_BYTES:
            pool.append(buf)
            self._pool_bytes += n

    # -- reads through a pipe --------------------------------------------------------------

    def _pipe(self) -> tuple[int, int] | None:
        """An empty pipe of the probed size (non-blocking both ends), or None (splicing is then
        switched off, with a log line)."""
        if self._pipes:
            return self._pipes.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self._pipe_size) >= self._pipe_size:
                return r, w
            err = "smaller"
        except OSError as e:          # EBUSY: the user's pipe pages are used up
            err = e
        os.close(r)
        os.close(w)
        log.warning("FUSE: large reads are copied through memory (no pipe of %d bytes: %s)",
                    self._pipe_size, err)
        self._splice_max = 0
        return None

    def _start_spliced(self, req: int, unique: int, h: Any, off: int, n: int,
                       pipe: tuple[int, int]) -> bool:
        r, w = pipe
        os.write(w, _OUT_HEADER.pack(16 + n, 0, unique))
        sink = FdSink(w, n)

        def done(ok: bool) -> None:
            self._spliced_done(ok, req, unique, h, off, n, pipe, sink)

        bs = h.bdev.block_size
        if not h.channel.read_blocks_nowait(off // bs, n // bs, sink, done):
            return False
        self._started()
        return True

    def _spliced_done(self, ok: bool, req: int, unique: int, h: Any, off: int, n: int,
                      pipe: tuple[int, int], sink: FdSink) -> None:
        if self.closed:
            self.inflight -= 1
            self._close_pipe(pipe)
            return
        if not ok:
            # The pipe holds a partial reply: drop it, and do the read again into memory.
            self._close_pipe(pipe)
            self._redo_later(req, unique, h, off, self._take(n))
            return
        if sink.overflow:
            # The pipe ran out of slots: the rest of the data is in the sink's spill buffer.
            # Move the start there too (past our header) and answer from memory.
            self.overflows += 1
            if self.overflows >= _OVERFLOWS_MAX and self.overflows * 8 > self.spliced:
                log.warning("FUSE: %d of %d spliced reads did not fit their pipe: large "
                            "reads are copied through memory from now on", self.overflows,
                            self.spliced + self.overflows)
                self._splice_max = 0
            try:
                os.read(pipe[0], 16)
                data = sink.drain_into_spill(pipe[0])
            except OSError:
                self._close_pipe(pipe)
                self._redo_later(req, unique, h, off, self._take(n))
                return
            self._idle_pipe(pipe)
            self.fast += 1
            self._reply(req, unique, data)
            self.inflight -= 1
            return
        try:
            moved = os.splice(pipe[0], self._fd, 16 + n, flags=os.SPLICE_F_MOVE)
        except OSError as e:
            # ENOENT: the request is gone (interrupted, or the caller was killed).
            log.debug("FUSE read reply for %d not delivered: %s", unique, e)
            moved = -1
        if moved == 16 + n:
            self._idle_pipe(pipe)
        else:
            self._close_pipe(pipe)
        self.fast += 1
        self.spliced += 1
        self._reply_none(req)
        self.inflight -= 1

    def _idle_pipe(self, pipe: tuple[int, int]) -> None:
        """An emptied pipe: kept for the next spliced read, up to _PIPES idle ones."""
        if len(self._pipes) < _PIPES:
            self._pipes.append(pipe)
        else:
            self._close_pipe(pipe)

    @staticmethod
    def _close_pipe(pipe: tuple[int, int]) -> None:
        os.close(pipe[0])
        os.close(pipe[1])
