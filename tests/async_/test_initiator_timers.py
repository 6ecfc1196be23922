"""The initiator's timers on trio's MockClock (issue 4): no sockets, fake queues and controllers.

- Controller keep-alive (kernel nvme_keep_alive_work): every KATO/2, KATO/4 with TBKAS; with TBKAS
  a tick that saw completions sends nothing; a Keep Alive unanswered within its timeout (or
  failed) marks the controller lost, so a silent target is noticed within KATO.
- Controller command timeouts (SPDK action_on_timeout abort, then reset): an overdue command is
  aborted after its timeout (never before), the controller is reset if it is still outstanding
  one timeout later; AERs and Keep Alive are exempt; a late completion after the abort is fine.
- ReconnectPolicy validation; Session reconnect backoff (every reconnect_delay), ctrl-loss-tmo
  (FAILED, callers get ControllerUnavailable), fast-io-fail-tmo (callers fail, reconnecting goes
  on), I/O resubmission across a reconnect, bounded retries of retryable statuses with the
  Command Retry Delay (CRD selects CRDT1-3, Base 4.2.3 / kernel nvme_retry_req).

Every test runs on `autojump_clock` (MockClock, autojump_threshold=0): time only moves when all
tasks are blocked, so the times asserted are exact.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import trio

from initiator._errors import (
    CommandTimeout, ConnectionLost, ConnectTimeout, DigestError, NvmeStatusError,
)
from initiator._spec import AdminOpcode, IoOpcode
from initiator.controller import (
    CTRATT_TBKAS, TIMEOUT_TICK, Controller, ControllerOptions,
)
from initiator.session import (
    MAX_RETRIES, ControllerUnavailable, CtrlState, ReconnectPolicy, Session,
)

HOSTID = "00000000-0000-4000-8000-00000000b10c"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:" + HOSTID
HANG = object()


class Delay:
    """An answer that comes `seconds` after submission."""

    def __init__(self, seconds: float, value=0):
        self.seconds = seconds
        self.value = value


def default_answer(q, opc, cdw10):
    if opc == AdminOpcode.ABORT:
        return 1                      # DW0 bit 0 set: not aborted (what nvmet/our target say)
    if opc == AdminOpcode.ASYNC_EVENT_REQUEST:
        return HANG
    return 0


class FakeQueue:
    """What the controller's timers use of transport.Queue: submit(), `completions`, the coarse
    command ages (`epoch`, `submit_epoch`, `aborted`, `overdue()`, as transport.Queue keeps
    them), `closed` and close(). `answer(q, opc, cdw10)` -> DW0, an exception, Delay or HANG."""

    def __init__(self, qid: int, answer=default_answer, depth: int = 32):
        self.qid = qid
        self.answer = answer
        self.epoch = 0
        self.submit_epoch = [0] * depth
        self.aborted = [False] * depth
        self._opcode = [0] * depth
        self._free = list(range(depth - 1, -1, -1))
        self._pending: dict[int, list] = {}
        self._closed = None
        self.completions = 0
        self.sent: list[tuple[float, int, int, int]] = []      # (time, opcode, cid, cdw10)

    @property
    def closed(self):
        return self._closed

    def overdue(self, max_age: int) -> list[tuple[int, int]]:
        limit = self.epoch - max_age
        return [(c, self._opcode[c]) for c in sorted(self._pending) if self.submit_epoch[c] < limit]

    def times(self, opc: int) -> list[float]:
        return [t for t, o, _c, _d in self.sent if o == opc]

    async def submit(self, opc, nsid=0, cdw10=0, cdw11=0, *_a, **_kw):
        if self._closed is not None:
            raise self._closed
        cid = self._free.pop()
        self._opcode[cid] = opc
        self.submit_epoch[cid] = self.epoch
        self.aborted[cid] = False
        self.sent.append((trio.current_time(), opc, cid, cdw10))
        slot = self._pending[cid] = [trio.Event(), None]
        a = self.answer(self, opc, cdw10)
        if isinstance(a, Delay):
            await trio.sleep(a.seconds)
            a = a.value
        if a is not HANG and cid in self._pending:
            self.complete(cid, a)
        await slot[0].wait()
        if isinstance(slot[1], BaseException):
            raise slot[1]
        return slot[1], 0

    def complete(self, cid: int, result=0) -> None:
        slot = self._pending.pop(cid)
        self._free.append(cid)
        self.completions += 1
        slot[1] = result
        slot[0].set()

    def close(self, reason: str = "closed") -> None:
        if self._closed is not None:
            return
        self._closed = ConnectionLost(reason)
        for cid, slot in self._pending.items():
            self._free.append(cid)
            slot[1] = self._closed
            slot[0].set()
        self._pending.clear()


def opts(**kw) -> ControllerOptions:
    return ControllerOptions(hostid=HOSTID, hostnqn=HOSTNQN, **kw)


def make_ctrl(nursery, *, kato: float = 10.0, tbkas: bool = False, admin_answer=default_answer,
              io_answer=default_answer, **kw) -> Controller:
    """A Controller as bring-up leaves it, on fake queues (no socket, no bring-up)."""
    c = Controller("127.0.0.1", 4420, "nqn.test", opts(keep_alive_tmo=kato, **kw))
    c.ctrl = SimpleNamespace(ctratt=CTRATT_TBKAS if tbkas else 0, kas=1, crdt1=0, crdt2=0,
                             crdt3=0)
    c.admin = FakeQueue(0, admin_answer)
    c.io_queues = [FakeQueue(1, io_answer)]
    c._nursery = nursery
    return c


def rel(times, t0) -> list[float]:
    return [round(t - t0, 6) for t in times]


# -- keep-alive ----------------------------------------------------------------------------------

async def test_keep_alive_every_half_kato(autojump_clock):
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        c = make_ctrl(n, kato=10.0)
        assert c.keep_alive_interval == 5.0
        n.start_soon(c._keep_alive_loop)
        await trio.sleep(31)
        n.cancel_scope.cancel()
    assert rel(c.admin.times(AdminOpcode.KEEP_ALIVE), t0) == [5, 10, 15, 20, 25, 30]
    assert c.keep_alives_sent == 6 and c.keep_alives_skipped == 0 and not c.lost


async def test_keep_alive_every_quarter_kato_with_tbkas(autojump_clock):
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        c = make_ctrl(n, kato=10.0, tbkas=True)
        assert c.keep_alive_interval == 2.5
        n.start_soon(c._keep_alive_loop)
        await trio.sleep(11)
        n.cancel_scope.cancel()
    # No other traffic: the keep-alive's own completion is not counted as traffic.
    assert rel(c.admin.times(AdminOpcode.KEEP_ALIVE), t0) == [2.5, 5, 7.5, 10]
    assert c.keep_alives_skipped == 0


async def _traffic(q: FakeQueue, start: float, until: float, every: float = 1.0):
    """Completions on `q` at start, start + every, ... < until."""
    await trio.sleep_until(start)
    while trio.current_time() < until:
        q.completions += 1
        await trio.sleep(every)


async def test_tbkas_skips_keep_alive_while_traffic_is_seen(autojump_clock):
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        c = make_ctrl(n, kato=10.0, tbkas=True)
        n.start_soon(c._keep_alive_loop)
        n.start_soon(_traffic, c.io_queues[0], t0 + 0.5, t0 + 10)     # at 0.5, 1.5, ... 9.5
        await trio.sleep(16)
        n.cancel_scope.cancel()
    # Ticks at 2.5, 5, 7.5, 10 each saw completions: skipped. 12.5 saw none: Keep Alive.
    assert c.keep_alives_skipped == 4
    assert rel(c.admin.times(AdminOpcode.KEEP_ALIVE), t0) == [12.5, 15]


async def test_traffic_does_not_replace_keep_alive_without_tbkas(autojump_clock):
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        c = make_ctrl(n, kato=10.0, tbkas=False)
        n.start_soon(c._keep_alive_loop)
        n.start_soon(_traffic, c.io_queues[0], t0 + 0.5, t0 + 12)
        await trio.sleep(11)
        n.cancel_scope.cancel()
    assert rel(c.admin.times(AdminOpcode.KEEP_ALIVE), t0) == [5, 10]
    assert c.keep_alives_skipped == 0


def test_keep_alive_timeout_is_half_kato_but_at_least_half_a_second():
    c = Controller("h", 1, "n", opts(keep_alive_tmo=10.0))
    assert c.keep_alive_timeout == 5.0
    c = Controller("h", 1, "n", opts(keep_alive_tmo=0.4))
    assert c.keep_alive_timeout == 0.5


async def test_unanswered_keep_alive_marks_the_controller_lost(autojump_clock):
    t0 = trio.current_time()

    def admin(q, opc, cdw10):
        return HANG if opc == AdminOpcode.KEEP_ALIVE else default_answer(q, opc, cdw10)
    async with trio.open_nursery() as n:
        c = make_ctrl(n, kato=10.0, admin_answer=admin)
        n.start_soon(c._keep_alive_loop)
        reason = await c.wait_lost()
        lost_at = trio.current_time() - t0
        n.cancel_scope.cancel()
    assert lost_at == 10.0                   # sent at KATO/2, given KATO/2
    assert isinstance(reason, CommandTimeout) and "keep-alive" in str(reason)
    assert c.lost and "keep-alive" in c.last_error
    assert c.admin.closed is not None and c.io_queues[0].closed is not None   # torn down


@pytest.mark.parametrize("tbkas", [False, True])
@pytest.mark.parametrize("silent_from", [0.1, 4.9, 5.01, 7.3, 9.99, 12.6])
async def test_silent_target_noticed_within_kato(autojump_clock, silent_from, tbkas):
    """The target answers until `silent_from`, then nothing: lost at most KATO later, with
    traffic (TBKAS) or without."""
    t0 = trio.current_time()
    silent_at = t0 + silent_from

    def answer(q, opc, cdw10):
        if trio.current_time() >= silent_at:
            return HANG
        return default_answer(q, opc, cdw10)
    async with trio.open_nursery() as n:
        c = make_ctrl(n, kato=10.0, tbkas=tbkas, admin_answer=answer, io_answer=answer)
        n.start_soon(c._keep_alive_loop)

        async def io_traffic():
            with contextlib.suppress(ConnectionLost):
                while True:
                    await c.io_queues[0].submit(IoOpcode.READ)
                    await trio.sleep(0.3)
        n.start_soon(io_traffic)
        await c.wait_lost()
        n.cancel_scope.cancel()
    detected = trio.current_time() - silent_at
    assert 0 < detected <= 10.0, detected


async def test_keep_alive_error_status_marks_the_controller_lost(autojump_clock):
    def admin(q, opc, cdw10):
        if opc == AdminOpcode.KEEP_ALIVE:
            return NvmeStatusError(0, 0x0C)    # e.g. Command Sequence Error: controller gone
        return default_answer(q, opc, cdw10)
    async with trio.open_nursery() as n:
        c = make_ctrl(n, kato=2.0, admin_answer=admin)
        n.start_soon(c._keep_alive_loop)
        reason = await c.wait_lost()
        n.cancel_scope.cancel()
    assert isinstance(reason, ConnectionLost) and "keep-alive failed" in str(reason)


async def test_keep_alive_loop_ends_quietly_on_a_dead_queue(autojump_clock):
    async with trio.open_nursery() as n:
        c = make_ctrl(n, kato=2.0)
        c.admin.close("socket gone")
        with trio.fail_after(5):
            await c._keep_alive_loop()       # returns: the queue watcher reports the loss
    assert not c.lost


# -- command timeouts ----------------------------------------------------------------------------

async def _timeout_run(*, io_timeout, offset, complete_after=None, admin_timeout=60.0,
                       horizon=None):
    """Submit one read `offset` s after the checker starts; the target never answers it (or
    after `complete_after` s). -> (controller, submit time, abort times, lost time or None,
    the read's outcome)."""
    io_answer = HANG if complete_after is None else Delay(complete_after)
    lost_at = None
    async with trio.open_nursery() as n:
        c = make_ctrl(n, kato=0, io_timeout=io_timeout, admin_timeout=admin_timeout,
                      io_answer=lambda q, opc, d: io_answer)
        n.start_soon(c._timeout_checker)
        await trio.sleep(offset)
        t_submit = trio.current_time()
        result = []

        async def read():
            try:
                result.append(await c.io_queues[0].submit(IoOpcode.READ, 1))
            except ConnectionLost as e:
                result.append(e)
        n.start_soon(read)
        with trio.move_on_after(horizon or 4 * io_timeout + 2):
            await c.wait_lost()
            lost_at = trio.current_time()
        n.cancel_scope.cancel()
    return c, t_submit, c.admin.times(AdminOpcode.ABORT), lost_at, result


@pytest.mark.parametrize("io_timeout", [0.5, 1.0, 2.0, 1.2, 0.7, 3.3])
@pytest.mark.parametrize("offset", [0.01, 0.25, 0.49])
async def test_overdue_command_is_aborted_then_the_controller_reset(autojump_clock, io_timeout,
                                                                    offset):
    c, t_submit, aborts, lost_at, result = await _timeout_run(io_timeout=io_timeout,
                                                             offset=offset)
    assert len(aborts) == 1 and c.timeouts == 1
    waited = aborts[0] - t_submit
    # Never before the timeout, at most one checker tick (plus rounding) after it.
    assert io_timeout <= waited <= io_timeout + 2 * TIMEOUT_TICK, waited
    # The Abort names the command: CDW10 = SQID | CID << 16.
    (_t, _o, _cid, cdw10), = [s for s in c.admin.sent if s[1] == AdminOpcode.ABORT]
    (_t, _o, read_cid, _d), = c.io_queues[0].sent
    assert cdw10 == 1 | read_cid << 16
    # Still outstanding one timeout after the abort: reset (lost), the read fails over.
    assert lost_at is not None
    assert 2 * io_timeout <= lost_at - t_submit <= 2 * io_timeout + 3 * TIMEOUT_TICK
    assert isinstance(c._lost_reason, CommandTimeout) and "resetting" in c.last_error
    assert isinstance(result[0], ConnectionLost)


async def test_late_completion_after_abort_does_not_reset(autojump_clock):
    c, t_submit, aborts, lost_at, result = await _timeout_run(io_timeout=1.0, offset=0.1,
                                                             complete_after=1.7, horizon=6)
    assert len(aborts) == 1
    assert lost_at is None and not c.lost
    assert result == [(0, 0)]


async def test_completion_before_the_timeout_is_never_aborted(autojump_clock):
    c, t_submit, aborts, lost_at, result = await _timeout_run(io_timeout=1.0, offset=0.1,
                                                             complete_after=0.95, horizon=5)
    assert aborts == [] and c.timeouts == 0 and lost_at is None and result == [(0, 0)]


async def test_zero_io_timeout_disables_the_checker(autojump_clock):
    c, t_submit, aborts, lost_at, result = await _timeout_run(io_timeout=0, offset=0.1,
                                                             horizon=100)
    assert aborts == [] and lost_at is None and not c.lost


async def test_aer_and_keep_alive_are_exempt_admin_commands_are_not(autojump_clock):
    t0 = trio.current_time()

    def admin(q, opc, cdw10):
        if opc in (AdminOpcode.ASYNC_EVENT_REQUEST, AdminOpcode.KEEP_ALIVE,
                   AdminOpcode.GET_LOG_PAGE):
            return HANG
        return default_answer(q, opc, cdw10)
    async with trio.open_nursery() as n:
        c = make_ctrl(n, kato=0, admin_timeout=2.0, io_timeout=1.0, admin_answer=admin)
        n.start_soon(c._timeout_checker)
        async def submit(opc):
            with contextlib.suppress(ConnectionLost):
                await c.admin.submit(opc)
        for opc in (AdminOpcode.ASYNC_EVENT_REQUEST, AdminOpcode.ASYNC_EVENT_REQUEST,
                    AdminOpcode.KEEP_ALIVE):
            n.start_soon(submit, opc)
        await trio.sleep(10)
        assert c.admin.times(AdminOpcode.ABORT) == [] and not c.lost
        n.start_soon(submit, AdminOpcode.GET_LOG_PAGE)                 # admin_timeout applies
        await c.wait_lost()
        lost_at = trio.current_time() - t0
        n.cancel_scope.cancel()
    aborts = rel(c.admin.times(AdminOpcode.ABORT), t0)
    assert len(aborts) == 1 and 12.0 <= aborts[0] <= 12.0 + 2 * TIMEOUT_TICK
    assert 14.0 <= lost_at <= 14.0 + 2 * TIMEOUT_TICK


# -- ReconnectPolicy -----------------------------------------------------------------------------

def test_reconnect_policy_validation():
    ReconnectPolicy()                                                # kernel defaults
    ReconnectPolicy(reconnect_delay=1, ctrl_loss_tmo=-1)             # forever
    ReconnectPolicy(reconnect_delay=2, ctrl_loss_tmo=2)
    ReconnectPolicy(reconnect_delay=2, ctrl_loss_tmo=5, fast_io_fail_tmo=0)
    with pytest.raises(ValueError):
        ReconnectPolicy(reconnect_delay=0)
    with pytest.raises(ValueError):
        ReconnectPolicy(reconnect_delay=-1)
    with pytest.raises(ValueError):
        ReconnectPolicy(reconnect_delay=5, ctrl_loss_tmo=4)
    with pytest.raises(ValueError):
        ReconnectPolicy(reconnect_delay=5, ctrl_loss_tmo=0)
    p = ReconnectPolicy()
    assert (p.reconnect_delay, p.ctrl_loss_tmo, p.fast_io_fail_tmo) == (10.0, 600.0, -1.0)


# -- Session with a fake connection --------------------------------------------------------------

class FakeSessionCtrl:
    """What Session uses of a live Controller."""

    def __init__(self, connector: "Connector"):
        self.connector = connector
        self.namespaces: dict = {}
        self.ns_descs: dict = {}
        self.io_queues = [None]
        self.on_async_event = None
        self.ctrl = SimpleNamespace(crdt1=0, crdt2=0, crdt3=0)
        self._lost = trio.Event()
        self._lost_reason = None
        self.reads: list[float] = []
        self.read_args: list[tuple[int, int, int]] = []      # (slba, nlb, bytes)
        self.max_transfer = connector.max_transfer
        self.read_answer = None           # None: complete at once; or a callable -> exception

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    async def wait_lost(self):
        await self._lost.wait()
        return self._lost_reason

    def lose(self, reason: str = "connection reset by peer") -> None:
        self._lost_reason = ConnectionLost(reason)
        self._lost.set()

    async def read(self, nsid, slba, nlb, buf, qidx=0):
        self.reads.append(trio.current_time())
        self.read_args.append((slba, nlb, len(buf)))
        if self.read_answer is not None:
            exc = self.read_answer(self)
            if exc is HANG:
                await self._lost.wait()          # in flight until the connection dies
                raise ConnectionLost("queue closed")
            if exc is not None:
                raise exc

    def statistics(self) -> dict:
        return {}


class Connector:
    """Session._open stand-in. `script`: one entry per attempt, "ok", "fail" (connection
    refused at once) or ("hang", seconds) (a connect that times out); "fail" after the end."""

    def __init__(self, *script):
        self.script = list(script)
        self.attempts: list[float] = []
        self.ctrls: list[FakeSessionCtrl] = []
        self.on_live = None
        self.max_transfer = 1 << 20          # of the controllers made from now on

    @contextlib.asynccontextmanager
    async def __call__(self, host, port, subnqn, opts):
        self.attempts.append(trio.current_time())
        action = self.script.pop(0) if self.script else "fail"
        if action == "fail":
            raise ConnectionLost(f"connect to {host}:{port}: ECONNREFUSED")
        if isinstance(action, tuple) and action[0] == "hang":
            await trio.sleep(action[1])
            raise ConnectTimeout(f"no ICResp from {host}:{port} within {action[1]:g} s")
        c = FakeSessionCtrl(self)
        self.ctrls.append(c)
        yield c


async def start_session(nursery, connector, *, delay=1.0, loss=-1.0, fast=-1.0, kato=5.0):
    s = Session("127.0.0.1", 4420, "nqn.test", opts(keep_alive_tmo=kato),
                ReconnectPolicy(reconnect_delay=delay, ctrl_loss_tmo=loss,
                                fast_io_fail_tmo=fast), rescan_interval=0)
    s._open = connector
    await s.start(nursery)
    return s


def record_states(s) -> dict:
    """state -> the time the session last entered it."""
    seen = {}
    s.on_state = lambda state, reason: seen.__setitem__(state, trio.current_time())
    return seen


async def wait_state(s, state, timeout=1000):
    with trio.fail_after(timeout):
        while s.state is not state:
            await trio.sleep(0.001)


async def test_first_connect_failure_propagates_at_once(autojump_clock):
    conn = Connector("fail")
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        with pytest.raises(ConnectionLost, match="ECONNREFUSED"):
            await start_session(n, conn)
    assert trio.current_time() == t0 and len(conn.attempts) == 1


async def test_reconnect_every_reconnect_delay_until_it_works(autojump_clock):
    conn = Connector("ok", "fail", "fail", "fail", "fail", "ok")
    async with trio.open_nursery() as n:
        s = await start_session(n, conn, delay=2.0)
        states = []
        s.on_state = lambda st, reason: states.append((st, trio.current_time()))
        await trio.sleep(3)
        t_loss = trio.current_time()
        conn.ctrls[0].lose()
        await wait_state(s, CtrlState.RESETTING)
        await wait_state(s, CtrlState.LIVE)
        assert s.reconnects == 1 and s.ctrl is conn.ctrls[1]
        await s.aclose()
    # Kernel: the first attempt one reconnect_delay after the loss, then every delay.
    assert rel(conn.attempts[1:], t_loss) == [2, 4, 6, 8, 10]
    assert [st for st, _ in states] == [CtrlState.RESETTING, CtrlState.LIVE, CtrlState.DELETING]
    assert states[0][1] == t_loss


async def test_ctrl_loss_tmo_fails_the_controller_and_waiting_io(autojump_clock):
    conn = Connector("ok")
    async with trio.open_nursery() as n:
        s = await start_session(n, conn, delay=1.0, loss=3.0)
        states = record_states(s)
        c = conn.ctrls[0]
        c.read_answer = lambda c: HANG
        outcome = []

        async def reader():
            try:
                await s.read(1, 0, 1, bytearray(512))
            except ControllerUnavailable as e:
                outcome.append((trio.current_time(), e))
        n.start_soon(reader)
        await trio.sleep(1)
        t_loss = trio.current_time()
        c.lose()
        await wait_state(s, CtrlState.FAILED)
        failed_at = states[CtrlState.FAILED] - t_loss
        await trio.sleep(100)
        await s.aclose()
    assert failed_at == 3.0
    assert rel(conn.attempts[1:], t_loss) == [1, 2, 3]          # ctrl_loss_tmo / delay tries
    assert len(outcome) == 1 and outcome[0][0] - t_loss == 3.0
    assert "ctrl-loss-tmo" in str(outcome[0][1])
    with pytest.raises(ControllerUnavailable):
        await s.read(1, 0, 1, bytearray(512))


async def test_ctrl_loss_tmo_not_a_multiple_of_the_delay(autojump_clock):
    conn = Connector("ok")
    async with trio.open_nursery() as n:
        s = await start_session(n, conn, delay=1.0, loss=2.5)
        states = record_states(s)
        t_loss = trio.current_time()
        conn.ctrls[0].lose()
        await wait_state(s, CtrlState.FAILED)
        assert states[CtrlState.FAILED] - t_loss == 2.5
        await s.aclose()
    assert all(a - t_loss <= 2.5 for a in conn.attempts[1:])
    assert rel(conn.attempts[1:3], t_loss) == [1, 2]


async def test_ctrl_loss_tmo_forever_keeps_trying(autojump_clock):
    conn = Connector("ok")
    async with trio.open_nursery() as n:
        s = await start_session(n, conn, delay=10.0, loss=-1)
        conn.ctrls[0].lose()
        await trio.sleep(10005)
        assert s.state is CtrlState.RESETTING
        assert len(conn.attempts) == 1 + 1000
        conn.script.append("ok")
        await wait_state(s, CtrlState.LIVE)
        await s.aclose()


async def test_a_new_outage_gets_a_new_ctrl_loss_budget(autojump_clock):
    conn = Connector("ok", "fail", "ok", "fail", "fail")
    async with trio.open_nursery() as n:
        s = await start_session(n, conn, delay=1.0, loss=3.0)
        states = record_states(s)
        conn.ctrls[0].lose()
        await wait_state(s, CtrlState.RESETTING)
        await wait_state(s, CtrlState.LIVE)                  # after 2 attempts
        await trio.sleep(50)
        t_loss = trio.current_time()
        conn.ctrls[1].lose()
        await wait_state(s, CtrlState.FAILED)
        assert states[CtrlState.FAILED] - t_loss == 3.0
        await s.aclose()


async def test_fast_io_fail_fails_waiting_io_and_reconnecting_goes_on(autojump_clock):
    conn = Connector("ok", "fail", "fail", "fail", "ok")
    async with trio.open_nursery() as n:
        s = await start_session(n, conn, delay=1.0, loss=60.0, fast=1.5)
        c = conn.ctrls[0]
        c.read_answer = lambda c: HANG
        failed = []

        async def reader():
            try:
                await s.read(1, 0, 1, bytearray(512))
            except ControllerUnavailable as e:
                failed.append((trio.current_time(), e))
        n.start_soon(reader)
        await trio.sleep(1)
        t_loss = trio.current_time()
        c.lose()
        await trio.sleep(1.6)
        assert len(failed) == 1 and failed[0][0] - t_loss == 1.5
        assert "fast-io-fail" in str(failed[0][1])
        assert s.state is CtrlState.RESETTING
        with pytest.raises(ControllerUnavailable):                  # new I/O fails at once
            await s.read(1, 0, 1, bytearray(512))
        await wait_state(s, CtrlState.LIVE)
        await s.read(1, 0, 1, bytearray(512))                        # works again
        await s.aclose()
    # The fast-io-fail deadline does not move the reconnect schedule (kernel: its own timer).
    assert rel(conn.attempts[1:], t_loss) == [1, 2, 3, 4]


async def test_fast_io_fail_is_on_time_while_a_connect_attempt_hangs(autojump_clock):
    """A reconnect attempt that takes a whole connect timeout (a partitioned target) must not
    hold I/O past fast-io-fail-tmo (kernel nvme_failfast_work is a timer of its own)."""
    conn = Connector("ok", ("hang", 10.0), "ok")
    async with trio.open_nursery() as n:
        s = await start_session(n, conn, delay=1.0, loss=60.0, fast=1.5)
        c = conn.ctrls[0]
        c.read_answer = lambda c: HANG
        failed = []

        async def reader():
            try:
                await s.read(1, 0, 1, bytearray(512))
            except ControllerUnavailable:
                failed.append(trio.current_time())
        n.start_soon(reader)
        await trio.sleep(1)
        t_loss = trio.current_time()
        c.lose()
        with trio.fail_after(30):
            while not failed:
                await trio.sleep(0.01)
        assert failed[0] - t_loss == 1.5
        await wait_state(s, CtrlState.LIVE)
        await s.aclose()


async def test_io_in_flight_is_resubmitted_after_reconnect(autojump_clock):
    conn = Connector("ok", "fail", "ok")
    async with trio.open_nursery() as n:
        s = await start_session(n, conn, delay=1.0, loss=30.0)
        c = conn.ctrls[0]
        c.read_answer = lambda c: HANG
        done = []

        async def reader():
            await s.read(1, 0, 1, bytearray(512))
            done.append(trio.current_time())
        n.start_soon(reader)
        await trio.sleep(0.5)
        t_loss = trio.current_time()
        c.lose()
        await wait_state(s, CtrlState.RESETTING)
        await wait_state(s, CtrlState.LIVE)
        await trio.sleep(0.1)
        await s.aclose()
    assert len(c.reads) == 1 and len(conn.ctrls[1].reads) == 1
    assert done and done[0] - t_loss == 2.0                      # second attempt at +2 s


async def test_io_resubmitted_after_reconnect_fits_a_smaller_max_transfer(autojump_clock):
    """The controller behind the address came back with a smaller MDTS (a restarted target;
    the kernel re-reads it on every reset, nvme_init_ctrl_finish): a read sized for the old one
    that waited for the reconnect goes to the new one in pieces that fit, in order."""
    conn = Connector("ok", "ok")
    async with trio.open_nursery() as n:
        s = await start_session(n, conn, delay=1.0, loss=30.0)
        assert s.io_max_bytes == 1 << 20
        c = conn.ctrls[0]
        c.read_answer = lambda c: HANG
        done = []

        async def reader():
            await s.read(1, 8, 1024, bytearray(1024 * 512))
            done.append(trio.current_time())
        n.start_soon(reader)
        await trio.sleep(0.5)
        conn.max_transfer = 128 << 10
        c.lose()
        await wait_state(s, CtrlState.RESETTING)
        await wait_state(s, CtrlState.LIVE)
        await trio.sleep(0.1)
        assert done and s.io_max_bytes == 128 << 10
        assert conn.ctrls[1].read_args == [(8 + 256 * i, 256, 128 << 10) for i in range(4)]
        await s.read(1, 0, 512, bytearray(512 * 512))            # new I/O: split too
        assert conn.ctrls[1].read_args[4:] == [(0, 256, 128 << 10), (256, 256, 128 << 10)]
        await s.aclose()


async def test_transport_error_before_the_controller_notices(autojump_clock):
    """A queue dies but the controller is marked lost a little later: the command waits for
    the loss and is resubmitted on the next connection, the caller sees nothing."""
    conn = Connector("ok", "ok")
    async with trio.open_nursery() as n:
        s = await start_session(n, conn, delay=1.0, kato=5.0)
        c = conn.ctrls[0]
        c.read_answer = lambda c: ConnectionLost("queue 1 reset")

        async def notice_later():
            await trio.sleep(2)
            c.lose("keep-alive timed out")
        n.start_soon(notice_later)
        t0 = trio.current_time()
        await s.read(1, 0, 1, bytearray(512))
        assert trio.current_time() - t0 == 3.0                       # loss + reconnect delay
        assert len(conn.ctrls[1].reads) == 1
        await s.aclose()


async def test_aclose_while_resetting_stops_reconnecting(autojump_clock):
    conn = Connector("ok")
    async with trio.open_nursery() as n:
        s = await start_session(n, conn, delay=5.0)
        conn.ctrls[0].lose()
        await trio.sleep(12)
        t0 = trio.current_time()
        await s.aclose()
        assert trio.current_time() == t0
        attempts = len(conn.attempts)
        await trio.sleep(100)
    assert len(conn.attempts) == attempts
    assert s.state is CtrlState.DELETING


# -- retries of failed commands ------------------------------------------------------------------

def _status(sct, sc, dnr=False, crd=0):
    return NvmeStatusError(sct, sc, dnr, crd=crd, opcode=IoOpcode.READ)


@pytest.mark.parametrize("err", [
    _status(0, 0x22),                 # Transient Transport Error
    _status(0, 0x21),                 # Command Interrupted
    _status(0, 0x07),                 # Aborted by Request (our own abort after a timeout)
    _status(3, 0x00),                 # path error
    DigestError("data digest mismatch"),
])
async def test_retryable_errors_are_retried_and_bounded(autojump_clock, err):
    conn = Connector("ok")
    async with trio.open_nursery() as n:
        s = await start_session(n, conn)
        c = conn.ctrls[0]
        errors = [err, err]
        c.read_answer = lambda c: errors.pop() if errors else None
        await s.read(1, 0, 1, bytearray(512))
        assert len(c.reads) == 3
        c.read_answer = lambda c: err                                  # forever
        with pytest.raises(type(err)):
            await s.read(1, 0, 1, bytearray(512))
        assert len(c.reads) == 3 + MAX_RETRIES + 1
        await s.aclose()


@pytest.mark.parametrize("err", [
    _status(0, 0x22, dnr=True),       # DNR: never again
    _status(2, 0x81),                 # Unrecovered Read Error
    _status(0, 0x80),                 # LBA Out of Range
])
async def test_non_retryable_errors_reach_the_caller_at_once(autojump_clock, err):
    conn = Connector("ok")
    async with trio.open_nursery() as n:
        s = await start_session(n, conn)
        c = conn.ctrls[0]
        c.read_answer = lambda c: err
        with pytest.raises(NvmeStatusError) as e:
            await s.read(1, 0, 1, bytearray(512))
        assert (e.value.sct, e.value.sc, e.value.dnr) == (err.sct, err.sc, err.dnr)
        assert len(c.reads) == 1
        await s.aclose()


@pytest.mark.parametrize("crd, delay", [(0, 0.0), (1, 0.3), (2, 1.2), (3, 5.0)])
async def test_command_retry_delay_comes_from_crdt(autojump_clock, crd, delay):
    """Base 4.2.3.2 / kernel nvme_retry_req: CRD 1-3 selects CRDT1-3 of Identify Controller,
    each in 100 ms units."""
    conn = Connector("ok")
    async with trio.open_nursery() as n:
        s = await start_session(n, conn)
        c = conn.ctrls[0]
        c.ctrl = SimpleNamespace(crdt1=3, crdt2=12, crdt3=50)
        errors = [_status(0, 0x22, crd=crd)]
        c.read_answer = lambda c: errors.pop() if errors else None
        await s.read(1, 0, 1, bytearray(512))
        assert len(c.reads) == 2
        assert c.reads[1] - c.reads[0] == pytest.approx(delay)
        await s.aclose()
