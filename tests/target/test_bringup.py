"""ICReq/ICResp, Connect, property bring-up, Identify, features, discovery."""

import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
import trio

from initiator import _structs as st
from initiator._pdu import build_icreq, parse_ic
from initiator._spec import (
    AdminOpcode, CC_EN, CC_IOCQES, CC_IOSQES, CC_SHN_NORMAL, CSTS_CFS, CSTS_RDY,
    CSTS_SHST_COMPLETE, DISCOVERY_NQN, FeatureId, LogPage, Property,
)
from initiator._pdu import sqe
from helpers.tcp import congestion_of, other_congestion_control
from rawclient import HOSTNQN, NQN, RawClient, io_client

pytestmark = pytest.mark.trio
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def test_icresp_fields(target):
    with trio.fail_after(5):
        c = await RawClient.open(target.port)
        await c.send(build_icreq())
        t, f, h, d, ok = await c.recv_pdu()
        assert t == 1 and len(h) == 128 and h[2] == 128 and struct.unpack_from("<I", h, 4)[0] == 128
        pfv, cpda, hd, dd, maxh2c = parse_ic(h)
        assert (pfv, cpda, hd, dd) == (0, 0, False, False)
        assert maxh2c >= 4096 and maxh2c % 4 == 0
        await c.aclose()


@pytest.mark.parametrize("hd,dd", [(True, False), (False, True), (True, True)])
async def test_icresp_echoes_digests(target, hd, dd):
    with trio.fail_after(5):
        c = await RawClient.open(target.port)
        _pfv, _cpda, rhd, rdd, _m = await c.icreq(hd, dd)
        assert (rhd, rdd) == (hd, dd)
        r = await c.connect(NQN)
        assert r.status == 0
        await c.enable()
        r = await c.identify(1)
        assert r.status == 0 and st.IdentifyController.from_bytes(r.data).subnqn == NQN
        await c.aclose()


async def test_bring_up_registers(target):
    with trio.fail_after(5):
        c = await RawClient.open(target.port)
        await c.icreq()
        # Before Connect, anything else is a command sequence error.
        r = await c.admin(AdminOpcode.IDENTIFY, 0, 1, data_len=4096)
        assert (r.sct, r.sc) == (0, 0x0C)
        r = await c.connect(NQN, kato=5000)
        assert r.status == 0 and r.dw0 & 0xFFFF == c.cntlid != 0xFFFF
        assert r.sqhd == 1 and r.sqid == 0      # SQ flow control on: SQHD advances
        cap = await c.prop_get(Property.CAP, size8=True)
        capv = cap.dw0 | cap.dw1 << 32
        assert capv & 0xFFFF == 127 and capv >> 37 & 1 and capv >> 16 & 1
        vs = await c.prop_get(Property.VS)
        assert vs.dw0 >= 0x00010300
        # Admin commands before CC.EN: sequence error.
        r = await c.identify(1)
        assert (r.sct, r.sc) == (0, 0x0C)
        assert (await c.prop_get(Property.CSTS)).dw0 & CSTS_RDY == 0
        await c.enable()
        r = await c.identify(1)
        assert r.status == 0
        ic = st.IdentifyController.from_bytes(r.data)
        assert ic.cntlid == c.cntlid and ic.subnqn == NQN and ic.cntrltype == st.CNTRLTYPE_IO
        assert ic.kas >= 1 and ic.mdts == 8 and ic.ioccsz * 16 - 64 == 16384
        assert ic.oaes & st.OAES_NS_ATTR and ic.sgls & 1 and ic.aerl == 3 and ic.nn == 1024
        assert ic.oncs & st.ONCS_DSM and ic.oncs & st.ONCS_WRITE_ZEROES and ic.vwc & 1
        # KATO via Get Features
        r = await c.get_features(FeatureId.KEEP_ALIVE_TIMER)
        assert r.dw0 == 5000
        # Shutdown
        r = await c.prop_set(Property.CC, CC_EN | CC_IOSQES | CC_IOCQES | CC_SHN_NORMAL)
        assert r.status == 0
        csts = (await c.prop_get(Property.CSTS)).dw0
        assert csts & 0xC == CSTS_SHST_COMPLETE
        # Read-only registers cannot be written.
        r = await c.prop_set(Property.CSTS, 0)
        assert (r.sct, r.sc) == (0, 0x02)
        await c.aclose()


async def test_bad_cc_sets_cfs(target):
    with trio.fail_after(5):
        c = await RawClient.open(target.port)
        await c.icreq()
        assert (await c.connect(NQN)).status == 0
        r = await c.prop_set(Property.CC, CC_EN | (7 << 16) | CC_IOCQES)   # IOSQES 7: invalid
        assert r.status == 0
        csts = (await c.prop_get(Property.CSTS)).dw0
        assert csts & CSTS_CFS and not csts & CSTS_RDY
        await c.aclose()


async def test_identify_namespaces(target):
    with trio.fail_after(5):
        c = await RawClient.open(target.port)
        await c.bring_up(NQN)
        r = await c.identify(2)
        assert st.parse_ns_list(r.data) == [1, 2]
        assert st.parse_ns_list((await c.identify(2, 1)).data) == [2]
        ns1 = st.IdentifyNamespace.from_bytes((await c.identify(0, 1)).data)
        assert ns1.nsze == 16 * 2048 and ns1.block_size == 512 and ns1.dlfeat & 7 == 1
        ns2 = st.IdentifyNamespace.from_bytes((await c.identify(0, 2)).data)
        assert ns2.nsze == 2048 and ns2.block_size == 4096
        assert ns1.nguid != ns2.nguid and ns1.nguid != bytes(16)
        d = st.parse_ns_descriptors((await c.identify(3, 1)).data)
        assert d[st.NIDT_NGUID] == ns1.nguid and d[st.NIDT_EUI64] == ns1.eui64
        assert len(d[st.NIDT_UUID]) == 16 and d[st.NIDT_CSI] == b"\0"
        # Inactive NSID in range: all zeroes; NSID 0: invalid namespace.
        assert not st.IdentifyNamespace.from_bytes((await c.identify(0, 7)).data).active
        r = await c.identify(0, 0)
        assert (r.sct, r.sc, r.dnr) == (0, 0x0B, True)
        r = await c.identify(3, 9)
        assert (r.sct, r.sc) == (0, 0x0B)
        r = await c.identify(0x42)
        assert (r.sct, r.sc) == (0, 0x02)
        await c.aclose()


async def test_features_and_logs(target):
    with trio.fail_after(5):
        c = await RawClient.open(target.port)
        await c.bring_up(NQN)
        r = await c.set_features(FeatureId.NUMBER_OF_QUEUES, (3 << 16) | 3)
        assert r.status == 0 and r.dw0 == (7 << 16) | 7
        r = await c.set_features(FeatureId.NUMBER_OF_QUEUES, 0xFFFF)
        assert (r.sct, r.sc) == (0, 0x02)
        r = await c.set_features(FeatureId.ASYNC_EVENT_CONFIG, 0x100)
        assert r.status == 0
        assert (await c.get_features(FeatureId.ASYNC_EVENT_CONFIG)).dw0 == 0x100
        r = await c.set_features(FeatureId.KEEP_ALIVE_TIMER, 1234)
        assert r.status == 0 and (await c.get_features(FeatureId.KEEP_ALIVE_TIMER)).dw0 == 1300
        r = await c.get_features(FeatureId.HOST_IDENTIFIER, data_len=16)
        assert r.status == 0 and len(r.data) == 16
        r = await c.set_features(0x55, 0)
        assert (r.sct, r.sc) == (0, 0x02)
        smart = await c.get_log_page(LogPage.SMART, 512)
        assert smart.status == 0 and st.SmartLog.from_bytes(smart.data).available_spare == 100
        err = await c.get_log_page(LogPage.ERROR, 64 * 4)
        errs = st.parse_error_log(err.data)
        assert errs and errs[0].status >> 1 & 0xFF == 0x02     # the bad Set Features above
        r = await c.get_log_page(0x33, 512)
        assert (r.sct, r.sc) == (1, 0x09)
        r = await c.admin(0xEE)
        assert (r.sct, r.sc, r.dnr) == (0, 0x01, True)
        await c.aclose()


async def test_io_queue_connect_rules(target):
    with trio.fail_after(5):
        a = await RawClient.open(target.port)
        await a.bring_up(NQN)
        await a.set_features(FeatureId.NUMBER_OF_QUEUES, (1 << 16) | 1)
        io = await io_client(target.port, NQN, a.cntlid, 1)
        # duplicate QID, QID beyond the granted queues, unknown CNTLID, other host NQN
        for kw, ipo in ((dict(qid=1, cntlid=a.cntlid), 42), (dict(qid=9, cntlid=a.cntlid), 42),
                        (dict(qid=2, cntlid=999), 16),
                        (dict(qid=2, cntlid=a.cntlid, hostnqn="nqn.other"), 512),
                        (dict(qid=2, cntlid=a.cntlid,
                              hostid="99999999-2222-3333-4444-555555555555"), 0)):
            c = await RawClient.open(target.port)
            await c.icreq()
            r = await c.connect(NQN, **kw)
            assert (r.sct, r.sc) == (1, 0x82), kw
            assert r.dw0 >> 16 == ipo, (kw, r)
            await c.aclose()
        # unknown subsystem; bad recfmt
        c = await RawClient.open(target.port)
        await c.icreq()
        r = await c.connect("nqn.nope")
        assert (r.sct, r.sc, r.dw0) == (1, 0x82, 1 | 256 << 16)
        from initiator import _fabrics as fab
        cmd = fab.connect_sqe(0, 31, 0)
        struct.pack_into("<H", cmd, 40, 1)
        r = await c.submit(cmd, fab.connect_data(
            "11111111-2222-3333-4444-555555555555", 0xFFFF, NQN, HOSTNQN))
        assert (r.sct, r.sc) == (1, 0x80)
        await c.aclose()
        await io.aclose()
        await a.aclose()


async def test_allow_host(make_target):
    t = await make_target(allow_hosts=["nqn.allowed"])
    with trio.fail_after(5):
        c = await RawClient.open(t.port)
        await c.icreq()
        r = await c.connect(NQN)
        assert (r.sct, r.sc, r.dw0) == (1, 0x84, 1 | 512 << 16)
        r = await c.connect(NQN, hostnqn="nqn.allowed")
        assert r.status == 0
        await c.aclose()


async def test_connect_data_via_r2t(target):
    with trio.fail_after(5):
        c = await RawClient.open(target.port)
        await c.icreq()
        r = await c.connect(NQN, in_capsule=False)
        assert r.status == 0 and c.r2ts and c.r2ts[0][3] == 1024


async def test_disconnect(target):
    from initiator import _fabrics as fab
    with trio.fail_after(5):
        c = await RawClient.open(target.port)
        await c.bring_up(NQN)
        r = await c.submit(fab.disconnect_sqe())
        assert r.status == 0
        assert await c.expect_eof()


async def test_discovery(make_target):
    from target import SubsystemConfig
    t = await make_target(subsystems=[
        SubsystemConfig(nqn=NQN, namespaces=["ram:1M"]),
        SubsystemConfig(nqn="nqn.private", namespaces=["null:1M"], allow_hosts=["nqn.x"])])
    with trio.fail_after(5):
        c = await RawClient.open(t.port)
        await c.icreq()
        r = await c.connect(DISCOVERY_NQN)   # KATO 0: the discovery default applies
        assert r.status == 0
        await c.enable()
        ic = st.IdentifyController.from_bytes((await c.identify(1)).data)
        assert ic.cntrltype == st.CNTRLTYPE_DISCOVERY and ic.subnqn == DISCOVERY_NQN
        assert ic.oaes & st.OAES_DISCOVERY_LOG_CHANGE
        hdr = st.DiscoveryLogHeader.from_bytes((await c.get_log_page(0x70, 1024)).data)
        assert hdr.numrec == 2                   # current discovery + NQN (private is hidden)
        full = (await c.get_log_page(0x70, 1024 * (1 + hdr.numrec))).data
        h2, ents = st.parse_discovery_log(full)
        assert h2.genctr == hdr.genctr
        assert [e.subtype for e in ents] == [st.SUBTYPE_CURRENT_DISCOVERY, st.SUBTYPE_NVME]
        e = ents[1]
        assert (e.subnqn, e.traddr, e.trsvcid, e.trtype, e.adrfam) == (
            NQN, "127.0.0.1", str(t.port), st.TRTYPE_TCP, st.ADRFAM_IPV4)
        # Offset read of the second entry alone.
        one = (await c.get_log_page(0x70, 1024, offset=2048)).data
        assert st.DiscoveryLogEntry.from_bytes(one) == e
        # A change bumps GENCTR and completes a held AER with a discovery notice.
        cid = await c.send_cmd(sqe(AdminOpcode.ASYNC_EVENT_REQUEST))
        from target.control import acall
        await acall(t.control_path, "add_subsystem", nqn="nqn.new", namespaces=["null:1M"])
        aen = await c.wait(cid)
        assert st.parse_aen_dw0(aen.dw0) == (2, 0xF0, 0x70)
        h3 = st.DiscoveryLogHeader.from_bytes((await c.get_log_page(0x70, 1024)).data)
        assert h3.genctr > hdr.genctr and h3.numrec == 3
        # I/O queues on a discovery controller are refused.
        d = await RawClient.open(t.port)
        await d.icreq()
        r = await d.connect(DISCOVERY_NQN, 1, cntlid=c.cntlid)
        assert (r.sct, r.sc) == (1, 0x82)
        await d.aclose()
        await c.aclose()


async def test_tcp_congestion_applies_to_every_connection(make_target):
    algo = other_congestion_control()
    server = await make_target(tcp_congestion=algo)
    with trio.fail_after(5):
        c = await RawClient.open(server.port)
        await c.icreq()
        conn, = server.conns
        assert congestion_of(conn.sock) == algo
        await c.aclose()


async def test_unknown_tcp_congestion_is_a_clear_error(make_target):
    with pytest.raises(ValueError, match="'no-such-cc' is not available"):
        await make_target(tcp_congestion="no-such-cc")


@pytest.mark.parametrize("extra", [[], ["--tcp-congestion", "no-such-cc"]], ids=["port-in-use", "bad-cc"])
async def test_cli_start_up_errors_are_one_line(extra):
    """Errors raised inside trio's nursery were printed as an ExceptionGroup traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        listen = f"127.0.0.1:{port}" if not extra else "127.0.0.1:0"
        r = subprocess.run([sys.executable, "-m", "target", "--listen", listen, *extra],
                           capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert ("Address already in use" in r.stderr and str(port) in r.stderr) if not extra \
        else "'no-such-cc' is not available" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_cli_removes_its_control_socket_on_signal(tmp_path, sig):
    """The control socket was left behind on SIGTERM: the cancelled `aclose()` raised before
    the unlink that followed it; and a signal during the cleanup killed it half-way."""
    await trio.to_thread.run_sync(_start_and_signal, tmp_path / "ctl.sock", sig)


def _start_and_signal(ctl, sig) -> None:
    p = subprocess.Popen([sys.executable, "-m", "target", "--listen", "127.0.0.1:0",
                          "--ns", "null:1M", "--control", str(ctl)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        for line in p.stdout:
            if line.startswith("control "):
                break
        assert ctl.is_socket()
        # A burst, so that some land while it cleans up: the receiver's re-delivery of those,
        # or one after it closed, met the default action half-way.
        for _ in range(20000):
            if p.poll() is not None:
                break
            p.send_signal(sig)
            time.sleep(0.0001)
        # 0, or the signal itself when one came after the cleanup, as the process exited
        assert p.wait(timeout=30) in (0, -sig), p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not ctl.exists()


async def test_cli_refuses_a_control_socket_in_use(tmp_path):
    """A second target on the same --control path unlinked the first one's live socket."""
    ctl = tmp_path / "ctl.sock"
    first = socket.socket(socket.AF_UNIX)
    first.bind(str(ctl))
    first.listen(1)
    try:
        r = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "target", "--listen", "127.0.0.1:0", "--ns", "null:1M",
             "--control", str(ctl)], capture_output=True, text=True, timeout=30, cwd=REPO))
        assert r.returncode == 1
        assert r.stderr == f"blockfs target: control socket {ctl} is in use by another process\n"
        assert ctl.is_socket()
    finally:
        first.close()
