"""Sans-IO core of the NBD server: fixed-newstyle handshake, request framing, reply encoding.

This module does no I/O: it imports neither trio nor socket, never blocks and never touches a
bdev.  The shell (`server.py`) moves bytes between a socket and the objects here, and answers the
few questions the handshake cannot answer by itself (which exports exist, how big they are).

Wire format: NetworkBlockDevice/nbd doc/proto.md (all integers big-endian).  Only the fixed
newstyle negotiation is spoken; oldstyle is not.

Theory of operation
-------------------
Handshake (`ServerHandshake`)::

    greeting queued -> AWAIT_FLAGS --client flags--> AWAIT_OPTION
    AWAIT_OPTION --option header--> AWAIT_OPTION_DATA --data--> (handled)
        STARTTLS / STRUCTURED_REPLY / unknown / malformed: answered here -> AWAIT_OPTION
        ABORT: ACK queued -> CLOSED (event Closed)
        LIST: event ListExports -> AWAIT_LIST_REPLY --reply_list()--> AWAIT_OPTION
        INFO / GO / EXPORT_NAME: event ExportRequest -> AWAIT_EXPORT_REPLY --reply_export()-->
            INFO ok or any error: AWAIT_OPTION
            GO / EXPORT_NAME ok: TRANSMISSION (event Negotiated)
            EXPORT_NAME refused: CLOSED (event Closed; the protocol has no error reply for it)
    any violation of a MUST by the client -> ERROR (RemoteProtocolError raised)

The caller drives it h11-style: `receive_data(bytes)`, `next_event()` (an event or NEED_DATA),
`data_to_send()`.  Bytes received after the option that entered transmission are handed on with
`trailing_data()`.

Transmission (`RequestReader` + the reply builders): requests are 28-byte headers, WRITE carries
*length* payload bytes.  The reader owns a receive buffer the shell fills in place
(`get_buffer()`/`commit()`, i.e. `recv_into`, no copy); a write payload that is not complete in
that buffer gets its own bytearray and the rest of it is received straight into it.  Replies are
built as small header `bytes`; read data is never copied here, the shell sends header + data
as separate buffers.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "NBDMAGIC", "IHAVEOPT", "OPTION_REPLY_MAGIC", "REQUEST_MAGIC", "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC", "HandshakeFlag", "ClientFlag", "TransmissionFlag", "Opt", "Rep",
    "Info", "Cmd", "CmdFlag", "ReplyFlag", "ReplyType", "NbdErrno",
    "NbdError", "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "ExportInfo", "ListExports", "ExportRequest", "Negotiated", "Closed", "NEED_DATA",
    "ServerHandshake", "RequestReader", "export_flags", "plain_reads", "validate_request",
    "nbd_errno",
    "simple_reply", "read_chunk_header", "error_chunk", "none_chunk",
    "MAX_BLOCK", "MAX_PAYLOAD", "MAX_OPTION_LENGTH", "MAX_STRING", "REQUEST_SIZE",
]

# --------------------------------------------------------------------------- constants

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: Largest READ/WRITE we accept (and advertise as the maximum block size): 32 MiB, the size
#: proto.md says a client may always use without being taken for a denial of service.
MAX_BLOCK = 32 * 1024 * 1024
#: A WRITE whose payload is larger than this cannot be framed safely: hard disconnect.
MAX_PAYLOAD = 32 * 1024 * 1024
#: Option data longer than this (names are at most 4096 bytes) is a denial of service: hard
#: disconnect ("if a server believes a client's behaviour constitutes a denial of service, it MAY
#: initiate a hard disconnect").
MAX_OPTION_LENGTH = 64 * 1024
#: proto.md: strings "MUST be no longer than 4096 bytes".
MAX_STRING = 4096


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


_REP_ERR = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR + 1
    ERR_POLICY = _REP_ERR + 2
    ERR_INVALID = _REP_ERR + 3
    ERR_PLATFORM = _REP_ERR + 4
    ERR_TLS_REQD = _REP_ERR + 5
    ERR_UNKNOWN = _REP_ERR + 6
    ERR_SHUTDOWN = _REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
    ERR_TOO_BIG = _REP_ERR + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class NbdErrno(enum.IntEnum):
    """The only error values allowed on the wire (proto.md "Error values")."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# Plain ints for the hot path (IntEnum attribute lookups and comparisons are slower).
_CMD_READ, _CMD_WRITE, _CMD_DISC, _CMD_FLUSH = 0, 1, 2, 3
_CMD_TRIM, _CMD_WRITE_ZEROES = 4, 6
_FLAG_FUA, _FLAG_NO_HOLE = 1, 2
_EPERM, _EINVAL, _ENOSPC = 1, 22, 28
_TF_READ_ONLY, _TF_SEND_FUA, _TF_SEND_TRIM, _TF_SEND_WRITE_ZEROES = 0x2, 0x8, 0x20, 0x40

# --------------------------------------------------------------------------- wire structs

_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION_HDR = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_DONE, _OFFSET_DATA = int(ReplyFlag.DONE), int(ReplyType.OFFSET_DATA)
_READ_CHUNK = struct.Struct(">IHHQIQ")
_ERROR_CHUNK = struct.Struct(">IHHQIIH")

assert _GREETING.size == 18
assert _OPTION_HDR.size == 16
assert _OPTION_REPLY.size == 20
assert _INFO_EXPORT.size == 12
assert _INFO_BLOCK_SIZE.size == 14
assert _REQUEST.size == 28
assert _SIMPLE_REPLY.size == 16
assert _CHUNK.size == 20
assert _READ_CHUNK.size == 28
assert _ERROR_CHUNK.size == 26

REQUEST_SIZE = _REQUEST.size


def plain_reads(data, n: int, size: int, max_block: int) -> list[tuple[int, int, int]]:
    """The whole plain READ requests at the start of `data[:n]` (request magic, no flags,
    0 < length <= max_block, inside an export of `size` bytes), as (handle, offset, length):
    the requests a server may take on its fast path, parsed once, without payloads. Stops at
    the first other one; the caller consumes len(result) * REQUEST_SIZE bytes."""
    reads: list[tuple[int, int, int]] = []
    read = int(Cmd.READ)
    for magic, flags, cmd, handle, offset, length in _REQUEST.iter_unpack(
            memoryview(data)[:n - n % REQUEST_SIZE]):
        if (magic != REQUEST_MAGIC or flags or cmd != read or not 0 < length <= max_block
                or offset + length > size):
            break
        reads.append((handle, offset, length))
    return reads


_ZEROES_124 = bytes(124)
_SUPPORTED_CLIENT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
GREETING = _GREETING.pack(NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)

# --------------------------------------------------------------------------- errors


class NbdError(Exception):
    """Base of every error this package raises."""


class ProtocolError(NbdError):
    """The NBD conversation cannot go on; the shell closes the connection."""


class LocalProtocolError(ProtocolError):
    """The caller (our shell) used this object wrongly, e.g. answered a question not asked."""


class RemoteProtocolError(ProtocolError):
    """The client broke a MUST of the protocol (bad magic, unknown flags, oversize data).

    proto.md: "If either the client or the server detects a violation of a mandatory condition
    ('MUST' etc.) by the other party, it MAY initiate a hard disconnect."  The shell does.
    """


# --------------------------------------------------------------------------- events


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by `next_event()` / `next_request()` when more bytes must be received first.
NEED_DATA = _NeedData()


@dataclass(slots=True, frozen=True)
class ExportInfo:
    """What the shell tells the handshake about one export, read at negotiation time."""

    name: str
    size: int
    flags: int
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_BLOCK


@dataclass(slots=True, frozen=True)
class ListExports:
    """NBD_OPT_LIST: answer with `ServerHandshake.reply_list()`."""


@dataclass(slots=True, frozen=True)
class ExportRequest:
    """NBD_OPT_INFO / NBD_OPT_GO / NBD_OPT_EXPORT_NAME: answer with `reply_export()`.

    *name* is as sent ("" = the default export); *option* says which option asked.
    """

    name: str
    option: Opt
    info_requests: tuple[int, ...] = ()


@dataclass(slots=True, frozen=True)
class Negotiated:
    """Transmission phase entered on *export*; send `data_to_send()`, then serve requests."""

    export: ExportInfo
    structured_replies: bool


@dataclass(slots=True, frozen=True)
class Closed:
    """Negotiation ended without transmission; send `data_to_send()`, then close."""

    reason: str


# --------------------------------------------------------------------------- handshake


class _State(enum.Enum):
    AWAIT_FLAGS = "await_flags"
    AWAIT_OPTION = "await_option"
    AWAIT_OPTION_DATA = "await_option_data"
    AWAIT_LIST_REPLY = "await_list_reply"
    AWAIT_EXPORT_REPLY = "await_export_reply"
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


# Rule: every state change goes through this table (h11 style); a missing key is our own bug.
_TRANSITIONS: dict[tuple[_State, str], _State] = {
    (_State.AWAIT_FLAGS, "flags"): _State.AWAIT_OPTION,
    (_State.AWAIT_OPTION, "header"): _State.AWAIT_OPTION_DATA,
    (_State.AWAIT_OPTION_DATA, "answered"): _State.AWAIT_OPTION,
    (_State.AWAIT_OPTION_DATA, "abort"): _State.CLOSED,
    (_State.AWAIT_OPTION_DATA, "list"): _State.AWAIT_LIST_REPLY,
    (_State.AWAIT_OPTION_DATA, "export"): _State.AWAIT_EXPORT_REPLY,
    (_State.AWAIT_OPTION_DATA, "refuse"): _State.CLOSED,
    (_State.AWAIT_LIST_REPLY, "replied"): _State.AWAIT_OPTION,
    (_State.AWAIT_EXPORT_REPLY, "replied"): _State.AWAIT_OPTION,
    (_State.AWAIT_EXPORT_REPLY, "go"): _State.TRANSMISSION,
    (_State.AWAIT_EXPORT_REPLY, "refuse"): _State.CLOSED,
}


class ServerHandshake:
    """Server side of the fixed-newstyle negotiation.

    The greeting (NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES) is queued on construction.
    """

    def __init__(self, *, max_option_length: int = MAX_OPTION_LENGTH) -> None:
        self._state = _State.AWAIT_FLAGS
        self._in = bytearray()
        self._out = bytearray(GREETING)
        self._max_option_length = max_option_length
        self._option = 0
        self._option_length = 0
        self._request: ExportRequest | None = None
        self._negotiated: Negotiated | None = None
        self._closed_reason = ""
        self.client_flags = 0
        self.structured_replies = False

    # -- the three calls -------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state.value

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the client."""
        self._in += data

    def data_to_send(self) -> bytes:
        """Bytes to send to the client now (possibly empty)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def trailing_data(self) -> bytes:
        """Bytes received after the option that entered transmission (first requests)."""
        if self._state is not _State.TRANSMISSION:
            raise LocalProtocolError("trailing_data() is only meaningful in transmission")
        data = bytes(self._in)
        self._in.clear()
        return data

    def next_event(
        self,
    ) -> ListExports | ExportRequest | Negotiated | Closed | _NeedData:
        """Process buffered input; return the next event or NEED_DATA.

        Raises:
            RemoteProtocolError: the client broke the protocol; send `data_to_send()` (maybe
                empty) and close.
            LocalProtocolError: called while a `reply_*()` is still owed.
        """
        # A loop, not recursion: one receive may hold thousands of pipelined options (16 bytes
        # each), each a step here, and the stack must not grow with them.
        while True:
            state = self._state
            if state is _State.AWAIT_FLAGS:
                event = self._on_flags()
            elif state is _State.AWAIT_OPTION:
                event = self._on_option_header()
            elif state is _State.AWAIT_OPTION_DATA:
                event = self._on_option_data()
            else:
                return self._settled_event(state)
            if event is not None:
                return event

    def _settled_event(self, state: _State) -> Negotiated | Closed:
        """next_event() in a state that consumes no input."""
        if state is _State.TRANSMISSION:
            if self._negotiated is None:
                raise LocalProtocolError("Negotiated was already returned")
            event, self._negotiated = self._negotiated, None
            return event
        if state is _State.CLOSED:
            return Closed(self._closed_reason)
        if state is _State.ERROR:
            raise LocalProtocolError("handshake is in the ERROR state")
        raise LocalProtocolError(f"a reply is owed first (state {state.value})")

    # -- answers from the shell ------------------------------------------------------------

    def reply_list(self, exports: Iterable[tuple[str, str]]) -> None:
        """Answer ListExports with (name, description) pairs: one NBD_REP_SERVER each, then ACK."""
        if self._state is not _State.AWAIT_LIST_REPLY:
            raise LocalProtocolError("no NBD_OPT_LIST is waiting for a reply")
        for name, description in exports:
            raw = name.encode()
            self._reply(Opt.LIST, Rep.SERVER, _U32.pack(len(raw)) + raw + description.encode())
        self._reply(Opt.LIST, Rep.ACK)
        self._transition("replied")

    def reply_export(
        self,
        export: ExportInfo | None,
        *,
        error: Rep = Rep.ERR_UNKNOWN,
        message: str = "",
    ) -> None:
        """Answer an ExportRequest: *export* to accept, or None to refuse with *error*.

        For NBD_OPT_EXPORT_NAME a refusal cannot be signalled on the wire: the handshake moves
        to CLOSED and the shell must hang up.
        """
        if self._state is not _State.AWAIT_EXPORT_REPLY or self._request is None:
            raise LocalProtocolError("no export request is waiting for a reply")
        request, self._request = self._request, None
        option = request.option
        if export is None:
            if option is Opt.EXPORT_NAME:
                self._closed_reason = f"export {request.name!r} refused: {message or error.name}"
                self._transition("refuse")
            else:
                self._reply(option, error, message.encode())
                self._transition("replied")
            return
        if option is Opt.EXPORT_NAME:
            self._out += _EXPORT_NAME_REPLY.pack(export.size, export.flags)
            if not self.client_flags & ClientFlag.NO_ZEROES:
                self._out += _ZEROES_124
            self._enter_transmission(export)
            return
        self._reply(option, Rep.INFO, _INFO_EXPORT.pack(Info.EXPORT, export.size, export.flags))
        asked = request.info_requests
        if Info.NAME in asked:
            self._reply(option, Rep.INFO, _U16.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in asked and export.description:
            self._reply(option, Rep.INFO, _U16.pack(Info.DESCRIPTION) + export.description.encode())
        # Always sent: we enforce a maximum below the default "unlimited", and a client that
        # does not understand it "MUST ignore information replies it does not understand".
        self._reply(
            option,
            Rep.INFO,
            _INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block
            ),
        )
        self._reply(option, Rep.ACK)
        if option is Opt.GO:
            self._enter_transmission(export)
        else:
            self._transition("replied")

    # -- internals -------------------------------------------------------------------------

    def _transition(self, trigger: str) -> None:
        try:
            self._state = _TRANSITIONS[(self._state, trigger)]
        except KeyError:
            raise LocalProtocolError(
                f"no transition from {self._state.value} on {trigger!r}"
            ) from None

    def _fail(self, message: str) -> RemoteProtocolError:
        self._state = _State.ERROR
        return RemoteProtocolError(message)

    def _reply(self, option: int, rep: int, data: bytes = b"") -> None:
        self._out += _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, rep, len(data))
        self._out += data

    def _enter_transmission(self, export: ExportInfo) -> None:
        self._negotiated = Negotiated(export, self.structured_replies)
        self._transition("go")

    # The steps of next_event(): an event (or NEED_DATA) for the caller, or None once the
    # state has moved on and the next step may run.

    def _on_flags(self) -> _NeedData | None:
        if len(self._in) < 4:
            return NEED_DATA
        (flags,) = _CLIENT_FLAGS.unpack_from(self._in)
        del self._in[:4]
        # "the server MUST drop the TCP connection if the client sets an unknown flag"
        if flags & ~_SUPPORTED_CLIENT_FLAGS:
            raise self._fail(f"unknown client flags 0x{flags:08x}")
        self.client_flags = flags
        self._transition("flags")
        return None

    def _on_option_header(self) -> _NeedData | None:
        if len(self._in) < _OPTION_HDR.size:
            return NEED_DATA
        magic, option, length = _OPTION_HDR.unpack_from(self._in)
        if magic != IHAVEOPT:
            raise self._fail(f"bad option magic 0x{magic:016x}")
        if length > self._max_option_length:
            raise self._fail(f"option {option} data length {length} is too large")
        del self._in[: _OPTION_HDR.size]
        self._option = option
        self._option_length = length
        self._transition("header")
        return None

    def _on_option_data(self) -> _NeedData | ListExports | ExportRequest | Closed | None:
        length = self._option_length
        if len(self._in) < length:
            return NEED_DATA
        data = bytes(self._in[:length])
        del self._in[:length]
        handler = _OPTION_HANDLERS.get(self._option, ServerHandshake._opt_unsupported)
        event = handler(self, data)
        if event is not None:
            return event
        self._transition("answered")
        return None

    # Option handlers: return an event for the shell, or None once answered here.

    def _opt_unsupported(self, data: bytes) -> None:
        # Baseline: "Servers that receive messages which they do not implement MUST reply to
        # them with NBD_REP_ERR_UNSUP, and MUST NOT fail to parse the next message received."
        self._reply(self._option, Rep.ERR_UNSUP)

    def _opt_abort(self, data: bytes) -> Closed:
        # "The server MUST reply with NBD_REP_ACK" (and SHOULD ignore any data).
        self._reply(Opt.ABORT, Rep.ACK)
        self._closed_reason = "client aborted the negotiation"
        self._transition("abort")
        return Closed(self._closed_reason)

    def _opt_list(self, data: bytes) -> ListExports | None:
        if data:
            self._reply(Opt.LIST, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
            return None
        self._transition("list")
        return ListExports()

    def _opt_starttls(self, data: bytes) -> None:
        # NOTLS mode: "MUST respond with NBD_REP_ERR_POLICY ... or NBD_REP_ERR_UNSUP".
        if data:
            self._reply(Opt.STARTTLS, Rep.ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
        else:
            self._reply(Opt.STARTTLS, Rep.ERR_POLICY, b"TLS is not offered by this server")

    def _opt_structured_reply(self, data: bytes) -> None:
        if data:
            self._reply(Opt.STRUCTURED_REPLY, Rep.ERR_INVALID, b"option takes no data")
        elif self.structured_replies:
            self._reply(Opt.STRUCTURED_REPLY, Rep.ERR_INVALID, b"already negotiated")
        else:
            self.structured_replies = True
            self._reply(Opt.STRUCTURED_REPLY, Rep.ACK)

    def _opt_export_name(self, data: bytes) -> ExportRequest | Closed:
        try:
            name = _decode_name(data)
        except ValueError as exc:
            # No error reply exists for EXPORT_NAME: "the server MUST terminate the session".
            self._closed_reason = f"bad export name: {exc}"
            self._transition("refuse")
            return Closed(self._closed_reason)
        return self._ask_export(ExportRequest(name, Opt.EXPORT_NAME))

    def _opt_info_go(self, data: bytes) -> ExportRequest | None:
        option = Opt(self._option)
        # Data: u32 name length, name, u16 count, count x u16 info requests.
        if len(data) < 6:
            self._reply(option, Rep.ERR_INVALID, b"option data too short")
            return None
        (name_len,) = _U32.unpack_from(data)
        if name_len > len(data) - 6:
            self._reply(option, Rep.ERR_INVALID, b"name length exceeds option data")
            return None
        (count,) = _U16.unpack_from(data, 4 + name_len)
        if 6 + name_len + 2 * count != len(data):
            self._reply(option, Rep.ERR_INVALID, b"information request count mismatch")
            return None
        try:
            name = _decode_name(data[4 : 4 + name_len])
        except ValueError as exc:
            self._reply(option, Rep.ERR_INVALID, str(exc).encode())
            return None
        infos = struct.unpack_from(f">{count}H", data, 6 + name_len)
        return self._ask_export(ExportRequest(name, option, infos))

    def _ask_export(self, request: ExportRequest) -> ExportRequest:
        self._request = request
        self._transition("export")
        return request


_OPTION_HANDLERS = {
    Opt.EXPORT_NAME: ServerHandshake._opt_export_name,
    Opt.ABORT: ServerHandshake._opt_abort,
    Opt.LIST: ServerHandshake._opt_list,
    Opt.STARTTLS: ServerHandshake._opt_starttls,
    Opt.INFO: ServerHandshake._opt_info_go,
    Opt.GO: ServerHandshake._opt_info_go,
    Opt.STRUCTURED_REPLY: ServerHandshake._opt_structured_reply,
}


def _decode_name(raw: bytes) -> str:
    if len(raw) > MAX_STRING:
        raise ValueError("export name longer than 4096 bytes")
    name = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if "\0" in name:
        raise ValueError("export name contains NUL")
    return name


# --------------------------------------------------------------------------- transmission


def export_flags(
    *,
    read_only: bool,
    flush: bool = True,
    fua: bool = True,
    trim: bool = True,
    write_zeroes: bool = True,
    multi_conn: bool = True,
) -> int:
    """Transmission flags for an export with these capabilities."""
    flags = TransmissionFlag.HAS_FLAGS
    if read_only:
        flags |= TransmissionFlag.READ_ONLY
    if flush:
        flags |= TransmissionFlag.SEND_FLUSH
    if fua:
        flags |= TransmissionFlag.SEND_FUA
    if trim and not read_only:
        flags |= TransmissionFlag.SEND_TRIM
    if write_zeroes and not read_only:
        flags |= TransmissionFlag.SEND_WRITE_ZEROES
    if multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return int(flags)


class RequestReader:
    """Frames transmission-phase requests out of the byte stream, without copying reads.

    Use with `recv_into`::

        while (req := reader.next_request()) is NEED_DATA:
            n = sock.recv_into(reader.get_buffer()); reader.commit(n)

    `next_request()` returns a tuple ``(cmd, flags, handle, offset, length, payload)``; payload
    is a bytes-like object for a WRITE whose data was accepted, else None (a WRITE longer than
    *max_block* has its payload discarded, and `validate_request` answers it EINVAL).

    Raises:
        RemoteProtocolError: bad request magic, or a WRITE payload over *max_payload* (the
            stream cannot be trusted any more: "either the server or the client MAY initiate a
            hard disconnect if the payload of an NBD_CMD_WRITE request ... would be large enough
            to be deemed a denial of service attack").
    """

    __slots__ = (
        "_buf", "_mv", "_start", "_end", "_max_block", "_max_payload",
        "_payload", "_payload_mv", "_payload_got", "_pending", "_skip", "_failed",
    )

    def __init__(
        self,
        *,
        max_block: int = MAX_BLOCK,
        max_payload: int = MAX_PAYLOAD,
        buffer_size: int = 256 * 1024,
    ) -> None:
        if buffer_size < REQUEST_SIZE:
            raise ValueError("buffer_size must hold at least one request header")
        self._buf = bytearray(buffer_size)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._max_block = max_block
        self._max_payload = max(max_payload, max_block)
        self._payload: bytearray | None = None
        self._payload_mv: memoryview | None = None
        self._payload_got = 0
        self._pending: tuple[int, int, int, int, int] | None = None
        self._skip = 0
        self._failed = False

    def idle(self) -> bool:
        """Nothing buffered or half-read: no partial request, payload or skipped payload."""
        return (self._start == self._end and self._payload_mv is None and self._pending is None
                and not self._skip and not self._failed)

    def get_buffer(self) -> memoryview:
        """Where the next received bytes must be written (then call `commit(n)`)."""
        pmv = self._payload_mv
        if pmv is not None and self._payload_got < len(pmv):
            # Zero copy: the rest of a large WRITE payload lands in its own buffer.
            return pmv[self._payload_got :]
        start, end = self._start, self._end
        if start:
            # Only a partial header (< 28 bytes) is normally left behind once parsing stops
            # for lack of data, so this move is tiny.
            n = end - start
            self._buf[:n] = self._mv[start:end]
            self._start, self._end = 0, n
            end = n
        return self._mv[end:]

    def commit(self, n: int) -> None:
        """*n* bytes were written into the buffer returned by `get_buffer()`."""
        pmv = self._payload_mv
        if pmv is not None and self._payload_got < len(pmv):
            self._payload_got += n
        else:
            self._end += n

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copying convenience for tests and callers without `recv_into`.

        Raises:
            LocalProtocolError: the receive buffer is full of unparsed requests; call
                `next_request()` first.
        """
        mv = memoryview(data).cast("B")
        while mv:
            buf = self.get_buffer()
            if not buf:
                raise LocalProtocolError("receive buffer full; call next_request() first")
            k = min(len(buf), len(mv))
            buf[:k] = mv[:k]
            self.commit(k)
            mv = mv[k:]

    def next_request(self) -> tuple[int, int, int, int, int, object] | _NeedData:
        if self._failed:
            raise LocalProtocolError("request stream already failed")
        if self._payload is not None:
            if self._payload_got < len(self._payload):
                return NEED_DATA
            payload = self._payload
            self._payload = self._payload_mv = None
            pending, self._pending = self._pending, None
            return (*pending, payload)  # type: ignore[misc]
        if self._skip:
            take = min(self._skip, self._end - self._start)
            self._start += take
            self._skip -= take
            if self._skip:
                return NEED_DATA
            pending, self._pending = self._pending, None
            return (*pending, None)  # type: ignore[misc]
        start = self._start
        avail = self._end - start
        if avail < REQUEST_SIZE:
            return NEED_DATA
        magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(self._buf, start)
        if magic != REQUEST_MAGIC:
            self._failed = True
            raise RemoteProtocolError(f"bad request magic 0x{magic:08x}")
        start += REQUEST_SIZE
        self._start = start
        if cmd != _CMD_WRITE or not length:
            return (cmd, flags, handle, offset, length, b"" if cmd == _CMD_WRITE else None)
        if length > self._max_payload:
            self._failed = True
            raise RemoteProtocolError(f"write payload of {length} bytes is too large")
        if length > self._max_block:
            self._pending = (cmd, flags, handle, offset, length)
            self._skip = length
            return self.next_request()
        avail -= REQUEST_SIZE
        if avail >= length:
            end = start + length
            self._start = end
            return (cmd, flags, handle, offset, length, self._buf[start:end])
        payload = bytearray(length)
        payload[:avail] = self._mv[start : self._end]
        self._start = self._end = 0
        self._payload = payload
        self._payload_mv = memoryview(payload)
        self._payload_got = avail
        self._pending = (cmd, flags, handle, offset, length)
        return NEED_DATA


# Allowed command flags per command (FUA only when SEND_FUA was advertised).
_ALLOWED_FLAGS = {
    _CMD_READ: _FLAG_FUA,
    _CMD_WRITE: _FLAG_FUA,
    _CMD_FLUSH: _FLAG_FUA,
    _CMD_TRIM: _FLAG_FUA,
    _CMD_WRITE_ZEROES: _FLAG_FUA | _FLAG_NO_HOLE,
}


def validate_request(
    cmd: int, flags: int, offset: int, length: int, size: int, tflags: int, max_block: int
) -> int:
    """Return 0 if the request may be executed, else the NBD error to reply with.

    Not for NBD_CMD_DISC (which has no reply).  Per proto.md "Error values": unknown command or
    flag -> EINVAL; write/trim on a read-only export -> EPERM; a write (or write zeroes) past
    the end -> ENOSPC; a read or trim past the end -> EINVAL; READ/WRITE over the maximum block
    size -> EINVAL.  CACHE and BLOCK_STATUS are not offered, so they are EINVAL too.
    """
    allowed = _ALLOWED_FLAGS.get(cmd)
    if allowed is None:
        return _EINVAL
    if not tflags & _TF_SEND_FUA:
        allowed &= ~_FLAG_FUA
    if flags & ~allowed:
        return _EINVAL
    if cmd == _CMD_FLUSH:
        return _EINVAL if offset or length else 0
    if cmd != _CMD_READ:  # WRITE, TRIM, WRITE_ZEROES
        if tflags & _TF_READ_ONLY:
            return _EPERM
        if cmd == _CMD_TRIM and not tflags & _TF_SEND_TRIM:
            return _EINVAL
        if cmd == _CMD_WRITE_ZEROES and not tflags & _TF_SEND_WRITE_ZEROES:
            return _EINVAL
    if length > max_block and cmd != _CMD_TRIM and cmd != _CMD_WRITE_ZEROES:
        return _EINVAL
    if offset + length > size:
        return _ENOSPC if cmd == _CMD_WRITE or cmd == _CMD_WRITE_ZEROES else _EINVAL
    return 0


_ERRNO_MAP = {
    _errno.EPERM: NbdErrno.EPERM,
    _errno.EACCES: NbdErrno.EPERM,
    _errno.EROFS: NbdErrno.EPERM,
    _errno.EIO: NbdErrno.EIO,
    _errno.ENOMEM: NbdErrno.ENOMEM,
    _errno.EINVAL: NbdErrno.EINVAL,
    _errno.ERANGE: NbdErrno.EINVAL,
    _errno.ENOSPC: NbdErrno.ENOSPC,
    _errno.EDQUOT: NbdErrno.ENOSPC,
    _errno.EFBIG: NbdErrno.ENOSPC,
    _errno.EOVERFLOW: NbdErrno.EOVERFLOW,
    _errno.ENOTSUP: NbdErrno.ENOTSUP,
    _errno.EOPNOTSUPP: NbdErrno.ENOTSUP,
    _errno.ESHUTDOWN: NbdErrno.ESHUTDOWN,
    _errno.ENODEV: NbdErrno.ESHUTDOWN,  # the bdev was removed: the client must disconnect
    _errno.ENXIO: NbdErrno.ESHUTDOWN,
}


def nbd_errno(err: int) -> int:
    """Map a host errno (BdevError.errno) onto one of the NBD error values (default EIO)."""
    return int(_ERRNO_MAP.get(err, NbdErrno.EIO))


# --------------------------------------------------------------------------- replies


def simple_reply(handle: int, error: int = 0) -> bytes:
    """Simple reply header (16 bytes); a successful READ's data follows it."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def read_chunk_header(handle: int, offset: int, length: int) -> bytes:
    """Final NBD_REPLY_TYPE_OFFSET_DATA chunk header incl. its offset (28 bytes); *length*
    data bytes follow.  *length* must be >= 1 (use `none_chunk` for an empty read)."""
    # Plain ints: an enum member looked up per reply costs about 65 ns each (CPython 3.11).
    return _READ_CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, handle, length + 8, offset)


def error_chunk(handle: int, error: int, message: str = "") -> bytes:
    """Final NBD_REPLY_TYPE_ERROR chunk with an optional human-readable message."""
    raw = message.encode()
    if len(raw) > MAX_STRING:
        # Cut on a character boundary: the message is a string, which must stay UTF-8.
        raw = raw[:MAX_STRING].decode("utf-8", "ignore").encode()
    return (
        _ERROR_CHUNK.pack(
            STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.ERROR, handle, 6 + len(raw),
            error, len(raw),
        )
        + raw
    )


def none_chunk(handle: int) -> bytes:
    """Final NBD_REPLY_TYPE_NONE chunk (success, no payload)."""
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.NONE, handle, 0)
