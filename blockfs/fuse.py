"""The FUSE frontend: every registered bdev as a regular file in one flat directory (pyfuse3 on trio).

What it does:
- `BlockFs(registry, ...)`, a `pyfuse3.Operations`: the root lists one file per bdev, live (a registry
  listener adds and removes entries; a resize invalidates the kernel's attributes and pages for that
  inode from a worker thread, since `pyfuse3.invalidate_inode` may block). st_size is the exact bdev
  size, st_blksize its block size.
- read/write at any offset and length through a per-open-file I/O channel (the byte API; unaligned
  writes are read-modify-written by the bdev layer). Like a Linux block device: a read at or past the
  end returns b"" (or a short read), a write starting at the end fails with ENOSPC, one crossing it
  is cut short at the end.
- fsync/fdatasync -> bdev flush (close-time `flush` does nothing: it is not a durability point);
  fallocate: PUNCH_HOLE|KEEP_SIZE -> unmap (when unmapped blocks read back as zeroes, else write
  zeroes), ZERO_RANGE -> write zeroes, mode 0 / KEEP_SIZE within the size -> success, else EOPNOTSUPP.
- O_TRUNC and truncate(2) are ignored, as opening /dev/sdX with O_TRUNC is: the size is the device's,
  so `dd of=MOUNT/nvme0n1` works as it does on /dev/nvme0n1. create/mknod/mkdir/symlink/link/unlink/
  rmdir/rename -> EPERM (EROFS on a read-only mount); chmod/chown -> EPERM (use the mount options),
  except to the mode/owner the file already has (a no-op, as POSIX allows the owner).
- When a handle that wrote to a whole-device file (not a partition) is released, the registry
  re-reads that device's partition table in the background (udev's "watch" rule), so `sgdisk` on the
  file makes the partition files appear.
- Errors: `_errno_boundary` is the one place where a `BdevError` becomes `FUSEError(e.errno)`; it is
  the only exception a handler raises (a bug becomes EIO and a logged traceback, not a dead mount).

Decisions:
- direct_io (default on; `serve_fuse(direct_io=False)` turns it off): a partition file and its disk
  file alias the same blocks, and other initiators or an NBD client may write the namespace, so the
  kernel page cache would serve stale data; a resize also never leaves cached pages past the new end.
  Measured on a MallocBdev (2-core VM, fio libaio O_DIRECT): 4 KiB random read QD32 25.6K IOPS with
  direct_io vs 26.1K without, random write QD32 24.5K vs 24.4K, QD1 read 20.9K vs 17.7K; the cost is
  buffered small-block sequential reads, which lose readahead (`dd bs=4k` 63 MB/s vs 1.7 GB/s;
  `dd bs=1M` 3.9 GB/s). pyfuse3 itself is the ceiling: a read handler returning a constant buffer
  does 30K IOPS, so the bdev path costs about 6 of the ~39 us per request. Shared writable mmap is
  unavailable with direct_io (FUSE limitation).
- max_tasks=64 (pyfuse3 worker tasks, i.e. requests in flight): enough for QD32 plus metadata;
  min_tasks/max_tasks between 1/33 and 40/128 measured the same.
- Below pyfuse3 (blockfs/_libfuse.py, in libfuse's session through ctypes): 128 background
  requests instead of the kernel's 12 (`max_background`; asynchronous direct I/O is background
  I/O to FUSE, so QD32 would reach the device as QD12); a fallocate
  handler (pyfuse3 3.5 has none: the kernel would answer EOPNOTSUPP); workers read queued
  requests without waiting for the descriptor (so the NVMe commands of a batch of requests go
  out together); and aligned reads of bdevs that can start one without a task (NVMe,
  partitions, RAM) are started from the read callback and answered from their completion with
  one writev to /dev/fuse, without a pyfuse3 worker, coroutine or task per read
  (`serve_fuse(fast_reads=False)` turns that off). Each is checked before it is installed;
  what fails the check is logged and left out, and pyfuse3's own paths serve.

What it does not do: the CLI, daemonizing, or choosing bdevs (`serve_fuse` shows the registry as is).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from bdev import Bdev, BdevError, BdevRegistry, IoChannel, IoType

from ._fuse_inline import InlineRequests
from ._libfuse import (
    ConnLimits, FallocateHook, FastReads, PyfuseSession, ReadWithoutWaiting, splice_pipe_size,
)

__all__ = ["BlockFs", "serve_fuse"]

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

ROOT = pyfuse3.ROOT_INODE
_NAME_MAX = 255           # statfs f_namemax (NAME_MAX): longer names are ENAMETOOLONG
# Read buffer reuse: at most this many idle buffers of one size, and new sizes only while the
# pool holds less than _READ_BUF_BYTES.
_READ_BUFS_PER_SIZE = 64
# Spliced reads: FUSE requests of at most this size. fio 1M QD4 on the NVMe file made 2.55-2.60
# GB/s with 512 KiB requests in 1 MiB pipes, 2.40 with 1 MiB ones in 4 MiB pipes and 2.30-2.34
# with 256 KiB ones in 512 KiB pipes (docs/performance.md, stop 17).
_SPLICED_REQUEST = 512 << 10
_READ_BUF_BYTES = 32 << 20
_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _errno_boundary(fn: _F) -> _F:
    """The single translation point: BdevError -> FUSEError(errno); anything else -> EIO + log."""

    @functools.wraps(fn)
    async def handler(*args: Any) -> Any:
        try:
            return await fn(*args)
        except BdevError as e:
            raise FUSEError(e.errno) from None
        except FUSEError:
            raise
        except Exception:
            log.exception("FUSE %s%r failed", fn.__name__, args[1:])
            raise FUSEError(errno.EIO) from None

    return handler  # type: ignore[return-value]


class _Entry:
    """A file in the root directory: one bdev. Kept (gone=True) while the kernel still knows it."""

    __slots__ = ("inode", "name", "bdev", "lookups", "handles", "gone", "ctime_ns", "invalidating", "again")

    def __init__(self, inode: int, bdev: Bdev) -> None:
        self.inode = inode
        self.name = bdev.name.encode()
        self.bdev = bdev
        self.lookups = 0
        self.handles = 0
        self.gone = False
        self.ctime_ns = time.time_ns()
        self.invalidating = False
        self.again = False


class _Handle:
    __slots__ = ("entry", "bdev", "channel", "writable", "wrote")

    def __init__(self, entry: _Entry, channel: IoChannel, writable: bool) -> None:
        self.entry = entry
        self.bdev = entry.bdev
        self.channel = channel
        self.writable = writable
        self.wrote = False


class BlockFs(pyfuse3.Operations):
    """One regular file per registered bdev, in a flat root directory."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        registry: BdevRegistry,
        *,
        read_only: bool = False,
        uid: int | None = None,
        gid: int | None = None,
        mode: int = 0o600,
        direct_io: bool = True,
        attr_timeout: float = 1.0,
        fast_reads: bool = True,
    ) -> None:
        super().__init__()
        self.registry = registry
        self.read_only = read_only
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.mode = (mode & 0o7777) & (~0o222 if read_only else 0o7777)
        self.direct_io = direct_io
        self.attr_timeout = attr_timeout
        self.fast_reads = fast_reads
        self.fast: Any = None          # the FastReads in the session's read slot, once mounted
        self._by_name: dict[bytes, _Entry] = {}
        self._by_inode: dict[int, _Entry] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_inode = ROOT + 1
        self._next_fh = 1
        self._nursery: trio.Nursery | None = None  # set while mounted
        self._reexamine_queued: set[Bdev] = set()
        # Read buffers by size, reused (no allocation and zero-fill per read: 10% of the mount's
        # CPU at 1 MiB reads). A buffer goes back here as its read returns: pyfuse3 replies with
        # it synchronously right after the handler returns (fuse_read_async), before any other
        # task can take it again.
        self._read_bufs: dict[int, list[bytearray]] = {}
        self._read_buf_bytes = 0
        self._mounted_ns = time.time_ns()
        for b in registry.bdevs():
            self._add(b)
        registry.add_listener(self._on_registry_event)

    # -- lifecycle (serve_fuse) ---------------------------------------------------------------------

    def attach(self, nursery: trio.Nursery) -> None:
        """Mounted: background work (invalidation, re-examine, fallocate) runs in `nursery`."""
        self._nursery = nursery

    def detach(self) -> None:
        self._nursery = None

    def statistics(self) -> dict:
        """The read fast path's counters (blockfs/_libfuse.py FastReads), {} when it is off."""
        return self.fast.statistics() if self.fast is not None else {}

    def close(self) -> None:
        self.registry.remove_listener(self._on_registry_event)
        for h in self._handles.values():
            h.channel.close()
        self._handles.clear()

    # -- the registry's view -----------------------------------------------------------------------

    def _add(self, bdev: Bdev) -> None:
        name = bdev.name.encode()
        if name in self._by_name or b"/" in name or name in (b"", b".", b".."):
            log.warning("bdev %r cannot be shown as a file", bdev.name)
            return
        entry = _Entry(self._next_inode, bdev)
        self._next_inode += 1
        self._by_name[name] = entry
        self._by_inode[entry.inode] = entry

    def _on_registry_event(self, event: str, bdev: Bdev) -> None:
        if event == "add":
            self._add(bdev)
            return
        entry = self._by_name.get(bdev.name.encode())
        if entry is None or entry.bdev is not bdev:
            return
        if event == "remove":
            del self._by_name[entry.name]
            entry.gone = True
            self._maybe_forget(entry)
            if self._nursery is not None:
                pyfuse3.invalidate_entry_async(ROOT, entry.name, deleted=entry.inode, ignore_enoent=True)
        elif event == "resize":
            entry.ctime_ns = time.time_ns()
            self._invalidate_soon(entry)

    def _invalidate_soon(self, entry: _Entry) -> None:
        """Drop the kernel's attributes and pages of `entry` without blocking the trio loop."""
        if self._nursery is None:
            return
        if entry.invalidating:
            entry.again = True  # the running invalidation may predate this resize: do another
            return
        entry.invalidating = True
        self._nursery.start_soon(self._invalidate, entry)

    async def _invalidate(self, entry: _Entry) -> None:
        try:
            while True:
                entry.again = False
                try:
                    await trio.to_thread.run_sync(pyfuse3.invalidate_inode, entry.inode, False)
                except OSError as e:  # ENOENT: the kernel has not cached this inode
                    log.debug("invalidate_inode(%s): %s", entry.name, e)
                if not entry.again:
                    break
        finally:
            entry.invalidating = False

    def _maybe_forget(self, entry: _Entry) -> None:
        if entry.gone and entry.lookups <= 0 and entry.handles <= 0:
            self._by_inode.pop(entry.inode, None)

    # -- attributes --------------------------------------------------------------------------------

    def _entry(self, inode: int) -> _Entry:
        entry = self._by_inode.get(inode)
        if entry is None:
            raise FUSEError(errno.ENOENT)
        return entry

    def _attrs(self, entry: _Entry) -> pyfuse3.EntryAttributes:
        bdev = entry.bdev
        a = pyfuse3.EntryAttributes()
        a.st_ino = entry.inode
        a.generation = 0
        a.entry_timeout = self.attr_timeout
        a.attr_timeout = self.attr_timeout
        mode = self.mode & ~0o222 if bdev.read_only else self.mode
        a.st_mode = stat.S_IFREG | mode
        a.st_nlink = 0 if entry.gone else 1
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_rdev = 0
        a.st_size = 0 if entry.gone else bdev.size
        a.st_blksize = bdev.block_size
        a.st_blocks = -(-a.st_size // 512)
        a.st_atime_ns = self._mounted_ns
        a.st_mtime_ns = entry.ctime_ns
        a.st_ctime_ns = entry.ctime_ns
        return a

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ROOT
        a.entry_timeout = self.attr_timeout
        a.attr_timeout = self.attr_timeout
        dmode = 0o755 & ~0o222 if self.read_only else 0o755
        a.st_mode = stat.S_IFDIR | dmode
        a.st_nlink = 2
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_size = 0
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._mounted_ns
        return a

    @_errno_boundary
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self._root_attrs()
        return self._attrs(self._entry(inode))

    @_errno_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._root_attrs()
        entry = self._by_name.get(name)
        if entry is None:
            # Longer than statfs's f_namemax: ENAMETOOLONG, as Linux file systems answer.
            raise FUSEError(errno.ENAMETOOLONG if len(name) > _NAME_MAX else errno.ENOENT)
        entry.lookups += 1
        return self._attrs(entry)

    @_errno_boundary
    async def forget(self, inode_list: Any) -> None:
        for inode, n in inode_list:
            entry = self._by_inode.get(inode)
            if entry is not None:
                entry.lookups -= n
                self._maybe_forget(entry)

    @staticmethod
    def _changes_owner_or_mode(attr: Any, fields: Any, have: pyfuse3.EntryAttributes) -> bool:
        """True when a setattr would change mode, uid or gid; setting what the file already has
        is a no-op the owner may do (POSIX chmod/chown; cp -p, install -m on a device file)."""
        return ((fields.update_mode and attr.st_mode & 0o7777 != have.st_mode & 0o7777)
                or (fields.update_uid and attr.st_uid != have.st_uid)
                or (fields.update_gid and attr.st_gid != have.st_gid))

    @_errno_boundary
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            have = self._root_attrs()
            if self._changes_owner_or_mode(attr, fields, have) or fields.update_size:
                raise FUSEError(errno.EPERM)
            return have
        have = self._attrs(self._entry(inode))
        if self._changes_owner_or_mode(attr, fields, have):
            raise FUSEError(errno.EPERM)
        # update_size: ignored, as O_TRUNC / truncate on a block device; times: accepted, not kept.
        return have

    @_errno_boundary
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        total = sum(e.bdev.size for e in self._by_name.values())
        s.f_blocks = total // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self._by_name) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = _NAME_MAX
        return s

    # -- directory ---------------------------------------------------------------------------------

    @_errno_boundary
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT:
            raise FUSEError(errno.ENOTDIR)
        return ROOT

    @_errno_boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        # next_id = the inode number: inodes only grow, so removals and additions never make a
        # listing repeat or skip a name.
        for entry in sorted(self._by_name.values(), key=lambda e: e.inode):
            if entry.inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, entry.name, self._attrs(entry), entry.inode):
                break
            entry.lookups += 1

    @_errno_boundary
    async def releasedir(self, fh: int) -> None:
        pass

    # -- namespace changes: not on a device directory ---------------------------------------------

    def _no(self) -> FUSEError:
        return FUSEError(errno.EROFS if self.read_only else errno.EPERM)

    @_errno_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        if name in self._by_name:
            raise FUSEError(errno.EEXIST)
        raise self._no()

    @_errno_boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        raise self._no()

    @_errno_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        raise self._no()

    @_errno_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        raise self._no()

    @_errno_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        raise self._no()

    @_errno_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise self._no()

    @_errno_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise self._no()

    @_errno_boundary
    async def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int, ctx: Any) -> None:
        raise self._no()

    # -- files -------------------------------------------------------------------------------------

    @_errno_boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        entry = self._entry(inode)
        if entry.gone:
            raise FUSEError(errno.ENODEV)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and (self.read_only or entry.bdev.read_only):
            raise FUSEError(errno.EROFS)
        channel = entry.bdev.get_io_channel()
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(entry, channel, writable)
        entry.handles += 1
        # O_TRUNC is ignored (block-device semantics); O_DIRECT always gets direct I/O.
        direct = self.direct_io or bool(flags & os.O_DIRECT)
        return pyfuse3.FileInfo(fh=fh, direct_io=direct, keep_cache=False)

    @_errno_boundary
    async def read(self, fh: int, off: int, size: int) -> Any:
        h = self._handles[fh]
        end = h.bdev.size
        if off >= end:
            return b""
        if off + size > end:
            size = end - off
        pool = self._read_bufs.get(size)
        if pool:
            buf = pool.pop()
            self._read_buf_bytes -= size
        else:
            buf = bytearray(size)
        try:
            await h.channel.readinto(off, memoryview(buf))
        finally:
            # Back to the pool now: the reply that uses it is sent before anyone can take it.
            pool = self._read_bufs.setdefault(size, [])
            if len(pool) < _READ_BUFS_PER_SIZE and self._read_buf_bytes + size <= _READ_BUF_BYTES:
                pool.append(buf)
                self._read_buf_bytes += size
        return buf

    @_errno_boundary
    async def read_into(self, h: _Handle, off: int, buf: bytearray) -> None:
        """A read the fast path could not finish (blockfs/_libfuse.py FastReads), redone with
        the bdev's full error handling; errors leave as FUSEError like every handler's."""
        await h.channel.readinto(off, memoryview(buf))

    @_errno_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handles[fh]
        if self.read_only:
            raise FUSEError(errno.EROFS)
        if not h.writable:
            raise FUSEError(errno.EBADF)
        end = h.bdev.size
        n = len(buf)
        if off >= end:
            raise FUSEError(errno.ENOSPC)
        if off + n > end:
            n = end - off  # a write crossing the end is cut short there (as on a block device)
        h.wrote = True
        await h.channel.write(off, memoryview(buf)[:n])
        return n

    @_errno_boundary
    async def flush(self, fh: int) -> None:
        pass  # close(2) is not a durability point; fsync is

    @_errno_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._handles[fh].channel.flush()

    @_errno_boundary
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        h.channel.close()
        entry = h.entry
        entry.handles -= 1
        self._maybe_forget(entry)
        if h.wrote:
            self._reexamine_soon(h.bdev)

    def _reexamine_soon(self, bdev: Bdev) -> None:
        """Re-read a whole disk's partition table in the background; requests made while one is
        still queued (e.g. mke2fs discarding with many fallocate calls) share it."""
        if bdev.base is not None or bdev.removed or self._nursery is None or bdev in self._reexamine_queued:
            return
        self._reexamine_queued.add(bdev)
        self._nursery.start_soon(self._reexamine, bdev)

    async def _reexamine(self, bdev: Bdev) -> None:
        self._reexamine_queued.discard(bdev)  # writes from now on need another pass
        if self.registry.get(bdev.name) is not bdev:
            return
        try:
            await self.registry.reexamine(bdev.name)
        except BdevError as e:
            log.info("re-examine of %s after a write skipped: %s", bdev.name, e)

    @_errno_boundary
    async def fallocate(self, inode: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on a device file (reached through `_FallocateHook`)."""
        entry = self._entry(inode)
        bdev = entry.bdev
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise FUSEError(errno.EOPNOTSUPP)
        if (mode & FALLOC_FL_PUNCH_HOLE) and (mode & FALLOC_FL_ZERO_RANGE):
            raise FUSEError(errno.EINVAL)
        if offset < 0 or length <= 0:
            raise FUSEError(errno.EINVAL)
        if self.read_only or bdev.read_only:
            raise FUSEError(errno.EROFS)
        size = bdev.size
        end = offset + length
        if not (mode & FALLOC_FL_KEEP_SIZE) and end > size:
            raise FUSEError(errno.ENOSPC)  # the file cannot grow
        if not (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)):
            return  # plain allocation: every block of a device already exists
        end = min(end, size)
        if offset >= end:
            return
        ch = bdev.get_io_channel()
        try:
            if (mode & FALLOC_FL_PUNCH_HOLE) and bdev.unmap_zeroes and bdev.io_type_supported(IoType.UNMAP):
                await ch.unmap(offset, end - offset)
            else:
                await ch.write_zeroes(offset, end - offset)
        finally:
            ch.close()
        self._reexamine_soon(bdev)  # it may have wiped a partition table


def _install_extras(fs: BlockFs, max_background: int, max_read: int) -> list[Any]:
    """fallocate, reading queued requests without waiting, and the fast read path
    (blockfs/_libfuse.py); what cannot be installed is logged and left out. Returns what must
    be closed before the session is destroyed."""
    try:
        se = PyfuseSession.locate()
    except (OSError, ValueError, AttributeError) as e:
        log.warning("FUSE without fallocate, batched request reads and fast reads "
                    "(cannot find pyfuse3's libfuse session: %s)", e)
        return []
    # The list also keeps the hooks alive: libfuse calls their ctypes callbacks until the
    # session is destroyed (a collected callback is a jump into freed memory).
    extras: list[Any] = [ConnLimits(se, max_background, max_read), FallocateHook(fs, se),
                         ReadWithoutWaiting(se.fd)]
    if fs.fast_reads:
        fs.fast = FastReads(fs, se)
        extras.append(fs.fast)
        try:
            extras.append(InlineRequests(fs, fs.fast, se, InlineRequests.locate()))
        except (OSError, ValueError) as e:
            log.info("FUSE: requests behind a batch of replies wait for a worker (%s)", e)
    for x in extras:
        x.install()
    return extras


_served = False


def read_request_limit(pipe: int) -> int:
    """The `max_read` a mount asks for, given the size of the pipes it splices reads through
    (0: no splicing). Spliced reads go socket -> pipe -> /dev/fuse up to half a pipe
    (blockfs/_libfuse.py: each socket fragment takes a pipe slot), and are fastest at 512 KiB
    (`_SPLICED_REQUEST`); so half the pipe, at most 512 KiB. Without splicing, 0: libfuse's
    largest request (max_pages 256, 1 MiB)."""
    return min(pipe // 2, _SPLICED_REQUEST) if pipe > 0 else 0


async def serve_fuse(
    registry: BdevRegistry,
    mountpoint: str | os.PathLike[str],
    *,
    read_only: bool = False,
    allow_other: bool = False,
    uid: int | None = None,
    gid: int | None = None,
    mode: int = 0o600,
    direct_io: bool = True,
    max_tasks: int = 64,
    fsname: str = "blockfs",
    debug: bool = False,
    fast_reads: bool = True,
    max_background: int = 128,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount `registry` at `mountpoint` and serve it until unmounted (returns) or cancelled
    (unmounts, then re-raises the cancellation).

    `task_status.started(fs)` hands over the `BlockFs` once the mount is live. pyfuse3 keeps its
    session in module globals: one mount per process, a second call raises RuntimeError.
    """
    global _served
    if _served:
        raise RuntimeError("serve_fuse: pyfuse3 supports one mount per process")
    _served = True
    fs = BlockFs(registry, read_only=read_only, uid=uid, gid=gid, mode=mode, direct_io=direct_io,
                 fast_reads=fast_reads)
    options = set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=blockfs", "default_permissions"}
    if allow_other:
        options.add("allow_other")
    if read_only:
        options.add("ro")
    if debug:
        options.add("debug")
    max_read = read_request_limit(splice_pipe_size() if fast_reads else 0)
    if max_read:
        options.add(f"max_read={max_read}")   # the init answer must say the same (ConnLimits)
    mountpoint = os.fspath(mountpoint)
    try:
        pyfuse3.init(fs, mountpoint, options)
    except BaseException:
        fs.close()
        raise
    extras = _install_extras(fs, max_background, max_read)
    try:
        async with trio.open_nursery() as nursery:
            fs.attach(nursery)
            task_status.started(fs)
            log.info("FUSE mounted at %s (%d files)", mountpoint, len(registry.bdevs()))
            try:
                await pyfuse3.main(min_tasks=4, max_tasks=max_tasks)
            finally:
                fs.detach()
                nursery.cancel_scope.cancel()
    finally:
        for x in extras:
            x.close()        # no reply, read or callback of theirs after this
        # Background tasks (fallocate replies, invalidation threads) are done: the session may go.
        fs.close()
        _wait_for_pending_notifications()
        pyfuse3.close(unmount=True)
        log.info("FUSE unmounted from %s", mountpoint)


def _wait_for_pending_notifications(timeout: float = 5.0) -> None:
    """Let pyfuse3's notify thread deliver the entry invalidations still queued (a file removed
    just before the unmount) while the session is mounted: pyfuse3.main() queues its stop
    marker behind them but does not wait, and an invalidation sent after fuse_session_unmount
    fails (EINVAL, logged with a traceback) or, after fuse_session_destroy, would use a freed
    session. Waits at most `timeout` seconds (the kernel may hold an invalidation back while a
    request that is never answered holds the directory)."""
    loop = getattr(pyfuse3, "_notify_loop", None)
    for t in threading.enumerate():
        if t is not threading.current_thread() and (
                (loop is not None and getattr(t, "_target", None) is loop)
                or t.name.endswith("(_notify_loop)")):
            t.join(timeout)
            if t.is_alive():
                log.warning("FUSE: entry invalidations still pending at unmount")
