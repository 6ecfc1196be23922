"""TCP congestion control in tests: what a socket uses, and an algorithm that is not the
system's default (so a test can tell an explicit choice from the default)."""

from __future__ import annotations

import socket

from initiator._util import system_congestion


def congestion_of(sock: socket.socket) -> str:
    """The socket's congestion control (TCP_CONGESTION)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()


def other_congestion_control() -> str:
    """An algorithm other than the system's default: reno (always built in), or cubic when
    reno is the default."""
    return "reno" if system_congestion() != "reno" else "cubic"
