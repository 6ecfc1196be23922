"""`blockfs bench`: an spdk_nvme_perf-like load generator on the raw initiator.

Runs `--qd` workers spread over the I/O queues, each keeping one command outstanding on its own
preallocated buffer (so the queue depth is exact), for `--time` seconds. Prints IOPS, MiB/s,
latency mean/p50/p99 and the initiator process's own CPU microseconds per I/O (user + system,
from getrusage), with a progress line on stderr every second.

Not a test: figures are printed, never asserted.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time

import trio

from initiator.controller import open_controller

from .options import controller_options


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def percentile(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return 0.0
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


async def run_bench(args) -> dict:
    opts = controller_options(args)
    async with open_controller(args.traddr, args.trsvcid, args.nqn, opts) as c:
        nsid = args.namespace_id
        ns = c.namespaces.get(nsid)
        if ns is None:
            raise SystemExit(f"blockfs bench: namespace {nsid} is not active on {args.nqn}")
        bs = ns.block_size
        if args.bs % bs:
            raise SystemExit(f"blockfs bench: --bs {args.bs} is not a multiple of the "
                             f"{bs}-byte LBA size")
        nlb = args.bs // bs
        span = ns.nsze - nlb
        if span < 0:
            raise SystemExit("blockfs bench: --bs is larger than the namespace")
        nq = len(c.io_queues)
        rw = args.rw
        is_read = rw in ("read", "randread")
        is_rand = rw.startswith("rand")
        lat: list[float] = []
        count = [0]
        stop = [False]
        now = time.perf_counter
        payload = os.urandom(args.bs)

        async def worker(i: int) -> None:
            buf = memoryview(bytearray(args.bs))
            rng = random.Random(i)
            q = i % nq
            seq_lba = (i * (span // max(args.qd, 1))) // nlb * nlb if span else 0
            read, write = c.read, c.write
            while not stop[0]:
                if is_rand:
                    lba = rng.randrange(0, span + 1) // nlb * nlb if span else 0
                else:
                    lba = seq_lba
                    seq_lba += nlb
                    if seq_lba > span:
                        seq_lba = 0
                t0 = now()
                if is_read:
                    await read(nsid, lba, nlb, buf, q)
                else:
                    await write(nsid, lba, nlb, payload, q)
                lat.append(now() - t0)
                count[0] += 1

        async def progress(t_start: float) -> None:
            last = 0
            while True:
                await trio.sleep(1)
                n = count[0]
                sys.stderr.write(f"\r{now() - t_start:5.1f}s  {n - last:>8} IOPS  "
                                 f"{(n - last) * args.bs / 2**20:8.1f} MiB/s")
                sys.stderr.flush()
                last = n

        # Warm-up so connection set-up and first-touch costs stay out of the figures.
        async with trio.open_nursery() as n:
            for i in range(args.qd):
                n.start_soon(worker, i)
            await trio.sleep(min(0.5, args.time / 10))
            stop[0] = True
        stop[0] = False
        lat.clear()
        count[0] = 0
        cpu0, t0 = _cpu(), now()
        async with trio.open_nursery() as outer:
            if args.output_format != "json" and sys.stderr.isatty():
                outer.start_soon(progress, t0)
            async with trio.open_nursery() as n:
                for i in range(args.qd):
                    n.start_soon(worker, i)
                await trio.sleep(args.time)
                stop[0] = True          # each worker finishes its command in flight, then ends
            elapsed = now() - t0
            cpu = _cpu() - cpu0
            outer.cancel_scope.cancel()
    ios = count[0]
    lat.sort()
    res = {
        "rw": rw, "bs": args.bs, "qd": args.qd, "io_queues": nq, "seconds": round(elapsed, 3),
        "ios": ios, "iops": round(ios / elapsed, 1),
        "mib_s": round(ios * args.bs / elapsed / 2**20, 2),
        "lat_avg_us": round(sum(lat) / len(lat) * 1e6, 1) if lat else 0.0,
        "lat_p50_us": round(percentile(lat, 50) * 1e6, 1),
        "lat_p99_us": round(percentile(lat, 99) * 1e6, 1),
        "cpu_us_per_io": round(cpu / ios * 1e6, 2) if ios else 0.0,
    }
    return res


def run(args) -> int:
    from initiator._util import single_errors
    with single_errors():
        res = trio.run(run_bench, args)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    if args.output_format == "json":
        print(json.dumps(res))
    else:
        print(f"{res['rw']} bs={res['bs']} qd={res['qd']} queues={res['io_queues']} "
              f"time={res['seconds']}s\n"
              f"  IOPS {res['iops']:,.0f}   {res['mib_s']:.1f} MiB/s\n"
              f"  latency us: avg {res['lat_avg_us']}  p50 {res['lat_p50_us']}  "
              f"p99 {res['lat_p99_us']}\n"
              f"  initiator CPU: {res['cpu_us_per_io']} us per I/O")
    return 0
