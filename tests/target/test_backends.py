"""Namespace backend specs and behaviour."""

import pytest

from target.backends import FileBackend, NullBackend, RamBackend, parse_ns_spec, parse_size


def test_parse_size():
    assert parse_size("4096") == 4096
    assert parse_size("64M") == 64 << 20
    assert parse_size("1g") == 1 << 30
    assert parse_size("512KiB") == 512 << 10
    with pytest.raises(ValueError):
        parse_size("lots")


def test_specs(tmp_path):
    b, bs = parse_ns_spec("ram:1M")
    assert isinstance(b, RamBackend) and bs == 512 and b.size == 1 << 20
    b, bs = parse_ns_spec("null:1G:4096")
    assert isinstance(b, NullBackend) and bs == 4096
    b, bs = parse_ns_spec(f"file:{tmp_path}/a:b.img:4096:1M")      # ':' in the path
    assert isinstance(b, FileBackend) and bs == 4096 and b.size == 1 << 20
    b.close()
    b, bs = parse_ns_spec(f"file:{tmp_path}/a:b.img")
    assert b.size == 1 << 20 and bs == 512
    b.close()
    for bad in ("ram", "ram:1M:1000", "ram:100", "disk:1M", f"file:{tmp_path}/missing"):
        with pytest.raises(ValueError):
            parse_ns_spec(bad)


def test_ram_resize_keeps_data_and_views():
    b = RamBackend(4096)
    b.write(0, b"x" * 4096)
    view = b.read(0, 4096)
    b.resize(8192)
    assert bytes(view) == b"x" * 4096 and bytes(b.read(0, 8192)) == b"x" * 4096 + bytes(4096)
    b.zero(0, 1024)
    assert bytes(b.read(0, 2048)) == bytes(1024) + b"x" * 1024
    b.resize(1024)
    assert b.size == 1024


def test_file_resize_and_zero(tmp_path):
    p = tmp_path / "f.img"
    p.write_bytes(b"\xFF" * 8192)
    b = FileBackend(str(p))
    b.zero(512, 1024)
    b.resize(16384)
    assert b.size == 16384 and p.stat().st_size == 16384
    assert b.read(0, 2048) == b"\xFF" * 512 + bytes(1024) + b"\xFF" * 512
    assert b.read(16000, 384) == bytes(384)
    b.flush()
    b.close()
