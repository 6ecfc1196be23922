"""initiator._batch.CallbackBatch: work deferred to the end of a batch of completion callbacks."""

from __future__ import annotations

from initiator._batch import CallbackBatch


def test_outside_a_batch_nothing_is_deferred():
    b = CallbackBatch()
    assert not b.defer(lambda: None) and b.deferred == []


def test_deferred_calls_run_in_order_at_the_outermost_end_only():
    b = CallbackBatch()
    seen = []
    b.begin()
    assert b.defer(lambda: seen.append(1))
    b.begin()                                   # nested (a batch run from a callback)
    assert b.defer(lambda: seen.append(2))
    b.end()
    assert seen == [] and b.depth == 1
    b.end()
    assert seen == [1, 2] and b.depth == 0 and b.deferred == []


def test_a_deferred_call_runs_outside_the_batch():
    """What a deferred call would defer it does at once (defer says False): nothing is left
    queued for a batch that has ended."""
    b = CallbackBatch()
    seen = []

    def flush():
        seen.append(("flush", b.defer(lambda: seen.append("late"))))
    b.begin()
    b.defer(flush)
    b.end()
    assert seen == [("flush", False)] and b.deferred == []
    b.begin()
    b.end()
    assert seen == [("flush", False)]


def test_a_deferred_call_that_raises_lets_the_others_run_then_raises():
    import pytest
    b = CallbackBatch()
    seen = []

    def bad():
        raise RuntimeError("consumer bug")
    b.begin()
    b.defer(bad)
    b.defer(lambda: seen.append("flushed"))
    with pytest.raises(RuntimeError, match="consumer bug"):
        b.end()
    assert seen == ["flushed"] and b.depth == 0 and b.deferred == []
