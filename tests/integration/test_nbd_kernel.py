"""NBD exports of kernel-target namespaces, with real NBD clients (issue 6, end to end).

`blockfs mount ... --nbd ADDR:PORT` (or `--nbd unix:PATH`) serves the same bdevs as files and as
NBD exports from one process, so this also checks that both frontends see the same data. Every
test runs on a TCP port and on a unix socket.
"""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest

from mount_helpers import Mount, run

pytestmark = [pytest.mark.nbd, pytest.mark.fuse]
need = pytest.mark.skipif(not (shutil.which("nbdinfo") and shutil.which("nbdcopy")
                               and shutil.which("qemu-img") and shutil.which("qemu-io")),
                          reason="libnbd-bin / qemu-utils not installed (scripts/setup-system)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["tcp", "unix"])
def nbd_mount(request, kernel_target, tmp_path):
    mp, rd = tmp_path / "mnt", tmp_path / "run"
    mp.mkdir()
    rd.mkdir()
    if request.param == "unix":
        sock = str(tmp_path / "nbd.sock")
        listen = f"unix:{sock}"
        m = Mount(kernel_target, str(mp), str(rd), extra=("--nbd", listen))
        m.uri_of = lambda name="": f"nbd+unix:///{name}?socket={sock}"
    else:
        port = free_port()
        listen = f"127.0.0.1:{port}"
        m = Mount(kernel_target, str(mp), str(rd), extra=("--nbd", listen))
        m.uri_of = lambda name="": f"nbd://127.0.0.1:{port}/{name}"
    m.listen = listen
    yield m
    m.umount()
    if request.param == "unix":
        assert not os.path.exists(sock), "the daemon left its NBD socket behind"


@need
def test_nbdinfo_lists_every_bdev(nbd_mount, kernel_target):
    m = nbd_mount
    info = json.loads(run("nbdinfo", "--list", "--json", m.uri_of()).stdout)
    exports = {e["export-name"]: e for e in info["exports"]}
    for n in kernel_target.namespaces:
        e = exports[f"nvme0n{n['nsid']}"]
        assert e["export-size"] == os.stat(m.file(f"nvme0n{n['nsid']}")).st_size
        assert e["block_size_minimum"] >= 1
        assert e["block_size_preferred"] >= n["block_size"]
        assert e["block_size_maximum"] >= 1 << 20
    # `blockfs list` says where the exports are served
    listing = json.loads(m.blockfs("list", "-o", "json", check=True).stdout)
    assert [d["nbd"] for d in listing["devices"] if d["pid"] == m.pid][0] == m.listen


@need
def test_nbdcopy_in_and_out_and_qemu_img_compare(nbd_mount, tmp_path):
    m = nbd_mount
    uri = m.uri_of("nvme0n2")
    size = os.stat(m.file("nvme0n2")).st_size
    img = tmp_path / "img"
    img.write_bytes(os.urandom(16 << 20) + bytes(size - (16 << 20)))
    run("nbdcopy", str(img), uri)
    back = tmp_path / "back"
    run("nbdcopy", uri, str(back))
    assert back.read_bytes() == img.read_bytes()
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), uri)
    # the FUSE file shows the same bytes
    with open(m.file("nvme0n2"), "rb") as f:
        assert f.read(1 << 20) == img.read_bytes()[:1 << 20]
    # four connections
    img2 = tmp_path / "img2"
    img2.write_bytes(os.urandom(size))
    run("nbdcopy", "--connections=4", str(img2), uri)
    run("nbdcopy", "--connections=4", uri, str(back))
    assert back.read_bytes() == img2.read_bytes()


@need
def test_qemu_io_aligned_unaligned_discard_zero(nbd_mount):
    uri = nbd_mount.uri_of("nvme0n2")
    cmds = ["write -P 0xab 0 64k", "read -P 0xab 0 64k",
            "write -P 0xcd 1000 3000", "read -P 0xcd 1000 3000", "read -P 0xab 0 1000",
            "read -P 0xab 4000 61536",
            "write -z 8192 16384", "read -P 0 8192 16384", "read -P 0xab 24576 8192",
            "discard 32768 32768", "read -P 0 32768 32768"]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = run(*args, uri)
    assert "Pattern verification failed" not in r.stdout + r.stderr
    assert "error" not in (r.stdout + r.stderr).lower()
