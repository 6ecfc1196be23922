"""Test helper: the real Linux kernel NVMe/TCP target (nvmet) in a QEMU VM.

Wraps ``scripts/ktarget`` (see ``scripts/ktarget.md``).  Lifecycle and fault
commands (start, stop, resize, add-ns, remove-ns, kill-port, restore-port,
link) run the tool as a subprocess, so its ``state.json`` stays the single
source of truth.  ``ctl`` talks to the VM's control channel in-process through
the tool's own client function (about 0.1 s a call, no interpreter start-up).

What this module does not do: it never talks NVMe beyond the ICReq probe the
tool uses for readiness, never follows discovery-log addresses (the VM
advertises a guest-internal 10.0.2.15; the only address that works from the
host is ``127.0.0.1``), and never signals any process but the QEMU whose pid
is in its own state dir (``ktarget stop`` checks that).

Usage::

    from kernel_target import KernelTarget, start_kernel_target

    with start_kernel_target(ns=("64M", "32M:512")) as kt:
        kt.port, kt.nqn                   # connect to (kt.host, kt.port)
        rc, out, err = kt.ctl("stat -c %s /srv/ns1.img")
        kt.resize(1, "128M")              # nvmet sends a NS-changed AEN

Every method is blocking.  From a trio test, use ``await kt.actl(...)`` or
``await trio.to_thread.run_sync(kt.resize, 1, "128M")`` so that the
initiator under test keeps running meanwhile.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
KTARGET = REPO / "scripts" / "ktarget"
HOST = "127.0.0.1"
GUEST_NVME_PORT = 4420            # nvmet's port inside the VM (kt status counts it)
DEFAULT_NS = ("64M", "32M:512")   # ns1: 4096-byte LBAs (file), ns2: 512-byte LBAs (loop)
DEFAULT_LIFETIME = 3600           # the guest powers itself off after this, as a safety net
DEFAULT_BOOT_TIMEOUT = 180.0


class KernelTargetError(RuntimeError):
    """A ktarget command failed, timed out, or the VM is gone."""


def _load_tool():
    """Import scripts/ktarget (no .py suffix) as a module, for its helpers."""
    loader = importlib.machinery.SourceFileLoader("_ktarget_tool", str(KTARGET))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


_tool = _load_tool()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@functools.lru_cache(maxsize=None)
def missing_requirements() -> tuple[str, ...]:
    """What the host lacks to boot the target VM; empty if nothing."""
    missing = []
    if not shutil.which("qemu-system-x86_64"):
        missing.append("qemu-system-x86_64 not found (apt: qemu-system-x86)")
    for check in (_tool.find_kernel, _tool.busybox_path):
        try:
            check()
        except _tool.KtError as e:
            missing.append(str(e))
    return tuple(missing)


def require_kernel_target() -> None:
    """Skip the calling test if the VM cannot boot here; in CI, fail instead.

    CI must never go green by skipping the tests that matter.
    """
    import pytest

    missing = missing_requirements()
    if not missing:
        return
    msg = "kernel target unavailable: %s (run scripts/setup-system)" % "; ".join(missing)
    if in_ci():
        pytest.fail(msg + " [CI is set: failing instead of skipping]", pytrace=False)
    pytest.skip(msg)


# Targets started by this process and not yet stopped: the atexit hook and the
# conftest's session finish stop whatever a crashed test left behind.
_live: dict[str, "KernelTarget"] = {}


def stop_all() -> list[str]:
    """Stop every target this process started; returns their state dirs."""
    left = list(_live)
    for sd in left:
        _live[sd].stop()
    return left


atexit.register(stop_all)


class KernelTarget:
    """One running target VM.  Make one with :meth:`start` or
    :func:`start_kernel_target`; it is stopped by :meth:`stop` (idempotent)."""

    host = HOST

    def __init__(self, state: dict, ns_spec: tuple[str, ...] = (), start_seconds: float = 0.0):
        self.port: int = state["port"]
        self.ctl_port: int = state["ctl_port"]
        self.nqn: str = state["nqn"]
        self.state_dir: str = state["state_dir"]
        self.pid: int = state["pid"]
        self.console: str = state["console"]
        self.ns_spec: tuple[str, ...] = tuple(ns_spec)
        self.boot_seconds: float = state.get("boot_seconds", 0.0)   # QEMU launch -> ready
        self.start_seconds: float = start_seconds                    # whole `ktarget start`
        self._stopped = False

    def __repr__(self) -> str:
        return "<KernelTarget %s:%d nqn=%s %s>" % (
            self.host, self.port, self.nqn, "stopped" if self._stopped else self.state_dir)

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def start(cls, ns: tuple[str, ...] | list[str] = DEFAULT_NS, *,
              lifetime: float = DEFAULT_LIFETIME, timeout: float = DEFAULT_BOOT_TIMEOUT,
              state_dir: str | None = None, **options) -> "KernelTarget":
        """Boot a target on free 127.0.0.1 ports; returns once it answers an ICReq.

        Args:
            ns: namespace specs ``[NSID=]SIZE[:BS]``, e.g. ``("64M", "32M:512")``;
                BS is 4096 (file, default) or 512 (loop device).
            lifetime: seconds after which the guest powers itself off.
            timeout: boot timeout in seconds.
            state_dir: default: a new ``/tmp/ktarget-pytest-*`` directory.
            **options: other ``ktarget start`` options, ``nqn="..."``,
                ``serial=``, ``model=``, ``inline_data_size=``, ``mem=``,
                ``with_fio=True``, ``host_modules=True``, ``init_cmd=``, ...

        Raises:
            KernelTargetError: the boot failed (the message has the console tail);
                nothing is left running.
        """
        sd = state_dir or tempfile.mkdtemp(prefix="ktarget-pytest-", dir="/tmp")
        argv = ["start", "--port", "0", "--ctl-port", "0", "--json",
                "--lifetime", str(int(lifetime)), "--timeout", str(timeout)]
        for spec in ns:
            argv += ["--ns", str(spec)]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is not None and value is not False:
                argv += [flag, str(value)]
        t0 = time.monotonic()
        for attempt in (1, 2):
            try:
                proc = _run_tool(argv, sd, timeout=timeout + 60, check=False)
            except BaseException:
                _run_tool(["stop", "--clean"], sd, timeout=60, check=False)
                raise
            if proc.returncode == 0:
                break
            _run_tool(["stop"], sd, timeout=60, check=False)
            # --port 0 picks a free port before QEMU binds it: a rare race
            # with another process.  Retry that case once, nothing else.
            racy = re.search(r"already in use|host forwarding", proc.stderr)
            if attempt == 1 and racy:
                continue
            if not os.environ.get("KTARGET_KEEP_STATE"):
                shutil.rmtree(sd, ignore_errors=True)
            raise KernelTargetError("ktarget start --state-dir %s failed (exit %d):\n%s"
                                    % (sd, proc.returncode, proc.stderr.strip()))
        kt = cls(json.loads(proc.stdout), ns_spec=tuple(ns),
                 start_seconds=time.monotonic() - t0)
        _live[kt.state_dir] = kt
        return kt

    def stop(self) -> None:
        """Stop the VM and remove its state dir (kept if $KTARGET_KEEP_STATE is set)."""
        if self._stopped:
            return
        args = ["stop"] if os.environ.get("KTARGET_KEEP_STATE") else ["stop", "--clean"]
        proc = _run_tool(args, self.state_dir, timeout=60, check=False)
        if proc.returncode != 0 and self.alive():
            raise KernelTargetError("ktarget stop failed: %s" % proc.stderr.strip())
        self._stopped = True
        _live.pop(self.state_dir, None)

    def __enter__(self) -> "KernelTarget":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        """True while this target's QEMU process runs."""
        return _tool.pid_is_our_qemu(self.pid, self.state_dir)

    # ---------------------------------------------------------------- control

    def ctl_bytes(self, shell: str, timeout: float = 60) -> tuple[int, bytes, bytes]:
        """Run ``shell`` as root in the VM; returns (rc, stdout, stderr) as bytes.

        The command gets no stdin, and its output arrives when it ends.  A
        command still running at ``timeout`` keeps running in the VM.
        """
        try:
            return _tool.ctl_run(self.ctl_port, shell, timeout=timeout)
        except (OSError, _tool.KtError) as e:
            raise KernelTargetError("ctl %r: %s%s" % (shell, e, self._vm_gone_note())) from e

    def ctl(self, shell: str, timeout: float = 60) -> tuple[int, str, str]:
        """Like :meth:`ctl_bytes`, with stdout and stderr decoded as UTF-8."""
        rc, out, err = self.ctl_bytes(shell, timeout)
        return rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def sh(self, shell: str, timeout: float = 60) -> str:
        """Run ``shell`` in the VM and return its stdout.

        Raises:
            KernelTargetError: the command exited non-zero (message has stderr).
        """
        rc, out, err = self.ctl(shell, timeout)
        if rc != 0:
            raise KernelTargetError("ctl %r exited %d: %s" % (shell, rc, err.strip()))
        return out

    async def actl(self, shell: str, timeout: float = 60) -> tuple[int, str, str]:
        """:meth:`ctl` in a worker thread, for trio tests."""
        import trio

        return await trio.to_thread.run_sync(self.ctl, shell, timeout)

    def resize(self, nsid: int, size: int | str) -> None:
        """Truncate the backing file to ``size`` (bytes or "128M") and revalidate.

        nvmet then sends a Namespace Attribute Changed AEN to controllers
        with an AER outstanding (and masks further ones until log page 0x04
        is read).
        """
        self._tool_cmd("resize", str(nsid), str(size))

    def add_ns(self, nsid: int, size: int | str, block_size: int = 4096) -> None:
        """Create and enable namespace ``nsid`` (sends an AEN)."""
        self._tool_cmd("add-ns", str(nsid), str(size), "--block-size", str(block_size))

    def remove_ns(self, nsid: int) -> None:
        """Disable and remove namespace ``nsid`` (sends an AEN)."""
        self._tool_cmd("remove-ns", str(nsid))

    def kill_port(self) -> None:
        """Unlink the subsystem from the port: established connections get EOF,
        new ones still succeed at connect() and are then reset or closed."""
        self._tool_cmd("kill-port")

    def restore_port(self) -> None:
        """Link the subsystem to the port again."""
        self._tool_cmd("restore-port")

    def link_down(self) -> None:
        """Silent partition of the data NIC: no RST, no FIN; I/O just hangs."""
        self._tool_cmd("link", "down")

    def link_up(self) -> None:
        """End the partition; TCP retransmission recovers open connections."""
        self._tool_cmd("link", "up")

    # ---------------------------------------------------------------- queries

    @property
    def namespaces(self) -> list[dict]:
        """Current namespaces from the state file: ``{"nsid", "bytes", "block_size"}``."""
        with open(os.path.join(self.state_dir, "state.json")) as f:
            return json.load(f)["namespaces"]

    def status(self) -> dict:
        """``ktarget status --json``, plus ``"guest"`` parsed from ``kt status``::

            {"port_linked": bool, "connections": int,
             "namespaces": {nsid: {"enable": 1, "size": bytes, "path": str}}}
        """
        proc = _run_tool(["status", "--json"], self.state_dir, timeout=60, check=False)
        try:
            st = json.loads(proc.stdout)
        except ValueError:
            raise KernelTargetError("ktarget status: %s %s" % (proc.stdout, proc.stderr)) from None
        st["guest"] = parse_kt_status(st.get("guest_status") or "")
        return st

    def connections(self) -> int:
        """Established TCP connections to nvmet's port 4420 inside the VM.

        Same count as ``kt status`` (netstat, ESTABLISHED, local or remote
        port 4420).  nvmet 6.1 does not list controllers in configfs, so this
        is how a test checks that no controller was left behind.  A kernel
        initiator inside the VM (``kt host-connect``) counts twice.
        """
        return parse_kt_status(self.sh("kt status"))["connections"]

    def wait_connections(self, expected: int, timeout: float = 10.0) -> int:
        """Poll :meth:`connections` until it equals ``expected`` or ``timeout``
        passes; returns the last count (assert on it)."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.connections()
            if n == expected or time.monotonic() >= deadline:
                return n
            time.sleep(0.2)

    def console_tail(self, lines: int = 40) -> str:
        """The last lines of the guest serial console (nvmet messages go there)."""
        return _tool.tail(self.console, lines)

    # ---------------------------------------------------------------- internals

    def _tool_cmd(self, *args: str) -> str:
        proc = _run_tool(list(args), self.state_dir, timeout=90, check=False)
        if proc.returncode != 0:
            raise KernelTargetError("ktarget %s exited %d: %s%s" % (
                " ".join(args), proc.returncode, proc.stderr.strip(), self._vm_gone_note()))
        return proc.stdout

    def _vm_gone_note(self) -> str:
        if self._stopped:
            return " (target was stopped)"
        if not self.alive():
            return " (VM is not running; console tail:\n%s)" % self.console_tail(20)
        return ""


def parse_kt_status(text: str) -> dict:
    """Parse the guest's ``kt status`` output."""
    out = {"port_linked": None, "connections": None, "namespaces": {}}
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "port" and len(words) > 1:
            out["port_linked"] = words[1] == "linked"
        elif words[0] == "connections" and len(words) > 1:
            out["connections"] = int(words[1])
        elif words[0] == "ns" and len(words) > 1:
            fields = dict(w.split("=", 1) for w in words[2:] if "=" in w)
            out["namespaces"][int(words[1])] = {
                "enable": int(fields.get("enable", 0)),
                "size": int(fields["size"]) if fields.get("size", "").isdigit() else None,
                "path": fields.get("path"),
            }
    return out


def _run_tool(args: list[str], state_dir: str, timeout: float,
              check: bool = True) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(KTARGET), args[0], "--state-dir", state_dir, *args[1:]]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise KernelTargetError("ktarget %s timed out after %.0f s" % (args[0], timeout)) from e
    if check and proc.returncode != 0:
        raise KernelTargetError("ktarget %s exited %d: %s"
                                % (args[0], proc.returncode, proc.stderr.strip()))
    return proc


@contextlib.contextmanager
def start_kernel_target(ns: tuple[str, ...] | list[str] = DEFAULT_NS,
                        **kw) -> Iterator[KernelTarget]:
    """``with start_kernel_target(...) as kt:`` boots a target (see
    :meth:`KernelTarget.start` for the arguments) and always stops it."""
    kt = KernelTarget.start(ns, **kw)
    try:
        yield kt
    finally:
        kt.stop()
