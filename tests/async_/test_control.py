"""The daemon's control socket (blockfs.control): bad requests get JSON-RPC errors and the
server, and the connection they came on, go on serving. A request that killed the control
task used to end the whole daemon (its nursery), unmounting every file."""

from __future__ import annotations

import pytest
import trio

from bdev import BdevError
from blockfs.control import ControlError, call, serve_control
from helpers.jsonlines import exchange
from initiator.session import ControllerUnavailable

pytestmark = pytest.mark.trio


async def _echo(params):
    return params


async def _controller_failed(params):
    raise ControllerUnavailable("nvme0: controller failed: ctrl-loss-tmo expired")


async def _bdev_failed(params):
    raise BdevError(5, "read of the partition table failed")


async def _wrong_type(params):
    return params["n"] + 1          # TypeError for {"n": "x"}


METHODS = {"echo": _echo, "rescan": _controller_failed, "examine": _bdev_failed,
           "add": _wrong_type}


@pytest.mark.parametrize("line, code", [
    (b"{not json", -32700),
    (b"[" * 100_000, -32700),                      # deeper than json parses: RecursionError
    (b"\xff\xfe", -32700),                          # not UTF-8
    (b"[1, 2]", -32600),                            # not an object
    (b'{"method": {"cmd": "stats"}}', -32600),      # unhashable method (crashed the daemon)
    (b'{"method": ["stats"]}', -32600),
    (b'{"method": null}', -32600),
    (b'{"method": "nope"}', -32601),
    (b'{"method": "echo", "params": [1]}', -32602),
    (b'{"method": "add", "params": {"n": "x"}}', -32602),
    (b'{"method": "rescan"}', -32000),              # ControllerUnavailable
    (b'{"method": "examine"}', -32000),             # BdevError
], ids=["not-json", "too-deep", "not-utf8", "array", "method-object", "method-list",
        "method-null", "unknown", "params-list", "param-type", "controller-failed",
        "bdev-error"])
async def test_a_bad_request_gets_an_error_and_the_server_goes_on(tmp_path, line, code):
    path = str(tmp_path / "ctl.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, METHODS)
        stream = await trio.open_unix_socket(path)
        async with stream:
            rep = await exchange(stream, line)
            assert rep["jsonrpc"] == "2.0" and "result" not in rep
            assert rep["error"]["code"] == code, rep
            assert rep["error"]["message"]
            # The same connection still answers...
            rep = await exchange(stream, b'{"jsonrpc": "2.0", "id": 7, "method": "echo", '
                                          b'"params": {"a": 1}}')
            assert rep == {"jsonrpc": "2.0", "id": 7, "result": {"a": 1}}
        # ... and so does a new one (the CLI's blocking client, in a thread).
        assert await trio.to_thread.run_sync(call, path, "echo", {"b": 2}) == {"b": 2}
        nursery.cancel_scope.cancel()


async def test_an_error_reply_carries_the_request_id_and_the_reason(tmp_path):
    path = str(tmp_path / "ctl.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, METHODS)
        stream = await trio.open_unix_socket(path)
        async with stream:
            rep = await exchange(stream, b'{"jsonrpc": "2.0", "id": "r1", "method": "rescan"}')
            assert rep["id"] == "r1"
            assert "ctrl-loss-tmo expired" in rep["error"]["message"]
            # An id that JSON-RPC does not allow (an object) is answered with id null.
            rep = await exchange(stream, b'{"id": {"x": 1}, "method": "nope"}')
            assert rep["id"] is None and rep["error"]["code"] == -32601
        with pytest.raises(ControlError, match="ctrl-loss-tmo expired"):
            await trio.to_thread.run_sync(call, path, "rescan")
        nursery.cancel_scope.cancel()
