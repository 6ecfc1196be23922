"""`blockfs mount` under queued FUSE load, against the embedded target (a real NVMe/TCP path on
127.0.0.1): fio keeps 2 x 32 requests queued, so pyfuse3's workers read requests without waiting
for the descriptor (blockfs._libfuse.ReadWithoutWaiting) and come back in batches as NVMe
completions wake them; aligned reads take the fast path (FastReads) with up to 128 background
requests (ConnLimits). A request announced by epoll but already taken must not start a
blocking read: the mount would hang with fio in uninterruptible sleep."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from mount_helpers import MountFactory, run
from target.testing import EmbeddedTarget

pytestmark = pytest.mark.skipif(not (shutil.which("fio") and os.path.exists("/dev/fuse")),
                                reason="needs fio and FUSE")


def fio(f: str, *job: str, timeout: float = 60) -> dict:
    """One fio job (libaio, O_DIRECT) on `f`: its JSON result's first job."""
    out = run("fio", "--output-format=json", f"--filename={f}", "--ioengine=libaio",
              "--direct=1", *job, timeout=timeout).stdout
    return json.loads(out)["jobs"][0]


def mount_stats(m) -> dict:
    return json.loads(m.blockfs("ctl", "-S", m.control, "stats", check=True).stdout)


def test_queued_fuse_reads_and_writes_complete(tmp_path):
    with EmbeddedTarget.start(("ram:64M:512",)) as et:
        mounts = MountFactory(et, tmp_path)
        try:
            m = mounts()
            f = m.file("nvme0n1")
            job = fio(f, "--bs=4k", "--iodepth=32", "--group_reporting", "--name=r",
                      "--rw=randread", "--numjobs=2", "--time_based", "--runtime=3")
            assert job["error"] == 0 and job["read"]["total_ios"] > 5000
            # Every aligned read took the fast path (no pyfuse3 worker; blockfs/_libfuse.py),
            # and at QD 2 x 32 the kernel let more than its default 12 be outstanding.
            fuse = mount_stats(m)["fuse"]
            assert fuse["fast_reads"] >= job["read"]["total_ios"] and fuse["inflight"] == 0
            assert fuse["max_inflight"] > 12
            # Their replies went out at the end of each receive's batch of completions
            # (initiator._batch), not one per callback.
            assert fuse["batched"] >= job["read"]["total_ios"] // 2, fuse
            # ... and the requests fio queued meanwhile were taken right after them
            # (InlineRequests), most of them.
            assert fuse["inline"] >= job["read"]["total_ios"] // 4, fuse
            job = fio(f, "--bs=4k", "--iodepth=64", "--name=w", "--rw=randwrite", "--size=8M",
                      "--verify=crc32c")
            assert job["error"] == 0 and job["read"]["total_ios"] == 2048
            assert os.stat(f).st_size == 64 << 20
        finally:
            mounts.close()


@pytest.mark.parametrize("digest,extra", [(False, ()), (False, ("--poll-us", "0")), (True, ())],
                         ids=["spliced", "spliced-sleeping", "data-digest"])
def test_large_direct_reads_are_spliced_and_return_the_data(tmp_path, digest, extra):
    """O_DIRECT reads of 1 MiB from an NVMe file: without data digests the payload goes socket
    -> pipe -> /dev/fuse (FastReads + initiator FdSink; `spliced` counts them), with them it is
    received into memory (the CRC needs the bytes). Either way the bytes read are the bytes
    written, across the whole file, and none is redone. With --poll-us 0 the reader sleeps
    whenever the socket runs dry, with SO_RCVLOWAT set to the splice step it waits for."""
    with EmbeddedTarget.start(("ram:16M:512",)) as et:
        mounts = MountFactory(et, tmp_path)
        try:
            m = mounts(*(["-G"] if digest else []), *extra)
            f = m.file("nvme0n1")
            data = os.urandom(16 << 20)
            src = tmp_path / "src"
            src.write_bytes(data)
            run("dd", f"if={src}", f"of={f}", "bs=1M", "oflag=direct", "status=none",
                timeout=60)
            out = tmp_path / "out"
            run("dd", f"if={f}", f"of={out}", "bs=1M", "iflag=direct", "status=none",
                timeout=60)
            assert out.read_bytes() == data
            fuse = mount_stats(m)["fuse"]
            assert fuse["redone"] == 0 and fuse["inflight"] == 0
            if digest:
                assert fuse["spliced"] == 0 and fuse["fast_reads"] >= 16
            else:
                # 16 x 1 MiB in requests of at most 512 KiB (read_request_limit), each spliced
                assert fuse["spliced"] >= 32, fuse
            # The kernel split each 1 MiB read into FUSE requests of at most 512 KiB.
            reads = mount_stats(m)["bdevs"]["nvme0n1"]
            assert reads["num_read_ops"] >= 32 and reads["bytes_read"] >= 16 << 20
        finally:
            mounts.close()


def test_queued_large_reads_on_a_fresh_connection_complete(tmp_path):
    """fio's 1 MiB reads at QD4 straight after mounting: the connection's receive window is
    still small (no autotuning yet), smaller than the 64 KiB the reader splices at a time, so
    it must splice what the window lets through. Before, these reads hung until the 30 s I/O
    timeout aborted them and the controller was reset."""
    with EmbeddedTarget.start(("ram:16M:512",)) as et:
        mounts = MountFactory(et, tmp_path)
        try:
            m = mounts()
            f = m.file("nvme0n1")
            job = fio(f, "--bs=1m", "--iodepth=4", "--name=r", "--rw=read", "--size=16M",
                      timeout=20)
            assert job["error"] == 0 and job["read"]["io_bytes"] == 16 << 20
            stats = mount_stats(m)
            fuse = stats["fuse"]
            assert fuse["redone"] == 0 and fuse["inflight"] == 0 and fuse["spliced"] >= 16
            assert stats["controllers"][0]["reconnects"] == 0
        finally:
            mounts.close()
