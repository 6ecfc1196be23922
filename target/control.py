"""The target's control socket: JSON-RPC 2.0 over a unix stream socket, one JSON object per line,
in the spirit of SPDK's nvmf RPCs (nvmf_subsystem_add_ns, bdev_*_resize...).

Request:  {"jsonrpc": "2.0", "id": 1, "method": "resize_ns", "params": {"nsid": 1, "size": "128M"}}
Response: {"jsonrpc": "2.0", "id": 1, "result": {...}}  or  {"..., "error": {"code", "message"}}

Methods (params; `nqn` may be left out when the target has one subsystem; `cntlid`/`qid` select
connections, all when left out):
  list                     -> subsystems, namespaces, controllers, connections, faults
  stats                    -> cpu_s, reads, writes, bytes_read, bytes_written, ...
  add_ns                   {nqn?, spec: "ram:64M" | "null:1G:4096" | "file:PATH", nsid?}
  remove_ns                {nqn?, nsid}
  resize_ns                {nqn?, nsid, size: bytes | "128M"}
  add_subsystem            {nqn, namespaces?: [spec], allow_hosts?: [hostnqn]}
  remove_subsystem         {nqn}
  set_allowed_hosts        {nqn?, hosts: [hostnqn]}  ([] = any host)
  fault_command            {action: delay|drop|error, opcode?, queue?: admin|io|any, nsid?,
                            cntlid?, delay_ms?, status? | sct?, sc?, dnr?, count?} -> rule
  fault_refuse_connect     {status? | sct?, sc?, dnr?, dw0?, count?, queue?}
  fault_clear              {id?}   (no id: all command rules and the Connect refusal)
  fault_list
  fault_silent             {enable: true|false, cntlid?, qid?}
  fault_reset              {cntlid?, qid?}
  fault_term_req           {fes?: 1, fei?: 0, cntlid?, qid?}
  fault_corrupt_digest     {kind: header|data, count?: 1, cntlid?, qid?}
  fault_malformed          {kind: <faults.MALFORMED name>, cntlid?, qid?}
  post_aen                 {type, info, lid, cntlid?}   (bypasses AEC and masks)
  keep_alive_expire        {cntlid}   (act as if KATO had run out now)
  set_port                 {state: up | down | blackhole}  (down: close all, reset new ones;
                            blackhole: all connections, new ones too, silent)

`call(path, method, **params)` is a small synchronous client; `acall` the trio one.
"""

from __future__ import annotations

import json
import logging
import os
import socket

import trio

from initiator._pdu import make_status
from initiator._util import clear_stale_socket

from ._subsystem import TargetError
from .config import SubsystemConfig

log = logging.getLogger("blockfs.target.control")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602


class RpcError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _status(p: dict) -> int:
    if "status" in p:
        return int(p["status"])
    if "sc" not in p:
        raise ValueError("give 'status' or 'sct'/'sc'")
    return make_status(int(p.get("sct", 0)), int(p["sc"]), dnr=bool(p.get("dnr", False)))


def _conns(server, p: dict, require: bool = True):
    conns = server.select(p.get("cntlid"), p.get("qid"))
    if require and not conns:
        raise ValueError("no connection matches")
    return conns


def _conn_ids(conns) -> list[dict]:
    return [{"cntlid": c.q.ctrl.cntlid if c.q.ctrl else None,
             "qid": c.q.qid if c.q.connected else None, "peer": c.peer} for c in conns]


def m_list(server, p):
    info = server.state.info()
    info["connections"] = [c.info() for c in server.conns]
    info["faults"] = server.faults.info()
    return info


def m_stats(server, p):
    return server.stats()


def m_add_ns(server, p):
    spec = p.get("spec") or p.get("bdev")
    if not spec:
        raise ValueError("add_ns needs 'spec' (ram:SIZE, null:SIZE[:BS], file:PATH)")
    return server.state.subsystem(p.get("nqn")).add_ns(spec, p.get("nsid")).info()


def m_remove_ns(server, p):
    server.state.subsystem(p.get("nqn")).remove_ns(int(p["nsid"]))
    return True


def m_resize_ns(server, p):
    return server.state.subsystem(p.get("nqn")).resize_ns(int(p["nsid"]), p["size"]).info()


def m_add_subsystem(server, p):
    sc = SubsystemConfig(nqn=p["nqn"], namespaces=list(p.get("namespaces", [])),
                         allow_hosts=list(p.get("allow_hosts", [])))
    return server.state.add_subsystem(sc).info()


def m_remove_subsystem(server, p):
    server.state.remove_subsystem(p["nqn"])
    return True


def m_set_allowed_hosts(server, p):
    sub = server.state.subsystem(p.get("nqn"))
    sub.allow_hosts = set(p.get("hosts", []))
    server.state.discovery_changed()
    return sorted(sub.allow_hosts)


def m_fault_command(server, p):
    action = p["action"]
    r = server.faults.add_rule(action, opcode=p.get("opcode"), queue=p.get("queue", "any"),
                               nsid=p.get("nsid"), cntlid=p.get("cntlid"),
                               delay_ms=p.get("delay_ms", 0),
                               status=_status(p) if action == "error" else 0,
                               count=p.get("count"))
    return r.info()


def m_fault_refuse_connect(server, p):
    server.faults.set_refuse_connect(_status(p), p.get("dw0", 0), p.get("count"),
                                     p.get("queue", "any"))
    return server.faults.refuse


def m_fault_clear(server, p):
    n = server.faults.clear(p.get("id"))
    if p.get("id") is None:
        for c in server.conns:
            c.set_silent(False)
            c.q.corrupt_hd = c.q.corrupt_dd = 0
            c.q._update_fast()
    return n


def m_fault_list(server, p):
    return server.faults.info()


def m_fault_silent(server, p):
    conns = _conns(server, p)
    for c in conns:
        c.set_silent(bool(p.get("enable", True)))
    return _conn_ids(conns)


def m_fault_reset(server, p):
    conns = _conns(server, p)
    for c in conns:
        c.q.close("fault: reset", rst=True)
    return _conn_ids(conns)


def m_fault_term_req(server, p):
    conns = _conns(server, p)
    for c in conns:
        c.set_silent(False)
        c.q.fatal(int(p.get("fes", 1)), int(p.get("fei", 0)), b"", "fault: C2HTermReq")
        c.flush()
    return _conn_ids(conns)


def m_fault_corrupt_digest(server, p):
    kind = p.get("kind", "header")
    if kind not in ("header", "data"):
        raise ValueError("kind must be 'header' or 'data'")
    count = int(p.get("count", 1))
    conns = _conns(server, p)
    for c in conns:
        c.q.set_corrupt(header=count if kind == "header" else 0,
                        data=count if kind == "data" else 0)
    return _conn_ids(conns)


def m_fault_malformed(server, p):
    conns = _conns(server, p)
    for c in conns:
        server.malformed(c, p["kind"])
    return _conn_ids(conns)


def m_post_aen(server, p):
    done = []
    for ctrl in server.controllers(p.get("cntlid")):
        if ctrl.post_event(int(p["type"]), int(p.get("info", 0)), int(p.get("lid", 0)),
                           force=True):
            done.append(ctrl.cntlid)
    if not done:
        raise ValueError("no controller matches")
    return done


def m_set_port(server, p):
    return server.set_port_state(p.get("state", "up"))


def m_keep_alive_expire(server, p):
    ctrls = server.controllers(int(p["cntlid"]))
    if not ctrls:
        raise ValueError("no such controller")
    for c in ctrls:
        c.teardown("keep-alive timeout (forced)")
    return True


METHODS = {name[2:]: fn for name, fn in globals().items() if name.startswith("m_")}


def handle_request(server, req) -> dict | None:
    rid = req.get("id") if isinstance(req, dict) else None
    try:
        if not isinstance(req, dict) or not isinstance(req.get("method"), str):
            raise RpcError(INVALID_REQUEST, "not a JSON-RPC request")
        fn = METHODS.get(req["method"])
        if fn is None:
            raise RpcError(METHOD_NOT_FOUND, f"no method {req['method']!r}")
        params = req.get("params") or {}
        if not isinstance(params, dict):
            raise RpcError(INVALID_PARAMS, "params must be an object")
        result = fn(server, params)
        return {"jsonrpc": "2.0", "id": rid, "result": result}
    except RpcError as e:
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": e.code, "message": e.message}}
    except (TargetError, ValueError, KeyError, TypeError, OSError) as e:
        msg = f"missing parameter {e}" if isinstance(e, KeyError) else str(e)
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": INVALID_PARAMS, "message": msg}}


async def _serve_client(server, stream: trio.SocketStream) -> None:
    buf = b""
    async with stream:
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                try:
                    req = json.loads(line)
                except (ValueError, RecursionError) as e:   # Recursion: nested too deep
                    resp = {"jsonrpc": "2.0", "id": None,
                            "error": {"code": PARSE_ERROR, "message": str(e)}}
                else:
                    resp = handle_request(server, req)
                try:
                    await stream.send_all(json.dumps(resp, default=str).encode() + b"\n")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return


async def serve_control(server, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    # A stale socket goes; another target's live one stays (SocketPathError).
    clear_stale_socket(path, "control socket")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as n:
            task_status.started(path)
            while True:
                stream = await listener.accept()
                n.start_soon(_serve_client, server, stream)
    finally:
        # Unlink first: when this runs because the scope was cancelled (SIGTERM, SIGINT),
        # aclose()'s checkpoint raises Cancelled, and nothing after it runs.
        try:
            os.unlink(path)
        except OSError:
            pass
        await listener.aclose()


# ---------------------------------------------------------------------------------------------
# Clients

def call(path: str, method: str, timeout: float = 10.0, **params):
    """Synchronous one-shot JSON-RPC call. Raises RpcError on an error response."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                              "params": params}).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("control socket closed")
            buf += chunk
    resp = json.loads(buf.split(b"\n", 1)[0])
    if "error" in resp:
        raise RpcError(resp["error"]["code"], resp["error"]["message"])
    return resp["result"]


async def acall(path: str, method: str, **params):
    """trio JSON-RPC call (one connection per call)."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                                          "params": params}).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("control socket closed")
            buf += chunk
    resp = json.loads(buf.split(b"\n", 1)[0])
    if "error" in resp:
        raise RpcError(resp["error"]["code"], resp["error"]["message"])
    return resp["result"]

