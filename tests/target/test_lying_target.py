"""blockfs's initiator against an embedded target whose Identify data (or CAP) lies or is unusual:
what the initiator takes from the target on trust must end in a clear error or a namespace left
out, never a crash, a wrong size or mis-sized I/O.

The target's model is patched per test (monkeypatch on `target._subsystem.Namespace.identify`,
`target._controller.Controller.identify_controller`, ...); the in-process target of conftest.py
serves it."""

import logging
import struct

import pytest
import trio

from initiator import _structs as st
from initiator.controller import ControllerOptions, open_controller
from initiator.session import ReconnectPolicy, Session, ns_unusable
from rawclient import NQN
import target._controller as tctl
import target._subsystem as tsub

pytestmark = pytest.mark.trio

LBAF0 = st.IdentifyNamespace.LBAF_OFFSET


def opts(**kw) -> ControllerOptions:
    kw.setdefault("keep_alive_tmo", 2)
    kw.setdefault("connect_timeout", 2.0)
    return ControllerOptions(**kw)


def patch_ns(monkeypatch, nsid: int, edit) -> None:
    """Namespace `nsid` identifies as `edit(bytearray)` makes it; the others are untouched."""
    orig = tsub.Namespace.identify

    def identify(self):
        b = bytearray(orig(self))
        if self.nsid == nsid:
            edit(b)
        return bytes(b)
    monkeypatch.setattr(tsub.Namespace, "identify", identify)


def lbads(v):
    def edit(b):
        b[LBAF0 + 2] = v
    return edit


def ms(v, extended=True):
    def edit(b):
        struct.pack_into("<H", b, LBAF0, v)
        if extended:
            b[26] |= 0x10          # FLBAS bit 4: metadata at the end of each LBA
    return edit


def flbas(v):
    def edit(b):
        b[26] = v
    return edit


def nsze(v):
    def edit(b):
        struct.pack_into("<QQ", b, 0, v, v)
    return edit


# -- Identify Namespace geometry ----------------------------------------------------------------

BAD_GEOMETRY = {
    "lbads 0": (lbads(0), "LBADS 0"),
    "lbads 8": (lbads(8), "LBADS 8"),
    "lbads 20": (lbads(20), "LBADS 20"),
    "lbads 63": (lbads(63), "LBADS 63"),
    "flbas beyond nlbaf": (flbas(3), "NLBAF"),
    "metadata, extended": (ms(8), "metadata"),
    "metadata, separate": (ms(8, extended=False), "metadata"),
    "nsze * bs over 2**63": (nsze(1 << 62), "exceed"),
}


@pytest.mark.parametrize("name", BAD_GEOMETRY)
async def test_unusable_namespace_is_left_out_the_others_work(make_target, monkeypatch, caplog,
                                                               name):
    edit, why = BAD_GEOMETRY[name]
    patch_ns(monkeypatch, 1, edit)
    t = await make_target()
    s = Session("127.0.0.1", t.port, NQN, opts(), ReconnectPolicy(0.2, 30), rescan_interval=0)
    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            with caplog.at_level(logging.WARNING, logger="initiator.session"):
                await s.start(n)
                assert sorted(s.namespaces) == [2]       # the good one is there, 1 is not
                await s.rescan()                         # the rescan path agrees
                assert sorted(s.namespaces) == [2]
            assert s.namespaces[2].block_size == 4096
            buf = bytearray(4096)
            await s.read(2, 0, 1, buf)
            await s.aclose()
    warned = [r.getMessage() for r in caplog.records if "namespace 1 left out" in r.getMessage()]
    assert len(warned) == 1 and why in warned[0]


@pytest.mark.parametrize("lb", [9, 12, 16])
async def test_usable_lba_sizes(lb):
    ident = st.IdentifyNamespace.from_bytes(st.build_identify_namespace(nsze=8,
                                                                        block_size=1 << lb))
    assert ns_unusable(ident) is None
    assert ns_unusable(ident, max_transfer=1 << 20) is None


async def test_block_larger_than_the_max_transfer_is_unusable():
    # MDTS 1 with a 4 KiB CAP.MPSMIN: 8 KiB per command, so a 16 KiB block cannot be moved.
    ident = st.IdentifyNamespace.from_bytes(st.build_identify_namespace(nsze=8,
                                                                        block_size=16384))
    assert "maximum transfer" in ns_unusable(ident, max_transfer=8192)


# -- CAP.MQES and MAXCMD: the I/O queue size ---------------------------------------------------

async def test_io_queues_clamped_to_cap_mqes(make_target):
    """A target whose queues hold 32 entries (CAP.MQES 31) refuses a Connect with SQSIZE 127:
    -Q 128 is clamped, as the kernel host and SPDK clamp it, instead of failing to connect."""
    t = await make_target(queue_size=32)
    with trio.fail_after(15):
        async with open_controller("127.0.0.1", t.port, NQN, opts(queue_size=128)) as c:
            assert c.io_queue_size == 32
            assert all(q.core.depth == 31 for q in c.io_queues)
            async with trio.open_nursery() as n:          # more I/O than slots: they wait
                for i in range(40):
                    n.start_soon(c.read, 1, i, 1, memoryview(bytearray(512)))


async def test_io_queues_clamped_to_maxcmd(make_target, monkeypatch):
    orig = tctl.Controller.identify_controller

    def identify(self):
        b = bytearray(orig(self))
        struct.pack_into("<H", b, 514, 16)       # MAXCMD 16
        return bytes(b)
    monkeypatch.setattr(tctl.Controller, "identify_controller", identify)
    t = await make_target()
    with trio.fail_after(15):
        async with open_controller("127.0.0.1", t.port, NQN, opts(queue_size=128)) as c:
            assert c.io_queue_size == 16
            assert all(q.core.depth == 15 for q in c.io_queues)


# -- Identify Controller fields bring-up must agree with --------------------------------------

def patch_ctrl(monkeypatch, offset: int, fmt: str, value) -> None:
    orig = tctl.Controller.identify_controller

    def identify(self):
        b = bytearray(orig(self))
        struct.pack_into(fmt, b, offset, value)
        return bytes(b)
    monkeypatch.setattr(tctl.Controller, "identify_controller", identify)


@pytest.mark.parametrize("field,offset,fmt,value,words", [
    ("icdoff", 1800, "<H", 1, "ICDOFF"),
    ("cntlid", 78, "<H", 0x7FFF, "CNTLID"),
    ("subnqn", 768, "256s", b"nqn.2026-01.io.blockfs:another", "another"),
])
async def test_identify_controller_contradiction_fails_bring_up(make_target, monkeypatch, field,
                                                                 offset, fmt, value, words):
    from initiator._init import InitError
    patch_ctrl(monkeypatch, offset, fmt, value)
    t = await make_target()
    with trio.fail_after(15):
        with pytest.raises(InitError) as ei:
            async with open_controller("127.0.0.1", t.port, NQN, opts()):
                pass
    assert words in str(ei.value)


@pytest.mark.parametrize("ioccsz", [0, 1, 4])
async def test_an_ioccsz_without_room_for_data_means_no_in_capsule_writes(make_target, monkeypatch,
                                                                          ioccsz):
    """IOCCSZ 0 (invalid) used to fall back to the admin queue's 8 KiB of in-capsule data;
    below 5 there is no room for any: writes go by R2T, and they work."""
    patch_ctrl(monkeypatch, 1792, "<I", ioccsz)
    t = await make_target()
    with trio.fail_after(15):
        async with open_controller("127.0.0.1", t.port, NQN, opts()) as c:
            q = c.io_queues[0]
            assert q.core.in_capsule_max == 0
            data = bytes(range(256)) * 16
            await c.write(1, 0, 8, data)
            buf = bytearray(4096)
            await c.read(1, 0, 8, memoryview(buf))
            assert buf == data


# -- the active namespace list after bring-up (rescan, list-ns) -------------------------------

def full_page_forever(monkeypatch):
    """CNS 02h answers NSIDs 1..1024 whatever NSID it is asked after."""
    orig = tctl.Controller._identify

    def _identify(self, nsid, c10, c11, data_len):
        if c10 & 0xFF == 0x02:
            return 0, 0, 0, st.build_ns_list(range(1, 1025))
        return orig(self, nsid, c10, c11, data_len)
    monkeypatch.setattr(tctl.Controller, "_identify", _identify)


async def test_ns_list_repeating_a_full_page_is_an_error_not_a_loop(make_target, monkeypatch):
    from initiator._errors import ProtocolError
    t = await make_target()
    s = Session("127.0.0.1", t.port, NQN, opts(), ReconnectPolicy(0.2, 30), rescan_interval=0)
    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            await s.start(n)
            full_page_forever(monkeypatch)       # bring-up is done: only CNS 02h from now on
            with trio.fail_after(5):
                with pytest.raises(ProtocolError):
                    await s.ctrl.active_namespaces()
            with trio.fail_after(5):
                with pytest.raises(ProtocolError):
                    await s.rescan()
            assert sorted(s.namespaces) == [1, 2]          # what was known stays
            await s.aclose()


# -- KAS 0 with a KATO in the Connect ----------------------------------------------------------

async def test_kas_zero_still_keeps_the_kato_fed(make_target, monkeypatch):
    """Identify KAS 0 while the target runs the KATO the Connect asked for: without Keep Alive
    the target expired the controller every KATO (connection reset)."""
    patch_ctrl(monkeypatch, 320, "<H", 0)
    t = await make_target()
    with trio.fail_after(15):
        async with open_controller("127.0.0.1", t.port, NQN, opts(keep_alive_tmo=1)) as c:
            assert c.ctrl.kas == 0
            await trio.sleep(2.5)
            assert not c.lost and c.keep_alives_sent >= 3
