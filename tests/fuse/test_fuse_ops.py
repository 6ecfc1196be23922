"""BlockFs handlers called directly (no mount, no kernel): errno mapping, block-device semantics,
fallocate modes, the registry view and re-examine on release."""

from __future__ import annotations

import errno
import os
import types

import pytest
import trio
from pyfuse3 import ROOT_INODE, FUSEError

from bdev import BdevRegistry, IoType, MallocBdev
from blockfs.fuse import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, BlockFs

pytestmark = pytest.mark.trio


class Recording(MallocBdev):
    def __init__(self, *a, unmap_zeroes=True, **kw):
        super().__init__(*a, **kw)
        self.unmap_zeroes = unmap_zeroes
        self.cmds = []

    async def _submit_unmap(self, ctx, lba, n):
        self.cmds.append(("unmap", lba, n))
        await MallocBdev._submit_write_zeroes(self, ctx, lba, n)

    async def _submit_write_zeroes(self, ctx, lba, n):
        self.cmds.append(("zeroes", lba, n))
        await super()._submit_write_zeroes(ctx, lba, n)


def fields(**kw):
    base = dict(update_size=False, update_mode=False, update_uid=False, update_gid=False,
                update_atime=False, update_mtime=False, update_ctime=False)
    return types.SimpleNamespace(**(base | kw))


async def make(*bdevs, **kw):
    reg = BdevRegistry(examine_modules=[])
    for b in bdevs:
        await reg.register(b)
    return reg, BlockFs(reg, **kw)


async def fuse_errno(coro) -> int:
    with pytest.raises(FUSEError) as ei:
        await coro
    return ei.value.errno


async def test_lookup_getattr_and_registry_view():
    b = MallocBdev("m0", 100, 512)
    reg, fs = await make(b, uid=12, gid=34, mode=0o640)
    a = await fs.lookup(ROOT_INODE, b"m0", None)
    assert (a.st_size, a.st_blksize, a.st_uid, a.st_gid, a.st_mode & 0o777) == (51200, 512, 12, 34, 0o640)
    assert await fuse_errno(fs.lookup(ROOT_INODE, b"zz", None)) == errno.ENOENT
    assert await fuse_errno(fs.lookup(a.st_ino, b"x", None)) == errno.ENOTDIR
    await reg.register(MallocBdev("m1", 8, 4096))
    a1 = await fs.lookup(ROOT_INODE, b"m1", None)
    assert a1.st_ino > a.st_ino and a1.st_size == 32768
    b.resize(200)
    assert (await fs.getattr(a.st_ino, None)).st_size == 102400
    await reg.unregister("m0")
    assert await fuse_errno(fs.lookup(ROOT_INODE, b"m0", None)) == errno.ENOENT
    assert (await fs.getattr(a.st_ino, None)).st_nlink == 0  # still known to the kernel
    await fs.forget([(a.st_ino, 1)])
    assert await fuse_errno(fs.getattr(a.st_ino, None)) == errno.ENOENT
    root = await fs.getattr(ROOT_INODE, None)
    assert root.st_mode & 0o777 == 0o755
    fs.close()


async def test_read_write_semantics_and_errno_boundary():
    b = MallocBdev("m0", 8, 512)
    reg, fs = await make(b)
    ino = (await fs.lookup(ROOT_INODE, b"m0", None)).st_ino
    fi = await fs.open(ino, os.O_RDWR, None)
    fh = fi.fh
    assert fi.direct_io
    assert await fs.write(fh, 4090, b"abcdefghij") == 6  # cut short at the end (4096)
    assert await fuse_errno(fs.write(fh, 4096, b"x")) == errno.ENOSPC
    assert bytes(await fs.read(fh, 4090, 100)) == b"abcdef"
    assert await fs.read(fh, 4096, 10) == b""
    await fs.fsync(fh, False)
    assert b.flushes == 1
    a = await fs.setattr(ino, None, fields(update_size=True), fh, None)  # truncate: ignored
    assert a.st_size == 4096
    chmod = types.SimpleNamespace(st_mode=0o100644, st_uid=a.st_uid, st_gid=a.st_gid)
    assert await fuse_errno(fs.setattr(ino, chmod, fields(update_mode=True), fh, None)) == errno.EPERM
    same = types.SimpleNamespace(st_mode=a.st_mode, st_uid=a.st_uid, st_gid=a.st_gid)
    assert (await fs.setattr(ino, same, fields(update_mode=True, update_uid=True, update_gid=True),
                             fh, None)).st_mode == a.st_mode  # a no-op chmod/chown succeeds
    b.hot_remove()  # BdevError(ENODEV) reaches the caller as ENODEV
    assert await fuse_errno(fs.read(fh, 0, 10)) == errno.ENODEV
    assert await fuse_errno(fs.write(fh, 0, b"x")) == errno.ENODEV
    await fs.release(fh)
    assert reg.get("m0") is None  # the registry dropped it; the file is gone from the directory
    assert await fuse_errno(fs.lookup(ROOT_INODE, b"m0", None)) == errno.ENOENT
    fs.close()


async def test_a_bug_in_a_handler_becomes_eio(caplog):
    reg, fs = await make(MallocBdev("m0", 8, 512))
    assert await fuse_errno(fs.read(12345, 0, 10)) == errno.EIO  # unknown fh: KeyError inside
    assert "FUSE read" in caplog.text


async def test_read_only_and_namespace_errors():
    reg, fs = await make(MallocBdev("m0", 8, 512), MallocBdev("ro", 8, 512, read_only=True))
    ino = (await fs.lookup(ROOT_INODE, b"ro", None)).st_ino
    assert (await fs.getattr(ino, None)).st_mode & 0o222 == 0
    assert await fuse_errno(fs.open(ino, os.O_WRONLY, None)) == errno.EROFS
    assert await fuse_errno(fs.create(ROOT_INODE, b"new", 0o600, os.O_CREAT, None)) == errno.EPERM
    assert await fuse_errno(fs.create(ROOT_INODE, b"m0", 0o600, os.O_CREAT, None)) == errno.EEXIST
    assert await fuse_errno(fs.unlink(ROOT_INODE, b"m0", None)) == errno.EPERM
    reg2, rofs = await make(MallocBdev("m0", 8, 512), read_only=True, mode=0o660)
    ino2 = (await rofs.lookup(ROOT_INODE, b"m0", None)).st_ino
    assert (await rofs.getattr(ino2, None)).st_mode & 0o777 == 0o440
    assert await fuse_errno(rofs.open(ino2, os.O_RDWR, None)) == errno.EROFS
    assert await fuse_errno(rofs.mkdir(ROOT_INODE, b"d", 0o700, None)) == errno.EROFS
    assert await fuse_errno(rofs.fallocate(ino2, FALLOC_FL_ZERO_RANGE, 0, 512)) == errno.EROFS


@pytest.mark.parametrize("unmap_zeroes", [True, False])
async def test_fallocate_modes(unmap_zeroes):
    b = Recording("m0", 64, 512, unmap_zeroes=unmap_zeroes)
    reg, fs = await make(b)
    ino = (await fs.lookup(ROOT_INODE, b"m0", None)).st_ino
    ch = b.get_io_channel()
    await ch.write(0, b"\xff" * 64 * 512)
    await fs.fallocate(ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 512, 4 * 512)
    assert b.cmds == [("unmap" if unmap_zeroes else "zeroes", 1, 4)]
    await fs.fallocate(ino, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 60 * 512, 100 * 512)  # clipped
    assert b.cmds[-1] == ("zeroes", 60, 4)
    data = bytes(await ch.read(0, 64 * 512))
    assert data == b"\xff" * 512 + bytes(2048) + b"\xff" * 55 * 512 + bytes(2048)
    await fs.fallocate(ino, 0, 0, 64 * 512)  # allocate within the size: nothing to do
    assert await fuse_errno(fs.fallocate(ino, 0, 0, 65 * 512)) == errno.ENOSPC
    assert await fuse_errno(fs.fallocate(ino, 0x08, 0, 512)) == errno.EOPNOTSUPP  # COLLAPSE_RANGE
    assert await fuse_errno(fs.fallocate(ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE, 0, 512)) == errno.EINVAL
    assert b.io_type_supported(IoType.UNMAP)


async def test_release_after_write_reexamines_whole_disks_only():
    calls = []

    class Spy:
        name = "spy"

        async def examine(self, registry, bdev):
            calls.append(bdev.name)

    reg = BdevRegistry(examine_modules=[Spy()])
    await reg.register(MallocBdev("d", 64, 512))
    fs = BlockFs(reg)
    calls.clear()
    ino = (await fs.lookup(ROOT_INODE, b"d", None)).st_ino
    async with trio.open_nursery() as nursery:
        fs.attach(nursery)
        ro = (await fs.open(ino, os.O_RDONLY, None)).fh
        await fs.release(ro)  # no write: nothing
        rw = (await fs.open(ino, os.O_RDWR, None)).fh
        await fs.write(rw, 0, b"x")
        await fs.release(rw)
        await trio.sleep(0.01)
        fs.detach()
    assert calls == ["d"]


async def test_read_request_limit_follows_the_pipes_and_stops_at_512k():
    """Spliced reads: FUSE requests of half a pipe (a transfer must fit with its socket
    fragments), and never more than 512 KiB, the fastest size measured (1 MiB requests in
    4 MiB pipes were slower); without splicing, libfuse's own limit (0: no max_read)."""
    from blockfs.fuse import read_request_limit
    assert read_request_limit(0) == 0
    assert read_request_limit(128 << 10) == 64 << 10
    assert read_request_limit(1 << 20) == 512 << 10
    assert read_request_limit(4 << 20) == 512 << 10
