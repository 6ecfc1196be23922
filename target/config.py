"""Configuration records of the embedded target (what `blockfs target` flags and tests build)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_NQN = "nqn.2026-01.io.blockfs:target"


@dataclass(slots=True)
class SubsystemConfig:
    nqn: str = DEFAULT_NQN
    namespaces: list[str] = field(default_factory=list)   # backend specs: ram:64M, null:1G:4096, file:PATH
    allow_hosts: list[str] = field(default_factory=list)  # empty: any host may connect
    serial: str = ""                                       # default: derived from the NQN
    model: str = "blockfs embedded target"


@dataclass(slots=True)
class TargetConfig:
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:4420"])   # HOST:PORT, port 0 = any
    subsystems: list[SubsystemConfig] = field(default_factory=lambda: [SubsystemConfig()])
    control: str | None = None           # unix socket path of the JSON-RPC control channel
    mdts: int = 8                        # max data transfer 2**mdts * 4 KiB (8 -> 1 MiB); 0 = no limit
    io_in_capsule: int = 16384           # in-capsule data on I/O queues (IOCCSZ = (this + 64) / 16)
    max_h2c_data: int = 131072           # MAXH2CDATA in the ICResp
    queue_size: int = 128                # CAP.MQES + 1: largest SQSIZE + 1 a Connect may ask for
    max_io_queues: int = 8               # Number of Queues feature answer
    kas: int = 1                         # Keep Alive granularity, 100 ms units (Identify KAS)
    discovery_kato_ms: int = 120000      # a discovery controller connected with KATO 0 gets this
    firmware: str = "0.1"
    poll_us: float = 50.0                # a connection that received within this many us polls
                                         # (yield, retry recv) instead of sleeping; 0 = never
    sendfile_min: int = 0                # null reads of at least this many bytes go out with
                                         # sendfile from a zero memfd; 0 = never (docs/target.md)
    tcp_congestion: str | None = None    # TCP congestion control of the connections (TCP_CONGESTION,
                                         # e.g. "cubic"); None = the system's default
