"""Which conntrack entries no longer match the desired translations (pure; no kernel).

nftables changes only affect connections that start afterwards: an existing entry keeps
the translation it got on its first packet. natgwd therefore checks entries against the
desired state and deletes those whose translation differs, so the next packet of the flow
is translated by the current rules (Kube-OVN #1922, #4193). An entry is judged only by
the rules that cover it, so entries of rules that did not change are never stale.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from typing import TypeVar

from natgwd.planning.plan import address_text, eip_texts
from natgwd.state.model import DesiredState, DnatRule, FipRule, IPAddress, IPNetwork, SnatRule
from natgwd.state.portblocks import blocks
from natgwd.state.tracker import RuleDelta

PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17}
BLOCKED_PROTOCOLS = (6, 17)  # the protocols port blocks translate (natgwd.planning.portblocks)
R = TypeVar("R")
Target = str | frozenset[str]  # a SNAT rule's EIP, or its pool's EIPs (any of them is right)


@dataclass(frozen=True)
class Flow:
    """A conntrack entry, reduced to what a NAT decision depends on. `orig_*` is the tuple
    as the initiator sent it, `reply_*` the tuple the answer travels with."""

    proto: int
    orig_src: str
    orig_dst: str
    orig_dport: int | None
    reply_src: str
    reply_sport: int | None
    reply_dst: str
    mark: int
    reply_dport: int | None = None  # after source NAT: the EIP's port


@dataclass(frozen=True)
class Filter:
    """A kernel-side dump filter: entries whose `tuple` ('orig' or 'reply') has `field`
    ('saddr' or 'daddr') equal to `address`."""

    tuple: str
    field: str
    address: str


class Translations:
    """The desired translations of a state, indexed for one lookup per entry."""

    def __init__(self, state: DesiredState, rule_ids: Iterable[int]) -> None:
        # Indexed at the first entry judged: a change's filtered dumps usually find none.
        self._state, self._rule_ids = state, rule_ids
        self._indexed = False

    def _index(self) -> None:
        self._indexed = True
        state, rule_ids = self._state, self._rule_ids
        # Addresses as conntrack reports them (inet_ntop), the same text nft uses.
        eip = {(e.name, a.version): address_text(a) for e in state.eips for a in e.addresses}
        self.rule_ids = set(rule_ids)
        self.fip_in = {eip[f.eip, f.family]: address_text(f.internal_ip) for f in state.fip}
        self.fip_out = {address_text(f.internal_ip): eip[f.eip, f.family] for f in state.fip}
        self.dnat: dict[tuple[str, int, int], tuple[str, int]] = {}
        # Share groups: a connection stays with the backend it got, even one since removed
        # (Kube-OVN's semantics); only removing the whole group ends its connections.
        self.share: set[tuple[str, int, int]] = set()
        for d in state.dnat:
            if d.type == "share":
                self.share.add((eip[d.eip, d.family], PROTOCOL_NUMBERS[d.protocol], d.external_port.first))
                continue
            shift = d.internal_port.first - d.external_port.first
            for port in range(d.external_port.first, d.external_port.last + 1):
                key = (eip[d.eip, d.family], PROTOCOL_NUMBERS[d.protocol], port)
                self.dnat[key] = (address_text(d.internal_ip), port + shift)
        # (family, prefix length) -> network -> EIP (a pool: any of its EIPs), consulted
        # longest prefix first
        self.snat: dict[tuple[int, int], dict[IPAddress, Target]] = {}
        # Rules by destination, consulted first: (source network, destinations, EIP).
        self.destined: list[tuple[IPNetwork, tuple[IPNetwork, ...], Target]] = []
        for s in state.snat:
            cidr = s.internal_cidr
            target = frozenset(eip[e, s.family] for e in s.pool) if s.pool else eip[s.eip, s.family]
            if s.destinations:
                self.destined.append((cidr, s.destinations, target))
            else:
                self.snat.setdefault((cidr.version, cidr.prefixlen), {})[cidr.network_address] = target
        self.snat_prefixes = sorted(self.snat, reverse=True)
        # A port block's connections must keep inside the address's block: whois answers
        # by the block, so one left in another address's block after a change is stale.
        self.blocks = {
            address_text(address): (eip[s.eip, s.family], first, last)
            for s in state.snat
            if s.port_block is not None
            for address, first, last in blocks(s.internal_cidr, s.port_block)
        }
        self.internal = [a.network for a in state.internal.addresses] + [r.dst for r in state.internal.routes]
        self.local = {address_text(a.ip) for a in (*state.internal.addresses, *state.external.addresses)}
        self.local |= set(eip.values())

    def _destined_target(self, source: IPAddress, peer: str) -> Target | None:
        if not self.destined:
            return None
        to = ip_address(peer)
        for cidr, destinations, target in self.destined:
            if source in cidr and any(to in d for d in destinations):
                return target
        return None

    def _snat_target(self, source: IPAddress) -> Target | None:
        for version, prefixlen in self.snat_prefixes:
            if version != source.version:
                continue
            network = ip_network(f"{source}/{prefixlen}", strict=False).network_address
            target = self.snat[version, prefixlen].get(network)
            if target is not None:
                return target
        return None

    def _internal(self, address: str) -> bool:
        parsed = ip_address(address)
        return any(parsed in network for network in self.internal)

    def stale(self, flow: Flow) -> str | None:
        """The reason `flow` must be deleted ('fip', 'dnat', 'snat', 'removed'), or None."""
        if not self._indexed:
            self._index()
        if flow.orig_dst in self.fip_in:
            if flow.reply_src != self.fip_in[flow.orig_dst]:
                return "fip"
        elif (key := (flow.orig_dst, flow.proto, flow.orig_dport or 0)) in self.share:
            pass
        elif key in self.dnat:
            if (flow.reply_src, flow.reply_sport) != self.dnat[key]:
                return "dnat"
        elif flow.reply_src != flow.orig_dst and self._from_removed_rule(flow):
            return "removed"
        if flow.orig_dst in self.local:
            return None  # to the gateway itself, or hairpin: judged on the destination side
        peer = flow.reply_src  # where the flow really goes, after any DNAT
        if peer in self.local or self._internal(peer):
            return None  # stays inside: never source-NATed
        if flow.orig_src in self.fip_out:
            return None if flow.reply_dst == self.fip_out[flow.orig_src] else "fip"
        try:
            source = ip_address(flow.orig_src)
            target = self._destined_target(source, peer) or self._snat_target(source)
        except ValueError:
            return None
        if target is not None:
            kept = flow.reply_dst == target if isinstance(target, str) else flow.reply_dst in target
            if not kept:
                return "snat"
            block = self.blocks.get(flow.orig_src)
            if block is None or flow.reply_dst != block[0] or flow.proto not in BLOCKED_PROTOCOLS:
                return None  # (a rule by destination may send it through another EIP)
            return None if flow.reply_dport is None or block[1] <= flow.reply_dport <= block[2] else "snat"
        if flow.reply_dst != flow.orig_src and self._from_removed_rule(flow):
            return "removed"
        return None

    def _from_removed_rule(self, flow: Flow) -> bool:
        # Only natgwd sets ct marks here; a mark that is no current rule's id was a rule's.
        return flow.mark != 0 and flow.mark not in self.rule_ids


def changed_filters(old: DesiredState | None, new: DesiredState) -> list[Filter] | None:
    """The dumps that find every entry a change from `old` to `new` can make stale, or
    None when only a full scan can (start-up, any SNAT change: flows that left un-NATed
    are found by their source CIDR, which the kernel cannot filter on)."""
    if old is None or set(old.snat) != set(new.snat):
        return None
    filters: set[Filter] = set()
    gone_fips, added_fips = _differences(old.fip, new.fip)
    gone_dnats, added_dnats = _differences(old.dnat, new.dnat)
    gone: list[DnatRule | FipRule] = [*gone_fips, *gone_dnats]
    added: list[DnatRule | FipRule] = [*added_fips, *added_dnats]
    for state, others, rules in ((old, new, gone), (new, old, added)):
        eip = eip_texts(state)
        other_eips = {address_text(a) for e in others.eips for a in e.addresses}
        for address in set(eip.values()) - other_eips:
            filters |= {Filter("orig", "daddr", address), Filter("reply", "daddr", address)}
        for rule in rules:
            filters |= _rule_filters(rule, eip)
    # A rule naming an EIP whose address changed is a different rule value only if the
    # EIP name is compared; compare addresses too.
    old_eips = {e.name: e for e in old.eips}
    for e in new.eips:
        before = old_eips.get(e.name)
        for version in (4, 6):
            if before is None or before.address(version) == e.address(version):
                continue
            for changed in (before.address(version), e.address(version)):
                if changed is not None:
                    text = address_text(changed)
                    filters |= {Filter("orig", "daddr", text), Filter("reply", "daddr", text)}
    return sorted(filters, key=lambda f: (f.tuple, f.field, f.address))


def delta_filters(delta: RuleDelta, eip: Mapping[tuple[str, int], str]) -> list[Filter] | None:
    """changed_filters for a change of rules and plain EIPs (natgwd.state.eipdelta), from
    the rules and EIPs it removes and adds."""
    rules = [rule for rule in (*delta.removed, *delta.added) if not isinstance(rule, SnatRule)]
    if len(rules) < len(delta):
        return None
    filters: set[Filter] = set().union(*(_rule_filters(rule, eip) for rule in rules))
    # An address that became or stopped being an EIP, as changed_filters finds it.
    for changed in (*delta.removed_eips, *delta.added_eips):
        for address in changed.addresses:
            text = address_text(address)
            filters |= {Filter("orig", "daddr", text), Filter("reply", "daddr", text)}
    return sorted(filters, key=lambda f: (f.tuple, f.field, f.address))


def _rule_filters(rule: DnatRule | FipRule, eip: Mapping[tuple[str, int], str]) -> set[Filter]:
    """The dumps that find the entries of a FIP's or a DNAT rule's connections."""
    address = eip[rule.eip, rule.family]
    if isinstance(rule, DnatRule):
        return {Filter("orig", "daddr", address)}
    return {
        Filter("orig", "daddr", address),
        Filter("orig", "saddr", address_text(rule.internal_ip)),
        Filter("reply", "daddr", address),
    }


def _differences(old: tuple[R, ...], new: tuple[R, ...]) -> tuple[set[R], set[R]]:
    """The rules only in `old` and only in `new`, by value. Validation hands out the very
    rule object of the last state for an unchanged rule: those are set aside by identity,
    and only the rest is hashed (a rule's hash is computed in Python, field by field)."""
    old_ids, new_ids = set(map(id, old)), set(map(id, new))
    old_rest = {rule for rule in old if id(rule) not in new_ids}
    new_rest = {rule for rule in new if id(rule) not in old_ids}
    return old_rest - new_rest, new_rest - old_rest
