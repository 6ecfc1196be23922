"""Fault injection for the test suite: what the target can be told to do wrong, switchable at run
time through the control socket (`control.py`).

Two kinds:
- Per-command rules (sans-IO, checked by the queue core only while any exist, so the hot path pays
  one truth test): delay a command's completion, never complete it ("drop"), or fail it with a
  given status. A rule matches on opcode, queue kind (admin/io), NSID and CNTLID, for `count`
  commands or forever.
- Connection actions the shell applies to chosen connections: go silent (stop reading and writing
  without closing), reset (RST), send a C2HTermReq, corrupt the next header/data digests, send a
  malformed PDU. And a Connect refusal with a given status, and posting any AEN.

`MALFORMED` builds the malformed PDUs by name; each breaks one rule of NVMe/TCP 1.0 section 3.6
that a conforming host must answer with an H2CTermReq (or at least a disconnect).

Does not: touch sockets (the server applies connection actions) or run timers.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass

from initiator._pdu import (
    CH, DATA_HDR, HDGSTF, IC, RESP_PDU, build_r2t, data_pdu_header, digest_bytes,
)
from initiator._spec import PduType

ACTIONS = ("delay", "drop", "error")
QUEUE_KINDS = ("admin", "io", "any")


@dataclass(slots=True)
class CommandRule:
    id: int
    action: str                  # delay | drop | error
    opcode: int | None = None    # None: any opcode
    queue: str = "any"           # admin | io | any
    nsid: int | None = None
    cntlid: int | None = None
    delay_ms: int = 0
    status: int = 0              # for "error": the 15-bit status field (sc << 1 | sct << 9 | dnr)
    count: int | None = None     # commands still to match; None = unlimited
    hits: int = 0

    def info(self) -> dict:
        return asdict(self)


class FaultSet:
    def __init__(self):
        self.rules: list[CommandRule] = []
        self.refuse: dict | None = None     # {"status", "dw0", "count", "queue"}
        self._ids = itertools.count(1)

    def add_rule(self, action: str, *, opcode=None, queue="any", nsid=None, cntlid=None,
                 delay_ms=0, status=0, count=None) -> CommandRule:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}")
        if queue not in QUEUE_KINDS:
            raise ValueError(f"queue must be one of {QUEUE_KINDS}")
        if action == "error" and not status:
            raise ValueError("an error rule needs a non-zero status")
        r = CommandRule(next(self._ids), action, opcode, queue, nsid, cntlid, int(delay_ms),
                        int(status), count)
        self.rules.append(r)
        return r

    def match(self, qid: int, cntlid: int, opc: int, nsid: int) -> CommandRule | None:
        for r in self.rules:
            if r.opcode is not None and r.opcode != opc:
                continue
            if r.queue == "admin" and qid != 0 or r.queue == "io" and qid == 0:
                continue
            if r.nsid is not None and r.nsid != nsid:
                continue
            if r.cntlid is not None and r.cntlid != cntlid:
                continue
            r.hits += 1
            if r.count is not None:
                r.count -= 1
                if r.count <= 0:
                    self.rules.remove(r)
            return r
        return None

    def set_refuse_connect(self, status: int, dw0: int = 0, count: int | None = None,
                           queue: str = "any") -> None:
        if queue not in QUEUE_KINDS:
            raise ValueError(f"queue must be one of {QUEUE_KINDS}")
        self.refuse = {"status": int(status), "dw0": int(dw0), "count": count, "queue": queue}

    def take_refusal(self, qid: int) -> tuple[int, int] | None:
        r = self.refuse
        if r is None:
            return None
        if r["queue"] == "admin" and qid != 0 or r["queue"] == "io" and qid == 0:
            return None
        if r["count"] is not None:
            r["count"] -= 1
            if r["count"] <= 0:
                self.refuse = None
        return r["status"], r["dw0"]

    def clear(self, rule_id: int | None = None) -> int:
        """Remove one rule (or all rules and the Connect refusal). -> number removed."""
        if rule_id is None:
            n = len(self.rules) + (self.refuse is not None)
            self.rules.clear()
            self.refuse = None
            return n
        before = len(self.rules)
        self.rules = [r for r in self.rules if r.id != rule_id]
        return before - len(self.rules)

    def info(self) -> dict:
        return {"rules": [r.info() for r in self.rules], "refuse_connect": self.refuse}


# ---------------------------------------------------------------------------------------------
# Malformed PDUs (target -> host). Each takes the queue (for its digest settings) and returns bytes.

def _resp(hlen=24, plen=24, pdo=0, ptype=PduType.CAPSULE_RESP, flags=0, cid=0xFFFE) -> bytes:
    return RESP_PDU.pack(ptype, flags, hlen, pdo, plen, 0, 0, 0, 0, cid, 0)


def _with_hdgst(q, pdu: bytes) -> bytes:
    if not q.hdgst:
        return pdu
    b = bytearray(pdu)
    b[1] |= HDGSTF
    CH.pack_into(b, 0, b[0], b[1], b[2], b[3], CH.unpack_from(b)[4] + 4)
    return bytes(b) + digest_bytes(b[:b[2]])


MALFORMED = {
    # PDU type 0x0A is reserved (NVMe/TCP 3.6.1 Figure 13).
    "bad_type": lambda q: CH.pack(0x0A, 0, 24, 0, 24) + bytes(16),
    # An H2C-only type from the controller.
    "h2c_type": lambda q: _with_hdgst(q, _resp(ptype=PduType.CAPSULE_CMD, hlen=72, plen=72)
                                      + bytes(48)),
    # A second ICResp after the exchange: PDU sequence error.
    "icresp_again": lambda q: IC.pack(PduType.IC_RESP, 0, 128, 0, 128, 0, 0, 0, 131072),
    # CapsuleResp with HLEN 30 instead of 24.
    "bad_hlen": lambda q: _resp(hlen=30, plen=30) + bytes(6),
    # CapsuleResp whose PLEN disagrees with HLEN (+digest).
    "bad_plen": lambda q: _with_hdgst(q, _resp(plen=28)) + bytes(4),
    # CapsuleResp with a non-zero PDO.
    "bad_pdo": lambda q: _with_hdgst(q, _resp(pdo=24)),
    # C2HData with SUCCESS but not LAST_PDU.
    "success_without_last": lambda q: _c2h(q, flags=0x08),
    # C2HData for a command that does not exist / is not a read.
    "unknown_cid_data": lambda q: _c2h(q, flags=0x04),
    # CapsuleResp for a CID the host never used.
    "unknown_cid": lambda q: _with_hdgst(q, _resp(cid=0xFFFE)),
    # R2T for a CID the host never used.
    "unknown_r2t": lambda q: build_r2t(0xFFFE, 1, 0, 4096, hdgst=q.hdgst),
    # 64 random bytes.
    "garbage": lambda q: os.urandom(64),
    # A header cut short, then nothing (the host waits; exercises its timeouts).
    "truncated": lambda q: _resp()[:12],
}


def _c2h(q, flags: int) -> bytes:
    data = bytes(512)
    hdr = DATA_HDR.pack(PduType.C2H_DATA, flags, 24, 24, 24 + 512, 0xFFFE, 0, 0, 512)
    if q.hdgst or q.ddgst:
        h = bytearray(data_pdu_header(PduType.C2H_DATA, 0xFFFE, 0, 0, 512, last=bool(flags & 4),
                                      hdgst=q.hdgst, ddgst=q.ddgst, cpda=q.hpda))
        h[1] |= flags & 0x08
        if q.hdgst:
            h[24:28] = digest_bytes(h[:24])
        return bytes(h) + data + (digest_bytes(data) if q.ddgst else b"")
    return hdr + data
