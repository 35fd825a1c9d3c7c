"""Plan the nftables table for a desired state: static chains, data in maps.

Layout (family inet, table natgwd):

- Every NAT rule has a numeric id. The NAT statement that translates a connection also
  sets the connection's ct mark to that id, and a filter chain after source NAT counts
  each packet by (ct direction, ct mark) in `rule_traffic` and each new connection by ct
  mark in `rule_connections`. Counters are therefore keyed by rule, whatever map the rule
  lives in, and survive changes to other rules. Both sets are split by rule id into
  shards, each counted by a chain of its own (natgwd.planning.layout.shard).
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
- natgwd's own endpoints (/metrics on loopback or the pod's address, the edit endpoint on
  loopback) are not tracked ("untracked_in"/"untracked_out", at raw priority): a full
  conntrack table must not cut natgwd off from its probes, its scrapes and the
  controller's calls, just when it matters most. Only those address:port pairs: NAT
  traffic is tracked as ever.
"""

from __future__ import annotations

import socket
from collections import Counter as CounterOf
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import NamedTuple, cast

from natgwd.planning.bfdgate import gate_chains, gate_sets
from natgwd.planning.handover import (
    DNAT_REPLY_GROUP,
    FIP_OUT_GROUP,
    HANDED_OVER,
    SNAT_DST_GROUP,
    handover_chain,
    handover_sets,
    reply_keys,
    snat_group,
)
from natgwd.planning.layout import (
    ACCOUNT,
    COUNTING_SHARDS,
    DIRECTIONS,
    DNAT_RULE,
    DNAT_SHARE,
    DNAT_TARGET,
    EIP_NETWORK,
    EIPS,
    FAMILIES,
    FIP_IN_RULE,
    FIP_IN_TARGET,
    FIP_OUT_NETWORK,
    FIP_OUT_RULE,
    FIP_OUT_TARGET,
    FORWARD,
    ID_HIGH_WATER,
    INVALID_DROPS,
    POSTROUTING,
    PREROUTING,
    RULE_CONNECTIONS,
    RULE_TRAFFIC,
    SHARE_TARGET,
    SNAT_DST_NETWORK,
    SNAT_DST_POOL,
    SNAT_DST_RULE,
    SNAT_DST_TARGET,
    SNAT_POOL_TARGET,
    STEER,
    UNTRACKED_IN,
    UNTRACKED_OUT,
    V4,
    V6,
    Family,
    account_shard,
    parts,
    pool_chain_name,
    shard,
    shards,
    share_chain_name,
    traffic_key,
    whole_elements,
)
from natgwd.planning.policy import network_ids
from natgwd.planning.pools import Pool, counted, members, pool_chains, pool_shares
from natgwd.planning.portblocks import ACCOUNT_RULE, block_elements, decoded_block, postrouting_rule
from natgwd.planning.portblocks import SETS as PORT_BLOCK_SETS
from natgwd.planning.table import ChainSpec, DesiredTable, Element, ObjectSpec, SetSpec, TableContents
from natgwd.planning.timeouts import (
    RETAINED_OBJECTS,
    RULE_TIMEOUT,
    effective_policy,
    timeout_chains,
    timeout_element,
    timeout_objects,
    timeout_sets,
)
from natgwd.state.model import (
    RULE_KINDS,
    DesiredState,
    DnatRule,
    Eip,
    FipRule,
    IPAddress,
    IPNetwork,
    PortRange,
    Protocol,
    RuleKind,
    SnatRule,
)
from natgwd.state.rules import Rule
from natgwd.state.timeouts import TimeoutPolicy

_STATIC_SETS = (
    *V4.sets(),
    *(SetSpec(name, "type mark; counter;") for name in shards(RULE_CONNECTIONS)),
    *(SetSpec(name, "type ct_dir . mark; counter;") for name in shards(RULE_TRAFFIC)),
    SetSpec(INVALID_DROPS, "type ifname; counter;"),
    # One element: the highest rule id ever given out, so that ids stay unique across restarts.
    SetSpec(ID_HIGH_WATER, "type mark;"),
)


def set_key_type(name: str) -> str:
    """The key type a static set declares ("ct_dir . mark" for "type ct_dir . mark; counter;");
    a logical set's is its shards'."""
    name = parts(name)[0]
    body = next(spec.body for spec in (*_STATIC_SETS, *handover_sets(()), *PORT_BLOCK_SETS) if spec.name == name)
    return body.removeprefix("type ").split(";", 1)[0].split(" : ", 1)[0]


_MEMBER = Element()  # an element of a set: no value, no comment; one object for all of them


def address_text(address: IPAddress) -> str:
    # As nft prints it (inet_ntop), which differs from str() for the IPv4-compatible and
    # IPv4-mapped ranges ("::0.1.0.0" where Python says "::1:0"). For IPv4 it is str()'s
    # text in a tenth of str()'s time (a full plan writes every rule's address).
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    return socket.inet_ntop(family, address.packed)


def network_text(network: IPNetwork) -> str:
    """A network as nft lists an interval key: a host prefix as the bare address."""
    address = address_text(network.network_address)
    return address if network.prefixlen == network.max_prefixlen else f"{address}/{network.prefixlen}"


# The key of the SNAT rules by destination in the count of SNAT prefix lengths in use.
DESTINED = -1


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


def planned(rules: Iterable[Rule], eip_text: Mapping[tuple[str, int], str]) -> list[tuple[Rule, RuleLabels]]:
    """The rules as planned, each with its labels: a SNAT pool as its members, one per EIP."""
    found: list[tuple[Rule, RuleLabels]] = []
    for rule in rules:
        if type(rule) is SnatRule and rule.pool:
            found.extend((member, labels_of(member, eip_text)) for member in members(rule))
        else:
            found.append((rule, labels_of(rule, eip_text)))
    return found


def rule_labels(state: DesiredState) -> list[RuleLabels]:
    eip_text = eip_texts(state)
    return [labels for _, labels in planned((*state.snat, *state.dnat, *state.fip), eip_text)]


def assign_ids(state: DesiredState, existing: Mapping[RuleLabels, int], highest_used: int = 0) -> dict[RuleLabels, int]:
    """Keep the id of every rule that already has one; give new rules ids above every id
    ever used (`highest_used`), so that a conntrack entry still marked with a deleted rule's
    id is never counted as another rule's traffic."""
    return _assigned(rule_labels(state), existing, highest_used)


def _assigned(
    in_order: Iterable[RuleLabels], existing: Mapping[RuleLabels, int], highest_used: int
) -> dict[RuleLabels, int]:
    ids: dict[RuleLabels, int] = {}
    next_id = max(highest_used, *existing.values(), 0) + 1
    for labels in in_order:
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


def _share_chain(name: str, marks: list[str], family: Family) -> ChainSpec:
    choices = ", ".join(f"{index} : {mark}" for index, mark in enumerate(marks))
    return ChainSpec(
        name,
        "",
        (
            # One random draw picks the backend's rule id; the DNAT target follows from it,
            # so the connection is counted for the backend it really went to.
            f"ct mark set numgen random mod {len(marks)} map {{ {choices} }}",
            f"meta l4proto {{ tcp, udp }} dnat {family.ip} to ct mark map @{family.name(SHARE_TARGET)}",
        ),
    )


def _prerouting(family: Family) -> tuple[str, ...]:
    ip, name = family.ip, family.name
    dnat_key = f"{ip} daddr . meta l4proto . th dport"
    return (
        f"ct mark set {ip} daddr map @{name(FIP_IN_RULE)} dnat {ip} to {ip} daddr map @{name(FIP_IN_TARGET)}",
        f"meta l4proto {{ tcp, udp }} ct mark set {dnat_key} map @{name(DNAT_RULE)} "
        f"dnat {ip} to {dnat_key} map @{name(DNAT_TARGET)}",
        f"meta l4proto {{ tcp, udp }} {dnat_key} vmap @{name(DNAT_SHARE)}",
    )


def _external_interfaces(state: DesiredState) -> str:
    names = [f'"{network.interface}"' for network in state.externals]
    return names[0] if len(names) == 1 else "{ " + ", ".join(names) + " }"


def _postrouting(
    state: DesiredState, family: Family, snat_prefixes: list[int], pooled: list[int], destined: bool, blocked: bool
) -> tuple[str, ...]:
    internal = f'"{state.internal.interface}"'
    external = _external_interfaces(state)
    ip, name = family.ip, family.name
    return (
        # Hairpin: a VPC client reached an EIP that was DNATed back into the VPC;
        # without this the backend would answer the client directly. A client with a FIP
        # shows up as its FIP, as in Kube-OVN (FIP SNAT first, on any interface); for
        # others the map lookup fails and the next rule applies.
        f"iifname {internal} oifname {internal} ct status dnat "
        f"ct original {ip} daddr @{name(EIPS)} snat {ip} to {ip} saddr map @{name(FIP_OUT_TARGET)}",
        f"iifname {internal} oifname {internal} ct status dnat "
        f"ct original {ip} daddr @{name(EIPS)} snat {ip} to ct original {ip} daddr",
        f"oifname {external} ct mark set {ip} saddr map @{name(FIP_OUT_RULE)} "
        f"snat {ip} to {ip} saddr map @{name(FIP_OUT_TARGET)}",
        # SNAT rules by destination, before those by source alone (natgwd.state.destinations).
        *(_destined(external, family) if destined else ()),
        *((postrouting_rule(external),) if blocked and family is V4 else ()),
        *(
            rule
            for p in snat_prefixes
            for rule in (
                f"oifname {external} ct mark set {family.snat_key(p)} map @{family.snat_rule(p)} "
                f"snat {ip} to {family.snat_key(p)} map @{family.snat_target(p)} fully-random",
                # Pools of this prefix length (natgwd.planning.pools): to the rule's chain.
                *((f"oifname {external} {family.snat_key(p)} vmap @{family.snat_pool(p)}",) if p in pooled else ()),
            )
        ),
    )


def _masquerade(state: DesiredState) -> tuple[str, ...]:
    """internal.masquerade: connections from outside translated to an internal address
    take the internal interface's address, so that the backend answers the gateway (after
    the hairpin rules, which give VPC clients the EIP instead)."""
    if not state.internal.masquerade:
        return ()
    return (f'oifname "{state.internal.interface}" ct status dnat masquerade',)


def _destined(external: str, family: Family) -> tuple[str, ...]:
    ip, name, key = family.ip, family.name, f"{family.ip} saddr . {family.ip} daddr"
    return (
        f"oifname {external} ct mark set {key} map @{name(SNAT_DST_RULE)} "
        f"snat {ip} to {key} map @{name(SNAT_DST_TARGET)} fully-random",
        f"oifname {external} {key} vmap @{name(SNAT_DST_POOL)}",
    )


def _chains(
    state: DesiredState,
    snat_prefixes: dict[Family, list[int]],
    pooled: dict[Family, list[int]],
    destined: frozenset[Family],
    blocked: bool,
) -> tuple[ChainSpec, ...]:
    """`blocked`: some SNAT rule has port blocks."""
    return (
        ChainSpec(
            PREROUTING,
            "type nat hook prerouting priority dstnat; policy accept;",
            tuple(rule for family in snat_prefixes for rule in _prerouting(family)),
        ),
        ChainSpec(
            POSTROUTING,
            "type nat hook postrouting priority srcnat; policy accept;",
            (
                *(
                    rule
                    for family, prefixes in snat_prefixes.items()
                    for rule in _postrouting(state, family, prefixes, pooled[family], family in destined, blocked)
                ),
                *_masquerade(state),
            ),
        ),
        *_account_shards(),
        ChainSpec(
            ACCOUNT,
            # After source NAT (100), so the first packet of a SNATed flow is marked too.
            "type filter hook postrouting priority 300; policy accept;",
            (
                # To the chain of the rule's shard: one lookup, whatever the number of shards.
                f"ct mark & {COUNTING_SHARDS - 1} vmap {{ "
                + ", ".join(f"{index} : jump {account_shard(index)}" for index in range(COUNTING_SHARDS))
                + " }",
                *((ACCOUNT_RULE,) if blocked else ()),
            ),
        ),
        ChainSpec(
            FORWARD,
            "type filter hook forward priority filter; policy accept;",
            # Netfilter does not NAT packets conntrack calls invalid (e.g. a late RST):
            # they would leave with an internal source address.
            (f"ct state invalid oifname @{INVALID_DROPS} drop",),
        ),
    )


def _account_shards() -> Iterator[ChainSpec]:
    """The chains that count a shard's rules (natgwd.planning.layout.shard)."""
    for index, (connections, traffic) in enumerate(zip(shards(RULE_CONNECTIONS), shards(RULE_TRAFFIC), strict=True)):
        yield ChainSpec(
            account_shard(index),
            "",
            (
                # The first packet of a connection is the one whose conntrack entry is not
                # confirmed yet (`ct state new` would also match retransmits before a reply).
                f"ct status & confirmed == 0 ct mark @{connections}",
                f"ct direction . ct mark @{traffic}",
            ),
        )


Endpoint = tuple[IPv4Address | IPv6Address, int | None]  # natgwd's own listening address, TCP port (None: every port)


def _untracked(endpoints: Sequence[Endpoint]) -> tuple[ChainSpec, ...]:
    """The chains that keep natgwd's own endpoints' traffic out of conntrack: packets to
    them on the way in (and, from a local client, on the way out), and their replies.
    Looped-back packets keep what the output hook gave them."""
    if not endpoints:
        return ()
    arriving, leaving = [], []
    for address, port in endpoints:
        ip = "ip" if address.version == 4 else "ip6"
        to, back = ("", "") if port is None else (f" tcp dport {port}", f" tcp sport {port}")
        arriving.append(f"{ip} daddr {address}{to} notrack")
        leaving += [f"{ip} daddr {address}{to} notrack", f"{ip} saddr {address}{back} notrack"]
    return (
        ChainSpec(UNTRACKED_IN, "type filter hook prerouting priority raw; policy accept;", tuple(arriving)),
        ChainSpec(UNTRACKED_OUT, "type filter hook output priority raw; policy accept;", tuple(leaving)),
    )


def _steer(state: DesiredState, prefixes: dict[Family, list[int]], destined: frozenset[Family]) -> ChainSpec:
    """The chain that marks packets with the id of the external network their translation
    uses (natgwd.planning.policy), from maps keyed like the NAT maps."""
    internal = f'"{state.internal.interface}"'
    rules: list[str] = []
    for family, lengths in prefixes.items():
        ip, name = family.ip, family.name
        rules.append(f"iifname {internal} ct direction original meta mark set {ip} saddr map @{name(FIP_OUT_NETWORK)}")
        if family in destined:
            rules.append(
                f"iifname {internal} ct direction original meta mark 0 "
                f"meta mark set {ip} saddr . {ip} daddr map @{name(SNAT_DST_NETWORK)}"
            )
        rules.extend(
            f"iifname {internal} ct direction original meta mark 0 "
            f"meta mark set {family.snat_key(p)} map @{family.snat_network(p)}"
            for p in lengths
        )
        rules.append(f"ct direction reply meta mark set ct original {ip} daddr map @{name(EIP_NETWORK)}")
    return ChainSpec(STEER, "type filter hook prerouting priority mangle; policy accept;", tuple(rules))


# --- one rule's elements ----------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """What a rule's elements depend on besides the rule: the EIPs' addresses as nft
    writes them and, with several external networks, the id of each EIP's network."""

    eip_text: Mapping[tuple[str, int], str]
    network_of: Mapping[tuple[str, int], Element] | None
    families: tuple[Family, ...]
    # With scaleOut: the firewall mark of each EIP's group (natgwd.planning.handover).
    group_of: Mapping[str, Element] | None = None
    timeouts: TimeoutPolicy | None = None  # the gateway's idle timeouts
    draining: frozenset[str] = frozenset()  # EIP names (natgwd.planning.pools)

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
        draining = frozenset(e.name for e in state.eips if e.draining)
        return cls(eip_texts(state), network_of, families, group_of, state.timeouts, draining)


Contribution = tuple[str, str, Element]  # (set, key, element)


def _family(rule: Rule) -> Family:
    return V4 if rule.family == 4 else V6


def rule_elements(rule: Rule, labels: RuleLabels, mark: int, frame: Frame) -> list[Contribution]:
    """The elements a rule (with its labels and id) puts in the table, its counting
    elements included (not the share group's entry, which belongs to the group)."""
    family = _family(rule)
    name = family.name
    eip = labels.eip
    text = str(mark)
    marked = Element(text)
    connections, traffic = shard(RULE_CONNECTIONS, mark), shard(RULE_TRAFFIC, mark)
    elements: list[Contribution] = [(connections, text, Element(comment=labels.comment))]
    for direction in DIRECTIONS:
        elements.append((traffic, traffic_key(direction, text), _MEMBER))
    policy = effective_policy(rule, frame.timeouts)
    if policy is not None:
        elements.append((RULE_TIMEOUT, text, timeout_element(policy)))
    if isinstance(rule, FipRule):
        internal = address_text(rule.internal_ip)
        elements += [
            (name(FIP_IN_TARGET), eip, Element(internal)),
            (name(FIP_IN_RULE), eip, marked),
            (name(FIP_OUT_TARGET), internal, Element(eip)),
            (name(FIP_OUT_RULE), internal, marked),
        ]
        if frame.network_of is not None:
            elements.append((name(FIP_OUT_NETWORK), internal, frame.network_of[rule.eip, rule.family]))
        if frame.group_of is not None:
            elements.append((FIP_OUT_GROUP, internal, frame.group_of[rule.eip]))
    elif isinstance(rule, DnatRule):
        internal = address_text(rule.internal_ip)
        if rule.type == "share":
            elements.append((name(SHARE_TARGET), str(mark), Element(f"{internal} . {rule.internal_port.first}")))
            return elements
        shift = rule.internal_port.first - rule.external_port.first
        target, by_id, prefix = name(DNAT_TARGET), name(DNAT_RULE), f"{eip} . {rule.protocol} . "
        # Equal-length ranges map port to port; nftables has no port-offset NAT, so a
        # range becomes one element per port.
        for port in range(rule.external_port.first, rule.external_port.last + 1):
            key = f"{prefix}{port}"
            elements.append((target, key, Element(f"{internal} . {port + shift}")))
            elements.append((by_id, key, marked))
    else:
        elements += _snat_elements(rule, eip, mark, marked, frame)
        if rule.port_block is not None:
            elements += block_elements(rule, eip, marked)
    return elements


def _snat_elements(rule: SnatRule, eip: str, mark: int, marked: Element, frame: Frame) -> list[Contribution]:
    family = _family(rule)
    name = family.name
    pooled = bool(rule.pool) or rule.eip in frame.draining
    if not (pooled or rule.destinations or frame.network_of or frame.group_of):
        # Most rules (planned 50,000 at a time): a source network and its EIP.
        p, key = rule.internal_cidr.prefixlen, address_text(rule.internal_cidr.network_address)
        return [(family.snat_target(p), key, Element(eip)), (family.snat_rule(p), key, marked)]
    if rule.destinations:
        source = network_text(rule.internal_cidr)
        keys = [f"{source} . {network_text(d)}" for d in rule.destinations]
        target, by_id, to_pool = name(SNAT_DST_TARGET), name(SNAT_DST_RULE), name(SNAT_DST_POOL)
        network, group = name(SNAT_DST_NETWORK), SNAT_DST_GROUP
    else:
        p = rule.internal_cidr.prefixlen
        keys = [address_text(rule.internal_cidr.network_address)]
        target, by_id, to_pool = family.snat_target(p), family.snat_rule(p), family.snat_pool(p)
        network, group = family.snat_network(p), snat_group(p)
    elements: list[Contribution] = []
    # A member of a pool (a rule on a draining EIP is a pool of one): its EIP by its id,
    # and its keys sent to the pool's chain.
    if pooled:
        elements.append((name(SNAT_POOL_TARGET), str(mark), Element(eip)))
        to_chain = Element(f"goto {pool_chain_name(rule.family, rule.name)}")
    for key in keys:
        if pooled:
            elements.append((to_pool, key, to_chain))
        else:
            elements += [(target, key, Element(eip)), (by_id, key, marked)]
        if frame.network_of is not None:
            elements.append((network, key, frame.network_of[rule.eip, rule.family]))
        if frame.group_of is not None:
            elements.append((group, key, frame.group_of[rule.eip]))
    return elements


@dataclass(frozen=True)
class TableRule:
    """A rule as a table holds it: its id, its labels (None when its `rule_connections`
    element has none of this rule's kind) and the rule, named as its labels say ("" without
    them) and naming its EIP by address, as nft writes it: the table knows no EIP names."""

    mark: int
    labels: RuleLabels | None
    rule: Rule


def decode_rules(contents: TableContents) -> list[TableRule]:
    """The rules a table holds, read back from their elements: what rule_elements wrote
    (tests/unit/test_decode_rules.py proves the round trip). A translation without its
    rule's id is no rule. ValueError for elements of another layout."""
    labels: dict[int, RuleLabels] = {}
    for mark, element in whole_elements(contents.elements, RULE_CONNECTIONS):
        found = RuleLabels.from_comment(element.comment or "")
        if found is not None:
            labels[int(mark)] = found
    decoded: list[TableRule] = []
    for family in FAMILIES:
        for mark, rule in (
            *_fips(contents.elements, family),
            *_dnats(contents.elements, family),
            *_shares(contents, family),
            *_snats(contents.elements, family),
            *_pool_snats(contents, family),
            *_destined_snats(contents, family),
        ):
            number = int(mark)
            found = labels.get(number)
            if found is None or found.kind != rule.kind:
                decoded.append(TableRule(number, None, rule))
            else:
                decoded.append(TableRule(number, found, replace(rule, name=found.name)))
    return decoded


Decoded = Iterator[tuple[str, Rule]]  # (the rule's id as the table holds it, the rule without its name)


def _fips(elements: Mapping[str, Mapping[str, Element]], family: Family) -> Decoded:
    targets = elements.get(family.name(FIP_IN_TARGET), {})
    for eip, marked in elements.get(family.name(FIP_IN_RULE), {}).items():
        target = targets.get(eip)
        if target is not None and marked.value is not None:
            yield marked.value, FipRule("", eip, ip_address(target.value or ""))


def _dnats(elements: Mapping[str, Mapping[str, Element]], family: Family) -> Decoded:
    """Exclusive DNAT rules: a range is one element per port, each with the rule's id."""
    ports: dict[str, list[tuple[int, str, str, str, int]]] = defaultdict(list)
    targets = elements.get(family.name(DNAT_TARGET), {})
    for key, marked in elements.get(family.name(DNAT_RULE), {}).items():
        target = targets.get(key)
        if target is not None and marked.value is not None:
            eip, protocol, port = _split(key)
            internal, internal_port = _split(target.value)
            ports[marked.value].append((int(port), eip, protocol, internal, int(internal_port)))
    for mark, found in ports.items():
        found.sort()
        first, eip, protocol, internal, internal_first = found[0]
        last = found[-1][0]
        external, shifted = PortRange(first, last), PortRange(internal_first, internal_first + last - first)
        yield mark, DnatRule("", eip, _protocol(protocol), external, ip_address(internal), shifted)


def _shares(contents: TableContents, family: Family) -> Decoded:
    """Share DNAT rules: a group's chain picks among its members' ids (TableContents.shares)."""
    backends = contents.elements.get(family.name(SHARE_TARGET), {})
    for key, verdict in contents.elements.get(family.name(DNAT_SHARE), {}).items():
        eip, protocol, port = _split(key)
        external = PortRange(int(port), int(port))
        for mark in contents.shares.get((verdict.value or "").split()[-1], ()):
            backend = backends.get(str(mark))
            if backend is not None:
                address, backend_port = _split(backend.value)
                internal = PortRange(int(backend_port), int(backend_port))
                yield (
                    str(mark),
                    DnatRule("", eip, _protocol(protocol), external, ip_address(address), internal, "share"),
                )


def _snats(elements: Mapping[str, Mapping[str, Element]], family: Family) -> Decoded:
    for set_name, marks in elements.items():
        prefixlen = family.snat_rule_prefix(set_name)
        if prefixlen is None:
            continue
        targets = elements.get(family.snat_target(prefixlen), {})
        for network, marked in marks.items():
            target = targets.get(network)
            if target is not None and target.value is not None and marked.value is not None:
                block = decoded_block(elements, network, marked.value) if family is V4 else None
                yield marked.value, SnatRule("", target.value, ip_network(f"{network}/{prefixlen}"), port_block=block)


def _pool_snats(contents: TableContents, family: Family) -> Decoded:
    """The members of SNAT pools that take new connections: the ids their chain picks among."""
    targets = contents.elements.get(family.name(SNAT_POOL_TARGET), {})
    for set_name, networks in contents.elements.items():
        prefixlen = family.snat_pool_prefix(set_name)
        if prefixlen is None:
            continue
        for network, verdict in networks.items():
            for mark in sorted(set(contents.shares.get((verdict.value or "").split()[-1], ()))):
                target = targets.get(str(mark))
                if target is not None and target.value is not None:
                    yield str(mark), SnatRule("", target.value, ip_network(f"{network}/{prefixlen}"))


def _destined_snats(contents: TableContents, family: Family) -> Decoded:
    """SNAT rules by destination: each id's source network and destinations, and its EIP
    (a pool's members that take new connections by their chain's ids)."""
    found: dict[str, tuple[str, list[str]]] = {}  # id -> (source, destinations)
    eip_of: dict[str, str] = {}
    targets = contents.elements.get(family.name(SNAT_DST_TARGET), {})
    for key, marked in contents.elements.get(family.name(SNAT_DST_RULE), {}).items():
        target = targets.get(key)
        if target is not None and target.value is not None and marked.value is not None:
            eip_of[marked.value] = target.value
            found.setdefault(marked.value, (_split(key)[0], []))[1].append(_split(key)[1])
    pool_targets = contents.elements.get(family.name(SNAT_POOL_TARGET), {})
    for key, verdict in contents.elements.get(family.name(SNAT_DST_POOL), {}).items():
        for member in sorted(set(contents.shares.get((verdict.value or "").split()[-1], ()))):
            target = pool_targets.get(str(member))
            if target is not None and target.value is not None:
                eip_of[str(member)] = target.value
                found.setdefault(str(member), (_split(key)[0], []))[1].append(_split(key)[1])
    for mark, (source, destinations) in found.items():
        to = tuple(ip_network(d) for d in destinations)
        yield mark, SnatRule("", eip_of[mark], ip_network(source), destinations=to)


def _split(text: str | None) -> list[str]:
    """The parts of a concatenated key or value ("10.115.55.200 . tcp . 80")."""
    return (text or "").split(" . ")


def _protocol(text: str) -> Protocol:
    if text not in ("tcp", "udp"):
        raise ValueError(f"not a DNAT protocol: {text!r}")
    return cast(Protocol, text)


# --- the table, kept up to date rule by rule ---------------------------------------------


@dataclass(frozen=True)
class ShareGroup:
    """The share rules of one (EIP, protocol, port): one chain picks among their ids."""

    family: Family
    key: str  # the dnat_share key: "EIP . protocol . port"
    marks: frozenset[int]


ElementChanges = dict[str, dict[str, Element | None]]  # set -> key -> new element (None: deleted)


def merge_elements(target: dict[str, Element], keyed: Mapping[str, Element | None]) -> None:
    """One set's changed elements written into `target`: each key's new element, or gone."""
    if not target:
        # A set of a full plan: at once (`is not None`: comparing Elements with None costs
        # two refused __eq__ calls each).
        target.update({key: element for key, element in keyed.items() if element is not None})
        return
    for key, element in keyed.items():
        if element is None:
            target.pop(key, None)
        else:
            target[key] = element


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
    pools: dict[str, Pool]
    pool_prefixes: CounterOf[tuple[int, int]]
    timeout_policies: CounterOf[TimeoutPolicy] = field(default_factory=CounterOf)  # rules per policy
    objects: tuple[ObjectSpec, ...] = ()
    port_block_rules: int = 0
    frame: Frame | None = None  # the plan's frame after a change of EIPs (None: the same)


class TablePlan:
    """The desired table of the applied state and what it is built from. A full plan
    folds every rule's elements into an empty table; a change removes the elements of the
    rules it drops and adds those of the rules it brings, so it costs what it changes."""

    def __init__(
        self,
        state: DesiredState,
        ids: Mapping[RuleLabels, int],
        highest_id: int = 0,
        untracked: Sequence[Endpoint] = (),
        rules: Sequence[tuple[Rule, RuleLabels]] | None = None,  # `state`'s, planned (assigning)
    ) -> None:
        self.state = state
        self.untracked = tuple(untracked)
        self.frame = Frame.of(state)
        self.ids: dict[RuleLabels, int] = {}
        self.highest_id = 0
        self.sets: tuple[SetSpec, ...] = ()
        self.chains: tuple[ChainSpec, ...] = ()
        self.elements: dict[str, dict[str, Element]] = {}
        self.share_groups: dict[str, ShareGroup] = {}
        self.snat_prefixes: CounterOf[tuple[int, int]] = CounterOf()
        self.pools: dict[str, Pool] = {}  # by chain (natgwd.planning.pools)
        self.pool_prefixes: CounterOf[tuple[int, int]] = CounterOf()
        # With scaleOut: how many DNAT rules put each (reply key, group mark) in
        # dnat_reply_group; two rules may share a backend address and port.
        self.replies: CounterOf[tuple[str, str]] = CounterOf()
        self.timeout_policies: CounterOf[TimeoutPolicy] = CounterOf()
        self.objects: tuple[ObjectSpec, ...] = ()
        self.port_block_rules = 0  # SNAT rules with port blocks: their sets and rules exist while any do
        # Created in the sets' order, which the transaction's element commands follow.
        self.elements.update((spec.name, {}) for spec in _sets(self.frame, {}, {}))
        for set_name, key, element in _frame_elements(state, self.frame):
            self.elements.setdefault(set_name, {})[key] = element
        self.elements[ID_HIGH_WATER] = {"0": _MEMBER}  # one element: the highest id ever given out
        if rules is None:
            rules = planned((*state.snat, *state.dnat, *state.fip), self.frame.eip_text)
        self.commit(self._change(state, (), rules, dict(ids), max(highest_id, *ids.values(), 0)))

    @classmethod
    def assigning(
        cls,
        state: DesiredState,
        existing: Mapping[RuleLabels, int],
        highest_id: int = 0,
        untracked: Sequence[Endpoint] = (),
    ) -> TablePlan:
        """The full plan of `state` with ids as assign_ids gives them: each rule planned
        once (its labels cost a full apply of 50,000 rules tens of milliseconds)."""
        rules = planned((*state.snat, *state.dnat, *state.fip), eip_texts(state))
        ids = _assigned((labels for _, labels in rules), existing, highest_id)
        return cls(state, ids, highest_id, untracked, rules)

    @property
    def table(self) -> DesiredTable:
        """The planned table; its elements are this plan's own, changed in place by commit."""
        shares = {chain: tuple(sorted(group.marks)) for chain, group in self.share_groups.items()}
        shares.update(pool_shares(self.pools, self.frame.draining))
        return DesiredTable(self.sets, self.chains, self.elements, shares, self.objects, RETAINED_OBJECTS)

    def change(
        self,
        state: DesiredState,
        removed: Sequence[Rule],
        added: Sequence[Rule],
        removed_eips: Sequence[Eip] = (),
        added_eips: Sequence[Eip] = (),
    ) -> TableChange:
        """The table of `state`, which differs from this plan's state by the rules
        `removed` and `added` and, on one external network, the IPv4 EIPs `removed_eips`
        and `added_eips` (natgwd.state.eipdelta) alone: its networks and interfaces are
        the same."""
        frame = self.frame
        if removed_eips or added_eips:
            # The removed rules' EIPs and the added rules' (names are not reused in one change).
            texts = {**frame.eip_text, **{(e.name, 4): address_text(e.v4ip) for e in added_eips if e.v4ip}}
            frame = replace(frame, eip_text=texts)
        gone = planned(removed, frame.eip_text)
        arriving = planned(added, frame.eip_text)
        ids = changed_ids(self.ids, (labels for _, labels in gone), (labels for _, labels in arriving), self.highest_id)
        highest = max([self.highest_id, *(ids[labels] for _, labels in arriving)])
        return self._change(state, gone, arriving, ids, highest, frame, removed_eips, added_eips)

    def _change(
        self,
        state: DesiredState,
        removed: Sequence[tuple[Rule, RuleLabels]],
        added: Sequence[tuple[Rule, RuleLabels]],
        ids: dict[RuleLabels, int],
        highest_id: int,
        frame: Frame | None = None,
        removed_eips: Sequence[Eip] = (),
        added_eips: Sequence[Eip] = (),
    ) -> TableChange:
        frame = frame or self.frame
        changes: ElementChanges = defaultdict(dict)
        groups = dict(self.share_groups)
        prefixes = CounterOf(self.snat_prefixes)
        pools, pooled = dict(self.pools), CounterOf(self.pool_prefixes)
        replies = CounterOf(self.replies) if self.frame.group_of is not None else self.replies
        policies = CounterOf(self.timeout_policies)
        blocked = self.port_block_rules
        blocked -= sum(1 for rule, _ in removed if isinstance(rule, SnatRule) and rule.port_block is not None)
        blocked += sum(1 for rule, _ in added if isinstance(rule, SnatRule) and rule.port_block is not None)
        for rule, labels in removed:
            mark = self.ids[labels]
            for set_name, key, _ in rule_elements(rule, labels, mark, frame):
                changes[set_name][key] = None
            self._count(rule, mark, groups, prefixes, -1, frame)
            if type(rule) is SnatRule:
                self._count_pool(rule, mark, pools, pooled, -1)
            self._count_replies(rule, replies, changes, -1)
            self._count_policy(rule, policies, -1)
        for rule, labels in added:
            mark = ids[labels]
            for set_name, key, element in rule_elements(rule, labels, mark, frame):
                changes[set_name][key] = element
            self._count(rule, mark, groups, prefixes, +1, frame)
            if type(rule) is SnatRule:
                self._count_pool(rule, mark, pools, pooled, +1)
            self._count_replies(rule, replies, changes, +1)
            self._count_policy(rule, policies, +1)
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
                changes[group.family.name(DNAT_SHARE)][group.key] = Element(f"goto {chain}") if after else None
        if highest_id != self.highest_id:
            changes[ID_HIGH_WATER] = {str(self.highest_id): None, str(highest_id): _MEMBER}
        new_frame = None
        if removed_eips or added_eips:
            for eip in removed_eips:
                changes[V4.name(EIPS)][frame.eip_text[eip.name, 4]] = None
            for eip in added_eips:
                changes[V4.name(EIPS)][frame.eip_text[eip.name, 4]] = _MEMBER
            gone_names = {eip.name for eip in removed_eips}
            texts = {key: text for key, text in frame.eip_text.items() if key[0] not in gone_names}
            new_frame = replace(frame, eip_text=texts)
        # An element removed and added back the same is no change (a changed rule keeps
        # its id, so its counting elements stay and keep counting).
        for set_name, keyed in changes.items():
            current = self.elements.get(set_name)
            if not current:  # (nearly every set of a full plan, which starts empty)
                continue
            for key in [k for k, element in keyed.items() if current.get(k) == element]:
                del keyed[key]
        by_family = _prefixes_by_family(self.frame.families, prefixes)
        pooled_by_family = _prefixes_by_family(self.frame.families, pooled)
        destined = frozenset(f for f in self.frame.families if prefixes[f.version, DESTINED] > 0)
        pool_families = frozenset(pool.family for pool in pools.values())
        sets = _sets(self.frame, by_family, pooled_by_family, destined, pool_families)
        sets += PORT_BLOCK_SETS if blocked else ()
        chains = _share_chains(groups) + pool_chains(pools, self.frame.draining)
        chains += _chains(state, by_family, pooled_by_family, destined, blocked > 0)
        chains += _untracked(self.untracked)
        if self.frame.network_of is not None:
            chains += (_steer(state, by_family, destined),)
        if self.frame.group_of is not None:
            chains += (handover_chain(state, [(p, V4.snat_key(p)) for p in by_family[V4]], V4 in destined),)
            chains += gate_chains(state.internal.interface)
        in_use = [policy for policy, count in policies.items() if count > 0]
        if in_use:
            sets += timeout_sets()
            chains += timeout_chains(in_use)
        return TableChange(
            state,
            ids,
            highest_id,
            sets,
            chains,
            dict(changes),
            groups,
            prefixes,
            +replies,
            pools,
            pooled,
            +policies,
            timeout_objects(in_use),
            blocked,
            new_frame,
        )

    def _count_policy(self, rule: Rule, policies: CounterOf[TimeoutPolicy], sign: int) -> None:
        policy = effective_policy(rule, self.frame.timeouts)
        if policy is not None:
            policies[policy] += sign

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

    def _count_pool(
        self, rule: SnatRule, mark: int, pools: dict[str, Pool], pooled: CounterOf[tuple[int, int]], sign: int
    ) -> None:
        """Keep the members of the SNAT pools and the prefix lengths they use up to date."""
        if not (rule.pool or rule.eip in self.frame.draining):
            return
        if not rule.destinations:  # (those go to their chain from the destination maps)
            pooled[rule.family, rule.internal_cidr.prefixlen] += sign
        member = ((rule.pool or (rule.eip,)).index(rule.eip), rule.eip, mark)
        counted(pools, pool_chain_name(rule.family, rule.name), _family(rule), member, sign)

    def _count(
        self,
        rule: Rule,
        mark: int,
        groups: dict[str, ShareGroup],
        prefixes: CounterOf[tuple[int, int]],
        sign: int,
        frame: Frame,
    ) -> None:
        """Keep the SNAT prefix lengths in use and the share groups' members up to date."""
        if isinstance(rule, SnatRule):
            prefixes[rule.family, DESTINED if rule.destinations else rule.internal_cidr.prefixlen] += sign
            return
        if not isinstance(rule, DnatRule) or rule.type != "share":
            return
        eip, port = frame.eip_text[rule.eip, rule.family], rule.external_port.first
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
            if elements is not None:  # else deleted with its set
                merge_elements(elements, keyed)
        self.state, self.ids, self.highest_id = change.state, change.ids, change.highest_id
        self.sets, self.chains = change.sets, change.chains
        self.share_groups, self.snat_prefixes = change.share_groups, +change.snat_prefixes
        self.pools, self.pool_prefixes = change.pools, +change.pool_prefixes
        self.replies = change.replies
        self.timeout_policies, self.objects = change.timeout_policies, change.objects
        self.port_block_rules = change.port_block_rules
        if change.frame is not None:
            self.frame = change.frame


def _frame_elements(state: DesiredState, frame: Frame) -> list[Contribution]:
    """The elements that do not belong to any one rule."""
    elements: list[Contribution] = [
        ((V4 if version == 4 else V6).name(EIPS), address, _MEMBER) for (_, version), address in frame.eip_text.items()
    ]
    elements += [(INVALID_DROPS, f'"{network.interface}"', _MEMBER) for network in state.externals]
    if state.scale_out is not None:
        elements += [(HANDED_OVER, str(group.mark), _MEMBER) for group in state.scale_out.groups]
    if frame.network_of is not None:
        elements += [
            ((V4 if version == 4 else V6).name(EIP_NETWORK), frame.eip_text[name, version], network)
            for (name, version), network in frame.network_of.items()
        ]
    return elements


def _prefixes_by_family(families: Sequence[Family], prefixes: CounterOf[tuple[int, int]]) -> dict[Family, list[int]]:
    """The SNAT prefix lengths in use per family, longest first (the order they are tried in)."""
    in_use = [(version, p) for (version, p), count in prefixes.items() if count > 0 and p != DESTINED]
    return {family: sorted((p for v, p in in_use if v == family.version), reverse=True) for family in families}


def _sets(
    frame: Frame,
    prefixes: dict[Family, list[int]],
    pooled: dict[Family, list[int]],
    destined: frozenset[Family] = frozenset(),
    pool_families: frozenset[Family] = frozenset(),
) -> tuple[SetSpec, ...]:
    sets = list(_STATIC_SETS)
    if V6 in frame.families:
        sets.extend(V6.sets())
    for family, lengths in prefixes.items():
        for p in lengths:
            sets.append(SetSpec(family.snat_target(p), f"type {family.addr} : {family.addr};"))
            sets.append(SetSpec(family.snat_rule(p), f"type {family.addr} : mark;"))
        if family in pool_families:
            sets.append(SetSpec(family.name(SNAT_POOL_TARGET), f"type mark : {family.addr};"))
        sets.extend(SetSpec(family.snat_pool(p), f"type {family.addr} : verdict;") for p in pooled.get(family, ()))
        if family in destined:
            sets.extend(family.dst_sets())
    if frame.network_of is not None:
        for family, lengths in prefixes.items():
            names = [family.name(EIP_NETWORK), family.name(FIP_OUT_NETWORK)]
            names += [family.snat_network(p) for p in lengths]
            sets.extend(SetSpec(name, f"type {family.addr} : mark;") for name in names)
            if family in destined:
                key = f"{family.addr} . {family.addr}"
                sets.append(SetSpec(family.name(SNAT_DST_NETWORK), f"type {key} : mark; flags interval;"))
    if frame.group_of is not None:
        sets.extend(handover_sets(prefixes.get(V4, []), V4 in destined))
        sets.extend(gate_sets())
    return tuple(sets)


def _share_chains(groups: Mapping[str, ShareGroup]) -> tuple[ChainSpec, ...]:
    return tuple(
        _share_chain(name, [str(mark) for mark in sorted(group.marks)], group.family)
        for name, group in sorted(groups.items())
    )


def desired_table(
    state: DesiredState, ids: Mapping[RuleLabels, int], highest_id: int = 0, untracked: Sequence[Endpoint] = ()
) -> DesiredTable:
    """The table of `state` as a whole (a full plan)."""
    return TablePlan(state, ids, highest_id, untracked).table
