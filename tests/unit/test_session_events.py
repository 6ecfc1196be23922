"""Asynchronous events and namespace bookkeeping of the session, without a target (issue 7):
AER dword 0 decoding (`AsyncEvent.from_dw0`, Base 5.2 Figure 146), the Changed Namespace List
log (LID 04h, Base 5.16.1.5) including its 0xFFFFFFFF overflow marker, `diff_namespaces` (add,
remove, resize; an identity change is a remove and an add; removes first, each kind in NSID
order) and how `Session` hands AENs and namespace changes to its callbacks.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest
from hypothesis import given, strategies as hs

from initiator import _structs as st
from initiator._spec import AsyncEventType, LogPage, NoticeInfo
from initiator.controller import AsyncEvent, ControllerOptions
from initiator.session import NamespaceInfo, Session, _ns_info, diff_namespaces

# -- AsyncEvent.from_dw0 ----------------------------------------------------------------------


@pytest.mark.parametrize("dw0, etype, info, lid", [
    # Notice / Namespace Attribute Changed / Changed Namespace List (what nvmet sends on resize)
    (0x00040002, AsyncEventType.NOTICE, NoticeInfo.NS_ATTR_CHANGED, LogPage.CHANGED_NS_LIST),
    # Notice / Discovery Log Page Change / Discovery log (NVMe-oF 5.3)
    (0x0070F002, AsyncEventType.NOTICE, NoticeInfo.DISCOVERY_LOG_CHANGED, LogPage.DISCOVERY),
    # Error status / Persistent Internal Error (03h) / Error Information log
    (0x00010300, AsyncEventType.ERROR, 0x03, LogPage.ERROR),
    # SMART / Temperature Threshold (01h) / SMART log
    (0x00020101, AsyncEventType.SMART, 0x01, LogPage.SMART),
    # Notice / Firmware Activation Starting / Firmware Slot log (03h)
    (0x00030102, AsyncEventType.NOTICE, NoticeInfo.FW_ACTIVATION_STARTING, 0x03),
    (0x00000007, AsyncEventType.VENDOR, 0, 0),
])
def test_aen_dw0_decoding(dw0, etype, info, lid):
    ev = AsyncEvent.from_dw0(dw0)
    assert (ev.type, ev.info, ev.log_page, ev.raw) == (etype, info, lid, dw0)
    assert ev.type == etype and ev.info == info          # comparable with the spec enums


def test_aen_dw0_reserved_bits_are_ignored():
    # Bits 7:3 and 31:24 are reserved: they must not leak into type, info or log page.
    ev = AsyncEvent.from_dw0(0xAB0400FA)
    assert (ev.type, ev.info, ev.log_page) == (AsyncEventType.NOTICE, 0x00, 0x04)
    assert ev.raw == 0xAB0400FA


@given(hs.integers(0, 7), hs.integers(0, 255), hs.integers(0, 255))
def test_aen_dw0_round_trips_with_the_targets_encoder(etype, info, lid):
    ev = AsyncEvent.from_dw0(st.aen_dw0(etype, info, lid))
    assert (ev.type, ev.info, ev.log_page) == (etype, info, lid)


# -- Changed Namespace List log ----------------------------------------------------------------

def _log(*nsids: int, size: int = 4096) -> bytearray:
    b = bytearray(size)
    struct.pack_into(f"<{len(nsids)}I", b, 0, *nsids)
    return b


def test_changed_ns_list_empty():
    assert st.parse_changed_ns_list(bytes(4096)) == []
    assert st.parse_changed_ns_list(b"") == []


def test_changed_ns_list_entries_up_to_the_first_zero():
    assert st.parse_changed_ns_list(_log(1, 5, 7)) == [1, 5, 7]
    # Zero ends the list (the rest is zero-filled by definition).
    assert st.parse_changed_ns_list(_log(3, 0, 9)) == [3]


def test_changed_ns_list_full_page_has_no_terminator():
    nsids = list(range(1, 1025))
    assert st.parse_changed_ns_list(_log(*nsids)) == nsids


def test_changed_ns_list_overflow_marker():
    # More than 1024 changes: first entry FFFFFFFFh, the rest zero -> rescan everything (None).
    assert st.parse_changed_ns_list(_log(0xFFFFFFFF)) is None
    assert st.parse_changed_ns_list(st.build_changed_ns_list(range(1, 1026))) is None


def test_changed_ns_list_accepts_buffer_types():
    b = _log(2, 4)
    assert st.parse_changed_ns_list(memoryview(b)) == [2, 4]
    assert st.parse_changed_ns_list(bytes(b)) == [2, 4]
    assert st.parse_changed_ns_list(memoryview(_log(0xFFFFFFFF))) is None


@given(hs.lists(hs.integers(1, 0xFFFFFFFE), max_size=1100, unique=True))
def test_changed_ns_list_round_trip(nsids):
    got = st.parse_changed_ns_list(st.build_changed_ns_list(nsids))
    if len(nsids) > st.CHANGED_NS_LIST_MAX:
        assert got is None
    else:
        assert got == nsids


# -- diff_namespaces -----------------------------------------------------------------------------

def ns(nsid, blocks=1000, bs=512, nguid="aa" * 16, uuid=None, eui64=None) -> NamespaceInfo:
    return NamespaceInfo(nsid, bs, blocks, nguid=nguid, uuid=uuid, eui64=eui64)


def test_diff_nothing_changed():
    old = {1: ns(1), 2: ns(2, nguid="bb" * 16)}
    assert diff_namespaces(old, dict(old)) == []
    assert diff_namespaces({}, {}) == []


def test_diff_add_remove_resize():
    assert diff_namespaces({}, {1: ns(1)}) == [("add", 1)]
    assert diff_namespaces({1: ns(1)}, {}) == [("remove", 1)]
    assert diff_namespaces({1: ns(1)}, {1: ns(1, blocks=2000)}) == [("resize", 1)]
    assert diff_namespaces({1: ns(1)}, {1: ns(1, blocks=10)}) == [("resize", 1)]    # shrink


@pytest.mark.parametrize("changed", [
    {"nguid": "cc" * 16},
    {"nguid": None},
    {"uuid": "12345678-1234-4234-8234-123456789abc"},
    {"eui64": "0011223344556677"},
    {"bs": 4096, "blocks": 125},            # same bytes, new LBA format: another namespace
])
def test_diff_identity_change_is_remove_then_add(changed):
    new = ns(1, **{"blocks": 1000, **changed})
    assert diff_namespaces({1: ns(1)}, {1: new}) == [("remove", 1), ("add", 1)]


def test_diff_identity_change_with_a_new_size_is_not_a_resize():
    assert diff_namespaces({1: ns(1)}, {1: ns(1, blocks=5, nguid="dd" * 16)}) == \
        [("remove", 1), ("add", 1)]


def test_diff_ordering_removes_first_then_adds_and_resizes_by_nsid():
    old = {7: ns(7, nguid="07" * 16), 2: ns(2, nguid="02" * 16), 5: ns(5, nguid="05" * 16),
           4: ns(4, nguid="04" * 16)}
    new = {9: ns(9, nguid="09" * 16), 5: ns(5, blocks=5000, nguid="05" * 16),
           7: ns(7, nguid="77" * 16), 1: ns(1, nguid="01" * 16), 4: ns(4, nguid="04" * 16)}
    assert diff_namespaces(old, new) == [
        ("remove", 2), ("remove", 7),
        ("add", 1), ("resize", 5), ("add", 7), ("add", 9),
    ]


@given(hs.dictionaries(hs.integers(1, 20), hs.tuples(hs.integers(1, 4), hs.integers(0, 2))),
       hs.dictionaries(hs.integers(1, 20), hs.tuples(hs.integers(1, 4), hs.integers(0, 2))))
def test_diff_replayed_turns_old_into_new(old_spec, new_spec):
    """Applying the events to the old set gives the new set's NSIDs and sizes."""
    def build(spec):
        return {n: ns(n, blocks=b * 100, nguid=f"{g:02x}" * 16) for n, (b, g) in spec.items()}
    old, new = build(old_spec), build(new_spec)
    events = diff_namespaces(old, new)
    state = dict(old)
    kinds = [k for k, _ in events]
    assert kinds == sorted(kinds, key=lambda k: k != "remove")      # every remove comes first
    for kind, nsid in events:
        if kind == "remove":
            assert nsid in state
            del state[nsid]
        elif kind == "add":
            assert nsid not in state
            state[nsid] = new[nsid]
        else:
            assert state[nsid].num_blocks != new[nsid].num_blocks
            state[nsid] = new[nsid]
    assert {n: (i.num_blocks, i.nguid) for n, i in state.items()} == \
        {n: (i.num_blocks, i.nguid) for n, i in new.items()}
    assert len(events) == len(set(events))


# -- NamespaceInfo from Identify ----------------------------------------------------------------

def test_ns_info_prefers_descriptors_and_drops_zero_ids():
    ident = SimpleNamespace(block_size=4096, nsze=256, nguid=bytes(16), eui64=bytes(8))
    uuid = bytes(range(16))
    info = _ns_info(3, ident, {st.NIDT_NGUID: b"\x11" * 16, st.NIDT_UUID: uuid})
    assert (info.nsid, info.block_size, info.num_blocks, info.size) == (3, 4096, 256, 1 << 20)
    assert info.nguid == "11" * 16
    assert info.uuid == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert info.eui64 is None                                  # all-zero EUI64: none
    info = _ns_info(3, SimpleNamespace(block_size=512, nsze=8, nguid=b"\x22" * 16,
                                       eui64=bytes(8)), None)
    assert info.nguid == "22" * 16 and info.uuid is None


# -- Session: AENs and namespace events reach the callbacks ----------------------------------

def _session() -> Session:
    return Session("127.0.0.1", 4420, "nqn.test", ControllerOptions(hostid=
                   "00000000-0000-4000-8000-000000000001", hostnqn="nqn.host"),
                   rescan_interval=0)


def test_session_aen_bookkeeping():
    s = _session()
    got = []
    s.on_async_event = got.append
    s._on_aen(AsyncEvent.from_dw0(0x00020101))                  # SMART: no rescan
    assert not s._rescan_wanted.is_set()
    s._on_aen(AsyncEvent.from_dw0(0x00010300))                  # error: no rescan
    assert not s._rescan_wanted.is_set()
    s._on_aen(AsyncEvent.from_dw0(0x00040002))                  # NS attribute changed: rescan
    assert s._rescan_wanted.is_set()
    assert [e.raw for e in got] == [0x00020101, 0x00010300, 0x00040002]
    assert s.statistics()["async_events"] == [
        "type=1 info=0x01 log=0x02", "type=0 info=0x03 log=0x01", "type=2 info=0x00 log=0x04"]


def test_session_discovery_notice_does_not_rescan_namespaces():
    s = _session()
    s._on_aen(AsyncEvent.from_dw0(0x0070F002))
    assert not s._rescan_wanted.is_set()


def test_session_statistics_keep_the_last_20_events():
    s = _session()
    for i in range(25):
        s._on_aen(AsyncEvent.from_dw0(st.aen_dw0(1, i, 2)))
    evs = s.statistics()["async_events"]
    assert len(evs) == 20 and evs[0] == "type=1 info=0x05 log=0x02"


def test_session_apply_hands_each_event_its_info():
    s = _session()
    calls = []
    s.on_namespace = lambda kind, nsid, info: calls.append((kind, nsid, info.num_blocks,
                                                            info.nguid))
    s._apply({1: ns(1), 2: ns(2, nguid="02" * 16)})
    assert calls == [("add", 1, 1000, "aa" * 16), ("add", 2, 1000, "02" * 16)]
    calls.clear()
    s._apply({1: ns(1, blocks=3000), 2: ns(2, nguid="22" * 16)})
    # A removal reports what went away; add and resize report the new state.
    assert calls == [("remove", 2, 1000, "02" * 16), ("resize", 1, 3000, "aa" * 16),
                     ("add", 2, 1000, "22" * 16)]
    assert sorted(s.namespaces) == [1, 2] and s.namespaces[1].num_blocks == 3000
    calls.clear()
    s._apply({})
    assert calls == [("remove", 1, 3000, "aa" * 16), ("remove", 2, 1000, "22" * 16)]
    assert s.namespaces == {}
