"""Test-only runner: MallocBdevs in a registry, served by blockfs.fuse.serve_fuse in this process.

    python tests/fuse/malloc_mount.py MOUNTPOINT [--read-only] [--fixture NAME] [--mode 0600]
                                      [--read-delay-us US] [--flaky] [--no-fast-reads]
                                      [--slow-invalidate-ms MS]

Bdevs: malloc0 (64 MiB, 512-byte blocks, blank), malloc1 (16 MiB, 4096-byte blocks, blank) and, with
--fixture, "fixture0" loaded from tests/fixtures/partitions/NAME.json.gz (examined at start).
Prints "READY" on stdout once mounted, "UNMOUNTED" if unmounted from outside (then exits 0).
SIGTERM/SIGINT unmount and exit 0.
Control: write lines to MOUNTPOINT's sibling file `<mountpoint>.ctl`, then send SIGUSR1:
    resize NAME NUM_BLOCKS      (MallocBdev.resize -> resize event)
    remove NAME                 (registry.unregister)
    add NAME NUM_BLOCKS BS      (a new blank MallocBdev)
    gc                          (gc.collect(); answers with the libfuse hooks still alive)
    stats                       (BlockFs.statistics(), JSON)
Each command's outcome is appended to `<mountpoint>.ctl.out` ("ok ..." or "error ...").
"""

from __future__ import annotations

import argparse
import errno
import gc
import gzip
import json
import logging
import signal
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bdev import BdevError, BdevRegistry, MallocBdev  # noqa: E402
from bdev._soon import call_soon  # noqa: E402
from blockfs.fuse import serve_fuse  # noqa: E402


def load_fixture(name: str) -> MallocBdev:
    doc = json.loads(gzip.decompress((ROOT / "tests/fixtures/partitions" / f"{name}.json.gz").read_bytes()))
    b = MallocBdev("fixture0", doc["num_blocks"], doc["block_size"])
    for off, data in doc["extents"]:
        raw = bytes.fromhex(data)
        b._buf[off : off + len(raw)] = raw
    return b


async def control(registry: BdevRegistry, ctl: Path, fs_box: list) -> None:
    out = ctl.with_name(ctl.name + ".out")
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            lines = ctl.read_text().splitlines() if ctl.exists() else []
            ctl.write_text("")
            for line in lines:
                words = line.split()
                try:
                    if words[0] == "resize":
                        registry.get(words[1]).resize(int(words[2]))
                    elif words[0] == "remove":
                        await registry.unregister(words[1])
                    elif words[0] == "add":
                        await registry.register(MallocBdev(words[1], int(words[2]), int(words[3])))
                    elif words[0] == "gc":
                        gc.collect()
                        alive = sorted(type(o).__name__ for o in gc.get_objects()
                                       if type(o).__module__ == "blockfs._libfuse")
                        line = "gc " + " ".join(alive)
                    elif words[0] == "stats":
                        line = "stats " + json.dumps(fs_box[0].statistics())
                    msg = f"ok {line}"
                except (BdevError, AttributeError, IndexError, ValueError) as e:
                    msg = f"error {line}: {e!r}"
                with out.open("a") as f:
                    f.write(msg + "\n")


class SlowMallocBdev(MallocBdev):
    """Reads wait `delay` seconds first, as a device does (the FUSE worker parks meanwhile;
    a read started without a task completes from a task that sleeps first)."""

    nursery: trio.Nursery | None = None

    def __init__(self, *a, delay: float, **kw) -> None:
        super().__init__(*a, **kw)
        self.delay = delay

    async def _submit_read(self, ctx, lba, nblocks, buf) -> None:
        await trio.sleep(self.delay)
        await super()._submit_read(ctx, lba, nblocks, buf)

    def _submit_read_nowait(self, ctx, lba, nblocks, buf, on_done) -> bool:
        if self.nursery is None:
            return False
        bs = self.block_size
        buf[:] = self._mv[lba * bs:(lba + nblocks) * bs]

        async def later() -> None:
            await trio.sleep(self.delay)
            on_done(None)
        self.nursery.start_soon(later)
        return True


class FlakyMallocBdev(MallocBdev):
    """Every read started without a task fails (on_done(err): the frontend must redo it with
    the awaited path), and awaited reads touching blocks 0-7 fail with EIO."""

    def _submit_read_nowait(self, ctx, lba, nblocks, buf, on_done) -> bool:
        call_soon(on_done, "injected failure")
        return True

    async def _submit_read(self, ctx, lba, nblocks, buf) -> None:
        if lba < 8:
            await trio.lowlevel.checkpoint()
            raise BdevError(errno.EIO, "injected read error")
        await super()._submit_read(ctx, lba, nblocks, buf)


async def main(args: argparse.Namespace) -> None:
    registry = BdevRegistry()
    slow = None
    if args.read_delay_us:
        slow = SlowMallocBdev("malloc0", 64 * 2048, 512, delay=args.read_delay_us / 1e6)
        await registry.register(slow)
    elif args.flaky:
        await registry.register(FlakyMallocBdev("malloc0", 64 * 2048, 512))
    else:
        await registry.register(MallocBdev("malloc0", 64 * 2048, 512))
    await registry.register(MallocBdev("malloc1", 16 * 256, 4096))
    if args.fixture:
        await registry.register(load_fixture(args.fixture))
    ctl = Path(args.mountpoint + ".ctl")
    async with trio.open_nursery() as nursery:
        fs_box: list = []     # the BlockFs, once mounted
        nursery.start_soon(control, registry, ctl, fs_box)
        if slow is not None:
            slow.nursery = nursery

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stop_on_signal)

        async def fuse(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
            await serve_fuse(
                registry,
                args.mountpoint,
                read_only=args.read_only,
                mode=int(args.mode, 8),
                direct_io=not args.page_cache,
                max_tasks=args.max_tasks,
                fast_reads=not args.no_fast_reads,
                task_status=task_status,
            )
            print("UNMOUNTED", flush=True)  # `fusermount3 -u` ended the mount: serve_fuse returned
            nursery.cancel_scope.cancel()

        fs_box.append(await nursery.start(fuse))
        print("READY", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mountpoint")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--fixture")
    p.add_argument("--mode", default="0600")
    p.add_argument("--page-cache", action="store_true", help="direct_io off (for measurements)")
    p.add_argument("--max-tasks", type=int, default=64)
    p.add_argument("--no-fast-reads", action="store_true", help="every read through pyfuse3")
    p.add_argument("--flaky", action="store_true",
                   help="malloc0's task-less reads fail, and its blocks 0-7 give EIO")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--read-delay-us", type=float, default=0.0,
                   help="malloc0's reads wait this long first, like a real device")
    p.add_argument("--slow-invalidate-ms", type=float, default=0.0,
                   help="pyfuse3's notify thread waits this long before each entry invalidation")
    a = p.parse_args()
    if a.slow_invalidate_ms:
        # pyfuse3's _notify_loop looks invalidate_entry up in its module each time, blockfs.fuse
        # calls invalidate_entry_async and close through the module: log each invalidation
        # queued, and each delivered before or after the session was closed.
        import pyfuse3
        _invalidate, _queue, _close = (pyfuse3.invalidate_entry, pyfuse3.invalidate_entry_async,
                                       pyfuse3.close)
        closed: list = []
        notes = logging.getLogger("runner.invalidations")

        def slow_invalidate(*args, _wait=a.slow_invalidate_ms / 1000):
            time.sleep(_wait)
            notes.info("entry invalidation %s", "after the unmount" if closed else "delivered")
            return _invalidate(*args)

        def queue(*args, **kw):
            notes.info("entry invalidation queued")
            return _queue(*args, **kw)

        def close(*args, **kw):
            closed.append(True)
            return _close(*args, **kw)
        pyfuse3.invalidate_entry, pyfuse3.invalidate_entry_async, pyfuse3.close = (
            slow_invalidate, queue, close)
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    trio.run(main, a)
