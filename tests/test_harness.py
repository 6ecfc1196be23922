"""The test harness itself works: the kernel target boots, answers NVMe/TCP,
and its control channel and fault switches do what the fixtures promise."""

import os
import socket
import struct

import pytest
import trio

from kernel_target import HOST, start_kernel_target

MiB = 1 << 20

# NVMe/TCP ICReq, built by hand: common header (type 0, flags 0, hlen 128,
# pdo 0, plen 128), then PFV u16 0, HPDA u8 0, DGST u8 0, MAXR2T u32 0, and
# 112 reserved bytes.
ICREQ = struct.pack("<BBBBIHBBI", 0, 0, 128, 0, 128, 0, 0, 0, 0) + bytes(112)
_CH = struct.Struct("<BBBBI")       # pdu type, flags, hlen, pdo, plen
_ICRESP = struct.Struct("<HBBI")    # pfv, cpda, dgst, maxh2cdata


def test_icreq_bytes():
    assert len(ICREQ) == 128
    assert ICREQ[:16] == bytes.fromhex("00 00 80 00 80 00 00 00 00 00 00 00 00 00 00 00")


def check_icresp(resp: bytes) -> None:
    assert len(resp) == 128
    pdu_type, flags, hlen, pdo, plen = _CH.unpack_from(resp)
    assert (pdu_type, hlen, pdo, plen) == (1, 128, 0, 128)
    pfv, cpda, dgst, maxh2cdata = _ICRESP.unpack_from(resp, 8)
    assert pfv == 0
    assert dgst == 0                                # we asked for no digests
    assert maxh2cdata >= 4096 and maxh2cdata % 4 == 0   # NVMe/TCP 3.6.2.3


async def exchange_icreq(host: str, port: int) -> tuple[trio.SocketStream, bytes]:
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(ICREQ)
    buf = bytearray()
    while len(buf) < 128:
        chunk = await stream.receive_some(128 - len(buf))
        assert chunk, "EOF after %d bytes of the ICResp" % len(buf)
        buf += chunk
    return stream, bytes(buf)


def icreq_sync(host: str, port: int, timeout: float) -> bytes | None:
    """The ICResp, or None if the connection is refused, reset, closed or silent."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(ICREQ)
            buf = b""
            while len(buf) < 128:
                chunk = s.recv(128 - len(buf))
                if not chunk:
                    return None
                buf += chunk
            return buf
    except OSError:     # ECONNREFUSED, ECONNRESET, timeout
        return None


async def test_icreq_icresp(kernel_target):
    assert kernel_target.host == HOST == "127.0.0.1"
    with trio.fail_after(30):
        stream, resp = await exchange_icreq(kernel_target.host, kernel_target.port)
        await stream.aclose()
    check_icresp(resp)


def test_ctl(kernel_target):
    assert kernel_target.ctl("echo hi") == (0, "hi\n", "")
    assert kernel_target.ctl("echo oops >&2; exit 3") == (3, "", "oops\n")


def test_status(kernel_target):
    st = kernel_target.status()
    assert st["running"] and st["icresp"]
    assert (st["port"], st["ctl_port"], st["nqn"]) == (
        kernel_target.port, kernel_target.ctl_port, kernel_target.nqn)
    guest = st["guest"]
    assert guest["port_linked"] is True
    assert guest["namespaces"][1]["size"] == 64 * MiB
    assert guest["namespaces"][1]["path"] == "/srv/ns1.img"
    assert guest["namespaces"][2]["size"] == 32 * MiB
    assert guest["namespaces"][2]["path"].startswith("/dev/loop")    # 512-byte LBAs
    assert [(n["nsid"], n["block_size"]) for n in kernel_target.namespaces] == [(1, 4096), (2, 512)]


def test_resize_and_namespaces(make_kernel_target):
    kt = make_kernel_target(ns=("16M", "8M:512"))
    kt.resize(1, "32M")
    assert kt.sh("stat -c %s /srv/ns1.img") == "%d\n" % (32 * MiB)
    kt.resize(2, 12 * MiB)
    assert kt.sh("blockdev --getsize64 $(cat /srv/ns2.loop)") == "%d\n" % (12 * MiB)
    assert [n["bytes"] for n in kt.namespaces] == [32 * MiB, 12 * MiB]

    kt.add_ns(3, "4M", block_size=512)
    assert kt.status()["guest"]["namespaces"][3]["size"] == 4 * MiB
    kt.remove_ns(3)
    assert sorted(kt.status()["guest"]["namespaces"]) == [1, 2]
    assert [n["nsid"] for n in kt.namespaces] == [1, 2]


@pytest.mark.ktarget
async def test_faults_connections_and_stop():
    with start_kernel_target(ns=("8M",)) as kt:
        # "no controller left behind": the VM sees our connection, then not.
        with trio.fail_after(30):
            stream, resp = await exchange_icreq(kt.host, kt.port)
            check_icresp(resp)
            assert await trio.to_thread.run_sync(kt.connections) == 1
            await stream.aclose()
        assert await trio.to_thread.run_sync(kt.wait_connections, 0) == 0

        # Port outage: connect() still succeeds (slirp), then reset or EOF.
        kt.kill_port()
        assert kt.status()["guest"]["port_linked"] is False
        assert icreq_sync(kt.host, kt.port, timeout=5) is None
        kt.restore_port()
        check_icresp(icreq_sync(kt.host, kt.port, timeout=10))

        # Silent partition: no answer at all; the ctl channel keeps working.
        kt.link_down()
        assert icreq_sync(kt.host, kt.port, timeout=2) is None
        assert kt.ctl("echo still here")[1] == "still here\n"
        kt.link_up()
        check_icresp(icreq_sync(kt.host, kt.port, timeout=10))
        state_dir = kt.state_dir
    assert not kt.alive()
    assert not os.path.exists(state_dir) or os.environ.get("KTARGET_KEEP_STATE")
    assert icreq_sync(kt.host, kt.port, timeout=2) is None      # ECONNREFUSED
