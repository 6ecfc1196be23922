"""`blockfs mount` on the real kernel target (issue 3): files, partitions, filesystems, fio.

The mount runs as the real daemonized command (`blockfs mount ...` returns once ready), the
checks use ordinary tools (dd, sgdisk, mkfs.ext4, e2fsck, fio, fallocate) on the files.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import sys
import time

import pytest

from blockfs.daemon import mounted_fstype
from mount_helpers import REPO, MountFactory, run, wait_for

pytestmark = [pytest.mark.fuse]


@pytest.fixture
def mount(kernel_target, tmp_path):
    """mount(*extra_args) -> Mount; all unmounted (cleanly: umount must work) at teardown."""
    factory = MountFactory(kernel_target, tmp_path)
    yield lambda extra=(): factory(*extra)
    factory.close()


def test_files_dd_partitions_mkfs_fio_and_clean_umount(mount, kernel_target, tmp_path):
    kt = kernel_target
    m = mount()
    assert sorted(os.listdir(m.path))[:2] == ["nvme0n1", "nvme0n2"]
    assert os.stat(m.file("nvme0n1")).st_size == 64 << 20
    assert os.stat(m.file("nvme0n2")).st_size == 32 << 20
    # wipe any table a previous test left, so the listing below is ours
    run("sgdisk", "--zap-all", m.file("nvme0n1"), check=False)
    assert wait_for(lambda: sorted(os.listdir(m.path)) == ["nvme0n1", "nvme0n2"])

    # dd a random 16 MiB pattern in, read it back through a fresh mount
    pat = tmp_path / "pat"
    pat.write_bytes(os.urandom(16 << 20))
    run("dd", f"if={pat}", f"of={m.file('nvme0n1')}", "bs=1M", "conv=fsync,notrunc", "status=none")
    m.umount()
    assert kt.wait_connections(0, 10.0) == 0          # no controller left behind
    m = mount()
    # Queued 1 MiB O_DIRECT reads on the fresh connection (its receive window still small:
    # the reader splices what the window lets through instead of waiting for whole steps)
    out = run("fio", "--output-format=json", f"--filename={m.file('nvme0n1')}",
              "--ioengine=libaio", "--direct=1", "--bs=1m", "--iodepth=4", "--name=r",
              "--rw=read", "--size=16M", timeout=60).stdout
    job = json.loads(out)["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == 16 << 20
    with open(m.file("nvme0n1"), "rb") as f:
        assert f.read(16 << 20) == pat.read_bytes()
    # ... and those large reads went socket -> pipe -> /dev/fuse (FastReads, FdSink)
    fuse = json.loads(m.blockfs("ctl", "-S", m.control, "stats", check=True).stdout)["fuse"]
    assert fuse["spliced"] >= 16 and fuse["redone"] == 0, fuse

    # sgdisk writes a GPT (in 512-byte sectors, on a file) -> p1/p2 appear with their sizes
    run("sgdisk", "-n", "1:2048:+8M", "-n", "2:0:+16M", m.file("nvme0n1"))
    assert wait_for(lambda: {"nvme0n1p1", "nvme0n1p2"} <= set(os.listdir(m.path)))
    assert os.stat(m.file("nvme0n1p1")).st_size == 8 << 20
    assert os.stat(m.file("nvme0n1p2")).st_size == 16 << 20

    # data written through p2 lands at p2's offset in nvme0n1
    data = os.urandom(65536)
    fd = os.open(m.file("nvme0n1p2"), os.O_WRONLY)
    os.pwrite(fd, data, 12288)
    os.fsync(fd)
    os.close(fd)
    p2_start = 18432 * 512
    with open(m.file("nvme0n1"), "rb") as f:
        f.seek(p2_start + 12288)
        assert f.read(65536) == data

    # a filesystem on a partition file
    run("mkfs.ext4", "-q", "-F", m.file("nvme0n1p1"))
    run("e2fsck", "-fn", m.file("nvme0n1p1"))

    # fio verify through FUSE (small: the VM is slow)
    if shutil.which("fio"):
        r = run("fio", "--name=v", f"--filename={m.file('nvme0n1p2')}", "--rw=randwrite",
                "--bs=4k", "--size=2M", "--verify=crc32c", "--ioengine=libaio", "--iodepth=8",
                "--direct=1", "--verify_state_save=0", "--output-format=json")
        job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
        assert job["error"] == 0
        # its verify reads were taken right behind the replies before them (InlineRequests)
        fuse = json.loads(m.blockfs("ctl", "-S", m.control, "stats", check=True).stdout)["fuse"]
        assert fuse["inline"] > 0 and fuse["redone"] == 0, fuse

    # punch hole reads back zeros
    fd = os.open(m.file("nvme0n1p2"), os.O_RDWR)
    os.pwrite(fd, os.urandom(32768), 0)
    run("fallocate", "-p", "-o", "8192", "-l", "16384", m.file("nvme0n1p2"))
    got = os.pread(fd, 32768, 0)
    os.close(fd)
    assert got[8192:24576] == bytes(16384)
    assert got[:8192] != bytes(8192)

    # the control socket and `blockfs list`
    r = m.blockfs("ctl", "-S", m.control, "list", "-o", "json", check=True)
    names = {b["name"] for b in json.loads(r.stdout)["bdevs"]}
    assert {"nvme0n1", "nvme0n1p1", "nvme0n1p2", "nvme0n2"} <= names
    r = m.blockfs("list", "-o", "json", check=True)
    assert {d["name"] for d in json.loads(r.stdout)["devices"]} >= names
    stats = json.loads(m.blockfs("ctl", "-S", m.control, "stats", check=True).stdout)
    assert stats["controllers"][0]["state"] == "live"
    assert stats["bdevs"]["nvme0n1"]["num_write_ops"] > 0
    assert 0 <= stats["poll_idle_s"] <= stats["cpu_s"] + 1

    # Bad control requests get JSON-RPC errors; the mount goes on (one used to end it).
    replies = _raw_control(m.control, [b'{"method": {"cmd": "stats"}}', b"[" * 100_000,
                                       b'{"method": "rescan", "params": {"bdev": {}}}',
                                       b'{"method": "rescan", "params": {"bdev": "nvme9n9"}}'])
    assert [r["error"]["code"] for r in replies] == [-32600, -32700, -32602, -32602], replies
    assert "nvme9n9" in replies[3]["error"]["message"]
    stats = json.loads(m.blockfs("ctl", "-S", m.control, "stats", check=True).stdout)
    assert stats["controllers"][0]["state"] == "live"
    with open(m.file("nvme0n1p2"), "rb") as f:
        assert len(f.read(4096)) == 4096

    m.umount()
    assert not os.path.ismount(m.path)
    assert kt.wait_connections(0, 10.0) == 0


def test_a_mount_whose_daemon_died_is_named_as_such_and_cleaned_up(mount):
    """kill -9 of the daemon leaves a FUSE mount the kernel answers with ENOTCONN, which
    os.path.ismount does not see: `blockfs mount` on it said "does not exist", `blockfs umount`
    said "not a blockfs mount"."""
    m = mount()
    os.kill(m.pid, signal.SIGKILL)
    assert wait_for(lambda: not os.path.exists(f"/proc/{m.pid}"), 10)
    with pytest.raises(OSError) as e:
        os.stat(m.path)
    assert e.value.errno == errno.ENOTCONN
    assert mounted_fstype(m.path) == "fuse.blockfs"
    kt = m.kt
    again = ("mount", "-a", kt.host, "-s", str(kt.port), "-n", kt.nqn, m.path)
    r = m.blockfs(*again)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "daemon is gone" in r.stderr and "blockfs umount" in r.stderr
    r = m.blockfs("umount", m.path)
    assert r.returncode == 0, r.stderr
    assert mounted_fstype(m.path) is None
    # ... and the path takes a new mount
    r = m.blockfs(*again, "--control", m.control)
    assert r.returncode == 0, r.stderr
    assert "nvme0n1" in os.listdir(m.path)
    r = m.blockfs("umount", m.path)
    assert r.returncode == 0 and mounted_fstype(m.path) is None, r.stderr


def test_signals_during_the_shutdown_still_leave_nothing_behind(mount):
    """`fusermount3 -u` then SIGTERM (what scripts/bench and service managers do): a signal
    that came once the shutdown had begun met the default action, which killed the daemon
    before it removed its runfile and control socket."""
    m = mount()
    runfile = os.path.join(m.rundir, f"{m.pid}.json")
    assert os.path.exists(runfile) and os.path.exists(m.control)
    run("fusermount3", "-u", m.path)
    # Keep signalling until it is gone (init reaps it: it is daemonized), so that some
    # signals land while it shuts down.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(m.pid, signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.002)
    else:
        raise AssertionError("the daemon did not exit")
    assert not os.path.exists(runfile), "runfile left behind"
    assert not os.path.exists(m.control), "control socket left behind"


def _raw_control(path: str, lines: list[bytes]) -> list[dict]:
    """Send each line on one control connection and collect the replies."""
    replies = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        buf = b""
        for line in lines:
            s.sendall(line + b"\n")
            while b"\n" not in buf:
                data = s.recv(65536)
                assert data, "the daemon closed the control connection"
                buf += data
            reply, buf = buf.split(b"\n", 1)
            replies.append(json.loads(reply))
    return replies


def test_512_byte_namespace_unaligned_io(mount):
    m = mount()
    fd = os.open(m.file("nvme0n2"), os.O_RDWR)
    try:
        base = os.urandom(4096)
        os.pwrite(fd, base, 1 << 20)
        patch = os.urandom(777)
        os.pwrite(fd, patch, (1 << 20) + 1001)
        expect = base[:1001] + patch + base[1001 + 777:]
        assert os.pread(fd, 4096, 1 << 20) == expect
    finally:
        os.close(fd)


def test_writes_past_the_end_and_no_new_files(mount):
    m = mount()
    size = os.stat(m.file("nvme0n2")).st_size
    fd = os.open(m.file("nvme0n2"), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"x" * 512, size)
        assert ei.value.errno in (28, 27)          # ENOSPC / EFBIG
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        open(m.file("newfile"), "w")
    with pytest.raises(OSError):
        os.unlink(m.file("nvme0n2"))


def test_read_only_mount(mount):
    m = mount(extra=("--read-only",))
    with open(m.file("nvme0n2"), "rb") as f:
        f.read(4096)
    with pytest.raises(OSError) as ei:
        os.open(m.file("nvme0n2"), os.O_WRONLY)
    assert ei.value.errno in (30, 13)               # EROFS / EACCES


def test_mount_errors_are_one_line(kernel_target, tmp_path):
    kt = kernel_target
    env = {**os.environ, "BLOCKFS_RUN_DIR": str(tmp_path)}
    mp = tmp_path / "m"
    mp.mkdir()

    def blockfs(*a):
        return run(sys.executable, "-m", "blockfs", *a, check=False, env=env, cwd=REPO)
    r = blockfs("mount", "-a", "127.0.0.1", "-s", "1", "-n", kt.nqn, str(mp))
    assert r.returncode == 1 and "refused" in r.stderr.lower() and r.stderr.count("\n") == 1
    r = blockfs("mount", "-a", kt.host, "-s", str(kt.port), "-n", "nqn.2024-01.io.x:none", str(mp))
    assert r.returncode == 1 and "nqn.2024-01.io.x:none" in r.stderr
    r = blockfs("mount", "-a", kt.host, "-s", str(kt.port), "-n", kt.nqn, str(tmp_path / "nope"))
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = blockfs("mount", "-a", kt.host, "-s", str(kt.port), "-n", kt.nqn, str(mp), "-Q", "3")
    assert r.returncode == 2
    assert not os.path.ismount(mp)
    assert kt.wait_connections(0, 10.0) == 0
