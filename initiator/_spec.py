"""NVMe and NVMe/TCP constants, named as the specifications name them.

Role-neutral: used by the initiator and by the embedded target. Holds numbers only:
no parsing, no I/O. Section numbers refer to NVMe Base 2.0, NVMe over Fabrics 1.1 and
NVMe/TCP Transport 1.0 (TP 8000).
"""

from __future__ import annotations

import enum


class PduType(enum.IntEnum):
    """NVMe/TCP 3.3: PDU types."""

    IC_REQ = 0x00
    IC_RESP = 0x01
    H2C_TERM_REQ = 0x02
    C2H_TERM_REQ = 0x03
    CAPSULE_CMD = 0x04
    CAPSULE_RESP = 0x05
    H2C_DATA = 0x06
    C2H_DATA = 0x07
    R2T = 0x09


class PduFlags(enum.IntFlag):
    """NVMe/TCP 3.3.1: common-header FLAGS."""

    HDGSTF = 0x01   # header digest present
    DDGSTF = 0x02   # data digest present
    LAST_PDU = 0x04  # H2CData / C2HData: last PDU of the transfer
    SUCCESS = 0x08  # C2HData: command completed successfully, no CapsuleResp follows


class TermReqFes(enum.IntEnum):
    """NVMe/TCP 3.6.2.9: Fatal Error Status of a TermReq."""

    INVALID_HEADER_FIELD = 0x01
    PDU_SEQUENCE_ERROR = 0x02
    HEADER_DIGEST_ERROR = 0x03
    DATA_TRANSFER_OUT_OF_RANGE = 0x04
    DATA_TRANSFER_LIMIT_EXCEEDED = 0x05  # R2T limit exceeded (host never sends it)
    UNSUPPORTED_PARAMETER = 0x06


class AdminOpcode(enum.IntEnum):
    GET_LOG_PAGE = 0x02
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    KEEP_ALIVE = 0x18
    FABRICS = 0x7F


class IoOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09


class FabricsType(enum.IntEnum):
    """NVMe-oF 3.3: FCTYPE of a Fabrics command (opcode 0x7F)."""

    PROPERTY_SET = 0x00
    CONNECT = 0x01
    PROPERTY_GET = 0x04
    AUTH_SEND = 0x05
    AUTH_RECV = 0x06
    DISCONNECT = 0x08


class Property(enum.IntEnum):
    """NVMe-oF 3.4 / Base 3.1.3: controller property offsets."""

    CAP = 0x00   # 8 bytes
    VS = 0x08
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20


class Cns(enum.IntEnum):
    """Base 5.17.1: Identify CNS values."""

    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NS_LIST = 0x02
    NS_ID_DESCRIPTORS = 0x03


class FeatureId(enum.IntEnum):
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    TEMPERATURE_THRESHOLD = 0x04
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    ASYNC_EVENT_CONFIG = 0x0B
    KEEP_ALIVE_TIMER = 0x0F
    HOST_IDENTIFIER = 0x81


class LogPage(enum.IntEnum):
    ERROR = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NS_LIST = 0x04
    DISCOVERY = 0x70


class StatusCodeType(enum.IntEnum):
    GENERIC = 0x0
    COMMAND_SPECIFIC = 0x1
    MEDIA = 0x2
    PATH = 0x3
    VENDOR = 0x7


class AsyncEventType(enum.IntEnum):
    """Base 5.2: AER completion dword 0 bits 2:0."""

    ERROR = 0x0
    SMART = 0x1
    NOTICE = 0x2
    IMMEDIATE = 0x3
    IO_COMMAND_SET = 0x6
    VENDOR = 0x7


class NoticeInfo(enum.IntEnum):
    NS_ATTR_CHANGED = 0x00
    FW_ACTIVATION_STARTING = 0x01
    TELEMETRY_LOG_CHANGED = 0x02
    ANA_CHANGE = 0x03
    PREDICTABLE_LATENCY = 0x04
    LBA_STATUS = 0x05
    ENDURANCE_GROUP = 0x06
    DISCOVERY_LOG_CHANGED = 0xF0


# CC register fields (Base 3.1.3.5).
CC_EN = 0x1
CC_CSS_NVM = 0 << 4
CC_SHN_NORMAL = 1 << 14
CC_SHN_MASK = 3 << 14
CC_IOSQES = 6 << 16   # 2^6 = 64-byte SQEs
CC_IOCQES = 4 << 20   # 2^4 = 16-byte CQEs
# CSTS (Base 3.1.3.6).
CSTS_RDY = 0x1
CSTS_CFS = 0x2
CSTS_SHST_MASK = 0x3 << 2
CSTS_SHST_COMPLETE = 0x2 << 2

# Connect CATTR bit 2: "Disable SQ flow control" (NVMe-oF 3.3.1).
CONNECT_CATTR_DISABLE_SQ_FLOW_CONTROL = 0x04
ADMIN_CNTLID_DYNAMIC = 0xFFFF

# SGL descriptor type byte (Base 4.3.2): (type << 4) | subtype.
SGL_DATA_BLOCK_OFFSET = 0x01      # in-capsule data: Data Block, subtype Offset
SGL_TRANSPORT_DATA_BLOCK = 0x5A   # Transport SGL Data Block, subtype Transport specific
# CDW0 byte 1: PSDT = 01b (SGL, MPTR contiguous) in bits 7:6. Fabrics requires SGLs.
PSDT_SGL = 0x40

# Read/Write CDW12 flags (NVM Command Set 3.2.4/3.2.6).
RW_FUA = 1 << 30
RW_LR = 1 << 31
WZ_DEAC = 1 << 25
DSM_ATTR_DEALLOCATE = 1 << 2

ADMIN_QUEUE_IN_CAPSULE = 8192   # kernel NVME_TCP_ADMIN_CCSZ and SPDK: 8 KiB on the admin queue
NVME_TCP_DIGEST_LEN = 4
NVME_TCP_PFV_1_0 = 0
DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
