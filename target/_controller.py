"""One NVMe-oF controller of the embedded target: registers, features, admin commands, AERs,
the changed-namespace list and keep-alive bookkeeping.

Theory of operation
-------------------
A Connect on an admin queue creates a `Controller` (dynamic controller model: CNTLID 0xFFFF in,
a fresh CNTLID out). The queue core (`_queue.py`) hands it Property Get/Set and every admin
command as plain ints; the controller answers with `(status, dw0, dw1, data)` or `HOLD` for an
Asynchronous Event Request it keeps. Held AERs are completed later through the admin queue's
`complete_async` when an event is posted:

- a namespace is added, removed or resized: `ns_changed(nsid)` appends to the Changed Namespace
  List (1024 entries, then the 0xFFFFFFFF overflow marker) and posts a Notice / NS Attribute
  Changed / LID 04h event, unless that notice is disabled (Asynchronous Event Configuration) or
  masked: after one notice, further ones are masked until the host reads log 04h with RAE
  cleared (Base 2.0 5.2; nvmet `nvmet_aen_bit_disabled` / `nvmet_clear_aen_bit`).
- the discovery log changes (discovery controllers): Notice 0xF0 / LID 70h, masked the same way.
- a fault injection posts any event, bypassing configuration and masks.

Events wait in a queue while no AER is held (nvmet `async_events`).

Keep-alive: `last_keep_alive` is pushed forward by each Keep Alive command (nvmet
`nvmet_execute_keep_alive` -> `mod_delayed_work`; SPDK `last_keep_alive_tick`). The shell's timer
task calls `keep_alive_expired(now)` and, when it says so, `teardown()`, which closes every queue
of the controller (nvmet `nvmet_keep_alive_timer` -> `nvmet_ctrl_fatal_error`; SPDK
`nvmf_ctrlr_keep_alive_poll` -> disconnect all qpairs).

CC/CSTS follow nvmet's `nvmet_update_cc`: CC.EN 0->1 with valid IOSQES/IOCQES/MPS/AMS/CSS sets
CSTS.RDY, invalid ones set CSTS.CFS; CC.EN 1->0 clears RDY and tears down the I/O queues;
CC.SHN set -> CSTS.SHST complete.

Does not: touch sockets, build PDUs (the queue does), or run timers (the shell does).
"""

from __future__ import annotations

import uuid
from collections import deque

from initiator import _structs as st
from initiator._pdu import make_status
from initiator._spec import (
    AdminOpcode, AsyncEventType, CC_EN, CC_SHN_MASK, Cns, CSTS_CFS, CSTS_RDY, CSTS_SHST_COMPLETE,
    CSTS_SHST_MASK, FeatureId, LogPage, NoticeInfo, Property,
)

from ._subsystem import MAX_NAMESPACES, Subsystem

HOLD = None    # admin handler result: the command is held (AER), no completion now

VS_1_4 = 0x00010400
AERL = 3                 # 0's based: 4 outstanding AERs (nvmet NVMET_ASYNC_EVENTS)
ELPE = 63                # 64 error log entries
MAX_ERROR_LOG = ELPE + 1

# Status values (Base 2.0 Figures 100-103; NVMe-oF 1.1 Figure 25).
SUCCESS = 0
INVALID_OPCODE = make_status(0, 0x01, dnr=True)
INVALID_FIELD = make_status(0, 0x02, dnr=True)
DATA_TRANSFER_ERROR = make_status(0, 0x04)
INTERNAL_ERROR = make_status(0, 0x06)
INVALID_NS = make_status(0, 0x0B, dnr=True)
COMMAND_SEQUENCE_ERROR = make_status(0, 0x0C, dnr=True)
SGL_LENGTH_INVALID = make_status(0, 0x0F, dnr=True)
SGL_TYPE_INVALID = make_status(0, 0x11, dnr=True)
SGL_OFFSET_INVALID = make_status(0, 0x16, dnr=True)
TRANSIENT_TRANSPORT_ERROR = make_status(0, 0x22)
LBA_OUT_OF_RANGE = make_status(0, 0x80, dnr=True)
WRITE_FAULT = make_status(2, 0x80)
UNRECOVERED_READ_ERROR = make_status(2, 0x81)
AER_LIMIT_EXCEEDED = make_status(1, 0x05, dnr=True)
INVALID_LOG_PAGE = make_status(1, 0x09, dnr=True)
FEATURE_NOT_SAVEABLE = make_status(1, 0x0D, dnr=True)
CONNECT_INCOMPATIBLE_FORMAT = make_status(1, 0x80, dnr=True)
CONNECT_CONTROLLER_BUSY = make_status(1, 0x81, dnr=True)
CONNECT_INVALID_PARAMETERS = make_status(1, 0x82, dnr=True)
CONNECT_INVALID_HOST = make_status(1, 0x84, dnr=True)

# Asynchronous Event Configuration bits (Base 2.0 Figure 326) we support.
AEC_CRITICAL_WARNINGS = 0xFF
AEC_NS_ATTR = 1 << 8
AEC_DISCOVERY = 1 << 31
AEC_SUPPORTED = AEC_CRITICAL_WARNINGS | AEC_NS_ATTR | AEC_DISCOVERY
_MASK_NS = "ns"
_MASK_DISC = "disc"


def kato_round(ms: int, kas: int) -> int:
    """KATO rounded up to the Keep Alive granularity (KAS in 100 ms units)."""
    g = max(1, kas) * 100
    return -(-ms // g) * g


class Controller:
    def __init__(self, subsys: Subsystem, cntlid: int, hostnqn: str, hostid: str, kato_ms: int):
        t = subsys.target
        self.target = t
        self.subsys = subsys
        self.cntlid = cntlid
        self.hostnqn = hostnqn
        self.hostid = hostid
        self.discovery = subsys.discovery
        if self.discovery and kato_ms == 0:
            kato_ms = t.config.discovery_kato_ms
        self.kato_ms = kato_round(kato_ms, t.kas) if kato_ms else 0
        self.last_keep_alive = t.clock()
        self.cc = 0
        self.csts = 0
        self.cap = (t.mqes & 0xFFFF) | (1 << 16) | (30 << 24) | (1 << 37)   # MQES, CQR, TO 15 s, CSS NVM
        self.max_qid = 0 if self.discovery else t.max_io_queues
        self.queues: dict = {}           # qid -> TargetQueue
        self.admin_queue = None
        self.aec = AEC_DISCOVERY if self.discovery else (AEC_NS_ATTR | AEC_CRITICAL_WARNINGS)
        self.features = {FeatureId.ARBITRATION: 0, FeatureId.POWER_MANAGEMENT: 0,
                         FeatureId.TEMPERATURE_THRESHOLD: 0x157, FeatureId.VOLATILE_WRITE_CACHE: 1,
                         0x05: 0}        # Error Recovery
        self.aer_cids: deque[int] = deque()
        self.events: deque[int] = deque()
        self.aen_masked: set[str] = set()
        self.changed_ns: list[int] = []
        self.changed_overflow = False
        self.errors: deque[st.ErrorLogEntry] = deque(maxlen=MAX_ERROR_LOG)
        self.error_count = 0
        self.closed = False
        self.close_reason = ""
        self.aens_sent = 0

    # -- registers (NVMe-oF Property Get/Set) -----------------------------------------------
    @property
    def ready(self) -> bool:
        return bool(self.csts & CSTS_RDY)

    def prop_get(self, size8: bool, ofst: int) -> tuple[int, int]:
        if size8:
            if ofst == Property.CAP:
                return SUCCESS, self.cap
            return INVALID_FIELD, 0
        if ofst == Property.VS:
            return SUCCESS, VS_1_4
        if ofst == Property.CC:
            return SUCCESS, self.cc
        if ofst == Property.CSTS:
            return SUCCESS, self.csts
        if ofst == Property.CAP:
            return SUCCESS, self.cap & 0xFFFFFFFF
        if ofst == Property.CAP + 4:
            return SUCCESS, self.cap >> 32
        return INVALID_FIELD, 0

    def prop_set(self, size8: bool, ofst: int, value: int) -> int:
        if size8 or ofst != Property.CC:
            return INVALID_FIELD
        value &= 0x00FFFFF1
        old, self.cc = self.cc, value
        if value & CC_EN and not old & CC_EN:
            iosqes, iocqes = (value >> 16) & 0xF, (value >> 20) & 0xF
            mps, ams, css = (value >> 7) & 0xF, (value >> 11) & 0x7, (value >> 4) & 0x7
            # nvmet_cc_*_valid: fabrics controllers take 64-byte SQEs, 16-byte CQEs, 4 KiB pages.
            if (iosqes, iocqes, mps, ams, css) != (6, 4, 0, 0, 0) and not self.discovery:
                self.csts = CSTS_CFS
            elif self.discovery and (mps, ams, css) != (0, 0, 0):
                self.csts = CSTS_CFS
            else:
                self.csts = CSTS_RDY
        elif not value & CC_EN and old & CC_EN:
            self.csts &= ~(CSTS_RDY | CSTS_CFS)
            self._close_io_queues("controller disabled (CC.EN cleared)")
        if value & CC_SHN_MASK and not old & CC_SHN_MASK:
            self.csts = (self.csts & ~CSTS_SHST_MASK) | CSTS_SHST_COMPLETE
        elif not value & CC_SHN_MASK and old & CC_SHN_MASK:
            self.csts &= ~CSTS_SHST_MASK
        return SUCCESS

    # -- admin commands -------------------------------------------------------------------
    def admin(self, opc: int, cid: int, nsid: int, c10: int, c11: int, c12: int, c13: int,
              data_len: int):
        """-> (status, dw0, dw1, data | None), or HOLD."""
        if opc == AdminOpcode.KEEP_ALIVE:
            self.last_keep_alive = self.target.clock()
            return SUCCESS, 0, 0, None
        if opc == AdminOpcode.IDENTIFY:
            return self._identify(nsid, c10, c11, data_len)
        if opc == AdminOpcode.GET_LOG_PAGE:
            return self._get_log_page(nsid, c10, c11, c12, c13)
        if opc == AdminOpcode.ASYNC_EVENT_REQUEST:
            if len(self.aer_cids) > AERL:
                return AER_LIMIT_EXCEEDED, 0, 0, None
            if self.events:
                self.aens_sent += 1
                return SUCCESS, self.events.popleft(), 0, None
            self.aer_cids.append(cid)
            return HOLD
        if opc == AdminOpcode.SET_FEATURES:
            return self._set_features(c10, c11)
        if opc == AdminOpcode.GET_FEATURES:
            return self._get_features(c10, c11)
        if opc == AdminOpcode.ABORT:
            return SUCCESS, 1, 0, None           # dw0 bit 0: command not aborted
        return INVALID_OPCODE, 0, 0, None

    def _identify(self, nsid: int, c10: int, c11: int, data_len: int):
        cns = c10 & 0xFF
        if cns == Cns.CONTROLLER:
            return SUCCESS, 0, 0, self.identify_controller()
        if self.discovery:
            return INVALID_FIELD, 0, 0, None
        nss = self.subsys.namespaces
        if cns == Cns.NAMESPACE:
            if nsid == 0xFFFFFFFF:
                return SUCCESS, 0, 0, st.build_identify_namespace(nsze=0, ncap=0, nuse=0,
                                                                  block_size=512)
            if not 1 <= nsid <= MAX_NAMESPACES:
                return INVALID_NS, 0, 0, None
            ns = nss.get(nsid)
            # nvmet: an inactive NSID in range identifies as all zeroes.
            return SUCCESS, 0, 0, ns.identify() if ns is not None else bytes(4096)
        if cns == Cns.ACTIVE_NS_LIST:
            if nsid >= 0xFFFFFFFE:
                return INVALID_NS, 0, 0, None
            return SUCCESS, 0, 0, st.build_ns_list(nss.keys(), greater_than=nsid)
        if cns == Cns.NS_ID_DESCRIPTORS:
            ns = nss.get(nsid)
            if ns is None:
                return INVALID_NS, 0, 0, None
            return SUCCESS, 0, 0, ns.descriptors()
        return INVALID_FIELD, 0, 0, None

    def identify_controller(self) -> bytes:
        t = self.target
        s = self.subsys
        if self.discovery:
            return st.build_identify_controller(
                sn=s.serial, mn=s.model, fr=t.config.firmware, cntlid=self.cntlid, ver=VS_1_4,
                mdts=t.mdts, oaes=st.OAES_DISCOVERY_LOG_CHANGE, ctratt=st.CTRATT_HOST_ID_128,
                cntrltype=st.CNTRLTYPE_DISCOVERY, aerl=AERL, lpa=st.LPA_EXTENDED_DATA, elpe=ELPE,
                kas=t.kas, sqes=0x66, cqes=0x44, maxcmd=t.mqes + 1, nn=0,
                sgls=st.SGLS_SUPPORTED | st.SGLS_OFFSET, subnqn=s.nqn, ioccsz=4, iorcsz=1,
                msdbd=1)
        return st.build_identify_controller(
            vid=0x1B36, ssvid=0x1AF4, sn=s.serial, mn=s.model, fr=t.config.firmware, rab=6,
            cmic=0x2, mdts=t.mdts, cntlid=self.cntlid, ver=VS_1_4, oaes=st.OAES_NS_ATTR,
            ctratt=st.CTRATT_HOST_ID_128, cntrltype=st.CNTRLTYPE_IO, acl=3, aerl=AERL,
            lpa=st.LPA_EXTENDED_DATA, elpe=ELPE, kas=t.kas, sqes=0x66, cqes=0x44,
            maxcmd=t.mqes + 1, nn=MAX_NAMESPACES, mnan=MAX_NAMESPACES,
            oncs=st.ONCS_DSM | st.ONCS_WRITE_ZEROES, vwc=1,
            sgls=st.SGLS_SUPPORTED | st.SGLS_OFFSET, subnqn=s.nqn, ioccsz=t.ioccsz, iorcsz=1,
            msdbd=1)

    def _get_log_page(self, nsid: int, c10: int, c11: int, c12: int, c13: int):
        lid = c10 & 0xFF
        rae = bool(c10 & (1 << 15))
        length = ((((c11 & 0xFFFF) << 16) | (c10 >> 16)) + 1) * 4
        offset = c12 | (c13 << 32)
        if offset & 3:
            return INVALID_FIELD, 0, 0, None
        if self.discovery:
            if lid != LogPage.DISCOVERY:
                return INVALID_LOG_PAGE, 0, 0, None
            page = self.target.discovery_log(self.hostnqn)
            if not rae:
                self.aen_masked.discard(_MASK_DISC)
        elif lid == LogPage.ERROR:
            page = st.build_error_log(reversed(self.errors), MAX_ERROR_LOG)
        elif lid == LogPage.SMART:
            r, w, br, bw = self.target.io_totals()
            page = st.build_smart_log(temperature=300, data_units_read=-(-br // 512000),
                                      data_units_written=-(-bw // 512000), host_read_commands=r,
                                      host_write_commands=w, power_cycles=1,
                                      num_err_log_entries=self.error_count)
        elif lid == LogPage.FIRMWARE_SLOT:
            b = bytearray(512)
            b[0] = 1
            b[8:16] = self.target.config.firmware.encode()[:8].ljust(8)
            page = bytes(b)
        elif lid == LogPage.CHANGED_NS_LIST:
            page = st.build_changed_ns_list(
                range(st.CHANGED_NS_LIST_MAX + 1) if self.changed_overflow else self.changed_ns)
            # nvmet_execute_get_log_changed_ns: the list is cleared on every read; the notice
            # is unmasked only when RAE is clear.
            self.changed_ns = []
            self.changed_overflow = False
            if not rae:
                self.aen_masked.discard(_MASK_NS)
        else:
            return INVALID_LOG_PAGE, 0, 0, None
        if offset > len(page):
            return INVALID_FIELD, 0, 0, None
        chunk = page[offset:offset + length]
        if len(chunk) < length:
            chunk += bytes(length - len(chunk))
        return SUCCESS, 0, 0, chunk

    def _set_features(self, c10: int, c11: int):
        fid = c10 & 0xFF
        if c10 & (1 << 31):
            return FEATURE_NOT_SAVEABLE, 0, 0, None
        if fid == FeatureId.NUMBER_OF_QUEUES:
            if self.discovery:
                return INVALID_FIELD, 0, 0, None
            if (c11 & 0xFFFF) == 0xFFFF or (c11 >> 16) == 0xFFFF:
                return INVALID_FIELD, 0, 0, None
            n = self.max_qid - 1
            return SUCCESS, n | (n << 16), 0, None
        if fid == FeatureId.ASYNC_EVENT_CONFIG:
            if c11 & ~AEC_SUPPORTED:
                return INVALID_FIELD, 0, 0, None
            self.aec = c11
            return SUCCESS, 0, 0, None
        if fid == FeatureId.KEEP_ALIVE_TIMER:
            self.kato_ms = kato_round(c11, self.target.kas) if c11 else 0
            self.last_keep_alive = self.target.clock()
            return SUCCESS, 0, 0, None
        if fid == FeatureId.HOST_IDENTIFIER:
            return COMMAND_SEQUENCE_ERROR, 0, 0, None     # fabrics: the host ID comes with Connect
        if fid in self.features and not self.discovery:
            self.features[fid] = c11
            return SUCCESS, 0, 0, None
        return INVALID_FIELD, 0, 0, None

    def _get_features(self, c10: int, c11: int):
        fid = c10 & 0xFF
        sel = (c10 >> 8) & 0x7
        if sel == 3:                                   # supported capabilities: changeable
            return SUCCESS, 0x4, 0, None
        if fid == FeatureId.NUMBER_OF_QUEUES and not self.discovery:
            n = self.max_qid - 1
            return SUCCESS, n | (n << 16), 0, None
        if fid == FeatureId.ASYNC_EVENT_CONFIG:
            return SUCCESS, self.aec, 0, None
        if fid == FeatureId.KEEP_ALIVE_TIMER:
            return SUCCESS, self.kato_ms, 0, None
        if fid == FeatureId.HOST_IDENTIFIER:
            return SUCCESS, 0, 0, uuid.UUID(self.hostid).bytes
        if fid in self.features and not self.discovery:
            return SUCCESS, self.features[fid], 0, None
        return INVALID_FIELD, 0, 0, None

    def record_error(self, sqid: int, cid: int, status: int, nsid: int = 0, lba: int = 0) -> None:
        self.error_count += 1
        self.errors.append(st.ErrorLogEntry(error_count=self.error_count, sqid=sqid, cid=cid,
                                            status=status, nsid=nsid, lba=lba,
                                            trtype=st.TRTYPE_TCP))

    # -- asynchronous events --------------------------------------------------------------
    def post_event(self, etype: int, info: int, lid: int, *, force: bool = False) -> bool:
        """Queue an event and complete a held AER if there is one. False if disabled/masked."""
        if self.closed:
            return False
        if not force:
            if etype == AsyncEventType.NOTICE and info == NoticeInfo.NS_ATTR_CHANGED:
                bit, mask = AEC_NS_ATTR, _MASK_NS
            elif etype == AsyncEventType.NOTICE and info == NoticeInfo.DISCOVERY_LOG_CHANGED:
                bit, mask = AEC_DISCOVERY, _MASK_DISC
            else:
                bit, mask = 0, None
            if bit and not self.aec & bit:
                return False
            if mask is not None:
                if mask in self.aen_masked:
                    return False
                self.aen_masked.add(mask)
        self.events.append(st.aen_dw0(etype, info, lid))
        self._deliver()
        return True

    def _deliver(self) -> None:
        q = self.admin_queue
        while self.aer_cids and self.events and q is not None:
            cid = self.aer_cids.popleft()
            dw0 = self.events.popleft()
            self.aens_sent += 1
            q.complete_async(cid, SUCCESS, dw0)

    def ns_changed(self, nsid: int) -> None:
        if not self.changed_overflow:
            if nsid not in self.changed_ns:
                if len(self.changed_ns) >= st.CHANGED_NS_LIST_MAX:
                    self.changed_overflow = True
                    self.changed_ns = []
                else:
                    self.changed_ns.append(nsid)
        self.post_event(AsyncEventType.NOTICE, NoticeInfo.NS_ATTR_CHANGED, LogPage.CHANGED_NS_LIST)

    def discovery_log_changed(self) -> None:
        self.post_event(AsyncEventType.NOTICE, NoticeInfo.DISCOVERY_LOG_CHANGED, LogPage.DISCOVERY)

    # -- keep-alive and teardown ----------------------------------------------------------
    def keep_alive_deadline(self) -> float | None:
        if not self.kato_ms:
            return None
        return self.last_keep_alive + self.kato_ms / 1000.0

    def attach(self, qid: int, queue) -> None:
        self.queues[qid] = queue
        if qid == 0:
            self.admin_queue = queue

    def detach(self, qid: int, queue) -> None:
        if self.queues.get(qid) is queue:
            del self.queues[qid]
        if qid == 0 and not self.closed:
            self.teardown("admin queue closed")

    def _close_io_queues(self, reason: str) -> None:
        for qid, q in list(self.queues.items()):
            if qid:
                q.close(reason)

    def teardown(self, reason: str) -> None:
        """Close all queues and forget the controller (keep-alive expiry, admin queue gone)."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.csts |= CSTS_CFS if "keep-alive" in reason else 0
        self.subsys.controllers.pop(self.cntlid, None)
        for q in list(self.queues.values()):
            q.close(reason)
        self.queues.clear()
        self.admin_queue = None

    def info(self) -> dict:
        return {"cntlid": self.cntlid, "hostnqn": self.hostnqn, "hostid": self.hostid,
                "kato_ms": self.kato_ms, "cc": self.cc, "csts": self.csts,
                "queues": sorted(self.queues), "aers_held": len(self.aer_cids),
                "events_pending": len(self.events), "changed_ns": list(self.changed_ns),
                "aen_masked": sorted(self.aen_masked), "aens_sent": self.aens_sent}
