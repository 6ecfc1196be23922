"""Command-line options shared by the `blockfs` commands, with nvme-cli's flag names and the
kernel's defaults, and their translation into initiator options. Parsing only; no I/O."""

from __future__ import annotations

import argparse
import math
import re
import uuid

from initiator._errors import LocalProtocolError
from initiator._fabrics import check_nqn
from initiator.controller import ControllerOptions
from initiator.session import ReconnectPolicy

DEFAULT_PORT = 4420


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (and `--help` for the rest)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _positive_int(lo: int, hi: int):
    def conv(s: str) -> int:
        try:
            v = int(s, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{s}' is not a number") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is out of range {lo}..{hi}")
        return v
    return conv


def _seconds(allow_negative: bool = False):
    def conv(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{s}' is not a number of seconds") from None
        if math.isnan(v):   # float() takes "nan"; every comparison below would pass it
            raise argparse.ArgumentTypeError(f"'{s}' is not a number of seconds")
        if v < 0 and not (allow_negative and v == -1):
            raise argparse.ArgumentTypeError(f"{s} must be >= 0" + (" or -1" if allow_negative else ""))
        return v
    return conv


def _microseconds(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a number of microseconds") from None
    if not 0 <= v <= 1e6:
        raise argparse.ArgumentTypeError(f"{s} must be between 0 and 1000000")
    return v


_SIZE_RE = re.compile(r"^(\d+)([kKmMgGtT]?)(i?[bB])?$")


def parse_size(s: str) -> int:
    """`4096`, `4k`, `1M`, `2GiB` (binary units)."""
    m = _SIZE_RE.match(s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"'{s}' is not a size (like 4k, 1M)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(m.group(1)) * mult


def positive_size(s: str) -> int:
    """`parse_size`, but at least one byte (an I/O size)."""
    v = parse_size(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"'{s}' must be at least 1 byte")
    return v


def _hostid(s: str) -> str:
    try:
        return str(uuid.UUID(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a UUID") from None


def _nqn(s: str) -> str:
    """The Connect's NQN rule (`check_nqn`), checked here so a bad NQN is a usage error, not a
    failed Connect."""
    try:
        check_nqn(s)
    except LocalProtocolError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def add_transport(p: argparse.ArgumentParser, *, need_nqn: bool = True,
                  nqn_required: bool = True) -> None:
    g = p.add_argument_group("transport")
    g.add_argument("-t", "--transport", default="tcp", choices=["tcp"],
                   help="transport type (only tcp)")
    g.add_argument("-a", "--traddr", required=True, help="target address (IPv4/IPv6 or host name)")
    g.add_argument("-s", "--trsvcid", type=_positive_int(1, 65535), default=DEFAULT_PORT,
                   help=f"target TCP port (default {DEFAULT_PORT})")
    if need_nqn:
        g.add_argument("-n", "--nqn", required=nqn_required, type=_nqn,
                       help="subsystem NQN" + ("" if nqn_required else
                                              " (with --discovery: attach only this one)"))
    g.add_argument("-q", "--hostnqn", default=None, type=_nqn, help="host NQN (default: /etc/nvme/hostnqn "
                   "or one derived from the machine id)")
    g.add_argument("-I", "--hostid", type=_hostid, default=None, help="host identifier (UUID)")


def add_connect(p: argparse.ArgumentParser, *, reconnect: bool = False) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("-k", "--keep-alive-tmo", type=_seconds(), default=5.0,
                   help="keep-alive timeout in seconds (default 5, 0 = off)")
    g.add_argument("-i", "--nr-io-queues", type=_positive_int(1, 128), default=1,
                   help="number of I/O queues (default 1)")
    g.add_argument("-Q", "--queue-size", type=_positive_int(16, 1024), default=128,
                   help="I/O queue size (16..1024, default 128)")
    g.add_argument("-g", "--hdr-digest", action="store_true", help="enable header digests")
    g.add_argument("-G", "--data-digest", action="store_true", help="enable data digests")
    g.add_argument("--connect-timeout", type=_seconds(), default=10.0,
                   help="seconds a connection attempt may take (default 10)")
    g.add_argument("--admin-timeout", type=_seconds(), default=60.0,
                   help="admin command timeout in seconds (default 60)")
    g.add_argument("--io-timeout", type=_seconds(), default=30.0,
                   help="I/O command timeout in seconds (default 30)")
    g.add_argument("--poll-us", type=_microseconds, default=50.0, metavar="US",
                   help="while I/O is outstanding, poll for completions this many microseconds "
                        "before sleeping (as SPDK polls; default 50, 0 = never)")
    g.add_argument("--tcp-congestion", metavar="ALGO", default=None,
                   help="TCP congestion control of the connections, e.g. cubic (default: the "
                        "system's; BBR paces every send: 128 KiB writes cost 25%% more CPU "
                        "with it on loopback, docs/performance.md)")
    if reconnect:
        g.add_argument("-c", "--reconnect-delay", type=_seconds(), default=10.0,
                       help="seconds between reconnect attempts (default 10)")
        g.add_argument("-l", "--ctrl-loss-tmo", type=_seconds(allow_negative=True), default=600.0,
                       help="give up reconnecting after this many seconds (default 600, -1 = never)")
        g.add_argument("--fast-io-fail-tmo", type=_seconds(allow_negative=True), default=-1.0,
                       help="fail queued I/O after this many seconds of reconnecting (default off)")


def add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output-format", choices=["normal", "json"], default="normal",
                   help="output format (default normal)")


def controller_options(args, *, discovery: bool = False) -> ControllerOptions:
    kato = getattr(args, "keep_alive_tmo", 5.0)
    if discovery and not getattr(args, "persistent", False):
        kato = 0.0   # nvme-cli: a non-persistent discovery controller has KATO 0
    try:
        return ControllerOptions(
            hostnqn=args.hostnqn or "", hostid=args.hostid or "", keep_alive_tmo=kato,
            nr_io_queues=getattr(args, "nr_io_queues", 1), queue_size=getattr(args, "queue_size", 128),
            hdr_digest=getattr(args, "hdr_digest", False),
            data_digest=getattr(args, "data_digest", False),
            connect_timeout=getattr(args, "connect_timeout", 10.0),
            admin_timeout=getattr(args, "admin_timeout", 60.0),
            io_timeout=getattr(args, "io_timeout", 30.0), discovery=discovery,
            poll_us=getattr(args, "poll_us", 50.0),
            tcp_congestion=getattr(args, "tcp_congestion", None))
    except ValueError as e:
        raise UsageError(str(e)) from None


def reconnect_policy(args) -> ReconnectPolicy:
    try:
        return ReconnectPolicy(reconnect_delay=args.reconnect_delay,
                               ctrl_loss_tmo=args.ctrl_loss_tmo,
                               fast_io_fail_tmo=args.fast_io_fail_tmo)
    except ValueError as e:
        raise UsageError(str(e)) from None
