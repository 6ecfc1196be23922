"""Target CPU per I/O: a raw synchronous client drives QD32 4 KiB random reads against
`python3 -m target` in a subprocess and reads the target's own CPU time (os.times in the target,
through the control socket's `stats`) before and after.

    python3 tests/target/bench_target.py [--seconds 5] [--qd 32] [--backend ram:256M]
                                         [--sqflow] [--bs 4096] [--write]

Pins the target to CPU 0 and the client to CPU 1 when there are two CPUs. Prints one line per
run: IOPS, target us of CPU per I/O, client us per I/O. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from initiator import _fabrics as fab  # noqa: E402
from initiator._framing import HOST_ACCEPTS, PduReceiver  # noqa: E402
from initiator._pdu import (  # noqa: E402
    DATA_HDR, build_icreq, capsule_cmd_header, sqe,
)
from initiator._spec import CC_EN, CC_IOCQES, CC_IOSQES, Property  # noqa: E402
from target.control import call  # noqa: E402

NQN = "nqn.2026-01.io.blockfs:bench"
HOSTID = "11111111-2222-3333-4444-555555555555"
HOSTNQN = f"nqn.2014-08.org.nvmexpress:uuid:{HOSTID}"


class SyncHost:
    def __init__(self, port: int):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rx = PduReceiver(HOST_ACCEPTS, bufsize=1 << 20)
        self.cid = 0
        self.s.sendall(build_icreq())
        t, *_ = self._pdu()
        assert t == 1
        self.rx.ic_done = True

    def _pdu(self):
        while True:
            p = self.rx.next_pdu()
            if p is not None:
                return p
            buf = self.rx.buffer()
            n = self.s.recv_into(buf)
            if not n:
                raise ConnectionError("EOF")
            self.rx.received(n)

    def cmd(self, c, data=b""):
        self.cid += 1
        struct.pack_into("<H", c, 2, self.cid)
        if data:
            struct.pack_into("<QI3xB", c, 24, 0, len(data), 0x01)
        self.s.sendall(capsule_cmd_header(c, len(data), False, False) + data)
        while True:
            t, f, h, d, ok = self._pdu()
            if t == 5:
                dw0, _dw1, _sqhd, _sqid, cid, status = struct.unpack_from("<IIHHHH", h, 8)
                assert status == 0, hex(status)
                return dw0


def setup(port: int, sqflow: bool):
    admin = SyncHost(port)
    cntlid = admin.cmd(fab.connect_sqe(0, 31, 0),
                       fab.connect_data(HOSTID, 0xFFFF, NQN, HOSTNQN)) & 0xFFFF
    admin.cmd(fab.property_set_sqe(Property.CC, CC_EN | CC_IOSQES | CC_IOCQES))
    io = SyncHost(port)
    io.cmd(fab.connect_sqe(1, 127, 0, disable_sqflow=not sqflow),
           fab.connect_data(HOSTID, cntlid, NQN, HOSTNQN))
    return admin, io


def run_load(io: SyncHost, seconds: float, qd: int, bs: int, nblocks: int, write: bool) -> int:
    """Closed loop at queue depth `qd`; returns completed I/Os."""
    lbas = nblocks // (bs // 512)
    nlb = bs // 512
    rnd = random.Random(1)
    caps = []
    payload = bytes(bs)
    for cid in range(qd):
        if write:
            c = sqe(0x01, cid, 1, 0, 0, nlb - 1, data_len=bs, in_capsule=True)
            caps.append(bytearray(capsule_cmd_header(c, bs, False, False) + payload))
        else:
            c = sqe(0x02, cid, 1, 0, 0, nlb - 1, data_len=bs)
            caps.append(bytearray(capsule_cmd_header(c, 0, False, False)))
    sock = io.s
    rx = io.rx

    def arm(cid):
        b = caps[cid]
        struct.pack_into("<Q", b, 8 + 40, rnd.randrange(lbas) * nlb)
        return b

    sock.sendall(b"".join(arm(c) for c in range(qd)))
    done = 0
    end = time.perf_counter() + seconds
    out = []
    while True:
        n = sock.recv_into(rx.buffer())
        if not n:
            raise ConnectionError("EOF")
        rx.received(n)
        while True:
            p = rx.next_pdu()
            if p is None:
                break
            t, f, h, d, ok = p
            if t == 5:
                cid = struct.unpack_from("<H", h, 20)[0]
            elif t == 7 and f & 0x08:
                cid = DATA_HDR.unpack_from(h)[5]
            else:
                continue
            done += 1
            out.append(arm(cid))
        if time.perf_counter() >= end:
            break
        if out:
            sock.sendall(b"".join(out))
            out.clear()
    # Drain what is still outstanding.
    outstanding = qd - len(out)
    while outstanding:
        n = sock.recv_into(rx.buffer())
        rx.received(n)
        while (p := rx.next_pdu()) is not None:
            if p[0] == 5 or (p[0] == 7 and p[1] & 0x08):
                outstanding -= 1
    return done


def run_initiator(port: int, seconds: float, qd: int, bs: int, nblocks: int, write: bool,
                  sqflow: bool) -> tuple[int, float]:
    """The lead's trio initiator (initiator.controller) at queue depth `qd`: one task per slot.
    -> (I/Os, CPU seconds of this process during the timed part)."""
    import trio
    from initiator.controller import ControllerOptions, open_controller

    async def go():
        opts = ControllerOptions(nr_io_queues=1, keep_alive_tmo=5, disable_sqflow=not sqflow)
        async with open_controller("127.0.0.1", port, NQN, opts) as c:
            lbas = nblocks // (bs // 512)
            nlb = bs // 512
            count = [0]
            deadline = [0.0]

            async def worker(seed):
                rnd = random.Random(seed)
                buf = memoryview(bytearray(bs))
                while trio.current_time() < deadline[0]:
                    lba = rnd.randrange(lbas) * nlb
                    if write:
                        await c.write(1, lba, nlb, buf)
                    else:
                        await c.read(1, lba, nlb, buf)
                    count[0] += 1

            for phase in ("warm", "run"):
                count[0] = 0
                deadline[0] = trio.current_time() + (0.5 if phase == "warm" else seconds)
                c0 = os.times()
                async with trio.open_nursery() as n:
                    for i in range(qd):
                        n.start_soon(worker, i)
                c1 = os.times()
            return count[0], (c1.user + c1.system) - (c0.user + c0.system)

    return trio.run(go)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--backend", default="ram:256M")
    ap.add_argument("--sqflow", action="store_true", help="keep SQ flow control on (no SUCCESS)")
    ap.add_argument("--write", action="store_true", help="in-capsule writes instead of reads")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--client", choices=("raw", "initiator"), default="raw",
                    help="raw: a lean synchronous loop; initiator: blockfs's trio initiator")
    a = ap.parse_args(argv)
    d = tempfile.mkdtemp(prefix="bench", dir="/tmp")
    ctl = os.path.join(d, "ctl.sock")
    cmd = [sys.executable, "-m", "target", "--listen", "127.0.0.1:0", "--nqn", NQN,
           "--ns", a.backend, "--control", ctl]
    two = (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if two else None)
    try:
        line = proc.stdout.readline()
        port = int(line.rsplit(":", 1)[1])
        while not os.path.exists(ctl):
            time.sleep(0.01)
        if two:
            os.sched_setaffinity(0, {1})
        ns = call(ctl, "list")["subsystems"][0]["namespaces"][0]
        nblocks = ns["num_blocks"] * ns["block_size"] // 512
        if a.client == "raw":
            admin, io = setup(port, a.sqflow)
            run_load(io, 0.5, a.qd, a.bs, nblocks, a.write)  # warm up
            s0 = call(ctl, "stats")
            c0 = os.times()
            t0 = time.perf_counter()
            n = run_load(io, a.seconds, a.qd, a.bs, nblocks, a.write)
            el = time.perf_counter() - t0
            c1 = os.times()
            s1 = call(ctl, "stats")
            ccpu = (c1.user + c1.system) - (c0.user + c0.system)
        else:
            s0 = call(ctl, "stats")
            t0 = time.perf_counter()
            n, ccpu = run_initiator(port, a.seconds, a.qd, a.bs, nblocks, a.write, a.sqflow)
            el = time.perf_counter() - t0
            s1 = call(ctl, "stats")
            el = a.seconds
        ios = (s1["reads"] + s1["writes"]) - (s0["reads"] + s0["writes"])
        tcpu = s1["cpu_s"] - s0["cpu_s"]
        res = {"client": a.client, "backend": a.backend, "op": "write" if a.write else "read", "bs": a.bs, "qd": a.qd,
               "sq_flow_control": a.sqflow, "iops": round(n / el),
               "target_us_per_io": round(tcpu / ios * 1e6, 2),
               "target_user_us": round((s1["user_s"] - s0["user_s"]) / ios * 1e6, 2),
               "target_sys_us": round((s1["system_s"] - s0["system_s"]) / ios * 1e6, 2),
               "client_us_per_io": round(ccpu / n * 1e6, 2), "ios": ios}
        print(json.dumps(res) if a.json else
              f"[{a.client}] {res['backend']} {res['op']} {a.bs}B QD{a.qd} "
              f"{'sqflow' if a.sqflow else 'SUCCESS'}: {res['iops']} IOPS, target "
              f"{res['target_us_per_io']} us CPU/IO (user {res['target_user_us']}, sys "
              f"{res['target_sys_us']}), client {res['client_us_per_io']} us/IO")
        return 0
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
