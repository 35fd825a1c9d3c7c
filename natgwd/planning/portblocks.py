"""The table's part for SNAT rules with port blocks (natgwd.state.portblocks), IPv4 only.

A port-block rule is also in the SNAT prefix maps like any SNAT rule: steering, scale-out
groups and stale-entry checks follow it as they follow the others, and its connections
other than TCP and UDP (ICMP, GRE, ...) have no ports and leave through those maps with
the EIP alone. Before them in postrouting, one rule looks up each source address of a
port-block rule, TCP and UDP only: it sets the connection's ct mark to the rule's id and
translates to the EIP with the address's block as the port range (nf_nat picks a free
port inside it; none free: conntrack refuses the connection, as a full EIP does).

Allocation failures per address: the `account` chain counts the first packet of every
port-block connection by (rule id, source address) before conntrack confirms it; the
connections confirmed are the NEW events by the same pair (natgwd.observability.blockwatch).
"""

from __future__ import annotations

from collections.abc import Mapping

from natgwd.planning.table import Element, SetSpec
from natgwd.state.model import SnatRule
from natgwd.state.portblocks import PortBlock, blocks

PORT_BLOCKS = "port_blocks"  # source address -> EIP . its block of ports
PORT_BLOCK_RULE = "port_block_rule"  # source address -> the rule's id
PORT_BLOCK_ATTEMPTS = "port_block_attempts"  # (rule id . source address), counting first packets

SETS = (
    # A hash map keyed by single addresses: with `flags interval` (an rbtree) deleting the
    # elements of a /18's 16,384 addresses took 200 s here, 50 ms without.
    SetSpec(PORT_BLOCKS, "type ipv4_addr : interval ipv4_addr . inet_service;"),
    SetSpec(PORT_BLOCK_RULE, "type ipv4_addr : mark;"),
    SetSpec(PORT_BLOCK_ATTEMPTS, "type mark . ipv4_addr; counter;"),
)

_MEMBER = Element()


def postrouting_rule(external: str) -> str:
    """The NAT rule of the blocks, for packets leaving through `external` (one name or a set)."""
    return (
        f"oifname {external} meta l4proto {{ tcp, udp }} ct mark set ip saddr map @{PORT_BLOCK_RULE} "
        f"snat ip to ip saddr map @{PORT_BLOCKS}"
    )


# After source NAT the packet's source is the EIP: the VM is the connection's original source.
ACCOUNT_RULE = f"ct status & confirmed == 0 ct mark . ct original ip saddr @{PORT_BLOCK_ATTEMPTS}"


def block_elements(rule: SnatRule, eip: str, mark: Element) -> list[tuple[str, str, Element]]:
    """Every address's elements: its block, its rule's id, its counting element."""
    assert rule.port_block is not None
    elements: list[tuple[str, str, Element]] = []
    for address, first, last in blocks(rule.internal_cidr, rule.port_block):
        key = str(address)
        ports = str(first) if first == last else f"{first}-{last}"  # as nft lists it
        elements += [
            (PORT_BLOCKS, key, Element(f"{eip} . {ports}")),
            (PORT_BLOCK_RULE, key, mark),
            (PORT_BLOCK_ATTEMPTS, f"{mark.value} . {key}", _MEMBER),
        ]
    return elements


def decoded_block(elements: Mapping[str, Mapping[str, Element]], network: str, mark: str) -> PortBlock | None:
    """A SNAT rule's port blocks read back (decode_rules): the block of its CIDR's first
    address, when that address is the rule's (`mark`), gives the first port and the size."""
    first = elements.get(PORT_BLOCKS, {}).get(network)
    owner = elements.get(PORT_BLOCK_RULE, {}).get(network)
    if first is None or first.value is None or owner is None or owner.value != mark:
        return None
    ports = first.value.rsplit(" . ", 1)[1]
    low, _, high = ports.partition("-")
    return PortBlock(int(high or low) - int(low) + 1, int(low))
