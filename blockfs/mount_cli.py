"""`blockfs mount | nbd | umount | ctl | list | target`: the serving commands and their clients.

`mount` and `nbd` daemonize like sshfs: the command re-runs itself in the foreground in a new
session with a pipe, and exits 0 only when the child reports that the mount/export is ready, or
prints the child's one-line error and exits 1. `-f/--foreground` skips that.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

from . import options as o
from .control import ControlError, call


def _mode(s: str) -> int:
    try:
        v = int(s, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not an octal mode") from None
    if not 0 <= v <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {s} out of range")
    return v


def add_parsers(sub, common) -> None:
    for name in ("mount", "nbd"):
        p = sub.add_parser(name, help="mount namespaces as files (FUSE)" if name == "mount"
                           else "serve namespaces over NBD only")
        o.add_transport(p, nqn_required=False)
        o.add_connect(p, reconnect=True)
        p.add_argument("--discovery", action="store_true",
                       help="-a/-s name a discovery controller: attach every NVM subsystem it "
                            "lists (connect-all)")
        p.add_argument("--persistent", action="store_true",
                       help="with --discovery: stay connected to the discovery controller and "
                            "attach/detach subsystems as its log changes")
        if name == "mount":
            p.add_argument("mountpoint", help="directory to mount on")
            p.add_argument("--nbd", metavar="ADDR:PORT|unix:PATH",
                           help="also serve NBD on ADDR:PORT or the unix socket PATH")
            p.add_argument("--allow-other", action="store_true",
                           help="let other users access the mount (FUSE allow_other)")
            # 32-bit IDs; 0xFFFFFFFF is (uid_t)-1, "no owner". A larger value made every
            # getattr of the mount fail (OverflowError in pyfuse3 -> EIO).
            p.add_argument("--uid", type=o._positive_int(0, 0xFFFFFFFE), default=os.getuid(),
                           help="owner of the files")
            p.add_argument("--gid", type=o._positive_int(0, 0xFFFFFFFE), default=os.getgid(),
                           help="group of the files")
            p.add_argument("--mode", type=_mode, default=0o600, help="file mode (octal, default 600)")
        else:
            p.add_argument("--listen", dest="nbd", metavar="ADDR:PORT|unix:PATH",
                           default="127.0.0.1:10809",
                           help="NBD listen address, TCP or a unix socket (default "
                                "127.0.0.1:10809)")
        p.add_argument("-r", "--read-only", action="store_true", help="export read-only")
        p.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
        p.add_argument("--control", metavar="PATH",
                       help="control socket path (default /run/blockfs/PID.sock)")
        p.add_argument("--rescan-interval", type=o._seconds(), default=60.0,
                       help="seconds between namespace rescans (backstop for missed events; 0 = off)")
        p.add_argument("--hotplug-dir", metavar="DIR",
                       help="run every executable in DIR on each device event (add, remove, resize, "
                            "partition-added/removed, disconnect, reconnect)")
        p.add_argument("--hotplug-timeout", type=o._seconds(), default=30.0,
                       help="seconds a hotplug script may run before it is killed (default 30)")
        p.add_argument("--log-file", metavar="PATH",
                       help=f"daemon log (default /run/blockfs/{name}-PID.log, PID of this command; "
                            "-f logs to stderr)")
        p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
        common(p)
        p.set_defaults(func=cmd_serve)

    p = sub.add_parser("umount", help="unmount a blockfs mount and wait for its daemon to finish")
    p.add_argument("mountpoint")
    p.add_argument("--timeout", type=o._seconds(), default=60.0)
    common(p)
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("ctl", help="call a JSON-RPC method on a control socket (a blockfs "
                       "daemon's: list, stats, rescan [BDEV], shutdown; or the embedded "
                       "target's: resize_ns nsid=1 size=128M, add_ns spec=ram:16M, ...)")
    p.add_argument("-S", "--socket", required=True, help="control socket path")
    p.add_argument("action", help="method name")
    p.add_argument("params", nargs="*", metavar="KEY=VALUE | BDEV",
                   help="parameters (numbers are passed as numbers); for rescan, a bdev name")
    o.add_output(p)
    common(p)
    p.set_defaults(func=cmd_ctl)

    p = sub.add_parser("list", help="what running blockfs daemons expose (like nvme list)")
    o.add_output(p)
    common(p)
    p.set_defaults(func=cmd_list)


def _validate(args) -> None:
    if not args.nqn and not args.discovery:
        raise o.UsageError("-n/--nqn is required (or --discovery)")
    if args.persistent and not args.discovery:
        raise o.UsageError("--persistent goes with --discovery")
    hp = getattr(args, "hotplug_dir", None)
    if hp and not os.path.isdir(hp):
        raise o.UsageError(f"--hotplug-dir {hp} is not a directory")
    if args.nbd:
        from .daemon import parse_listen
        try:
            parse_listen(args.nbd)
        except ValueError as e:
            raise o.UsageError(str(e)) from None
    o.controller_options(args)
    o.reconnect_policy(args)


def cmd_serve(args) -> int:
    _validate(args)
    from .daemon import RUN_DIR, StartupError, check_mountpoint, run_foreground
    if getattr(args, "mountpoint", None):
        try:
            check_mountpoint(args.mountpoint)
        except StartupError as e:
            print(f"blockfs {args.command}: {e}", file=sys.stderr)
            return 1
    if args.foreground or args.ready_fd is not None:
        fd = args.ready_fd

        def ready(err):
            if fd is None:
                if err:
                    print(f"blockfs {args.command}: {err}", file=sys.stderr)
                return
            os.write(fd, (f"ERR {err}\n" if err else "OK\n").encode())
            os.close(fd)
        return run_foreground(args, ready)
    # Daemonize: re-run ourselves in the foreground in a new session, wait for "ready".
    os.makedirs(RUN_DIR, exist_ok=True)
    log_path = args.log_file or os.path.join(RUN_DIR, f"{args.command}-{os.getpid()}.log")
    r, w = os.pipe()
    argv = [sys.executable, "-m", "blockfs", *_original_argv(args), "--ready-fd", str(w)]
    with open(log_path, "ab") as logf:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in [_repo_root(), env.get("PYTHONPATH")] if p)
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                 pass_fds=(w,), start_new_session=True, close_fds=True, env=env)
    os.close(w)
    msg = b""
    with os.fdopen(r, "rb") as rf:
        msg = rf.readline()
    if msg.startswith(b"OK"):
        return 0
    if msg.startswith(b"ERR "):
        print(f"blockfs {args.command}: {msg[4:].decode().strip()}", file=sys.stderr)
    else:
        rc = child.wait()
        print(f"blockfs {args.command}: the daemon exited (status {rc}) before it was ready; "
              f"see {log_path}", file=sys.stderr)
    child.wait()
    return 1


_ARGV: list[str] = []


def _original_argv(args) -> list[str]:
    return _ARGV or sys.argv[1:]


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runfiles() -> list[dict]:
    from .daemon import RUN_DIR
    out = []
    for path in sorted(glob.glob(os.path.join(RUN_DIR, "*.json"))):
        try:
            with open(path) as f:
                info = json.load(f)
            if not _runfile_ok(info):
                continue    # not one of ours (or damaged): skipped like a stale one
            os.kill(info["pid"], 0)
        except (OSError, ValueError):
            continue
        out.append(info)
    return out


def _runfile_ok(info) -> bool:
    """A runfile as Daemon._write_runfile writes it (the fields list/umount rely on)."""
    return (isinstance(info, dict) and type(info.get("pid")) is int and info["pid"] > 0
            and isinstance(info.get("control"), str)
            and all(isinstance(info.get(k), str) or info.get(k) is None
                    for k in ("mountpoint", "nbd", "traddr", "subnqn")))


def cmd_umount(args) -> int:
    from .daemon import mounted_fstype
    mp = os.path.abspath(args.mountpoint)
    owner = next((i for i in _runfiles() if i.get("mountpoint") == mp), None)
    fstype = mounted_fstype(mp)
    if owner is None and fstype != "fuse.blockfs":
        print(f"blockfs umount: {mp} is not a blockfs mount", file=sys.stderr)
        return 1
    if owner is not None and owner.get("control"):
        try:
            call(owner["control"], "shutdown", timeout=10)
        except (ControlError, OSError):
            subprocess.run(["fusermount3", "-u", mp], capture_output=True)
    else:
        rc = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
        if rc.returncode:
            print(f"blockfs umount: {rc.stderr.strip()}", file=sys.stderr)
            return 1
    if owner is not None:
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            try:
                os.kill(owner["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            print(f"blockfs umount: daemon {owner['pid']} did not exit within "
                  f"{args.timeout:g} s", file=sys.stderr)
            return 1
    if mounted_fstype(mp) == "fuse.blockfs":
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
    return 0


def _ctl_params(args) -> dict:
    params: dict = {}
    for item in args.params:
        key, sep, value = item.partition("=")
        if not sep:
            if args.action == "rescan" and "bdev" not in params:
                params["bdev"] = item
                continue
            raise o.UsageError(f"parameter '{item}' is not KEY=VALUE")
        try:
            params[key] = int(value, 0)
        except ValueError:
            params[key] = {"true": True, "false": False}.get(value, value)
    return params


def cmd_ctl(args) -> int:
    params = _ctl_params(args)
    try:
        res = call(args.socket, args.action, params)
    except ControlError as e:
        print(f"blockfs ctl: {e}", file=sys.stderr)
        return 1
    rows = res.get("bdevs") if isinstance(res, dict) else res
    if args.output_format != "json" and args.action in ("list", "rescan") and \
            isinstance(rows, list) and all(isinstance(r, dict) and "block_size" in r for r in rows):
        _print_bdevs(rows)
    else:
        print(json.dumps(res, indent=2))
    return 0


def _print_bdevs(rows) -> None:
    print(f"{'Name':<16} {'Size':>14} {'Block':>6}  Path")
    for r in rows:
        print(f"{r['name']:<16} {r['size']:>14} {r['block_size']:>6}  {r.get('path') or '-'}")


def cmd_list(args) -> int:
    out = []
    for info in _runfiles():
        try:
            res = call(info["control"], "list", timeout=5)
        except (ControlError, OSError, KeyError):
            continue
        for b in res["bdevs"]:
            out.append({**b, "pid": info["pid"], "traddr": f"{info['traddr']}:{info['trsvcid']}",
                        "subnqn": b.get("subnqn") or info.get("subnqn"), "nbd": res.get("nbd")})
    if args.output_format == "json":
        print(json.dumps({"devices": out}, indent=2))
        return 0
    print(f"{'Node':<16} {'Size':>14} {'Block':>6} {'Address':<22} {'Pid':>7}  Path / NQN")
    print("-" * 100)
    for d in out:
        print(f"{d['name']:<16} {d['size']:>14} {d['block_size']:>6} {d['traddr']:<22} "
              f"{d['pid']:>7}  {d.get('path') or d.get('nbd') or '-'}  {d.get('subnqn') or ''}")
    return 0
