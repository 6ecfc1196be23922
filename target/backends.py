"""Namespace backends of the embedded target: ram (bytearray), null (zeros in, writes dropped),
file (os.pread/os.pwrite on a regular file or block device).

A backend is a byte store addressed in bytes; the queue core converts LBAs and checks ranges
before calling it, so backends do no range checks of their own. Reads return a buffer the caller
sends as is (for ram and null a zero-copy memoryview; the caller must send it before the next
write to the same range is processed, which the queue core's in-order batch guarantees).

The file backend calls os.pread/os.pwrite directly on the event loop thread: on a local file the
page cache answers in microseconds, far less than a thread hand-off costs (about 30 us with
trio.to_thread). A slow disk therefore stalls the whole target; the target is a test peer and a
demo, not a storage server.

Does not: parse specs from the command line beyond `parse_ns_spec`, or know about NVMe.
"""

from __future__ import annotations

import os
import re
import stat

_SIZE_RE = re.compile(r"^(\d+)([KMGTP]?)(i?B)?$", re.IGNORECASE)
_MULT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
ZERO_CHUNK = 1 << 20


def parse_size(text: str) -> int:
    """'64M', '1G', '4096', '512KiB' -> bytes (binary multiples)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r} (want e.g. 4096, 512K, 64M, 1G)")
    return int(m.group(1)) * _MULT[m.group(2).upper()]


class Backend:
    """Base: `size` in bytes; `read(off, n) -> buffer`; `write(off, data)`; `zero(off, n)`;
    `flush()`; `resize(new_size)`; `close()`."""

    kind = "?"
    volatile_cache = False

    def __init__(self, size: int):
        self.size = size

    def describe(self) -> str:
        return f"{self.kind}:{self.size}"

    def read(self, off: int, n: int):
        raise NotImplementedError

    def write(self, off: int, data) -> None:
        raise NotImplementedError

    def zero(self, off: int, n: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def resize(self, new_size: int) -> None:
        self.size = new_size

    def close(self) -> None:
        pass


class RamBackend(Backend):
    kind = "ram"

    def __init__(self, size: int):
        super().__init__(size)
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)

    def read(self, off: int, n: int):
        return self.mv[off:off + n]

    def write(self, off: int, data) -> None:
        self.mv[off:off + len(data)] = data

    def zero(self, off: int, n: int) -> None:
        mv = self.mv
        end = off + n
        while off < end:
            k = min(ZERO_CHUNK, end - off)
            mv[off:off + k] = bytes(k)
            off += k

    def resize(self, new_size: int) -> None:
        # A new buffer, not an in-place resize: views handed out for pending sends stay valid.
        nb = bytearray(new_size)
        k = min(new_size, self.size)
        nb[:k] = self.mv[:k]
        self.buf, self.mv, self.size = nb, memoryview(nb), new_size


class FileRange:
    """Bytes of a file to send with `os.sendfile` (page references, no copy into the socket):
    an item of a queue's output list between ordinary buffers. `off`/`n` advance as parts are
    sent. `bytes()` reads it (tests, and anything that must copy)."""

    __slots__ = ("fd", "off", "n")

    def __init__(self, fd: int, off: int, n: int):
        self.fd, self.off, self.n = fd, off, n

    def __len__(self) -> int:
        return self.n

    def __bytes__(self) -> bytes:
        return os.pread(self.fd, self.n, self.off)


_zero_fd: int | None = None


def zero_file(size: int) -> int | None:
    """A memfd of at least `size` bytes that is never written (its pages read as zeros), shared
    by the null namespaces for the life of the process (never closed: output lists may still
    refer to it after a namespace is removed). None where memfd_create is missing."""
    global _zero_fd
    if not hasattr(os, "memfd_create"):
        return None
    if _zero_fd is None:
        _zero_fd = os.memfd_create("blockfs-zeros", os.MFD_CLOEXEC)
    if os.fstat(_zero_fd).st_size < size:
        os.ftruncate(_zero_fd, size)
    return _zero_fd


class NullBackend(Backend):
    kind = "null"

    ZEROS_MAX = 1 << 21     # the largest zero buffer kept for the fast path

    def __init__(self, size: int, max_io: int = 1 << 21):
        super().__init__(size)
        self.zeros = memoryview(bytes(max_io))

    def reserve(self, n: int) -> bool:
        """Make `zeros` at least `n` bytes long if that is at most ZEROS_MAX; -> whether it is."""
        if len(self.zeros) < n <= self.ZEROS_MAX:
            self.zeros = memoryview(bytes(n))
        return len(self.zeros) >= n

    def read(self, off: int, n: int):
        z = self.zeros
        if n > len(z):
            self.zeros = z = memoryview(bytes(n))
        return z[:n]

    def write(self, off: int, data) -> None:
        pass

    def zero(self, off: int, n: int) -> None:
        pass


class FileBackend(Backend):
    kind = "file"
    volatile_cache = True

    def __init__(self, path: str, block_size: int = 512, size: int | None = None):
        self.path = path
        exists = os.path.exists(path)
        self.fd = os.open(path, os.O_RDWR | (0 if exists else os.O_CREAT), 0o644)
        st = os.fstat(self.fd)
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        if self.is_blockdev:
            cur = os.lseek(self.fd, 0, os.SEEK_END)
        else:
            cur = st.st_size
            if size is not None and size != cur:
                os.ftruncate(self.fd, size)
                cur = size
        if cur == 0:
            os.close(self.fd)
            raise ValueError(f"{path}: empty file (give a size: file:PATH:BLOCKSIZE:SIZE)")
        super().__init__(cur - cur % block_size)

    def describe(self) -> str:
        return f"file:{self.path}"

    def read(self, off: int, n: int):
        data = os.pread(self.fd, n, off)
        if len(data) < n:      # short read past EOF of a sparse/shrunk file: zeros
            data += bytes(n - len(data))
        return data

    def write(self, off: int, data) -> None:
        mv = memoryview(data)
        while len(mv):
            k = os.pwrite(self.fd, mv, off)
            mv = mv[k:]
            off += k

    def zero(self, off: int, n: int) -> None:
        end = off + n
        z = bytes(min(ZERO_CHUNK, n))
        while off < end:
            k = min(len(z), end - off)
            self.write(off, memoryview(z)[:k])
            off += k

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def resize(self, new_size: int) -> None:
        if self.is_blockdev:
            raise ValueError("cannot resize a block device")
        os.ftruncate(self.fd, new_size)
        self.size = new_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_ns_spec(spec: str) -> tuple[Backend, int]:
    """'ram:SIZE[:BS]' | 'null:SIZE[:BS]' | 'file:PATH[:BS[:SIZE]]' -> (backend, block_size).

    A file that does not exist is created with SIZE (required then)."""
    kind, _, rest = spec.partition(":")
    if not rest:
        raise ValueError(f"bad namespace {spec!r}: want ram:SIZE, null:SIZE[:BS] or file:PATH")
    if kind in ("ram", "null"):
        parts = rest.split(":")
        if len(parts) > 2:
            raise ValueError(f"bad namespace {spec!r}")
        size = parse_size(parts[0])
        bs = int(parts[1]) if len(parts) == 2 else 512
        _check_bs(bs)
        size -= size % bs
        if size <= 0:
            raise ValueError(f"namespace {spec!r} is smaller than one block")
        return (RamBackend(size) if kind == "ram" else NullBackend(size)), bs
    if kind == "file":
        path, bs, size = rest, 512, None
        # Trailing numeric fields are the block size and (for a new file) the size.
        parts = rest.split(":")
        if len(parts) >= 3 and parts[-2].isdigit() and _SIZE_RE.match(parts[-1]):
            path, bs, size = ":".join(parts[:-2]), int(parts[-2]), parse_size(parts[-1])
        elif len(parts) >= 2 and parts[-1].isdigit():
            path, bs = ":".join(parts[:-1]), int(parts[-1])
        _check_bs(bs)
        if size is None and not os.path.exists(path):
            raise ValueError(f"{path}: no such file (file:PATH:BLOCKSIZE:SIZE creates one)")
        return FileBackend(path, bs, size), bs
    raise ValueError(f"unknown backend {kind!r} in {spec!r} (ram, null, file)")


def _check_bs(bs: int) -> None:
    if bs < 512 or bs > 65536 or bs & (bs - 1):
        raise ValueError(f"block size {bs} must be a power of two from 512 to 65536")
