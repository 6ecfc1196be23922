"""Hotplug scripts: every executable in `--hotplug-dir` runs on each device event, like udev
RUN rules, with the event in its environment.

Events: add, remove, resize, partition-added, partition-removed (bdevs), and disconnect,
reconnect (controllers). Environment (udev-like names):

    BLOCKFS_EVENT  BLOCKFS_BDEV  BLOCKFS_PATH  BLOCKFS_SIZE  BLOCKFS_BLOCK_SIZE  BLOCKFS_NSID
    BLOCKFS_SUBNQN BLOCKFS_CTRL  BLOCKFS_UUID  BLOCKFS_BASE  BLOCKFS_MOUNTPOINT  BLOCKFS_SEQNUM
    BLOCKFS_TRADDR BLOCKFS_REASON (disconnect)

Ordering and isolation: events of one device (a bdev, or a controller for its own events) run
in the order they happened, one after another; different devices run side by side. A script
that fails is logged; one that outlives `timeout` is killed. Neither ever delays I/O (nothing
here is on the I/O path) nor another device's events. Script output (stdout and stderr, the first
MAX_OUTPUT bytes) goes to the log.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import subprocess

import trio

log = logging.getLogger(__name__)


#: Bytes of a script's output (stdout and stderr) kept for the log; the rest is read and
#: dropped, so a script that prints without end costs neither memory nor a blocked pipe.
MAX_OUTPUT = 64 * 1024
#: After a script exits, how long output from children it left behind is still read.
_OUTPUT_GRACE = 0.5


class _Output:
    """The first MAX_OUTPUT bytes of a script's output, and how many more there were."""

    def __init__(self) -> None:
        self.kept = bytearray()
        self.dropped = 0
        self.eof = trio.Event()

    async def read(self, stream) -> None:
        async with stream:
            while chunk := await stream.receive_some(65536):
                keep = chunk[: max(0, MAX_OUTPUT - len(self.kept))]
                self.kept += keep
                self.dropped += len(chunk) - len(keep)
        self.eof.set()

    def text(self) -> str:
        out = self.kept.decode(errors="replace").strip()
        if self.dropped:
            out += f" [... {self.dropped} more bytes of output dropped]"
        return out


class HotplugRunner:
    def __init__(self, directory: str, *, timeout: float = 30.0, mountpoint: str | None = None):
        self.directory = directory
        self.timeout = timeout
        self.mountpoint = mountpoint
        self._queues: dict[str, trio.MemorySendChannel] = {}
        self._seq = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self.runs = 0
        self.failures = 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            self._nursery = n
            task_status.started(self)
            await trio.sleep_forever()

    def scripts(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as e:
            log.warning("hotplug: cannot list %s: %s", self.directory, e)
            return []
        out = []
        for name in names:
            path = os.path.join(self.directory, name)
            if name.startswith(".") or not os.path.isfile(path) or not os.access(path, os.X_OK):
                continue
            out.append(path)
        return out

    # -- event sources ----------------------------------------------------------------------
    def on_registry_event(self, event: str, bdev) -> None:
        is_part = getattr(bdev, "base", None) is not None
        owner = bdev.base if is_part else bdev      # the NVMe bdev: namespace and session
        kind = {"add": "partition-added" if is_part else "add",
                "remove": "partition-removed" if is_part else "remove",
                "resize": "resize"}.get(event)
        if kind is None:
            return
        session = getattr(owner, "session", None)
        env = {
            "BLOCKFS_BDEV": bdev.name,
            "BLOCKFS_PATH": os.path.join(self.mountpoint, bdev.name) if self.mountpoint else "",
            "BLOCKFS_SIZE": str(bdev.size),
            "BLOCKFS_BLOCK_SIZE": str(bdev.block_size),
            "BLOCKFS_NSID": str(getattr(owner, "nsid", "") or ""),
            "BLOCKFS_UUID": bdev.uuid or "",
            "BLOCKFS_BASE": bdev.base.name if is_part else "",
            "BLOCKFS_SUBNQN": session.subnqn if session else "",
            "BLOCKFS_CTRL": session.name if session else "",
        }
        self.emit(kind, bdev.name, env)

    def on_controller_state(self, session, kind: str, reason: str | None) -> None:
        self.emit(kind, session.name, {
            "BLOCKFS_BDEV": "", "BLOCKFS_CTRL": session.name, "BLOCKFS_SUBNQN": session.subnqn,
            "BLOCKFS_TRADDR": f"{session.host}:{session.port}", "BLOCKFS_REASON": reason or ""})

    def emit(self, event: str, device: str, env: dict) -> None:
        """Queue `event` for `device` (sync, never blocks)."""
        if self._nursery is None:
            return
        env = {**env, "BLOCKFS_EVENT": event, "BLOCKFS_SEQNUM": str(next(self._seq)),
               "BLOCKFS_MOUNTPOINT": self.mountpoint or ""}
        q = self._queues.get(device)
        if q is None:
            send, recv = trio.open_memory_channel(10000)
            self._queues[device] = q = send
            self._nursery.start_soon(self._device_worker, device, recv)
        try:
            q.send_nowait(env)
        except trio.WouldBlock:
            log.error("hotplug: event queue of %s full, dropping %s", device, event)

    async def _device_worker(self, device: str, recv) -> None:
        async for env in recv:
            for script in self.scripts():
                await self._run_one(script, env)

    async def _run_one(self, script: str, env: dict) -> None:
        full_env = {**os.environ, **env}
        self.runs += 1
        what = f"{os.path.basename(script)} {env['BLOCKFS_EVENT']} {env.get('BLOCKFS_BDEV') or env.get('BLOCKFS_CTRL')}"
        output = _Output()
        proc = None
        with trio.move_on_after(self.timeout) as scope:
            async with trio.open_nursery() as nursery:
                try:
                    proc = await nursery.start(functools.partial(
                        trio.run_process, [script], env=full_env, check=False,
                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT))
                except OSError as e:   # caught here: out of the nursery it is a group
                    self.failures += 1
                    log.warning("hotplug: %s could not run: %s", what, e)
                    return
                nursery.start_soon(output.read, proc.stdout)
                await proc.wait()
                # A child the script left running may hold the pipe open: its output is not
                # waited for.
                with trio.move_on_after(_OUTPUT_GRACE):
                    await output.eof.wait()
                nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            self.failures += 1
            log.warning("hotplug: %s killed after %g s", what, self.timeout)
            return
        out = output.text()
        if proc.returncode:
            self.failures += 1
            log.warning("hotplug: %s exited %d%s", what, proc.returncode, f": {out}" if out else "")
        elif out:
            log.info("hotplug: %s: %s", what, out)

    def statistics(self) -> dict:
        return {"directory": self.directory, "runs": self.runs, "failures": self.failures}
