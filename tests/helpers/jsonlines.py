"""One request line out, one reply line back, on a newline-delimited JSON stream (the control
sockets of the blockfs daemon and of the embedded target), for tests that send raw lines."""

from __future__ import annotations

import json


async def exchange(stream, line: bytes) -> dict:
    """Send `line` and a newline on a trio stream; the next reply line, parsed."""
    await stream.send_all(line + b"\n")
    buf = b""
    while b"\n" not in buf:
        data = await stream.receive_some(65536)
        assert data, "the peer closed the connection"
        buf += data
    return json.loads(buf.split(b"\n", 1)[0])
