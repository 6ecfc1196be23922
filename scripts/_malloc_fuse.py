"""Bench-only helper: one RAM bdev (MallocBdev) served as a FUSE file, the frontend's ceiling.

    python3 scripts/_malloc_fuse.py MOUNTPOINT [--size 256M] [--block-size 512]

The file is MOUNTPOINT/malloc0. Prints "READY" once mounted; SIGTERM/SIGINT unmount and exit, and
so does an unmount from outside (fusermount3 -u).
Same `serve_fuse` and bdev layer as `blockfs mount`, minus the initiator: what the FUSE path
costs on its own. Not a user command (scripts/bench starts it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bdev import BdevRegistry, MallocBdev  # noqa: E402
from blockfs.fuse import serve_fuse  # noqa: E402
from blockfs.options import parse_size  # noqa: E402
from scripts._helper_mount import run_until_stopped  # noqa: E402


async def main(a: argparse.Namespace) -> None:
    registry = BdevRegistry(examine_modules=[])
    await registry.register(MallocBdev("malloc0", a.size // a.block_size, a.block_size))
    await run_until_stopped(
        lambda task_status: serve_fuse(registry, a.mountpoint, task_status=task_status))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mountpoint")
    ap.add_argument("--size", type=parse_size, default=256 << 20)
    ap.add_argument("--block-size", type=int, default=512)
    trio.run(main, ap.parse_args())
