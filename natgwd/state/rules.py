"""The checks of one rule: alone (its fields, its EIP, reachability) and against explicit
indexes of the state's other rules (names, SNAT CIDR owners, DNAT port spans per EIP,
family and protocol, share groups, FIP keys).

A full validation folds every rule of a document into empty indexes; a change drops the
rules it removes from the last accepted state's indexes and folds in the rules it adds,
so it costs what it changes. Both use these same functions. A change is folded into the
accepted state's indexes in place under a journal (`RuleIndex.journaled`), undone unless
the change is applied.
"""

from __future__ import annotations

import bisect
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from ipaddress import AddressValueError, IPv4Address, IPv4Network, IPv6Address, IPv6Network, NetmaskValueError
from typing import TYPE_CHECKING, Any

from natgwd.state.destinations import Held, destinations, refuse_overlap
from natgwd.state.model import (
    DnatRule,
    DnatType,
    Eip,
    FipRule,
    InternalSide,
    IPAddress,
    IPNetwork,
    PortRange,
    RuleKind,
    SnatRule,
)
from natgwd.state.pools import not_draining, snat_pool_rule
from natgwd.state.portblocks import DEFAULT_FIRST_PORT, Blocked, PortBlock, check_alone, check_together
from natgwd.state.ports import port_range
from natgwd.state.problems import InvalidValueError, Problems
from natgwd.state.timeouts import parse_timeouts

if TYPE_CHECKING:
    from natgwd.state.scaleout import ScaleOutConfig

Rule = SnatRule | DnatRule | FipRule


# --- values ---------------------------------------------------------------------------


def family_name(text: str) -> str:
    # The schema admits only dotted IPv4 or text with a colon: a colon means IPv6.
    return "IPv6" if ":" in text else "IPv4"


def usable_address(text: str) -> IPAddress:
    """The address; InvalidValueError saying why when it is not a usable unicast one."""
    try:
        address: IPAddress = IPv6Address(text) if ":" in text else _ipv4(text)
    except AddressValueError as err:
        raise InvalidValueError(f"not a valid {family_name(text)} address: {err}") from None
    require_unicast(address)
    if address.version == 6 and (address.is_link_local or address.ipv4_mapped is not None):
        # Link-local addresses are not unique beyond one link; mapped ones are IPv4 in disguise.
        raise InvalidValueError(f"{address} is not a usable unicast address (link-local or IPv4-mapped)")
    return address


def require_unicast(address: IPAddress) -> None:
    """InvalidValueError unless `address` can be one host's (of a rule, of an HA member)."""
    if address.version == 4:
        # ipaddress's own ranges (0.0.0.0, 127/8, 224/4, 240/4) on the integer: its
        # properties test membership of a network object each, a microsecond per
        # address and tens of milliseconds per full validation.
        value = int(address)
        usable = value != 0 and value >> 24 != 127 and value >> 28 < 0xE
    else:
        usable = not (address.is_multicast or address.is_unspecified or address.is_loopback or address.is_reserved)
    if not usable:
        raise InvalidValueError(f"{address} is not a usable unicast address")


def _ipv4(text: str) -> IPv4Address:
    # inet_pton takes what IPv4Address takes (four decimal octets, no leading zeros) five
    # times faster, which counts at 20,000 addresses; ipaddress explains a refusal.
    try:
        return IPv4Address(int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big"))
    except (OSError, ValueError, UnicodeError):
        return IPv4Address(text)


def network(text: str) -> IPNetwork:
    """The network; InvalidValueError saying why when it is not one."""
    kind = IPv6Network if ":" in text else IPv4Network
    host = 128 if ":" in text else 32
    try:
        return kind(text if "/" in text else f"{text}/{host}")
    except (AddressValueError, NetmaskValueError) as err:
        raise InvalidValueError(f"not a valid {family_name(text)} network: {err}") from None
    except ValueError:
        raise InvalidValueError(f"has host bits set (did you mean {kind(text, strict=False)}?)") from None


def port(value: object) -> PortRange:
    """A port field's range; InvalidValueError saying why when it is none."""
    found = port_range(value)
    if isinstance(found, str):
        raise InvalidValueError(found)
    return found


# --- the context a rule is checked in --------------------------------------------------


@dataclass(frozen=True)
class RuleContext:
    """What the checks of a rule need from the rest of the document."""

    eips: Mapping[str, Eip]
    internal: InternalSide
    # EIPs the schema refused (already reported): a rule naming one is not reported again,
    # and when one of them has no name at all no rule's EIP can be called unknown.
    set_aside_eips: frozenset[str] = frozenset()
    any_eip_set_aside: bool = False

    # With scaleOut: the EIP groups, each owned by one member (a pool must stay in one).
    scale_out: ScaleOutConfig | None = None

    def known_eip(
        self, problems: Problems, section: str, index: int, name: str, at: tuple[str | int, ...] = ("eip",)
    ) -> bool:
        if name in self.eips:
            return True
        if name not in self.set_aside_eips and not self.any_eip_set_aside:
            problems.add((section, index, *at), f"names EIP {name!r}, which is not in eips")
        return False

    def same_family(self, problems: Problems, section: str, index: int, fld: str, eip: str, address: Any) -> bool:
        """A rule translates within one family: the EIP needs an address of the family of
        the rule's internal address (checked only for an EIP that exists)."""
        found = self.eips.get(eip)
        if found is None or found.address(address.version) is not None:
            return True
        if not found.addresses:
            return False  # reported on the EIP
        missing, other = ("v6ip", "IPv6") if address.version == 6 else ("v4ip", "IPv4")
        problems.item(
            section,
            index,
            fld,
            f"{address} is {other} but EIP {eip!r} has no {missing}; a rule translates within one "
            f"family (give the EIP a {missing} or use an {'IPv4' if address.version == 6 else 'IPv6'} address)",
        )
        return False

    def reachable(self, problems: Problems, section: str, index: int, address: IPAddress) -> bool:
        if self.internal.reaches(address):
            return True
        problems.item(
            section, index, "internalIp", f"{address} is in no internal address's subnet and no internal route"
        )
        return False


# --- one rule alone ---------------------------------------------------------------------


def snat_rule(item: dict[str, Any], index: int, ctx: RuleContext, problems: Problems) -> SnatRule | None:
    cidr = problems.parsed(("snat", index, "internalCIDR"), network, item["internalCIDR"])
    to = destinations(item, index, cidr, network, problems)
    if "eips" in item:
        rule = snat_pool_rule(item, index, ctx, problems, cidr)
    elif "eip" not in item:
        problems.item("snat", index, "eip", "required field is missing (a SNAT rule names eip, or eips for a pool)")
        return None
    else:
        known = ctx.known_eip(problems, "snat", index, item["eip"])
        if cidr is None or not known or not ctx.same_family(problems, "snat", index, "internalCIDR", item["eip"], cidr):
            return None
        rule = SnatRule(item["name"], item["eip"], cidr, parse_timeouts(item.get("timeouts")))
    if rule is None or to is None:
        return None
    if to:
        rule = replace(rule, destinations=to)
    if "portBlock" in item:
        block = _port_block(item, index, ctx, rule, problems)
        return replace(rule, port_block=block) if block is not None else None
    return rule


def _port_block(
    item: dict[str, Any], index: int, ctx: RuleContext, rule: SnatRule, problems: Problems
) -> PortBlock | None:
    """The rule's port blocks, when they fit and the rule has one EIP, not draining, for
    every destination (natgwd.state.portblocks)."""
    if "eips" in item or rule.destinations:
        other = "a pool (eips)" if "eips" in item else "destinations"
        problems.item(
            "snat",
            index,
            "portBlock",
            f"a rule with {other} cannot give port blocks: they need one EIP for every connection",
        )
        return None
    if ctx.eips[rule.eip].draining:
        problems.item(
            "snat", index, "portBlock", f"EIP {rule.eip!r} is draining: port blocks would still give its ports out"
        )
        return None
    fields = item["portBlock"]
    block = PortBlock(fields["size"], fields.get("firstPort", DEFAULT_FIRST_PORT))
    return block if check_alone(rule.internal_cidr, block, index, problems) else None


def dnat_rule(item: dict[str, Any], index: int, ctx: RuleContext, problems: Problems) -> DnatRule | None:
    known = ctx.known_eip(problems, "dnat", index, item["eip"]) and not_draining(
        ctx, problems, "dnat", index, item["eip"]
    )
    external = problems.parsed(("dnat", index, "externalPort"), port, item["externalPort"])
    internal_port = problems.parsed(("dnat", index, "internalPort"), port, item["internalPort"])
    address = problems.parsed(("dnat", index, "internalIp"), usable_address, item["internalIp"])
    if address is not None and not ctx.reachable(problems, "dnat", index, address):
        address = None
    if address is not None and not ctx.same_family(problems, "dnat", index, "internalIp", item["eip"], address):
        address = None
    if external and internal_port and len(external) != len(internal_port):
        problems.item(
            "dnat",
            index,
            "internalPort",
            f"range {internal_port} has {len(internal_port)} ports but externalPort "
            f"{external} has {len(external)}; they must be the same length",
        )
        return None
    share = item.get("type") == "share"
    if share and external and internal_port and len(external) > 1:
        problems.item("dnat", index, "externalPort", "a share rule takes a single port, not a range")
        return None
    if not (known and external and internal_port and address):
        return None
    kind: DnatType = "share" if share else "exclusive"
    timeouts = parse_timeouts(item.get("timeouts"))
    return DnatRule(item["name"], item["eip"], item["protocol"], external, address, internal_port, kind, timeouts)


def fip_rule(item: dict[str, Any], index: int, ctx: RuleContext, problems: Problems) -> FipRule | None:
    known = ctx.known_eip(problems, "fip", index, item["eip"]) and not_draining(
        ctx, problems, "fip", index, item["eip"]
    )
    address = problems.parsed(("fip", index, "internalIp"), usable_address, item["internalIp"])
    if address is None or not ctx.reachable(problems, "fip", index, address) or not known:
        return None
    if not ctx.same_family(problems, "fip", index, "internalIp", item["eip"], address):
        return None
    return FipRule(item["name"], item["eip"], address, parse_timeouts(item.get("timeouts")))


def port_block_conflicts(index: RuleIndex, problems: Problems) -> None:
    """The checks of port blocks between the SNAT and FIP rules of `index`
    (natgwd.state.portblocks)."""
    names = index.names["snat"]
    rules = [r for r in index.rules["snat"].values() if isinstance(r, SnatRule)]
    fips = [(index.names["fip"][r.name], r.eip) for r in index.rules["fip"].values()]
    blocked = (
        Blocked(names[r.name], r.name, r.eip, r.internal_cidr, r.port_block, r.pool, bool(r.destinations))
        for r in rules
    )
    check_together(blocked, fips, problems)


RULE_CHECKS: dict[RuleKind, Callable[[dict[str, Any], int, RuleContext, Problems], Rule | None]] = {
    "snat": snat_rule,
    "dnat": dnat_rule,
    "fip": fip_rule,
}


# --- the indexes of the other rules --------------------------------------------------


Owner = tuple[str, int]  # the name of the rule that holds a key, and its index (for messages)
Backend = tuple[IPAddress, PortRange]


@dataclass(frozen=True)
class Span:
    """External ports of one (EIP, family, protocol) taken by an exclusive rule, or one
    port taken by a share group (its backends, each with its rule)."""

    first: int
    last: int
    owner: Owner | None = None
    backends: Mapping[Backend, Owner] = field(default_factory=dict)

    @property
    def ports(self) -> PortRange:
        return PortRange(self.first, self.last)


DnatGroup = tuple[str, int, str]  # (EIP, family, protocol)
FipKey = tuple[str, int]  # (EIP, family)


def _first_port(span: Span) -> int:
    return span.first


_ABSENT: Any = object()
Journal = list[tuple[dict[Any, Any], Any, Any]]  # (table, key, the value before or after; _ABSENT: none)


@dataclass
class RuleIndex:
    """The accepted rules of a state and what each of them holds. A change is folded in
    place with a journal of what it overwrote (`journaled`): undone when the change is
    refused or only checked, done again (`redo`) when it is applied. So a change costs
    what it changes, not a copy of indexes of 50,000 rules. Values are replaced, never
    mutated: a journal entry holds the very value it restores."""

    rules: dict[RuleKind, dict[str, Rule]] = field(default_factory=lambda: {"snat": {}, "dnat": {}, "fip": {}})
    names: dict[RuleKind, dict[str, int]] = field(default_factory=lambda: {"snat": {}, "dnat": {}, "fip": {}})
    snat_owner: dict[IPNetwork, Owner] = field(default_factory=dict)
    snat_destined: dict[str, Held] = field(default_factory=dict)  # rules with destinations, by name
    dnat_spans: dict[DnatGroup, tuple[Span, ...]] = field(default_factory=dict)
    dnat_eips: dict[FipKey, int] = field(default_factory=dict)  # exclusive and share rules per key
    fip_owner: dict[FipKey, Owner] = field(default_factory=dict)
    fip_internal: dict[IPAddress, Owner] = field(default_factory=dict)
    _journal: Journal | None = field(default=None, repr=False, compare=False)

    @contextmanager
    def journaled(self) -> Iterator[Journal]:
        """Record every write to the indexes until the block ends, then undo them all;
        yields the redo journal (each written key's final value), filled at the end."""
        assert self._journal is None, "one change at a time"
        undo: Journal = []
        redo: Journal = []
        self._journal = undo
        try:
            yield redo
        finally:
            self._journal = None
            written = {(id(table), key): (table, key) for table, key, _ in undo}
            redo.extend((table, key, table.get(key, _ABSENT)) for table, key in written.values())
            for table, key, before in reversed(undo):
                _write(table, key, before)

    @staticmethod
    def redo(journal: Journal) -> None:
        """Write again what a journaled change wrote."""
        for table, key, after in journal:
            _write(table, key, after)

    def _put(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        if self._journal is not None:
            self._journal.append((table, key, table.get(key, _ABSENT)))
        table[key] = value

    def _drop(self, table: dict[Any, Any], key: Any) -> None:
        if self._journal is not None:
            self._journal.append((table, key, table[key]))
        del table[key]

    # names ---------------------------------------------------------------------------

    def claim_name(self, kind: RuleKind, name: str, index: int, problems: Problems) -> bool:
        names = self.names[kind]
        if name in names:
            problems.item(kind, index, "name", f"duplicates {kind}[{names[name]}] ({name!r})")
            return False
        self._put(names, name, index)
        return True

    # adding --------------------------------------------------------------------------

    def add(self, rule: Rule, index: int, problems: Problems) -> bool:
        """Fold in a rule that passed its own checks; False (and the reason to `problems`)
        when it conflicts with a rule already in."""
        if isinstance(rule, SnatRule):
            added = self._add_snat(rule, index, problems)
            kind: RuleKind = "snat"
        elif isinstance(rule, DnatRule):
            added = self._add_dnat(rule, index, problems)
            kind = "dnat"
        else:
            added = self._add_fip(rule, index, problems)
            kind = "fip"
        if added:
            self._put(self.rules[kind], rule.name, rule)
        return added

    def _add_snat(self, rule: SnatRule, index: int, problems: Problems) -> bool:
        if rule.destinations:
            # Beside the rules by source alone (the same CIDR may have both).
            if not refuse_overlap(rule, index, self.snat_destined.values(), problems):
                return False
            self._put(self.snat_destined, rule.name, (rule, index))
            return True
        owner = self.snat_owner.get(rule.internal_cidr)
        if owner is not None:
            problems.item(
                "snat", index, "internalCIDR", f"{rule.internal_cidr} is already translated by snat[{owner[1]}]"
            )
            return False
        self._put(self.snat_owner, rule.internal_cidr, (rule.name, index))
        return True

    def _add_dnat(self, rule: DnatRule, index: int, problems: Problems) -> bool:
        key = (rule.eip, rule.family)
        fip = self.fip_owner.get(key)
        if fip is not None:
            # Only a change meets this (a full fold adds FIPs after every DNAT rule); the
            # FIP is the one reported, as a full validation does.
            problems.item(
                "fip", fip[1], "eip", f"EIP {rule.eip!r} is also used by a dnat rule; a FIP needs the EIP alone"
            )
            return False
        group_key = (rule.eip, rule.family, rule.protocol)
        group = self.dnat_spans.get(group_key, ())
        first, last = rule.external_port.first, rule.external_port.last
        # Spans are disjoint and sorted: only the last one starting at or before `last`
        # can overlap.
        at = bisect.bisect_right(group, last, key=_first_port)
        before = group[at - 1] if at else None
        backend: Backend = (rule.internal_ip, rule.internal_port)
        if before is not None and before.last >= first:
            if rule.type == "share" and before.owner is None and (before.first, before.last) == (first, last):
                if backend in before.backends:
                    problems.item(
                        "dnat",
                        index,
                        "internalIp",
                        f"backend {rule.internal_ip}:{rule.internal_port} is already in the share "
                        f"group through dnat[{before.backends[backend][1]}]",
                    )
                    return False
                joined = Span(first, last, None, {**before.backends, backend: (rule.name, index)})
                self._put(self.dnat_spans, group_key, (*group[: at - 1], joined, *group[at:]))
                self._put(self.dnat_eips, key, self.dnat_eips.get(key, 0) + 1)
                return True
            other = before.owner or next(iter(before.backends.values()))
            kind_of_other = "exclusive" if before.owner is not None else "share"
            why = "" if rule.type == kind_of_other else " (share and exclusive rules cannot share an identity)"
            problems.item(
                "dnat",
                index,
                "externalPort",
                f"{rule.protocol} port {rule.external_port} on EIP {rule.eip!r} overlaps "
                f"dnat[{other[1]}] ({before.ports}){why}",
            )
            return False
        if rule.type == "share":
            span = Span(first, last, None, {backend: (rule.name, index)})
        else:
            span = Span(first, last, (rule.name, index))
        self._put(self.dnat_spans, group_key, (*group[:at], span, *group[at:]))
        self._put(self.dnat_eips, key, self.dnat_eips.get(key, 0) + 1)
        return True

    def _add_fip(self, rule: FipRule, index: int, problems: Problems) -> bool:
        key = (rule.eip, rule.family)
        if self.dnat_eips.get(key):
            problems.item(
                "fip", index, "eip", f"EIP {rule.eip!r} is also used by a dnat rule; a FIP needs the EIP alone"
            )
            return False
        owner = self.fip_owner.get(key)
        if owner is not None:
            problems.item("fip", index, "eip", f"duplicates fip[{owner[1]}] ({rule.eip!r})")
            return False
        self._put(self.fip_owner, key, (rule.name, index))
        return True

    def claim_fip_address(self, item: dict[str, Any], index: int, problems: Problems) -> bool:
        """One FIP per internal address, whatever else is wrong with either rule."""
        try:
            address = usable_address(item["internalIp"])
        except InvalidValueError:
            return True  # reported by the rule's own checks
        owner = self.fip_internal.get(address)
        if owner is not None:
            problems.item("fip", index, "internalIp", f"duplicates fip[{owner[1]}] ({item['internalIp']!r})")
            return False
        self._put(self.fip_internal, address, (item["name"], index))
        return True

    # removing ------------------------------------------------------------------------

    def remove(self, kind: RuleKind, name: str) -> None:
        """Drop an accepted rule and everything it holds."""
        self._drop(self.names[kind], name)
        rule = self.rules[kind][name]
        self._drop(self.rules[kind], name)
        if isinstance(rule, SnatRule) and rule.destinations:
            self._drop(self.snat_destined, rule.name)
        elif isinstance(rule, SnatRule):
            self._drop(self.snat_owner, rule.internal_cidr)
        elif isinstance(rule, DnatRule):
            self._remove_dnat(rule)
        else:
            self._drop(self.fip_owner, (rule.eip, rule.family))
            self._drop(self.fip_internal, rule.internal_ip)

    def _remove_dnat(self, rule: DnatRule) -> None:
        key = (rule.eip, rule.family)
        if self.dnat_eips[key] > 1:
            self._put(self.dnat_eips, key, self.dnat_eips[key] - 1)
        else:
            self._drop(self.dnat_eips, key)
        group_key = (rule.eip, rule.family, rule.protocol)
        group = self.dnat_spans[group_key]
        at = bisect.bisect_left(group, rule.external_port.first, key=_first_port)
        span = group[at]
        rest: tuple[Span, ...] = ()
        if span.owner is None:
            backends = {b: o for b, o in span.backends.items() if o[0] != rule.name}
            rest = (Span(span.first, span.last, None, backends),) if backends else ()
        group = (*group[:at], *rest, *group[at + 1 :])
        if group:
            self._put(self.dnat_spans, group_key, group)
        else:
            self._drop(self.dnat_spans, group_key)


def _write(table: dict[Any, Any], key: Any, value: Any) -> None:
    if value is _ABSENT:
        table.pop(key, None)
    else:
        table[key] = value
