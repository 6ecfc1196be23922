"""ControllerInit (initiator/_init.py), the sans-IO controller bring-up, against a scripted fake
controller: the order of states and actions, CC.EN/CSTS.RDY handshakes, CSTS.CFS and CAP.TO
expiry (driven by the `now` argument), queue grant, AER configuration and its fallback, active
namespace list paging, per-namespace Identify with tolerated/skipped errors, discovery.
"""

from __future__ import annotations

import struct

import pytest

from initiator import _structs as st
from initiator._errors import LocalProtocolError, NvmeStatusError
from initiator._init import ControllerInit, InitError, InitState as S
from initiator._spec import Cns, FeatureId, Property

CC_ENABLE = 0x00460001          # IOCQES 4 (bits 23:20), IOSQES 6 (19:16), EN
NVME_1_4 = 0x00010400


def cap(to: int = 20, mqes: int = 127) -> int:
    """CAP: MQES 15:0, CQR 16, TO 31:24 (500 ms units), CSS 44:37 (NVM = bit 37)."""
    return mqes | (1 << 16) | (to << 24) | (1 << 37)


def err(sc: int, sct: int = 0) -> NvmeStatusError:
    return NvmeStatusError(sct=sct, sc=sc)


class FakeController:
    """Answers the machine's actions as a fabrics controller would, and records them.

    `fail` maps an action tuple, or its first two items, to the NvmeStatusError to answer with;
    a list of errors is used up one per attempt.
    """

    def __init__(self, *, cc: int = 0, to: int = 20, rdy_polls: int = 2, not_rdy_polls: int = 2,
                 cfs: bool = False, never_ready: bool = False, oaes: int = 0,
                 nsids=(1, 2), granted: tuple[int, int] | None = None, fail=None,
                 cntrltype: int = st.CNTRLTYPE_IO, vanish=(), icdoff: int = 0):
        self.cc = cc
        self.icdoff = icdoff
        self.cap = cap(to)
        self.rdy = bool(cc & 1)
        self.rdy_polls, self.not_rdy_polls = rdy_polls, not_rdy_polls
        self.polls = 0
        self.cfs = cfs
        self.never_ready = never_ready
        self.oaes = oaes
        self.nsids = sorted(nsids)
        self.granted = granted
        self.fail = dict(fail or {})
        self.cntrltype = cntrltype
        self.vanish = set(vanish)
        self.actions: list[tuple] = []

    def answer(self, act):
        self.actions.append(act)
        for key in (act, act[:2]):
            if key in self.fail:
                e = self.fail[key]
                if isinstance(e, list):
                    if e:
                        return "err", e.pop(0)
                    continue
                return "err", e
        kind = act[0]
        if kind == "prop_get":
            off = act[1]
            if off == Property.VS:
                return "ok", (NVME_1_4, 0, None)
            if off == Property.CAP:
                return "ok", (self.cap & 0xFFFFFFFF, self.cap >> 32, None)
            if off == Property.CC:
                return "ok", (self.cc, 0, None)
            if off == Property.CSTS:
                self.polls += 1
                want = bool(self.cc & 1)
                if self.rdy != want and not self.never_ready:
                    if self.polls >= (self.rdy_polls if want else self.not_rdy_polls):
                        self.rdy = want
                csts = (1 if self.rdy else 0) | (2 if self.cfs and want else 0)
                return "ok", (csts, 0, None)
        if kind == "prop_set":
            assert act[1] == Property.CC and act[3] is False
            self.cc = act[2]
            self.polls = 0
            return "ok", (0, 0, None)
        if kind == "identify":
            cns, nsid = act[1], act[2]
            if cns == Cns.CONTROLLER:
                return "ok", (0, 0, st.build_identify_controller(
                    oaes=self.oaes, nn=max(self.nsids, default=0), cntrltype=self.cntrltype,
                    icdoff=self.icdoff))
            if cns == Cns.ACTIVE_NS_LIST:
                return "ok", (0, 0, st.build_ns_list(self.nsids, greater_than=nsid))
            if cns == Cns.NAMESPACE:
                if nsid in self.vanish:
                    return "err", err(0x0B)              # Invalid Namespace or Format
                return "ok", (0, 0, st.build_identify_namespace(nsze=nsid * 1000, block_size=512))
            if cns == Cns.NS_ID_DESCRIPTORS:
                return "ok", (0, 0, st.build_ns_descriptors(nguid=bytes([nsid & 0xFF]) * 16))
        if kind == "set_features":
            fid, cdw11 = act[1], act[2]
            if fid == FeatureId.NUMBER_OF_QUEUES:
                nsq, ncq = self.granted or ((cdw11 & 0xFFFF) + 1, (cdw11 >> 16) + 1)
                return "ok", (((ncq - 1) << 16) | (nsq - 1), 0, None)
            return "ok", (0, 0, None)
        raise AssertionError(f"unexpected action {act}")


def make(**kw) -> ControllerInit:
    return ControllerInit(
        nr_io_queues=kw.pop("nr_io_queues", 4), discovery=kw.pop("discovery", False),
        now=kw.pop("now", 0.0), configure_aer=kw.pop("configure_aer", True),
        cntlid=kw.pop("cntlid", None),
        parse_identify_controller=st.IdentifyController.from_bytes,
        parse_identify_namespace=st.IdentifyNamespace.from_bytes,
        parse_ns_descriptors=st.parse_ns_descriptors, parse_ns_list=st.parse_ns_list)


def drive(init: ControllerInit, fake: FakeController, *, t0: float = 0.0, dt: float = 0.01,
          limit: int = 20000) -> list[tuple]:
    """Run the machine to "done"; time advances `dt` per action. Returns the actions."""
    t = t0
    for _ in range(limit):
        act = init.next_action(t)
        if act[0] == "done":
            fake.actions.append(act)
            return fake.actions
        kind, res = fake.answer(act)
        if kind == "err":
            init.on_error(t, res)
        else:
            dw0, dw1, data = res
            init.on_result(t, dw0, dw1, data)
        t += dt
    raise AssertionError("bring-up did not finish")


def polls(n: int):
    return [("prop_get", Property.CSTS, False)] * n


# ---------------------------------------------------------------------------------------------
# Order

def test_order_for_a_disabled_controller():
    init, fake = make(), FakeController(rdy_polls=3)
    actions = drive(init, fake)
    assert actions == [
        ("prop_get", Property.VS, False),
        ("prop_get", Property.CAP, True),
        ("prop_get", Property.CC, False),
        ("prop_get", Property.CSTS, False),                          # CC.EN=0: RDY must be 0
        ("prop_set", Property.CC, CC_ENABLE, False),
        *polls(3),
        ("identify", Cns.CONTROLLER, 0),
        ("set_features", FeatureId.NUMBER_OF_QUEUES, 0x0003_0003),
        ("set_features", FeatureId.ASYNC_EVENT_CONFIG, 0x1F),
        ("identify", Cns.ACTIVE_NS_LIST, 0),
        ("identify", Cns.NAMESPACE, 1),
        ("identify", Cns.NS_ID_DESCRIPTORS, 1),
        ("identify", Cns.NAMESPACE, 2),
        ("identify", Cns.NS_ID_DESCRIPTORS, 2),
        ("done",),
    ]
    assert init.trace == [
        S.READ_VS, S.READ_CAP, S.READ_CC, S.CHECK_RDY, S.ENABLE, S.WAIT_RDY, S.IDENTIFY_CTRLR,
        S.SET_NUM_QUEUES, S.CONFIGURE_AER, S.IDENTIFY_ACTIVE_NS, S.IDENTIFY_NS,
        S.IDENTIFY_NS_DESCS, S.IDENTIFY_NS, S.IDENTIFY_NS_DESCS, S.READY,
    ]
    assert init.state is S.READY
    assert init.vs == NVME_1_4 and init.cap == cap() and init.cc == 0
    assert init.io_queues == 4 and init.aec == 0x1F
    assert init.active_ns == [1, 2]
    assert {n: ns.nsze for n, ns in init.namespaces.items()} == {1: 1000, 2: 2000}
    assert init.ns_descs == {1: {st.NIDT_NGUID: b"\x01" * 16}, 2: {st.NIDT_NGUID: b"\x02" * 16}}
    assert isinstance(init.ctrl, st.IdentifyController)
    assert init.next_action(99.0) == ("done",)


def test_enabled_controller_is_disabled_first():
    init, fake = make(), FakeController(cc=CC_ENABLE | 0x10, not_rdy_polls=2, rdy_polls=1)
    actions = drive(init, fake)
    assert actions[:9] == [
        ("prop_get", Property.VS, False),
        ("prop_get", Property.CAP, True),
        ("prop_get", Property.CC, False),
        ("prop_set", Property.CC, (CC_ENABLE | 0x10) & ~1, False),   # only EN cleared
        *polls(2),                                                   # until RDY = 0
        ("prop_set", Property.CC, CC_ENABLE, False),
        *polls(1),
        ("identify", Cns.CONTROLLER, 0),
    ]
    assert init.trace[:7] == [S.READ_VS, S.READ_CAP, S.READ_CC, S.DISABLE, S.WAIT_NOT_RDY,
                              S.ENABLE, S.WAIT_RDY]
    assert init.state is S.READY and init.cc == CC_ENABLE | 0x10


def test_disabled_but_still_ready_waits_for_rdy_0_before_enabling():
    """SPDK CHECK_EN: CC.EN=0 with CSTS.RDY=1 is a controller still shutting down."""
    fake = FakeController(not_rdy_polls=3, rdy_polls=1)
    fake.rdy = True                               # EN=0 but RDY=1
    init = make()
    actions = drive(init, fake)
    assert actions[:9] == [
        ("prop_get", Property.VS, False),
        ("prop_get", Property.CAP, True),
        ("prop_get", Property.CC, False),
        *polls(3),                                # check (RDY=1), then wait until RDY=0
        ("prop_set", Property.CC, CC_ENABLE, False),
        *polls(1),
        ("identify", Cns.CONTROLLER, 0),
    ]
    assert init.trace[:6] == [S.READ_VS, S.READ_CAP, S.READ_CC, S.CHECK_RDY, S.WAIT_NOT_RDY,
                              S.ENABLE]
    assert init.state is S.READY


def test_wait_rdy_keeps_polling_without_new_states():
    init, fake = make(), FakeController(rdy_polls=25)
    drive(init, fake, dt=0.1)                    # 2.5 s, within CAP.TO = 10 s
    assert fake.actions.count(("prop_get", Property.CSTS, False)) == 1 + 25   # check + polls
    assert init.trace.count(S.WAIT_RDY) == 1


# ---------------------------------------------------------------------------------------------
# Failure to become ready

def test_csts_cfs_fails_bring_up():
    init, fake = make(), FakeController(cfs=True, never_ready=True)
    with pytest.raises(InitError) as ei:
        drive(init, fake)
    assert ei.value.state is S.WAIT_RDY
    assert init.state is S.ERROR
    with pytest.raises(LocalProtocolError):
        init.next_action(0.0)


def test_cap_to_expiry_in_wait_rdy():
    # CAP.TO = 2: 1 s. Enabled at t = 10.0; polls up to the deadline are fine, past it fail.
    init, fake = make(now=0.0), FakeController(to=2, never_ready=True)
    t = 10.0
    for _ in range(5):                                   # VS, CAP, CC, CSTS check, enable
        kind, (dw0, dw1, data) = fake.answer(init.next_action(t))
        init.on_result(t, dw0, dw1, data)
    assert init.state is S.WAIT_RDY and init.timeout == 1.0
    for now in (10.0, 10.5, 11.0):
        act = init.next_action(now)
        assert act == ("prop_get", Property.CSTS, False)
        init.on_result(now, *fake.answer(act)[1][:2])
    with pytest.raises(InitError) as ei:
        init.next_action(11.001)
    assert ei.value.state is S.WAIT_RDY and "CAP.TO" in str(ei.value)
    assert init.state is S.ERROR


def test_cap_to_expiry_in_wait_not_rdy():
    init, fake = make(), FakeController(cc=CC_ENABLE, to=4, never_ready=True)
    with pytest.raises(InitError) as ei:
        drive(init, fake, dt=0.25)
    assert ei.value.state is S.WAIT_NOT_RDY
    # Deadline = 2 s after the disable completed; 0.25 s per step.
    assert fake.actions.count(("prop_get", Property.CSTS, False)) == 8


def test_cap_to_zero_still_waits_half_a_second():
    init = make()
    init.cap = cap(to=0)
    assert init.timeout == 0.5


def test_required_step_error_fails_bring_up():
    init = make()
    fake = FakeController(fail={("identify", Cns.CONTROLLER, 0): err(0x06)})
    with pytest.raises(InitError) as ei:
        drive(init, fake)
    assert ei.value.state is S.IDENTIFY_CTRLR and init.state is S.ERROR
    with pytest.raises(LocalProtocolError):
        init.on_result(0.0)


def test_property_error_fails_bring_up():
    init = make()
    fake = FakeController(fail={("prop_get", Property.CAP, True): err(0x02)})
    with pytest.raises(InitError) as ei:
        drive(init, fake)
    assert ei.value.state is S.READ_CAP


@pytest.mark.parametrize("mpsmin", [1, 4, 15])
def test_cap_mpsmin_above_4k_fails_bring_up(mpsmin):
    # The host's memory page is 4 KiB (CC.MPS 0); Base 3.1.3.5 wants CC.MPS >= CAP.MPSMIN.
    init = make()
    fake = FakeController()
    fake.cap |= mpsmin << 48
    with pytest.raises(InitError) as ei:
        drive(init, fake)
    assert ei.value.state is S.READ_CAP and "MPSMIN" in str(ei.value)
    assert not any(a[0] == "prop_set" for a in fake.actions)      # CC never written


def test_cap_mqes_zero_fails_bring_up():
    init = make()
    fake = FakeController()
    fake.cap &= ~0xFFFF
    with pytest.raises(InitError) as ei:
        drive(init, fake)
    assert ei.value.state is S.READ_CAP and "MQES" in str(ei.value)


def test_identify_controller_cntlid_must_match_connect():
    # The kernel host: "Mismatching cntlid: Connect %u vs Identify %u, rejecting".
    init = make(cntlid=5)
    fake = FakeController()             # identifies as CNTLID 0
    with pytest.raises(InitError) as ei:
        drive(init, fake)
    assert ei.value.state is S.IDENTIFY_CTRLR and "CNTLID" in str(ei.value)


def test_identify_controller_with_icdoff_fails_bring_up():
    init = make()
    fake = FakeController(icdoff=1)
    with pytest.raises(InitError) as ei:
        drive(init, fake)
    assert ei.value.state is S.IDENTIFY_CTRLR and "ICDOFF" in str(ei.value)


# ---------------------------------------------------------------------------------------------
# Queues and asynchronous events

def test_granted_fewer_queues():
    init = make(nr_io_queues=8)
    fake = FakeController(granted=(4, 2))             # NSQA 3 (0's based), NCQA 1
    actions = drive(init, fake)
    assert ("set_features", FeatureId.NUMBER_OF_QUEUES, 0x0007_0007) in actions
    assert init.io_queues == 2


def test_granted_more_queues_than_asked_is_capped():
    init = make(nr_io_queues=2)
    drive(init, FakeController(granted=(64, 64)))
    assert init.io_queues == 2


def test_set_num_queues_error_fails_bring_up():
    init = make()
    fake = FakeController(fail={("set_features", FeatureId.NUMBER_OF_QUEUES): err(0x02)})
    with pytest.raises(InitError) as ei:
        drive(init, fake)
    assert ei.value.state is S.SET_NUM_QUEUES


@pytest.mark.parametrize("oaes,aec", [
    (0, 0x1F),
    (st.OAES_NS_ATTR, 0x11F),
    (st.OAES_NS_ATTR | st.OAES_FW_ACTIVATION, 0x31F),
    (st.OAES_ANA_CHANGE, 0x1F),                        # not requested by this host
])
def test_aer_configuration_from_oaes(oaes, aec):
    init = make()
    actions = drive(init, FakeController(oaes=oaes))
    assert ("set_features", FeatureId.ASYNC_EVENT_CONFIG, aec) in actions
    assert init.aec == aec


def test_aer_retried_without_critical_warnings():
    init = make()
    fake = FakeController(oaes=st.OAES_NS_ATTR | st.OAES_FW_ACTIVATION,
                          fail={("set_features", FeatureId.ASYNC_EVENT_CONFIG, 0x31F): err(0x02)})
    actions = drive(init, fake)
    aer = [a for a in actions if a[:2] == ("set_features", FeatureId.ASYNC_EVENT_CONFIG)]
    assert aer == [("set_features", FeatureId.ASYNC_EVENT_CONFIG, 0x31F),
                   ("set_features", FeatureId.ASYNC_EVENT_CONFIG, 0x300)]
    assert init.aec == 0x300 and init.state is S.READY
    assert init.trace.count(S.CONFIGURE_AER) == 1


def test_aer_retry_failing_too_gives_up_on_aer():
    init = make()
    fake = FakeController(oaes=st.OAES_NS_ATTR,
                          fail={("set_features", FeatureId.ASYNC_EVENT_CONFIG): [err(2), err(2)]})
    actions = drive(init, fake)
    aer = [a for a in actions if a[:2] == ("set_features", FeatureId.ASYNC_EVENT_CONFIG)]
    assert [a[2] for a in aer] == [0x11F, 0x100]
    assert init.aec == 0 and init.state is S.READY and init.active_ns == [1, 2]


def test_aer_error_without_notices_is_not_retried():
    init = make()
    fake = FakeController(fail={("set_features", FeatureId.ASYNC_EVENT_CONFIG): err(0x02)})
    actions = drive(init, fake)
    assert [a for a in actions if a[1:2] == (FeatureId.ASYNC_EVENT_CONFIG,)] == [
        ("set_features", FeatureId.ASYNC_EVENT_CONFIG, 0x1F)]
    assert init.aec == 0 and init.state is S.READY


def test_aer_not_configured_when_disabled():
    init = make(configure_aer=False)
    actions = drive(init, FakeController(oaes=st.OAES_NS_ATTR))
    assert not any(a[:2] == ("set_features", FeatureId.ASYNC_EVENT_CONFIG) for a in actions)
    assert S.CONFIGURE_AER not in init.trace and init.state is S.READY


# ---------------------------------------------------------------------------------------------
# Namespaces

def test_active_ns_list_is_paged_at_1024_entries():
    nsids = list(range(1, 1031)) + [5000]
    init, fake = make(), FakeController(nsids=nsids)
    actions = drive(init, fake)
    lists = [a for a in actions if a[:2] == ("identify", Cns.ACTIVE_NS_LIST)]
    assert lists == [("identify", Cns.ACTIVE_NS_LIST, 0),
                     ("identify", Cns.ACTIVE_NS_LIST, 1024)]
    assert init.active_ns == nsids
    assert len(init.namespaces) == len(nsids) and init.namespaces[5000].nsze == 5_000_000
    assert init.trace.count(S.IDENTIFY_ACTIVE_NS) == 1


def test_exactly_1024_namespaces_ask_for_one_more_page():
    nsids = list(range(1, 1025))
    init = make()
    actions = drive(init, FakeController(nsids=nsids))
    assert [a[2] for a in actions if a[:2] == ("identify", Cns.ACTIVE_NS_LIST)] == [0, 1024]
    assert init.active_ns == nsids


def test_no_namespaces():
    init = make()
    actions = drive(init, FakeController(nsids=()))
    assert actions[-2:] == [("identify", Cns.ACTIVE_NS_LIST, 0), ("done",)]
    assert init.active_ns == [] and init.namespaces == {} and init.state is S.READY


def test_non_ascending_ns_list_fails():
    init = make()

    class Liar(FakeController):
        def answer(self, act):
            if act[:2] == ("identify", Cns.ACTIVE_NS_LIST):
                self.actions.append(act)
                return "ok", (0, 0, bytes.fromhex("02000000 01000000") + bytes(4088))
            return super().answer(act)

    with pytest.raises(InitError) as ei:
        drive(init, Liar())
    assert ei.value.state is S.IDENTIFY_ACTIVE_NS and "ascending" in str(ei.value)
    assert init.state is S.ERROR


@pytest.mark.parametrize("nsids", [[1, 1, 2], [3, 3], [1, 0xFFFFFFFF]],
                         ids=["duplicate", "only duplicates", "broadcast"])
def test_ns_list_with_duplicates_or_the_broadcast_nsid_fails(nsids):
    init = make()

    class Liar(FakeController):
        def answer(self, act):
            if act[:2] == ("identify", Cns.ACTIVE_NS_LIST):
                self.actions.append(act)
                data = struct.pack(f"<{len(nsids)}I", *nsids)
                return "ok", (0, 0, data + bytes(4096 - len(data)))
            return super().answer(act)

    liar = Liar()
    with pytest.raises(InitError) as ei:
        drive(init, liar)
    assert ei.value.state is S.IDENTIFY_ACTIVE_NS
    assert not any(a[:2] == ("identify", Cns.NAMESPACE) for a in liar.actions)


def test_ns_descriptor_error_is_tolerated():
    init = make()
    fake = FakeController(nsids=(1, 2, 3),
                          fail={("identify", Cns.NS_ID_DESCRIPTORS, 2): err(0x02)})
    drive(init, fake)
    assert init.state is S.READY
    assert sorted(init.namespaces) == [1, 2, 3]
    assert init.ns_descs[2] == {} and init.ns_descs[3] == {st.NIDT_NGUID: b"\x03" * 16}


def test_vanished_namespace_is_skipped():
    init = make()
    fake = FakeController(nsids=(1, 2, 3), vanish={2})
    actions = drive(init, fake)
    ids = [a for a in actions if a[0] == "identify" and a[1] in (Cns.NAMESPACE,
                                                                  Cns.NS_ID_DESCRIPTORS)]
    assert ids == [("identify", Cns.NAMESPACE, 1), ("identify", Cns.NS_ID_DESCRIPTORS, 1),
                   ("identify", Cns.NAMESPACE, 2),
                   ("identify", Cns.NAMESPACE, 3), ("identify", Cns.NS_ID_DESCRIPTORS, 3)]
    assert init.active_ns == [1, 3] and sorted(init.namespaces) == [1, 3]
    assert 2 not in init.ns_descs and init.state is S.READY


def test_last_namespace_vanishing_ends_ready():
    init = make()
    drive(init, FakeController(nsids=(1, 2), vanish={2}))
    assert init.active_ns == [1] and init.state is S.READY


def test_other_identify_namespace_error_fails():
    init = make()
    fake = FakeController(fail={("identify", Cns.NAMESPACE, 2): err(0x06)})  # Internal Error
    with pytest.raises(InitError) as ei:
        drive(init, fake)
    assert ei.value.state is S.IDENTIFY_NS


# ---------------------------------------------------------------------------------------------
# Discovery controllers stop after Identify Controller (plus their AER if they offer it)

def test_discovery_controller_stops_after_identify():
    init = make(discovery=True)
    actions = drive(init, FakeController(cntrltype=st.CNTRLTYPE_DISCOVERY, rdy_polls=1))
    assert actions == [
        ("prop_get", Property.VS, False),
        ("prop_get", Property.CAP, True),
        ("prop_get", Property.CC, False),
        ("prop_get", Property.CSTS, False),
        ("prop_set", Property.CC, CC_ENABLE, False),
        *polls(1),
        ("identify", Cns.CONTROLLER, 0),
        ("done",),
    ]
    assert init.trace[-2:] == [S.IDENTIFY_CTRLR, S.READY]
    assert init.io_queues == 0 and init.aec == 0 and init.active_ns == []


def test_discovery_controller_with_log_change_events():
    init = make(discovery=True)
    actions = drive(init, FakeController(cntrltype=st.CNTRLTYPE_DISCOVERY, rdy_polls=1,
                                         oaes=st.OAES_DISCOVERY_LOG_CHANGE))
    assert actions[-3:] == [("identify", Cns.CONTROLLER, 0),
                            ("set_features", FeatureId.ASYNC_EVENT_CONFIG, 1 << 31), ("done",)]
    assert init.aec == 1 << 31
    assert init.trace[-3:] == [S.IDENTIFY_CTRLR, S.CONFIGURE_AER, S.READY]


def test_discovery_aer_error_is_tolerated():
    init = make(discovery=True)
    fake = FakeController(cntrltype=st.CNTRLTYPE_DISCOVERY, oaes=st.OAES_DISCOVERY_LOG_CHANGE,
                          fail={("set_features", FeatureId.ASYNC_EVENT_CONFIG): err(0x02)})
    drive(init, fake)
    assert init.aec == 0 and init.state is S.READY


def test_discovery_without_aer_configuration():
    init = make(discovery=True, configure_aer=False)
    actions = drive(init, FakeController(oaes=st.OAES_DISCOVERY_LOG_CHANGE))
    assert actions[-2:] == [("identify", Cns.CONTROLLER, 0), ("done",)]
    assert init.state is S.READY


def test_without_parsers_identify_data_is_kept_raw():
    init = ControllerInit(nr_io_queues=1)
    fake = FakeController(nsids=(7,))
    drive(init, fake)
    assert isinstance(init.ctrl, bytes) and len(init.ctrl) == 4096
    # Without a list parser no namespaces are found.
    assert init.active_ns == [] and init.state is S.READY
