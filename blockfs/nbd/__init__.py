"""NBD export of bdevs: a sans-IO protocol core (`_protocol`) and its trio shell (`server`).

Entry points: ``port = await nursery.start(serve_nbd, registry, "127.0.0.1", 0)`` (TCP) and
``await nursery.start(serve_nbd_unix, registry, "/run/blockfs/nbd.sock")`` (a unix socket).

The shell (and with it trio and `bdev`) is imported on first use of `serve_nbd`/`NbdServer`,
so the protocol core can be used and tested on its own.
"""

from typing import Any

from ._protocol import (
    LocalProtocolError,
    NbdError,
    ProtocolError,
    RemoteProtocolError,
)

__all__ = [
    "serve_nbd",
    "serve_nbd_unix",
    "NbdServer",
    "NbdAddressError",
    "NbdError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
]


def __getattr__(name: str) -> Any:
    if name in ("serve_nbd", "serve_nbd_unix", "NbdServer", "NbdAddressError"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
