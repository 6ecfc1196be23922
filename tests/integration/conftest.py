"""The `nvme_target` fixture: one NVMe/TCP target to run the initiator's tests against.

Parametrised by target kind, so the same conformance and I/O tests run against every target
we have: "kernel" (nvmet in QEMU, session-scoped) and, where available, "embedded" (blockfs's
own target). Each param yields a `TargetInfo`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest


@dataclasses.dataclass
class TargetInfo:
    kind: str
    host: str
    port: int
    nqn: str
    namespaces: dict          # nsid -> (num_blocks, block_size)
    connections: Callable[[], int]
    wait_connections: Callable[[int, float], int]


def _kernel(kt) -> TargetInfo:
    ns = {}
    for n in kt.namespaces:
        ns[n["nsid"]] = (n["bytes"] // n["block_size"], n["block_size"])
    return TargetInfo("kernel", kt.host, kt.port, kt.nqn, ns, kt.connections,
                      lambda expected, timeout=10.0: kt.wait_connections(expected, timeout))


@pytest.fixture(scope="session")
def embedded_target_session():
    """blockfs's own target in a subprocess, same namespaces as the kernel target."""
    from target.testing import start_embedded_target
    with start_embedded_target(ns=("64M", "32M:512")) as et:
        yield et


def _embedded(et) -> TargetInfo:
    ns = {n["nsid"]: (n["bytes"] // n["block_size"], n["block_size"]) for n in et.namespaces}
    return TargetInfo("embedded", et.host, et.port, et.nqn, ns, et.connections,
                      lambda expected, timeout=10.0: et.wait_connections(expected, timeout))


TARGET_KINDS = ["kernel", "embedded"]


@pytest.fixture(params=TARGET_KINDS)
def nvme_target(request) -> TargetInfo:
    if request.param == "kernel":
        return _kernel(request.getfixturevalue("kernel_target"))
    return _embedded(request.getfixturevalue("embedded_target_session"))
