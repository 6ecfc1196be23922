"""`blockfs` argument checking: a bad value is one line on stderr and exit status 2, found before
anything connects (so nothing listens on the port given here) and never a traceback."""

import os
import socket

import pytest

from blockfs.cli import main

TARGET = ["-a", "127.0.0.1", "-s", "1", "-n", "nqn.2026-01.io.blockfs:none"]


@pytest.mark.parametrize("argv", [
    # float() takes "nan", which every range check lets through: a ValueError deep inside
    # (int(nan), trio's timeouts), or in a daemon the first time the value is used.
    ["id-ctrl", *TARGET, "-k", "nan"],
    ["id-ctrl", *TARGET, "--connect-timeout", "nan"],
    ["id-ctrl", *TARGET, "--admin-timeout", "nan"],
    ["id-ctrl", *TARGET, "--io-timeout", "nan"],
    ["nbd", "-f", *TARGET, "--reconnect-delay", "nan"],
    ["nbd", "-f", *TARGET, "--ctrl-loss-tmo", "nan"],
    ["nbd", "-f", *TARGET, "--fast-io-fail-tmo", "nan"],
    # KATO is 32 bits of milliseconds: int(inf) raised OverflowError, 1e300 struct.error.
    ["id-ctrl", *TARGET, "-k", "inf"],
    ["id-ctrl", *TARGET, "-k", "1e300"],
    ["id-ctrl", *TARGET, "-k", "4294968"],
    # Plain float options: trio.move_on_after(-1) / sleep(nan) raised ValueError in the
    # daemon's hotplug task (ending the daemon) or in bench.
    ["nbd", "-f", *TARGET, "--hotplug-timeout", "-1"],
    ["nbd", "-f", *TARGET, "--hotplug-timeout", "nan"],
    ["nbd", "-f", *TARGET, "--rescan-interval", "nan"],
    ["bench", *TARGET, "--time", "nan"],
    ["bench", *TARGET, "--time", "-1"],
    # An I/O size of 0 divided by zero in bench.
    ["bench", *TARGET, "--bs", "0"],
    ["umount", "/nonexistent", "--timeout", "nan"],
    # uid_t / gid_t are 32 bits: the mount came up and every stat of it failed with EIO.
    ["mount", "-f", *TARGET, "/nonexistent", "--uid", "99999999999"],
    ["mount", "-f", *TARGET, "/nonexistent", "--gid", "-2"],
    ["mount", "-f", *TARGET, "/nonexistent", "--uid", "4294967295"],
    # NQNs are 1..223 bytes (NVMe Base 4.5): found at Connect time, exit 1, before.
    ["id-ctrl", "-a", "127.0.0.1", "-s", "1", "-n", ""],
    ["id-ctrl", "-a", "127.0.0.1", "-s", "1", "-n", "n" * 224],
    ["id-ctrl", "-a", "127.0.0.1", "-s", "1", "-n", "\u00e9" * 112],   # 224 bytes of UTF-8
    ["id-ctrl", *TARGET, "-q", ""],
    ["nbd", "-f", *TARGET, "-q", "h" * 300],
    # NBD listen addresses: ADDR:PORT or unix:PATH (sun_path holds 107 bytes and a NUL).
    ["nbd", "-f", *TARGET, "--listen", "unix:"],
    ["nbd", "-f", *TARGET, "--listen", "unix:/" + "s" * 107],
    ["nbd", "-f", *TARGET, "--listen", "/run/nbd.sock"],
    ["nbd", "-f", *TARGET, "--listen", "127.0.0.1:65536"],
    ["mount", "-f", *TARGET, "/nonexistent", "--nbd", "localhost"],
])
def test_bad_values_are_one_line_and_status_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_nbd_listen_addresses():
    from blockfs.daemon import parse_listen
    assert parse_listen("127.0.0.1:10809") == ("127.0.0.1", 10809)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":10809") == ("127.0.0.1", 10809)
    assert parse_listen("unix:/run/blockfs/nbd.sock") == "/run/blockfs/nbd.sock"
    assert parse_listen("unix:nbd.sock") == os.path.abspath("nbd.sock")
    longest = "/" + "s" * 106
    assert parse_listen("unix:" + longest) == longest


def test_longest_nqn_is_accepted():
    from blockfs.cli import build_parser
    nqn = "nqn.2026-01.io.blockfs:" + "x" * (223 - 23)
    assert build_parser().parse_args(["id-ctrl", "-a", "h", "-n", nqn]).nqn == nqn


def test_largest_keep_alive_is_accepted():
    from blockfs import options as o
    from blockfs.cli import build_parser
    args = build_parser().parse_args(["id-ctrl", *TARGET, "-k", "4294967"])
    assert o.controller_options(args).keep_alive_tmo == 4294967


# ----------------------------------------------------------------------------- runfiles, ctl


@pytest.mark.parametrize("content", [
    "[1, 2]", '"text"', '{"pid": "123"}', '{"control": "/x"}', '{"pid": -1, "control": "/x"}',
    '{"pid": 1, "control": 5}', '{"pid": 1, "control": "/x", "mountpoint": 7}', "{bad json",
])
def test_list_and_umount_skip_a_damaged_runfile(content, tmp_path, monkeypatch, capsys):
    # Any *.json in the run directory is read; one that is not a daemon's runfile was a
    # TypeError traceback from `blockfs list` and `blockfs umount`.
    from blockfs import daemon
    monkeypatch.setattr(daemon, "RUN_DIR", str(tmp_path))
    (tmp_path / "4242.json").write_text(content)
    assert main(["list", "-o", "json"]) == 0
    assert '"devices": []' in capsys.readouterr().out
    assert main(["umount", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a blockfs mount" in err, err


@pytest.mark.parametrize("answer", [b"garbage\n", b"[1]\n", b'{"id": 1}\n',
                                    b'{"error": "plain"}\n'])
def test_ctl_against_something_that_is_not_a_daemon(answer, tmp_path, capsys):
    import socket
    import threading
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()

    def answer_once():
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)
    t = threading.Thread(target=answer_once, daemon=True)
    t.start()
    try:
        assert main(["ctl", "-S", path, "list"]) == 1
    finally:
        t.join(5)
        srv.close()
    err = capsys.readouterr().err
    assert err.startswith("blockfs ctl: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("what", ["live-socket", "plain-file"])
def test_a_control_path_in_use_is_refused_before_connecting(what, tmp_path, capsys):
    """`--control` took any path: it unlinked another daemon's live control socket (that
    daemon could no longer be reached) or a file that was not a socket at all."""
    path = tmp_path / "ctl.sock"
    other = None
    if what == "live-socket":
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(path))
        other.listen(1)
    else:
        path.write_text("not a socket")
    try:
        assert main(["nbd", "-f", *TARGET, "--control", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"control socket {path}" in err
        assert ("in use by another process" if other else "exists and is not a socket") in err
        assert path.is_socket() if other else path.read_text() == "not a socket"
    finally:
        if other is not None:
            other.close()
