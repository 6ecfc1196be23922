"""Sans-IO NBD protocol core: golden bytes for the handshake, option replies, requests, replies.

No sockets.  Client messages are built by hand here (independently of the code under test).
"""

import errno
import struct

import pytest

from blockfs.nbd._protocol import (
    NEED_DATA,
    Closed,
    ExportInfo,
    ExportRequest,
    ListExports,
    LocalProtocolError,
    Negotiated,
    Opt,
    RemoteProtocolError,
    Rep,
    RequestReader,
    ServerHandshake,
    TransmissionFlag,
    error_chunk,
    export_flags,
    nbd_errno,
    none_chunk,
    plain_reads,
    read_chunk_header,
    simple_reply,
    validate_request,
)

GREETING = b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
REQ_MAGIC = bytes.fromhex("25609513")

EXPORT = ExportInfo(
    name="nvme0n1",
    size=0x100000,
    flags=0x016D,
    description="Malloc disk",
    min_block=1,
    preferred_block=4096,
    max_block=32 * 1024 * 1024,
)


def opt(option: int, data: bytes = b"") -> bytes:
    return b"IHAVEOPT" + struct.pack(">II", option, len(data)) + data


def info_data(name: bytes, *infos: int) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos
    )


def rep(option: int, rtype: int, data: bytes = b"") -> bytes:
    return REPLY_MAGIC + struct.pack(">III", option, rtype, len(data)) + data


def request(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQ_MAGIC + struct.pack(">HHQQI", flags, cmd, handle, offset, length)


def negotiating(client_flags: int = 3) -> ServerHandshake:
    hs = ServerHandshake()
    assert hs.data_to_send() == GREETING
    hs.receive_data(struct.pack(">I", client_flags))
    assert hs.next_event() is NEED_DATA
    assert hs.state == "await_option"
    return hs


# ----------------------------------------------------------------------------- handshake


def test_greeting_golden():
    hs = ServerHandshake()
    assert hs.data_to_send() == bytes.fromhex("4e42444d41474943" "49484156454f5054" "0003")
    assert hs.data_to_send() == b""
    assert hs.next_event() is NEED_DATA


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_known_client_flags_accepted(flags):
    hs = negotiating(flags)
    assert hs.client_flags == flags


def test_unknown_client_flag_drops_connection():
    hs = ServerHandshake()
    hs.data_to_send()
    hs.receive_data(b"\x00\x00\x00\x04")
    with pytest.raises(RemoteProtocolError, match="client flags"):
        hs.next_event()
    with pytest.raises(LocalProtocolError):
        hs.next_event()


def test_bad_option_magic():
    hs = negotiating()
    hs.receive_data(b"GARBAGE!" + struct.pack(">II", 7, 0))
    with pytest.raises(RemoteProtocolError, match="magic"):
        hs.next_event()


def test_oversize_option_length_is_refused_before_reading_it():
    hs = negotiating()
    hs.receive_data(b"IHAVEOPT" + struct.pack(">II", 99, 10 * 1024 * 1024))
    with pytest.raises(RemoteProtocolError, match="too large"):
        hs.next_event()


def test_unknown_option_gets_err_unsup_and_parsing_continues():
    hs = negotiating()
    hs.receive_data(opt(99, b"junk") + opt(Opt.LIST_META_CONTEXT, b"x" * 10) + opt(Opt.LIST))
    assert hs.next_event() == ListExports()
    assert hs.data_to_send() == (
        REPLY_MAGIC + bytes.fromhex("00000063" "80000001" "00000000")
        + rep(9, 0x80000001)
    )


def test_thousands_of_pipelined_options_in_one_receive():
    # 4096 options of 16 bytes fit in one 64 KiB receive; each is a step of next_event(), which
    # must not recurse per option (it hit the recursion limit at about 250).
    hs = negotiating()
    hs.receive_data(opt(99) * 4096 + opt(Opt.LIST))
    assert hs.next_event() == ListExports()
    assert hs.data_to_send() == rep(99, 0x80000001) * 4096


def test_list_golden():
    hs = negotiating()
    hs.receive_data(opt(Opt.LIST))
    assert hs.next_event() == ListExports()
    with pytest.raises(LocalProtocolError):
        hs.next_event()  # a reply is owed
    hs.reply_list([("nvme0n1", "Malloc disk"), ("p1", "")])
    assert hs.data_to_send() == (
        REPLY_MAGIC + bytes.fromhex("00000003" "00000002" "00000016")
        + b"\x00\x00\x00\x07nvme0n1Malloc disk"
        + rep(3, 2, b"\x00\x00\x00\x02p1")
        + REPLY_MAGIC + bytes.fromhex("00000003" "00000001" "00000000")
    )
    assert hs.next_event() is NEED_DATA


def test_list_with_data_is_invalid():
    hs = negotiating()
    hs.receive_data(opt(Opt.LIST, b"x"))
    assert hs.next_event() is NEED_DATA
    out = hs.data_to_send()
    assert out.startswith(rep(3, Rep.ERR_INVALID)[:16])
    assert struct.unpack_from(">I", out, 12)[0] == 0x80000003


def test_starttls_refused_by_policy():
    hs = negotiating()
    hs.receive_data(opt(Opt.STARTTLS))
    assert hs.next_event() is NEED_DATA
    out = hs.data_to_send()
    magic, option, rtype, length = struct.unpack_from(">QIII", out)
    assert (magic, option, rtype) == (0x3E889045565A9, 5, 0x80000002)
    assert len(out) == 20 + length
    hs.receive_data(opt(Opt.STARTTLS, b"x"))
    assert hs.next_event() is NEED_DATA
    assert struct.unpack_from(">I", hs.data_to_send(), 12)[0] == Rep.ERR_INVALID


def test_structured_reply_negotiation():
    hs = negotiating()
    hs.receive_data(opt(Opt.STRUCTURED_REPLY))
    assert hs.next_event() is NEED_DATA
    assert hs.data_to_send() == rep(8, 1)
    assert hs.structured_replies
    hs.receive_data(opt(Opt.STRUCTURED_REPLY))  # again: MAY fail with INVALID
    hs.next_event()
    assert struct.unpack_from(">I", hs.data_to_send(), 12)[0] == Rep.ERR_INVALID
    hs2 = negotiating()
    hs2.receive_data(opt(Opt.STRUCTURED_REPLY, b"x"))
    hs2.next_event()
    assert struct.unpack_from(">I", hs2.data_to_send(), 12)[0] == Rep.ERR_INVALID
    assert not hs2.structured_replies


def test_abort_acks_and_closes():
    hs = negotiating()
    hs.receive_data(opt(Opt.ABORT, b"ignored"))
    ev = hs.next_event()
    assert isinstance(ev, Closed)
    assert hs.data_to_send() == rep(2, 1)
    assert isinstance(hs.next_event(), Closed)


INFO_REPLIES_GOLDEN = (
    # NBD_INFO_EXPORT: type 0, size 0x100000, flags 0x016d
    REPLY_MAGIC + bytes.fromhex("00000006" "00000003" "0000000c" "0000" "0000000000100000" "016d")
    # NBD_INFO_NAME
    + REPLY_MAGIC + bytes.fromhex("00000006" "00000003" "00000009" "0001") + b"nvme0n1"
    # NBD_INFO_DESCRIPTION
    + REPLY_MAGIC + bytes.fromhex("00000006" "00000003" "0000000d" "0002") + b"Malloc disk"
    # NBD_INFO_BLOCK_SIZE: min 1, preferred 4096, max 32 MiB
    + REPLY_MAGIC
    + bytes.fromhex("00000006" "00000003" "0000000e" "0003" "00000001" "00001000" "02000000")
    + REPLY_MAGIC + bytes.fromhex("00000006" "00000001" "00000000")
)


def test_info_golden_and_stays_negotiating():
    hs = negotiating()
    hs.receive_data(opt(Opt.INFO, info_data(b"", 1, 2, 3, 77)))
    ev = hs.next_event()
    assert ev == ExportRequest("", Opt.INFO, (1, 2, 3, 77))
    hs.reply_export(EXPORT)
    assert hs.data_to_send() == INFO_REPLIES_GOLDEN
    assert hs.next_event() is NEED_DATA
    assert hs.state == "await_option"


def test_info_without_requests_sends_export_and_block_size_only():
    hs = negotiating()
    hs.receive_data(opt(Opt.INFO, info_data(b"nvme0n1")))
    assert hs.next_event() == ExportRequest("nvme0n1", Opt.INFO, ())
    hs.reply_export(EXPORT)
    out = hs.data_to_send()
    types = []
    pos = 0
    while pos < len(out):
        _, _, rtype, length = struct.unpack_from(">QIII", out, pos)
        if rtype == Rep.INFO:
            types.append(struct.unpack_from(">H", out, pos + 20)[0])
        else:
            types.append(("rep", rtype))
        pos += 20 + length
    assert types == [0, 3, ("rep", 1)]


def test_info_unknown_export():
    hs = negotiating()
    hs.receive_data(opt(Opt.INFO, info_data(b"nope")))
    assert hs.next_event() == ExportRequest("nope", Opt.INFO, ())
    hs.reply_export(None, message="no such export")
    assert hs.data_to_send() == rep(6, 0x80000006, b"no such export")
    assert hs.next_event() is NEED_DATA


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00",  # shorter than 6
        struct.pack(">I", 100) + b"ab" + b"\x00\x00",  # name length beyond data
        struct.pack(">I", 2) + b"ab" + struct.pack(">H", 2) + b"\x00\x01",  # count mismatch
        struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # not UTF-8
        struct.pack(">I", 2) + b"a\x00" + struct.pack(">H", 0),  # NUL in name
    ],
)
@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO])
def test_malformed_info_go_is_invalid(option, data):
    hs = negotiating()
    hs.receive_data(opt(option, data))
    assert hs.next_event() is NEED_DATA
    out = hs.data_to_send()
    assert struct.unpack_from(">QII", out) == (0x3E889045565A9, option, Rep.ERR_INVALID)
    assert hs.state == "await_option"


def test_go_enters_transmission_with_trailing_data():
    hs = negotiating()
    hs.receive_data(opt(Opt.STRUCTURED_REPLY))
    first = request(0, 1, 0, 512)
    hs.receive_data(opt(Opt.GO, info_data(b"", 1, 2, 3, 77)) + first)
    ev = hs.next_event()
    assert ev == ExportRequest("", Opt.GO, (1, 2, 3, 77))
    hs.reply_export(EXPORT)
    assert hs.data_to_send() == rep(8, 1) + INFO_REPLIES_GOLDEN.replace(
        b"\x00\x00\x00\x06", b"\x00\x00\x00\x07"
    )
    ev = hs.next_event()
    assert ev == Negotiated(EXPORT, True)
    assert hs.state == "transmission"
    assert hs.trailing_data() == first
    with pytest.raises(LocalProtocolError):
        hs.next_event()


def test_go_refused_stays_negotiating():
    hs = negotiating()
    hs.receive_data(opt(Opt.GO, info_data(b"x")))
    hs.next_event()
    hs.reply_export(None, error=Rep.ERR_UNKNOWN)
    assert hs.data_to_send() == rep(7, 0x80000006)
    assert hs.next_event() is NEED_DATA


@pytest.mark.parametrize("client_flags, zeroes", [(1, 124), (3, 0)])
def test_export_name_golden(client_flags, zeroes):
    hs = negotiating(client_flags)
    hs.receive_data(opt(Opt.EXPORT_NAME, b"nvme0n1"))
    assert hs.next_event() == ExportRequest("nvme0n1", Opt.EXPORT_NAME, ())
    hs.reply_export(EXPORT)
    assert hs.data_to_send() == bytes.fromhex("0000000000100000" "016d") + bytes(zeroes)
    assert hs.next_event() == Negotiated(EXPORT, False)
    assert hs.trailing_data() == b""


def test_export_name_refused_closes_without_reply():
    hs = negotiating()
    hs.receive_data(opt(Opt.EXPORT_NAME, b"nope"))
    hs.next_event()
    hs.reply_export(None)
    assert hs.data_to_send() == b""
    assert isinstance(hs.next_event(), Closed)


def test_export_name_with_bad_name_closes():
    hs = negotiating()
    hs.receive_data(opt(Opt.EXPORT_NAME, b"\xff"))
    assert isinstance(hs.next_event(), Closed)
    assert hs.data_to_send() == b""


def test_reply_misuse_is_local_error():
    hs = negotiating()
    with pytest.raises(LocalProtocolError):
        hs.reply_list([])
    with pytest.raises(LocalProtocolError):
        hs.reply_export(EXPORT)
    with pytest.raises(LocalProtocolError):
        hs.trailing_data()


def test_whole_session_fed_one_byte_at_a_time():
    stream = (
        struct.pack(">I", 3)
        + opt(123, b"??")
        + opt(Opt.STARTTLS)
        + opt(Opt.LIST)
        + opt(Opt.STRUCTURED_REPLY)
        + opt(Opt.INFO, info_data(b"nvme0n1", 3))
        + opt(Opt.GO, info_data(b"nvme0n1", 3))
        + request(3, 9, 0, 0)
    )
    hs = ServerHandshake()
    out = hs.data_to_send()
    events = []
    for i in range(len(stream)):
        hs.receive_data(stream[i : i + 1])
        while True:
            ev = hs.next_event()
            if ev is NEED_DATA:
                break
            events.append(ev)
            if isinstance(ev, ListExports):
                hs.reply_list([("nvme0n1", "")])
            elif isinstance(ev, ExportRequest):
                hs.reply_export(EXPORT)
            elif isinstance(ev, Negotiated):
                break
        out += hs.data_to_send()
        if hs.state == "transmission":
            trailing = hs.trailing_data()
            break
    assert [type(e).__name__ for e in events] == [
        "ListExports", "ExportRequest", "ExportRequest", "Negotiated",
    ]
    assert events[-1].structured_replies
    # Replies in order: UNSUP(123), POLICY(STARTTLS), SERVER+ACK(LIST), ACK(SR), INFO..., GO...
    pos, kinds = len(GREETING), []
    while pos < len(out):
        _, option, rtype, length = struct.unpack_from(">QIII", out, pos)
        kinds.append((option, rtype))
        pos += 20 + length
    assert kinds == [
        (123, Rep.ERR_UNSUP), (5, Rep.ERR_POLICY), (3, Rep.SERVER), (3, Rep.ACK), (8, Rep.ACK),
        (6, Rep.INFO), (6, Rep.INFO), (6, Rep.ACK), (7, Rep.INFO), (7, Rep.INFO), (7, Rep.ACK),
    ]
    # The byte that completed GO was the last byte of the option; the request follows later.
    assert trailing == b""


# ----------------------------------------------------------------------------- requests


def test_request_golden_parse():
    r = RequestReader()
    r.receive_data(bytes.fromhex("25609513" "0001" "0000" "0102030405060708" "0000000000001000" "00000200"))
    assert r.next_request() == (0, 1, 0x0102030405060708, 0x1000, 0x200, None)
    assert r.next_request() is NEED_DATA


def test_plain_reads_stops_at_the_first_other_request():
    """The whole plain READs at the head of a buffer (what a server may take on its fast path
    without a payload), parsed to (handle, offset, length): no flags, 0 < length <= max_block,
    inside the export; a partial header, a write, a flagged read, a zero-length or oversized
    or out-of-range one stop it."""
    reads = request(0, 1, 0, 4096) + request(0, 2, 8192, 512)
    both = [(1, 0, 4096), (2, 8192, 512)]
    assert plain_reads(reads, len(reads), 1 << 20, 1 << 16) == both
    assert plain_reads(bytearray(reads + reads[:27]), 83, 1 << 20, 1 << 16) == both
    assert plain_reads(reads, 55, 1 << 20, 1 << 16) == both[:1]   # only n bytes count
    for stop in (request(1, 3, 0, 4096), request(0, 3, 0, 4096, flags=1), request(0, 3, 0, 0),
                 request(0, 3, 0, 1 << 17), request(0, 3, (1 << 20) - 512, 1024),
                 b"\x00" * 4 + request(0, 3, 0, 512)[4:]):
        data = reads + stop + reads
        assert plain_reads(data, len(data), 1 << 20, 1 << 16) == both, stop
    assert plain_reads(b"", 0, 1 << 20, 1 << 16) == []


def test_request_reader_idle_only_with_nothing_half_read():
    r = RequestReader(buffer_size=4096)
    assert r.idle()
    r.receive_data(request(0, 1, 0, 512)[:10])
    assert not r.idle()                          # part of a header
    r.receive_data(request(0, 1, 0, 512)[10:])
    assert r.next_request()[:2] == (0, 0) and r.next_request() is NEED_DATA and r.idle()
    r.receive_data(request(1, 2, 0, 1024) + b"x" * 100)
    assert r.next_request() is NEED_DATA and not r.idle()    # a write's payload under way
    r.receive_data(b"x" * 924)
    assert r.next_request()[0] == 1 and r.idle()


def test_write_with_payload_byte_at_a_time():
    data = bytes(range(256)) * 4
    stream = request(1, 7, 4096, len(data), flags=1) + data + request(3, 8, 0, 0)
    r = RequestReader(buffer_size=64)
    got = []
    for i in range(len(stream)):
        r.receive_data(stream[i : i + 1])
        while (req := r.next_request()) is not NEED_DATA:
            got.append(req)
    assert len(got) == 2
    cmd, flags, handle, offset, length, payload = got[0]
    assert (cmd, flags, handle, offset, length) == (1, 1, 7, 4096, 1024)
    assert bytes(payload) == data
    assert got[1] == (3, 0, 8, 0, 0, None)


def test_large_write_payload_is_received_in_place():
    data = b"\xab" * 10000
    r = RequestReader(buffer_size=4096)
    head = request(1, 1, 0, len(data)) + data[:100]
    r.get_buffer()[: len(head)] = head
    r.commit(len(head))
    assert r.next_request() is NEED_DATA
    # The rest of the payload goes straight into its own buffer, in one piece.
    buf = r.get_buffer()
    assert len(buf) == len(data) - 100
    buf[:] = data[100:]
    r.commit(len(buf))
    # Bytes after the payload land in the receive buffer.
    tail = request(0, 2, 0, 512)
    r.receive_data(tail)
    cmd, _, handle, _, length, payload = r.next_request()
    assert (cmd, handle, length, bytes(payload)) == (1, 1, len(data), data)
    assert r.next_request() == (0, 0, 2, 0, 512, None)


def test_many_requests_in_one_receive():
    stream = b"".join(request(0, h, h * 4096, 4096) for h in range(100))
    r = RequestReader()
    r.receive_data(stream)
    handles = []
    while (req := r.next_request()) is not NEED_DATA:
        handles.append(req[2])
    assert handles == list(range(100))


def test_zero_length_write():
    r = RequestReader()
    r.receive_data(request(1, 5, 0, 0))
    assert r.next_request() == (1, 0, 5, 0, 0, b"")


def test_bad_request_magic():
    r = RequestReader()
    r.receive_data(b"\x00" * 28)
    with pytest.raises(RemoteProtocolError, match="magic"):
        r.next_request()
    with pytest.raises(LocalProtocolError):
        r.next_request()


def test_absurd_write_payload_is_fatal():
    r = RequestReader()
    r.receive_data(request(1, 1, 0, 32 * 1024 * 1024 + 1))
    with pytest.raises(RemoteProtocolError, match="too large"):
        r.next_request()


def test_write_over_max_block_is_skipped_not_fatal():
    r = RequestReader(max_block=1024, max_payload=1 << 20, buffer_size=512)
    stream = request(1, 1, 0, 5000) + b"x" * 5000 + request(0, 2, 0, 512)
    got = []
    for i in range(0, len(stream), 100):
        r.receive_data(stream[i : i + 100])
        while (req := r.next_request()) is not NEED_DATA:
            got.append(req)
    assert got == [(1, 0, 1, 0, 5000, None), (0, 0, 2, 0, 512, None)]
    assert validate_request(1, 0, 0, 5000, 1 << 30, 0x16D, 1024) == errno.EINVAL


def test_receive_data_when_buffer_full():
    r = RequestReader(buffer_size=28)
    r.receive_data(request(0, 1, 0, 1))
    with pytest.raises(LocalProtocolError):
        r.receive_data(b"x")
    assert r.next_request()[2] == 1
    r.receive_data(b"x")


def test_buffer_size_must_hold_a_header():
    with pytest.raises(ValueError):
        RequestReader(buffer_size=10)


# ----------------------------------------------------------------------------- validation

RW = export_flags(read_only=False)
RO = export_flags(read_only=True)
SIZE = 1 << 20
MAXB = 1 << 16


def test_export_flags():
    assert RW == 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x100
    assert RO == 0x1 | 0x2 | 0x4 | 0x8 | 0x100
    assert export_flags(read_only=False, flush=False, fua=False, trim=False,
                        write_zeroes=False, multi_conn=False) == TransmissionFlag.HAS_FLAGS


@pytest.mark.parametrize(
    "cmd, flags, offset, length, tflags, expected",
    [
        (0, 0, 0, 4096, RW, 0),
        (0, 1, 0, 4096, RW, 0),  # FUA on a read: accepted (clients do this)
        (0, 4, 0, 4096, RW, errno.EINVAL),  # DF not advertised
        (0, 0x40, 0, 4096, RW, errno.EINVAL),  # unknown flag
        (0, 0, SIZE - 1, 1, RW, 0),
        (0, 0, SIZE - 1, 2, RW, errno.EINVAL),  # read past the end
        (0, 0, 0, MAXB + 1, RW, errno.EINVAL),  # over max block
        (0, 0, 0, 0, RW, 0),
        (0, 0, 2**64 - 1, 4096, RW, errno.EINVAL),
        (1, 1, 0, 4096, RW, 0),
        (1, 0, SIZE, 1, RW, errno.ENOSPC),  # write past the end
        (1, 0, 0, 4096, RO, errno.EPERM),
        (1, 2, 0, 4096, RW, errno.EINVAL),  # NO_HOLE only for WRITE_ZEROES
        (1, 0, 0, MAXB + 1, RW, errno.EINVAL),
        (3, 0, 0, 0, RW, 0),
        (3, 1, 0, 0, RW, 0),
        (3, 0, 0, 1, RW, errno.EINVAL),  # flush offset/length reserved
        (3, 0, 0, 0, RO, 0),
        (4, 0, 0, SIZE, RW, 0),  # trim may exceed max block
        (4, 0, 1, SIZE, RW, errno.EINVAL),
        (4, 0, 0, 4096, RO, errno.EPERM),
        (4, 0, 0, 4096, RW & ~0x20, errno.EINVAL),
        (6, 2, 0, SIZE, RW, 0),
        (6, 3, 0, 4096, RW, 0),
        (6, 16, 0, 4096, RW, errno.EINVAL),  # FAST_ZERO not advertised
        (6, 0, 4096, SIZE, RW, errno.ENOSPC),
        (6, 0, 0, 4096, RO, errno.EPERM),
        (6, 0, 0, 4096, RW & ~0x40, errno.EINVAL),
        (5, 0, 0, 4096, RW, errno.EINVAL),  # CACHE unsupported
        (7, 0, 0, 4096, RW, errno.EINVAL),  # BLOCK_STATUS unsupported
        (42, 0, 0, 0, RW, errno.EINVAL),  # unknown command
        (1, 1, 0, 4096, RW & ~0x8, errno.EINVAL),  # FUA when SEND_FUA not advertised
    ],
)
def test_validate_request(cmd, flags, offset, length, tflags, expected):
    assert validate_request(cmd, flags, offset, length, SIZE, tflags, MAXB) == expected


@pytest.mark.parametrize(
    "err, expected",
    [
        (errno.EPERM, 1), (errno.EROFS, 1), (errno.EACCES, 1), (errno.EIO, 5), (errno.ENOMEM, 12),
        (errno.EINVAL, 22), (errno.ENOSPC, 28), (errno.EFBIG, 28), (errno.EDQUOT, 28),
        (errno.EOVERFLOW, 75), (errno.EOPNOTSUPP, 95), (errno.ESHUTDOWN, 108),
        (errno.ENODEV, 108), (errno.ETIMEDOUT, 5), (errno.EBUSY, 5), (9999, 5),
    ],
)
def test_nbd_errno(err, expected):
    assert nbd_errno(err) == expected


# ----------------------------------------------------------------------------- replies


def test_simple_reply_golden():
    assert simple_reply(0x0102030405060708) == bytes.fromhex("67446698" "00000000" "0102030405060708")
    assert simple_reply(1, 22) == bytes.fromhex("67446698" "00000016" "0000000000000001")


def test_read_chunk_header_golden():
    assert read_chunk_header(5, 0x1000, 512) == bytes.fromhex(
        "668e33ef" "0001" "0001" "0000000000000005" "00000208" "0000000000001000"
    )


def test_error_chunk_golden():
    assert error_chunk(5, 5, "bad") == bytes.fromhex(
        "668e33ef" "0001" "8001" "0000000000000005" "00000009" "00000005" "0003"
    ) + b"bad"
    assert error_chunk(5, 22) == bytes.fromhex(
        "668e33ef" "0001" "8001" "0000000000000005" "00000006" "00000016" "0000"
    )


def test_error_chunk_long_message_stays_utf8():
    # proto.md: a string (error messages included) is UTF-8 and "MUST be no longer than 4096
    # bytes"; cutting at byte 4096 must not split a multi-byte character.
    chunk = error_chunk(5, 5, "a" + "\u00e9" * 3000)
    (mlen,) = struct.unpack_from(">H", chunk, 24)
    assert mlen <= 4096 and len(chunk) == 26 + mlen
    assert struct.unpack_from(">I", chunk, 16)[0] == 6 + mlen
    assert chunk[26:].decode("utf-8") == "a" + "\u00e9" * ((mlen - 1) // 2)


def test_none_chunk_golden():
    assert none_chunk(9) == bytes.fromhex("668e33ef" "0001" "0000" "0000000000000009" "00000000")


def test_export_name_over_4096_bytes():
    hs = negotiating()
    hs.receive_data(opt(Opt.INFO, info_data(b"x" * 4097)))
    assert hs.next_event() is NEED_DATA
    assert struct.unpack_from(">I", hs.data_to_send(), 12)[0] == Rep.ERR_INVALID
    hs.receive_data(opt(Opt.EXPORT_NAME, b"x" * 4097))
    assert isinstance(hs.next_event(), Closed)


def test_need_data_repr():
    assert repr(NEED_DATA) == "NEED_DATA"
