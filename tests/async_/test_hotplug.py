"""Hotplug scripts (blockfs.hotplug): whatever a script does (print without end, leave a child
behind holding its output, fail to start, exit non-zero, hang) the daemon keeps its memory,
reports it, and goes on to the next script and event."""

from __future__ import annotations

import logging
import os
import resource
import signal

import pytest
import trio

from blockfs.hotplug import MAX_OUTPUT, HotplugRunner

pytestmark = pytest.mark.trio


def script(d, name: str, body: str, mode: int = 0o755):
    p = d / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(mode)
    return p


async def add_event_until(tmp_path, caplog, logged: str, *, timeout: float,
                          wait: float) -> HotplugRunner:
    """Run the scripts in tmp_path for one `add` of nvme0n1 until `logged` is in the log
    (at most `wait` seconds); the runner, for its counters."""
    with caplog.at_level(logging.INFO, logger="blockfs.hotplug"):
        r = HotplugRunner(str(tmp_path), timeout=timeout)
        async with trio.open_nursery() as n:
            await n.start(r.run)
            r.emit("add", "nvme0n1", {"BLOCKFS_BDEV": "nvme0n1"})
            with trio.fail_after(wait):
                while logged not in caplog.text:
                    await trio.sleep(0.05)
            n.cancel_scope.cancel()
    return r


async def test_endless_output_is_capped_not_kept(tmp_path, caplog):
    # `yes` for 2 s used to be kept whole by trio.run_process(capture_stdout=True): about
    # 700 MB of RSS, and at the default 30 s timeout enough to get the daemon OOM-killed.
    script(tmp_path, "01-yes", "exec yes " + "y" * 200)
    script(tmp_path, "02-after", "echo next ran")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = await add_event_until(tmp_path, caplog, "next ran", timeout=2.0,
                              wait=20)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024, f"RSS grew by {grown_kib} KiB"
    assert "01-yes add nvme0n1 killed after 2 s" in caplog.text
    assert r.failures == 1


async def test_large_output_is_logged_truncated(tmp_path, caplog):
    script(tmp_path, "big", f"head -c {4 * MAX_OUTPUT} /dev/zero | tr '\\0' Q; exit 1")
    await add_event_until(tmp_path, caplog, "exited 1", timeout=10.0, wait=20)
    (rec,) = [rec for rec in caplog.records if "exited 1" in rec.getMessage()]
    msg = rec.getMessage()
    assert msg.count("Q") == MAX_OUTPUT
    assert f"{3 * MAX_OUTPUT} more bytes of output dropped" in msg


async def test_a_child_left_holding_the_output_does_not_hold_up_events(tmp_path, caplog):
    # The script exits at once, but `sleep` keeps its stdout: reading to EOF used to wait for
    # the timeout, delaying the device's next events, and report the script as killed.
    pidfile = tmp_path.parent / f"{tmp_path.name}.child"
    script(tmp_path, "bg", f"sleep 30 & echo $! > {pidfile}; echo started")
    r = await add_event_until(tmp_path, caplog, "bg add nvme0n1: started", timeout=20.0,
                              wait=5)
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert r.failures == 0


async def test_scripts_that_cannot_run_or_fail_are_reported(tmp_path, caplog):
    script(tmp_path, "01-bad-interpreter", "").write_text("#!/nonexistent/sh\n")
    script(tmp_path, "02-fails", "echo oops >&2; exit 3")
    script(tmp_path, "03-not-executable", "echo never", mode=0o644)
    (tmp_path / "04-dangling").symlink_to(tmp_path / "nonexistent")
    script(tmp_path, "05-last", "echo last ran")
    r = await add_event_until(tmp_path, caplog, "last ran", timeout=10.0,
                              wait=10)
    assert "01-bad-interpreter add nvme0n1 could not run" in caplog.text
    assert "02-fails add nvme0n1 exited 3: oops" in caplog.text
    assert "never" not in caplog.text
    assert (r.runs, r.failures) == (3, 2)
