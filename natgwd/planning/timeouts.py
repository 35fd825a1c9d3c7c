"""Idle timeouts in natgwd's table (docs/state-file.md, "Idle timeouts").

Each timeout policy in use is a `ct timeout` object per protocol and a chain that gives a
connection the object of its protocol. A map from rule id to verdict sends the first
packet of a connection to the chain of its rule's policy (the rule's own over the
gateway's): the NAT rule that translated the connection has set its ct mark to the rule's
id by then, so the policy follows the rule that really applies (a FIP before SNAT, the
longest SNAT prefix, a DNAT port) with no lookup of its own.

The base chain runs after source NAT, while the connection is not confirmed yet: this
kernel (6.18) gives a connection a timeout policy only once conntrack has made its entry
and before it is confirmed; a `ct timeout set` before conntrack's hook does nothing
(measured: docs/kernel.md). A rule without a policy of its own or the gateway's has no
element: its connections keep the kernel's timeouts. With no policy at all, nothing here
is in the table.

One object serves both families: the kernel applies a ct timeout object to IPv4 and IPv6
connections alike (its l3proto is not consulted; measured), so the objects take the
table's family. ICMP and ICMPv6 are two protocols to conntrack: an ICMP timeout is two
objects, which nftables 1.0.6 cannot write (`protocol` takes tcp or udp only), so they
are made over netlink just before the transaction that names them (ObjectSpec.netlink).
"""

from __future__ import annotations

from collections.abc import Iterable

from natgwd.planning.table import ChainSpec, Element, ObjectSpec, SetSpec
from natgwd.state.model import DesiredState
from natgwd.state.rules import Rule
from natgwd.state.timeouts import PROTOCOLS, TimeoutPolicy

RULE_TIMEOUT = "rule_timeout"  # rule id -> goto the chain of its policy
# Objects of policies no longer used that stay in the table, for the connections made
# under them. Deleting a ct timeout object detaches it from its connections (measured on
# 6.18: a forwarded connection then took the kernel's 432,000 s at its next packet; one
# delivered locally was not refreshed at all and expired on its timer, traffic or not).
# A bound keeps a long history of changed policies from piling up (past it, the excess
# goes, in name order).
RETAINED_OBJECTS = 256
TIMEOUTS_CHAIN = "timeouts"
OBJECT_KEYWORD = "ct timeout"


def effective_policy(rule: Rule, gateway: TimeoutPolicy | None) -> TimeoutPolicy | None:
    """The policy of a rule's connections: its own over the gateway's, else the gateway's."""
    return rule.timeouts.over(gateway) if rule.timeouts is not None else gateway


def policies_of(state: DesiredState) -> dict[TimeoutPolicy, int]:
    """How many rules apply each policy."""
    counts: dict[TimeoutPolicy, int] = {}
    for rules in (state.snat, state.dnat, state.fip):
        for rule in rules:
            policy = effective_policy(rule, state.timeouts)
            if policy is not None:
                counts[policy] = counts.get(policy, 0) + 1
    return counts


# Per protocol of a policy: (object suffix, `meta l4proto` value, IP protocol number).
_OBJECTS = {
    "tcp": (("tcp", "tcp", 6),),
    "udp": (("udp", "udp", 17),),
    "icmp": (("icmp", "icmp", 1), ("icmpv6", "ipv6-icmp", 58)),
}


def object_name(policy: TimeoutPolicy, suffix: str) -> str:
    return f"{policy.name}_{suffix}"


def timeout_element(policy: TimeoutPolicy) -> Element:
    return Element(f"goto {policy.name}")


def timeout_sets() -> tuple[SetSpec, ...]:
    return (SetSpec(RULE_TIMEOUT, "type mark : verdict;"),)


def timeout_objects(policies: Iterable[TimeoutPolicy]) -> tuple[ObjectSpec, ...]:
    objects = []
    for policy in sorted(policies, key=lambda p: p.name):
        for protocol in PROTOCOLS:
            states = policy.states(protocol)
            values = ", ".join(f"{state}: {seconds}" for state, seconds in states)
            for suffix, _, number in _OBJECTS[protocol] if states else ():
                body = f"protocol {suffix}; policy = {{ {values} }};"
                netlink = (number, states[0][1]) if protocol == "icmp" else None
                objects.append(ObjectSpec(object_name(policy, suffix), OBJECT_KEYWORD, body, netlink))
    return tuple(objects)


def timeout_chains(policies: Iterable[TimeoutPolicy]) -> tuple[ChainSpec, ...]:
    chains = [
        ChainSpec(
            TIMEOUTS_CHAIN,
            # After source NAT (100), which sets the ct mark of SNAT and FIP connections,
            # and before conntrack confirms the entry (the last hook of all).
            "type filter hook postrouting priority 300; policy accept;",
            (f"ct status & confirmed == 0 ct mark vmap @{RULE_TIMEOUT}",),
        )
    ]
    for policy in sorted(policies, key=lambda p: p.name):
        rules = tuple(
            f'meta l4proto {l4proto} ct timeout set "{object_name(policy, suffix)}"'
            for protocol in PROTOCOLS
            if policy.states(protocol)
            for suffix, l4proto, _ in _OBJECTS[protocol]
        )
        chains.append(ChainSpec(policy.name, "", rules))
    return tuple(chains)
