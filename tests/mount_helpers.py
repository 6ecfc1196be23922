"""Helpers for tests that run the real `blockfs mount` command (daemonized) and check files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from blockfs.daemon import mounted_fstype

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*cmd, check=True, timeout=180, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, **kw)


class Mount:
    def __init__(self, kt, path, rundir, extra=()):
        self.kt, self.path, self.rundir = kt, path, rundir
        self.control = os.path.join(rundir, "ctl.sock")
        self.env = {**os.environ, "BLOCKFS_RUN_DIR": rundir}
        r = self.blockfs("mount", "-a", kt.host, "-s", str(kt.port), "-n", kt.nqn, path,
                         "--control", self.control, *extra)
        assert r.returncode == 0, r.stderr
        self.pid = json.loads(open(next(os.path.join(rundir, f) for f in os.listdir(rundir)
                                         if f.endswith(".json"))).read())["pid"]

    def blockfs(self, *args, check=False):
        return run(sys.executable, "-m", "blockfs", *args, check=check, env=self.env, cwd=REPO)

    def file(self, name):
        return os.path.join(self.path, name)

    def umount(self):
        if os.path.ismount(self.path):
            r = self.blockfs("umount", self.path)
            assert r.returncode == 0, r.stderr
        for _ in range(100):
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        raise AssertionError(f"daemon {self.pid} still running after umount")


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()




class MountFactory:
    """Makes `Mount`s in `tmp_path` and tears them all down (umount, then force)."""

    def __init__(self, kt, tmp_path, base_extra=()):
        self.kt, self.tmp_path, self.base_extra = kt, tmp_path, tuple(base_extra)
        self.made: list[Mount] = []

    def __call__(self, *extra) -> Mount:
        n = len(self.made)
        mp, rd = self.tmp_path / f"mnt{n}", self.tmp_path / f"run{n}"
        mp.mkdir()
        rd.mkdir()
        m = Mount(self.kt, str(mp), str(rd), extra=(*self.base_extra, *extra))
        self.made.append(m)
        return m

    def close(self, *, clean: bool = True) -> None:
        for m in self.made:
            try:
                if clean:
                    m.umount()
            finally:
                if mounted_fstype(m.path):      # also a mount whose daemon is gone
                    run("fusermount3", "-u", "-z", m.path, check=False)
                try:
                    os.kill(m.pid, 9)
                except ProcessLookupError:
                    pass
