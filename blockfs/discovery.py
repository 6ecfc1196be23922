"""Connect-all (`blockfs mount --discovery`): attach every NVM subsystem a discovery controller
lists, and with `--persistent` keep following it (nvme-cli `connect-all`, SPDK
`bdev_nvme_start_discovery`).

The discovery controller is held as a Session (so it is reconnected like any controller) when
persistent; its log page is re-read on a Discovery Log Page Change event (Base 5.2: notice
0xF0, log 0x70), after every reconnect and every `--rescan-interval` as a backstop. Subsystems
that appear are attached (`nvme1`, `nvme2`, ...: controllers are numbered in attach order) and
ones that vanish are detached: their bdevs are hot-removed and their controllers shut down.

Addresses: an entry on the port we reached the discovery controller through (the same PORTID
as the "current discovery subsystem" entry) is connected at the address we used, because a
target behind NAT (or the test VM) advertises an address only it can reach. Other entries are
connected at their advertised TRADDR/TRSVCID. Referrals are listed in the log, not followed.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import trio

from initiator import _structs as st
from initiator._errors import NvmeError, TransportError
from initiator._spec import AsyncEventType, DISCOVERY_NQN, NoticeInfo
from initiator.controller import ControllerOptions, open_controller
from initiator.session import CtrlState, Session

log = logging.getLogger(__name__)

# nvme-cli: a persistent discovery controller uses KATO 30 s (NVMF_DEF_DISC_TMO).
PERSISTENT_DISCOVERY_KATO = 30.0


def tcp_port(trsvcid: str) -> int | None:
    """TRSVCID as a TCP port (NVMe/TCP: the port number in ASCII decimal; empty means 4420),
    or None when it is not one. Checked here because getaddrinfo takes a port modulo 65536
    (99999 would connect to 34463) and int() takes non-ASCII digits."""
    if not trsvcid:
        return 4420
    if not (trsvcid.isascii() and trsvcid.isdigit()) or not 1 <= int(trsvcid) <= 65535:
        return None
    return int(trsvcid)


def reachable_address(entry, discovery_entries, host: str, port: int) -> tuple[str, int] | None:
    """Where to connect for `entry`, or None when its advertised TRSVCID is no TCP port."""
    own = [e for e in discovery_entries if e.subtype == st.SUBTYPE_CURRENT_DISCOVERY]
    if any(e.portid == entry.portid for e in own) or not entry.traddr:
        return host, port
    svc = tcp_port(entry.trsvcid)
    return None if svc is None else (entry.traddr, svc)


def wanted_subsystems(entries, host: str, port: int, only_nqn: str | None = None) -> dict:
    """subnqn -> (address, port) for every NVM subsystem entry over TCP; an entry whose
    address cannot be used is skipped with a warning."""
    out = {}
    for e in entries:
        if e.subtype != st.SUBTYPE_NVME or e.trtype != st.TRTYPE_TCP:
            continue
        if only_nqn and e.subnqn != only_nqn:
            continue
        if e.subnqn in out:
            continue
        addr = reachable_address(e, entries, host, port)
        if addr is None:
            log.warning("discovery: entry for %s has TRSVCID %r, not a TCP port: skipped",
                        e.subnqn, e.trsvcid)
            continue
        out[e.subnqn] = addr
    return out


class DiscoveryFollower:
    def __init__(self, host: str, port: int, opts: ControllerOptions, *, persistent: bool,
                 rescan_interval: float, attach: Callable[[str, str, int], Awaitable[None]],
                 detach: Callable[[str], Awaitable[None]], only_nqn: str | None = None,
                 policy=None):
        self.host, self.port = host, port
        self.persistent = persistent
        self.rescan_interval = rescan_interval
        self.attach, self.detach = attach, detach
        self.only_nqn = only_nqn
        self.attached: dict[str, tuple[str, int]] = {}
        self.genctr = None
        self.referrals: list = []
        kato = PERSISTENT_DISCOVERY_KATO if persistent else 0.0
        self.opts = ControllerOptions(hostnqn=opts.hostnqn, hostid=opts.hostid,
                                      keep_alive_tmo=kato if opts.keep_alive_tmo else 0.0,
                                      connect_timeout=opts.connect_timeout,
                                      admin_timeout=opts.admin_timeout, discovery=True,
                                      hdr_digest=opts.hdr_digest, data_digest=opts.data_digest)
        self.session: Session | None = None
        self.policy = policy
        self._changed = trio.Event()
        self._lock = trio.Lock()

    async def start(self, nursery: trio.Nursery) -> None:
        if not self.persistent:
            async with open_controller(self.host, self.port, DISCOVERY_NQN, self.opts) as c:
                genctr, entries = await c.discovery_log()
            await self._apply(genctr, entries)
            return
        self.session = Session(self.host, self.port, DISCOVERY_NQN, self.opts, self.policy,
                               name="discovery", rescan_interval=0)
        self.session.on_async_event = self._on_aen
        self.session.on_state = self._on_state
        await self.session.start(nursery)
        await self.refresh()
        nursery.start_soon(self._follow)

    def _on_aen(self, ev) -> None:
        if ev.type == AsyncEventType.NOTICE and ev.info == NoticeInfo.DISCOVERY_LOG_CHANGED:
            log.info("discovery log page changed")
            self._changed.set()

    def _on_state(self, state, reason) -> None:
        if state is CtrlState.LIVE and self.session is not None and self.session.reconnects:
            self._changed.set()      # events may have been missed while disconnected

    async def _follow(self) -> None:
        while True:
            with trio.move_on_after(self.rescan_interval if self.rescan_interval > 0 else float("inf")):
                await self._changed.wait()
            self._changed = trio.Event()
            try:
                await self.refresh()
            except (NvmeError, TransportError) as e:
                log.warning("discovery: re-reading the log failed: %s", e)

    async def refresh(self) -> None:
        genctr, entries = await self.session.admin(lambda c: c.discovery_log())
        await self._apply(genctr, entries)

    async def _apply(self, genctr: int, entries) -> None:
        async with self._lock:
            self.genctr = genctr
            self.referrals = [e for e in entries if e.subtype == st.SUBTYPE_REFERRAL]
            wanted = wanted_subsystems(entries, self.host, self.port, self.only_nqn)
            for nqn in [n for n in self.attached if n not in wanted]:
                log.info("discovery: subsystem %s is gone: detaching", nqn)
                del self.attached[nqn]
                await self.detach(nqn)
            for nqn, (addr, port) in wanted.items():
                if nqn in self.attached:
                    continue
                try:
                    await self.attach(nqn, addr, port)
                except (NvmeError, TransportError, OSError) as e:
                    log.warning("discovery: attaching %s at %s:%d failed: %s", nqn, addr, port, e)
                    continue      # retried at the next change or rescan
                self.attached[nqn] = (addr, port)

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.aclose()

    def statistics(self) -> dict:
        return {"address": f"{self.host}:{self.port}", "persistent": self.persistent,
                "genctr": self.genctr, "attached": sorted(self.attached),
                "referrals": [f"{e.traddr}:{e.trsvcid}" for e in self.referrals],
                "controller": self.session.statistics() if self.session else None}
