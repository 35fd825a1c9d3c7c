"""Plan the nftables table for a desired state: static chains, data in maps.

Layout (family inet, table natgwd):

- Every NAT rule has a numeric id. The NAT statement that translates a connection also
  sets the connection's ct mark to that id, and a filter chain after source NAT counts
  each packet by (ct direction, ct mark) in `rule_traffic` and each new connection by ct
  mark in `rule_connections`. Counters are therefore keyed by rule, whatever map the rule
  lives in, and survive changes to other rules.
- The id of a rule is stored in the kernel as the comment of its `rule_connections`
  element ("kind/name/eip"), so a restarted daemon finds every rule's id (and counters)
  in the table it adopts.
- Lookups are hash maps: (EIP, proto, port) for DNAT, address for FIP, and for SNAT one
  map per prefix length in use, consulted longest prefix first, keyed by the masked source.
- IPv6 has maps of its own (the same names ending in "6", SNAT maps "snat6_p<len>_*") and
  rules of its own beside the IPv4 ones in the same chains, present only when an EIP has a
  v6ip, so an IPv4-only table is what it always was. Counting, ct marks and the invalid
  drop do not depend on the family and are shared.
- With several external networks, SNAT and FIP-out apply on every external interface, and
  a chain "steer" (prerouting, mangle) sets each packet's firewall mark to the network
  its translation uses, for natgwd.planning.policy's rules: from the same lookups as the NAT maps
  (the FIP, else the longest SNAT prefix) for traffic from the VPC, from the EIP it was
  addressed to for replies of inbound connections.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from natgwd.planning.policy import network_ids
from natgwd.planning.table import ChainSpec, DesiredTable, Element, SetSpec
from natgwd.state.memo import RoundMemo
from natgwd.state.model import RULE_KINDS, DesiredState, DnatRule, FipRule, IPAddress, RuleKind, SnatRule

RULE_CONNECTIONS = "rule_connections"
ID_HIGH_WATER = "id_high_water"
RULE_TRAFFIC = "rule_traffic"
INVALID_DROPS = "invalid_dropped"
DIRECTIONS = ("original", "reply")


@dataclass(frozen=True)
class _Family:
    version: int
    ip: str  # the nft payload keyword: "ip" or "ip6"
    suffix: str  # appended to the name of every map of this family
    addr: str  # the nft address type

    def name(self, base: str) -> str:
        return base + self.suffix

    def sets(self) -> tuple[SetSpec, ...]:
        a, name = self.addr, self.name
        return (
            SetSpec(name("eips"), f"type {a};"),
            SetSpec(name("fip_in_target"), f"type {a} : {a};"),
            SetSpec(name("fip_in_rule"), f"type {a} : mark;"),
            SetSpec(name("fip_out_target"), f"type {a} : {a};"),
            SetSpec(name("fip_out_rule"), f"type {a} : mark;"),
            SetSpec(name("dnat_target"), f"type {a} . inet_proto . inet_service : {a} . inet_service;"),
            SetSpec(name("dnat_rule"), f"type {a} . inet_proto . inet_service : mark;"),
            SetSpec(name("dnat_share"), f"type {a} . inet_proto . inet_service : verdict;"),
            SetSpec(name("share_target"), f"type mark : {a} . inet_service;"),
        )

    def snat_map(self, prefixlen: int) -> str:
        return f"snat{self.suffix}_p{prefixlen}"

    def snat_key(self, prefixlen: int) -> str:
        network = IPv4Network(f"0.0.0.0/{prefixlen}") if self.version == 4 else IPv6Network(f"::/{prefixlen}")
        if prefixlen == network.max_prefixlen:
            return f"{self.ip} saddr"
        return f"{self.ip} saddr & {network.netmask}"


V4 = _Family(4, "ip", "", "ipv4_addr")
V6 = _Family(6, "ip6", "6", "ipv6_addr")

_STATIC_SETS = (
    *V4.sets(),
    SetSpec(RULE_CONNECTIONS, "type mark; counter;"),
    SetSpec(RULE_TRAFFIC, "type ct_dir . mark; counter;"),
    SetSpec(INVALID_DROPS, "type ifname; counter;"),
    # One element: the highest rule id ever given out, so that ids stay unique across restarts.
    SetSpec(ID_HIGH_WATER, "type mark;"),
)


def traffic_key(direction: str, mark: str) -> str:
    """A `rule_traffic` element's key: the connection's direction, then the rule's id."""
    return f"{direction} . {mark}"


def split_traffic_key(key: str) -> tuple[str, str]:
    """(direction, mark) of a `rule_traffic` key."""
    direction, _, mark = key.partition(" . ")
    return direction, mark


def set_key_type(name: str) -> str:
    """The key type a static set declares ("ct_dir . mark" for "type ct_dir . mark; counter;")."""
    body = next(spec.body for spec in _STATIC_SETS if spec.name == name)
    return body.removeprefix("type ").split(";", 1)[0].split(" : ", 1)[0]


_MEMBER = Element()  # an element of a set: no value, no comment; one object for all of them


# Kept from one plan to the next: str() of an address costs microseconds, and an element
# that is the very object of the last plan is found unchanged without comparing it.
def address_text(address: IPAddress) -> str:
    # As nft prints it (inet_ntop), which differs from str() for the IPv4-compatible and
    # IPv4-mapped ranges ("::0.1.0.0" where Python says "::1:0").
    return str(address) if address.version == 4 else socket.inet_ntop(socket.AF_INET6, address.packed)


_TEXT: RoundMemo[IPAddress, str] = RoundMemo(address_text)
_MAPPED_TO: RoundMemo[str, Element] = RoundMemo(Element)
_COMMENTED: RoundMemo[str, Element] = RoundMemo(lambda comment: Element(comment=comment))


@dataclass(frozen=True, order=True)
class RuleLabels:
    """What identifies a rule to Prometheus; one id (and one set of counters) per value."""

    kind: RuleKind
    name: str
    eip: str

    @property
    def comment(self) -> str:
        return f"{self.kind}/{self.name}/{self.eip}"

    @classmethod
    def from_comment(cls, comment: str) -> RuleLabels | None:
        parts = comment.split("/")
        if len(parts) != 3 or parts[0] not in RULE_KINDS:
            return None
        kind: RuleKind = parts[0]
        return cls(kind, parts[1], parts[2])


def eip_texts(state: DesiredState) -> dict[tuple[str, int], str]:
    """(EIP name, family) -> the EIP's address of that family, as nft writes it."""
    return {(e.name, a.version): _TEXT(a) for e in state.eips for a in e.addresses}


def rule_labels(state: DesiredState) -> list[RuleLabels]:
    eip_of = eip_texts(state)
    labels: list[RuleLabels] = []
    rules: tuple[SnatRule | DnatRule | FipRule, ...]
    for kind, rules in (("snat", state.snat), ("dnat", state.dnat), ("fip", state.fip)):
        for rule in rules:
            labels.append(RuleLabels(kind, rule.name, eip_of[rule.eip, rule.family]))  # type: ignore[arg-type]
    return labels


def assign_ids(state: DesiredState, existing: Mapping[RuleLabels, int], highest_used: int = 0) -> dict[RuleLabels, int]:
    """Keep the id of every rule that already has one; give new rules ids above every id
    ever used (`highest_used`), so that a conntrack entry still marked with a deleted rule's
    id is never counted as another rule's traffic."""
    ids: dict[RuleLabels, int] = {}
    next_id = max(highest_used, *existing.values(), 0) + 1
    for labels in rule_labels(state):
        if labels in existing:
            ids[labels] = existing[labels]
        else:
            ids[labels] = next_id
            next_id += 1
    return ids


def share_chain_name(eip: str, protocol: str, port: int) -> str:
    # Named by the identity alone: the chain's rules change with its backends, its name never.
    return "share_" + hashlib.sha256(f"{eip}/{protocol}/{port}".encode()).hexdigest()[:16]


def _share_chain(name: str, marks: list[str], family: _Family) -> ChainSpec:
    choices = ", ".join(f"{index} : {mark}" for index, mark in enumerate(marks))
    return ChainSpec(
        name,
        "",
        (
            # One random draw picks the backend's rule id; the DNAT target follows from it,
            # so the connection is counted for the backend it really went to.
            f"ct mark set numgen random mod {len(marks)} map {{ {choices} }}",
            f"meta l4proto {{ tcp, udp }} dnat {family.ip} to ct mark map @{family.name('share_target')}",
        ),
    )


def _prerouting(family: _Family) -> tuple[str, ...]:
    ip, name = family.ip, family.name
    dnat_key = f"{ip} daddr . meta l4proto . th dport"
    return (
        f"ct mark set {ip} daddr map @{name('fip_in_rule')} dnat {ip} to {ip} daddr map @{name('fip_in_target')}",
        f"meta l4proto {{ tcp, udp }} ct mark set {dnat_key} map @{name('dnat_rule')} "
        f"dnat {ip} to {dnat_key} map @{name('dnat_target')}",
        f"meta l4proto {{ tcp, udp }} {dnat_key} vmap @{name('dnat_share')}",
    )


def _external_interfaces(state: DesiredState) -> str:
    names = [f'"{network.interface}"' for network in state.externals]
    return names[0] if len(names) == 1 else "{ " + ", ".join(names) + " }"


def _postrouting(state: DesiredState, family: _Family, snat_prefixes: list[int]) -> tuple[str, ...]:
    internal = f'"{state.internal.interface}"'
    external = _external_interfaces(state)
    ip, name = family.ip, family.name
    return (
        # Hairpin: a VPC client reached an EIP that was DNATed back into the VPC;
        # without this the backend would answer the client directly. A client with a FIP
        # shows up as its FIP, as in Kube-OVN (FIP SNAT first, on any interface); for
        # others the map lookup fails and the next rule applies.
        f"iifname {internal} oifname {internal} ct status dnat "
        f"ct original {ip} daddr @{name('eips')} snat {ip} to {ip} saddr map @{name('fip_out_target')}",
        f"iifname {internal} oifname {internal} ct status dnat "
        f"ct original {ip} daddr @{name('eips')} snat {ip} to ct original {ip} daddr",
        f"oifname {external} ct mark set {ip} saddr map @{name('fip_out_rule')} "
        f"snat {ip} to {ip} saddr map @{name('fip_out_target')}",
        *(
            f"oifname {external} ct mark set {family.snat_key(p)} map @{family.snat_map(p)}_rule "
            f"snat {ip} to {family.snat_key(p)} map @{family.snat_map(p)}_target fully-random"
            for p in snat_prefixes
        ),
    )


def _chains(state: DesiredState, snat_prefixes: dict[_Family, list[int]]) -> tuple[ChainSpec, ...]:
    return (
        ChainSpec(
            "prerouting",
            "type nat hook prerouting priority dstnat; policy accept;",
            tuple(rule for family in snat_prefixes for rule in _prerouting(family)),
        ),
        ChainSpec(
            "postrouting",
            "type nat hook postrouting priority srcnat; policy accept;",
            tuple(rule for family, prefixes in snat_prefixes.items() for rule in _postrouting(state, family, prefixes)),
        ),
        ChainSpec(
            "account",
            # After source NAT (100), so the first packet of a SNATed flow is marked too.
            "type filter hook postrouting priority 300; policy accept;",
            (
                # The first packet of a connection is the one whose conntrack entry is not
                # confirmed yet (`ct state new` would also match retransmits before a reply).
                f"ct status & confirmed == 0 ct mark @{RULE_CONNECTIONS}",
                f"ct direction . ct mark @{RULE_TRAFFIC}",
            ),
        ),
        ChainSpec(
            "forward",
            "type filter hook forward priority filter; policy accept;",
            # Netfilter does not NAT packets conntrack calls invalid (e.g. a late RST):
            # they would leave with an internal source address.
            (f"ct state invalid oifname @{INVALID_DROPS} drop",),
        ),
    )


def desired_table(state: DesiredState, ids: Mapping[RuleLabels, int], highest_id: int = 0) -> DesiredTable:
    for memo in (_TEXT, _MAPPED_TO, _COMMENTED):
        memo.next_round()
    families = [V4, V6] if any(e.v6ip is not None for e in state.eips) else [V4]
    eip_of = eip_texts(state)
    sets = list(_STATIC_SETS)
    if V6 in families:
        sets.extend(V6.sets())
    elements: dict[str, dict[str, Element]] = {spec.name: {} for spec in sets}
    elements[ID_HIGH_WATER] = {str(max(highest_id, *ids.values(), 0)): _MEMBER}
    for (_, version), address in eip_of.items():
        elements[(V4 if version == 4 else V6).name("eips")][address] = _MEMBER
    elements[INVALID_DROPS] = {f'"{network.interface}"': _MEMBER for network in state.externals}
    connections, traffic = elements[RULE_CONNECTIONS], elements[RULE_TRAFFIC]

    def count(labels: RuleLabels) -> str:
        mark = str(ids[labels])
        connections[mark] = _COMMENTED(labels.comment)
        for direction in DIRECTIONS:
            traffic[traffic_key(direction, mark)] = _MEMBER
        return mark

    for fip in state.fip:
        name = (V4 if fip.family == 4 else V6).name
        eip, internal = eip_of[fip.eip, fip.family], _TEXT(fip.internal_ip)
        marked = _MAPPED_TO(count(RuleLabels("fip", fip.name, eip)))
        elements[name("fip_in_target")][eip] = _MAPPED_TO(internal)
        elements[name("fip_in_rule")][eip] = marked
        elements[name("fip_out_target")][internal] = _MAPPED_TO(eip)
        elements[name("fip_out_rule")][internal] = marked

    share_groups: dict[str, tuple[_Family, list[str]]] = {}
    for dnat in state.dnat:
        family = V4 if dnat.family == 4 else V6
        eip, internal = eip_of[dnat.eip, dnat.family], _TEXT(dnat.internal_ip)
        mark = count(RuleLabels("dnat", dnat.name, eip))
        if dnat.type == "share":
            port = dnat.external_port.first
            chain = share_chain_name(eip, dnat.protocol, port)
            elements[family.name("dnat_share")][f"{eip} . {dnat.protocol} . {port}"] = _MAPPED_TO(f"goto {chain}")
            elements[family.name("share_target")][mark] = _MAPPED_TO(f"{internal} . {dnat.internal_port.first}")
            share_groups.setdefault(chain, (family, []))[1].append(mark)
            continue
        dnat_target, dnat_rule = elements[family.name("dnat_target")], elements[family.name("dnat_rule")]
        shift = dnat.internal_port.first - dnat.external_port.first
        marked = _MAPPED_TO(mark)
        # Equal-length ranges map port to port; nftables has no port-offset NAT, so a
        # range becomes one element per port.
        for port in range(dnat.external_port.first, dnat.external_port.last + 1):
            key = f"{eip} . {dnat.protocol} . {port}"
            dnat_target[key] = _MAPPED_TO(f"{internal} . {port + shift}")
            dnat_rule[key] = marked

    prefixes = {
        family: sorted({s.internal_cidr.prefixlen for s in state.snat if s.family == family.version}, reverse=True)
        for family in families
    }
    for family, lengths in prefixes.items():
        for p in lengths:
            sets.append(SetSpec(f"{family.snat_map(p)}_target", f"type {family.addr} : {family.addr};"))
            sets.append(SetSpec(f"{family.snat_map(p)}_rule", f"type {family.addr} : mark;"))
            elements[f"{family.snat_map(p)}_target"] = {}
            elements[f"{family.snat_map(p)}_rule"] = {}
    for snat in state.snat:
        family = V4 if snat.family == 4 else V6
        eip = eip_of[snat.eip, snat.family]
        mark = count(RuleLabels("snat", snat.name, eip))
        p, network = snat.internal_cidr.prefixlen, _TEXT(snat.internal_cidr.network_address)
        elements[f"{family.snat_map(p)}_target"][network] = _MAPPED_TO(eip)
        elements[f"{family.snat_map(p)}_rule"][network] = _MAPPED_TO(mark)

    share_chains = tuple(
        _share_chain(name, sorted(marks, key=int), family) for name, (family, marks) in sorted(share_groups.items())
    )
    chains = share_chains + _chains(state, prefixes)
    if network_ids(state):
        chains += (_steer(state, prefixes, sets, elements),)
    return DesiredTable(tuple(sets), chains, elements)


def _steer(
    state: DesiredState,
    prefixes: dict[_Family, list[int]],
    sets: list[SetSpec],
    elements: dict[str, dict[str, Element]],
) -> ChainSpec:
    """The maps from an EIP, a FIP's internal address and a SNAT CIDR to the id of the
    external network it uses (natgwd.planning.policy), and the chain that marks packets with it."""
    ids = network_ids(state)
    network_of: dict[tuple[str, int], Element] = {
        (e.name, a.version): _MAPPED_TO(str(ids[e.network])) for e in state.eips for a in e.addresses
    }
    internal = f'"{state.internal.interface}"'
    rules: list[str] = []
    for family, lengths in prefixes.items():
        ip, name, addr = family.ip, family.name, family.addr
        maps = [name("eip_network"), name("fip_out_network"), *(f"{family.snat_map(p)}_network" for p in lengths)]
        for map_name in maps:
            sets.append(SetSpec(map_name, f"type {addr} : mark;"))
            elements[map_name] = {}
        for eip in state.eips:
            address = eip.address(family.version)
            if address is not None:
                elements[name("eip_network")][_TEXT(address)] = network_of[eip.name, family.version]
        for fip in state.fip:
            if fip.family == family.version:
                elements[name("fip_out_network")][_TEXT(fip.internal_ip)] = network_of[fip.eip, fip.family]
        for snat in state.snat:
            if snat.family == family.version:
                key = _TEXT(snat.internal_cidr.network_address)
                map_name = f"{family.snat_map(snat.internal_cidr.prefixlen)}_network"
                elements[map_name][key] = network_of[snat.eip, snat.family]
        rules.append(
            f"iifname {internal} ct direction original meta mark set {ip} saddr map @{name('fip_out_network')}"
        )
        rules.extend(
            f"iifname {internal} ct direction original meta mark 0 "
            f"meta mark set {family.snat_key(p)} map @{family.snat_map(p)}_network"
            for p in lengths
        )
        rules.append(f"ct direction reply meta mark set ct original {ip} daddr map @{name('eip_network')}")
    return ChainSpec("steer", "type filter hook prerouting priority mangle; policy accept;", tuple(rules))
