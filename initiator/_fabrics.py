"""Fabrics commands (NVMe over Fabrics 1.1 section 3): Connect, Property Get/Set, Disconnect,
and the discovery log read loop. Builders return 64-byte SQEs (CID and SGL are filled in by the
queue); parsers take completions. Role-neutral where it can be: the target parses what these build.

No I/O here: the trio shell sends what these build (SPDK splits nvme_fabric.c off nvme_tcp.c alike).
"""

from __future__ import annotations

import struct
import uuid as _uuid

from ._errors import LocalProtocolError
from ._spec import AdminOpcode, CONNECT_CATTR_DISABLE_SQ_FLOW_CONTROL, FabricsType, PSDT_SGL

_FAB_HDR = struct.Struct("<BBHB")               # opcode, flags, cid, fctype
_CONNECT = struct.Struct("<HHHBxI")             # @40: recfmt, qid, sqsize, cattr, kato
_PROP = struct.Struct("<B3xIQ")                 # @40: attrib, ofst, value
_CONNECT_DATA = struct.Struct("<16sH238x256s256s256x")
assert _CONNECT_DATA.size == 1024

NQN_MAX = 223   # NVMe Base 4.5: an NQN is at most 223 bytes (256 with NUL padding on the wire)


def _fabrics_sqe(fctype: int) -> bytearray:
    b = bytearray(64)
    _FAB_HDR.pack_into(b, 0, AdminOpcode.FABRICS, PSDT_SGL, 0, fctype)
    return b


def connect_sqe(qid: int, sqsize: int, kato_ms: int, *, disable_sqflow: bool = True) -> bytearray:
    """NVMe-oF 3.3: Connect. `sqsize` is 0's based; KATO in milliseconds (admin queue only)."""
    if not 1 <= sqsize <= 0xFFFF:
        raise LocalProtocolError("SQSIZE must be 1..65535 (0's based, at least 2 entries)")
    b = _fabrics_sqe(FabricsType.CONNECT)
    cattr = CONNECT_CATTR_DISABLE_SQ_FLOW_CONTROL if disable_sqflow else 0
    _CONNECT.pack_into(b, 40, 0, qid, sqsize, cattr, kato_ms if qid == 0 else 0)
    return b


def check_nqn(nqn: str, what: str = "an NQN") -> None:
    """NVMe Base 4.5: an NQN is 1 to NQN_MAX bytes of UTF-8 (the Connect data pads it to 256
    with NULs). LocalProtocolError otherwise; the CLI checks its arguments with it too."""
    n = len(nqn.encode("utf-8", "surrogateescape"))
    if not 1 <= n <= NQN_MAX:
        raise LocalProtocolError(f"{what} must be 1..{NQN_MAX} bytes, not {n}")


def connect_data(hostid: str, cntlid: int, subnqn: str, hostnqn: str) -> bytes:
    """The 1024-byte Connect data (NVMe-oF 3.3 Figure 20)."""
    check_nqn(subnqn, "subsystem NQN")
    check_nqn(hostnqn, "host NQN")
    return _CONNECT_DATA.pack(_uuid.UUID(hostid).bytes, cntlid, subnqn.encode(), hostnqn.encode())


def parse_connect_data(data) -> tuple[str, int, str, str]:
    """-> (hostid, cntlid, subnqn, hostnqn)."""
    hid, cntlid, sub, host = _CONNECT_DATA.unpack_from(data, 0)
    return (str(_uuid.UUID(bytes=bytes(hid))), cntlid, sub.rstrip(b"\0").decode(errors="replace"),
            host.rstrip(b"\0").decode(errors="replace"))


def parse_connect_sqe(sqe) -> tuple[int, int, int, int, int]:
    """-> (recfmt, qid, sqsize, cattr, kato)."""
    return _CONNECT.unpack_from(sqe, 40)


def property_get_sqe(offset: int, size8: bool) -> bytearray:
    b = _fabrics_sqe(FabricsType.PROPERTY_GET)
    _PROP.pack_into(b, 40, 1 if size8 else 0, offset, 0)
    return b


def property_set_sqe(offset: int, value: int, size8: bool = False) -> bytearray:
    b = _fabrics_sqe(FabricsType.PROPERTY_SET)
    _PROP.pack_into(b, 40, 1 if size8 else 0, offset, value)
    return b


def parse_property_sqe(sqe) -> tuple[bool, int, int]:
    """-> (size8, offset, value)."""
    attrib, ofst, value = _PROP.unpack_from(sqe, 40)
    return bool(attrib & 7), ofst, value


def disconnect_sqe() -> bytearray:
    """NVMe-oF 1.1 3.4: Disconnect (recfmt 0). Older targets answer Invalid Opcode/Field."""
    return _fabrics_sqe(FabricsType.DISCONNECT)


def fabrics_type(sqe) -> int:
    return sqe[4]


def connect_result(dw0: int) -> tuple[int, int]:
    """Connect response DW0 -> (cntlid, authreq)."""
    return dw0 & 0xFFFF, (dw0 >> 16) & 0xFFFF


def random_hostid() -> str:
    return str(_uuid.uuid4())


def default_hostnqn(hostid: str) -> str:
    """nvme-cli's form of a UUID-based host NQN (NVMe Base 4.5)."""
    return f"nqn.2014-08.org.nvmexpress:uuid:{hostid}"
