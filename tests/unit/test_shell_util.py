"""Shared shell helpers: IdleMeter (the polling idle time blockfs bench and the target subtract
from CPU time), drop_sent (the rest of a buffer list after a partial send),
set_tcp_congestion (the initiator's and the target's --tcp-congestion) and clear_stale_socket
(control sockets and the NBD unix socket: a dead server's socket goes, a live one stays)."""

import socket

import pytest

from helpers.tcp import congestion_of
from initiator._util import IdleMeter, SocketPathError, clear_stale_socket, set_tcp_congestion
from initiator.controller import ControllerOptions


def test_stretches_open_on_the_first_miss_and_close_on_work():
    m = IdleMeter()
    m.work(1.0)                 # work with no open stretch: nothing
    assert m.total == 0.0
    m.miss(2.0)
    m.miss(2.5)                 # a second poller's miss does not restart the stretch
    m.work(3.0)
    assert m.total == 1.0 and not m.since
    m.miss(4.0)
    m.work(4.25)                # a poller giving up to sleep closes it the same way
    assert m.total == 1.25



def test_drop_sent():
    from initiator._util import drop_sent
    bufs = [b"abc", bytearray(b"defg"), memoryview(b"hi")]
    drop_sent(bufs, 0)
    assert [bytes(b) for b in bufs] == [b"abc", b"defg", b"hi"]
    drop_sent(bufs, 5)
    assert [bytes(b) for b in bufs] == [b"fg", b"hi"]
    drop_sent(bufs, 2)
    assert [bytes(b) for b in bufs] == [b"hi"]
    drop_sent(bufs, 2)
    assert bufs == []


def test_set_tcp_congestion_sets_it_or_names_what_there_is():
    with socket.socket() as s:
        set_tcp_congestion(s, "reno")                      # always built in
        assert congestion_of(s) == "reno"
        with pytest.raises(ValueError, match=r"'no-such-cc' is not available here \(.*reno"):
            set_tcp_congestion(s, "no-such-cc")


def test_controller_options_check_the_congestion_control_up_front():
    assert ControllerOptions(tcp_congestion="reno").tcp_congestion == "reno"
    assert ControllerOptions().tcp_congestion is None
    with pytest.raises(ValueError, match="no-such-cc"):
        ControllerOptions(tcp_congestion="no-such-cc")


def test_clear_stale_socket_removes_only_a_dead_servers_socket(tmp_path):
    path = str(tmp_path / "s.sock")
    clear_stale_socket(path)                      # nothing there: nothing to do
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()                                  # bound, nobody listens: left behind
    clear_stale_socket(path)
    assert not (tmp_path / "s.sock").exists()

    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(SocketPathError, match="in use by another process"):
            clear_stale_socket(path)
        assert (tmp_path / "s.sock").is_socket()  # another server's socket stays
    finally:
        live.close()

    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    with pytest.raises(SocketPathError, match="exists and is not a socket"):
        clear_stale_socket(str(plain))
    assert plain.read_text() == "keep me"
