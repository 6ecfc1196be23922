"""`blockfs target` / `python3 -m target`: run the embedded NVMe/TCP target standalone.

    python3 -m target --listen 127.0.0.1:4420 --nqn NQN --ns ram:64M --ns file:disk.img \
        [--allow-host HOSTNQN ...] [--control /tmp/target.sock]

Prints one line per bound address (`listening on HOST:PORT`) and then the subsystem, so a parent
process can read the port of `--listen 127.0.0.1:0`. Runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from initiator._util import signals_ignored, single_errors

from .config import DEFAULT_NQN, SubsystemConfig, TargetConfig
from .server import serve_target


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockfs target",
                                description="Embedded NVMe/TCP target (test peer and demo).")
    p.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="address to listen on (repeatable; default 127.0.0.1:4420; port 0 = any)")
    p.add_argument("--nqn", default=DEFAULT_NQN, help=f"subsystem NQN (default {DEFAULT_NQN})")
    p.add_argument("--ns", action="append", default=[], metavar="SPEC",
                   help="namespace: ram:SIZE[:BS] | null:SIZE[:BS] | file:PATH[:BS[:SIZE]] "
                        "(repeatable; NSIDs 1, 2, ...; BS default 512)")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOSTNQN",
                   help="host NQN allowed to connect (repeatable; default: any host)")
    p.add_argument("--control", metavar="PATH", help="unix socket for JSON-RPC control")
    p.add_argument("--serial", default="", help="Identify serial number")
    p.add_argument("--mdts", type=int, default=8,
                   help="max data transfer as 2**N 4 KiB pages (default 8 = 1 MiB; 0 = none)")
    p.add_argument("--in-capsule", type=int, default=16384, metavar="BYTES",
                   help="in-capsule data size on I/O queues (default 16384)")
    p.add_argument("--max-h2c-data", type=int, default=131072, metavar="BYTES",
                   help="MAXH2CDATA announced in the ICResp (default 131072)")
    p.add_argument("--queue-size", type=int, default=128, help="CAP.MQES + 1 (default 128)")
    p.add_argument("--io-queues", type=int, default=8, help="I/O queues granted (default 8)")
    p.add_argument("--poll-us", type=float, default=50.0, metavar="US",
                   help="a connection that received data within US microseconds polls for more "
                        "instead of sleeping in epoll (as SPDK polls; default 50, 0 = never)")
    p.add_argument("--sendfile-min", type=int, default=0, metavar="BYTES",
                   help="null reads of at least BYTES go out with sendfile from a zero memfd "
                        "instead of a copy (default 0 = never; much slower than copying with "
                        "BBR congestion control, faster with cubic: docs/target.md)")
    p.add_argument("--tcp-congestion", metavar="ALGO",
                   help="TCP congestion control of the connections, e.g. cubic (default: the "
                        "system's, net.ipv4.tcp_congestion_control; BBR paces every send, which "
                        "on loopback costs the target about a third of its CPU at 128 KiB, "
                        "docs/target.md)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def config_from_args(a) -> TargetConfig:
    if a.max_h2c_data < 4096 or a.max_h2c_data % 4:
        raise SystemExit("--max-h2c-data must be >= 4096 and a multiple of 4")
    return TargetConfig(
        listen=a.listen or ["127.0.0.1:4420"],
        subsystems=[SubsystemConfig(nqn=a.nqn, namespaces=a.ns, allow_hosts=a.allow_host,
                                    serial=a.serial)],
        control=a.control, mdts=a.mdts, io_in_capsule=a.in_capsule,
        max_h2c_data=a.max_h2c_data, queue_size=a.queue_size, max_io_queues=a.io_queues,
        poll_us=max(a.poll_us, 0.0), sendfile_min=max(a.sendfile_min, 0),
        tcp_congestion=a.tcp_congestion or None)


async def _run(config: TargetConfig) -> None:
    # The receiver outlives the server's cleanup (its control socket is unlinked as the
    # nursery ends), and what it re-delivers on closing does nothing: a second SIGTERM no
    # longer kills the target half-way through.
    stop = (signal.SIGINT, signal.SIGTERM)
    with signals_ignored(*stop), trio.open_signal_receiver(*stop) as sigs:
        async with trio.open_nursery() as n:
            server = await n.start(serve_target, config)
            for host, port in server.addresses:
                print(f"listening on {host}:{port}", flush=True)
            for sub in server.state.subsystems.values():
                nss = ", ".join(f"{ns.nsid}={ns.backend.describe()}/{ns.block_size}"
                                for ns in sub.namespaces.values())
                print(f"subsystem {sub.nqn}: namespaces {nss or 'none'}", flush=True)
            if server.control_path:
                print(f"control {server.control_path}", flush=True)
            async for _ in sigs:
                n.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(a.verbose, 2)],
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        config = config_from_args(a)
        with single_errors():        # the one error inside trio's nursery group, not the group
            trio.run(_run, config)
    except (ValueError, OSError) as e:
        print(f"blockfs target: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
