"""Connect-all's reading of a discovery log (blockfs/discovery.py, NVMe-oF 1.1 Figure 38/39):
which entries are attached and at which address, and that an odd entry a target advertises
(a TRSVCID that is no TCP port, an unknown TRTYPE) is skipped with a warning instead of
ending the daemon or connecting somewhere else."""

from __future__ import annotations

import logging

import pytest

from blockfs.discovery import DiscoveryFollower, wanted_subsystems
from initiator import _structs as st
from initiator.controller import ControllerOptions

HOST, PORT = "192.0.2.1", 8009


def entry(nqn, *, traddr="198.51.100.7", trsvcid="4420", portid=1, **kw):
    return st.DiscoveryLogEntry(subnqn=nqn, traddr=traddr, trsvcid=trsvcid, portid=portid, **kw)


CURRENT = entry("nqn.2014-08.org.nvmexpress.discovery", portid=0,
                subtype=st.SUBTYPE_CURRENT_DISCOVERY)


def test_entries_are_attached_at_their_address_or_through_our_own_port():
    entries = [CURRENT, entry("nqn.a", portid=0), entry("nqn.b", trsvcid="4421"),
               entry("nqn.c", trsvcid=""), entry("nqn.rdma", trtype=1),
               entry("nqn.ref", subtype=st.SUBTYPE_REFERRAL)]
    assert wanted_subsystems(entries, HOST, PORT) == {
        "nqn.a": (HOST, PORT), "nqn.b": ("198.51.100.7", 4421), "nqn.c": ("198.51.100.7", 4420)}


@pytest.mark.parametrize("trsvcid", ["abc", "99999", "65536", "0", "-1", "4420x", "\u0664\u0664"])
def test_an_entry_whose_trsvcid_is_no_tcp_port_is_skipped(trsvcid, caplog):
    entries = [CURRENT, entry("nqn.bad", trsvcid=trsvcid), entry("nqn.good")]
    with caplog.at_level(logging.WARNING, "blockfs.discovery"):
        assert wanted_subsystems(entries, HOST, PORT) == {"nqn.good": ("198.51.100.7", 4420)}
    assert "nqn.bad" in caplog.text and "TRSVCID" in caplog.text


async def test_a_bad_trsvcid_appearing_in_the_log_does_not_end_the_follower():
    attached = []

    async def attach(nqn, host, port):
        attached.append((nqn, host, port))

    async def detach(nqn):
        raise AssertionError(nqn)

    f = DiscoveryFollower(HOST, PORT, ControllerOptions(), persistent=False, rescan_interval=0,
                          attach=attach, detach=detach)
    await f._apply(1, [CURRENT, entry("nqn.good")])
    await f._apply(2, [CURRENT, entry("nqn.good"), entry("nqn.bad", trsvcid="abc")])
    assert attached == [("nqn.good", "198.51.100.7", 4420)]
    assert f.genctr == 2


async def test_an_address_that_cannot_be_resolved_is_logged_and_the_rest_attached(caplog):
    # TRADDR is free text: "a..b" fails in IDNA encoding before any DNS query.
    from initiator.transport import open_socket
    attached = []

    async def attach(nqn, host, port):
        if nqn == "nqn.bad":
            await open_socket(host, port, 1.0)
        attached.append(nqn)

    async def detach(nqn):
        raise AssertionError(nqn)

    f = DiscoveryFollower(HOST, PORT, ControllerOptions(), persistent=False, rescan_interval=0,
                          attach=attach, detach=detach)
    with caplog.at_level(logging.WARNING, "blockfs.discovery"):
        await f._apply(1, [CURRENT, entry("nqn.bad", traddr="a..b"), entry("nqn.good")])
    assert attached == ["nqn.good"] and sorted(f.attached) == ["nqn.good"]
    assert "attaching nqn.bad at a..b:4420 failed: cannot resolve" in caplog.text


class FakeDiscoveryController:
    """Controller.discovery_log's view of a controller: Get Log Page 70h from `page`, padded
    with zeroes as nvmet pads a read past the end, and an MDTS."""

    def __init__(self, page: bytes, max_transfer: int = 1 << 20) -> None:
        self.page = page
        self.max_transfer = max_transfer
        self.reads: list[tuple[int, int]] = []

    async def get_log_page(self, lid, length, *, offset=0, nsid=0, **kw):
        assert lid == 0x70 and length % 4 == 0 and length <= self.max_transfer, length
        self.reads.append((offset, length))
        return bytearray(self.page[offset:offset + length].ljust(length, b"\0"))


def discovery_page(entries, numrec=None, genctr=7):
    raw = bytearray(st.build_discovery_log(genctr, entries))
    if numrec is not None:
        raw[8:16] = numrec.to_bytes(8, "little")
    return bytes(raw)


async def test_a_numrec_larger_than_the_log_reads_a_bounded_page(caplog):
    from initiator.controller import MAX_DISCOVERY_RECORDS, Controller
    real = [CURRENT, entry("nqn.good")]
    fake = FakeDiscoveryController(discovery_page(real, numrec=2**40))
    with caplog.at_level(logging.WARNING, "initiator.controller"):
        genctr, entries = await Controller.discovery_log(fake)
    assert genctr == 7 and entries[:2] == real and len(entries) == MAX_DISCOVERY_RECORDS
    assert "NUMREC" in caplog.text
    assert sum(n for off, n in fake.reads if off) == MAX_DISCOVERY_RECORDS * 1024
    assert wanted_subsystems(entries, HOST, PORT) == {"nqn.good": ("198.51.100.7", 4420)}


async def test_a_log_larger_than_one_transfer_is_read_in_pieces():
    from initiator.controller import Controller
    real = [CURRENT] + [entry(f"nqn.s{i}") for i in range(40)]
    fake = FakeDiscoveryController(discovery_page(real), max_transfer=8192)
    genctr, entries = await Controller.discovery_log(fake)
    assert entries == real
    assert max(n for _off, n in fake.reads) <= 8192
