"""The initiator's typed errors, split by blame (as h11 splits Local/Remote).

- LocalProtocolError: we were asked to do something the protocol forbids (caller misuse).
- RemoteProtocolError: the peer violated NVMe/TCP; carries the TermReq FES and the byte offset
  of the offending header field, so the shell can answer with a TermReq (NVMe/TCP 3.6.2.9).
- NvmeStatusError: a command completed with a non-zero NVMe status (SCT/SC/DNR).
- TransportError and subclasses: the connection failed (socket error, EOF, timeout, TermReq).
"""

from __future__ import annotations

from ._status import status_name


class NvmeError(Exception):
    """Base class of every error the initiator raises."""


class ProtocolError(NvmeError):
    pass


class LocalProtocolError(ProtocolError):
    pass


class RemoteProtocolError(ProtocolError):
    """The peer sent something NVMe/TCP forbids. `fes`/`fei` feed the TermReq we answer with."""

    def __init__(self, message: str, fes: int, fei: int = 0, header: bytes = b""):
        super().__init__(message)
        self.fes = fes
        self.fei = fei
        self.header = header


class NvmeStatusError(NvmeError):
    """A completion with non-zero status (Base 4.2.3: Status Field)."""

    def __init__(self, sct: int, sc: int, dnr: bool = False, more: bool = False,
                 crd: int = 0, opcode: int | None = None, cid: int | None = None,
                 context: str = ""):
        self.sct = sct
        self.sc = sc
        self.dnr = dnr
        self.more = more
        self.crd = crd
        self.opcode = opcode
        self.cid = cid
        self.name = status_name(sct, sc, opcode)
        op = f" opcode 0x{opcode:02x}" if opcode is not None else ""
        prefix = f"{context}: " if context else ""
        super().__init__(f"{prefix}NVMe status {self.name} (sct 0x{sct:x}, sc 0x{sc:02x}"
                         f"{', dnr' if dnr else ''}){op}")

    @classmethod
    def from_status_field(cls, status: int, **kw) -> "NvmeStatusError":
        """`status` is CQE dword 3 bits 31:16 including the phase bit in bit 0."""
        return cls(sct=(status >> 9) & 0x7, sc=(status >> 1) & 0xFF, dnr=bool(status & 0x8000),
                   more=bool(status & 0x4000), crd=(status >> 12) & 0x3, **kw)


class TransportError(NvmeError):
    """The queue's connection is unusable. Commands in flight on it fail with this."""


class ConnectTimeout(TransportError):
    pass


class ConnectionLost(TransportError):
    """EOF, reset, TermReq, keep-alive expiry or a local teardown of the queue."""


class CommandTimeout(TransportError):
    """A command got no completion within its timeout."""


class DigestError(TransportError):
    """A data digest mismatch on a C2HData PDU: the command fails, its data is never handed out."""
