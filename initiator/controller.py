"""The trio shell of an NVMe-oF host controller: admin queue, bring-up, I/O queues, keep-alive,
asynchronous events, admin commands and a clean shutdown.

Usage:
    async with open_controller(host, port, subnqn, ControllerOptions(...)) as ctrl:
        ctrl.namespaces[1].block_size
        await ctrl.read(1, slba, nblocks, buf)

What it does: connects the admin queue, sends Connect (with KATO), drives the sans-IO
`ControllerInit` machine, connects `nr_io_queues` I/O queues, keeps the target's keep-alive
timer fed (every KATO/2, KATO/4 with TBKAS), keeps AERs outstanding and hands their events to a
callback, and on close sets CC.SHN, waits for CSTS.SHST and disconnects.
What it does not do: reconnect after a loss (`ctrl.wait_lost()` tells the owner; see
`initiator/session.py`), split I/O by MDTS (`namespace.py` does), or know about bdevs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import socket
import uuid as _uuid
from typing import Callable

import trio

from . import _fabrics as fab
from . import _structs as st
from ._errors import (
    CommandTimeout, ConnectionLost, LocalProtocolError, NvmeError, NvmeStatusError,
    ProtocolError, TransportError,
)
from ._init import ControllerInit, InitState, ns_list_page_problem
from ._util import set_tcp_congestion, single_errors
from ._spec import (
    ADMIN_QUEUE_IN_CAPSULE, CC_SHN_NORMAL, CSTS_SHST_COMPLETE, CSTS_SHST_MASK, AdminOpcode,
    Cns, DSM_ATTR_DEALLOCATE, IoOpcode, LogPage, Property, WZ_DEAC,
)
from .transport import Queue

log = logging.getLogger(__name__)

ADMIN_QUEUE_SIZE = 32          # kernel NVME_AQ_DEPTH
MAX_AERS = 8                   # SPDK NVME_MAX_ASYNC_EVENTS
CTRATT_TBKAS = 1 << 6          # Base 5.17.2.1: Traffic Based Keep Alive Support
# Per-command transfer cap: the kernel host's NVME_TCP_MAX_SEGMENTS (256) pages = 1 MiB.
TRANSPORT_MAX_TRANSFER = 1 << 20
# The most discovery log records read: NUMREC comes from the target, and 2**40 of them would
# be one bytearray of 1 PiB (a MemoryError). 1024 records are 1 MiB, one transfer.
MAX_DISCOVERY_RECORDS = 1024
TIMEOUT_TICK = 0.5             # resolution of command timeout detection, seconds


def _machine_hostid() -> str:
    """nvme-cli's /etc/nvme/hostid if present, else a UUID stable for this machine."""
    try:
        with open("/etc/nvme/hostid") as f:
            return str(_uuid.UUID(f.read().strip()))
    except (OSError, ValueError):
        pass
    try:
        with open("/etc/machine-id") as f:
            mid = f.read().strip()
    except OSError:
        mid = os.uname().nodename
    return str(_uuid.uuid5(_uuid.NAMESPACE_OID, "blockfs-host:" + mid))


def default_hostnqn() -> str:
    try:
        with open("/etc/nvme/hostnqn") as f:
            v = f.read().strip()
            if v:
                return v
    except OSError:
        pass
    return fab.default_hostnqn(_machine_hostid())


#: The Connect command's KATO field is 32 bits of milliseconds.
_MAX_KATO_S = 0xFFFFFFFF // 1000


@dataclasses.dataclass(slots=True)
class ControllerOptions:
    """nvme-cli's connect options, with the kernel's defaults."""

    hostnqn: str = ""
    hostid: str = ""
    keep_alive_tmo: float = 5.0          # -k, seconds (kernel NVME_DEFAULT_KATO)
    nr_io_queues: int = 1                # -i
    queue_size: int = 128                # -Q (kernel default; 16..1024)
    hdr_digest: bool = False             # -g
    data_digest: bool = False            # -G
    connect_timeout: float = 10.0
    admin_timeout: float = 60.0          # kernel admin_timeout
    io_timeout: float = 30.0             # kernel io_timeout
    disable_sqflow: bool = True          # Connect CATTR bit 2 (docs/hot-path.md: +55%)
    poll_us: float = 50.0                # I/O queue readers poll this long for completions
                                         # while commands are outstanding; 0 = never
    tcp_congestion: str | None = None    # TCP congestion control of every queue's socket
                                         # (TCP_CONGESTION, e.g. "cubic"); None = the system's
    discovery: bool = False
    aer: bool = True

    def __post_init__(self):
        if not self.hostid:
            self.hostid = _machine_hostid()
        if not self.hostnqn:
            self.hostnqn = default_hostnqn()
        if not 2 <= self.queue_size <= 1024:
            raise ValueError("queue size must be between 2 and 1024")
        if not 1 <= self.nr_io_queues <= 128:
            raise ValueError("number of I/O queues must be between 1 and 128")
        if not 0 <= self.keep_alive_tmo <= _MAX_KATO_S:   # also refuses NaN
            raise ValueError(f"keep-alive timeout must be between 0 and {_MAX_KATO_S} seconds")
        if self.poll_us < 0:
            raise ValueError("poll time must not be negative")
        if self.tcp_congestion:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                set_tcp_congestion(probe, self.tcp_congestion)   # ValueError: not offered here


@dataclasses.dataclass(slots=True)
class AsyncEvent:
    """Base 5.2: an AER completion's dword 0, decoded."""

    type: int
    info: int
    log_page: int
    raw: int

    @classmethod
    def from_dw0(cls, dw0: int) -> "AsyncEvent":
        return cls(type=dw0 & 0x7, info=(dw0 >> 8) & 0xFF, log_page=(dw0 >> 16) & 0xFF, raw=dw0)


class Controller:
    """A connected controller. Build with `open_controller()`."""

    __slots__ = (
        "_closing", "_lost", "_lost_reason", "_nursery", "admin", "aec", "cap", "cntlid", "ctrl",
        "host", "init_trace", "io_queues", "kato_ms", "keep_alives_sent", "keep_alives_skipped",
        "last_error", "lost", "namespaces", "ns_descs", "on_async_event", "opts", "port", "subnqn",
        "timeouts", "vs"
    )

    def __init__(self, host: str, port: int, subnqn: str, opts: ControllerOptions):
        self.host = host
        self.port = port
        self.subnqn = subnqn
        self.opts = opts
        self.admin: Queue | None = None
        self.io_queues: list[Queue] = []
        self.cntlid = 0
        self.vs = 0
        self.cap = 0
        self.ctrl: st.IdentifyController | None = None
        self.namespaces: dict[int, st.IdentifyNamespace] = {}
        self.ns_descs: dict[int, dict] = {}
        self.aec = 0
        self.kato_ms = int(opts.keep_alive_tmo * 1000)
        self.on_async_event: Callable[[AsyncEvent], None] | None = None
        self.keep_alives_sent = 0
        self.keep_alives_skipped = 0
        self.timeouts = 0
        self.last_error: str | None = None
        self._lost = trio.Event()
        self.lost = False        # the controller is lost (set with _lost; a plain attribute for
                                 # the hot path, which checks it on every submission)
        self._lost_reason: TransportError | None = None
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self.init_trace: list[InitState] = []

    # -- bring-up ---------------------------------------------------------------------------
    async def _connect_queue(self, qid: int, size: int) -> Queue:
        o = self.opts
        in_capsule = ADMIN_QUEUE_IN_CAPSULE
        if qid and self.ctrl is not None:
            # NVMe-oF 4.1 / SPDK: I/O queue in-capsule data = IOCCSZ * 16 - 64 (SQE). An
            # IOCCSZ below 4 (0 is invalid: the capsule holds at least the SQE) allows none:
            # the admin queue's 8 KiB would be a guess a strict target refuses.
            in_capsule = max(getattr(self.ctrl, "ioccsz", 0) * 16 - 64, 0)
        q = await Queue.connect(self.host, self.port, qid, size - 1, hdgst=o.hdr_digest,
                                ddgst=o.data_digest, timeout=o.connect_timeout,
                                in_capsule_max=in_capsule, tcp_congestion=o.tcp_congestion)
        q.spin = o.poll_us / 1e6 if qid else 0.0
        q.start(self._nursery)
        try:
            with trio.fail_after(o.connect_timeout):
                data = fab.connect_data(o.hostid, 0xFFFF if qid == 0 else self.cntlid,
                                        self.subnqn, o.hostnqn)
                dw0, _ = await q.submit(AdminOpcode.FABRICS, data=data,
                                        fabrics_raw=fab.connect_sqe(qid, size - 1, self.kato_ms,
                                                                    disable_sqflow=o.disable_sqflow))
        except trio.TooSlowError:
            q.close("connect timed out")
            raise CommandTimeout(f"Connect on queue {qid} got no answer within "
                                 f"{o.connect_timeout:g} s") from None
        except NvmeStatusError as e:
            q.close("connect failed")
            hint = ""
            if e.sct == 1 and e.sc in (0x82, 0x84):
                hint = " (unknown subsystem NQN, or this host NQN is not allowed)"
            raise NvmeStatusError(e.sct, e.sc, e.dnr, opcode=e.opcode, cid=e.cid,
                                  context=f"Connect to {self.subnqn} at {self.host}:{self.port} "
                                          f"refused{hint}") from None
        except BaseException:
            q.close("connect failed")
            raise
        cntlid, authreq = fab.connect_result(dw0)
        if authreq:
            q.close("authentication required")
            raise LocalProtocolError("the target requires in-band authentication "
                                     "(DH-HMAC-CHAP), which blockfs does not implement")
        if qid == 0:
            self.cntlid = cntlid
        self._nursery.start_soon(self._watch_queue, q)
        return q

    async def _watch_queue(self, q: Queue) -> None:
        exc = await q.wait_closed()
        if not self._closing:
            self._mark_lost(exc)

    def _mark_lost(self, exc: TransportError) -> None:
        if self._lost.is_set():
            return
        self._lost_reason = exc
        self.lost = True
        self.last_error = str(exc)
        log.warning("controller %s:%d (%s) lost: %s", self.host, self.port, self.subnqn, exc)
        self._lost.set()
        for q in [self.admin, *self.io_queues]:
            if q is not None:
                q.close(f"controller lost: {exc}")

    async def _bring_up(self) -> None:
        o = self.opts
        self.admin = await self._connect_queue(0, ADMIN_QUEUE_SIZE)
        init = ControllerInit(nr_io_queues=o.nr_io_queues, discovery=o.discovery,
                              now=trio.current_time(), configure_aer=o.aer, cntlid=self.cntlid,
                              subnqn=self.subnqn,
                              parse_identify_controller=st.IdentifyController.from_bytes,
                              parse_identify_namespace=st.IdentifyNamespace.from_bytes,
                              parse_ns_descriptors=st.parse_ns_descriptors,
                              parse_ns_list=st.parse_ns_list)
        while True:
            act = init.next_action(trio.current_time())
            kind = act[0]
            if kind == "done":
                break
            try:
                with trio.fail_after(o.admin_timeout):
                    if kind == "prop_get":
                        dw0, dw1 = await self.property_get(act[1], act[2])
                        init.on_result(trio.current_time(), dw0, dw1)
                    elif kind == "prop_set":
                        await self.property_set(act[1], act[2], act[3])
                        init.on_result(trio.current_time())
                    elif kind == "identify":
                        data = await self.identify(act[1], act[2])
                        init.on_result(trio.current_time(), data=data)
                    elif kind == "set_features":
                        dw0 = await self.set_features(act[1], act[2])
                        init.on_result(trio.current_time(), dw0)
                    else:
                        raise LocalProtocolError(f"unknown init action {kind}")
            except NvmeStatusError as e:
                init.on_error(trio.current_time(), e)
            except trio.TooSlowError:
                raise CommandTimeout(f"controller init: '{init.state.value}' got no completion "
                                     f"within {o.admin_timeout:g} s") from None
            if init.state in (InitState.WAIT_RDY, InitState.WAIT_NOT_RDY):
                await trio.sleep(0.01)
        self.init_trace = init.trace
        self.vs, self.cap, self.ctrl = init.vs, init.cap, init.ctrl
        self.aec = init.aec
        self.namespaces = dict(init.namespaces)
        self.ns_descs = dict(init.ns_descs)
        if self.kato_ms:
            # The Connect asked for KATO: the controller's timer runs whatever Identify KAS says
            # (Keep Alive is mandatory on fabrics, NVMe-oF 1.1 3.5; a KAS 0 target that expires
            # KATO dropped the connection every KATO). The kernel host's nvme_start_keep_alive
            # looks at KATO only.
            if not getattr(self.ctrl, "kas", 1):
                log.info("controller reports KAS 0; sending Keep Alive every %g s anyway (KATO "
                         "%d ms)", self.keep_alive_interval, self.kato_ms)
            self._nursery.start_soon(self._keep_alive_loop)
        if self.aec:
            aerl = getattr(self.ctrl, "aerl", 3)
            for _ in range(min(aerl + 1, MAX_AERS)):
                self._nursery.start_soon(self._aer_loop)
        if not o.discovery:
            size = self.io_queue_size
            if size < o.queue_size:
                log.info("I/O queue size %d clamped to %d (CAP.MQES %d, MAXCMD %d)",
                         o.queue_size, size, self.cap & 0xFFFF, getattr(self.ctrl, "maxcmd", 0))
            for qid in range(1, init.io_queues + 1):
                self.io_queues.append(await self._connect_queue(qid, size))
        self._nursery.start_soon(self._timeout_checker)

    @property
    def io_queue_size(self) -> int:
        """Entries per I/O queue: -Q, clamped to CAP.MQES + 1 (Base 3.1.3.1: the largest queue
        the controller supports; a Connect SQSIZE above it is refused) and to MAXCMD (Base
        5.17.2.1, mandatory on fabrics: commands the controller takes at once), as the kernel
        host (nvme_tcp_setup_ctrl: "clamping down") and SPDK clamp them."""
        size = min(self.opts.queue_size, (self.cap & 0xFFFF) + 1)
        maxcmd = getattr(self.ctrl, "maxcmd", 0)
        if maxcmd:
            size = min(size, maxcmd)
        return max(size, 2)

    # -- admin commands ---------------------------------------------------------------------
    async def property_get(self, offset: int, size8: bool = False) -> tuple[int, int]:
        return await self.admin.submit(AdminOpcode.FABRICS, fabrics_raw=fab.property_get_sqe(offset, size8))

    async def property_set(self, offset: int, value: int, size8: bool = False) -> None:
        await self.admin.submit(AdminOpcode.FABRICS,
                                fabrics_raw=fab.property_set_sqe(offset, value, size8))

    async def identify(self, cns: int, nsid: int = 0, cntid: int = 0) -> bytearray:
        buf = bytearray(4096)
        await self.admin.submit(AdminOpcode.IDENTIFY, nsid, cns | (cntid << 16),
                                read_buf=memoryview(buf))
        return buf

    async def identify_namespace(self, nsid: int) -> "st.IdentifyNamespace":
        return st.IdentifyNamespace.from_bytes(await self.identify(Cns.NAMESPACE, nsid))

    async def active_namespaces(self) -> list[int]:
        """Identify active namespace list, paged as bring-up pages it. A page that breaks
        Base 5.17.2.2 (not strictly ascending after the NSID asked with, or FFFFFFFFh) is a
        ProtocolError: a target repeating one full page would otherwise be asked forever."""
        ids: list[int] = []
        start = 0
        while True:
            page = st.parse_ns_list(await self.identify(Cns.ACTIVE_NS_LIST, start))
            why = ns_list_page_problem(page, start)
            if why:
                raise ProtocolError(why)
            ids.extend(page)
            if len(page) < 1024 or page[-1] >= 0xFFFFFFFE:
                return ids
            start = page[-1]

    async def get_log_page(self, lid: int, length: int, *, offset: int = 0, lsp: int = 0,
                           rae: bool = False, nsid: int = 0xFFFFFFFF) -> bytearray:
        """Base 5.16: read `length` bytes (dword multiple) of log page `lid` from `offset`."""
        if length % 4 or length <= 0 or offset % 4:
            raise LocalProtocolError("log page length and offset must be dword multiples")
        buf = bytearray(length)
        numd = length // 4 - 1
        await self.admin.submit(AdminOpcode.GET_LOG_PAGE, nsid,
                                lid | (lsp << 8) | (0x8000 if rae else 0) | ((numd & 0xFFFF) << 16),
                                numd >> 16, offset & 0xFFFFFFFF, offset >> 32,
                                read_buf=memoryview(buf))
        return buf

    async def get_features(self, fid: int, cdw11: int = 0, sel: int = 0) -> int:
        dw0, _ = await self.admin.submit(AdminOpcode.GET_FEATURES, 0, fid | (sel << 8), cdw11)
        return dw0

    async def set_features(self, fid: int, cdw11: int, *, save: bool = False) -> int:
        dw0, _ = await self.admin.submit(AdminOpcode.SET_FEATURES, 0,
                                         fid | (0x80000000 if save else 0), cdw11)
        return dw0

    async def keep_alive(self) -> None:
        await self.admin.submit(AdminOpcode.KEEP_ALIVE)
        self.keep_alives_sent += 1

    async def abort(self, sqid: int, cid: int) -> bool:
        """Base 5.1: Abort. True if the command was aborted (DW0 bit 0 clear)."""
        dw0, _ = await self.admin.submit(AdminOpcode.ABORT, 0, sqid | (cid << 16))
        return not dw0 & 1

    async def smart_log(self) -> "st.SmartLog":
        return st.SmartLog.from_bytes(await self.get_log_page(LogPage.SMART, 512))

    async def error_log(self, entries: int = 16) -> list:
        n = max(1, min(entries, getattr(self.ctrl, "elpe", 0) + 1))
        return st.parse_error_log(await self.get_log_page(LogPage.ERROR, 64 * n))

    async def changed_ns_list(self) -> list[int] | None:
        """Log 0x04 (reading it re-arms the target's namespace notices); None = overflow."""
        return st.parse_changed_ns_list(await self.get_log_page(LogPage.CHANGED_NS_LIST, 4096))

    async def discovery_log(self, max_tries: int = 10) -> tuple[int, list]:
        """NVMe-oF 5.3 / libnvme: header, entries, header again; retry while GENCTR moves.
        At most MAX_DISCOVERY_RECORDS entries are read (NUMREC is the target's word), in
        pieces no larger than one transfer (MDTS), as libnvme does."""
        for _ in range(max_tries):
            hdr = st.DiscoveryLogHeader.from_bytes(await self.get_log_page(LogPage.DISCOVERY, 1024,
                                                                           nsid=0))
            numrec = hdr.numrec
            if numrec > MAX_DISCOVERY_RECORDS:
                log.warning("discovery log: NUMREC %d, only the first %d records are read",
                            numrec, MAX_DISCOVERY_RECORDS)
                numrec = MAX_DISCOVERY_RECORDS
            entries = []
            step = max(1, self.max_transfer // st.DISCOVERY_ENTRY_SIZE)
            for first in range(0, numrec, step):
                n = min(step, numrec - first)
                raw = await self.get_log_page(
                    LogPage.DISCOVERY, n * st.DISCOVERY_ENTRY_SIZE,
                    offset=st.DISCOVERY_HEADER_SIZE + first * st.DISCOVERY_ENTRY_SIZE, nsid=0)
                entries += [st.DiscoveryLogEntry.from_bytes(raw, i * st.DISCOVERY_ENTRY_SIZE)
                            for i in range(n)]
            again = st.DiscoveryLogHeader.from_bytes(await self.get_log_page(LogPage.DISCOVERY, 1024,
                                                                             nsid=0))
            if again.genctr == hdr.genctr:
                return hdr.genctr, entries
        raise TransportError("discovery log kept changing while being read (GENCTR)")

    # -- I/O commands (no splitting: callers respect max_transfer) ---------------------------
    @property
    def max_transfer(self) -> int:
        """Largest data transfer of one command in bytes: MDTS (Base 5.17.2.1, in units of
        CAP.MPSMIN pages), capped at TRANSPORT_MAX_TRANSFER. nvmet reports MDTS 0 (no limit)
        yet rejects transfers over 4 MiB; the kernel host never sends more than 1 MiB."""
        mdts = getattr(self.ctrl, "mdts", 0)
        if not mdts:
            return TRANSPORT_MAX_TRANSFER
        mpsmin = (self.cap >> 48) & 0xF
        return min((1 << mdts) * (4096 << mpsmin), TRANSPORT_MAX_TRANSFER)

    async def read(self, nsid: int, slba: int, nlb: int, buf, qidx: int = 0) -> None:
        await self.io_queues[qidx].read(nsid, slba, nlb, buf)

    async def write(self, nsid: int, slba: int, nlb: int, data, qidx: int = 0, *,
                    fua: bool = False) -> None:
        await self.io_queues[qidx].write(nsid, slba, nlb, data, fua=fua)

    async def flush(self, nsid: int, qidx: int = 0) -> None:
        await self.io_queues[qidx].submit(IoOpcode.FLUSH, nsid)

    async def write_zeroes(self, nsid: int, slba: int, nlb: int, qidx: int = 0, *,
                           deallocate: bool = False) -> None:
        await self.io_queues[qidx].submit(IoOpcode.WRITE_ZEROES, nsid, slba & 0xFFFFFFFF,
                                          slba >> 32, (nlb - 1) | (WZ_DEAC if deallocate else 0))

    async def deallocate(self, nsid: int, ranges: list[tuple[int, int]], qidx: int = 0) -> None:
        """Dataset Management, Deallocate (NVM Command Set 3.2.3): up to 256 (slba, nlb) ranges."""
        if not 1 <= len(ranges) <= 256:
            raise LocalProtocolError("DSM takes 1..256 ranges")
        data = b"".join(st.DSM_RANGE.pack(0, nlb, slba) for slba, nlb in ranges)
        await self.io_queues[qidx].submit(IoOpcode.DATASET_MANAGEMENT, nsid, len(ranges) - 1,
                                          DSM_ATTR_DEALLOCATE, data=data)

    # -- background tasks -------------------------------------------------------------------
    @property
    def keep_alive_interval(self) -> float:
        """KATO/2, or KATO/4 with TBKAS (kernel nvme_keep_alive_work_period)."""
        tbkas = getattr(self.ctrl, "ctratt", 0) & CTRATT_TBKAS
        return self.kato_ms / 1000 / (4 if tbkas else 2)

    @property
    def keep_alive_timeout(self) -> float:
        """How long one Keep Alive may take. Sent every KATO/2 and given KATO/2 to answer, a
        silent target is noticed within KATO of its last answer (plus scheduling slack)."""
        return max(self.kato_ms / 2000, 0.5)

    def _completions(self) -> int:
        return sum(q.completions for q in [self.admin, *self.io_queues] if q is not None)

    async def _keep_alive_loop(self) -> None:
        """Kernel nvme_keep_alive_work: every KATO/2 (KATO/4 with TBKAS). With TBKAS
        (Base 5.27.1.12: traffic-based keep alive) a completion since the last tick counts as
        keep-alive and no command is sent."""
        interval = self.keep_alive_interval
        tbkas = bool(getattr(self.ctrl, "ctratt", 0) & CTRATT_TBKAS)
        seen = self._completions()
        while True:
            await trio.sleep(interval)
            if tbkas:
                now_seen = self._completions()
                if now_seen != seen:
                    seen = now_seen
                    self.keep_alives_skipped += 1
                    continue
            try:
                with trio.fail_after(self.keep_alive_timeout):
                    await self.keep_alive()
            except trio.TooSlowError:
                self._mark_lost(CommandTimeout(f"keep-alive got no answer within "
                                               f"{self.keep_alive_timeout:g} s"))
                return
            except NvmeStatusError as e:
                log.warning("keep-alive failed: %s", e)
                self._mark_lost(ConnectionLost(f"keep-alive failed: {e}"))
                return
            except TransportError:
                return
            seen = self._completions()

    async def _timeout_checker(self) -> None:
        """SPDK's action_on_timeout = abort, then reset: a command outstanding longer than its
        timeout is aborted (Base 5.1); if it is still outstanding one timeout later, the
        controller is reset (the session reconnects and resubmits)."""
        tick = TIMEOUT_TICK
        o = self.opts
        while True:
            await trio.sleep(tick)
            for q in [self.admin, *self.io_queues]:
                if q is None or q.closed is not None:
                    continue
                q.epoch += 1
                limit = o.admin_timeout if q.qid == 0 else o.io_timeout
                if limit <= 0:
                    continue
                # Round up: a command is never aborted (or reset) before its timeout.
                max_age = max(math.ceil(limit / tick), 1)
                for cid, opc in q.overdue(max_age):
                    if q.qid == 0 and opc in (AdminOpcode.ASYNC_EVENT_REQUEST,
                                              AdminOpcode.KEEP_ALIVE):
                        continue      # AERs wait for events; keep-alive has its own timeout
                    if not q.aborted[cid]:
                        q.aborted[cid] = True
                        self.timeouts += 1
                        log.warning("queue %d command %d (opcode 0x%02x) timed out after %g s: "
                                    "aborting", q.qid, cid, opc, limit)
                        self._nursery.start_soon(self._abort_quietly, q.qid, cid)
                    elif q.submit_epoch[cid] < q.epoch - 2 * max_age:
                        self._mark_lost(CommandTimeout(
                            f"queue {q.qid} command {cid} (opcode 0x{opc:02x}) still "
                            f"outstanding {2 * limit:g} s after submission and abort: resetting"))
                        return

    async def _abort_quietly(self, sqid: int, cid: int) -> None:
        try:
            with trio.move_on_after(self.opts.admin_timeout):
                aborted = await self.abort(sqid, cid)
                log.info("abort of queue %d command %d: %s", sqid, cid,
                         "aborted" if aborted else "not aborted")
        except (NvmeStatusError, TransportError) as e:
            log.info("abort of queue %d command %d failed: %s", sqid, cid, e)

    async def _aer_loop(self) -> None:
        while True:
            try:
                dw0, _ = await self.admin.submit(AdminOpcode.ASYNC_EVENT_REQUEST)
            except NvmeStatusError as e:
                if e.sct == 1 and e.sc == 0x05:   # AER limit exceeded: fewer slots than asked
                    return
                if e.sct == 0 and e.sc == 0x07:   # aborted by request (shutdown)
                    return
                log.warning("AER failed: %s", e)
                return
            except TransportError:
                return
            ev = AsyncEvent.from_dw0(dw0)
            log.info("asynchronous event: type %d info 0x%02x log page 0x%02x", ev.type, ev.info,
                     ev.log_page)
            cb = self.on_async_event
            if cb is not None:
                cb(ev)

    # -- loss and shutdown ------------------------------------------------------------------
    async def wait_lost(self) -> TransportError:
        await self._lost.wait()
        return self._lost_reason

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Base 3.6.2: CC.SHN normal, wait for CSTS.SHST complete, then Disconnect queues."""
        if self.admin is None or self.admin.closed or self.lost:
            return
        self._closing = True
        try:
            with trio.move_on_after(timeout):
                cc, _ = await self.property_get(Property.CC)
                await self.property_set(Property.CC, (cc & ~(3 << 14)) | CC_SHN_NORMAL)
                while True:
                    csts, _ = await self.property_get(Property.CSTS)
                    if csts & CSTS_SHST_MASK == CSTS_SHST_COMPLETE:
                        break
                    await trio.sleep(0.01)
        except NvmeError as e:
            log.info("shutdown: %s", e)
        for q in [*self.io_queues, self.admin]:
            if q.closed is None:
                with trio.move_on_after(1.0):
                    try:
                        await q.submit(AdminOpcode.FABRICS, fabrics_raw=fab.disconnect_sqe())
                    except NvmeError:
                        pass   # Disconnect is optional (NVMe-oF 1.1); closing the socket suffices

    def close_queues(self) -> None:
        self._closing = True
        for q in [*self.io_queues, self.admin]:
            if q is not None:
                q.close("controller closed")

    def statistics(self) -> dict:
        return {"cntlid": self.cntlid, "subnqn": self.subnqn, "lost": self.lost,
                "last_error": self.last_error, "keep_alives_sent": self.keep_alives_sent,
                "keep_alives_skipped": self.keep_alives_skipped, "timeouts": self.timeouts,
                "queues": [q.statistics() for q in [self.admin, *self.io_queues] if q]}


@contextlib.asynccontextmanager
async def open_controller(host: str, port: int, subnqn: str,
                          opts: ControllerOptions | None = None):
    """Connect and bring up a controller; shut it down cleanly on exit."""
    opts = opts or ControllerOptions()
    ctrl = Controller(host, port, subnqn, opts)
    with single_errors():
        async with trio.open_nursery() as nursery:
            ctrl._nursery = nursery
            try:
                await ctrl._bring_up()
                yield ctrl
                await ctrl.shutdown()
            finally:
                ctrl.close_queues()
                nursery.cancel_scope.cancel()
