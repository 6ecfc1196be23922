"""Keep-alive timer (nvmet_keep_alive_timer / nvmf_ctrlr_keep_alive_poll) and asynchronous events
(held AERs completed with namespace notices; changed namespace list; masking until read)."""

import pytest
import trio

from initiator import _structs as st
from initiator._pdu import sqe
from initiator._spec import AdminOpcode, FeatureId, LogPage
from rawclient import NQN, RawClient, io_client
from target.control import acall

pytestmark = pytest.mark.trio


async def test_keep_alive_timeout_tears_down_controller(target):
    with trio.fail_after(10):
        c = await RawClient.open(target.port)
        await c.bring_up(NQN, kato=300)
        io = await io_client(target.port, NQN, c.cntlid, 1)
        t0 = trio.current_time()
        assert await c.expect_eof(timeout=3)
        assert await io.expect_eof(timeout=1)
        elapsed = trio.current_time() - t0
        assert 0.2 <= elapsed <= 1.5, elapsed
        assert target.stats()["keep_alive_expiries"] == 1
        assert not target.controllers()


async def test_keep_alive_keeps_controller(target):
    with trio.fail_after(10):
        c = await RawClient.open(target.port)
        await c.bring_up(NQN, kato=300)
        for _ in range(10):                      # 1 s, about three KATOs
            await trio.sleep(0.1)
            assert (await c.keep_alive()).status == 0
        assert (await c.identify(1)).status == 0
        assert target.stats()["keep_alive_expiries"] == 0
        # Other traffic does not count as a keep-alive (no TBKAS): stop and be dropped.
        t0 = trio.current_time()
        while trio.current_time() - t0 < 0.25:
            assert (await c.identify(1)).status == 0
        assert await c.expect_eof(timeout=2)


async def test_kato_zero_disables_timer(target):
    with trio.fail_after(10):
        c = await RawClient.open(target.port)
        await c.bring_up(NQN, kato=0)
        await trio.sleep(0.5)
        assert (await c.identify(1)).status == 0
        # Set Features KATO arms it.
        assert (await c.set_features(FeatureId.KEEP_ALIVE_TIMER, 200)).status == 0
        assert await c.expect_eof(timeout=2)


async def _aer(c):
    return await c.send_cmd(sqe(AdminOpcode.ASYNC_EVENT_REQUEST))


@pytest.mark.parametrize("change", ["resize", "add", "remove"])
async def test_ns_change_completes_held_aer(target, change):
    with trio.fail_after(10):
        c = await RawClient.open(target.port)
        await c.bring_up(NQN)
        cid = await _aer(c)
        with trio.move_on_after(0.2):
            await c.wait(cid)
            pytest.fail("AER completed with nothing to report")
        ctl = target.control_path
        if change == "resize":
            await acall(ctl, "resize_ns", nsid=1, size="32M")
            nsid = 1
        elif change == "add":
            nsid = (await acall(ctl, "add_ns", spec="ram:4M"))["nsid"]
            assert nsid == 3
        else:
            await acall(ctl, "remove_ns", nsid=2)
            nsid = 2
        r = await c.wait(cid)
        assert r.status == 0
        assert st.parse_aen_dw0(r.dw0) == (2, 0x00, 0x04)
        log = await c.get_log_page(LogPage.CHANGED_NS_LIST, 4096)
        assert st.parse_changed_ns_list(log.data) == [nsid]
        ids = st.parse_ns_list((await c.identify(2)).data)
        if change == "resize":
            ns = st.IdentifyNamespace.from_bytes((await c.identify(0, 1)).data)
            assert ns.nsze == 32 * 2048
        elif change == "add":
            assert ids == [1, 2, 3]
        else:
            assert ids == [1]
        # The log was read: it is empty now.
        assert st.parse_changed_ns_list((await c.get_log_page(4, 4096)).data) == []
        await c.aclose()


async def test_second_change_masked_until_log_read(target):
    with trio.fail_after(10):
        ctl = target.control_path
        c = await RawClient.open(target.port)
        await c.bring_up(NQN)
        a1 = await _aer(c)
        a2 = await _aer(c)
        await acall(ctl, "resize_ns", nsid=1, size="20M")
        r = await c.wait(a1)
        assert st.parse_aen_dw0(r.dw0) == (2, 0, 4)
        # Second change: masked, the second AER stays held...
        await acall(ctl, "resize_ns", nsid=2, size="4M")
        with trio.move_on_after(0.3):
            await c.wait(a2)
            pytest.fail("second notice was not masked")
        # ...but the list accumulates both.
        log = await c.get_log_page(4, 4096, rae=True)     # RAE: read, keep the mask
        assert st.parse_changed_ns_list(log.data) == [1, 2]
        await acall(ctl, "resize_ns", nsid=1, size="24M")
        with trio.move_on_after(0.3):
            await c.wait(a2)
            pytest.fail("RAE read unmasked the notice")
        # Read without RAE: unmasked; the next change completes the held AER.
        log = await c.get_log_page(4, 4096)
        assert st.parse_changed_ns_list(log.data) == [1]
        await acall(ctl, "resize_ns", nsid=2, size="8M")
        r = await c.wait(a2)
        assert st.parse_aen_dw0(r.dw0) == (2, 0, 4)
        await c.aclose()


async def test_event_without_aer_is_queued(target):
    with trio.fail_after(10):
        c = await RawClient.open(target.port)
        await c.bring_up(NQN)
        await acall(target.control_path, "resize_ns", nsid=1, size="20M")
        await trio.sleep(0.05)
        r = await c.wait(await _aer(c))
        assert st.parse_aen_dw0(r.dw0) == (2, 0, 4)
        await c.aclose()


async def test_aec_disables_ns_notice_and_aer_limit(target):
    with trio.fail_after(10):
        c = await RawClient.open(target.port)
        await c.bring_up(NQN)
        assert (await c.set_features(FeatureId.ASYNC_EVENT_CONFIG, 0)).status == 0
        cids = [await _aer(c) for _ in range(4)]
        r = await c.wait(await _aer(c))                 # fifth: AERL is 3 (0's based)
        assert (r.sct, r.sc) == (1, 0x05)
        await acall(target.control_path, "resize_ns", nsid=1, size="20M")
        with trio.move_on_after(0.3):
            await c.wait(cids[0])
            pytest.fail("notice sent although AEC disabled it")
        assert st.parse_changed_ns_list((await c.get_log_page(4, 4096)).data) == [1]
        await c.aclose()


async def test_changed_list_overflow(target):
    with trio.fail_after(30):
        c = await RawClient.open(target.port)
        await c.bring_up(NQN)
        ctrl = target.controllers()[0]
        for nsid in range(1, 1100):
            ctrl.ns_changed(nsid)
        assert st.parse_changed_ns_list((await c.get_log_page(4, 4096)).data) is None
        assert st.parse_changed_ns_list((await c.get_log_page(4, 4096)).data) == []
        await c.aclose()
