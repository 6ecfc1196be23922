"""`blockfs discover | id-ctrl | id-ns | smart-log | list-ns`: connect, ask, disconnect cleanly.

Output mirrors nvme-cli's normal format (field names as nvme-cli prints them) or JSON with `-o json`.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import trio

from initiator import _structs as st
from initiator._errors import NvmeStatusError
from initiator._spec import DISCOVERY_NQN
from initiator.controller import open_controller

from .options import controller_options

_TRTYPE = {1: "rdma", 2: "fc", 3: "tcp", 254: "loop"}
_ADRFAM = {1: "ipv4", 2: "ipv6", 3: "ib", 4: "fc"}
_SUBTYPE = {1: "referral", 2: "nvme subsystem", 3: "current discovery subsystem"}
_TREQ = {0: "not specified", 1: "required", 2: "not required"}


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    return obj


def _print(args, normal: str, obj) -> None:
    if args.output_format == "json":
        json.dump(_jsonable(obj), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(normal)


async def discover(args) -> int:
    opts = controller_options(args, discovery=True)
    async with open_controller(args.traddr, args.trsvcid, DISCOVERY_NQN, opts) as c:
        genctr, entries = await c.discovery_log()
    lines = [f"\nDiscovery Log Number of Records {len(entries)}, Generation counter {genctr}\n"]
    for i, e in enumerate(entries):
        treq = _TREQ.get(e.treq & 3, str(e.treq & 3))
        if e.treq & st.TREQ_DISABLE_SQFLOW:
            treq += ", sq flow control disable supported"
        lines.append(
            f"=====Discovery Log Entry {i}======\n"
            f"trtype:  {_TRTYPE.get(e.trtype, e.trtype)}\n"
            f"adrfam:  {_ADRFAM.get(e.adrfam, e.adrfam)}\n"
            f"subtype: {_SUBTYPE.get(e.subtype, e.subtype)}\n"
            f"treq:    {treq}\n"
            f"portid:  {e.portid}\n"
            f"trsvcid: {e.trsvcid}\n"
            f"subnqn:  {e.subnqn}\n"
            f"traddr:  {e.traddr}\n"
            f"eflags:  0x{e.eflags:x}\n"
            f"sectype: {'none' if e.sectype == 0 else e.sectype}\n")
    referrals = [e for e in entries if e.subtype == st.SUBTYPE_REFERRAL]
    if referrals:
        lines.append(f"Referrals: {len(referrals)}\n")
    _print(args, "".join(lines), {"genctr": genctr, "records": entries})
    return 0


async def id_ctrl(args) -> int:
    async with open_controller(args.traddr, args.trsvcid, args.nqn, controller_options(args)) as c:
        ic = c.ctrl
    rows = [("vid", f"{ic.vid:#x}"), ("ssvid", f"{ic.ssvid:#x}"), ("sn", ic.sn), ("mn", ic.mn),
            ("fr", ic.fr), ("rab", ic.rab), ("ieee", bytes(ic.ieee).hex()), ("cmic", f"{ic.cmic:#x}"),
            ("mdts", ic.mdts), ("cntlid", f"{ic.cntlid:#x}"), ("ver", f"{ic.ver:#x}"),
            ("oaes", f"{ic.oaes:#x}"), ("ctratt", f"{ic.ctratt:#x}"), ("cntrltype", ic.cntrltype),
            ("oacs", f"{ic.oacs:#x}"), ("acl", ic.acl), ("aerl", ic.aerl), ("lpa", f"{ic.lpa:#x}"),
            ("elpe", ic.elpe), ("kas", ic.kas), ("sqes", f"{ic.sqes:#x}"), ("cqes", f"{ic.cqes:#x}"),
            ("maxcmd", ic.maxcmd), ("nn", ic.nn), ("oncs", f"{ic.oncs:#x}"), ("fuses", f"{ic.fuses:#x}"),
            ("vwc", f"{ic.vwc:#x}"), ("sgls", f"{ic.sgls:#x}"), ("subnqn", ic.subnqn),
            ("ioccsz", ic.ioccsz), ("iorcsz", ic.iorcsz), ("icdoff", ic.icdoff),
            ("fcatt", f"{ic.fcatt:#x}"), ("msdbd", ic.msdbd), ("ofcs", f"{ic.ofcs:#x}")]
    text = "NVME Identify Controller:\n" + "".join(f"{k:<10}: {v}\n" for k, v in rows)
    _print(args, text, ic)
    return 0


async def id_ns(args) -> int:
    async with open_controller(args.traddr, args.trsvcid, args.nqn, controller_options(args)) as c:
        ns = await c.identify_namespace(args.namespace_id)
        try:
            descs = st.parse_ns_descriptors(await c.identify(3, args.namespace_id))
        except NvmeStatusError:   # optional before NVMe 1.3: shown as absent
            descs = {}
    if not ns.nsze:
        print(f"NVMe status: namespace {args.namespace_id} is not active", file=sys.stderr)
        return 1
    lines = [f"NVME Identify Namespace {args.namespace_id}:\n"]
    for k in ("nsze", "ncap", "nuse", "nsfeat", "nlbaf", "flbas", "mc", "dpc", "dps", "nmic",
              "dlfeat", "noiob", "npwg", "nows", "anagrpid", "nsattr"):
        v = getattr(ns, k)
        lines.append(f"{k:<8}: {v:#x}\n" if k in ("nsze", "ncap", "nuse", "flbas") else f"{k:<8}: {v}\n")
    lines.append(f"nguid   : {bytes(ns.nguid).hex()}\n")
    lines.append(f"eui64   : {bytes(ns.eui64).hex()}\n")
    for i, f in enumerate(ns.lbaf):
        inuse = " (in use)" if i == ns.format_index else ""
        lines.append(f"lbaf {i:>2} : ms:{f.ms:<3} lbads:{f.lbads:<2} rp:{f.rp:#x}{inuse}\n")
    names = {st.NIDT_EUI64: "eui64", st.NIDT_NGUID: "nguid", st.NIDT_UUID: "uuid", st.NIDT_CSI: "csi"}
    for nidt, val in sorted(descs.items()):
        lines.append(f"desc {names.get(nidt, nidt)}: {bytes(val).hex()}\n")
    obj = _jsonable(ns)
    obj["block_size"] = ns.block_size
    obj["descriptors"] = {names.get(k, str(k)): bytes(v).hex() for k, v in descs.items()}
    _print(args, "".join(lines), obj)
    return 0


async def smart_log(args) -> int:
    async with open_controller(args.traddr, args.trsvcid, args.nqn, controller_options(args)) as c:
        log = await c.smart_log()
    lines = ["Smart Log for NVME device: " + args.nqn + " namespace-id:ffffffff\n"]
    for k, v in dataclasses.asdict(log).items():
        if k == "temperature":
            v = f"{v} K ({v - 273 if v else 0} C)"
        lines.append(f"{k:<40}: {v}\n")
    _print(args, "".join(lines), log)
    return 0


async def list_ns(args) -> int:
    async with open_controller(args.traddr, args.trsvcid, args.nqn, controller_options(args)) as c:
        ids = await c.active_namespaces()
    _print(args, "".join(f"[{i:>4}]:{n:#x}\n" for i, n in enumerate(ids)),
           {"nsid_list": [{"nsid": n} for n in ids]})
    return 0


COMMANDS = {"discover": discover, "id-ctrl": id_ctrl, "id-ns": id_ns, "smart-log": smart_log,
            "list-ns": list_ns}


def run(name: str, args) -> int:
    from initiator._util import single_errors
    with single_errors():
        return trio.run(COMMANDS[name], args)
