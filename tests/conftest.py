"""Root conftest: kernel-target fixtures, marker rules, CI rules.  Keep it small.

Helpers live in modules next to this file and are imported by bare name
(``tests/`` is on ``pythonpath``): ``from kernel_target import KernelTarget``.
"""

import os
import signal
import threading

import pytest
from hypothesis import settings

from kernel_target import DEFAULT_NS, KernelTarget, in_ci, require_kernel_target, \
    start_kernel_target, stop_all

# Deadlines flake on a loaded 2-core machine; CI prints a reproduction blob.
settings.register_profile("blockfs", deadline=None)
settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile("ci" if in_ci() else "blockfs")

_KTARGET_FIXTURES = {"kernel_target", "make_kernel_target"}


def _sigterm(signum, frame):
    # `timeout` in scripts/test sends SIGTERM: unwind like Ctrl-C, so that
    # fixture teardown stops the VMs.
    raise KeyboardInterrupt("SIGTERM")


def pytest_sessionstart(session):
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)


@pytest.hookimpl(trylast=True)     # after pytest's own teardown of the fixtures
def pytest_sessionfinish(session, exitstatus):
    for sd in stop_all():
        print("\nconftest: stopped a kernel target left running: %s" % sd)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _KTARGET_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ktarget)


def pytest_runtest_setup(item):
    if item.get_closest_marker("ktarget"):
        require_kernel_target()
    if item.get_closest_marker("fuse"):
        missing = [p for p in ("/dev/fuse", "/usr/bin/fusermount3") if not os.path.exists(p)]
        if missing:
            msg = "FUSE unavailable: missing %s (run scripts/setup-system)" % ", ".join(missing)
            if in_ci():
                pytest.fail(msg + " [CI is set: failing instead of skipping]", pytrace=False)
            pytest.skip(msg)


@pytest.fixture(scope="session")
def kernel_target():
    """One target VM shared by the whole session: ns1 = 64M with 4096-byte
    LBAs, ns2 = 32M with 512-byte LBAs.  Do not change it (resize, faults):
    use ``make_kernel_target`` for that.  Leave no connection open."""
    require_kernel_target()
    with start_kernel_target(ns=DEFAULT_NS) as kt:
        yield kt


@pytest.fixture
def make_kernel_target():
    """Factory for a test's own VMs, stopped at teardown:
    ``kt = make_kernel_target(ns=("16M",), **ktarget_start_options)``."""
    require_kernel_target()
    started = []

    def make(ns=DEFAULT_NS, **kw) -> KernelTarget:
        kt = KernelTarget.start(ns, **kw)
        started.append(kt)
        return kt

    yield make
    for kt in reversed(started):
        kt.stop()
