"""The `blockfs` command: argument parsing and dispatch; errors become one line and an exit status.

Exit status: 0 success, 1 a runtime failure (unreachable target, NVMe error...), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys

from initiator._errors import NvmeError
from initiator._init import InitError

from . import options as o


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")


def build_parser() -> argparse.ArgumentParser:
    ap = o.Parser(prog="blockfs", description=(
        "User-space NVMe/TCP initiator: remote namespaces as files (FUSE) and NBD exports."))
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=o.Parser)
    sub.required = True

    p = sub.add_parser("discover", help="read a discovery controller's log page")
    o.add_transport(p, need_nqn=False)
    o.add_connect(p)
    o.add_output(p)
    _common(p)

    for name, helptext in (("id-ctrl", "Identify Controller"), ("smart-log", "SMART / health log"),
                           ("list-ns", "active namespace IDs")):
        p = sub.add_parser(name, help=helptext)
        o.add_transport(p)
        o.add_connect(p)
        o.add_output(p)
        _common(p)
    p = sub.add_parser("id-ns", help="Identify Namespace")
    o.add_transport(p)
    o.add_connect(p)
    o.add_output(p)
    p.add_argument("-N", "--namespace-id", type=o._positive_int(1, 0xFFFFFFFE), required=True,
                   help="namespace ID")
    _common(p)

    p = sub.add_parser("bench", help="measure the raw initiator (like spdk_nvme_perf)")
    o.add_transport(p)
    o.add_connect(p)
    o.add_output(p)
    p.add_argument("--rw", choices=["read", "write", "randread", "randwrite"], default="randread")
    p.add_argument("--bs", type=o.positive_size, default=4096, help="I/O size (default 4k)")
    p.add_argument("--qd", type=o._positive_int(1, 4096), default=32, help="queue depth (default 32)")
    p.add_argument("--time", type=o._seconds(), default=10.0, help="seconds to run (default 10)")
    p.add_argument("-N", "--namespace-id", type=o._positive_int(1, 0xFFFFFFFE), default=1)
    p.add_argument("--mode", choices=["callback", "task"], default="callback",
                   help="callback: completions start the next command, no task per I/O (like "
                        "spdk_nvme_perf; default); task: one trio task per slot awaiting "
                        "Controller.read/write (the path FUSE and NBD take)")
    p.add_argument("--latency-file", metavar="FILE", default=None,
                   help="write every I/O's latency (seconds, native float64, sorted) to FILE")
    _common(p)

    from . import mount_cli
    mount_cli.add_parsers(sub, _common)
    sub.add_parser("target", add_help=False,
                   help="run the embedded NVMe/TCP target (see 'blockfs target --help')")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["target"]:
        # The embedded target has its own parser (target/cli.py); pass everything through.
        from target.cli import main as target_main
        return target_main(argv[1:])
    ap = build_parser()
    from . import mount_cli
    mount_cli._ARGV[:] = argv
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    level = logging.WARNING - 10 * min(getattr(args, "verbose", 0), 2)
    logging.basicConfig(level=level, format="blockfs: %(levelname)s %(name)s: %(message)s")
    try:
        if hasattr(args, "func"):
            return args.func(args)
        if args.command == "bench":
            from . import bench
            return bench.run(args)
        from . import admin_cmds
        return admin_cmds.run(args.command, args)
    except o.UsageError as e:
        print(f"blockfs {args.command}: {e}", file=sys.stderr)
        return 2
    except (NvmeError, InitError) as e:
        print(f"blockfs {args.command}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"blockfs {args.command}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
