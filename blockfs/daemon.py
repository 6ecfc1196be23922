"""The serving process behind `blockfs mount` and `blockfs nbd`.

One process: initiator session(s) -> bdev registry (NVMe bdevs + partitions) -> frontends (FUSE
mount, NBD server) + the control socket. It runs until SIGTERM/SIGINT, `blockfs umount` or an
external `fusermount3 -u`; then it stops the frontends, lets I/O in flight complete, shuts the
controller down (CC.SHN) and disconnects.

Start-up reports success or one error line through `ready(error_or_None)` so that the parent
process of a daemonized mount can exit 0 only once the mount is usable (like sshfs).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import stat
import time
from typing import Callable

import trio

from bdev.examine import PartitionExamine
from bdev.nvme import NvmeController
from bdev.registry import BdevRegistry
from initiator._util import clear_stale_socket, signals_ignored
from initiator.session import Session
from initiator.transport import POLL_IDLE

from .control import serve_control
from .options import controller_options, reconnect_policy

log = logging.getLogger(__name__)

RUN_DIR = os.environ.get("BLOCKFS_RUN_DIR", "/run/blockfs")


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StartupError(Exception):
    """Start-up failed before anything was served; the message is for the user."""


def mounted_fstype(path: str) -> str | None:
    """The type of the file system mounted at `path` ("fuse.blockfs", ...), from
    /proc/self/mounts, or None. Unlike os.path.ismount this also sees a FUSE mount whose daemon
    is gone (stat of it fails with ENOTCONN)."""
    path = os.path.abspath(path)
    found = None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and _unescape_mount_path(fields[1]) == path:
                    found = fields[2]          # the last mount on a path is the visible one
    except OSError:
        return None
    return found


def _unescape_mount_path(s: str) -> str:
    # /proc/self/mounts writes space, tab, newline and backslash as octal escapes (\040 ...).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def check_mountpoint(path: str) -> str:
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            # A FUSE mount whose daemon is gone (killed, crashed): the kernel answers ENOTCONN.
            raise StartupError(f"mountpoint {path} is a FUSE mount whose daemon is gone "
                               f"(transport endpoint not connected): unmount it first with "
                               f"'blockfs umount {path}' or 'fusermount3 -u {path}'") from None
        raise StartupError(f"mountpoint {path} does not exist or is not a directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"mountpoint {path} does not exist or is not a directory")
    if os.path.ismount(path):
        raise StartupError(f"mountpoint {path} is busy (something is already mounted there)")
    if not os.path.exists("/dev/fuse"):
        raise StartupError("/dev/fuse is missing: is the fuse kernel module loaded?")
    return path


def parse_listen(s: str) -> tuple[str, int] | str:
    """An NBD listen address: ``ADDR:PORT`` -> (addr, port); ``unix:PATH`` -> the absolute PATH."""
    if s.startswith("unix:"):
        path = s[5:]
        if not path:
            raise ValueError(f"'{s}': unix: needs a socket path")
        if len(os.fsencode(os.path.abspath(path))) > 107:
            raise ValueError(f"'{s}': a unix socket path is at most 107 bytes")
        return os.path.abspath(path)
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"'{s}' is not ADDR:PORT or unix:PATH")
    return host.strip("[]") or "127.0.0.1", int(port)


class Daemon:
    def __init__(self, args):
        self.args = args
        self.registry = BdevRegistry(examine_modules=[PartitionExamine()])
        self.sessions: list[Session] = []
        self.controllers: list[NvmeController] = []
        self.mountpoint: str | None = None
        self.nbd_address: str | None = None  # "ADDR:PORT" or "unix:PATH"
        self.control_path: str | None = None
        self.started = time.time()
        self.hotplug = None
        self.discovery = None
        self.fs = None          # the FUSE BlockFs while mounted
        self._next_index = 0
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()

    # -- control methods --------------------------------------------------------------------
    def _bdev_rows(self) -> list[dict]:
        rows = []
        for b in self.registry.bdevs():
            rows.append({
                "name": b.name, "size": b.size, "block_size": b.block_size,
                "num_blocks": b.num_blocks, "uuid": b.uuid,
                "path": os.path.join(self.mountpoint, b.name) if self.mountpoint else None,
                "base": b.base.name if b.base is not None else None,
                "nsid": getattr(b, "nsid", None),
                "subnqn": getattr(getattr(b, "session", None), "subnqn", None),
            })
        return rows

    async def rpc_list(self, params):
        return {"pid": os.getpid(), "mountpoint": self.mountpoint,
                "nbd": self.nbd_address,
                "bdevs": self._bdev_rows()}

    async def rpc_stats(self, params):
        ru = os.times()
        return {"cpu_s": ru.user + ru.system, "poll_idle_s": round(POLL_IDLE.total, 6),
                "controllers": [s.statistics() for s in self.sessions],
                "hotplug": self.hotplug.statistics() if self.hotplug else None,
                "discovery": self.discovery.statistics() if self.discovery else None,
                "fuse": self.fs.statistics() if self.fs is not None else None,
                "bdevs": {b.name: b.statistics() for b in self.registry.bdevs()}}

    async def rpc_rescan(self, params):
        name = params.get("bdev")
        if name is not None and not isinstance(name, str):
            raise TypeError("bdev must be a bdev name (a string)")
        for s in self.sessions:
            await s.rescan()
        targets = [name] if name else [b.name for b in self.registry.bdevs() if b.base is None]
        for t in targets:
            if self.registry.get(t) is None:
                raise LookupError(f"no bdev named {t}")
            await self.registry.reexamine(t)
        return self._bdev_rows()

    async def rpc_shutdown(self, params):
        self._stop.set()
        return True

    # -- running ----------------------------------------------------------------------------
    def _write_runfile(self) -> None:
        os.makedirs(RUN_DIR, exist_ok=True)
        info = {"pid": os.getpid(), "mountpoint": self.mountpoint, "control": self.control_path,
                "nbd": self.nbd_address,
                "traddr": self.args.traddr, "trsvcid": self.args.trsvcid, "subnqn": self.args.nqn}
        tmp = os.path.join(RUN_DIR, f".{os.getpid()}.json")
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, os.path.join(RUN_DIR, f"{os.getpid()}.json"))

    def _remove_runfile(self) -> None:
        try:
            os.unlink(os.path.join(RUN_DIR, f"{os.getpid()}.json"))
        except OSError:
            pass

    async def run(self, ready: Callable[[str | None], None]) -> None:
        a = self.args
        if getattr(a, "mountpoint", None):
            self.mountpoint = check_mountpoint(a.mountpoint)
        self.control_path = a.control or os.path.join(RUN_DIR, f"{os.getpid()}.sock")
        # Before connecting or mounting anything: another daemon's live socket is not taken
        # (SocketPathError, an OSError: one line from run_foreground). serve_control checks
        # again when it binds, later.
        clear_stale_socket(self.control_path, "control socket")
        # A stop signal that came once the shutdown had begun (fusermount3 -u, then SIGTERM, as
        # scripts and service managers do) met the default action and killed the process
        # before it removed its runfile and control socket. So the receiver stays open until
        # the shutdown is over (it is bounded by its own timeouts), and until both are gone
        # the signals it re-delivers when it closes, or that come after, do nothing.
        with signals_ignored(*_STOP_SIGNALS):
            try:
                await self._serve(ready)
            finally:
                self._remove_runfile()

    async def _serve(self, ready: Callable[[str | None], None]) -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(*_STOP_SIGNALS) as sigs:
                await self._start(nursery)
                self._write_runfile()
                ready(None)
                async with trio.open_nursery() as waiters:
                    async def on_signal():
                        async for s in sigs:
                            if self._stop.is_set():
                                log.info("signal %d: already shutting down", s)
                            else:
                                log.info("signal %d: shutting down", s)
                                self._stop.set()
                    waiters.start_soon(on_signal)
                    await self._stop.wait()
                    await self._shutdown(nursery)
                    waiters.cancel_scope.cancel()

    async def _start(self, nursery: trio.Nursery) -> None:
        a = self.args
        self._nursery = nursery
        if getattr(a, "hotplug_dir", None):
            from .hotplug import HotplugRunner
            self.hotplug = HotplugRunner(a.hotplug_dir, timeout=a.hotplug_timeout,
                                         mountpoint=self.mountpoint)
            await nursery.start(self.hotplug.run)
            self.registry.add_listener(self.hotplug.on_registry_event)
        if getattr(a, "discovery", False):
            from .discovery import DiscoveryFollower
            self.discovery = DiscoveryFollower(
                a.traddr, a.trsvcid, controller_options(a), persistent=a.persistent,
                rescan_interval=getattr(a, "rescan_interval", 60.0), attach=self.attach,
                detach=self.detach, only_nqn=a.nqn, policy=reconnect_policy(a))
            await self.discovery.start(nursery)
            if not self.sessions:
                raise StartupError(f"the discovery controller at {a.traddr}:{a.trsvcid} lists no "
                                   f"NVM subsystem that could be attached")
        else:
            await self.attach(a.nqn, a.traddr, a.trsvcid)
        if self.mountpoint:
            from .fuse import serve_fuse
            self._fuse_scope = trio.CancelScope()
            self.fs = await nursery.start(self._run_fuse, serve_fuse)
        if getattr(a, "nbd", None):
            from .nbd import serve_nbd, serve_nbd_unix
            where = parse_listen(a.nbd)
            if isinstance(where, str):
                await nursery.start(lambda task_status: serve_nbd_unix(
                    self.registry, where, read_only=a.read_only, task_status=task_status))
                self.nbd_address = f"unix:{where}"
            else:
                host, port = where
                bound = await nursery.start(lambda task_status: serve_nbd(
                    self.registry, host, port, read_only=a.read_only, task_status=task_status))
                self.nbd_address = f"{host}:{bound if isinstance(bound, int) else port}"
        await nursery.start(serve_control, self.control_path, {
            "list": self.rpc_list, "stats": self.rpc_stats, "rescan": self.rpc_rescan,
            "shutdown": self.rpc_shutdown})

    async def attach(self, nqn: str, host: str, port: int) -> NvmeController:
        """Connect a subsystem and register its namespaces as bdevs (`nvme<N>n<NSID>`)."""
        a = self.args
        index = self._next_index
        session = Session(host, port, nqn, controller_options(a), reconnect_policy(a),
                          name=f"nvme{index}",
                          rescan_interval=getattr(a, "rescan_interval", 60.0))
        if self.hotplug is not None:
            hp = self.hotplug

            def on_state(state, reason, s=session):
                if state.value == "resetting":
                    hp.on_controller_state(s, "disconnect", reason)
                elif state.value == "live" and s.reconnects:
                    hp.on_controller_state(s, "reconnect", None)
            session.on_state = on_state
        await session.start(self._nursery)
        self._next_index += 1
        ctrl = NvmeController(self.registry, session, index, read_only=a.read_only)
        await ctrl.start(self._nursery)
        self.sessions.append(session)
        self.controllers.append(ctrl)
        return ctrl

    async def detach(self, nqn: str) -> None:
        """Hot-remove a subsystem's bdevs and shut its controller down."""
        for ctrl in [c for c in self.controllers if c.session.subnqn == nqn]:
            self.controllers.remove(ctrl)
            self.sessions.remove(ctrl.session)
            await ctrl.detach()
            with trio.move_on_after(10):
                await ctrl.session.aclose()

    async def _run_fuse(self, serve_fuse, task_status=trio.TASK_STATUS_IGNORED) -> None:
        a = self.args
        with self._fuse_scope:
            await serve_fuse(self.registry, self.mountpoint, read_only=a.read_only,
                             allow_other=a.allow_other, uid=a.uid, gid=a.gid, mode=a.mode,
                             task_status=task_status)
        # The mount ended (fusermount3 -u, or our own shutdown): stop the daemon.
        self._stop.set()

    async def _shutdown(self, nursery: trio.Nursery) -> None:
        if self.mountpoint:
            self._fuse_scope.cancel()
        if self.discovery is not None:
            with trio.move_on_after(5):
                await self.discovery.aclose()
        for s in self.sessions:
            with trio.move_on_after(10):
                await s.aclose()
        nursery.cancel_scope.cancel()


def run_foreground(args, ready: Callable[[str | None], None]) -> int:
    """Run the daemon in this process; `ready` is told of start-up success or failure."""
    from initiator._errors import NvmeError
    from initiator._init import InitError
    from .options import UsageError
    reported = [False]

    def report(err):
        if not reported[0]:
            reported[0] = True
            ready(err)
    from initiator._util import single_errors
    try:
        with single_errors():
            trio.run(Daemon(args).run, report)
    except (StartupError, UsageError, NvmeError, InitError, OSError, ValueError) as e:
        msg = str(e) if not isinstance(e, OSError) or not e.strerror else \
            f"{e.strerror}{': ' + e.filename if e.filename else ''}"
        if not reported[0]:
            report(msg)
            return 1
        log.error("daemon failed: %s", msg)
        return 1
    return 0


__all__ = ["Daemon", "StartupError", "run_foreground", "check_mountpoint"]
