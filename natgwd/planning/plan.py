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
from collections import Counter as CounterOf
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import NamedTuple

from natgwd.planning.handover import (
    DNAT_REPLY_GROUP,
    FIP_OUT_GROUP,
    HANDED_OVER,
    handover_chain,
    handover_sets,
    reply_keys,
)
from natgwd.planning.policy import network_ids
from natgwd.planning.table import ChainSpec, DesiredTable, Element, SetSpec
from natgwd.state.model import RULE_KINDS, DesiredState, DnatRule, FipRule, IPAddress, RuleKind, SnatRule
from natgwd.state.rules import Rule

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
    body = next(spec.body for spec in (*_STATIC_SETS, *handover_sets(())) if spec.name == name)
    return body.removeprefix("type ").split(";", 1)[0].split(" : ", 1)[0]


_MEMBER = Element()  # an element of a set: no value, no comment; one object for all of them


def address_text(address: IPAddress) -> str:
    # As nft prints it (inet_ntop), which differs from str() for the IPv4-compatible and
    # IPv4-mapped ranges ("::0.1.0.0" where Python says "::1:0").
    return str(address) if address.version == 4 else socket.inet_ntop(socket.AF_INET6, address.packed)


class RuleLabels(NamedTuple):
    """What identifies a rule to Prometheus; one id (and one set of counters) per value.
    A named tuple: planning makes one per rule, and a tuple is made in a third of a
    frozen dataclass's time."""

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
    return {(e.name, a.version): address_text(a) for e in state.eips for a in e.addresses}


def labels_of(rule: Rule, eip_text: Mapping[tuple[str, int], str]) -> RuleLabels:
    return RuleLabels(rule.kind, rule.name, eip_text[rule.eip, rule.family])


def rule_labels(state: DesiredState) -> list[RuleLabels]:
    eip_text = eip_texts(state)
    return [labels_of(rule, eip_text) for rules in (state.snat, state.dnat, state.fip) for rule in rules]


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


def changed_ids(
    ids: Mapping[RuleLabels, int], gone: Iterable[RuleLabels], arriving: Iterable[RuleLabels], highest_used: int
) -> dict[RuleLabels, int]:
    """`ids` without the rules `gone` and with the rules `arriving`. A rule that is both
    (changed, with the same name and EIP) keeps its id; a new one gets the next id above
    `highest_used`, which covers every id in `ids`."""
    result = dict(ids)
    taken = {labels: result.pop(labels) for labels in gone if labels in result}
    next_id = highest_used + 1
    for labels in arriving:
        if labels in taken:
            result[labels] = taken[labels]
        else:
            result[labels] = next_id
            next_id += 1
    return result


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


def _steer(state: DesiredState, prefixes: dict[_Family, list[int]]) -> ChainSpec:
    """The chain that marks packets with the id of the external network their translation
    uses (natgwd.planning.policy), from maps keyed like the NAT maps."""
    internal = f'"{state.internal.interface}"'
    rules: list[str] = []
    for family, lengths in prefixes.items():
        ip, name = family.ip, family.name
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


# --- one rule's elements ----------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """What a rule's elements depend on besides the rule: the EIPs' addresses as nft
    writes them and, with several external networks, the id of each EIP's network."""

    eip_text: Mapping[tuple[str, int], str]
    network_of: Mapping[tuple[str, int], Element] | None
    families: tuple[_Family, ...]
    # With scaleOut: the firewall mark of each EIP's group (natgwd.planning.handover).
    group_of: Mapping[str, Element] | None = None

    @classmethod
    def of(cls, state: DesiredState) -> Frame:
        ids = network_ids(state)
        network_of: dict[tuple[str, int], Element] | None = None
        if ids:
            network_of = {(e.name, a.version): Element(str(ids[e.network])) for e in state.eips for a in e.addresses}
        families = (V4, V6) if any(e.v6ip is not None for e in state.eips) else (V4,)
        group_of = None
        if state.scale_out is not None:
            group_of = {e.name: Element(str(state.scale_out.group_of(e.name).mark)) for e in state.eips}
        return cls(eip_texts(state), network_of, families, group_of)


Contribution = tuple[str, str, Element]  # (set, key, element)


def _family(rule: Rule) -> _Family:
    return V4 if rule.family == 4 else V6


def rule_elements(rule: Rule, labels: RuleLabels, mark: int, frame: Frame) -> list[Contribution]:
    """The elements a rule (with its labels and id) puts in the table, its counting
    elements included (not the share group's entry, which belongs to the group)."""
    family = _family(rule)
    name = family.name
    eip = labels.eip
    marked = Element(str(mark))
    elements: list[Contribution] = [
        (RULE_CONNECTIONS, str(mark), Element(comment=labels.comment)),
        *((RULE_TRAFFIC, traffic_key(direction, str(mark)), _MEMBER) for direction in DIRECTIONS),
    ]
    if isinstance(rule, FipRule):
        internal = address_text(rule.internal_ip)
        elements += [
            (name("fip_in_target"), eip, Element(internal)),
            (name("fip_in_rule"), eip, marked),
            (name("fip_out_target"), internal, Element(eip)),
            (name("fip_out_rule"), internal, marked),
        ]
        if frame.network_of is not None:
            elements.append((name("fip_out_network"), internal, frame.network_of[rule.eip, rule.family]))
        if frame.group_of is not None:
            elements.append((FIP_OUT_GROUP, internal, frame.group_of[rule.eip]))
    elif isinstance(rule, DnatRule):
        internal = address_text(rule.internal_ip)
        if rule.type == "share":
            elements.append((name("share_target"), str(mark), Element(f"{internal} . {rule.internal_port.first}")))
            return elements
        shift = rule.internal_port.first - rule.external_port.first
        # Equal-length ranges map port to port; nftables has no port-offset NAT, so a
        # range becomes one element per port.
        for port in range(rule.external_port.first, rule.external_port.last + 1):
            key = f"{eip} . {rule.protocol} . {port}"
            elements += [
                (name("dnat_target"), key, Element(f"{internal} . {port + shift}")),
                (name("dnat_rule"), key, marked),
            ]
    else:
        prefix = family.snat_map(rule.internal_cidr.prefixlen)
        key = address_text(rule.internal_cidr.network_address)
        elements += [(f"{prefix}_target", key, Element(eip)), (f"{prefix}_rule", key, marked)]
        if frame.network_of is not None:
            elements.append((f"{prefix}_network", key, frame.network_of[rule.eip, rule.family]))
        if frame.group_of is not None:
            elements.append((f"{prefix}_group", key, frame.group_of[rule.eip]))
    return elements


# --- the table, kept up to date rule by rule ---------------------------------------------


@dataclass(frozen=True)
class ShareGroup:
    """The share rules of one (EIP, protocol, port): one chain picks among their ids."""

    family: _Family
    key: str  # the dnat_share key: "EIP . protocol . port"
    marks: frozenset[int]


ElementChanges = dict[str, dict[str, Element | None]]  # set -> key -> new element (None: deleted)


@dataclass(frozen=True)
class TableChange:
    """What a change of rules does to the planned table: computed without touching it,
    so that nothing changes in memory unless the kernel took the transaction."""

    state: DesiredState
    ids: dict[RuleLabels, int]
    highest_id: int
    sets: tuple[SetSpec, ...]
    chains: tuple[ChainSpec, ...]
    elements: ElementChanges
    share_groups: dict[str, ShareGroup]
    snat_prefixes: CounterOf[tuple[int, int]]
    replies: CounterOf[tuple[str, str]]


class TablePlan:
    """The desired table of the applied state and what it is built from. A full plan
    folds every rule's elements into an empty table; a change removes the elements of the
    rules it drops and adds those of the rules it brings, so it costs what it changes."""

    def __init__(self, state: DesiredState, ids: Mapping[RuleLabels, int], highest_id: int = 0) -> None:
        self.state = state
        self.frame = Frame.of(state)
        self.ids: dict[RuleLabels, int] = {}
        self.highest_id = 0
        self.sets: tuple[SetSpec, ...] = ()
        self.chains: tuple[ChainSpec, ...] = ()
        self.elements: dict[str, dict[str, Element]] = {}
        self.share_groups: dict[str, ShareGroup] = {}
        self.snat_prefixes: CounterOf[tuple[int, int]] = CounterOf()
        # With scaleOut: how many DNAT rules put each (reply key, group mark) in
        # dnat_reply_group; two rules may share a backend address and port.
        self.replies: CounterOf[tuple[str, str]] = CounterOf()
        # Created in the sets' order, which the transaction's element commands follow.
        self.elements.update((spec.name, {}) for spec in _sets(self.frame, {}))
        for set_name, key, element in _frame_elements(state, self.frame):
            self.elements.setdefault(set_name, {})[key] = element
        self.elements[ID_HIGH_WATER] = {"0": _MEMBER}  # one element: the highest id ever given out
        every: tuple[Rule, ...] = (*state.snat, *state.dnat, *state.fip)
        rules = [(rule, labels_of(rule, self.frame.eip_text)) for rule in every]
        self.commit(self._change(state, (), rules, dict(ids), max(highest_id, *ids.values(), 0)))

    @property
    def table(self) -> DesiredTable:
        """The planned table; its elements are this plan's own, changed in place by commit."""
        return DesiredTable(self.sets, self.chains, self.elements)

    def change(self, state: DesiredState, removed: Sequence[Rule], added: Sequence[Rule]) -> TableChange:
        """The table of `state`, which differs from this plan's state by the rules
        `removed` and `added` only (its EIPs, networks and interfaces are the same)."""
        gone = [(rule, labels_of(rule, self.frame.eip_text)) for rule in removed]
        arriving = [(rule, labels_of(rule, self.frame.eip_text)) for rule in added]
        ids = changed_ids(self.ids, (labels for _, labels in gone), (labels for _, labels in arriving), self.highest_id)
        highest = max([self.highest_id, *(ids[labels] for _, labels in arriving)])
        return self._change(state, gone, arriving, ids, highest)

    def _change(
        self,
        state: DesiredState,
        removed: Sequence[tuple[Rule, RuleLabels]],
        added: Sequence[tuple[Rule, RuleLabels]],
        ids: dict[RuleLabels, int],
        highest_id: int,
    ) -> TableChange:
        changes: ElementChanges = defaultdict(dict)
        groups = dict(self.share_groups)
        prefixes = CounterOf(self.snat_prefixes)
        replies = CounterOf(self.replies) if self.frame.group_of is not None else self.replies
        for rule, labels in removed:
            mark = self.ids[labels]
            for set_name, key, _ in rule_elements(rule, labels, mark, self.frame):
                changes[set_name][key] = None
            self._count(rule, mark, groups, prefixes, -1)
            self._count_replies(rule, replies, changes, -1)
        for rule, labels in added:
            mark = ids[labels]
            for set_name, key, element in rule_elements(rule, labels, mark, self.frame):
                changes[set_name][key] = element
            self._count(rule, mark, groups, prefixes, +1)
            self._count_replies(rule, replies, changes, +1)
        for key in changes.get(DNAT_REPLY_GROUP, {}):
            # The lowest group when rules of two groups share a backend: its replies
            # cannot tell them apart (docs/scaling-out.md).
            marks = sorted(mark for (k, mark), count in replies.items() if k == key and count > 0)
            changes[DNAT_REPLY_GROUP][key] = Element(marks[0]) if marks else None
        for chain in groups.keys() | self.share_groups.keys():
            before, after = self.share_groups.get(chain), groups.get(chain)
            if (before is None) != (after is None):
                group = after or before
                assert group is not None
                changes[group.family.name("dnat_share")][group.key] = Element(f"goto {chain}") if after else None
        if highest_id != self.highest_id:
            changes[ID_HIGH_WATER] = {str(self.highest_id): None, str(highest_id): _MEMBER}
        # An element removed and added back the same is no change (a changed rule keeps
        # its id, so its counting elements stay and keep counting).
        for set_name, keyed in changes.items():
            current = self.elements.get(set_name, {})
            for key in [k for k, element in keyed.items() if current.get(k) == element]:
                del keyed[key]
        by_family = _prefixes_by_family(self.frame.families, prefixes)
        sets = _sets(self.frame, by_family)
        chains = _share_chains(groups) + _chains(state, by_family)
        if self.frame.network_of is not None:
            chains += (_steer(state, by_family),)
        if self.frame.group_of is not None:
            chains += (handover_chain(state, [(p, V4.snat_key(p)) for p in by_family[V4]]),)
        return TableChange(state, ids, highest_id, sets, chains, dict(changes), groups, prefixes, +replies)

    def _count_replies(
        self, rule: Rule, replies: CounterOf[tuple[str, str]], changes: ElementChanges, sign: int
    ) -> None:
        if self.frame.group_of is None or not isinstance(rule, DnatRule):
            return
        mark = self.frame.group_of[rule.eip].value
        assert mark is not None
        for key in reply_keys(rule):
            replies[key, mark] += sign
            changes[DNAT_REPLY_GROUP].setdefault(key, None)

    def _count(
        self, rule: Rule, mark: int, groups: dict[str, ShareGroup], prefixes: CounterOf[tuple[int, int]], sign: int
    ) -> None:
        """Keep the SNAT prefix lengths in use and the share groups' members up to date."""
        if isinstance(rule, SnatRule):
            prefixes[rule.family, rule.internal_cidr.prefixlen] += sign
            return
        if not isinstance(rule, DnatRule) or rule.type != "share":
            return
        eip, port = self.frame.eip_text[rule.eip, rule.family], rule.external_port.first
        chain = share_chain_name(eip, rule.protocol, port)
        group = groups.get(chain)
        marks = group.marks if group is not None else frozenset()
        marks = marks | {mark} if sign > 0 else marks - {mark}
        if marks:
            groups[chain] = ShareGroup(_family(rule), f"{eip} . {rule.protocol} . {port}", marks)
        else:
            groups.pop(chain, None)

    def commit(self, change: TableChange) -> None:
        """The kernel holds `change`: make it this plan's table (in place)."""
        for set_name in {s.name for s in self.sets} - {s.name for s in change.sets}:
            self.elements.pop(set_name, None)
        for spec in change.sets:
            self.elements.setdefault(spec.name, {})
        for set_name, keyed in change.elements.items():
            elements = self.elements.get(set_name)
            if elements is None:
                continue  # deleted with its set
            for key, element in keyed.items():
                if element is None:
                    del elements[key]
                else:
                    elements[key] = element
        self.state, self.ids, self.highest_id = change.state, change.ids, change.highest_id
        self.sets, self.chains = change.sets, change.chains
        self.share_groups, self.snat_prefixes = change.share_groups, +change.snat_prefixes
        self.replies = change.replies


def _frame_elements(state: DesiredState, frame: Frame) -> list[Contribution]:
    """The elements that do not belong to any one rule."""
    elements: list[Contribution] = [
        ((V4 if version == 4 else V6).name("eips"), address, _MEMBER)
        for (_, version), address in frame.eip_text.items()
    ]
    elements += [(INVALID_DROPS, f'"{network.interface}"', _MEMBER) for network in state.externals]
    if state.scale_out is not None:
        elements += [(HANDED_OVER, str(group.mark), _MEMBER) for group in state.scale_out.groups]
    if frame.network_of is not None:
        elements += [
            ((V4 if version == 4 else V6).name("eip_network"), frame.eip_text[name, version], network)
            for (name, version), network in frame.network_of.items()
        ]
    return elements


def _prefixes_by_family(families: Sequence[_Family], prefixes: CounterOf[tuple[int, int]]) -> dict[_Family, list[int]]:
    """The SNAT prefix lengths in use per family, longest first (the order they are tried in)."""
    in_use = [(version, p) for (version, p), count in prefixes.items() if count > 0]
    return {family: sorted((p for v, p in in_use if v == family.version), reverse=True) for family in families}


def _sets(frame: Frame, prefixes: dict[_Family, list[int]]) -> tuple[SetSpec, ...]:
    sets = list(_STATIC_SETS)
    if V6 in frame.families:
        sets.extend(V6.sets())
    for family, lengths in prefixes.items():
        for p in lengths:
            sets.append(SetSpec(f"{family.snat_map(p)}_target", f"type {family.addr} : {family.addr};"))
            sets.append(SetSpec(f"{family.snat_map(p)}_rule", f"type {family.addr} : mark;"))
    if frame.network_of is not None:
        for family, lengths in prefixes.items():
            names = [family.name("eip_network"), family.name("fip_out_network")]
            names += [f"{family.snat_map(p)}_network" for p in lengths]
            sets.extend(SetSpec(name, f"type {family.addr} : mark;") for name in names)
    if frame.group_of is not None:
        sets.extend(handover_sets(prefixes.get(V4, [])))
    return tuple(sets)


def _share_chains(groups: Mapping[str, ShareGroup]) -> tuple[ChainSpec, ...]:
    return tuple(
        _share_chain(name, [str(mark) for mark in sorted(group.marks)], group.family)
        for name, group in sorted(groups.items())
    )


def desired_table(state: DesiredState, ids: Mapping[RuleLabels, int], highest_id: int = 0) -> DesiredTable:
    """The table of `state` as a whole (a full plan)."""
    return TablePlan(state, ids, highest_id).table
