"""NBD server end to end: real clients (nbdinfo, nbdcopy, qemu-img, qemu-io) and a raw socket
client against MallocBdevs served in-process on 127.0.0.1, port 0, or on a unix socket."""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import socket
import stat
import struct
from typing import Any

import pytest
import trio

from bdev import CALLBACKS, BdevError, BdevRegistry, MallocBdev
from blockfs.nbd import NbdAddressError, serve_nbd, serve_nbd_unix
from kernel_target import in_ci

pytestmark = pytest.mark.nbd

MiB = 1024 * 1024
REPLY_MAGIC = 0x3E889045565A9
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_SR = 1, 2, 3, 5, 6, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_UNKNOWN = 0x80000001, 0x80000002, 0x80000006
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WZ, CMD_BS = range(8)
SIMPLE_MAGIC, STRUCTURED_MAGIC = 0x67446698, 0x668E33EF


def timeboxed(seconds: float):
    """Run an async test under trio.fail_after(seconds)."""

    def deco(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            with trio.fail_after(seconds):
                return await fn(*args, **kwargs)

        return wrapper

    return deco


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        msg = f"missing {', '.join(missing)} (run scripts/setup-system)"
        if in_ci():
            pytest.fail(msg + " [CI is set: failing instead of skipping]", pytrace=False)
        pytest.skip(msg)


async def run(*argv: str, check: bool = True) -> str:
    result = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode() + result.stderr.decode()
    if check and result.returncode:
        pytest.fail(f"{' '.join(argv)} exited {result.returncode}:\n{out}")
    return out


# ----------------------------------------------------------------------------- fixtures


async def make_registry() -> BdevRegistry:
    reg = BdevRegistry(examine_modules=[])
    await reg.register(MallocBdev("malloc0", 16 * MiB // 512, 512))
    await reg.register(MallocBdev("malloc1", 4 * MiB // 4096, 4096))
    return reg


@pytest.fixture
async def registry():
    return await make_registry()


@pytest.fixture
async def port(nursery, registry):
    return await nursery.start(serve_nbd, registry, "127.0.0.1", 0)


def uri(port: int, name: str = "") -> str:
    return f"nbd://127.0.0.1:{port}/{name}"


async def bdev_bytes(bdev, offset: int = 0, length: int | None = None) -> bytes:
    ch = bdev.get_io_channel()
    try:
        return bytes(await ch.read(offset, bdev.size - offset if length is None else length))
    finally:
        ch.close()


# ----------------------------------------------------------------------------- raw client


class RawClient:
    """A hand-written NBD client speaking raw bytes, to send what real clients never would."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port: int, *, greet: bool = True, flags: int = 3) -> RawClient:
        c = cls(await trio.open_tcp_stream("127.0.0.1", port))
        if greet:
            assert await c.recv(18) == b"NBDMAGICIHAVEOPT\x00\x03"
            await c.send(struct.pack(">I", flags))
        return c

    @classmethod
    async def connect_unix(cls, path: str) -> RawClient:
        c = cls(await trio.open_unix_socket(path))
        assert await c.recv(18) == b"NBDMAGICIHAVEOPT\x00\x03"
        await c.send(struct.pack(">I", 3))
        return c

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(f"EOF after {len(self.buf)} of {n} bytes")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def closed_by_server(self) -> bool:
        """True if the server closes the connection (EOF or reset) without sending more."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            return True
        return not data and not self.buf

    async def aclose(self) -> None:
        await self.stream.aclose()

    # negotiation

    async def option(self, option: int, data: bytes = b"") -> None:
        await self.send(b"IHAVEOPT" + struct.pack(">II", option, len(data)) + data)

    async def reply(self) -> tuple[int, int, bytes]:
        magic, option, rtype, length = struct.unpack(">QIII", await self.recv(20))
        assert magic == REPLY_MAGIC
        return option, rtype, await self.recv(length)

    async def go(self, name: str = "", *, structured: bool = False) -> tuple[int, int]:
        """NBD_OPT_GO; returns (size, transmission flags)."""
        if structured:
            await self.option(OPT_SR)
            assert (await self.reply())[:2] == (OPT_SR, REP_ACK)
        raw = name.encode()
        await self.option(OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, 3))
        size = flags = None
        while True:
            option, rtype, data = await self.reply()
            assert option == OPT_GO
            if rtype == REP_ACK:
                return size, flags
            assert rtype == REP_INFO, hex(rtype)
            if struct.unpack_from(">H", data)[0] == 0:
                _, size, flags = struct.unpack(">HQH", data)

    # transmission

    async def request(
        self, cmd: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0,
        data: bytes = b"",
    ) -> None:
        await self.send(struct.pack(">IHHQQI", 0x25609513, flags, cmd, handle, offset, length) + data)

    async def simple_reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(error, handle, data); data only for a successful read of read_length bytes."""
        magic, err, handle = struct.unpack(">IIQ", await self.recv(16))
        assert magic == SIMPLE_MAGIC, hex(magic)
        data = await self.recv(read_length) if read_length and not err else b""
        return err, handle, data

    async def chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, handle, payload) of one structured reply chunk."""
        magic, flags, rtype, handle, length = struct.unpack(">IHHQI", await self.recv(20))
        assert magic == STRUCTURED_MAGIC, hex(magic)
        return flags, rtype, handle, await self.recv(length)


# ----------------------------------------------------------------------------- real clients


@timeboxed(30)
async def test_nbdinfo_lists_every_export(port, registry):
    need("nbdinfo")
    listing = json.loads(await run("nbdinfo", "--list", "--json", uri(port)))
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert list(exports) == ["malloc0", "malloc1"]
    for bdev in registry.bdevs():
        e = exports[bdev.name]
        assert e["export-size"] == bdev.size
        assert e["description"] == "Malloc disk"
        assert e["block_size_minimum"] == 1
        assert e["block_size_preferred"] == max(4096, bdev.block_size)
        assert e["block_size_maximum"] == 32 * MiB
        assert e["is_read_only"] is False
        for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
            assert e[cap] is True, cap
    assert listing["structured"] is True


@timeboxed(60)
async def test_nbdcopy_in_and_out_and_qemu_img_compare(port, registry, tmp_path):
    need("nbdcopy", "qemu-img")
    src, back = tmp_path / "in.img", tmp_path / "out.img"
    data = os.urandom(16 * MiB)
    src.write_bytes(data)
    await run("nbdcopy", str(src), uri(port, "malloc0"))
    assert await bdev_bytes(registry.get("malloc0")) == data
    await run("nbdcopy", uri(port, "malloc0"), str(back))
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(back))
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri(port, "malloc0"))


@timeboxed(60)
async def test_nbdcopy_four_connections(port, registry, tmp_path):
    need("nbdcopy", "qemu-img")
    src, back = tmp_path / "in.img", tmp_path / "out.img"
    data = os.urandom(16 * MiB)
    src.write_bytes(data)
    await run("nbdcopy", "--connections=4", "--requests=16", str(src), uri(port, "malloc0"))
    assert await bdev_bytes(registry.get("malloc0")) == data
    await run("nbdcopy", "--connections=4", uri(port, "malloc0"), str(back))
    assert back.read_bytes() == data


QEMU_IO_SCRIPT = [
    "write -P 0xab 1000 3000",  # unaligned write (server-side read-modify-write)
    "read -P 0xab 1000 3000",
    "read -P 0 0 1000",
    "read -P 0 4000 96",
    "write -P 0x11 65536 65536",  # aligned
    "read -P 0x11 65536 65536",
    "write -z 70000 5000",  # unaligned write zeroes
    "read -P 0 70000 5000",
    "read -P 0x11 65536 4464",
    "read -P 0x11 75000 56072",
    "discard 131072 65536",
    "write -z -u 65536 4096",  # write zeroes allowed to unmap
    "read -P 0 65536 4096",
    "write -f -P 0x22 300000 700",  # FUA
    "read -P 0x22 300000 700",
    "flush",
    "read -P 0xab 1000 3000",
]


@pytest.mark.parametrize("export", ["malloc0", "malloc1"])
@timeboxed(30)
async def test_qemu_io_aligned_unaligned_discard_zero(port, registry, export):
    need("qemu-io")
    args = ["qemu-io", "-f", "raw"]
    for cmd in QEMU_IO_SCRIPT:
        args += ["-c", cmd]
    out = await run(*args, uri(port, export))
    assert "fail" not in out.lower(), out
    assert out.count("read ") == sum(c.startswith("read") for c in QEMU_IO_SCRIPT), out
    got = await bdev_bytes(registry.get(export), 0, 300700)
    assert got[1000:4000] == b"\xab" * 3000
    assert got[65536 + 4096 : 70000] == b"\x11" * (70000 - 65536 - 4096)
    assert got[70000:75000] == bytes(5000)
    assert got[300000:300700] == b"\x22" * 700
    assert registry.get(export).flushes >= 1


@timeboxed(30)
async def test_default_export(nursery, registry):
    need("nbdinfo")
    p = await nursery.start(serve_nbd, registry, "127.0.0.1", 0)
    out = await run("nbdinfo", "--size", uri(p))
    assert int(out) == registry.get("malloc0").size  # first registered
    p2 = await nursery.start(
        functools.partial(serve_nbd, default_export="malloc1"), registry, "127.0.0.1", 0
    )
    assert int(await run("nbdinfo", "--size", uri(p2))) == registry.get("malloc1").size
    # Old-style NBD_OPT_EXPORT_NAME, empty name, no NO_ZEROES: size, flags, 124 zeroes.
    c = await RawClient.connect(p2, flags=1)
    await c.option(OPT_EXPORT_NAME)
    size, flags = struct.unpack(">QH", await c.recv(10))
    assert size == 4 * MiB and flags & 1
    assert await c.recv(124) == bytes(124)
    await c.request(CMD_READ, 1, 0, 4096)
    assert await c.simple_reply(4096) == (0, 1, bytes(4096))
    await c.aclose()


@timeboxed(30)
async def test_read_only_server(nursery, registry):
    need("nbdinfo", "qemu-io")
    p = await nursery.start(functools.partial(serve_nbd, read_only=True), registry, "127.0.0.1", 0)
    info = json.loads(await run("nbdinfo", "--json", uri(p, "malloc1")))
    assert info["exports"][0]["is_read_only"] is True
    out = await run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4096", uri(p, "malloc1"), check=False)
    # qemu sees READ_ONLY and refuses to open the export for writing at all.
    assert "permission denied" in out.lower() or "read-only" in out.lower(), out
    out = await run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 4096", uri(p, "malloc1"))
    assert "fail" not in out.lower(), out
    c = await RawClient.connect(p)
    size, flags = await c.go("malloc1")
    assert flags & 0x2  # READ_ONLY
    assert not flags & 0x20  # no TRIM offered on a read-only export
    await c.request(CMD_WRITE, 1, 0, 512, data=b"x" * 512)
    assert (await c.simple_reply())[:2] == (errno.EPERM, 1)
    await c.request(CMD_TRIM, 2, 0, 512)
    assert (await c.simple_reply())[:2] == (errno.EPERM, 2)
    await c.request(CMD_WZ, 3, 0, 512)
    assert (await c.simple_reply())[:2] == (errno.EPERM, 3)
    await c.request(CMD_READ, 4, 0, 512)
    assert await c.simple_reply(512) == (0, 4, bytes(512))
    await c.aclose()
    assert await bdev_bytes(registry.get("malloc1"), 0, 512) == bytes(512)


# ----------------------------------------------------------------------------- raw protocol


async def assert_still_serving(port: int, good: RawClient, handle: int) -> None:
    """An established connection and a brand new one both still work."""
    await good.request(CMD_READ, handle, 0, 512)
    err, h, data = await good.simple_reply(512)
    assert (err, h, len(data)) == (0, handle, 512)
    fresh = await RawClient.connect(port)
    size, _ = await fresh.go("malloc1")
    assert size == 4 * MiB
    await fresh.request(CMD_DISC, 0)
    assert await fresh.closed_by_server()
    await fresh.aclose()


async def _bad_flags(c: RawClient) -> None:
    await c.send(struct.pack(">I", 0xFFFF0000))


async def _http_request(c: RawClient) -> None:
    await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


async def _bad_option_magic(c: RawClient) -> None:
    await c.send(struct.pack(">I", 3) + b"NOTANOPT" + struct.pack(">II", OPT_GO, 0))


async def _oversize_option(c: RawClient) -> None:
    await c.send(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 99, 1 << 30))


async def _unknown_export_name(c: RawClient) -> None:
    await c.send(struct.pack(">I", 3))
    await c.option(OPT_EXPORT_NAME, b"no-such-export")


async def _abort(c: RawClient) -> None:
    await c.send(struct.pack(">I", 3))
    await c.option(OPT_ABORT)
    assert (await c.reply())[:2] == (OPT_ABORT, REP_ACK)


@pytest.mark.parametrize(
    "misbehave",
    [_bad_flags, _http_request, _bad_option_magic, _oversize_option, _unknown_export_name, _abort],
)
@timeboxed(30)
async def test_malformed_handshake_closes_cleanly(port, misbehave):
    good = await RawClient.connect(port)
    await good.go("malloc0")
    bad = await RawClient.connect(port, greet=False)
    assert await bad.recv(18) == b"NBDMAGICIHAVEOPT\x00\x03"
    await misbehave(bad)
    assert await bad.closed_by_server()
    await bad.aclose()
    await assert_still_serving(port, good, 7)
    await good.aclose()


@timeboxed(30)
async def test_option_errors_keep_negotiating(port):
    c = await RawClient.connect(port)
    await c.option(0x1234, b"whatever")
    assert await c.reply() == (0x1234, REP_ERR_UNSUP, b"")
    await c.option(OPT_STARTTLS)
    option, rtype, _ = await c.reply()
    assert (option, rtype) == (OPT_STARTTLS, REP_ERR_POLICY)
    await c.option(OPT_INFO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert (await c.reply())[:2] == (OPT_INFO, REP_ERR_UNKNOWN)
    await c.option(OPT_LIST)
    names = []
    while True:
        option, rtype, data = await c.reply()
        if rtype == REP_ACK:
            break
        assert rtype == REP_SERVER
        (n,) = struct.unpack_from(">I", data)
        names.append(data[4 : 4 + n].decode())
    assert names == ["malloc0", "malloc1"]
    size, flags = await c.go("malloc0")
    assert size == 16 * MiB
    assert flags == 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x100
    await c.aclose()


@timeboxed(30)
async def test_thousands_of_pipelined_options_are_all_answered(port):
    # One send of 4000 unknown options (64000 bytes, one receive on the server): each gets
    # ERR_UNSUP and the negotiation carries on (it used to end in a RecursionError).
    c = await RawClient.connect(port)
    await c.send((b"IHAVEOPT" + struct.pack(">II", 0x1234, 0)) * 4000)
    for _ in range(4000):
        assert await c.reply() == (0x1234, REP_ERR_UNSUP, b"")
    size, _ = await c.go("malloc1")
    assert size == 4 * MiB
    await assert_still_serving(port, c, 1)
    await c.aclose()


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@timeboxed(30)
async def test_bad_requests_get_errors_and_connection_survives(port, structured):
    c = await RawClient.connect(port)
    size, _ = await c.go("malloc1", structured=structured)

    async def expect_error(handle: int, err: int) -> None:
        if structured:
            flags, rtype, h, payload = await c.chunk()
            assert (flags, rtype, h) == (1, 0x8001, handle)
            e, mlen = struct.unpack_from(">IH", payload)
            assert e == err and len(payload) == 6 + mlen
        else:
            assert await c.simple_reply() == (err, handle, b"")

    await c.request(CMD_READ, 1, size - 512, 1024)  # past the end
    await expect_error(1, errno.EINVAL)
    await c.request(CMD_WRITE, 2, size - 512, 1024, data=b"w" * 1024)
    await expect_error(2, errno.ENOSPC)
    await c.request(CMD_READ, 3, 0, 33 * MiB)  # over the maximum block size
    await expect_error(3, errno.EINVAL)
    await c.request(CMD_CACHE, 4, 0, 4096)
    await expect_error(4, errno.EINVAL)
    await c.request(CMD_BS, 5, 0, 4096)
    await expect_error(5, errno.EINVAL)
    await c.request(99, 6, 0, 0)
    await expect_error(6, errno.EINVAL)
    await c.request(CMD_READ, 7, 0, 512, flags=0x4)  # DF was not offered
    await expect_error(7, errno.EINVAL)
    await c.request(CMD_FLUSH, 8, 4096, 0)
    await expect_error(8, errno.EINVAL)
    await c.request(CMD_TRIM, 9, size, 4096)
    await expect_error(9, errno.EINVAL)
    await c.request(CMD_WZ, 10, 0, 4096, flags=0x10)  # FAST_ZERO was not offered
    await expect_error(10, errno.EINVAL)
    # Still fine: a write and a read back.
    await c.request(CMD_WRITE, 11, 12345, 3, data=b"abc", flags=1)
    assert await c.simple_reply() == (0, 11, b"")
    await c.request(CMD_READ, 12, 12344, 5)
    if structured:
        flags, rtype, h, payload = await c.chunk()
        assert (flags, rtype, h) == (1, 1, 12)
        assert payload == struct.pack(">Q", 12344) + b"\0abc\0"
        await c.request(CMD_READ, 13, 0, 0)
        assert await c.chunk() == (1, 0, 13, b"")
    else:
        assert await c.simple_reply(5) == (0, 12, b"\0abc\0")
    # The last block, ending exactly at the export's end, is a valid read.
    await c.request(CMD_READ, 14, size - 512, 512)
    if structured:
        flags, rtype, h, payload = await c.chunk()
        assert (flags, rtype, h) == (1, 1, 14) and len(payload) == 8 + 512
    else:
        err, h, data = await c.simple_reply(512)
        assert (err, h, len(data)) == (0, 14, 512)
    # Garbage instead of a request: a clean close, and the server carries on.
    await c.send(b"\xde\xad\xbe\xef" * 7)
    assert await c.closed_by_server()
    await c.aclose()
    good = await RawClient.connect(port)
    await good.go("malloc0")
    await assert_still_serving(port, good, 1)
    await good.aclose()


@timeboxed(30)
async def test_absurd_write_length_closes(port):
    c = await RawClient.connect(port)
    await c.go("malloc0")
    await c.request(CMD_WRITE, 1, 0, 1 << 31, data=b"x" * 4096)
    assert await c.closed_by_server()
    await c.aclose()
    good = await RawClient.connect(port)
    await good.go("malloc0")
    await assert_still_serving(port, good, 2)
    await good.aclose()


@timeboxed(30)
async def test_pipelined_requests_and_disc(port, registry):
    c = await RawClient.connect(port)
    await c.go("malloc0")
    blob = os.urandom(64 * 4096)
    # 64 writes in one send, then 64 reads of the same blocks, then DISC: all must be answered.
    await c.send(
        b"".join(
            struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, h, h * 4096, 4096)
            + blob[h * 4096 : (h + 1) * 4096]
            for h in range(64)
        )
    )
    seen = set()
    for _ in range(64):
        err, h, _ = await c.simple_reply()
        assert err == 0
        seen.add(h)
    assert seen == set(range(64))
    await c.send(
        b"".join(
            struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 1000 + h, h * 4096, 4096)
            for h in range(64)
        )
        + struct.pack(">IHHQQI", 0x25609513, 0, CMD_FLUSH, 5000, 0, 0)
        + struct.pack(">IHHQQI", 0x25609513, 0, CMD_DISC, 5001, 0, 0)
    )
    for _ in range(65):
        magic, err, h = struct.unpack(">IIQ", await c.recv(16))
        assert (magic, err) == (SIMPLE_MAGIC, 0)
        if h == 5000:
            continue
        i = h - 1000
        assert await c.recv(4096) == blob[i * 4096 : (i + 1) * 4096]
    assert await c.closed_by_server()
    await c.aclose()
    assert await bdev_bytes(registry.get("malloc0"), 0, len(blob)) == blob


@timeboxed(30)
async def test_resize_is_seen_by_new_connections(port, registry):
    need("nbdinfo")
    bdev = registry.get("malloc1")
    old = await RawClient.connect(port)
    size, _ = await old.go("malloc1")
    assert size == 4 * MiB
    bdev.resize(2048)  # 8 MiB
    assert int(await run("nbdinfo", "--size", uri(port, "malloc1"))) == 8 * MiB
    c = await RawClient.connect(port)
    size, _ = await c.go("malloc1")
    assert size == 8 * MiB
    await c.request(CMD_WRITE, 1, 6 * MiB, 4, data=b"grow")
    assert await c.simple_reply() == (0, 1, b"")
    # The connection negotiated before the resize keeps its (old) size and still works.
    await old.request(CMD_READ, 2, 0, 4096)
    assert (await old.simple_reply(4096))[:2] == (0, 2)
    await old.request(CMD_READ, 3, 6 * MiB, 4)
    assert (await old.simple_reply())[:2] == (errno.EINVAL, 3)
    await old.aclose()
    await c.aclose()


@timeboxed(30)
async def test_removed_bdev_closes_its_connections(port, registry):
    victim = await RawClient.connect(port)
    await victim.go("malloc1")
    other = await RawClient.connect(port)
    await other.go("malloc0")
    await victim.request(CMD_READ, 1, 0, 512)
    assert (await victim.simple_reply(512))[:2] == (0, 1)
    await registry.unregister("malloc1")
    assert await victim.closed_by_server()
    await victim.aclose()
    await other.request(CMD_READ, 2, 0, 512)
    assert (await other.simple_reply(512))[:2] == (0, 2)
    c = await RawClient.connect(port)
    await c.option(OPT_INFO, struct.pack(">I", 7) + b"malloc1" + struct.pack(">H", 0))
    assert (await c.reply())[:2] == (OPT_INFO, REP_ERR_UNKNOWN)
    await c.aclose()
    await other.aclose()


@timeboxed(30)
async def test_cancelling_serve_nbd_closes_connections(registry):
    async with trio.open_nursery() as nursery:
        p = await nursery.start(serve_nbd, registry, "127.0.0.1", 0)
        active = await RawClient.connect(p)
        await active.go("malloc0")
        negotiating = await RawClient.connect(p)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert await active.closed_by_server()
    assert await negotiating.closed_by_server()
    await active.aclose()
    await negotiating.aclose()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", p)


class FlakyBdev(MallocBdev):
    """A MallocBdev whose blocks from `bad_lba` on fail every I/O with EIO."""

    bad_lba = 1024

    async def _submit_read(self, ctx, lba, nblocks, buf):
        if lba + nblocks > self.bad_lba:
            raise BdevError(errno.EIO, "medium error")
        await super()._submit_read(ctx, lba, nblocks, buf)

    async def _submit_write(self, ctx, lba, nblocks, data, fua):
        if lba + nblocks > self.bad_lba:
            raise BdevError(errno.EIO, "medium error")
        await super()._submit_write(ctx, lba, nblocks, data, fua)

    async def _submit_write_zeroes(self, ctx, lba, nblocks):
        if lba + nblocks > self.bad_lba:
            raise BdevError(errno.EIO, "medium error")
        await super()._submit_write_zeroes(ctx, lba, nblocks)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@timeboxed(30)
async def test_bdev_errors_become_nbd_errors(nursery, structured):
    reg = BdevRegistry(examine_modules=[])
    bdev = FlakyBdev("flaky0", 2048, 512)
    await reg.register(bdev)
    p = await nursery.start(serve_nbd, reg, "127.0.0.1", 0)
    c = await RawClient.connect(p)
    await c.go("flaky0", structured=structured)
    bad = FlakyBdev.bad_lba * 512

    async def expect(handle: int, err: int) -> None:
        if structured and err:
            flags, rtype, h, payload = await c.chunk()
            assert (flags, rtype, h) == (1, 0x8001, handle)
            e, mlen = struct.unpack_from(">IH", payload)
            assert e == err and b"medium error" in payload[6 : 6 + mlen]
        else:
            assert await c.simple_reply() == (err, handle, b"")

    await c.request(CMD_READ, 1, bad, 4096)
    await expect(1, errno.EIO)
    await c.request(CMD_WRITE, 2, bad, 512, data=b"x" * 512)
    await expect(2, errno.EIO)
    await c.request(CMD_WZ, 3, bad - 512, 1024, flags=0x3)  # FUA | NO_HOLE
    await expect(3, errno.EIO)
    # Good I/O on the same connection, including FUA trim/write-zeroes and zero lengths.
    await c.request(CMD_WRITE, 4, 0, 1024, data=b"y" * 1024)
    await expect(4, 0)
    await c.request(CMD_TRIM, 5, 0, 512, flags=1)
    await expect(5, 0)
    await c.request(CMD_WZ, 6, 512, 100, flags=1)
    await expect(6, 0)
    for h, cmd in ((7, CMD_WRITE), (8, CMD_TRIM), (9, CMD_WZ)):
        await c.request(cmd, h, 0, 0)
        await expect(h, 0)
    flushes = bdev.flushes
    await c.request(CMD_FLUSH, 10)
    await expect(10, 0)
    assert bdev.flushes > flushes
    assert await bdev_bytes(bdev, 0, 1024) == bytes(612) + b"y" * 412
    await c.aclose()


@timeboxed(30)
async def test_partitions_are_exported_by_name(nursery):
    need("nbdinfo", "qemu-io")
    reg = BdevRegistry()  # with the partition examine module
    await reg.register(MallocBdev("malloc0", 16 * MiB // 512, 512))
    p = await nursery.start(serve_nbd, reg, "127.0.0.1", 0)
    # Write an MBR with one partition (sectors 2048..10239) through NBD, then re-examine.
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 8192)
    mbr = bytes(446) + entry + bytes(48) + b"\x55\xaa"
    c = await RawClient.connect(p)
    await c.go("malloc0")
    await c.request(CMD_WRITE, 1, 0, 512, data=mbr)
    assert await c.simple_reply() == (0, 1, b"")
    await reg.reexamine("malloc0")
    assert [b.name for b in reg.bdevs()] == ["malloc0", "malloc0p1"]
    listing = json.loads(await run("nbdinfo", "--list", "--json", uri(p)))
    sizes = {e["export-name"]: e["export-size"] for e in listing["exports"]}
    assert sizes == {"malloc0": 16 * MiB, "malloc0p1": 4 * MiB}
    await run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1000 100", uri(p, "malloc0p1"))
    await c.request(CMD_READ, 2, 2048 * 512 + 1000, 100)
    assert await c.simple_reply(100) == (0, 2, b"\x5a" * 100)
    await c.aclose()


class CallbackBdev(MallocBdev):
    """Reads start without a waiting task (like NVMe's `read_blocks_nowait`) and complete from a
    background task; a read covering `fail_lba` completes with ok False the first time (the NBD
    server must redo it through a worker, which then reads it normally)."""

    fail_lba = 100

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.nowait = 0
        self.failed = 0
        self._send, self._recv = trio.open_memory_channel(1000)

    def _submit_read_nowait(self, ctx, lba, nblocks, buf, on_done) -> bool:
        ok = not (lba <= self.fail_lba < lba + nblocks) or self.failed
        if ok:
            bs = self.block_size
            buf[:] = self._mv[lba * bs:(lba + nblocks) * bs]
        else:
            self.failed += 1
        try:
            self._send.send_nowait((on_done, ok))
        except trio.WouldBlock:
            return False
        self.nowait += 1
        return True

    async def completer(self) -> None:
        async for on_done, ok in self._recv:
            on_done(None if ok else "injected failure")   # the hook's convention: err or None


class BufferRecordingBdev(CallbackBdev):
    """A CallbackBdev that records which buffer objects its nowait reads were given."""

    fail_lba = -1

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.buffers: set[int] = set()

    def _submit_read_nowait(self, ctx, lba, nblocks, buf, on_done) -> bool:
        self.buffers.add(id(buf.obj))
        return super()._submit_read_nowait(ctx, lba, nblocks, buf, on_done)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@timeboxed(30)
async def test_read_buffers_are_reused_and_every_reply_has_its_own_data(nursery, structured):
    # The server recycles a read's buffer once its reply is sent: later reads of other blocks
    # into it must never show earlier data, and each size has its own buffers.
    reg = BdevRegistry(examine_modules=[])
    bdev = BufferRecordingBdev("cb0", 4096, 512)
    bdev._buf[:] = os.urandom(len(bdev._buf))
    nursery.start_soon(bdev.completer)
    await reg.register(bdev)
    p = await nursery.start(serve_nbd, reg, "127.0.0.1", 0)
    c = await RawClient.connect(p)
    await c.go("cb0", structured=structured)
    image = bytes(bdev._buf)
    handle = 0
    for rnd in range(6):
        want = {}
        for i in range(40):
            handle += 1
            n = 8192 if i % 5 == 4 else 4096
            off = ((rnd * 40 + i) * 8192 * 7) % (len(image) - n) // 4096 * 4096
            want[handle] = (off, n)
            await c.request(CMD_READ, handle, off, n)
        for _ in range(len(want)):
            if structured:
                flags, rtype, h, payload = await c.chunk()
                assert rtype == 1 and flags & 1
                assert struct.unpack_from(">Q", payload)[0] == want[h][0]
                data = payload[8:]
            else:
                err, h, _ = await c.simple_reply()
                assert err == 0
                data = await c.recv(want[h][1])
            off, n = want.pop(h)
            assert data == image[off:off + n], (rnd, h)
    assert bdev.nowait == 240
    assert len(bdev.buffers) < 240 // 2       # reused, not one per read
    await c.aclose()


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@timeboxed(30)
async def test_reads_without_a_worker_and_their_retry(nursery, structured):
    reg = BdevRegistry(examine_modules=[])
    bdev = CallbackBdev("cb0", 2048, 512)
    bdev._buf[:] = bytes(i * 7 & 0xFF for i in range(len(bdev._buf)))
    nursery.start_soon(bdev.completer)
    await reg.register(bdev)
    p = await nursery.start(serve_nbd, reg, "127.0.0.1", 0)
    c = await RawClient.connect(p)
    await c.go("cb0", structured=structured)
    want = {h: (lba * 512, 1024) for h, lba in enumerate(range(96, 112, 2), 1)}   # h 3 fails once
    for h, (off, n) in want.items():
        await c.request(CMD_READ, h, off, n)
    await c.request(CMD_READ, 99, 3, 10)                    # unaligned: the worker path
    got = {}
    for _ in range(len(want) + 1):
        if structured:
            flags, rtype, h, payload = await c.chunk()
            assert rtype == 1 and flags & 1                   # one OFFSET_DATA chunk, DONE
            got[h] = payload[8:]
        else:
            # Replies come in any order: read the handle first, then the length it asked for.
            err, h, _ = await c.simple_reply()
            assert err == 0
            got[h] = await c.recv(want[h][1] if h in want else 10)
    image = bytes(bdev._buf)
    for h, (off, n) in want.items():
        assert got[h] == image[off:off + n], h
    assert got[99] == image[3:13]
    assert bdev.nowait == len(want) and bdev.failed == 1
    await c.aclose()


class BatchCallbackBdev(CallbackBdev):
    """A CallbackBdev whose completer runs what is queued as one batch of completion callbacks
    (bdev.CALLBACKS), as an NVMe queue's reader runs a receive's completions."""

    fail_lba = -1

    async def completer(self) -> None:
        while True:
            items = [await self._recv.receive()]
            while True:
                try:
                    items.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            CALLBACKS.begin()
            try:
                for on_done, ok in items:
                    on_done(None if ok else "injected failure")
                self.in_batch()
            finally:
                CALLBACKS.end()

    def in_batch(self) -> None:
        """Runs inside each batch, after its callbacks."""


def spy_batch_flushes(monkeypatch) -> list[tuple[int, int, bool]]:
    """Each batch-end flush of the server (`_Transmission._flush_now`): the replies it found
    queued, the bytes it sent itself, and whether some were left to the writer task."""
    from blockfs.nbd import server
    seen: list[tuple[int, int, bool]] = []
    orig = server._Transmission._flush_now

    def flush(self):
        queued, before = self._out_replies, self._out_bytes
        orig(self)
        seen.append((queued, before - self._out_bytes, bool(self._out)))
    monkeypatch.setattr(server._Transmission, "_flush_now", flush)
    return seen


async def batch_export(nursery, blocks: int, cls: type = BatchCallbackBdev) -> tuple[Any, int]:
    """A BatchCallbackBdev (or `cls`) of random bytes exported by a server: (bdev, port)."""
    reg = BdevRegistry(examine_modules=[])
    bdev = cls("cb0", blocks, 512)
    bdev._buf[:] = os.urandom(len(bdev._buf))
    nursery.start_soon(bdev.completer)
    await reg.register(bdev)
    return bdev, await nursery.start(serve_nbd, reg, "127.0.0.1", 0)


async def pipelined_reads(c: RawClient, image: bytes, want: dict, pause: float = 0) -> None:
    """Send every read of `want` ({handle: (offset, length)}) at once, optionally wait, then
    check each simple reply against `image`."""
    await trio.sleep(0.05)                  # the connection's writer task has parked
    await c.send(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, h, off, n)
                          for h, (off, n) in want.items()))
    await trio.sleep(pause)
    want = dict(want)
    while want:
        err, h, _ = await c.simple_reply()
        assert err == 0
        off, n = want.pop(h)
        assert await c.recv(n) == image[off:off + n], h


@timeboxed(30)
async def test_replies_of_a_batch_of_completions_go_out_at_its_end(nursery, monkeypatch):
    """Reads completed in one batch (bdev.CALLBACKS) are sent together when it ends, by the
    completing task itself (no writer wake-up); every reply has its own data."""
    flushes = spy_batch_flushes(monkeypatch)
    bdev, p = await batch_export(nursery, 4096)
    c = await RawClient.connect(p)
    await c.go("cb0")
    image = bytes(bdev._buf)
    await pipelined_reads(c, image, {h: (h * 4096 % (len(image) - 4096), 4096)
                                     for h in range(1, 65)})
    # Replies of one batch went out together, from the batch's end (the socket may take only
    # part of them at once: the writer task sends the rest).
    assert bdev.nowait == 64 and sum(q for q, _, _ in flushes) == 64, flushes
    assert max(q for q, _, _ in flushes) > 1 and any(sent for _, sent, _ in flushes), flushes
    await c.aclose()


@timeboxed(30)
async def test_a_batch_end_flush_the_socket_cannot_take_is_finished_by_the_writer(
        nursery, monkeypatch):
    """A client that does not read: the batch-end sendmsg takes part of the replies or none,
    and the writer task sends the rest once the client reads again; nothing is lost,
    reordered within a reply, or recycled before it went."""
    flushes = spy_batch_flushes(monkeypatch)
    bdev, p = await batch_export(nursery, 16384)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", p))
    c = RawClient(trio.SocketStream(sock))
    assert await c.recv(18) == b"NBDMAGICIHAVEOPT\x00\x03"
    await c.send(struct.pack(">I", 3))
    await c.go("cb0")
    n = 65536
    # 8 MiB of replies; the pause lets the server fill the socket and have to wait
    await pipelined_reads(c, bytes(bdev._buf), {h: ((h * 3 % 128) * n, n) for h in range(1, 129)},
                          pause=0.3)
    assert any(left for _, _, left in flushes), flushes      # the writer finished some
    await c.aclose()


class EagerClientBdev(BatchCallbackBdev):
    """A BatchCallbackBdev whose batch, before it ends, writes `next_requests` into the client's
    socket: as fio on the same core sends its next reads while the server writes replies,
    with no scheduler pass in between."""

    next_requests: list[bytes] = []
    client_fd = -1

    def in_batch(self) -> None:
        if self.next_requests:
            os.write(self.client_fd, self.next_requests.pop(0))


@timeboxed(30)
async def test_plain_reads_sent_during_a_batch_are_taken_at_its_end(nursery, monkeypatch):
    """Plain reads that reach the socket while a batch of replies is written are read and
    started right after it by the completing task (`_Transmission._take_now`, the reader task
    still waiting); the write behind them stays in the socket for the reader, and every
    request is answered with the right data."""
    from blockfs.nbd import server
    taken: list[int] = []
    orig = server._Transmission._take_now

    def take(self):
        before = self.taken_now
        orig(self)
        taken.append(self.taken_now - before)
    monkeypatch.setattr(server._Transmission, "_take_now", take)
    bdev, p = await batch_export(nursery, 4096, EagerClientBdev)
    c = await RawClient.connect(p)
    await c.go("cb0")
    bdev.client_fd = c.stream.socket.fileno()

    def reads(handles):
        return b"".join(struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, h, h * 4096, 4096)
                        for h in handles)
    write = struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, 100, 512 * 4000, 512) + b"\x77" * 512
    bdev.next_requests = [reads(range(9, 17)) + write + reads(range(17, 21))]
    image = bytes(bdev._buf)
    await trio.sleep(0.05)                  # the connection's writer task has parked
    await c.send(reads(range(1, 9)))
    got = {}
    for _ in range(8 + 8 + 1 + 4):
        err, h, _ = await c.simple_reply()
        assert err == 0
        got[h] = await c.recv(4096) if h != 100 else b""
    for h in range(1, 21):
        assert got[h] == image[h * 4096:(h + 1) * 4096], h
    assert 100 in got and bytes(bdev._buf[512 * 4000:512 * 4001]) == b"\x77" * 512
    assert 8 in taken, taken                  # the 8 reads before the write, at the batch's end
    await c.aclose()


@timeboxed(20)
async def test_requests_arriving_end_a_polling_stretch(port):
    """Busy time (initiator._util.IdleMeter): requests that the connection's reader receives
    are work, so an open polling stretch of the NVMe readers ends there."""
    from time import perf_counter

    from initiator.transport import POLL_IDLE
    c = await RawClient.connect(port)
    await c.go("malloc0")
    saved = (POLL_IDLE.since, POLL_IDLE.total)
    try:
        POLL_IDLE.since, POLL_IDLE.total = perf_counter() - 0.010, 0.0
        await c.request(CMD_READ, 7, 0, 512)
        assert await c.simple_reply(512) == (0, 7, bytes(512))
        assert POLL_IDLE.since == 0.0 and POLL_IDLE.total > 0.009
    finally:
        POLL_IDLE.since, POLL_IDLE.total = saved
        await c.aclose()


# ----------------------------------------------------------------------------- unix socket


def unix_uri(path: str, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={path}"


@timeboxed(60)
async def test_unix_socket_serves_real_clients(nursery, registry, tmp_path):
    # As `qemu-nbd -k PATH` / `nbdkit -U PATH`: the same exports on a unix stream socket.
    need("nbdinfo", "nbdcopy", "qemu-img", "qemu-io")
    path = str(tmp_path / "nbd.sock")
    assert await nursery.start(serve_nbd_unix, registry, path) == path
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    listing = json.loads(await run("nbdinfo", "--list", "--json", unix_uri(path)))
    assert [e["export-name"] for e in listing["exports"]] == ["malloc0", "malloc1"]
    assert listing["exports"][0]["export-size"] == registry.get("malloc0").size
    src, back = tmp_path / "in.img", tmp_path / "out.img"
    data = os.urandom(16 * MiB)
    src.write_bytes(data)
    await run("nbdcopy", "--connections=4", str(src), unix_uri(path, "malloc0"))
    assert await bdev_bytes(registry.get("malloc0")) == data
    await run("nbdcopy", unix_uri(path, "malloc0"), str(back))
    assert back.read_bytes() == data
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src),
              unix_uri(path, "malloc0"))
    out = await run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4000 5000",
                    "-c", "read -P 0x5a 4000 5000", unix_uri(path, "malloc1"))
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out


@timeboxed(30)
async def test_unix_socket_is_removed_on_exit_and_stale_one_replaced(registry, tmp_path):
    path = str(tmp_path / "nbd.sock")
    # A socket left behind by a server that is gone (bound, never listened on, closed).
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_nbd_unix, registry, path)
        c = await RawClient.connect_unix(path)
        assert (await c.go("malloc0"))[0] == registry.get("malloc0").size
        await c.request(CMD_READ, 7, 4096, 4096)
        assert await c.simple_reply(4096) == (0, 7, await bdev_bytes(registry.get("malloc0"),
                                                                     4096, 4096))
        await c.aclose()
        nursery.cancel_scope.cancel()
    assert not os.path.exists(path)


@timeboxed(30)
async def test_unix_socket_in_use_or_not_a_socket_is_refused(nursery, registry, tmp_path):
    path = str(tmp_path / "nbd.sock")
    await nursery.start(serve_nbd_unix, registry, path)
    with pytest.raises(NbdAddressError, match="in use"):
        await serve_nbd_unix(registry, path)
    assert stat.S_ISSOCK(os.stat(path).st_mode)   # the live server's socket is left alone
    c = await RawClient.connect_unix(path)
    assert (await c.go("malloc1"))[0] == registry.get("malloc1").size
    await c.aclose()
    plain = tmp_path / "plain"
    plain.write_bytes(b"keep me")
    with pytest.raises(NbdAddressError, match="not a socket"):
        await serve_nbd_unix(registry, str(plain))
    assert plain.read_bytes() == b"keep me"
    with pytest.raises(NbdAddressError, match="cannot listen"):
        await serve_nbd_unix(registry, str(plain / "s"))      # under a file: not a directory
    # A missing directory is made, as for the control socket.
    deep = str(tmp_path / "run" / "blockfs" / "nbd.sock")
    assert await nursery.start(serve_nbd_unix, registry, deep) == deep
    c = await RawClient.connect_unix(deep)
    await c.aclose()


async def test_read_buffer_pool_is_bounded_in_bytes():
    # Reads may be up to 32 MiB each: the pool of a connection keeps at most POOL_BYTES.
    from blockfs.nbd import server as nbd_server
    reg = await make_registry()
    bdev = reg.get("malloc0")
    a, b = trio.socket.socketpair()
    stream = trio.SocketStream(a)
    t = nbd_server._Transmission(stream, bdev, nbd_server.NbdServer(reg).export_info(bdev))
    try:
        for _ in range(20):
            t._recycle(memoryview(bytearray(1 << 20)))
        for _ in range(100):
            t._recycle(memoryview(bytearray(4096)))
        held = sum(v.nbytes for bufs in t._pool.values() for v in bufs)
        assert held == t._pooled <= nbd_server.POOL_BYTES
        assert len(t._pool[1 << 20]) == nbd_server.POOL_BYTES >> 20
    finally:
        t.close()
        await stream.aclose()
        b.close()
