"""Small shared helpers for the trio shells (the initiator's, the target's, the frontends'):
turning nursery ExceptionGroups back into the single typed error the caller expects (trio >= 0.25
always groups nursery errors), the rest of a buffer list after a partial send, a TCP socket's
congestion control, the polling idle meter, stop signals held off while a server cleans up,
and freeing a unix socket path that a server which is gone left behind (control sockets, the
NBD unix socket)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import stat
from time import perf_counter

import trio


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e)
    else:
        yield exc


def collapse(exc: BaseException) -> BaseException:
    """The one exception that matters in a group: KeyboardInterrupt/SystemExit first, then the
    first that is not a cancellation; a group of only cancellations stays a group."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = list(_leaves(exc))
    for kind in (KeyboardInterrupt, SystemExit):
        for e in leaves:
            if isinstance(e, kind):
                return e
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    return real[0] if real else exc


@contextlib.contextmanager
def single_errors():
    """`with single_errors(): async with trio.open_nursery() ...`: re-raise a group's one
    meaningful exception instead of the group."""
    try:
        yield
    except BaseExceptionGroup as eg:
        e = collapse(eg)
        if e is eg:
            raise
        raise e from None


def drop_sent(bufs: list, sent: int) -> None:
    """Remove from the front of `bufs` the `sent` bytes a (partial) sendmsg of them took: whole
    buffers go, a partly sent one becomes a view of its rest. Buffers are bytes-like with 1-byte
    items (len() is their size)."""
    i = 0
    while sent:
        k = len(bufs[i])
        if sent < k:
            bufs[i] = memoryview(bufs[i])[sent:]
            break
        sent -= k
        i += 1
    del bufs[:i]


def _ipv4_sysctl(name: str) -> str:
    """/proc/sys/net/ipv4/NAME, stripped ("" where unreadable)."""
    try:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return f.read().strip()
    except OSError:
        return ""


def system_congestion() -> str:
    """The congestion control new TCP sockets get (net.ipv4.tcp_congestion_control), or ""."""
    return _ipv4_sysctl("tcp_congestion_control")


def set_tcp_congestion(sock: socket.socket, name: str) -> None:
    """Choose a TCP socket's congestion control (TCP_CONGESTION, tcp(7)), e.g. "cubic".

    Raises ValueError naming what this kernel offers when `name` is unknown, not loaded, or
    not in net.ipv4.tcp_allowed_congestion_control for an unprivileged process."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EPERM):
            raise
        which = "available" if e.errno == errno.ENOENT else "allowed"
        offered = _ipv4_sysctl(f"tcp_{which}_congestion_control").split()
        raise ValueError(f"TCP congestion control {name!r} is not {which} here"
                         + (f" ({', '.join(offered)})" if offered else "")) from None


def _do_nothing(signum: int, frame: object) -> None:
    pass


@contextlib.contextmanager
def signals_ignored(*signals: int):
    """While inside, *signals* reach a handler that does nothing (a handler, not SIG_IGN, which
    exec would pass on to child processes); then the handlers from before come back. Around a
    trio.open_signal_receiver: the signals it re-delivers when it closes, and those that come
    while a server finishes its cleanup, then no longer kill the process half-way. Main thread
    only (a Python limitation)."""
    before = {s: signal.signal(s, _do_nothing) for s in signals}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


class SocketPathError(OSError):
    """A unix socket path a server cannot take: something that is not a socket is there, or a
    live server listens on it."""


def clear_stale_socket(path: str, what: str = "") -> None:
    """Make *path* free for a unix socket's bind(): remove a socket that nobody listens on any
    more (its server is gone: connect() is refused), and nothing else. Raises SocketPathError
    when a file that is not a socket is there, or when a server answers on it: the path is in
    use, as SPDK refuses an RPC socket path that another process holds. *what* ("control
    socket") starts the error's message. Not atomic: two servers starting on the same path at
    the same instant can still race (bind() fails for one)."""
    name = f"{what} {path}" if what else path
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there; bind() says why if it cannot make one either
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{name} exists and is not a socket")
    # Non-blocking: a live server whose backlog is full answers EAGAIN instead of hanging us.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: left behind by a server that is gone
        return
    except FileNotFoundError:
        return  # gone meanwhile
    except BlockingIOError:
        pass  # listening, backlog full: in use
    except OSError as exc:
        raise SocketPathError(f"{name}: {exc.strerror}") from None
    finally:
        probe.close()
    raise SocketPathError(f"{name} is in use by another process")


class IdleMeter:
    """Time a polling process spent finding nothing to do (SPDK's idle poller time): CPU that
    `getrusage` counts but no I/O needed. One meter per process, shared by its pollers: the
    first poller that finds its socket empty opens a stretch (`since`), the next one that
    receives data closes it and adds it to `total`, and so does a poller that stops polling to
    sleep. Other tasks run inside a stretch (a poller yields between its tries), so whatever
    finds work closes it too: the FUSE workers when a request is there, the NBD reader when
    requests arrive (without that, a FUSE mount's work between two NVMe receives counted as
    idle: a fifth of its CPU at 4K QD32). The hot loops inline `miss` and `work`."""

    __slots__ = ("since", "total")

    def __init__(self) -> None:
        self.since = 0.0
        self.total = 0.0

    def miss(self, now: float) -> None:
        if not self.since:
            self.since = now

    def work(self, now: float) -> None:
        if self.since:
            self.total += now - self.since
            self.since = 0.0

    def work_found(self) -> None:
        """`work` for a task other than a poller that found something to do (a FUSE request,
        NBD requests): the clock is read only while a stretch is open."""
        if self.since:
            self.total += perf_counter() - self.since
            self.since = 0.0
