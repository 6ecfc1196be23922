"""The README's main-job command works and says what it did (CI runs it with a short timeout)."""

import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.fuse]


def _run_dir() -> set[str]:
    d = "/run/blockfs"
    return set(os.listdir(d)) if os.path.isdir(d) else set()


def test_demo_runs_the_main_job():
    env = {**os.environ, "BLOCKFS_SKIP_INSTALL": "1"}    # scripts/test installed already
    before = _run_dir()
    r = subprocess.run([os.path.join(REPO, "scripts", "demo")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=180)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert "subnqn:  nqn.2026-01.io.blockfs:demo" in out          # discovery
    for name in ("nvme0n1", "nvme0n1p1", "nvme0n1p2"):            # files per namespace/partition
        assert f"/mnt/{name}" in out
    assert "written " in out and "read    " in out
    written = out.split("written ")[1].split()[0]
    assert f"read    {written}" in out                              # dd through p2 read back
    assert f"nvme0n1: {64 << 20} -> {96 << 20} bytes" in out        # live resize
    assert out.rstrip().endswith("blockfs demo: OK")
    # the demo's target and daemon are gone afterwards
    left = subprocess.run(["pgrep", "-f", "blockfs target --listen 127.0.0.1:0 --nqn "
                           "nqn.2026-01.io.blockfs:demo"], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout
    # ... and so are its files: the mount's log went to the demo's own directory, not to a
    # /run/blockfs/mount-PID.log left behind by every run
    assert _run_dir() - before == set(), _run_dir() - before
