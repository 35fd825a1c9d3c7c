"""The BFD gate of a scaled-out member (natgwd.planning.bfdgate): rendered with the
hand-over part of the table, switched by a transaction of its own, invisible to the
reconciler."""

from __future__ import annotations

from natgwd.kernel.fake import FakeNft
from natgwd.kernel.nft import parse_table
from natgwd.planning.bfdgate import BFD_OPEN, GATE_IN, GATE_OUT, gate_transaction
from natgwd.planning.table import plan_transaction
from tests.unit.test_scaleout_table import full, scaled, state_of


def test_a_scaled_out_table_drops_bfd_both_ways_on_the_lan_unless_the_gate_is_open() -> None:
    state = state_of(scaled())
    table = full(scaled())
    chains = {c.name: c for c in table.chains}
    lan = state.internal.interface
    assert chains[GATE_IN].header == "type filter hook input priority filter; policy accept;"
    assert chains[GATE_IN].rules == (
        f'iifname "{lan}" meta l4proto udp th dport {{ 3784, 4784 }} iifname != @{BFD_OPEN} drop',
    )
    assert chains[GATE_OUT].rules == (
        f'oifname "{lan}" meta l4proto udp th dport {{ 3784, 4784 }} oifname != @{BFD_OPEN} drop',
    )
    # Closed from the first write: the set is made empty, and no plan ever fills it.
    assert table.elements[BFD_OPEN] == {}
    script = plan_transaction(None, table).script()
    assert f"add set inet natgwd {BFD_OPEN} {{ type ifname; }}" in script
    assert f"add element inet natgwd {BFD_OPEN}" not in script


def test_a_single_gateway_has_no_gate() -> None:
    document = scaled()
    del document["scaleOut"]
    table = full(document)
    assert GATE_IN not in {c.name for c in table.chains}
    assert BFD_OPEN not in {s.name for s in table.sets}


def test_the_gate_switches_by_one_element_and_the_reconciler_never_sees_it() -> None:
    table = full(scaled())
    nft = FakeNft()
    nft.apply(plan_transaction(None, table))
    assert gate_transaction("eth1", True).script() == 'add element inet natgwd bfd_open { "eth1" }\n'
    nft.apply(gate_transaction("eth1", True))
    assert nft.table is not None and set(nft.table.elements[BFD_OPEN]) == {'"eth1"'}
    # Read back, the table is what the plan wrote: no drift, nothing to do, the gate stays.
    assert not plan_transaction(nft.read_table(), table)
    nft.apply(gate_transaction("eth1", True))  # again: still one transaction that holds
    closing = gate_transaction("eth1", False)
    assert closing.script() == (
        'add element inet natgwd bfd_open { "eth1" }\ndelete element inet natgwd bfd_open { "eth1" }\n'
    )
    nft.apply(closing)
    nft.apply(gate_transaction("eth1", False))  # closing a closed gate holds too
    assert nft.table.elements[BFD_OPEN] == {}


def test_the_kernels_listing_of_the_gate_reads_as_empty() -> None:
    listing = [{"set": {"name": BFD_OPEN, "type": "ifname", "elem": ["eth1"]}}]
    assert parse_table(listing).elements == {BFD_OPEN: {}}
