"""Scaling out: the gate on BFD (docs/scaling-out.md#bfd-follows-readiness).

OVN routes the VPC by ECMP to every replica whose BFD session is up, and BFD is answered
by a sidecar (bfdd) that knows nothing of natgwd. So a member drops BFD control packets
(single-hop 3784, multihop 4784, both families) on the internal interface, in and out,
until it is ready to forward as a member; then the gate opens. Dropped both ways, OVN's
session goes down and stays down, whichever states OVN counts as usable (one that still
heard the sidecar would sit in Init).

The gate is one element, the interface's name in `bfd_open`, which natgwd.ha.scale adds
and deletes in a transaction of its own. The reconciler never sees that element (the
kernel's listing of the set is read as empty), so neither a drift nor a change of the
table opens or closes the gate; a table made anew starts with it closed.
"""

from __future__ import annotations

from natgwd.planning.table import ChainSpec, Element, SetSpec, Transaction

BFD_OPEN = "bfd_open"
BFD_PORTS = (3784, 4784)
GATE_IN = "bfd_gate_in"
GATE_OUT = "bfd_gate_out"


def gate_sets() -> tuple[SetSpec, ...]:
    return (SetSpec(BFD_OPEN, "type ifname;"),)


def gate_chains(interface: str) -> tuple[ChainSpec, ...]:
    ports = ", ".join(str(p) for p in BFD_PORTS)
    lan = f'"{interface}"'
    return (
        ChainSpec(
            GATE_IN,
            "type filter hook input priority filter; policy accept;",
            (f"iifname {lan} meta l4proto udp th dport {{ {ports} }} iifname != @{BFD_OPEN} drop",),
        ),
        ChainSpec(
            GATE_OUT,
            "type filter hook output priority filter; policy accept;",
            (f"oifname {lan} meta l4proto udp th dport {{ {ports} }} oifname != @{BFD_OPEN} drop",),
        ),
    )


def gate_transaction(interface: str, open_: bool) -> Transaction:
    """Open or close the gate: one small transaction, right whatever the set held (the
    element is added first, so deleting it never refers to a missing one)."""
    key, tx = f'"{interface}"', Transaction()
    tx.add_elements(BFD_OPEN, [(key, Element())])
    if not open_:
        tx.delete_elements(BFD_OPEN, [key])
    return tx
