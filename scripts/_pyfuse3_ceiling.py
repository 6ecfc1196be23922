"""Bench-only helper: pyfuse3's own read path on one RAM-backed file, the FUSE ceiling.

    python3 scripts/_pyfuse3_ceiling.py MOUNTPOINT [--size 256M]

The file is MOUNTPOINT/ram0. It is served the way pyfuse3's examples serve a file: one
`Operations` subclass, `read()` returning the bytes, a task per request, libfuse's defaults
(requests of up to 1 MiB, max_background 12). The bytes are a view of a RAM buffer whose pages
are all touched, so the only copy is the kernel's, from that buffer into the reader's pages,
as with a payload spliced from the socket: what a 1 MiB read through FUSE costs with no block
layer, no NVMe and no copy in Python. Prints "READY" once mounted; SIGTERM/SIGINT unmount and
exit, and so does an unmount from outside (fusermount3 -u).
Not a user command (scripts/bench starts it).
"""

from __future__ import annotations

import argparse
import errno
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockfs.options import parse_size  # noqa: E402
from scripts._helper_mount import run_until_stopped  # noqa: E402

_FILE_INODE = pyfuse3.ROOT_INODE + 1
_NAME = b"ram0"


class CeilingOps(pyfuse3.Operations):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.data = bytearray(size)
        # One byte per page: real pages, not the shared zero page.
        self.data[::4096] = b"\x01" * len(range(0, size, 4096))
        self.view = memoryview(self.data)

    async def getattr(self, inode, ctx=None):
        a = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_size, a.st_nlink = stat.S_IFDIR | 0o755, 0, 2
        elif inode == _FILE_INODE:
            a.st_mode, a.st_size, a.st_nlink = stat.S_IFREG | 0o644, len(self.data), 1
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_ino = inode
        return a

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == _NAME:
            return await self.getattr(_FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, _NAME, await self.getattr(_FILE_INODE), 1)

    async def open(self, inode, flags, ctx):
        if inode != _FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        return self.view[off:off + size]


async def main(a: argparse.Namespace) -> None:
    opts = set(pyfuse3.default_options)
    opts.discard("default_permissions")
    opts.add("fsname=blockfs-ceiling")
    pyfuse3.init(CeilingOps(a.size), a.mountpoint, opts)
    try:
        async def serve(task_status) -> None:
            task_status.started()        # pyfuse3.init mounted it
            await pyfuse3.main()

        await run_until_stopped(serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mountpoint")
    ap.add_argument("--size", type=parse_size, default=256 << 20)
    trio.run(main, ap.parse_args())
