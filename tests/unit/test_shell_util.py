"""Shared shell helpers: IdleMeter (the polling idle time blockfs bench and the target subtract
from CPU time), drop_sent (the rest of a buffer list after a partial send) and
set_tcp_congestion (the initiator's and the target's --tcp-congestion)."""

import socket

import pytest

from helpers.tcp import congestion_of
from initiator._util import IdleMeter, set_tcp_congestion
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
