"""The control socket: newline-delimited JSON-RPC 2.0 over a unix stream socket (mode 0600).

Server: `serve_control(path, methods)` where `methods` maps a method name to an async function
taking the params dict. Client: `call(path, method, params)` (blocking, for the CLI).
In the spirit of SPDK's RPC socket; not a network service.

A bad request never ends the daemon: malformed JSON, a request that is not an object or whose
method is not a string, params of the wrong type, or a method failing on the controller (a
rescan while the controller is failed or reconnecting) each get a JSON-RPC error reply
(-32700 parse, -32600 invalid request, -32601 unknown method, -32602 invalid params, -32000
the operation failed) and the connection stays open for the next request.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Awaitable, Callable

import trio

from bdev import BdevError
from initiator._errors import NvmeError
from initiator._util import clear_stale_socket

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20


class ControlError(Exception):
    """An error reply from the daemon, or no daemon at the socket."""


async def bind_private_unix(path: str) -> trio.socket.SocketType:
    """A unix stream socket bound at *path*, mode 0600, its directory made if missing (the
    control socket, the NBD server's unix socket). Raises OSError (the socket is closed)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        old = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_control(path: str, methods: dict[str, Callable[[dict], Awaitable[object]]], *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    # A stale socket goes; another daemon's live one stays (SocketPathError).
    clear_stale_socket(path, "control socket")
    sock = await bind_private_unix(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as n:
            task_status.started(path)
            while True:
                stream = await listener.accept()
                n.start_soon(_handle, stream, methods)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        await listener.aclose()


async def _handle(stream: trio.SocketStream, methods) -> None:
    buf = b""
    async with stream:
        try:
            while True:
                while b"\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                    if len(buf) > MAX_REQUEST:
                        await stream.send_all(_reply(None, error=(-32600, "request too large")))
                        return
                line, buf = buf.split(b"\n", 1)
                await stream.send_all(await _dispatch(line, methods))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _dispatch(line: bytes, methods) -> bytes:
    try:
        req = json.loads(line)
    except (ValueError, RecursionError):    # RecursionError: nesting deeper than json parses
        return _reply(None, error=(-32700, "parse error"))
    if not isinstance(req, dict):
        return _reply(None, error=(-32600, "invalid request: not a JSON object"))
    rid = req.get("id")
    if not isinstance(rid, (str, int, float, type(None))) or isinstance(rid, bool):
        rid = None                          # JSON-RPC 2.0 section 4: a string, number or null
    method = req.get("method")
    if not isinstance(method, str):
        return _reply(rid, error=(-32600, "invalid request: method must be a string"))
    fn = methods.get(method)
    if fn is None:
        return _reply(rid, error=(-32601, f"unknown method {method!r}"))
    params = req.get("params") or {}
    if not isinstance(params, dict):
        return _reply(rid, error=(-32602, "params must be an object"))
    try:
        return _reply(rid, result=await fn(params))
    except (ValueError, TypeError, LookupError) as e:
        return _reply(rid, error=(-32602, f"invalid params: {e}"))
    except (NvmeError, BdevError, OSError) as e:
        return _reply(rid, error=(-32000, str(e)))


def _reply(rid, *, result=None, error=None) -> bytes:
    msg = {"jsonrpc": "2.0", "id": rid}
    if error is not None:
        msg["error"] = {"code": error[0], "message": error[1]}
    else:
        msg["result"] = result
    return json.dumps(msg).encode() + b"\n"


def call(path: str, method: str, params: dict | None = None, timeout: float = 30.0):
    """Blocking client for the CLI and tests."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as e:
        raise ControlError(f"no blockfs daemon at {path}: {e.strerror}") from None
    with s:
        s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                              "params": params or {}}).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            data = s.recv(65536)
            if not data:
                raise ControlError("the daemon closed the control connection")
            buf += data
    try:
        rep = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        raise ControlError(f"{path} did not answer in JSON-RPC") from None
    if not isinstance(rep, dict) or not ("result" in rep or "error" in rep):
        raise ControlError(f"{path} did not answer in JSON-RPC")
    if "error" in rep:
        err = rep["error"]
        raise ControlError(str(err.get("message", err) if isinstance(err, dict) else err))
    return rep["result"]
