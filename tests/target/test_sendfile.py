"""Large null reads go out with sendfile from a zero memfd: the byte stream is the same as the
copying path's, also when the socket takes only part of it at a time."""

import logging
import socket
import struct
import types

import pytest
import trio

from target.backends import FileRange, zero_file
from target.server import Connection

from .test_queue_core import _cap, _io_queue, _target, sqe


def _conn(q, sock):
    """The parts of a Connection that `flush` uses, around a real socket."""
    c = types.SimpleNamespace(q=q, sock=sock, silent=False, _blocked=False,
                              _need_write=trio.Event())
    c._flush_files = lambda out: Connection._flush_files(c, out)
    return c


def test_file_range_reads_zeros():
    fd = zero_file(1 << 20)
    assert bytes(FileRange(fd, 4096, 100)) == bytes(100)
    assert len(FileRange(fd, 0, 12345)) == 12345


def test_large_null_reads_stream_through_a_small_socket_buffer():
    q = _io_queue(_target("null:64M:512", sendfile_min=64 << 10))
    sizes = [4096, 256 << 10, 512, 1 << 20, 128 << 10, 4096]
    q.rx.receive_data(b"".join(_cap(sqe(0x02, cid, 1, cid * 4096, 0, n // 512 - 1, data_len=n))
                               for cid, n in enumerate(sizes, 1)))
    q.process()
    assert q.files == 3 and sum(type(b) is FileRange for b in q.out) == 3
    expected = b"".join(bytes(b) for b in q.out)

    s1, s2 = socket.socketpair()
    s1.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    s1.setblocking(False)
    stub = _conn(q, s1)
    got = bytearray()
    rounds = 0
    while q.out or len(got) < len(expected):
        stub._blocked = False
        Connection.flush(stub)
        rounds += 1
        s2.settimeout(0.5)
        try:
            got += s2.recv(1 << 20)
        except socket.timeout:
            pass
        assert rounds < 10000
    assert rounds > 10                          # the socket really took it piecemeal
    assert bytes(got) == expected and q.files == 0
    # Each C2HData header announces its length and is followed by that many zero bytes.
    i = 0
    for n in sizes:
        assert struct.unpack_from("<BBBBI", got, i)[4] == 24 + n
        assert got[i + 24:i + 24 + n] == bytes(n)
        i += 24 + n
    s1.close()
    s2.close()


def test_flush_mixes_buffers_and_file_ranges_in_order(tmp_path):
    """Partial sends resume at the right offset of a range and of a buffer."""
    import os
    import random
    data = random.Random(7).randbytes(3 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    q = types.SimpleNamespace(out=[], files=0, views=False, materialize=lambda: None)
    q.out = [b"head", FileRange(fd, 1000, 700_000), memoryview(b"x" * 5000),
             FileRange(fd, 2_000_000, 900_000), b"tail"]
    q.files = 2
    expected = b"head" + data[1000:701_000] + b"x" * 5000 + data[2_000_000:2_900_000] + b"tail"
    s1, s2 = socket.socketpair()
    s1.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    s1.setblocking(False)
    c = _conn(q, s1)
    got = bytearray()
    while len(got) < len(expected):
        c._blocked = False
        Connection.flush(c)
        s2.settimeout(0.5)
        got += s2.recv(1 << 20)
    assert bytes(got) == expected and not q.out and q.files == 0
    os.close(fd)
    s1.close()
    s2.close()


def _offered(algo: str) -> bool:
    with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
        return algo in f.read().split()


@pytest.mark.trio
@pytest.mark.skipif(not _offered("bbr"), reason="this kernel offers no BBR")
@pytest.mark.parametrize("algo, warned", [("bbr", True), ("cubic", False)])
async def test_sendfile_with_bbr_warns_at_start_up(make_target, caplog, algo, warned):
    """With BBR the kernel paces each send and sendfile costs the target 72 us per 128 KiB read
    against 29 copying (docs/target.md): say so."""
    caplog.set_level(logging.WARNING, logger="blockfs.target")
    await make_target(sendfile_min=65536, tcp_congestion=algo)
    assert any("sendfile" in r.getMessage() and "BBR" in r.getMessage()
               for r in caplog.records) is warned
