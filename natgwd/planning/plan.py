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
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from natgwd.planning.table import ChainSpec, DesiredTable, Element, SetSpec
from natgwd.state.memo import RoundMemo
from natgwd.state.model import DesiredState, RuleKind

RULE_CONNECTIONS = "rule_connections"
ID_HIGH_WATER = "id_high_water"
RULE_TRAFFIC = "rule_traffic"
INVALID_DROPS = "invalid_dropped"
DIRECTIONS = ("original", "reply")

_STATIC_SETS = (
    SetSpec("eips", "type ipv4_addr;"),
    SetSpec("fip_in_target", "type ipv4_addr : ipv4_addr;"),
    SetSpec("fip_in_rule", "type ipv4_addr : mark;"),
    SetSpec("fip_out_target", "type ipv4_addr : ipv4_addr;"),
    SetSpec("fip_out_rule", "type ipv4_addr : mark;"),
    SetSpec("dnat_target", "type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service;"),
    SetSpec("dnat_rule", "type ipv4_addr . inet_proto . inet_service : mark;"),
    SetSpec("dnat_share", "type ipv4_addr . inet_proto . inet_service : verdict;"),
    SetSpec("share_target", "type mark : ipv4_addr . inet_service;"),
    SetSpec(RULE_CONNECTIONS, "type mark; counter;"),
    SetSpec(RULE_TRAFFIC, "type ct_dir . mark; counter;"),
    SetSpec(INVALID_DROPS, "type ifname; counter;"),
    # One element: the highest rule id ever given out, so that ids stay unique across restarts.
    SetSpec(ID_HIGH_WATER, "type mark;"),
)


def set_key_type(name: str) -> str:
    """The key type a static set declares ("ct_dir . mark" for "type ct_dir . mark; counter;")."""
    body = next(spec.body for spec in _STATIC_SETS if spec.name == name)
    return body.removeprefix("type ").split(";", 1)[0].split(" : ", 1)[0]


_DNAT_KEY = "ip daddr . meta l4proto . th dport"
_MEMBER = Element()  # an element of a set: no value, no comment; one object for all of them
# Kept from one plan to the next: str() of an address costs microseconds, and an element
# that is the very object of the last plan is found unchanged without comparing it.
_TEXT: RoundMemo[IPv4Address, str] = RoundMemo(str)
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
        if len(parts) != 3 or parts[0] not in ("snat", "dnat", "fip"):
            return None
        kind: RuleKind = parts[0]  # type: ignore[assignment]
        return cls(kind, parts[1], parts[2])


def rule_labels(state: DesiredState) -> list[RuleLabels]:
    eip_of = {e.name: str(e.v4ip) for e in state.eips}
    labels: list[RuleLabels] = []
    for kind, rules in (("snat", state.snat), ("dnat", state.dnat), ("fip", state.fip)):
        for rule in rules:
            labels.append(RuleLabels(kind, rule.name, eip_of[rule.eip]))  # type: ignore[arg-type]
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


def _mask(prefixlen: int) -> str:
    return str(IPv4Network(f"0.0.0.0/{prefixlen}").netmask)


def _snat_key(prefixlen: int) -> str:
    return "ip saddr" if prefixlen == 32 else f"ip saddr & {_mask(prefixlen)}"


def share_chain_name(eip: str, protocol: str, port: int) -> str:
    # Named by the identity alone: the chain's rules change with its backends, its name never.
    return "share_" + hashlib.sha256(f"{eip}/{protocol}/{port}".encode()).hexdigest()[:16]


def _share_chain(name: str, marks: list[str]) -> ChainSpec:
    choices = ", ".join(f"{index} : {mark}" for index, mark in enumerate(marks))
    return ChainSpec(
        name,
        "",
        (
            # One random draw picks the backend's rule id; the DNAT target follows from it,
            # so the connection is counted for the backend it really went to.
            f"ct mark set numgen random mod {len(marks)} map {{ {choices} }}",
            "meta l4proto { tcp, udp } dnat ip to ct mark map @share_target",
        ),
    )


def _chains(state: DesiredState, snat_prefixes: list[int]) -> tuple[ChainSpec, ...]:
    internal = f'"{state.internal.interface}"'
    external = f'"{state.external.interface}"'
    snat_rules = tuple(
        f"oifname {external} ct mark set {_snat_key(p)} map @snat_p{p}_rule "
        f"snat ip to {_snat_key(p)} map @snat_p{p}_target fully-random"
        for p in snat_prefixes
    )
    return (
        ChainSpec(
            "prerouting",
            "type nat hook prerouting priority dstnat; policy accept;",
            (
                "ct mark set ip daddr map @fip_in_rule dnat ip to ip daddr map @fip_in_target",
                f"meta l4proto {{ tcp, udp }} ct mark set {_DNAT_KEY} map @dnat_rule "
                f"dnat ip to {_DNAT_KEY} map @dnat_target",
                f"meta l4proto {{ tcp, udp }} {_DNAT_KEY} vmap @dnat_share",
            ),
        ),
        ChainSpec(
            "postrouting",
            "type nat hook postrouting priority srcnat; policy accept;",
            (
                # Hairpin: a VPC client reached an EIP that was DNATed back into the VPC;
                # without this the backend would answer the client directly. A client with
                # a FIP shows up as its FIP, as Kube-OVN's (FIP SNAT first, on any
                # interface); the map lookup fails, and the next rule applies, for others.
                f"iifname {internal} oifname {internal} ct status dnat "
                "ct original ip daddr @eips snat ip to ip saddr map @fip_out_target",
                f"iifname {internal} oifname {internal} ct status dnat "
                "ct original ip daddr @eips snat ip to ct original ip daddr",
                f"oifname {external} ct mark set ip saddr map @fip_out_rule snat ip to ip saddr map @fip_out_target",
                *snat_rules,
            ),
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
    eip_of = {e.name: _TEXT(e.v4ip) for e in state.eips}
    elements: dict[str, dict[str, Element]] = {spec.name: {} for spec in _STATIC_SETS}
    elements[ID_HIGH_WATER] = {str(max(highest_id, *ids.values(), 0)): _MEMBER}
    elements["eips"] = dict.fromkeys(eip_of.values(), _MEMBER)
    elements[INVALID_DROPS] = {f'"{state.external.interface}"': _MEMBER}
    connections, traffic = elements[RULE_CONNECTIONS], elements[RULE_TRAFFIC]

    def count(labels: RuleLabels) -> str:
        mark = str(ids[labels])
        connections[mark] = _COMMENTED(labels.comment)
        for direction in DIRECTIONS:
            traffic[f"{direction} . {mark}"] = _MEMBER
        return mark

    for fip in state.fip:
        eip, internal = eip_of[fip.eip], _TEXT(fip.internal_ip)
        marked = _MAPPED_TO(count(RuleLabels("fip", fip.name, eip)))
        elements["fip_in_target"][eip] = _MAPPED_TO(internal)
        elements["fip_in_rule"][eip] = marked
        elements["fip_out_target"][internal] = _MAPPED_TO(eip)
        elements["fip_out_rule"][internal] = marked

    share_groups: dict[str, list[str]] = {}
    dnat_target, dnat_rule = elements["dnat_target"], elements["dnat_rule"]
    for dnat in state.dnat:
        eip, internal = eip_of[dnat.eip], _TEXT(dnat.internal_ip)
        mark = count(RuleLabels("dnat", dnat.name, eip))
        if dnat.type == "share":
            port = dnat.external_port.first
            chain = share_chain_name(eip, dnat.protocol, port)
            elements["dnat_share"][f"{eip} . {dnat.protocol} . {port}"] = _MAPPED_TO(f"goto {chain}")
            elements["share_target"][mark] = _MAPPED_TO(f"{internal} . {dnat.internal_port.first}")
            share_groups.setdefault(chain, []).append(mark)
            continue
        shift = dnat.internal_port.first - dnat.external_port.first
        marked = _MAPPED_TO(mark)
        # Equal-length ranges map port to port; nftables has no port-offset NAT, so a
        # range becomes one element per port.
        for port in range(dnat.external_port.first, dnat.external_port.last + 1):
            key = f"{eip} . {dnat.protocol} . {port}"
            dnat_target[key] = _MAPPED_TO(f"{internal} . {port + shift}")
            dnat_rule[key] = marked

    prefixes = sorted({snat.internal_cidr.prefixlen for snat in state.snat}, reverse=True)
    sets = list(_STATIC_SETS)
    for p in prefixes:
        sets.append(SetSpec(f"snat_p{p}_target", "type ipv4_addr : ipv4_addr;"))
        sets.append(SetSpec(f"snat_p{p}_rule", "type ipv4_addr : mark;"))
        elements[f"snat_p{p}_target"] = {}
        elements[f"snat_p{p}_rule"] = {}
    for snat in state.snat:
        eip = eip_of[snat.eip]
        mark = count(RuleLabels("snat", snat.name, eip))
        p, network = snat.internal_cidr.prefixlen, _TEXT(snat.internal_cidr.network_address)
        elements[f"snat_p{p}_target"][network] = _MAPPED_TO(eip)
        elements[f"snat_p{p}_rule"][network] = _MAPPED_TO(mark)

    share_chains = tuple(_share_chain(name, sorted(marks, key=int)) for name, marks in sorted(share_groups.items()))
    return DesiredTable(tuple(sets), share_chains + _chains(state, prefixes), elements)
