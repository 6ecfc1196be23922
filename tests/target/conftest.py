"""Fixtures for the embedded target tests: an in-process target on 127.0.0.1:0 with a control
socket, plus the raw test host in rawclient.py."""

import os
import shutil
import sys
import tempfile

import pytest
import trio

from target import SubsystemConfig, TargetConfig, serve_target

# Helpers next to these tests (rawclient.py) are imported by bare name.
sys.path.insert(0, os.path.dirname(__file__))

from rawclient import NQN  # noqa: E402


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="bt", dir="/tmp")    # short: unix socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_target(nursery, sockdir):
    async def make(namespaces=("ram:16M:512", "ram:8M:4096"), **kw):
        subs = kw.pop("subsystems", None) or [
            SubsystemConfig(nqn=NQN, namespaces=list(namespaces),
                            allow_hosts=kw.pop("allow_hosts", []))]
        cfg = TargetConfig(listen=["127.0.0.1:0"], subsystems=subs,
                           control=os.path.join(sockdir, f"ctl{len(os.listdir(sockdir))}.sock"),
                           **kw)
        return await nursery.start(serve_target, cfg)
    return make


@pytest.fixture
async def target(make_target):
    with trio.fail_after(5):
        return await make_target()
