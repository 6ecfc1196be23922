"""The target's model of itself: namespaces, subsystems, the discovery subsystem and its log.

Sans-IO: no sockets, no trio. The server mutates this model (from the control socket) and the
model tells the affected controllers (`Controller.ns_changed`, discovery log changes), which
complete held AERs through their admin queues, as SPDK's `nvmf_subsystem_ns_changed` and nvmet's
`nvmet_ns_changed` do.

Does not: parse PDUs or commands (`_queue.py`, `_controller.py`) or decide fault behaviour.
"""

from __future__ import annotations

import hashlib
import time
import uuid as _uuid
from collections import deque

from initiator import _structs as st
from initiator._spec import DISCOVERY_NQN

from .backends import Backend, parse_ns_spec, parse_size, zero_file
from .config import SubsystemConfig, TargetConfig
from .faults import FaultSet

MAX_NAMESPACES = 1024     # Identify NN and MNAN (nvmet: NVMET_MAX_NAMESPACES)
DLFEAT_READ_ZEROES_WZ_DEAC = 0x09   # deallocated blocks read as zeroes; Write Zeroes DEAC supported


class TargetError(Exception):
    """A control-plane request the model refuses (bad NSID, unknown subsystem...)."""


class Namespace:
    __slots__ = ("nsid", "backend", "block_size", "lbads", "nblocks", "nguid", "eui64", "uuid",
                 "spec", "fast", "hot", "zero_fd", "sendfile_min", "_max_io")

    def __init__(self, nsid: int, backend: Backend, block_size: int, subnqn: str, spec: str = "",
                 max_io: int = 1 << 20, sendfile_min: int = 0, generation: int = 0):
        self.nsid = nsid
        self.backend = backend
        self.block_size = block_size
        self.lbads = block_size.bit_length() - 1
        self.nblocks = backend.size // block_size
        self.spec = spec
        self.fast = backend.kind in ("ram", "null")   # cannot fail: the queue's hot path may serve it
        self._max_io = max_io
        self.sendfile_min = sendfile_min
        self._set_hot()
        # Identifiers follow from the configuration, so a restarted target names the namespaces
        # of its command line as before; a namespace created again at an NSID this subsystem
        # had before (`generation` > 0) is a new namespace and gets new ones (Base: the NGUID
        # and UUID are assigned when the namespace is created; nvmet makes a fresh UUID in
        # nvmet_ns_alloc), else a host cannot tell it from the one it replaced.
        name = f"{subnqn}/{nsid}/{spec}" + (f"/{generation}" if generation else "")
        h = hashlib.sha256(name.encode()).digest()
        self.nguid = h[:16]
        self.eui64 = h[16:24]
        self.uuid = bytes(_uuid.UUID(bytes=h[:16], version=4).bytes)

    def identify(self) -> bytes:
        return st.build_identify_namespace(nsze=self.nblocks, block_size=self.block_size,
                                           nguid=self.nguid, eui64=self.eui64,
                                           dlfeat=DLFEAT_READ_ZEROES_WZ_DEAC, nmic=1,
                                           noiob=0)

    def descriptors(self) -> bytes:
        return st.build_ns_descriptors(eui64=self.eui64, nguid=self.nguid, uuid=self.uuid, csi=0)

    def resize(self, new_size: int) -> None:
        new_size -= new_size % self.block_size
        if new_size <= 0:
            raise TargetError("a namespace must keep at least one block")
        self.backend.resize(new_size)
        self.nblocks = new_size // self.block_size
        self._set_hot()

    def _set_hot(self) -> None:
        """`hot`: what the queue's read fast path needs, in one tuple (NBLOCKS, LBADS, VIEW, MASK):
        a read of N bytes at byte offset OFF is VIEW[OFF & MASK : (OFF & MASK) + N]. RAM: the
        whole memory, MASK -1; null: a zero buffer of at least the largest transfer, MASK 0.
        None: no fast path. Rebuilt on resize (a RAM resize makes a new buffer). `zero_fd`: a
        zero memfd that null reads of `sendfile_min` bytes and more are sent from (None: off)."""
        b = self.backend
        self.zero_fd = None
        if b.kind == "ram":
            self.hot = (self.nblocks, self.lbads, b.mv, -1)
        elif b.kind == "null" and b.reserve(self._max_io):
            self.hot = (self.nblocks, self.lbads, b.zeros, 0)
            if self.sendfile_min > 0:
                self.zero_fd = zero_file(self._max_io)     # large reads: sendfile, no copy
        else:
            self.hot = None

    def info(self) -> dict:
        return {"nsid": self.nsid, "backend": self.backend.describe(), "block_size": self.block_size,
                "num_blocks": self.nblocks, "size": self.nblocks * self.block_size,
                "nguid": self.nguid.hex(), "uuid": str(_uuid.UUID(bytes=self.uuid))}


class Subsystem:
    def __init__(self, target: "TargetState", nqn: str, *, discovery: bool = False,
                 allow_hosts=(), serial: str = "", model: str = ""):
        self.target = target
        self.nqn = nqn
        self.discovery = discovery
        self.allow_hosts: set[str] = set(allow_hosts)
        self.serial = serial or hashlib.sha1(nqn.encode()).hexdigest()[:20]
        self.model = model or "blockfs embedded target"
        self.namespaces: dict[int, Namespace] = {}   # mutated in place: queues hold this dict
        self.controllers: dict = {}                  # cntlid -> Controller
        self._created: dict[int, int] = {}           # NSID -> namespaces created there

    def host_allowed(self, hostnqn: str) -> bool:
        return not self.allow_hosts or hostnqn in self.allow_hosts

    # -- namespace management (control plane) ---------------------------------------------
    def add_ns(self, spec: str, nsid: int | None = None) -> Namespace:
        if self.discovery:
            raise TargetError("the discovery subsystem has no namespaces")
        if nsid is None:
            nsid = next(i for i in range(1, MAX_NAMESPACES + 2) if i not in self.namespaces)
        if not 1 <= nsid <= MAX_NAMESPACES:
            raise TargetError(f"NSID {nsid} out of range 1..{MAX_NAMESPACES}")
        if nsid in self.namespaces:
            raise TargetError(f"NSID {nsid} already exists")
        backend, bs = parse_ns_spec(spec)
        generation = self._created.get(nsid, 0)
        ns = Namespace(nsid, backend, bs, self.nqn, spec, max_io=self.target.max_io_bytes,
                       sendfile_min=self.target.config.sendfile_min, generation=generation)
        self._created[nsid] = generation + 1
        self.namespaces[nsid] = ns
        self._changed(nsid)
        return ns

    def remove_ns(self, nsid: int) -> None:
        ns = self.namespaces.pop(nsid, None)
        if ns is None:
            raise TargetError(f"no namespace {nsid}")
        ns.backend.close()
        self._changed(nsid)

    def resize_ns(self, nsid: int, size) -> Namespace:
        ns = self.namespaces.get(nsid)
        if ns is None:
            raise TargetError(f"no namespace {nsid}")
        ns.resize(parse_size(size) if isinstance(size, str) else int(size))
        self._changed(nsid)
        return ns

    def _changed(self, nsid: int) -> None:
        for ctrl in list(self.controllers.values()):
            ctrl.ns_changed(nsid)

    def info(self) -> dict:
        return {"nqn": self.nqn, "subtype": "discovery" if self.discovery else "nvme",
                "allow_hosts": sorted(self.allow_hosts) or "any", "serial": self.serial,
                "namespaces": [ns.info() for ns in sorted(self.namespaces.values(),
                                                          key=lambda n: n.nsid)],
                "controllers": [c.info() for c in self.controllers.values()]}


class TargetState:
    """Everything a target is, minus its sockets: subsystems, listeners, limits, faults, clock."""

    def __init__(self, config: TargetConfig, clock=None):
        self.config = config
        self.clock = clock or time.monotonic
        self.mdts = config.mdts
        self.max_io_bytes = (4096 << config.mdts) if config.mdts else 1 << 30
        self.io_in_capsule = config.io_in_capsule
        self.ioccsz = (config.io_in_capsule + 64) // 16
        self.max_h2c_data = config.max_h2c_data
        self.mqes = config.queue_size - 1
        self.max_io_queues = config.max_io_queues
        self.kas = config.kas
        self.listeners: list[tuple[str, int]] = []   # filled in by the server once bound
        self.genctr = 0
        self._next_cntlid = 1
        self.discovery = Subsystem(self, DISCOVERY_NQN, discovery=True, serial="discovery",
                                   model="blockfs discovery controller")
        self.subsystems: dict[str, Subsystem] = {}
        self.faults = FaultSet()
        self.totals = [0, 0, 0, 0]   # reads, writes, bytes read, bytes written of closed queues
        self.queues: set = set()     # live TargetQueues (for SMART and stats)
        self.keep_alive_expiries = 0
        self.backend_errors: deque[str] = deque(maxlen=100)   # OSErrors of file backends
        self.on_controller_added = None    # shell hook: start the keep-alive timer
        for sc in config.subsystems:
            self.add_subsystem(sc, notify=False)

    # -- subsystems ---------------------------------------------------------------------
    def add_subsystem(self, sc: SubsystemConfig, notify: bool = True) -> Subsystem:
        if sc.nqn in self.subsystems or sc.nqn == DISCOVERY_NQN:
            raise TargetError(f"subsystem {sc.nqn} already exists")
        sub = Subsystem(self, sc.nqn, allow_hosts=sc.allow_hosts, serial=sc.serial, model=sc.model)
        for spec in sc.namespaces:
            sub.add_ns(spec)
        self.subsystems[sc.nqn] = sub
        self.discovery_changed()
        return sub

    def remove_subsystem(self, nqn: str) -> None:
        sub = self.subsystems.pop(nqn, None)
        if sub is None:
            raise TargetError(f"no subsystem {nqn}")
        for ctrl in list(sub.controllers.values()):
            ctrl.teardown("subsystem removed")
        for ns in sub.namespaces.values():
            ns.backend.close()
        self.discovery_changed()

    def find_subsystem(self, nqn: str) -> Subsystem | None:
        if nqn == DISCOVERY_NQN:
            return self.discovery
        return self.subsystems.get(nqn)

    def subsystem(self, nqn: str | None) -> Subsystem:
        """The named subsystem, or the only one when `nqn` is None (control-plane helper)."""
        if nqn is None:
            if len(self.subsystems) != 1:
                raise TargetError("several subsystems: name one with 'nqn'")
            return next(iter(self.subsystems.values()))
        sub = self.subsystems.get(nqn)
        if sub is None:
            raise TargetError(f"no subsystem {nqn}")
        return sub

    def alloc_cntlid(self) -> int:
        used = {c for s in (self.discovery, *self.subsystems.values()) for c in s.controllers}
        while True:
            c = self._next_cntlid
            self._next_cntlid = c + 1 if c < 0xFFEF else 1
            if c not in used:
                return c

    # -- discovery ------------------------------------------------------------------------
    def discovery_changed(self) -> None:
        """Bump GENCTR and tell discovery controllers (AEN notice 0xF0, log 0x70)."""
        self.genctr += 1
        for ctrl in list(self.discovery.controllers.values()):
            ctrl.discovery_log_changed()

    def set_listeners(self, addrs) -> None:
        self.listeners = list(addrs)
        self.discovery_changed()

    def discovery_log(self, hostnqn: str) -> bytes:
        entries = []
        for portid, (host, port) in enumerate(self.listeners):
            adrfam = st.ADRFAM_IPV6 if ":" in host else st.ADRFAM_IPV4
            common = dict(trtype=st.TRTYPE_TCP, adrfam=adrfam, portid=portid, cntlid=0xFFFF,
                          asqsz=32, trsvcid=str(port), traddr=host, sectype=st.SECTYPE_NONE)
            entries.append(st.DiscoveryLogEntry(
                subtype=st.SUBTYPE_CURRENT_DISCOVERY, subnqn=DISCOVERY_NQN,
                treq=st.TREQ_NOT_REQUIRED | st.TREQ_DISABLE_SQFLOW, **common))
            for sub in self.subsystems.values():
                if sub.host_allowed(hostnqn):
                    entries.append(st.DiscoveryLogEntry(
                        subtype=st.SUBTYPE_NVME, subnqn=sub.nqn,
                        treq=st.TREQ_NOT_REQUIRED | st.TREQ_DISABLE_SQFLOW, **common))
        return st.build_discovery_log(self.genctr, entries)

    # -- statistics -----------------------------------------------------------------------
    def io_totals(self) -> list[int]:
        t = list(self.totals)
        for q in self.queues:
            t[0] += q.n_read
            t[1] += q.n_write
            t[2] += q.b_read
            t[3] += q.b_written
        return t

    def info(self) -> dict:
        return {"listeners": [f"{h}:{p}" for h, p in self.listeners], "genctr": self.genctr,
                "subsystems": [s.info() for s in self.subsystems.values()],
                "discovery_controllers": [c.info() for c in self.discovery.controllers.values()]}
