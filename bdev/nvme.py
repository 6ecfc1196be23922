"""NVMe bdevs: one `NvmeBdev` per active namespace of an initiator `Session` (SPDK bdev_nvme).

`NvmeController` attaches a session to a registry: namespaces become bdevs named like Linux
(`nvme<ctrl>n<nsid>`), and the session's namespace events become bdev events in the order they
happened: a grown or shrunk namespace -> `notify_resize` (its partitions are re-examined), a new
one -> registered and examined, a vanished one -> hot-removed. Channels are a consumer's handle
on one I/O queue (round-robin over the controller's queues) and survive reconnects, because the
session resubmits I/O on the new connection.

Errors from the initiator become BdevError at this one place.
"""

from __future__ import annotations

import errno
import itertools
import logging
from typing import Any, Callable

import trio

from initiator._errors import NvmeStatusError, TransportError
from initiator.session import NamespaceGone, NamespaceInfo, Session

from ._base import Bdev, BdevError, IoType
from .registry import BdevRegistry

log = logging.getLogger(__name__)

# NVMe status -> errno (the kernel's nvme_error_status() mapping, in spirit).
_GENERIC_ERRNO = {
    0x02: errno.EINVAL,      # invalid field
    0x0B: errno.ENODEV,      # invalid namespace or format
    0x20: errno.EROFS,       # namespace is write protected
    0x80: errno.ENOSPC,      # LBA out of range
    0x81: errno.ENOSPC,      # capacity exceeded
    0x82: errno.EAGAIN,      # namespace not ready
    0x83: errno.EBADE,       # reservation conflict
}


def _unsupported(e: NvmeStatusError) -> bool:
    """Invalid Opcode, or nvmet's "ONCS not supported" (sct 1, sc 0x83) for a backend that
    cannot do the operation."""
    return (e.sct, e.sc) in ((0, 0x01), (1, 0x83))


def _bdev_error(e: Exception, what: str) -> BdevError:
    if isinstance(e, NvmeStatusError):
        code = _GENERIC_ERRNO.get(e.sc, errno.EIO) if e.sct == 0 else errno.EIO
        if e.sct == 2:
            code = errno.EIO   # media errors: unrecovered read, write fault...
        return BdevError(code, f"{what}: {e}")
    if isinstance(e, NamespaceGone):
        return BdevError(errno.ENODEV, f"{what}: {e}")
    return BdevError(errno.EIO, f"{what}: {e}")


class NvmeBdev(Bdev):
    def __init__(self, name: str, session: Session, info: NamespaceInfo, *, read_only: bool = False):
        super().__init__(name, info.block_size, info.num_blocks,
                         uuid=info.uuid or _nguid_uuid(info.nguid), product_name="NVMe disk",
                         max_io_bytes=session.max_transfer or 0, read_only=read_only,
                         unmap_zeroes=False)
        self.session = session
        self.nsid = info.nsid
        self.info = info
        # This namespace's life at its NSID (kept across resizes): once the session finds it
        # removed or replaced, I/O through this bdev fails with ENODEV, also I/O that was
        # waiting for a reconnect, instead of reaching whatever the NSID names now.
        self.token = info.token
        self._rr = itertools.count()
        self._wz_unsupported = False

    def io_type_supported(self, io_type: IoType) -> bool:
        c = self.session.ctrl
        oncs = getattr(getattr(c, "ctrl", None), "oncs", 0xFF) if c else 0xFF
        if io_type == IoType.UNMAP:
            return bool(oncs & 0x4)          # ONCS bit 2: Dataset Management
        if io_type == IoType.WRITE_ZEROES:
            return bool(oncs & 0x8) and not self._wz_unsupported   # ONCS bit 3: Write Zeroes
        return True

    @property
    def fd_reads(self) -> bool:            # type: ignore[override]
        """Reads into pipes (FdSink): only without digests, whose CRCs need the bytes here."""
        o = self.session.opts
        return not (o.hdr_digest or o.data_digest)

    def _max_blocks(self) -> int:
        # The live controller's limit, not the one this bdev was made with: a reconnect may
        # find a smaller MDTS (the kernel host re-reads it on every reset, nvme_init_ctrl_finish,
        # and updates the queue limits, nvme_update_ns_info_block).
        mt = self.session.io_max_bytes or self.max_io_bytes
        return mt // self.block_size if mt else 0

    def _create_channel_ctx(self) -> Any:
        return next(self._rr)

    async def _submit_read(self, ctx, lba, nblocks, buf) -> None:
        try:
            await self.session.read(self.nsid, lba, nblocks, buf, ctx, self.token)
        except (NamespaceGone, NvmeStatusError, TransportError) as e:
            raise _bdev_error(e, f"{self.name}: read of {nblocks} blocks at {lba}") from None

    def _submit_read_nowait(self, ctx, lba, nblocks, buf, on_done) -> bool:
        return self.session.read_nowait(self.nsid, lba, nblocks, buf, on_done, ctx, self.token)

    async def _submit_write(self, ctx, lba, nblocks, data, fua) -> None:
        try:
            await self.session.write(self.nsid, lba, nblocks, data, ctx, fua=fua, token=self.token)
        except (NamespaceGone, NvmeStatusError, TransportError) as e:
            raise _bdev_error(e, f"{self.name}: write of {nblocks} blocks at {lba}") from None

    async def _submit_flush(self, ctx) -> None:
        try:
            await self.session.flush(self.nsid, ctx, self.token)
        except (NamespaceGone, NvmeStatusError, TransportError) as e:
            raise _bdev_error(e, f"{self.name}: flush") from None

    async def _submit_write_zeroes(self, ctx, lba, nblocks) -> None:
        try:
            # Write Zeroes NLB is 16 bits (0's based): split here, MDTS does not apply.
            while nblocks:
                n = min(nblocks, 65536)
                await self.session.write_zeroes(self.nsid, lba, n, ctx, self.token)
                lba += n
                nblocks -= n
        except NvmeStatusError as e:
            if _unsupported(e):
                # ONCS says yes, the backend says no (nvmet on tmpfs answers sct 1 / sc 0x83):
                # stop claiming WRITE_ZEROES; the bdev layer writes zero buffers instead, as
                # SPDK's does.
                log.info("%s: Write Zeroes unsupported (%s); writing zeroes instead", self.name, e)
                self._wz_unsupported = True
                raise BdevError(errno.EOPNOTSUPP, f"{self.name}: write zeroes: {e}") from None
            raise _bdev_error(e, f"{self.name}: write zeroes") from None
        except (NamespaceGone, TransportError) as e:
            raise _bdev_error(e, f"{self.name}: write zeroes") from None

    async def _submit_unmap(self, ctx, lba, nblocks) -> None:
        try:
            # DSM ranges carry a 32-bit block count; up to 256 ranges per command.
            ranges = []
            while nblocks:
                n = min(nblocks, 0xFFFFFFFF)
                ranges.append((lba, n))
                lba += n
                nblocks -= n
            for i in range(0, len(ranges), 256):
                await self.session.deallocate(self.nsid, ranges[i:i + 256], ctx, self.token)
        except (NamespaceGone, NvmeStatusError, TransportError) as e:
            raise _bdev_error(e, f"{self.name}: deallocate") from None


def _nguid_uuid(nguid: str | None) -> str | None:
    if not nguid:
        return None
    h = nguid
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class NvmeController:
    """Binds a Session to a registry: namespace events -> bdev registrations, in order."""

    def __init__(self, registry: BdevRegistry, session: Session, index: int, *,
                 read_only: bool = False):
        self.registry = registry
        self.session = session
        self.index = index
        self.name = f"nvme{index}"
        self.read_only = read_only
        self.bdevs: dict[int, NvmeBdev] = {}
        self.on_event: Callable[[str, dict], None] | None = None   # hotplug: (event, env)
        self._send, self._recv = trio.open_memory_channel(1000)

    def bdev_name(self, nsid: int) -> str:
        return f"{self.name}n{nsid}"

    async def start(self, nursery: trio.Nursery) -> None:
        """Register the namespaces known now, then follow the session's events."""
        self.session.on_namespace = self._on_namespace
        for nsid, info in sorted(self.session.namespaces.items()):
            await self._apply("add", nsid, info)
        nursery.start_soon(self._run)

    def _on_namespace(self, kind: str, nsid: int, info: NamespaceInfo) -> None:
        try:
            self._send.send_nowait((kind, nsid, info))
        except trio.WouldBlock:
            log.error("%s: namespace event queue full; a rescan will resynchronise", self.name)
            self.session.request_rescan()

    async def _run(self) -> None:
        async for kind, nsid, info in self._recv:
            try:
                await self._apply(kind, nsid, info)
            except BdevError as e:
                log.error("%s: applying %s of namespace %d failed: %s", self.name, kind, nsid, e)

    async def _apply(self, kind: str, nsid: int, info: NamespaceInfo) -> None:
        if kind == "add":
            if nsid in self.bdevs:
                return
            b = NvmeBdev(self.bdev_name(nsid), self.session, info, read_only=self.read_only)
            self.bdevs[nsid] = b
            await self.registry.register(b)
        elif kind == "resize":
            b = self.bdevs.get(nsid)
            if b is None:
                return
            b.info = info
            if b.num_blocks != info.num_blocks:
                log.info("%s: resize %d -> %d blocks", b.name, b.num_blocks, info.num_blocks)
                b.notify_resize(info.num_blocks)
                await self.registry.reexamine(b.name)
        elif kind == "remove":
            b = self.bdevs.pop(nsid, None)
            if b is not None:
                await self.registry.unregister(b.name)

    async def detach(self) -> None:
        self._send.close()          # ends _run
        for nsid in sorted(self.bdevs, reverse=True):
            b = self.bdevs.pop(nsid)
            if self.registry.get(b.name) is not None:
                await self.registry.unregister(b.name)
