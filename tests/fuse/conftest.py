"""Fixtures for real FUSE mounts: tests/fuse/malloc_mount.py runs in a subprocess per mount."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("malloc_mount.py")


class Mount:
    def __init__(self, path: Path, proc: subprocess.Popen, log: Path) -> None:
        self.path = path
        self.proc = proc
        self.log = log
        self.ctl = Path(str(path) + ".ctl")
        self.ctl_out = Path(str(path) + ".ctl.out")

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def command(self, line: str, timeout: float = 10.0) -> str:
        """Send one control command to the runner and wait for its outcome line."""
        before = self.ctl_out.read_text().count("\n") if self.ctl_out.exists() else 0
        self.ctl.write_text(line + "\n")
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ctl_out.exists():
                lines = self.ctl_out.read_text().splitlines()
                if len(lines) > before:
                    assert lines[before].startswith("ok"), lines[before]
                    return lines[before]
            time.sleep(0.02)
        raise TimeoutError(f"runner did not answer {line!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)


@pytest.fixture
def make_mount(tmp_path_factory):
    """make_mount(*runner_args) -> Mount (mounted, READY); every mount is stopped at teardown."""
    mounts: list[Mount] = []

    def make(*args: str) -> Mount:
        d = tmp_path_factory.mktemp("fuse")
        mp = d / "mnt"
        mp.mkdir()
        log = d / "runner.log"
        proc = subprocess.Popen(
            [sys.executable, str(RUNNER), str(mp), *args],
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            stdin=subprocess.DEVNULL,
            text=True,
        )
        m = Mount(mp, proc, log)
        mounts.append(m)
        line = proc.stdout.readline()  # "READY", or "" if it died
        if line.strip() != "READY" or not os.path.ismount(mp):
            m.stop()
            pytest.fail(f"FUSE runner did not start:\n{log.read_text()}")
        return m

    yield make
    for m in mounts:
        m.stop()
    for m in mounts:
        text = m.log.read_text()
        assert "Traceback" not in text, text  # handlers never crash, not even on errors


@pytest.fixture
def mount(make_mount) -> Mount:
    return make_mount("--fixture", "gpt_512")
