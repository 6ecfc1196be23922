"""NVMe admin data structures: Identify, log pages, Connect data. Builders and parsers.

Role-neutral: the embedded target builds these, the initiator parses them, with the same field
tables so the two directions cannot drift apart. Control plane only (a few per controller
bring-up), so records are `@dataclass(slots=True)` built from a declarative field table rather than
hot-path `Struct`s.

Layouts (byte offsets are the specification's):
- Identify Controller (CNS 01h): NVMe Base 2.0 Figure 275, NVMe-oF 1.1 section 4.1 (1792..).
- Identify Namespace (CNS 00h): NVM Command Set 1.0 Figure 97.
- Active Namespace ID list (CNS 02h), Namespace Identification Descriptor list (CNS 03h).
- Log pages: Error Information (01h), SMART / Health (02h), Changed Namespace List (04h),
  Discovery (70h, NVMe-oF 1.1 Figure 38/39).
- Dataset Management ranges (NVM Command Set 1.0 Figure 39).
- Asynchronous Event Request completion dword 0 (Base 5.2.1).

Does not: send anything, validate semantic consistency (e.g. FLBAS against NLBAF), or know which
side of the connection it is on.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from typing import ClassVar

IDENTIFY_DATA_SIZE = 4096
SMART_LOG_SIZE = 512
ERROR_LOG_ENTRY_SIZE = 64
CHANGED_NS_LIST_MAX = 1024
CHANGED_NS_OVERFLOW = 0xFFFFFFFF
DISCOVERY_HEADER_SIZE = 1024
DISCOVERY_ENTRY_SIZE = 1024

# Identify Controller CNTRLTYPE (Base 2.0: 111).
CNTRLTYPE_IO = 1
CNTRLTYPE_DISCOVERY = 2
CNTRLTYPE_ADMIN = 3

# ONCS bits (Base 2.0 Figure 275, byte 520).
ONCS_COMPARE = 1 << 0
ONCS_WRITE_UNCORRECTABLE = 1 << 1
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
ONCS_SAVE_SELECT = 1 << 4
# OAES bits (byte 92).
OAES_NS_ATTR = 1 << 8
OAES_FW_ACTIVATION = 1 << 9
OAES_ANA_CHANGE = 1 << 11
OAES_DISCOVERY_LOG_CHANGE = 1 << 31
# CTRATT bit 0: 128-bit Host Identifier (required for NVMe over Fabrics).
CTRATT_HOST_ID_128 = 1 << 0
CTRATT_TBKAS = 1 << 6
# LPA bits (byte 261).
LPA_SMART_PER_NS = 1 << 0
LPA_CMD_EFFECTS = 1 << 1
LPA_EXTENDED_DATA = 1 << 2     # NUMDU / LPO in Get Log Page
# SGLS bits (byte 536).
SGLS_SUPPORTED = 1 << 0        # bits 1:0 = 01b: SGLs, no alignment requirement
SGLS_KEYED = 1 << 2
SGLS_OFFSET = 1 << 20          # SGL Data Block descriptor Offset (in-capsule data)

# Namespace Identification Descriptor types (Base 2.0 Figure 279).
NIDT_EUI64 = 0x1
NIDT_NGUID = 0x2
NIDT_UUID = 0x3
NIDT_CSI = 0x4
_NIDL = {NIDT_EUI64: 8, NIDT_NGUID: 16, NIDT_UUID: 16, NIDT_CSI: 1}

# Discovery log entry values (NVMe-oF 1.1 Figure 39).
TRTYPE_TCP = 3
ADRFAM_IPV4 = 1
ADRFAM_IPV6 = 2
SUBTYPE_REFERRAL = 1
SUBTYPE_NVME = 2
SUBTYPE_CURRENT_DISCOVERY = 3
TREQ_NOT_SPECIFIED = 0
TREQ_REQUIRED = 1
TREQ_NOT_REQUIRED = 2
TREQ_DISABLE_SQFLOW = 1 << 2
SECTYPE_NONE = 0


# ---------------------------------------------------------------------------------------------
# A tiny table-driven codec: (name, offset, kind) where kind is a struct code ("B", "H", "I",
# "Q"), "sN" (N-byte ASCII, space padded, as Identify strings are), "zN" (N-byte ASCII,
# NUL padded, as NQNs are), "rN" (N raw bytes) or "uN" (N-byte little-endian unsigned integer,
# for the 128-bit counters).

def _pack_fields(buf: bytearray, fields, rec) -> None:
    for name, off, kind in fields:
        v = getattr(rec, name)
        code = kind[0]
        if code in "BHIQ":
            struct.pack_into("<" + kind, buf, off, v)
        else:
            n = int(kind[1:])
            if code == "s":
                raw = v.encode("ascii")[:n].ljust(n, b" ")
            elif code == "z":
                raw = v.encode("utf-8")[:n].ljust(n, b"\0")
            elif code == "u":
                raw = int(v).to_bytes(n, "little")
            else:
                raw = bytes(v)[:n].ljust(n, b"\0")
            buf[off:off + n] = raw


def _unpack_fields(b, fields) -> dict:
    out = {}
    for name, off, kind in fields:
        code = kind[0]
        if code in "BHIQ":
            out[name] = struct.unpack_from("<" + kind, b, off)[0]
        else:
            n = int(kind[1:])
            raw = bytes(b[off:off + n])
            if code == "s":
                out[name] = raw.decode("ascii", "replace").rstrip(" \0")
            elif code == "z":
                out[name] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif code == "u":
                out[name] = int.from_bytes(raw, "little")
            else:
                out[name] = raw
    return out


def _need(b, size: int, what: str) -> None:
    if len(b) < size:
        raise ValueError(f"{what}: {len(b)} bytes, need {size}")


# ---------------------------------------------------------------------------------------------
# Identify Controller (CNS 01h)

@dataclass(slots=True)
class IdentifyController:
    vid: int = 0
    ssvid: int = 0
    sn: str = ""
    mn: str = ""
    fr: str = ""
    rab: int = 0
    ieee: bytes = b"\0\0\0"
    cmic: int = 0
    mdts: int = 0                 # max transfer = 2**mdts * CAP.MPSMIN pages; 0 = no limit
    cntlid: int = 0
    ver: int = 0
    rtd3r: int = 0
    rtd3e: int = 0
    oaes: int = 0
    ctratt: int = 0
    cntrltype: int = 0
    fguid: bytes = bytes(16)
    crdt1: int = 0
    crdt2: int = 0
    crdt3: int = 0
    oacs: int = 0
    acl: int = 0                  # 0's based
    aerl: int = 0                 # 0's based
    frmw: int = 0
    lpa: int = 0
    elpe: int = 0                 # 0's based number of Error Information log entries
    npss: int = 0
    avscc: int = 0
    apsta: int = 0
    wctemp: int = 0
    cctemp: int = 0
    kas: int = 0                  # Keep Alive granularity in 100 ms units; 0 = not supported
    sqes: int = 0x66
    cqes: int = 0x44
    maxcmd: int = 0
    nn: int = 0
    oncs: int = 0
    fuses: int = 0
    fna: int = 0
    vwc: int = 0
    awun: int = 0
    awupf: int = 0
    icsvscc: int = 0
    nwpc: int = 0
    acwu: int = 0
    sgls: int = 0
    mnan: int = 0
    subnqn: str = ""
    ioccsz: int = 0               # I/O queue command capsule size in 16-byte units
    iorcsz: int = 0
    icdoff: int = 0
    fcatt: int = 0
    msdbd: int = 0
    ofcs: int = 0

    FIELDS: ClassVar[tuple] = (
        ("vid", 0, "H"), ("ssvid", 2, "H"), ("sn", 4, "s20"), ("mn", 24, "s40"),
        ("fr", 64, "s8"), ("rab", 72, "B"), ("ieee", 73, "r3"), ("cmic", 76, "B"),
        ("mdts", 77, "B"), ("cntlid", 78, "H"), ("ver", 80, "I"), ("rtd3r", 84, "I"),
        ("rtd3e", 88, "I"), ("oaes", 92, "I"), ("ctratt", 96, "I"), ("cntrltype", 111, "B"),
        ("fguid", 112, "r16"), ("crdt1", 128, "H"), ("crdt2", 130, "H"), ("crdt3", 132, "H"),
        ("oacs", 256, "H"), ("acl", 258, "B"), ("aerl", 259, "B"), ("frmw", 260, "B"),
        ("lpa", 261, "B"), ("elpe", 262, "B"), ("npss", 263, "B"), ("avscc", 264, "B"),
        ("apsta", 265, "B"), ("wctemp", 266, "H"), ("cctemp", 268, "H"), ("kas", 320, "H"),
        ("sqes", 512, "B"), ("cqes", 513, "B"), ("maxcmd", 514, "H"), ("nn", 516, "I"),
        ("oncs", 520, "H"), ("fuses", 522, "H"), ("fna", 524, "B"), ("vwc", 525, "B"),
        ("awun", 526, "H"), ("awupf", 528, "H"), ("icsvscc", 530, "B"), ("nwpc", 531, "B"),
        ("acwu", 532, "H"), ("sgls", 536, "I"), ("mnan", 540, "I"), ("subnqn", 768, "z256"),
        ("ioccsz", 1792, "I"), ("iorcsz", 1796, "I"), ("icdoff", 1800, "H"),
        ("fcatt", 1802, "B"), ("msdbd", 1803, "B"), ("ofcs", 1804, "H"),
    )

    @classmethod
    def from_bytes(cls, b) -> "IdentifyController":
        _need(b, IDENTIFY_DATA_SIZE, "Identify Controller")
        return cls(**_unpack_fields(b, cls.FIELDS))

    def to_bytes(self) -> bytes:
        buf = bytearray(IDENTIFY_DATA_SIZE)
        _pack_fields(buf, self.FIELDS, self)
        return bytes(buf)

    def max_transfer_bytes(self, mpsmin_bytes: int = 4096) -> int | None:
        """MDTS in bytes (None = no limit). `mpsmin_bytes` is 2**(12 + CAP.MPSMIN)."""
        return None if self.mdts == 0 else mpsmin_bytes << self.mdts

    @property
    def io_in_capsule_bytes(self) -> int:
        """In-capsule data an I/O command capsule may carry: IOCCSZ * 16 - 64 (NVMe-oF 1.1)."""
        return max(0, self.ioccsz * 16 - 64)


def build_identify_controller(**fields) -> bytes:
    return IdentifyController(**fields).to_bytes()


# ---------------------------------------------------------------------------------------------
# Identify Namespace (CNS 00h)

@dataclass(slots=True)
class LbaFormat:
    ms: int = 0          # metadata bytes per block
    lbads: int = 9       # log2 of the data block size
    rp: int = 0          # relative performance

    @property
    def block_size(self) -> int:
        return 1 << self.lbads


@dataclass(slots=True)
class IdentifyNamespace:
    nsze: int = 0
    ncap: int = 0
    nuse: int = 0
    nsfeat: int = 0
    nlbaf: int = 0                # 0's based number of LBA formats
    flbas: int = 0
    mc: int = 0
    dpc: int = 0
    dps: int = 0
    nmic: int = 0
    rescap: int = 0
    fpi: int = 0
    dlfeat: int = 0
    nawun: int = 0
    nawupf: int = 0
    nacwu: int = 0
    nabsn: int = 0
    nabo: int = 0
    nabspf: int = 0
    noiob: int = 0
    nvmcap: int = 0
    npwg: int = 0
    npwa: int = 0
    npdg: int = 0
    npda: int = 0
    nows: int = 0
    anagrpid: int = 0
    nsattr: int = 0
    nvmsetid: int = 0
    endgid: int = 0
    nguid: bytes = bytes(16)
    eui64: bytes = bytes(8)
    lbaf: list = field(default_factory=lambda: [LbaFormat()])

    FIELDS: ClassVar[tuple] = (
        ("nsze", 0, "Q"), ("ncap", 8, "Q"), ("nuse", 16, "Q"), ("nsfeat", 24, "B"),
        ("nlbaf", 25, "B"), ("flbas", 26, "B"), ("mc", 27, "B"), ("dpc", 28, "B"),
        ("dps", 29, "B"), ("nmic", 30, "B"), ("rescap", 31, "B"), ("fpi", 32, "B"),
        ("dlfeat", 33, "B"), ("nawun", 34, "H"), ("nawupf", 36, "H"), ("nacwu", 38, "H"),
        ("nabsn", 40, "H"), ("nabo", 42, "H"), ("nabspf", 44, "H"), ("noiob", 46, "H"),
        ("nvmcap", 48, "u16"), ("npwg", 64, "H"), ("npwa", 66, "H"), ("npdg", 68, "H"),
        ("npda", 70, "H"), ("nows", 72, "H"), ("anagrpid", 92, "I"), ("nsattr", 99, "B"),
        ("nvmsetid", 100, "H"), ("endgid", 102, "H"), ("nguid", 104, "r16"), ("eui64", 120, "r8"),
    )
    LBAF_OFFSET: ClassVar[int] = 128
    LBAF_MAX: ClassVar[int] = 64

    @classmethod
    def from_bytes(cls, b) -> "IdentifyNamespace":
        _need(b, IDENTIFY_DATA_SIZE, "Identify Namespace")
        kw = _unpack_fields(b, cls.FIELDS)
        n = min(kw["nlbaf"] + 1, cls.LBAF_MAX)
        lbafs = []
        for i in range(n):
            v = struct.unpack_from("<I", b, cls.LBAF_OFFSET + 4 * i)[0]
            lbafs.append(LbaFormat(ms=v & 0xFFFF, lbads=(v >> 16) & 0xFF, rp=(v >> 24) & 0x3))
        return cls(lbaf=lbafs, **kw)

    def to_bytes(self) -> bytes:
        buf = bytearray(IDENTIFY_DATA_SIZE)
        _pack_fields(buf, self.FIELDS, self)
        for i, f in enumerate(self.lbaf[:self.LBAF_MAX]):
            struct.pack_into("<I", buf, self.LBAF_OFFSET + 4 * i,
                             (f.ms & 0xFFFF) | (f.lbads & 0xFF) << 16 | (f.rp & 3) << 24)
        return bytes(buf)

    @property
    def format_index(self) -> int:
        """FLBAS bits 3:0, extended by bits 6:5 when more than 16 formats exist."""
        return (self.flbas & 0xF) | (((self.flbas >> 5) & 0x3) << 4 if self.nlbaf >= 16 else 0)

    @property
    def lbads(self) -> int:
        i = self.format_index
        return self.lbaf[i].lbads if i < len(self.lbaf) else 0

    @property
    def block_size(self) -> int:
        return 1 << self.lbads if self.lbads else 0

    @property
    def metadata_size(self) -> int:
        i = self.format_index
        return self.lbaf[i].ms if i < len(self.lbaf) else 0

    @property
    def active(self) -> bool:
        """An inactive namespace identifies as all zeroes (Base 2.0 5.17.2.1)."""
        return self.nsze != 0


def build_identify_namespace(*, nsze: int, block_size: int, ncap: int | None = None,
                             nuse: int | None = None, **fields) -> bytes:
    """A namespace with one LBA format (`block_size`, no metadata)."""
    lbads = block_size.bit_length() - 1
    if block_size != 1 << lbads:
        raise ValueError(f"block size {block_size} is not a power of two")
    return IdentifyNamespace(nsze=nsze, ncap=nsze if ncap is None else ncap,
                             nuse=nsze if nuse is None else nuse, nlbaf=0, flbas=0,
                             lbaf=[LbaFormat(ms=0, lbads=lbads)], **fields).to_bytes()


# ---------------------------------------------------------------------------------------------
# Namespace Identification Descriptor list (CNS 03h) and Active Namespace ID list (CNS 02h)

def build_ns_descriptors(*, eui64: bytes | None = None, nguid: bytes | None = None,
                         uuid: bytes | None = None, csi: int | None = None) -> bytes:
    buf = bytearray(IDENTIFY_DATA_SIZE)
    off = 0
    for nidt, val in ((NIDT_EUI64, eui64), (NIDT_NGUID, nguid), (NIDT_UUID, uuid),
                      (NIDT_CSI, None if csi is None else bytes([csi]))):
        if val is None:
            continue
        nidl = _NIDL[nidt]
        if len(val) != nidl:
            raise ValueError(f"descriptor type {nidt} needs {nidl} bytes, got {len(val)}")
        buf[off] = nidt
        buf[off + 1] = nidl
        buf[off + 4:off + 4 + nidl] = val
        off += 4 + nidl
    return bytes(buf)


def parse_ns_descriptors(b) -> dict[int, bytes]:
    """-> {NIDT: NID bytes}; stops at the first zero NIDT or the end of the buffer."""
    out: dict[int, bytes] = {}
    off = 0
    n = len(b)
    while off + 4 <= n:
        nidt, nidl = b[off], b[off + 1]
        if nidt == 0:
            break
        if off + 4 + nidl > n:
            raise ValueError(f"NS descriptor at {off} runs past the buffer")
        out[nidt] = bytes(b[off + 4:off + 4 + nidl])
        off += 4 + nidl
    return out


def build_ns_list(nsids, greater_than: int = 0) -> bytes:
    """Active NS ID list: up to 1024 NSIDs greater than `greater_than`, ascending, zero-filled."""
    sel = sorted(n for n in nsids if n > greater_than)[:1024]
    buf = bytearray(IDENTIFY_DATA_SIZE)
    struct.pack_into(f"<{len(sel)}I", buf, 0, *sel)
    return bytes(buf)


def parse_ns_list(b) -> list[int]:
    """NSIDs up to the first zero entry (Base 2.0 5.17.2.2 / changed-list layout too)."""
    out = []
    for (v,) in struct.iter_unpack("<I", bytes(b[:len(b) // 4 * 4])):
        if v == 0:
            break
        out.append(v)
    return out


# ---------------------------------------------------------------------------------------------
# Changed Namespace List log (LID 04h)

def build_changed_ns_list(nsids) -> bytes:
    """Up to 1024 NSIDs; more than that overflows to a single 0xFFFFFFFF entry (Base 5.16.1.5)."""
    nsids = list(nsids)
    buf = bytearray(IDENTIFY_DATA_SIZE)
    if len(nsids) > CHANGED_NS_LIST_MAX:
        struct.pack_into("<I", buf, 0, CHANGED_NS_OVERFLOW)
    elif nsids:
        struct.pack_into(f"<{len(nsids)}I", buf, 0, *nsids)
    return bytes(buf)


def parse_changed_ns_list(b) -> list[int] | None:
    """-> NSIDs, or None when the list overflowed (first entry 0xFFFFFFFF: rescan everything)."""
    if len(b) >= 4 and struct.unpack_from("<I", b, 0)[0] == CHANGED_NS_OVERFLOW:
        return None
    return parse_ns_list(b)


# ---------------------------------------------------------------------------------------------
# SMART / Health Information log (LID 02h) and Error Information log (LID 01h)

@dataclass(slots=True)
class SmartLog:
    critical_warning: int = 0
    temperature: int = 0          # composite temperature, kelvin
    available_spare: int = 100
    available_spare_threshold: int = 10
    percentage_used: int = 0
    endurance_group_critical_warning: int = 0
    data_units_read: int = 0      # thousands of 512-byte units, rounded up
    data_units_written: int = 0
    host_read_commands: int = 0
    host_write_commands: int = 0
    controller_busy_time: int = 0
    power_cycles: int = 0
    power_on_hours: int = 0
    unsafe_shutdowns: int = 0
    media_errors: int = 0
    num_err_log_entries: int = 0
    warning_temp_time: int = 0
    critical_temp_time: int = 0

    FIELDS: ClassVar[tuple] = (
        ("critical_warning", 0, "B"), ("temperature", 1, "H"), ("available_spare", 3, "B"),
        ("available_spare_threshold", 4, "B"), ("percentage_used", 5, "B"),
        ("endurance_group_critical_warning", 6, "B"), ("data_units_read", 32, "u16"),
        ("data_units_written", 48, "u16"), ("host_read_commands", 64, "u16"),
        ("host_write_commands", 80, "u16"), ("controller_busy_time", 96, "u16"),
        ("power_cycles", 112, "u16"), ("power_on_hours", 128, "u16"),
        ("unsafe_shutdowns", 144, "u16"), ("media_errors", 160, "u16"),
        ("num_err_log_entries", 176, "u16"), ("warning_temp_time", 192, "I"),
        ("critical_temp_time", 196, "I"),
    )

    @classmethod
    def from_bytes(cls, b) -> "SmartLog":
        _need(b, SMART_LOG_SIZE, "SMART log")
        return cls(**_unpack_fields(b, cls.FIELDS))

    def to_bytes(self) -> bytes:
        buf = bytearray(SMART_LOG_SIZE)
        _pack_fields(buf, self.FIELDS, self)
        return bytes(buf)


def build_smart_log(**fields) -> bytes:
    return SmartLog(**fields).to_bytes()


@dataclass(slots=True)
class ErrorLogEntry:
    error_count: int = 0          # 0 = invalid (unused) entry
    sqid: int = 0
    cid: int = 0
    status: int = 0               # status field, phase bit in bit 0
    error_location: int = 0
    lba: int = 0
    nsid: int = 0
    vendor_specific: int = 0
    trtype: int = 0
    command_specific: int = 0
    trtype_specific: int = 0

    FIELDS: ClassVar[tuple] = (
        ("error_count", 0, "Q"), ("sqid", 8, "H"), ("cid", 10, "H"), ("status", 12, "H"),
        ("error_location", 14, "H"), ("lba", 16, "Q"), ("nsid", 24, "I"),
        ("vendor_specific", 28, "B"), ("trtype", 29, "B"), ("command_specific", 32, "Q"),
        ("trtype_specific", 40, "H"),
    )

    @classmethod
    def from_bytes(cls, b, offset: int = 0) -> "ErrorLogEntry":
        _need(b[offset:], ERROR_LOG_ENTRY_SIZE, "Error log entry")
        return cls(**_unpack_fields(memoryview(b)[offset:offset + ERROR_LOG_ENTRY_SIZE],
                                    cls.FIELDS))

    def to_bytes(self) -> bytes:
        buf = bytearray(ERROR_LOG_ENTRY_SIZE)
        _pack_fields(buf, self.FIELDS, self)
        return bytes(buf)


def build_error_log(entries, n_entries: int) -> bytes:
    """`n_entries` 64-byte slots (ELPE + 1), newest first, unused slots zero."""
    buf = bytearray(ERROR_LOG_ENTRY_SIZE * n_entries)
    for i, e in enumerate(list(entries)[:n_entries]):
        buf[i * 64:(i + 1) * 64] = e.to_bytes()
    return bytes(buf)


def parse_error_log(b) -> list[ErrorLogEntry]:
    """Valid entries (error_count != 0)."""
    out = []
    for off in range(0, len(b) - ERROR_LOG_ENTRY_SIZE + 1, ERROR_LOG_ENTRY_SIZE):
        e = ErrorLogEntry.from_bytes(b, off)
        if e.error_count:
            out.append(e)
    return out


# ---------------------------------------------------------------------------------------------
# Discovery log page (LID 70h)

@dataclass(slots=True)
class DiscoveryLogHeader:
    genctr: int = 0
    numrec: int = 0
    recfmt: int = 0

    FIELDS: ClassVar[tuple] = (("genctr", 0, "Q"), ("numrec", 8, "Q"), ("recfmt", 16, "H"))

    @classmethod
    def from_bytes(cls, b) -> "DiscoveryLogHeader":
        _need(b, 18, "Discovery log header")
        return cls(**_unpack_fields(b, cls.FIELDS))

    def to_bytes(self) -> bytes:
        buf = bytearray(DISCOVERY_HEADER_SIZE)
        _pack_fields(buf, self.FIELDS, self)
        return bytes(buf)


@dataclass(slots=True)
class DiscoveryLogEntry:
    trtype: int = TRTYPE_TCP
    adrfam: int = ADRFAM_IPV4
    subtype: int = SUBTYPE_NVME
    treq: int = TREQ_NOT_SPECIFIED
    portid: int = 0
    cntlid: int = 0xFFFF
    asqsz: int = 32
    eflags: int = 0
    trsvcid: str = ""
    subnqn: str = ""
    traddr: str = ""
    sectype: int = SECTYPE_NONE   # TSAS byte 0 for TCP

    FIELDS: ClassVar[tuple] = (
        ("trtype", 0, "B"), ("adrfam", 1, "B"), ("subtype", 2, "B"), ("treq", 3, "B"),
        ("portid", 4, "H"), ("cntlid", 6, "H"), ("asqsz", 8, "H"), ("eflags", 10, "H"),
        ("trsvcid", 32, "z32"), ("subnqn", 256, "z256"), ("traddr", 512, "z256"),
        ("sectype", 768, "B"),
    )

    @classmethod
    def from_bytes(cls, b, offset: int = 0) -> "DiscoveryLogEntry":
        _need(b[offset:], DISCOVERY_ENTRY_SIZE, "Discovery log entry")
        return cls(**_unpack_fields(memoryview(b)[offset:offset + DISCOVERY_ENTRY_SIZE],
                                    cls.FIELDS))

    def to_bytes(self) -> bytes:
        buf = bytearray(DISCOVERY_ENTRY_SIZE)
        _pack_fields(buf, self.FIELDS, self)
        return bytes(buf)


def build_discovery_log(genctr: int, entries) -> bytes:
    entries = list(entries)
    return DiscoveryLogHeader(genctr=genctr, numrec=len(entries), recfmt=0).to_bytes() + \
        b"".join(e.to_bytes() for e in entries)


def parse_discovery_log(b) -> tuple[DiscoveryLogHeader, list[DiscoveryLogEntry]]:
    """Header plus as many whole entries as `b` holds (at most NUMREC)."""
    hdr = DiscoveryLogHeader.from_bytes(b)
    n = min(hdr.numrec, max(0, (len(b) - DISCOVERY_HEADER_SIZE) // DISCOVERY_ENTRY_SIZE))
    return hdr, [DiscoveryLogEntry.from_bytes(b, DISCOVERY_HEADER_SIZE + i * DISCOVERY_ENTRY_SIZE)
                 for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Dataset Management range (NVM Command Set 1.0 Figure 39). Connect data lives in _fabrics.py.

DSM_RANGE = struct.Struct("<IIQ")     # context attributes, length in logical blocks, starting LBA
assert DSM_RANGE.size == 16


# ---------------------------------------------------------------------------------------------
# Asynchronous Event Request completion dword 0 (Base 2.0 5.2.1)

def aen_dw0(event_type: int, info: int, log_page: int) -> int:
    return (event_type & 0x7) | (info & 0xFF) << 8 | (log_page & 0xFF) << 16


def parse_aen_dw0(dw0: int) -> tuple[int, int, int]:
    """-> (event type, event information, log page identifier)."""
    return dw0 & 0x7, (dw0 >> 8) & 0xFF, (dw0 >> 16) & 0xFF


def replace(rec, **changes):
    """dataclasses.replace, re-exported for records built here."""
    return dataclasses.replace(rec, **changes)
