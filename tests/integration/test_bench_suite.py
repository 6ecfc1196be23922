"""scripts/bench end to end, on a few short workloads: it starts and stops its own target, mount
and NBD server, prints the table and draws the PNG. Figures are printed, never asserted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("fio") and shutil.which("taskset")
                         and shutil.which("fusermount3") and shutil.which("qemu-nbd")
                         and os.path.exists("/dev/fuse")),
                    reason="needs fio, taskset, qemu-nbd and FUSE")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs")
def test_bench_suite_runs(tmp_path):
    png, js = tmp_path / "lat.png", tmp_path / "runs.json"
    out = subprocess.run([sys.executable, "scripts/bench", "--runs", "1", "--time", "0.5",
                          "--only", "raw-4k-qd1", "fuse-malloc-4k", "fuse-pyfuse3-1m", "nbd-4k",
                          "nbd-4k-unix", "nbd-4k-qemu-null",
                          "--png", str(png), "--json", str(js)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| raw-4k-qd1 |" in out.stdout and "| nbd-4k |" in out.stdout
    assert "| nbd-4k-unix |" in out.stdout
    # NBD's own ceiling on the host core: qemu-nbd's null-co export, with its ratios.
    assert "| nbd-4k-qemu-null |" in out.stdout and "qemu-nbd's CPU" in out.stdout
    assert "NBD 4K unix socket / that ceiling: " in out.stdout
    # The target's connections use cubic whatever the system's default (BBR paces each send)
    assert "target on CPU 0 (TCP cubic)" in out.stdout
    doc = json.loads(js.read_text())
    assert set(doc["medians"]) == {"raw-4k-qd1", "fuse-malloc-4k", "fuse-pyfuse3-1m", "nbd-4k",
                                  "nbd-4k-unix", "nbd-4k-qemu-null"}
    # The pyfuse3 ceiling mount came up and served the 1 MiB job.
    assert doc["medians"]["fuse-pyfuse3-1m"]["mib_s"] > 0
    assert all(m["iops"] > 0 for m in doc["medians"].values())
    # Busy time (CPU minus polling an empty socket) is reported for both sides.
    assert "initiator CPU us/IO (busy)" in out.stdout
    for m in doc["medians"].values():
        assert m["init_busy_us"] <= m["init_cpu_us"] + 0.5
        assert m["target_busy_us"] <= m["target_cpu_us"] + 0.5
    assert doc["medians"]["raw-4k-qd1"]["init_busy_us"] < doc["medians"]["raw-4k-qd1"]["init_cpu_us"]
    # fio's own CPU per I/O for the frontends (it shares their core), not for the raw initiator.
    assert doc["medians"]["nbd-4k"]["fio_cpu_us"] > 0 and "fio_cpu_us" not in doc["medians"]["raw-4k-qd1"]
    assert "us/IO |" in out.stdout.split("| nbd-4k |")[1].split("\n")[0]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert png.stat().st_size > 1000
