"""`EmbeddedTarget`: the embedded target in a subprocess, with the interface of the test suite's
`KernelTarget` (tests/kernel_target.py) where the two overlap, so a test written against the
kernel target can run against this one: `host`, `port`, `nqn`, `resize`, `add_ns`, `remove_ns`,
`kill_port`/`restore_port`, `link_down`/`link_up`, `namespaces`, `connections`,
`wait_connections`, `stop`. Plus `rpc(method, **params)` for every control-socket method
(faults), and `stats()`.

    with EmbeddedTarget.start(("64M", "32M:512")) as t:
        ... connect to t.host:t.port, subsystem t.nqn ...

Namespace specs: the kernel target's `SIZE[:BS]` (BS 4096 by default, as its file namespaces)
become RAM namespaces; any `ram:`/`null:`/`file:` spec is passed through.
In a trio test, `serve_target` in the test's own nursery is lighter (see tests/target/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from .control import call
from .config import DEFAULT_NQN

HOST = "127.0.0.1"
DEFAULT_NS = ("64M", "32M:512")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spec(ns: str) -> str:
    if ns.split(":", 1)[0] in ("ram", "null", "file"):
        return ns
    size, _, bs = ns.partition(":")
    return f"ram:{size}:{bs or 4096}"


class EmbeddedTarget:
    host = HOST

    def __init__(self, proc: subprocess.Popen, port: int, nqn: str, control: str, tmpdir: str,
                 ns_spec: tuple[str, ...]):
        self.proc = proc
        self.port = port
        self.nqn = nqn
        self.control = control
        self.ns_spec = ns_spec
        self._tmpdir = tmpdir
        self._stopped = False

    def __repr__(self) -> str:
        return f"<EmbeddedTarget {self.host}:{self.port} nqn={self.nqn} pid={self.proc.pid}>"

    @classmethod
    def start(cls, ns=DEFAULT_NS, *, nqn: str = DEFAULT_NQN, allow_hosts=(), timeout: float = 10,
              extra_args=(), verbose: bool = False) -> "EmbeddedTarget":
        tmpdir = tempfile.mkdtemp(prefix="etgt", dir="/tmp")
        control = os.path.join(tmpdir, "ctl.sock")
        args = [sys.executable, "-m", "target", "--listen", f"{HOST}:0", "--nqn", nqn,
                "--control", control, *extra_args]
        for n in ns:
            args += ["--ns", _spec(n)]
        for h in allow_hosts:
            args += ["--allow-host", h]
        if verbose:
            args.append("-v")
        proc = subprocess.Popen(args, cwd=_ROOT, stdout=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            if not line.startswith("listening on "):
                raise RuntimeError(f"target did not start: {line!r} (exit {proc.poll()})")
            port = int(line.rsplit(":", 1)[1])
            deadline = time.monotonic() + timeout
            while not os.path.exists(control):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("target control socket did not appear")
                time.sleep(0.01)
        except BaseException:
            proc.kill()
            proc.wait()
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        return cls(proc, port, nqn, control, tmpdir, tuple(ns))

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedTarget":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc.poll() is None

    # -- control --------------------------------------------------------------------------
    def rpc(self, method: str, **params):
        return call(self.control, method, **params)

    async def arpc(self, method: str, **params):
        from .control import acall
        return await acall(self.control, method, **params)

    def stats(self) -> dict:
        return self.rpc("stats")

    def resize(self, nsid: int, size: int | str) -> None:
        self.rpc("resize_ns", nsid=nsid, size=size)

    def add_ns(self, nsid: int, size: int | str, block_size: int = 4096) -> None:
        self.rpc("add_ns", nsid=nsid, spec=f"ram:{size}:{block_size}")

    def remove_ns(self, nsid: int) -> None:
        self.rpc("remove_ns", nsid=nsid)

    def kill_port(self) -> None:
        """Established connections are closed; new ones are accepted and reset."""
        self.rpc("set_port", state="down")

    def restore_port(self) -> None:
        self.rpc("set_port", state="up")

    def link_down(self) -> None:
        """A silent partition: nothing is read or written, nothing is closed."""
        self.rpc("set_port", state="blackhole")

    def link_up(self) -> None:
        self.rpc("set_port", state="up")

    @property
    def namespaces(self) -> list[dict]:
        sub = next(s for s in self.rpc("list")["subsystems"] if s["nqn"] == self.nqn)
        return [{"nsid": n["nsid"], "bytes": n["size"], "block_size": n["block_size"]}
                for n in sub["namespaces"]]

    def connections(self) -> int:
        return self.stats()["connections"]

    def wait_connections(self, expected: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            n = self.connections()
            if n == expected or time.monotonic() >= deadline:
                return n
            time.sleep(0.05)


def start_embedded_target(ns=DEFAULT_NS, **kw) -> EmbeddedTarget:
    return EmbeddedTarget.start(ns, **kw)
