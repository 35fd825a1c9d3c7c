"""Scaling out: the part of natgwd's table and policy routing that hands a packet to the
member owning its EIP (docs/scaling-out.md).

A chain at the raw priority (before conntrack) gives every packet from the LAN the
firewall mark of the EIP group its translation belongs to, from maps keyed like the NAT
maps: the source address for SNAT (longest prefix last, so it wins) and FIP, the backend's
address, protocol and port for DNAT replies. `fwmark G lookup G` then routes it by table G,
which holds a default route via the owner's LAN address on every member but the owner
(natgwd.ha.scale writes it as ownership changes); on the owner table G is empty, so the
lookup falls through to the main table and the packet is translated there.

The same routing decision, asked by `fib daddr . mark oifname`, tells a member whether it
only hands the packet over (it would leave by the LAN again): then the packet is not
tracked. A tracked hand-over would create an untranslated second entry of the connection,
which conntrackd would replicate to the owner over its translated one.
"""

from __future__ import annotations

from collections.abc import Sequence

from natgwd.planning.table import ChainSpec, SetSpec
from natgwd.state.model import DesiredState, DnatRule

FIP_OUT_GROUP = "fip_out_group"
SNAT_DST_GROUP = "snat_dst_group"  # SNAT rules by destination (natgwd.state.destinations)
HANDED_OVER = "handed_over"  # counts the packets handed over, per group mark
DNAT_REPLY_GROUP = "dnat_reply_group"
HANDOVER_CHAIN = "handover"


def snat_group(prefixlen: int) -> str:
    return f"snat_p{prefixlen}_group"


def handover_sets(snat_prefixes: Sequence[int], destined: bool = False) -> tuple[SetSpec, ...]:
    return (
        SetSpec(FIP_OUT_GROUP, "type ipv4_addr : mark;"),
        *((SetSpec(SNAT_DST_GROUP, "type ipv4_addr . ipv4_addr : mark; flags interval;"),) if destined else ()),
        SetSpec(DNAT_REPLY_GROUP, "type ipv4_addr . inet_proto . inet_service : mark;"),
        SetSpec(HANDED_OVER, "type mark; counter;"),
        *(SetSpec(snat_group(p), "type ipv4_addr : mark;") for p in snat_prefixes),
    )


def reply_keys(rule: DnatRule) -> list[str]:
    """The dnat_reply_group keys of a DNAT rule: its backend's address, protocol and each
    of its ports (a share rule's backend has one port)."""
    internal = str(rule.internal_ip)
    return [f"{internal} . {rule.protocol} . {port}" for port in rule.backend_ports()]


def handover_chain(state: DesiredState, snat_keys: Sequence[tuple[int, str]], destined: bool = False) -> ChainSpec:
    """`snat_keys`: (prefix length, the key expression of its SNAT maps) in use, longest first;
    `destined`: SNAT rules by destination are in use (they take precedence over those)."""
    assert state.scale_out is not None
    lan = f'"{state.internal.interface}"'
    handover_link = f'"{state.scale_out.interface}"'
    rules = [
        # Packets for this member itself (VRRP, conntrackd) are never handed over.
        f"iifname {lan} fib daddr type local return",
        # Shortest prefix first: a longer one that matches overwrites the mark.
        *(f"iifname {lan} meta mark set {key} map @{snat_group(p)}" for p, key in reversed(snat_keys)),
        *((f"iifname {lan} meta mark set ip saddr . ip daddr map @{SNAT_DST_GROUP}",) if destined else ()),
        f"iifname {lan} meta mark set ip saddr map @{FIP_OUT_GROUP}",
        f"iifname {lan} meta l4proto {{ tcp, udp }} meta mark set ip saddr . meta l4proto . th sport "
        f"map @{DNAT_REPLY_GROUP}",
        # Handed over (the route for its group leaves by the members' link): counted, not tracked.
        f"meta mark != 0 fib daddr . mark oifname {handover_link} meta mark @{HANDED_OVER} notrack",
    ]
    return ChainSpec(HANDOVER_CHAIN, "type filter hook prerouting priority raw; policy accept;", tuple(rules))
