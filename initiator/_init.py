"""Sans-IO controller bring-up: the ordered states of SPDK's nvme_ctrlr_process_init and the
kernel's nvme_enable_ctrl/nvme_init_ctrl_finish, as an explicit state machine.

Theory of operation
-------------------
The shell asks `next_action(now)` and gets one of
    ("prop_get", offset, size8)        ("prop_set", offset, value, size8)
    ("identify", cns, nsid)            ("set_features", fid, cdw11)
    ("sleep", seconds)                 ("done",)
performs it, and reports `on_result(dw0, dw1, data)` (or `on_error(status_error)` for a command
that completed with an NVMe error). No I/O and no clock of its own: `now` is passed in, so unit
tests can drive every path, including CAP.TO expiry.

Order (SPDK nvme_ctrlr.c; the kernel is the same for fabrics):
    READ_VS -> READ_CAP -> READ_CC -> [DISABLE -> WAIT_NOT_RDY or CHECK_RDY (-> WAIT_NOT_RDY)]
    -> ENABLE -> WAIT_RDY ->
    IDENTIFY_CTRLR -> SET_NUM_QUEUES -> CONFIGURE_AER -> (keep-alive starts: KATO came with
    Connect) -> IDENTIFY_ACTIVE_NS (paged) -> IDENTIFY_NS / IDENTIFY_NS_DESCS for each -> READY
A discovery controller stops after IDENTIFY_CTRLR (+ its AER configuration if persistent).
"""

from __future__ import annotations

import enum

from ._errors import LocalProtocolError, NvmeStatusError
from ._spec import (
    CC_EN, CC_IOCQES, CC_IOSQES, CSTS_CFS, CSTS_RDY, Cns, FeatureId, Property,
)


class InitState(enum.Enum):
    READ_VS = "read VS"
    READ_CAP = "read CAP"
    READ_CC = "read CC"
    CHECK_RDY = "check CSTS.RDY (CC.EN=0)"
    DISABLE = "disable (CC.EN=0)"
    WAIT_NOT_RDY = "wait for CSTS.RDY=0"
    ENABLE = "enable (CC.EN=1)"
    WAIT_RDY = "wait for CSTS.RDY=1"
    IDENTIFY_CTRLR = "identify controller"
    SET_NUM_QUEUES = "set number of queues"
    CONFIGURE_AER = "configure asynchronous events"
    IDENTIFY_ACTIVE_NS = "identify active namespace list"
    IDENTIFY_NS = "identify namespace"
    IDENTIFY_NS_DESCS = "identify namespace descriptors"
    READY = "ready"
    ERROR = "error"


class InitError(Exception):
    """Bring-up failed; `state` says where."""

    def __init__(self, state: InitState, message: str):
        super().__init__(f"controller init failed in state '{state.value}': {message}")
        self.state = state


# AEN configuration bits (Base 5.27.1.7): critical warnings 7:0, NS attribute notices (8),
# firmware activation (9), telemetry (10), ANA change (11), discovery log change (31).
# Critical warnings 4:0 (spare, temperature, reliability, read-only, volatile backup), as SPDK
# sets them; nvmet rejects any other bit in 7:0 with Invalid Field.
AEC_CRITICAL_WARNINGS = 0x1F
AEC_NS_ATTR = 1 << 8
AEC_FW_ACTIVATION = 1 << 9
AEC_DISCOVERY_LOG = 1 << 31
OAES_NS_ATTR = 1 << 8
OAES_FW_ACTIVATION = 1 << 9
OAES_DISCOVERY_LOG = 1 << 31

NS_LIST_PAGE = 1024   # NSIDs per Identify active namespace list page


def ns_list_page_problem(ids: list[int], after: int) -> str | None:
    """What is wrong with one page of the Identify active namespace list asked for with NSID
    `after`, or None. Base 5.17.2.2: NSIDs greater than `after`, in increasing order (so no
    duplicates), zero-terminated; FFFFFFFFh is the broadcast value, never a namespace's ID."""
    prev = after
    for n in ids:
        if n <= prev:
            return ("the active namespace list is not in strictly ascending order after NSID "
                    f"{after} ({n} follows {prev}; Base 5.17.2.2)")
        prev = n
    if ids and ids[-1] == 0xFFFFFFFF:
        return "the active namespace list holds the broadcast NSID FFFFFFFFh"
    return None


class ControllerInit:
    """Drive with next_action()/on_result(). Results land in the public attributes."""

    def __init__(self, *, nr_io_queues: int, discovery: bool = False, now: float = 0.0,
                 parse_identify_controller=None, parse_identify_namespace=None,
                 parse_ns_descriptors=None, parse_ns_list=None, configure_aer: bool = True,
                 cntlid: int | None = None, subnqn: str | None = None):
        self.state = InitState.READ_VS
        self.cntlid = cntlid         # from the admin Connect; None: not checked
        self.subnqn = subnqn         # the NQN connected to; None: not checked
        self.discovery = discovery
        self.nr_io_queues = nr_io_queues
        self.configure_aer = configure_aer
        self._parse_ctrl = parse_identify_controller
        self._parse_ns = parse_identify_namespace
        self._parse_descs = parse_ns_descriptors
        self._parse_list = parse_ns_list
        self.vs = 0
        self.cap = 0
        self.cc = 0
        self.ctrl = None             # parsed Identify Controller
        self.io_queues = 0           # granted I/O queue pairs
        self.aec = 0                 # enabled asynchronous events
        self.active_ns: list[int] = []
        self.namespaces: dict[int, object] = {}
        self.ns_descs: dict[int, dict] = {}
        self._deadline = now
        self._ns_idx = 0
        self._list_start = 0
        self.trace: list[InitState] = [self.state]

    @property
    def timeout(self) -> float:
        """CAP.TO: worst-case time to ready, in 500 ms units (Base 3.1.3.1)."""
        return max(((self.cap >> 24) & 0xFF) * 0.5, 0.5)

    def _go(self, st: InitState, now: float | None = None) -> None:
        self.state = st
        self.trace.append(st)
        if now is not None:
            self._deadline = now + self.timeout

    def next_action(self, now: float) -> tuple:
        st = self.state
        if st is InitState.READ_VS:
            return ("prop_get", Property.VS, False)
        if st is InitState.READ_CAP:
            return ("prop_get", Property.CAP, True)
        if st is InitState.READ_CC:
            return ("prop_get", Property.CC, False)
        if st is InitState.CHECK_RDY:
            return ("prop_get", Property.CSTS, False)
        if st is InitState.DISABLE:
            return ("prop_set", Property.CC, self.cc & ~CC_EN, False)
        if st in (InitState.WAIT_NOT_RDY, InitState.WAIT_RDY):
            if now > self._deadline:
                self.state = InitState.ERROR
                raise InitError(st, f"CSTS.RDY did not change within CAP.TO ({self.timeout:g} s)")
            return ("prop_get", Property.CSTS, False)
        if st is InitState.ENABLE:
            # CSS NVM, MPS 4 KiB (0), AMS round robin, IOSQES 6 (64 B), IOCQES 4 (16 B): the
            # values nvmet checks in nvmet_start_ctrl, or it sets CSTS.CFS.
            return ("prop_set", Property.CC, CC_IOSQES | CC_IOCQES | CC_EN, False)
        if st is InitState.IDENTIFY_CTRLR:
            return ("identify", Cns.CONTROLLER, 0)
        if st is InitState.SET_NUM_QUEUES:
            n = self.nr_io_queues - 1
            return ("set_features", FeatureId.NUMBER_OF_QUEUES, (n << 16) | n)
        if st is InitState.CONFIGURE_AER:
            return ("set_features", FeatureId.ASYNC_EVENT_CONFIG, self.aec)
        if st is InitState.IDENTIFY_ACTIVE_NS:
            return ("identify", Cns.ACTIVE_NS_LIST, self._list_start)
        if st is InitState.IDENTIFY_NS:
            return ("identify", Cns.NAMESPACE, self.active_ns[self._ns_idx])
        if st is InitState.IDENTIFY_NS_DESCS:
            return ("identify", Cns.NS_ID_DESCRIPTORS, self.active_ns[self._ns_idx])
        if st is InitState.READY:
            return ("done",)
        raise LocalProtocolError(f"next_action in state {st}")

    def on_result(self, now: float, dw0: int = 0, dw1: int = 0, data=None) -> None:
        st = self.state
        if st is InitState.READ_VS:
            self.vs = dw0
            self._go(InitState.READ_CAP)
        elif st is InitState.READ_CAP:
            self.cap = dw0 | (dw1 << 32)
            mpsmin = (self.cap >> 48) & 0xF
            if mpsmin:
                # Base 3.1.3.5: the host shall set CC.MPS >= CAP.MPSMIN; this host's memory page
                # is 4 KiB (CC.MPS 0), as the kernel host's ("Minimum device page size too large
                # for host": -ENODEV).
                self.state = InitState.ERROR
                raise InitError(st, f"CAP.MPSMIN asks for memory pages of at least "
                                    f"{4096 << mpsmin} bytes; this host uses 4096")
            if not self.cap & 0xFFFF:
                self.state = InitState.ERROR
                raise InitError(st, "CAP.MQES is 0; the smallest queue is 2 entries "
                                    "(Base 3.1.3.1)")
            self._go(InitState.READ_CC)
        elif st is InitState.READ_CC:
            self.cc = dw0
            # SPDK CHECK_EN / kernel: a controller left enabled is disabled first.
            if dw0 & CC_EN:
                self._go(InitState.DISABLE)
            else:
                self._go(InitState.CHECK_RDY)
        elif st is InitState.CHECK_RDY:
            # SPDK CHECK_EN: CC.EN=0 but CSTS.RDY=1 is a controller still disabling: wait for
            # RDY=0 before enabling (Base 3.5.1: EN must not go 0->1 while RDY is 1).
            if dw0 & CSTS_RDY:
                self._go(InitState.WAIT_NOT_RDY, now)
            else:
                self._go(InitState.ENABLE)
        elif st is InitState.DISABLE:
            self._go(InitState.WAIT_NOT_RDY, now)
        elif st is InitState.WAIT_NOT_RDY:
            if not dw0 & CSTS_RDY:
                self._go(InitState.ENABLE)
        elif st is InitState.ENABLE:
            self._go(InitState.WAIT_RDY, now)
        elif st is InitState.WAIT_RDY:
            if dw0 & CSTS_CFS:
                self.state = InitState.ERROR
                raise InitError(st, "controller fatal status (CSTS.CFS) after enable")
            if dw0 & CSTS_RDY:
                self._go(InitState.IDENTIFY_CTRLR)
        elif st is InitState.IDENTIFY_CTRLR:
            self.ctrl = self._parse_ctrl(data) if self._parse_ctrl else bytes(data)
            self._check_identify_controller(st)
            if self.discovery:
                oaes = getattr(self.ctrl, "oaes", 0)
                self.aec = AEC_DISCOVERY_LOG if (oaes & OAES_DISCOVERY_LOG) else 0
                if self.configure_aer and self.aec:
                    self._go(InitState.CONFIGURE_AER)
                else:
                    self._go(InitState.READY)
            else:
                self._go(InitState.SET_NUM_QUEUES)
        elif st is InitState.SET_NUM_QUEUES:
            nsqa = (dw0 & 0xFFFF) + 1
            ncqa = (dw0 >> 16) + 1
            self.io_queues = min(nsqa, ncqa, self.nr_io_queues)
            if self.io_queues < 1:
                self.state = InitState.ERROR
                raise InitError(st, "controller granted no I/O queues")
            oaes = getattr(self.ctrl, "oaes", 0)
            self.aec = AEC_CRITICAL_WARNINGS
            if oaes & OAES_NS_ATTR:
                self.aec |= AEC_NS_ATTR
            if oaes & OAES_FW_ACTIVATION:
                self.aec |= AEC_FW_ACTIVATION
            self._go(InitState.CONFIGURE_AER if self.configure_aer else InitState.IDENTIFY_ACTIVE_NS)
        elif st is InitState.CONFIGURE_AER:
            self._go(InitState.READY if self.discovery else InitState.IDENTIFY_ACTIVE_NS)
        elif st is InitState.IDENTIFY_ACTIVE_NS:
            ids = self._parse_list(data) if self._parse_list else []
            why = ns_list_page_problem(ids, self._list_start)
            if why:
                self.state = InitState.ERROR
                raise InitError(st, why)
            self.active_ns.extend(ids)
            if len(ids) == NS_LIST_PAGE and ids[-1] < 0xFFFFFFFE:
                self._list_start = ids[-1]
                return
            self._next_ns()
        elif st is InitState.IDENTIFY_NS:
            ns = self._parse_ns(data) if self._parse_ns else bytes(data)
            self.namespaces[self.active_ns[self._ns_idx]] = ns
            self._go(InitState.IDENTIFY_NS_DESCS)
        elif st is InitState.IDENTIFY_NS_DESCS:
            nsid = self.active_ns[self._ns_idx]
            self.ns_descs[nsid] = self._parse_descs(data) if self._parse_descs else {}
            self._ns_idx += 1
            self._next_ns()
        else:
            raise LocalProtocolError(f"on_result in state {st}")

    def _check_identify_controller(self, st: InitState) -> None:
        """What the fabrics part of Identify Controller must agree with (the kernel host's
        checks in nvme_init_identify and nvme_tcp_setup_ctrl)."""
        c = self.ctrl
        cntlid = getattr(c, "cntlid", None)
        if self.cntlid is not None and cntlid is not None and cntlid != self.cntlid:
            # Base 5.17.2.1 CNTLID: the controller's identifier, the one the admin Connect
            # returned (NVMe-oF 1.1 3.3); another one is another controller's data.
            self.state = InitState.ERROR
            raise InitError(st, f"Identify Controller CNTLID {cntlid:#x} is not the "
                                f"{self.cntlid:#x} the Connect response gave")
        got = getattr(c, "subnqn", None)
        if not self.discovery and self.subnqn and got and got != self.subnqn:
            # Base 5.17.2.1 SUBNQN: the NVM subsystem's NQN, the one the Connect named; another
            # is another subsystem's controller (the kernel host refuses it: "controller
            # returned incorrect NQN"). Discovery controllers may report a unique discovery NQN
            # when reached through the well-known one (TP 8013), so they are not checked.
            self.state = InitState.ERROR
            raise InitError(st, f"Identify Controller names subsystem {got!r}, not the "
                                f"{self.subnqn!r} connected to")
        if not self.discovery and getattr(c, "icdoff", 0):
            # NVMe-oF 1.1 4.1 ICDOFF: in-capsule data starts ICDOFF * 16 bytes after the SQE;
            # this host places it right after the SQE (the kernel host: "icdoff is not
            # supported!"), so its in-capsule writes would land at the wrong offset.
            self.state = InitState.ERROR
            raise InitError(st, f"the controller wants in-capsule data at offset "
                                f"{c.icdoff * 16} (ICDOFF), which this host does not support")

    def _next_ns(self) -> None:
        if self._ns_idx < len(self.active_ns):
            self._go(InitState.IDENTIFY_NS)
        else:
            self._go(InitState.READY)

    def on_error(self, now: float, err: NvmeStatusError) -> None:
        """An NVMe error status. Optional steps are skipped; the rest fail bring-up."""
        st = self.state
        if st is InitState.IDENTIFY_NS_DESCS:
            # NS ID descriptors are optional before NVMe 1.3: carry on without them.
            self.ns_descs[self.active_ns[self._ns_idx]] = {}
            self._ns_idx += 1
            self._next_ns()
            return
        if st is InitState.IDENTIFY_NS and getattr(err, "sc", None) == 0x0B:
            # The namespace vanished between the list and this Identify: skip it.
            self.active_ns.pop(self._ns_idx)
            self._next_ns()
            return
        if st is InitState.CONFIGURE_AER:
            if self.aec & AEC_CRITICAL_WARNINGS:
                # Retry with the OAES notices only, as the kernel host configures them.
                self.aec &= ~AEC_CRITICAL_WARNINGS
                if self.aec:
                    return
            self.aec = 0
            self._go(InitState.READY if self.discovery else InitState.IDENTIFY_ACTIVE_NS)
            return
        self.state = InitState.ERROR
        raise InitError(st, str(err))
