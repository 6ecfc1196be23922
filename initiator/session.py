"""A controller that stays: connect, watch, reset and reconnect, rescan namespaces.

`Session` is what the bdev layer holds (SPDK's bdev_nvme `nvme_ctrlr`): it owns the current
`Controller` and replaces it when the connection is lost, following SPDK's reset path and the
kernel's defaults: tear down the queues, reconnect the admin queue, re-run bring-up, re-create the
I/O queues; retry every `reconnect_delay` until `ctrl_loss_tmo` (-1: forever).

I/O issued through a Session survives an outage: a command that fails with a transport error (the
connection died under it, or it timed out and the controller was reset) is resubmitted on the new
connection once the controller is live again. Reads and writes of whole LBA ranges are idempotent,
so callers see neither an error nor a duplicate completion. Only after ctrl_loss_tmo (or
fast_io_fail_tmo, if set) do callers get `ControllerUnavailable`.

Namespaces are re-identified after every (re)connect, on a Namespace Attribute Changed event (the
Changed Namespace List log is read first: that re-arms nvmet's notices), and every
`rescan_interval` seconds as a backstop; differences reach `on_namespace(kind, nsid, info)` with
kind "remove", "add", "resize": every removal first (an identity change is a remove, then an add
of the same NSID), then adds and resizes, each in NSID order (`diff_namespaces`).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import uuid as _uuid
from typing import Callable

import trio

from . import _structs as st
from ._errors import DigestError, NvmeError, NvmeStatusError, TransportError
from ._init import InitError
from ._status import is_retryable
from ._util import single_errors
from ._spec import AsyncEventType, Cns, LogPage, NoticeInfo
from .controller import AsyncEvent, Controller, ControllerOptions, open_controller

log = logging.getLogger(__name__)


MAX_RETRIES = 5   # kernel nvme_core max_retries


class CtrlState(enum.Enum):
    CONNECTING = "connecting"
    LIVE = "live"
    RESETTING = "resetting"
    FAILED = "failed"
    DELETING = "deleting"


# The hot paths compare against this module global: an Enum member looked up through its class
# costs about 65 ns on CPython 3.11, more than the rest of the state check.
_LIVE = CtrlState.LIVE


class ControllerUnavailable(TransportError):
    """The controller could not be reached within ctrl-loss-tmo (or fast-io-fail-tmo)."""


class NamespaceGone(NvmeError):
    """The namespace an I/O was issued to is no longer behind its NSID: it was removed, or a
    reconnect or rescan found other identifiers there (a different namespace). The I/O was not
    (re)submitted."""


class NamespaceToken:
    """One namespace's life at its NSID, from the rescan that found it to the one that found it
    gone or replaced (`gone`). It stays the same across resizes. I/O issued with a token is
    never submitted once it is gone, also when it was waiting for a reconnect: the NSID may
    name a different namespace by then (kernel nvme_validate_ns: "identifiers changed for
    nsid", the old namespace is removed and its I/O fails)."""

    __slots__ = ("nsid", "gone")

    def __init__(self, nsid: int):
        self.nsid = nsid
        self.gone = False


@dataclasses.dataclass(slots=True)
class ReconnectPolicy:
    reconnect_delay: float = 10.0     # -c (kernel NVMF_DEF_RECONNECT_DELAY)
    ctrl_loss_tmo: float = 600.0      # -l (kernel default); -1 = forever
    fast_io_fail_tmo: float = -1.0    # off, like the kernel

    def __post_init__(self):
        if self.reconnect_delay <= 0:
            raise ValueError("reconnect delay must be positive")
        if 0 <= self.ctrl_loss_tmo < self.reconnect_delay:
            raise ValueError("ctrl-loss-tmo must be at least reconnect-delay (or -1)")


@dataclasses.dataclass(slots=True)
class NamespaceInfo:
    nsid: int
    block_size: int
    num_blocks: int
    nguid: str | None = None
    eui64: str | None = None
    uuid: str | None = None
    # Set by the Session when it takes this namespace in (`Session._apply`); not identity.
    token: NamespaceToken | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        return self.block_size * self.num_blocks


def _hex_or_none(b) -> str | None:
    return bytes(b).hex() if b and any(b) else None


# LBA data sizes this initiator serves: from 512 B (NVM Command Set 1.0, LBA Format data
# structure, LBADS: "A value smaller than 9 (i.e., 512 bytes) is not supported") up to 64 KiB
# (the kernel host's largest block size, BLK_MAX_BLOCK_SIZE; blk_validate_block_size()).
MIN_LBADS = 9
MAX_LBADS = 16
# A namespace's byte size must fit a signed 64-bit file size (FUSE st_size, lseek).
MAX_NS_BYTES = (1 << 63) - 1


def ns_unusable(ident, max_transfer: int = 0) -> str | None:
    """Why the block device layer cannot use this Identify Namespace, or None.

    What the target says about a namespace is taken on trust elsewhere; here it is checked
    once, before it becomes a bdev, as the kernel host's nvme_update_ns_info_block does (it
    gives such a namespace capacity 0; this initiator leaves it out, with a warning)."""
    idx = ident.format_index
    # NVM Command Set 1.0, Identify Namespace FLBAS: the format index names one of the
    # NLBAF + 1 formats the data structure lists.
    if idx > ident.nlbaf or idx >= len(ident.lbaf):
        return f"FLBAS selects LBA format {idx}, but only {ident.nlbaf + 1} are listed (NLBAF)"
    lbads = ident.lbaf[idx].lbads
    if not MIN_LBADS <= lbads <= MAX_LBADS:
        return (f"LBA data size 2**{lbads} is outside 512 B..64 KiB (LBADS {lbads})")
    if ident.lbaf[idx].ms:
        # Metadata travels with the data on fabrics (extended LBAs: the kernel's "NVMe over
        # Fabrics only supports metadata as part of the extended data LBA"), so every block
        # would move LBADS + MS bytes; this initiator moves LBADS bytes per block only.
        return f"the LBA format has {ident.lbaf[idx].ms} bytes of metadata per block"
    if max_transfer and (1 << lbads) > max_transfer:
        return (f"one {1 << lbads}-byte block is larger than the controller's maximum "
                f"transfer ({max_transfer} bytes, MDTS)")
    if ident.nsze * (1 << lbads) > MAX_NS_BYTES:
        return f"NSZE {ident.nsze} blocks of {1 << lbads} bytes exceed 2**63 - 1 bytes"
    return None


def _ns_info(nsid: int, ident, descs: dict | None) -> NamespaceInfo:
    """Identify Namespace + NS ID descriptors (Base 5.17.2.3) -> NamespaceInfo."""
    descs = descs or {}
    uuid = descs.get(st.NIDT_UUID)
    return NamespaceInfo(
        nsid=nsid, block_size=ident.block_size, num_blocks=ident.nsze,
        nguid=_hex_or_none(descs.get(st.NIDT_NGUID) or ident.nguid),
        eui64=_hex_or_none(descs.get(st.NIDT_EUI64) or ident.eui64),
        uuid=str(_uuid.UUID(bytes=bytes(uuid))) if uuid and any(uuid) else None)


class Session:
    __slots__ = (
        "_done", "_ever_live", "_io_fail", "_live", "_nursery", "_open", "_rescan_wanted", "_stop",
        "_unusable", "_went_live", "ctrl", "error_log", "events_seen", "health", "host",
        "io_max_bytes", "last_error", "name", "namespaces", "on_async_event", "on_namespace",
        "on_state", "opts", "policy", "port", "reconnects", "rescan_interval", "state", "subnqn"
    )

    def __init__(self, host: str, port: int, subnqn: str, opts: ControllerOptions | None = None,
                 policy: ReconnectPolicy | None = None, *, name: str = "nvme0",
                 rescan_interval: float = 60.0):
        self.host = host
        self.port = port
        self.subnqn = subnqn
        self.opts = opts or ControllerOptions()
        self.policy = policy or ReconnectPolicy()
        self.name = name
        self.rescan_interval = rescan_interval
        self.state = CtrlState.CONNECTING
        self.ctrl: Controller | None = None
        self.namespaces: dict[int, NamespaceInfo] = {}
        self.reconnects = 0
        self.last_error: str | None = None
        self.events_seen: list[str] = []
        self.health: dict | None = None
        self.error_log: list[dict] = []
        self.on_namespace: Callable[[str, int, NamespaceInfo], None] | None = None
        self._unusable: dict[int, str] = {}     # NSID -> why it is left out (warned once)
        self.on_state: Callable[[CtrlState, str | None], None] | None = None
        self.on_async_event: Callable[[AsyncEvent], None] | None = None
        self._live = trio.Event()
        self._io_fail = False
        self._rescan_wanted = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._done = trio.Event()
        self._ever_live = False
        self._went_live = False
        # The largest transfer of the controller that was live last (MDTS may change when the
        # target behind the address restarts): what the bdevs split by, also while reconnecting.
        self.io_max_bytes = 0
        # How a connection is made: open_controller's signature; tests drive the reconnect
        # logic with a fake (no sockets).
        self._open = open_controller

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self, nursery: trio.Nursery) -> None:
        """Connect for the first time (errors propagate: a wrong address fails fast), then keep
        the controller alive in the background."""
        self._nursery = nursery
        await nursery.start(self._supervise)

    async def aclose(self) -> None:
        """Shut the controller down cleanly (CC.SHN, Disconnect) and stop reconnecting."""
        self._set_state(CtrlState.DELETING)
        self._stop.set()
        self._live.set()     # wake waiters: they see DELETING and fail
        await self._done.wait()

    def _set_state(self, state: CtrlState, reason: str | None = None) -> None:
        if self.state is state:
            return
        self.state = state
        if reason:
            self.last_error = reason
        log.info("%s: %s%s", self.name, state.value, f" ({reason})" if reason else "")
        if self.on_state is not None:
            self.on_state(state, reason)

    async def _supervise(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        lost_at = None
        try:
            while not self._stop.is_set():
                try:
                    with single_errors():
                        await self._connected_once(task_status)
                except (TransportError, NvmeError, InitError, OSError) as e:
                    if not self._ever_live:
                        raise          # the first connection's error is the caller's
                    self.last_error = str(e)
                if self._went_live:
                    lost_at = None
                    self._went_live = False
                self.ctrl = None
                if self._stop.is_set():
                    break
                if self._live.is_set():
                    # Leaving LIVE: new waiters park on a fresh event. Replace it only then:
                    # tasks already parked on the unset one must be woken by the next LIVE.
                    self._live = trio.Event()
                now = trio.current_time()
                pol = self.policy
                if lost_at is None:
                    lost_at = now
                    self._set_state(CtrlState.RESETTING, self.last_error)
                    if pol.fast_io_fail_tmo >= 0:
                        self._nursery.start_soon(self._fail_fast,
                                                 lost_at + pol.fast_io_fail_tmo, self.reconnects)
                if pol.ctrl_loss_tmo >= 0 and now - lost_at >= pol.ctrl_loss_tmo:
                    self._set_state(CtrlState.FAILED, f"not reconnected within ctrl-loss-tmo "
                                    f"({pol.ctrl_loss_tmo:g} s): {self.last_error}")
                    self._live.set()
                    break
                delay = pol.reconnect_delay
                if pol.ctrl_loss_tmo >= 0:
                    delay = min(delay, max(lost_at + pol.ctrl_loss_tmo - now, 0.0))
                with trio.move_on_after(delay):
                    await self._stop.wait()
        finally:
            self.ctrl = None
            if self.state is not CtrlState.FAILED:
                self._set_state(CtrlState.DELETING)
            self._live.set()
            self._done.set()

    async def _fail_fast(self, deadline: float, reconnects: int) -> None:
        """Kernel nvme_failfast_work: a timer of its own, so that a reconnect attempt stuck in
        a connect timeout neither holds I/O past fast-io-fail-tmo nor shifts the attempts."""
        with trio.move_on_at(deadline):
            await self._stop.wait()
        if self.reconnects == reconnects and self.state is CtrlState.RESETTING:
            self._io_fail = True
            self._live.set()          # waiters wake and fail
            self._live = trio.Event()

    async def _connected_once(self, task_status) -> None:
        """One connection's life: bring-up, live until lost or stopped, then teardown
        (open_controller's exit shuts the controller down when we stop)."""
        async with self._open(self.host, self.port, self.subnqn, self.opts) as c:
            self.ctrl = c
            c.on_async_event = self._on_aen
            self.io_max_bytes = c.max_transfer
            self._update_namespaces(c)
            if self._ever_live:
                self.reconnects += 1
            self._io_fail = False
            self._went_live = True
            self._set_state(CtrlState.LIVE)
            self._live.set()
            if not self._ever_live:
                self._ever_live = True
                task_status.started()
            async with trio.open_nursery() as n:
                n.start_soon(self._rescanner, c)

                async def until(event_wait):
                    await event_wait()
                    n.cancel_scope.cancel()
                n.start_soon(until, c.wait_lost)
                n.start_soon(until, self._stop.wait)
            if c.lost:
                self.last_error = str(c._lost_reason)

    # -- I/O that rides out outages ---------------------------------------------------------
    async def _live_ctrl(self) -> Controller:
        while True:
            c = self.ctrl
            if c is not None and self.state is CtrlState.LIVE and not c.lost:
                return c
            if self.state in (CtrlState.FAILED, CtrlState.DELETING):
                raise ControllerUnavailable(f"{self.name}: controller {self.state.value}"
                                            + (f": {self.last_error}" if self.last_error else ""))
            if self._io_fail:
                raise ControllerUnavailable(f"{self.name}: fast-io-fail-tmo expired while "
                                            f"reconnecting: {self.last_error}")
            await self._live.wait()
            if c is not None and c is self.ctrl and c.lost:
                await trio.sleep(0)   # the supervisor has not noticed yet; let it run

    async def _retry(self, fn, *args, _retries: int = MAX_RETRIES,
                     _token: NamespaceToken | None = None, **kw):
        retries = _retries
        while True:
            c = await self._live_ctrl()
            if _token is not None and _token.gone:
                raise NamespaceGone(f"{self.name}: namespace {_token.nsid} was removed or "
                                    f"replaced (its identifiers changed); I/O not submitted")
            try:
                return await fn(c, *args, **kw)
            except (DigestError, NvmeStatusError, TransportError) as e:
                retries = await self._after_failure(c, e, retries)

    async def _after_failure(self, c: Controller, e: NvmeError, retries: int) -> int:
        """A command on `c` failed with `e`: re-raise it, or return the retries left once it may
        be resubmitted (after the Command Retry Delay, or once `c` is known lost)."""
        if isinstance(e, DigestError):
            retries -= 1
            if retries < 0:
                raise e
            return retries
        if isinstance(e, NvmeStatusError):
            # Only aborted-after-timeout, transient transport and path errors without DNR
            # are retried (bounded like the kernel's max_retries); other errors, with or
            # without DNR, go to the caller: a narrower policy than the kernel's.
            retries -= 1
            if retries < 0 or not (is_retryable(e.sct, e.sc, e.dnr) or
                                   (e.sct == 0 and e.sc == 0x07 and not e.dnr)):
                raise e
            # CRD selects CRDT1-3 of Identify Controller, in 100 ms units (Base 4.2.3.2,
            # kernel nvme_retry_req); it is not a delay itself.
            await trio.sleep(getattr(c.ctrl, f"crdt{e.crd}", 0) / 10 if e.crd else 0)
            return retries
        # TransportError
        if c.lost or self.ctrl is not c or self.state is not CtrlState.LIVE:
            return retries     # resubmit on the next connection
        # The queue died but the controller did not notice yet: wait for it to.
        with trio.move_on_after(self.opts.keep_alive_tmo or 5.0):
            await c.wait_lost()
        if not c.lost:
            raise e
        return retries

    # read/write: the first attempt on a live controller skips _retry's frames (hot path:
    # 1.4 us of 6.1 per 4 KiB read at QD32, docs/performance.md); a failure takes the same
    # decisions as in _retry.
    # `token` (the namespace's NamespaceToken): the I/O fails with NamespaceGone instead of
    # being submitted once that namespace is no longer behind `nsid`.
    async def read(self, nsid: int, slba: int, nlb: int, buf, qhint: int = 0,
                   token: NamespaceToken | None = None) -> None:
        c = self.ctrl
        if (c is not None and self.state is _LIVE and not c.lost
                and (token is None or not token.gone) and len(buf) <= self.io_max_bytes):
            try:
                return await c.read(nsid, slba, nlb, buf, qhint % len(c.io_queues))
            except (DigestError, NvmeStatusError, TransportError) as e:
                retries = await self._after_failure(c, e, MAX_RETRIES)
            await self._retry(_read, nsid, slba, nlb, buf, qhint, _retries=retries, _token=token)
            return
        await self._retry(_read, nsid, slba, nlb, buf, qhint, _token=token)

    def read_nowait(self, nsid: int, slba: int, nlb: int, buf, on_done, qhint: int = 0,
                    token: NamespaceToken | None = None) -> bool:
        """Start a read on the live controller without waiting (`Queue.read_nowait`); False if
        there is none or its queue has no free slot. `on_done(exc)` runs in the queue's reader
        task: None once `buf` holds the data, else the error; then redo it with `read`, which
        retries and reconnects."""
        c = self.ctrl
        if (c is None or self.state is not _LIVE or c.lost
                or (token is not None and token.gone) or len(buf) > self.io_max_bytes):
            return False
        qs = c.io_queues
        try:
            qs[qhint % len(qs)].read_nowait(nsid, slba, nlb, buf, on_done)
        except (trio.WouldBlock, NvmeError):
            return False
        return True

    async def write(self, nsid: int, slba: int, nlb: int, data, qhint: int = 0, *,
                    fua: bool = False, token: NamespaceToken | None = None) -> None:
        c = self.ctrl
        if (c is not None and self.state is _LIVE and not c.lost
                and (token is None or not token.gone) and len(data) <= self.io_max_bytes):
            try:
                return await c.write(nsid, slba, nlb, data, qhint % len(c.io_queues), fua=fua)
            except (DigestError, NvmeStatusError, TransportError) as e:
                retries = await self._after_failure(c, e, MAX_RETRIES)
            await self._retry(_write, nsid, slba, nlb, data, qhint, fua, _retries=retries,
                              _token=token)
            return
        await self._retry(_write, nsid, slba, nlb, data, qhint, fua, _token=token)

    async def flush(self, nsid: int, qhint: int = 0, token: NamespaceToken | None = None) -> None:
        await self._retry(lambda c: c.flush(nsid, qhint % len(c.io_queues)), _token=token)

    async def write_zeroes(self, nsid: int, slba: int, nlb: int, qhint: int = 0,
                           token: NamespaceToken | None = None) -> None:
        await self._retry(lambda c: c.write_zeroes(nsid, slba, nlb, qhint % len(c.io_queues)),
                          _token=token)

    async def deallocate(self, nsid: int, ranges, qhint: int = 0,
                         token: NamespaceToken | None = None) -> None:
        await self._retry(lambda c: c.deallocate(nsid, ranges, qhint % len(c.io_queues)),
                          _token=token)

    async def admin(self, fn):
        """Run `await fn(controller)` on the live controller (admin commands, logs)."""
        return await self._retry(fn)

    @property
    def nr_io_queues(self) -> int:
        c = self.ctrl
        return len(c.io_queues) if c is not None and c.io_queues else self.opts.nr_io_queues

    @property
    def max_transfer(self) -> int:
        c = self.ctrl
        return c.max_transfer if c is not None else 0

    # -- namespaces -------------------------------------------------------------------------
    def _on_aen(self, ev: AsyncEvent) -> None:
        self.events_seen.append(f"type={ev.type} info=0x{ev.info:02x} log=0x{ev.log_page:02x}")
        if ev.type == AsyncEventType.NOTICE and ev.info == NoticeInfo.NS_ATTR_CHANGED:
            self._rescan_wanted.set()
        elif ev.type in (AsyncEventType.ERROR, AsyncEventType.SMART) and self._nursery:
            # Base 5.2: the controller masks further events of this type until the host reads
            # the log page the event names (with RAE cleared): read it, log what it says.
            self._nursery.start_soon(self._clear_event_log, ev)
        if self.on_async_event is not None:
            self.on_async_event(ev)

    async def _clear_event_log(self, ev: AsyncEvent) -> None:
        try:
            if ev.log_page == LogPage.SMART:
                smart = await self.admin(lambda c: c.smart_log())
                self.health = {"critical_warning": smart.critical_warning,
                               "temperature": smart.temperature,
                               "available_spare": smart.available_spare,
                               "media_errors": smart.media_errors}
                log.warning("%s: SMART/health event (info 0x%02x): %s", self.name, ev.info,
                            self.health)
            elif ev.log_page == LogPage.ERROR:
                entries = await self.admin(lambda c: c.error_log())
                live = [e for e in entries if e.error_count]
                self.error_log = [dataclasses.asdict(e) for e in live[:8]]
                log.warning("%s: error event (info 0x%02x): %d error log entries", self.name,
                            ev.info, len(live))
            elif ev.log_page:
                await self.admin(lambda c: c.get_log_page(ev.log_page, 512))
        except (NvmeError, TransportError) as e:
            log.info("%s: reading log page 0x%02x for an event failed: %s", self.name,
                     ev.log_page, e)

    def request_rescan(self) -> None:
        self._rescan_wanted.set()

    async def _rescanner(self, c: Controller) -> None:
        while True:
            if self.rescan_interval > 0:
                with trio.move_on_after(self.rescan_interval):
                    await self._rescan_wanted.wait()
            else:
                await self._rescan_wanted.wait()
            self._rescan_wanted = trio.Event()
            try:
                await self.rescan(c)
            except (TransportError, NvmeError) as e:
                log.warning("%s: namespace rescan failed: %s", self.name, e)

    async def rescan(self, c: Controller | None = None) -> None:
        """Kernel nvme_scan_work: clear the changed-NS log (re-arms the notice), then re-identify
        the active namespaces and diff them against the known set."""
        c = c or await self._live_ctrl()
        try:
            await c.changed_ns_list()
        except NvmeStatusError as e:
            log.info("%s: changed namespace list unavailable: %s", self.name, e)
        active = await c.active_namespaces()
        found: dict[int, NamespaceInfo] = {}
        for nsid in active:
            try:
                ident = await c.identify_namespace(nsid)
                try:
                    descs = st.parse_ns_descriptors(await c.identify(Cns.NS_ID_DESCRIPTORS, nsid))
                except NvmeStatusError:
                    descs = {}
            except NvmeStatusError:
                continue
            if not self._usable(c, nsid, ident):
                continue
            found[nsid] = _ns_info(nsid, ident, descs)
        self._apply(found)

    def _usable(self, c: Controller, nsid: int, ident) -> bool:
        if not ident.nsze:
            return False
        why = ns_unusable(ident, c.max_transfer)
        if why is None:
            return True
        if self._unusable.get(nsid) != why:
            log.warning("%s: namespace %d left out: %s", self.name, nsid, why)
        self._unusable[nsid] = why
        return False

    def _update_namespaces(self, c: Controller) -> None:
        self._unusable = {}
        found = {nsid: _ns_info(nsid, ident, c.ns_descs.get(nsid))
                 for nsid, ident in c.namespaces.items() if self._usable(c, nsid, ident)}
        self._apply(found)

    def _apply(self, found: dict[int, NamespaceInfo]) -> None:
        old = self.namespaces
        events = diff_namespaces(old, found)
        # Tokens first, before any I/O can run: a namespace that stays (maybe resized) keeps its
        # token, a removed or replaced one's is gone, a new one gets a fresh token. On a
        # reconnect this runs before the controller is LIVE, so I/O that waited for it sees
        # the change before it could be resubmitted into another namespace.
        removed = {nsid for kind, nsid in events if kind == "remove"}
        for nsid, info in found.items():
            o = old.get(nsid)
            info.token = (o.token if o is not None and nsid not in removed and o.token
                          else NamespaceToken(nsid))
        for nsid in removed:
            if old[nsid].token is not None:
                old[nsid].token.gone = True
        self.namespaces = found
        cb = self.on_namespace
        for kind, nsid in events:
            log.info("%s: namespace %d %s", self.name, nsid, kind)
            if cb is not None:
                # A remove describes what went away, also when an identity change replaced it.
                cb(kind, nsid, old[nsid] if kind == "remove" else found[nsid])

    def statistics(self) -> dict:
        c = self.ctrl
        return {"name": self.name, "state": self.state.value, "subnqn": self.subnqn,
                "address": f"{self.host}:{self.port}", "reconnects": self.reconnects,
                "last_error": self.last_error, "async_events": list(self.events_seen[-20:]),
                "health": self.health, "error_log": self.error_log,
                "controller": c.statistics() if c is not None else None}


def diff_namespaces(old: dict, new: dict) -> list[tuple[str, int]]:
    """Events turning `old` into `new`: remove (gone, or identity changed), add, resize."""
    events = []
    for nsid in sorted(old):
        o, n = old[nsid], new.get(nsid)
        if n is None or _identity(o) != _identity(n):
            events.append(("remove", nsid))
    for nsid in sorted(new):
        o, n = old.get(nsid), new[nsid]
        if o is None or _identity(o) != _identity(n):
            events.append(("add", nsid))
        elif o.num_blocks != n.num_blocks:
            events.append(("resize", nsid))
    return events


def _identity(ns: NamespaceInfo) -> tuple:
    # A namespace whose NGUID/UUID/EUI64 or LBA size changed is a different namespace.
    return (ns.block_size, ns.nguid, ns.uuid, ns.eui64)


# The first attempt of a read or write fits the controller it was sized for; one that waited for
# a reconnect may not fit the new controller's MDTS (a target restarted with other limits): it
# goes in pieces, one after the other (whole blocks, in order: a pipe sink fills in order). A
# failed piece fails the command, which is resubmitted whole (reads and writes are idempotent).
def _pieces(c: Controller, slba: int, nlb: int, nbytes: int):
    mt = c.max_transfer
    if nbytes <= mt or nlb <= 1:
        yield slba, nlb, 0, nbytes
        return
    bs = nbytes // nlb
    step = max(1, mt // bs)
    for off in range(0, nlb, step):
        n = min(step, nlb - off)
        yield slba + off, n, off * bs, (off + n) * bs


async def _read(c: Controller, nsid, slba, nlb, buf, qhint):
    q = qhint % len(c.io_queues)
    for lba, n, a, b in _pieces(c, slba, nlb, len(buf)):
        await c.read(nsid, lba, n, buf if b - a == len(buf) else buf[a:b], q)


async def _write(c: Controller, nsid, slba, nlb, data, qhint, fua):
    q = qhint % len(c.io_queues)
    for lba, n, a, b in _pieces(c, slba, nlb, len(data)):
        await c.write(nsid, lba, n, data if b - a == len(data) else data[a:b], q, fua=fua)
