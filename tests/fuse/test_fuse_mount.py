"""A real FUSE mount of MallocBdevs (tests/fuse/malloc_mount.py in a subprocess), driven with the
tools and syscalls a user would use: ls, stat, dd, pread/pwrite, O_DIRECT, fsync, fallocate,
sgdisk, mkfs.ext4/e2fsck, fio."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import random
import shutil
import stat
import subprocess
import threading
import time

import pytest


pytestmark = pytest.mark.fuse

MIB = 1 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_ZERO_RANGE = 1, 2, 8, 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def wait_until(pred, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def run(*cmd: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout, **kw)


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (scripts/setup-system)")


def oserror(fn, *args) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno


def test_listing_and_stat(mount):
    names = sorted(os.listdir(mount.path))
    assert names == ["fixture0", "fixture0p1", "fixture0p2", "fixture0p3", "malloc0", "malloc1"]
    st = os.stat(mount / "malloc0")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 64 * MIB and st.st_blksize == 512
    st1 = os.stat(mount / "malloc1")
    assert st1.st_size == 16 * MIB and st1.st_blksize == 4096
    assert os.stat(mount / "fixture0p2").st_size == 2 * MIB
    assert not os.path.exists(mount / "nope")
    assert os.statvfs(mount.path).f_files >= 6
    with pytest.raises(OSError) as e:                # longer than f_namemax (255)
        os.stat(mount / ("x" * 256))
    assert e.value.errno == errno.ENAMETOOLONG
    assert os.statvfs(mount.path).f_namemax == 255


def test_dd_round_trip_and_o_trunc_is_ignored(mount, tmp_path):
    data = tmp_path / "data"
    data.write_bytes(random.randbytes(3 * MIB + 4096))
    run("dd", f"if={data}", f"of={mount / 'malloc0'}", "bs=1M", "seek=1", "conv=notrunc,fsync", "status=none")
    back = tmp_path / "back"
    run("dd", f"if={mount / 'malloc0'}", f"of={back}", "bs=1M", "skip=1", "count=4", "status=none")
    assert back.read_bytes()[: len(data.read_bytes())] == data.read_bytes()
    # `dd of=` without notrunc opens with O_TRUNC: like /dev/sdX, nothing is truncated
    small = tmp_path / "small"
    small.write_bytes(b"\x5a" * 4096)
    run("dd", f"if={small}", f"of={mount / 'malloc0'}", "status=none")
    assert wait_until(lambda: os.stat(mount / "malloc0").st_size == 64 * MIB, 2)
    with open(mount / "malloc0", "rb") as f:
        assert f.read(4096) == b"\x5a" * 4096
        f.seek(1 * MIB)
        assert f.read(len(data.read_bytes())) == data.read_bytes()
    os.truncate(mount / "malloc0", 100)  # ignored too
    assert os.stat(mount / "malloc0").st_size == 64 * MIB


def test_unaligned_pread_pwrite_match_a_model(mount):
    rng = random.Random(7)
    size = 4 * MIB  # a window of malloc1 (4096-byte blocks): every write is RMW-heavy
    model = bytearray(size)
    fd = os.open(mount / "malloc1", os.O_RDWR)
    try:
        os.pwrite(fd, bytes(size), 0)
        for _ in range(400):
            off = rng.randrange(size - 1)
            n = rng.randrange(1, min(size - off, 20000) + 1)
            if rng.random() < 0.6:
                chunk = rng.randbytes(n)
                assert os.pwrite(fd, chunk, off) == n
                model[off : off + n] = chunk
            else:
                assert os.pread(fd, n, off) == model[off : off + n]
        assert os.pread(fd, size, 0) == model
    finally:
        os.close(fd)


def test_concurrent_unaligned_writers_on_one_block_lose_nothing(mount):
    """Threads each own a 61-byte stripe of the same 4096-byte blocks and pwrite it repeatedly."""
    path = mount / "malloc1"
    writers, width, rounds = 16, 61, 60
    base = 4096 * 3 + 5

    def writer(i: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            for r in range(rounds):
                os.pwrite(fd, bytes([(i + r) % 250 + 1]) * width, base + i * width)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with open(path, "rb") as f:
        f.seek(base)
        got = f.read(writers * width)
    for i in range(writers):
        assert got[i * width : (i + 1) * width] == bytes([(i + rounds - 1) % 250 + 1]) * width, i


def test_o_direct_aligned_io(mount):
    fd = os.open(mount / "malloc1", os.O_RDWR | os.O_DIRECT)
    try:
        wbuf = mmap.mmap(-1, 64 * 1024)  # page-aligned, as O_DIRECT wants
        wbuf.write(random.randbytes(64 * 1024))
        assert os.pwritev(fd, [wbuf], 8 * MIB) == 64 * 1024
        os.fsync(fd)
        os.fdatasync(fd)
        rbuf = mmap.mmap(-1, 64 * 1024)
        assert os.preadv(fd, [rbuf], 8 * MIB) == 64 * 1024
        assert rbuf[:] == wbuf[:]
    finally:
        os.close(fd)


def test_eof_enospc_and_short_writes(mount):
    path = mount / "malloc0"
    size = 64 * MIB
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pread(fd, 4096, size) == b""
        assert os.pread(fd, 4096, size + 12345) == b""
        assert len(os.pread(fd, 4096, size - 100)) == 100
        assert oserror(os.pwrite, fd, b"x", size) == errno.ENOSPC
        assert oserror(os.pwrite, fd, b"x" * 10, size + 4096) == errno.ENOSPC
        assert os.pwrite(fd, b"y" * 300, size - 100) == 100  # cut short at the end
        assert os.pread(fd, 100, size - 100) == b"y" * 100
    finally:
        os.close(fd)
    assert os.stat(path).st_size == size


def test_fallocate_punch_hole_zero_range_and_allocate(mount):
    path = mount / "malloc0"
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xee" * (1 * MIB), 0)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1000, 10000)  # unaligned edges
        got = os.pread(fd, 1 * MIB, 0)
        assert got[:1000] == b"\xee" * 1000 and got[1000:11000] == bytes(10000) and got[11000:] == b"\xee" * (
            MIB - 11000
        )
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 65536, 65536)
        assert os.pread(fd, 65536, 65536) == bytes(65536)
        os.posix_fallocate(fd, 0, 64 * MIB)  # every block exists already
        assert oserror(os.posix_fallocate, fd, 0, 65 * MIB) == errno.ENOSPC
        assert oserror(fallocate, fd, FALLOC_FL_COLLAPSE_RANGE, 0, 4096) == errno.EOPNOTSUPP
        assert os.pread(fd, 4096, 200000) == b"\xee" * 4096
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 64 * MIB


def test_libfuse_hooks_outlive_a_garbage_collection(mount):
    """libfuse calls the hooks' ctypes callbacks for as long as the session lives: after a
    gc.collect() in the mount process every hook object is still there, and fallocate and the
    fast reads still work (a collected callback is a jump into freed memory: a segfault)."""
    out = mount.command("gc")
    assert out.split()[2:] == sorted(["ConnLimits", "FallocateHook", "FastReads", "PyfuseSession",
                                      "ReadWithoutWaiting"]), out
    fd = os.open(mount / "malloc0", os.O_RDWR | os.O_DIRECT)
    try:
        for i in range(50):
            fallocate(fd, FALLOC_FL_ZERO_RANGE, i * 8192, 8192)
        buf = mmap.mmap(-1, 8192)
        assert os.preadv(fd, [buf], 0) == 8192 and bytes(buf) == bytes(8192)
    finally:
        os.close(fd)


def _stats(m) -> dict:
    return json.loads(m.command("stats").split(" ", 2)[2])


def _pread_direct(path, n: int, off: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, max(n, 4096))
        got = os.preadv(fd, [memoryview(buf)[:n]], off)
        return bytes(buf[:got])
    finally:
        os.close(fd)


def test_fast_reads_aligned_handed_over_unaligned_and_at_the_end(mount):
    """Whole-block reads are answered by the fast path (blockfs/_libfuse.py FastReads: no
    pyfuse3 worker), others by pyfuse3's handler; both return the right bytes, on a disk and
    at a partition's offset, including a read cut short by the end of the file."""
    data = random.Random(7).randbytes(256 * 1024)
    path = mount / "malloc0"
    with open(path, "r+b") as f:
        f.write(data)
    s0 = _stats(mount)
    assert _pread_direct(path, 65536, 4096) == data[4096:4096 + 65536]
    assert _pread_direct(path, 4096, 512 * 3) == data[1536:1536 + 4096]
    s1 = _stats(mount)
    assert s1["fast_reads"] >= s0["fast_reads"] + 2 and s1["inflight"] == 0
    # RAM bdev completions run in call_soon's batches: replied at a batch's end.
    assert s1["batched"] >= s0["batched"] + 2
    with open(path, "rb") as f:                      # unaligned: pyfuse3's handler
        f.seek(1000)
        assert f.read(3000) == data[1000:4000]
    assert _stats(mount)["handed_over"] > s1["handed_over"]
    size = os.stat(path).st_size
    with open(path, "r+b") as f:
        f.seek(size - 8192)
        f.write(data[:8192])
    assert _pread_direct(path, 65536, size - 8192) == data[:8192]     # short: the file ends
    assert _pread_direct(path, 4096, size) == b""
    # A partition's file reads at the partition's offset in its disk (fixture0p2: block 10240).
    with open(mount / "fixture0", "r+b") as f:
        f.seek(10240 * 512)
        f.write(data[:65536])
    assert _pread_direct(mount / "fixture0p2", 65536, 0) == data[:65536]


def test_fast_reads_redone_with_full_error_handling(make_mount):
    """A task-less read that fails is redone with the awaited path, which gives the data or
    the bdev's final error (EIO here) to the caller; the mount stays up."""
    m = make_mount("--flaky")
    path = m / "malloc0"
    with open(path, "r+b") as f:
        f.seek(8 * 512)
        f.write(b"\x42" * 8192)
    assert _pread_direct(path, 8192, 8 * 512) == b"\x42" * 8192
    assert oserror(_pread_direct, path, 4096, 0) == errno.EIO
    st = _stats(m)
    assert st["redone"] >= 2 and st["inflight"] == 0
    assert os.stat(path).st_size == 64 * MIB


def test_without_fast_reads_every_read_goes_through_pyfuse3(make_mount):
    m = make_mount("--no-fast-reads")
    with open(m / "malloc0", "r+b") as f:
        f.write(b"\x17" * 8192)
    assert _pread_direct(m / "malloc0", 8192, 0) == b"\x17" * 8192
    assert _stats(m) == {}
    assert "read handler installed" not in m.log.read_text()


def test_namespace_changes_are_refused(mount):
    p = mount.path
    assert oserror(os.open, p / "new", os.O_CREAT | os.O_WRONLY) == errno.EPERM
    assert oserror(os.mkdir, p / "d") == errno.EPERM
    assert oserror(os.unlink, p / "malloc0") == errno.EPERM
    assert oserror(os.rename, p / "malloc0", p / "x") == errno.EPERM
    assert oserror(os.symlink, "malloc0", p / "l") == errno.EPERM
    assert oserror(os.link, p / "malloc0", p / "h") == errno.EPERM
    assert oserror(os.chmod, p / "malloc0", 0o666) == errno.EPERM
    assert sorted(os.listdir(p))[-2:] == ["malloc0", "malloc1"]


def test_chmod_and_chown_to_what_the_file_has_succeed(mount):
    # A no-op, which POSIX lets the owner do (cp -p, install -m, tar -p on a device file);
    # only a change is refused.
    f = mount / "malloc0"
    st = os.stat(f)
    os.chmod(f, st.st_mode & 0o7777)
    os.chown(f, st.st_uid, st.st_gid)
    os.chown(f, -1, st.st_gid)
    os.chmod(mount.path, 0o755)
    os.chown(mount.path, st.st_uid, st.st_gid)
    assert oserror(os.chmod, f, 0o640) == errno.EPERM
    assert oserror(os.chmod, mount.path, 0o700) == errno.EPERM
    assert oserror(os.chown, f, st.st_uid + 1, -1) == errno.EPERM
    assert oserror(os.chown, f, -1, st.st_gid + 1) == errno.EPERM
    assert os.stat(f).st_mode == st.st_mode


def test_sgdisk_on_the_file_makes_partition_files(mount):
    need("sgdisk")
    disk = mount / "malloc0"
    run("sgdisk", "-o", "-n", "1:2048:+8M", "-n", "2:0:+16M", str(disk))  # closes the file: re-examine
    assert wait_until(lambda: os.path.exists(mount / "malloc0p2"), 5)
    assert os.stat(mount / "malloc0p1").st_size == 8 * MIB
    assert os.stat(mount / "malloc0p2").st_size == 16 * MIB
    with open(mount / "malloc0p2", "r+b") as f:
        f.seek(12345)
        f.write(b"through p2")
    p2_start = (2048 + 8 * 2048) * 512
    with open(disk, "rb") as f:
        f.seek(p2_start + 12345)
        assert f.read(10) == b"through p2"
    # resize p2 in the table: the file follows; delete p1: its file goes
    run("sgdisk", "-d", "2", "-n", "2:18432:+4M", "-d", "1", str(disk))
    assert wait_until(lambda: not os.path.exists(mount / "malloc0p1"), 5)
    assert wait_until(lambda: os.stat(mount / "malloc0p2").st_size == 4 * MIB, 5)
    run("sgdisk", "-Z", str(disk))
    assert wait_until(lambda: not os.path.exists(mount / "malloc0p2"), 5)


def test_mkfs_ext4_and_fsck_on_a_partition(mount):
    need("mkfs.ext4")
    part = mount / "fixture0p3"
    run("mkfs.ext4", "-q", "-F", str(part), timeout=120)
    run("e2fsck", "-n", "-f", str(part), timeout=120)
    out = run("dumpe2fs", "-h", str(part)).stdout
    assert "clean" in out


def test_resize_changes_stat_size_within_2s(mount):
    path = mount / "malloc1"
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x77" * 4096, 12 * MIB)
        assert os.fstat(fd).st_size == 16 * MIB
        mount.command("resize malloc1 2048")  # 8 MiB
        assert wait_until(lambda: os.stat(path).st_size == 8 * MIB, 2)
        assert os.pread(fd, 4096, 12 * MIB) == b""  # past the new end: EOF, never the old data
        assert oserror(os.pwrite, fd, b"z", 8 * MIB) == errno.ENOSPC
        mount.command("resize malloc1 4096")
        assert wait_until(lambda: os.stat(path).st_size == 16 * MIB, 2)
        assert os.pread(fd, 4096, 12 * MIB) == bytes(4096)
    finally:
        os.close(fd)


def test_hot_add_and_remove(mount):
    mount.command("add extra0 100 512")
    assert wait_until(lambda: os.path.exists(mount / "extra0"), 2)
    assert os.stat(mount / "extra0").st_size == 51200
    fd = os.open(mount / "extra0", os.O_RDWR)
    try:
        mount.command("remove extra0")
        assert wait_until(lambda: "extra0" not in os.listdir(mount.path), 2)
        assert oserror(os.pread, fd, 512, 0) == errno.ENODEV  # an open file errors, never hangs
        assert oserror(os.pwrite, fd, b"x", 0) == errno.ENODEV
    finally:
        os.close(fd)
    mount.command("remove fixture0")  # partitions go with their disk
    assert wait_until(lambda: not any(n.startswith("fixture0") for n in os.listdir(mount.path)), 2)


def test_fio_random_read_o_direct(mount):
    need("fio")
    out = run(
        "fio", "--name=r", f"--filename={mount / 'malloc0'}", "--rw=randread", "--bs=4k", "--iodepth=32",
        "--ioengine=libaio", "--direct=1", "--runtime=2", "--time_based", "--output-format=json",
        timeout=60,
    ).stdout
    job = json.loads(out)["jobs"][0]
    assert job["error"] == 0 and job["read"]["iops"] > 1000
    print(f"\nfio 4k randread QD32 through FUSE: {job['read']['iops']:.0f} IOPS")


@pytest.mark.parametrize("read_delay_us", [0, 50])
def test_queued_requests_under_load_with_metadata_in_between(make_mount, read_delay_us):
    """The hook that reads queued FUSE requests without waiting (blockfs._libfuse.ReadWithoutWaiting)
    is installed, and under 2 x QD64 of verified O_DIRECT writes and reads, with stat and readdir
    from threads in between, every request is answered and the data is right. With reads that
    wait like a device's, workers come back in batches and find requests that an epoll wake-up
    announced already taken: pyfuse3's blocking read must not start on an empty queue."""
    need("fio")
    mount = make_mount("--fixture", "gpt_512", "--read-delay-us", str(read_delay_us))
    assert "pyfuse3 hook installed" in mount.log.read_text()
    stop = threading.Event()
    seen: list[int] = []

    def meta() -> None:
        while not stop.is_set():
            seen.append(os.stat(mount / "malloc1").st_size)
            os.listdir(mount.path)
    threads = [threading.Thread(target=meta) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        out = run(
            "fio", "--output-format=json", "--ioengine=libaio", "--direct=1", "--bs=4k",
            "--iodepth=64", "--rw=randwrite", "--verify=crc32c", "--size=8M",
            "--name=a", f"--filename={mount / 'malloc0'}", "--offset=0",
            "--name=b", f"--filename={mount / 'malloc0'}", "--offset=16M",
            timeout=120,
        ).stdout
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    jobs = json.loads(out)["jobs"]
    assert [j["error"] for j in jobs] == [0, 0]
    assert all(j["write"]["total_ios"] == 2048 and j["read"]["total_ios"] == 2048 for j in jobs)
    assert seen and set(seen) == {16 * MIB}
    assert {"fixture0", "malloc0", "malloc1"} <= set(os.listdir(mount.path))
    if not read_delay_us:
        # Requests queued behind a batch of read replies were taken at once (InlineRequests),
        # the metadata ones among them handed to tasks with pyfuse3's handler coroutines;
        # every one was answered (the stats and listings above). (Delayed reads complete one
        # by one, from their tasks: no batches.)
        st = _stats(mount)
        assert st["inline"] > 0 and st["inline_handed"] > 0, st


def test_writes_taken_behind_read_replies_keep_their_data(make_mount):
    """Mixed random reads and writes, verified as they go: the writes that InlineRequests takes
    behind a batch of read replies (pyfuse3's write handler, its coroutine awaited by a task)
    write what fio sent, and the reads return it."""
    need("fio")
    mount = make_mount()
    out = run("fio", "--output-format=json", "--ioengine=libaio", "--direct=1", "--bs=4k",
              "--iodepth=32", "--rw=randrw", "--size=16M", "--verify=crc32c",
              "--verify_backlog=256", "--name=mix", f"--filename={mount / 'malloc0'}",
              timeout=120).stdout
    job = json.loads(out)["jobs"][0]
    assert job["error"] == 0 and job["write"]["total_ios"] >= 2048, job["error"]
    st = _stats(mount)
    assert st["inline"] > 0 and st["inline_handed"] > 0 and st["inflight"] == 0, st


def test_read_only_mount(make_mount):
    m = make_mount("--read-only", "--mode", "0660")
    path = m / "malloc0"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o440
    assert oserror(os.open, path, os.O_RDWR) == errno.EROFS
    assert oserror(os.open, m.path / "new", os.O_CREAT | os.O_WRONLY) == errno.EROFS
    with open(path, "rb") as f:
        assert f.read(512) == bytes(512)


def test_external_unmount_ends_serve_fuse(make_mount):
    m = make_mount()
    run("fusermount3", "-u", str(m.path))
    assert m.proc.stdout.readline().strip() == "UNMOUNTED"
    assert m.proc.wait(10) == 0
    assert not os.path.ismount(m.path)


def test_sigterm_unmounts_cleanly(make_mount):
    m = make_mount()
    fd = os.open(m / "malloc0", os.O_RDONLY)  # an open file does not keep the mount alive
    try:
        m.proc.terminate()
        assert m.proc.wait(10) == 0
        assert not os.path.ismount(m.path)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def test_files_removed_just_before_the_unmount_are_invalidated_first(make_mount):
    """Entry invalidations still queued in pyfuse3's notify thread when the mount stops are
    delivered while the session is mounted (blockfs.fuse waits for them). Sent after the
    unmount they fail with EINVAL and a traceback in the log (after the session is destroyed
    they would use freed memory); if the process exits first they are lost. The files are
    looked up first, so the kernel has entries to drop, each invalidation is made to take 100
    ms (the runner logs each one queued and delivered), and the mount is stopped right after
    the removals."""
    for _ in range(2):
        m = make_mount("--fixture", "gpt_512", "--slow-invalidate-ms", "100")
        for name in ("fixture0", "fixture0p1", "fixture0p2", "fixture0p3", "malloc0", "malloc1"):
            os.stat(m / name)
        m.command("remove fixture0")
        m.command("remove malloc1")
        m.stop()
        text = m.log.read_text()
        assert "Traceback" not in text and "after the unmount" not in text, text
        queued = text.count("entry invalidation queued")
        assert queued == 5 and text.count("entry invalidation delivered") == queued, text
