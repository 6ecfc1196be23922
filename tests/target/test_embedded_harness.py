"""target.testing.EmbeddedTarget: the KernelTarget-shaped handle on a `python3 -m target`
subprocess; port states (kill_port / link_down) observed on the wire."""

import pytest
import trio

from initiator import _structs as st
from rawclient import Closed, RawClient
from target.testing import EmbeddedTarget

pytestmark = pytest.mark.trio


@pytest.fixture
def et():
    with EmbeddedTarget.start(("64M", "32M:512")) as t:
        yield t


async def test_namespaces_and_changes(et):
    assert et.namespaces == [{"nsid": 1, "bytes": 64 << 20, "block_size": 4096},
                             {"nsid": 2, "bytes": 32 << 20, "block_size": 512}]
    with trio.fail_after(10):
        c = await RawClient.open(et.port)
        await c.bring_up(et.nqn)
        assert await trio.to_thread.run_sync(et.connections) == 1
        await trio.to_thread.run_sync(et.resize, 1, "128M")
        await trio.to_thread.run_sync(et.add_ns, 5, "1M", 512)
        await trio.to_thread.run_sync(et.remove_ns, 2)
        assert st.parse_ns_list((await c.identify(2)).data) == [1, 5]
        assert st.parse_changed_ns_list((await c.get_log_page(4, 4096)).data) == [1, 5, 2]
        await c.aclose()
        assert await trio.to_thread.run_sync(et.wait_connections, 0, 5) == 0


async def test_kill_and_restore_port(et):
    with trio.fail_after(10):
        c = await RawClient.open(et.port)
        await c.bring_up(et.nqn)
        await trio.to_thread.run_sync(et.kill_port)
        assert await c.expect_eof()
        with pytest.raises((Closed, OSError)):       # accepted, then reset (connect() may
            d = await RawClient.open(et.port)        # already see the reset)
            await d.icreq()
        await trio.to_thread.run_sync(et.restore_port)
        e = await RawClient.open(et.port)
        await e.bring_up(et.nqn)
        await e.aclose()


async def test_link_down_is_silent(et):
    with trio.fail_after(10):
        c = await RawClient.open(et.port)
        await c.bring_up(et.nqn, kato=200)
        await trio.to_thread.run_sync(et.link_down)
        cid = await c.send_cmd(bytearray(64))
        with trio.move_on_after(0.5):
            await c.wait(cid)
            pytest.fail("answered during a partition")
        d = await RawClient.open(et.port)
        with trio.move_on_after(0.3):
            await d.icreq()
            pytest.fail("new connection answered during a partition")
        await trio.to_thread.run_sync(et.link_up)
        assert (await d.icreq())[0] == 0
        # The silent admin queue's keep-alive deadline passed meanwhile: now it expires.
        assert await c.expect_eof(timeout=3)
