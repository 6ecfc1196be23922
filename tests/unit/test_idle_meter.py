"""IdleMeter: the polling idle time blockfs bench and the target subtract from CPU time."""

from initiator._util import IdleMeter


def test_stretches_open_on_the_first_miss_and_close_on_work():
    m = IdleMeter()
    m.work(1.0)                 # work with no open stretch: nothing
    assert m.total == 0.0
    m.miss(2.0)
    m.miss(2.5)                 # a second poller's miss does not restart the stretch
    m.work(3.0)
    assert m.total == 1.0 and not m.since
    m.miss(4.0)
    m.work(4.25)                # a poller giving up to sleep closes it the same way
    assert m.total == 1.25

