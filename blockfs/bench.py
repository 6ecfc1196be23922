"""`blockfs bench`: an spdk_nvme_perf-like load generator on the raw initiator.

Keeps exactly `--qd` commands outstanding, spread over the I/O queues, each slot on its own
preallocated buffer, for `--time` seconds after a short warm-up. Two ways to drive them:

- `--mode callback` (default, as spdk_nvme_perf does with its completion callbacks): commands are
  started with `Queue.read_nowait` / `write_nowait` and each completion starts the slot's next
  command from the queue's reader task; no task per I/O.
- `--mode task`: one trio task per slot awaiting `Controller.read` / `write`, the path the
  bdev layer, FUSE and NBD take.

Prints IOPS, MiB/s, latency mean/p50/p99 and the initiator process's own CPU microseconds per
I/O (user + system, from getrusage), with a progress line on stderr every second.

Not a test: figures are printed, never asserted.
"""

from __future__ import annotations

import array
import json
import os
import random
import resource
import sys
import time

import trio

from initiator.controller import open_controller
from initiator.session import ns_unusable
from initiator.transport import POLL_IDLE

from .options import controller_options


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def percentile(sorted_vals, p: float) -> float:
    if not len(sorted_vals):
        return 0.0
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


class _Load:
    """The slots' shared state: what to do, counters and latencies (seconds, array of doubles:
    8 bytes per I/O)."""

    def __init__(self, args, nsid: int, nlb: int, span: int, nq: int):
        self.args = args
        self.nsid = nsid
        self.nlb = nlb
        self.span = span                 # highest starting LBA
        self.nq = nq
        self.is_read = args.rw in ("read", "randread")
        self.is_rand = args.rw.startswith("rand")
        self.lat = array.array("d")
        self.count = 0
        self.stop = False
        self.error: BaseException | None = None
        self.payload = memoryview(os.urandom(args.bs))

    def start_lba(self, i: int) -> int:
        qd = max(self.args.qd, 1)
        return (i * (self.span // qd)) // self.nlb * self.nlb if self.span else 0


async def _task_slots(c, load: _Load) -> None:
    """One task per slot, each awaiting its command (the bdev/FUSE/NBD path)."""
    nsid, nlb, span = load.nsid, load.nlb, load.span
    now = time.perf_counter
    lat_append = load.lat.append

    async def worker(i: int) -> None:
        buf = memoryview(bytearray(load.args.bs))
        rnd = random.Random(i).random
        q = i % load.nq
        seq = load.start_lba(i)
        read, write, payload = c.read, c.write, load.payload
        nblk = span // nlb + 1
        while not load.stop:
            if load.is_rand:
                lba = int(rnd() * nblk) * nlb
            else:
                lba = seq
                seq += nlb
                if seq > span:
                    seq = 0
            t0 = now()
            if load.is_read:
                await read(nsid, lba, nlb, buf, q)
            else:
                await write(nsid, lba, nlb, payload, q)
            lat_append(now() - t0)
            load.count += 1

    async with trio.open_nursery() as n:
        for i in range(load.args.qd):
            n.start_soon(worker, i)


async def _callback_slots(c, load: _Load) -> None:
    """Slots driven by completion callbacks: the reader task completes a command and starts the
    slot's next one inline (docs/hot-path.md item 8); this task only waits for the end."""
    nsid, nlb, span = load.nsid, load.nlb, load.span
    now = time.perf_counter
    lat_append = load.lat.append
    finished = trio.Event()
    left = [load.args.qd]

    def slot(i: int):
        buf = memoryview(bytearray(load.args.bs))
        rnd = random.Random(i).random
        q = c.io_queues[i % load.nq]
        start = q.read_nowait if load.is_read else q.write_nowait
        data = buf if load.is_read else load.payload
        is_rand = load.is_rand
        nblk = span // nlb + 1
        seq = [load.start_lba(i)]
        t0 = [0.0]

        def submit() -> None:
            if is_rand:
                lba = int(rnd() * nblk) * nlb
            else:
                lba = seq[0]
                seq[0] = lba + nlb if lba + nlb <= span else 0
            t0[0] = now()
            start(nsid, lba, nlb, data, done)

        def done(exc) -> None:
            if exc is None:
                lat_append(now() - t0[0])
                load.count += 1
                if not load.stop:
                    try:
                        submit()
                        return
                    except BaseException as e:    # the queue died: report it below
                        exc = e
            if exc is not None and load.error is None:
                load.error = exc
                load.stop = True
            left[0] -= 1
            if not left[0]:
                finished.set()
        return submit

    for i in range(load.args.qd):
        slot(i)()
    await finished.wait()
    if load.error is not None:
        raise load.error


async def run_bench(args) -> dict:
    opts = controller_options(args)
    async with open_controller(args.traddr, args.trsvcid, args.nqn, opts) as c:
        nsid = args.namespace_id
        ns = c.namespaces.get(nsid)
        if ns is None:
            raise SystemExit(f"blockfs bench: namespace {nsid} is not active on {args.nqn}")
        why = ns_unusable(ns, c.max_transfer)
        if why:
            raise SystemExit(f"blockfs bench: namespace {nsid} cannot be used: {why}")
        bs = ns.block_size
        if args.bs % bs:
            raise SystemExit(f"blockfs bench: --bs {args.bs} is not a multiple of the "
                             f"{bs}-byte LBA size")
        if c.max_transfer and args.bs > c.max_transfer:
            raise SystemExit(f"blockfs bench: --bs {args.bs} is larger than the controller's "
                             f"maximum transfer ({c.max_transfer})")
        nlb = args.bs // bs
        span = ns.nsze - nlb
        if span < 0:
            raise SystemExit("blockfs bench: --bs is larger than the namespace")
        nq = len(c.io_queues)
        qsize = c.io_queue_size
        if args.mode == "callback" and args.qd > nq * (qsize - 1):
            raise SystemExit(f"blockfs bench: --qd {args.qd} exceeds the queues' slots "
                             f"({nq} x {qsize - 1}); use --mode task or more -i")
        drive = _callback_slots if args.mode == "callback" else _task_slots
        now = time.perf_counter

        async def phase(seconds: float, load: _Load) -> float:
            async with trio.open_nursery() as n:
                n.start_soon(drive, c, load)
                await trio.sleep(seconds)
                load.stop = True      # each slot finishes its command in flight, then ends
            return now()

        async def progress(load: _Load, t_start: float) -> None:
            last = 0
            while True:
                await trio.sleep(1)
                n = load.count
                sys.stderr.write(f"\r{now() - t_start:5.1f}s  {n - last:>8} IOPS  "
                                 f"{(n - last) * args.bs / 2**20:8.1f} MiB/s")
                sys.stderr.flush()
                last = n

        # Warm-up so connection set-up and first-touch costs stay out of the figures.
        await phase(min(0.5, args.time / 10), _Load(args, nsid, nlb, span, nq))
        load = _Load(args, nsid, nlb, span, nq)
        idle = lambda: POLL_IDLE.total      # noqa: E731
        (u0, s0), t0, i0 = _cpu(), now(), idle()
        async with trio.open_nursery() as outer:
            if args.output_format != "json" and sys.stderr.isatty():
                outer.start_soon(progress, load, t0)
            t1 = await phase(args.time, load)
            u1, s1 = _cpu()
            i1 = idle()
            outer.cancel_scope.cancel()
    elapsed = t1 - t0
    ios = load.count
    lat = sorted(load.lat)
    res = {
        "rw": args.rw, "bs": args.bs, "qd": args.qd, "io_queues": nq, "mode": args.mode,
        "seconds": round(elapsed, 3), "ios": ios, "iops": round(ios / elapsed, 1),
        "mib_s": round(ios * args.bs / elapsed / 2**20, 2),
        "lat_avg_us": round(sum(lat) / len(lat) * 1e6, 1) if lat else 0.0,
        "lat_p50_us": round(percentile(lat, 50) * 1e6, 1),
        "lat_p99_us": round(percentile(lat, 99) * 1e6, 1),
        "cpu_us_per_io": round((u1 - u0 + s1 - s0) / ios * 1e6, 2) if ios else 0.0,
        "cpu_user_us_per_io": round((u1 - u0) / ios * 1e6, 2) if ios else 0.0,
        "cpu_sys_us_per_io": round((s1 - s0) / ios * 1e6, 2) if ios else 0.0,
        # CPU minus the time the queues' readers polled an empty socket (SPDK's busy time).
        "busy_us_per_io": round((u1 - u0 + s1 - s0 - (i1 - i0)) / ios * 1e6, 2) if ios else 0.0,
    }
    if getattr(args, "latency_file", None):
        with open(args.latency_file, "wb") as f:
            array.array("d", lat).tofile(f)
    return res


def run(args) -> int:
    from initiator._util import single_errors
    with single_errors():
        res = trio.run(run_bench, args)
    if sys.stderr.isatty() and args.output_format != "json":
        sys.stderr.write("\n")
    if args.output_format == "json":
        print(json.dumps(res))
    else:
        print(f"{res['rw']} bs={res['bs']} qd={res['qd']} queues={res['io_queues']} "
              f"mode={res['mode']} time={res['seconds']}s\n"
              f"  IOPS {res['iops']:,.0f}   {res['mib_s']:.1f} MiB/s\n"
              f"  latency us: avg {res['lat_avg_us']}  p50 {res['lat_p50_us']}  "
              f"p99 {res['lat_p99_us']}\n"
              f"  initiator CPU: {res['cpu_us_per_io']} us per I/O "
              f"(user {res['cpu_user_us_per_io']}, system {res['cpu_sys_us_per_io']}; "
              f"{res['busy_us_per_io']} busy, without polling an empty socket)")
    return 0
