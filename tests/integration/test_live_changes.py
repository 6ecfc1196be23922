"""Live target changes through a FUSE mount, on a dedicated kernel target VM (issues 4 and 5).

Namespace resize/add/remove reach the files and the hotplug scripts; a port cut during a fio
verify job loses nothing; ctrl-loss-tmo turns reads into EIO without hanging the mount.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest

from mount_helpers import Mount, MountFactory, run, wait_for

pytestmark = [pytest.mark.ktarget, pytest.mark.fuse, pytest.mark.slow]


@pytest.fixture(scope="module")
def live_target():
    from kernel_target import require_kernel_target, start_kernel_target
    require_kernel_target()
    with start_kernel_target(ns=("64M",)) as kt:
        yield kt


@pytest.fixture
def hotplug(tmp_path):
    d = tmp_path / "hotplug.d"
    d.mkdir()
    logf = tmp_path / "events.log"
    script = d / "record"
    script.write_text("#!/bin/sh\necho \"$BLOCKFS_EVENT $BLOCKFS_BDEV $BLOCKFS_SIZE "
                      f"$BLOCKFS_NSID $BLOCKFS_CTRL\" >> {logf}\n")
    script.chmod(0o755)
    hang = d / "zz-hangs"          # a hanging script must not hold up events or I/O
    hang.write_text("#!/bin/sh\nexec sleep 1000\n")
    hang.chmod(0o755)

    def events():
        try:
            return [line.split() for line in logf.read_text().splitlines()]
        except FileNotFoundError:
            return []
    return str(d), events


@pytest.fixture
def live_mount(live_target, tmp_path):
    """Mounts with KATO 2 s and reconnect-delay 1 s; torn down without assuming they still work."""
    factory = MountFactory(live_target, tmp_path, base_extra=("-k", "2", "-c", "1"))
    yield factory
    factory.close(clean=False)


def size(path):
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def test_resize_grow_keeps_partitions_and_shrink(live_target, live_mount, hotplug):
    kt = live_target
    hp_dir, events = hotplug
    m = live_mount("--hotplug-dir", hp_dir, "--hotplug-timeout", "2")
    f = m.file("nvme0n1")
    run("sgdisk", "--zap-all", f, check=False)
    run("sgdisk", "-n", "1:2048:+8M", "-n", "2:0:+16M", f)
    assert wait_for(lambda: size(m.file("nvme0n1p2")) == 16 << 20)

    kt.resize(1, "96M")
    t0 = time.monotonic()
    assert wait_for(lambda: size(f) == 96 << 20, 2.0), size(f)      # within 2 s
    grown_after = time.monotonic() - t0
    assert size(m.file("nvme0n1p1")) == 8 << 20                       # a grown GPT disk keeps
    assert size(m.file("nvme0n1p2")) == 16 << 20                      # its partitions
    assert wait_for(lambda: ["resize", "nvme0n1", str(96 << 20), "1", "nvme0"] in events(), 5)

    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(4096), 80 << 20)
        kt.resize(1, "64M")
        assert wait_for(lambda: size(f) == 64 << 20, 2.0), size(f)
        # reads past the new end: 0 bytes or EIO, never the old data
        try:
            assert os.pread(fd, 4096, 80 << 20) == b""
        except OSError as e:
            assert e.errno in (5, 22)
    finally:
        os.close(fd)
    assert wait_for(lambda: ["resize", "nvme0n1", str(64 << 20), "1", "nvme0"] in events(), 5)
    print(f"grow visible after {grown_after:.2f} s")


def test_add_and_remove_namespace(live_target, live_mount, hotplug):
    kt = live_target
    hp_dir, events = hotplug
    m = live_mount("--hotplug-dir", hp_dir, "--hotplug-timeout", "2")
    kt.add_ns(2, "16M")
    assert wait_for(lambda: size(m.file("nvme0n2")) == 16 << 20, 3.0)
    fd = os.open(m.file("nvme0n2"), os.O_RDONLY)
    try:
        os.pread(fd, 4096, 0)
        kt.remove_ns(2)
        assert wait_for(lambda: not os.path.exists(m.file("nvme0n2")), 3.0)
        t0 = time.monotonic()
        with pytest.raises(OSError) as ei:
            os.pread(fd, 4096, 0)
        assert ei.value.errno in (19, 5)                               # ENODEV / EIO
        assert time.monotonic() - t0 < 2.0                             # an error, not a hang
    finally:
        os.close(fd)
    assert wait_for(lambda: ["remove", "nvme0n2"] in [e[:2] for e in events()], 5)
    seq = [e[0] for e in events() if e[1:2] == ["nvme0n2"]]
    assert seq == ["add", "remove"]


def test_twenty_resizes_in_a_row(live_target, live_mount):
    kt = live_target
    m = live_mount()
    f = m.file("nvme0n1")
    sizes = [(64 + 4 * i) << 20 for i in range(1, 21)]
    for s in sizes:                       # as fast as the harness sends them
        kt.resize(1, s)
    assert wait_for(lambda: size(f) == sizes[-1], 5.0), size(f)
    kt.resize(1, "64M")
    assert wait_for(lambda: size(f) == 64 << 20, 5.0)


@pytest.mark.skipif(not shutil.which("fio"), reason="fio not installed")
def test_fio_verify_survives_a_port_cut(live_target, live_mount, hotplug):
    kt = live_target
    hp_dir, events = hotplug
    m = live_mount("--hotplug-dir", hp_dir, "--hotplug-timeout", "2")
    cutter_err = []

    def cut():
        try:
            time.sleep(1.0)
            kt.kill_port()
            time.sleep(2.5)            # longer than the reconnect delay (1 s)
            kt.restore_port()
        except Exception as e:   # noqa: BLE001 - reported below
            cutter_err.append(e)
    t = threading.Thread(target=cut)
    t.start()
    r = run("fio", "--name=v", f"--filename={m.file('nvme0n1')}", "--rw=randwrite", "--bs=4k",
            "--size=4M", "--verify=crc32c", "--ioengine=libaio", "--iodepth=8", "--direct=1",
            "--runtime=6", "--time_based", "--verify_state_save=0", "--output-format=json",
            timeout=120, check=False)
    t.join()
    assert not cutter_err
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    stats = json.loads(m.blockfs("ctl", "-S", m.control, "stats", check=True).stdout)
    assert stats["controllers"][0]["reconnects"] >= 1
    assert stats["controllers"][0]["state"] == "live"
    # hotplug scripts were told: disconnect, then reconnect (controller events carry BLOCKFS_CTRL)
    assert wait_for(lambda: [e[0] for e in events() if e[0] in ("disconnect", "reconnect")][:2]
                    == ["disconnect", "reconnect"], 5.0), events()


def test_ctrl_loss_tmo_gives_eio_and_the_mount_stays_responsive(live_target, live_mount):
    kt = live_target
    m = live_mount("-l", "3")
    fd = os.open(m.file("nvme0n1"), os.O_RDONLY)
    kt.kill_port()
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError) as ei:
            while time.monotonic() - t0 < 15:
                os.pread(fd, 4096, 0)
                time.sleep(0.2)
        assert ei.value.errno == 5                                     # EIO
        assert time.monotonic() - t0 <= 3 + 3                          # ctrl-loss-tmo + slack
        t1 = time.monotonic()
        assert "nvme0n1" in os.listdir(m.path)                         # ls does not hang
        os.stat(m.file("nvme0n1"))
        assert time.monotonic() - t1 < 2
    finally:
        os.close(fd)
        kt.restore_port()
    t2 = time.monotonic()
    m.umount()                                                         # umount does not hang
    assert time.monotonic() - t2 < 15


SECOND = "nqn.2026-01.io.blockfs:second"
ADD_SECOND = f"""set -e
S=/sys/kernel/config/nvmet/subsystems/{SECOND}
mkdir $S
echo 1 > $S/attr_allow_any_host
mkdir $S/namespaces/1
truncate -s 8M /srv/second.img
echo -n /srv/second.img > $S/namespaces/1/device_path
echo 1 > $S/namespaces/1/buffered_io
echo 1 > $S/namespaces/1/enable
ln -s $S /sys/kernel/config/nvmet/ports/1/subsystems/{SECOND}
"""


def test_discovery_connect_all_follows_the_log(live_target, tmp_path):
    """`mount --discovery --persistent`: every listed subsystem is attached; a subsystem linked
    to the port later (Discovery Log Page Change AEN) is attached, an unlinked one detached."""
    kt = live_target
    mp, rd = tmp_path / "dm", tmp_path / "dr"
    mp.mkdir()
    rd.mkdir()
    m = Mount.__new__(Mount)      # discovery mode: no -n
    m.kt, m.path, m.rundir = kt, str(mp), str(rd)
    m.control = str(rd / "ctl.sock")
    m.env = {**os.environ, "BLOCKFS_RUN_DIR": str(rd)}
    r = m.blockfs("mount", "--discovery", "--persistent", "-a", kt.host, "-s", str(kt.port),
                  str(mp), "--control", m.control)
    assert r.returncode == 0, r.stderr
    m.pid = json.loads(next(rd.glob("*.json")).read_text())["pid"]
    try:
        assert "nvme0n1" in os.listdir(m.path)
        kt.sh(ADD_SECOND)
        assert wait_for(lambda: size(m.file("nvme1n1")) == 8 << 20, 5.0), os.listdir(m.path)
        stats = json.loads(m.blockfs("ctl", "-S", m.control, "stats", check=True).stdout)
        assert SECOND in stats["discovery"]["attached"]
        kt.sh(f"rm /sys/kernel/config/nvmet/ports/1/subsystems/{SECOND}")
        assert wait_for(lambda: not os.path.exists(m.file("nvme1n1")), 5.0)
        assert os.path.exists(m.file("nvme0n1"))
    finally:
        kt.ctl(f"rm -f /sys/kernel/config/nvmet/ports/1/subsystems/{SECOND}; "
               f"rmdir /sys/kernel/config/nvmet/subsystems/{SECOND}/namespaces/1 "
               f"/sys/kernel/config/nvmet/subsystems/{SECOND}")
        m.umount()
