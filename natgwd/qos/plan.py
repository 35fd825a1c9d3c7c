"""From the desired state's QoS to the traffic-control tree that shapes it: pure values,
no kernel. tc.py makes the kernel hold them.

One HTB tree per direction, as Kube-OVN's gateway builds it: egress on the external
interface (after SNAT, so an EIP's packets carry it as source), ingress on an IFB device
that the external interface's ingress qdisc redirects every IPv4 packet to (before DNAT,
so the EIP is the destination). Each tree has a class per limited EIP, per gateway-level
CIDR rule and for a NIC-wide rule, and a default class for everything else; u32 filters
send packets to them. The filter priorities put EIP rules before the gateway's CIDR rules
(ordered by their `priority`) before the NIC-wide rule, whatever numbers the rules carry.

Class ids are part of the kernel state that must not churn: a class keeps its id across
changes and restarts (tc.py reads the ids back from the filters), and a new class gets a
hash of what it matches, probing to the next free id on collision.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from socket import inet_aton, inet_ntoa
from typing import Literal

from natgwd.state.model import DesiredState
from natgwd.state.qos import BandwidthLimitRule, Direction

ROOT_MAJOR = 0x4E47  # "NG": the root qdisc handle 4e47: tells natgwd's trees apart
DEFAULT_MINOR = 0xFFFE
NIC_MINOR = 0xFF00
EIP_MINORS = range(0x0001, 0x7FFF)
GATEWAY_MINORS = range(0x8000, 0xFF00)
EIP_PRIO = 100
GATEWAY_PRIO = 1000  # + the rule's priority (0-1023)
NIC_PRIO = 3000
DEFAULT_RATE_BITS = 10_000 * 1_000_000  # unlimited traffic: 10 Gbit/s, as upstream
# A veth or a NIC hands HTB GSO packets of up to 64 KiB: a smaller bucket cannot pass one
# without overdrawing it, which makes the achieved rate erratic.
MIN_BURST_BYTES = 128 * 1024
BURST_SECONDS_DEFAULT = 0.01  # without burstMax: 10 ms at the rate

SOURCE_OFFSET = 12  # of the IPv4 source address in the header
DESTINATION_OFFSET = 16
ALL_ONES = 0xFFFFFFFF

ClassKind = Literal["eip", "cidr", "nic", "default"]


@dataclass(frozen=True, order=True)
class ClassKey:
    """What a class limits: an EIP (its address), a gateway rule's match ("dst CIDR"),
    the whole NIC, or the default class."""

    kind: ClassKind
    match: str = ""


@dataclass(frozen=True)
class FilterSpec:
    """A u32 filter with one 32-bit key (mask 0 matches every packet), to class `minor`."""

    prio: int
    offset: int
    value: int
    mask: int
    minor: int


@dataclass(frozen=True)
class Want:
    rate_bits: int
    burst_bytes: int
    prio: int
    label: str  # EIP name or "policy/rule", for metrics and status

    @property
    def rate_bytes(self) -> int:
        return self.rate_bits // 8


@dataclass(frozen=True)
class HtbClass:
    rate_bytes: int
    burst_bytes: int


@dataclass(frozen=True)
class Tree:
    """One direction's HTB tree: classes by minor, the filters, and what each class is."""

    classes: Mapping[int, HtbClass]
    filters: frozenset[FilterSpec]
    keys: Mapping[int, ClassKey] = field(default_factory=dict)
    labels: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class QosWants:
    external: str
    by_direction: Mapping[Direction, Mapping[ClassKey, Want]]

    @property
    def ifb(self) -> str:
        return ifb_name(self.external)

    def active(self, direction: Direction) -> bool:
        return bool(self.by_direction.get(direction))


def ifb_name(external: str) -> str:
    return f"ifb-{external}"[:15]


def handle(minor: int) -> int:
    return (ROOT_MAJOR << 16) | minor


def burst_bytes(rule: BandwidthLimitRule) -> int:
    default = int(rule.rate_bits / 8 * BURST_SECONDS_DEFAULT)
    return max(rule.burst_bytes or default, MIN_BURST_BYTES)


def wants(state: DesiredState) -> QosWants:
    """The limited classes of each direction (none: the direction needs no tree)."""
    policies = {p.name: p for p in state.qos_policies}
    result: dict[Direction, dict[ClassKey, Want]] = {"ingress": {}, "egress": {}}
    limits = {p.name: [(r.direction, r.rate_bits, burst_bytes(r)) for r in p.rules] for p in state.qos_policies}
    for eip in state.eips:
        rules = limits.get(eip.qos_policy or "")
        if rules is None or eip.v4ip is None:  # validation allows QoS on IPv4 EIPs only
            continue
        key = ClassKey("eip", inet_ntoa(eip.v4ip.packed))  # str() costs 5 times as much
        for direction, rate_bits, burst in rules:
            result[direction][key] = Want(rate_bits, burst, EIP_PRIO, eip.name)
    gateway = policies.get(state.qos_policy or "")
    for rule in gateway.rules if gateway else ():
        label = f"{gateway.name}/{rule.name}" if gateway else rule.name
        if rule.match is None:
            result[rule.direction][ClassKey("nic")] = Want(rule.rate_bits, burst_bytes(rule), NIC_PRIO, label)
        else:
            want = Want(rule.rate_bits, burst_bytes(rule), GATEWAY_PRIO + rule.priority, label)
            result[rule.direction][ClassKey("cidr", str(rule.match))] = want
    return QosWants(state.external.interface, result)


def assign_minors(keys: list[ClassKey], previous: Mapping[ClassKey, int]) -> dict[ClassKey, int]:
    """A class id per key: the previous one where still valid, else a hash of the key
    probed to the next free id in the key's range."""
    assigned: dict[ClassKey, int] = {}
    taken: set[int] = set()
    for key in sorted(keys):
        minor = previous.get(key)
        if minor is not None and minor in _range(key) and minor not in taken:
            assigned[key] = minor
            taken.add(minor)
    for key in sorted(k for k in keys if k not in assigned):
        span = _range(key)
        start = zlib.crc32(key.match.encode()) % len(span)
        for step in range(len(span)):
            minor = span[(start + step) % len(span)]
            if minor not in taken:
                break
        else:
            raise ValueError(f"no free class id for {key}")  # validation keeps counts far below
        assigned[key] = minor
        taken.add(minor)
    return assigned


def _range(key: ClassKey) -> range:
    if key.kind == "eip":
        return EIP_MINORS
    if key.kind == "cidr":
        return GATEWAY_MINORS
    return range(NIC_MINOR, NIC_MINOR + 1) if key.kind == "nic" else range(DEFAULT_MINOR, DEFAULT_MINOR + 1)


def tree(direction: Direction, wanted: Mapping[ClassKey, Want], previous: Mapping[ClassKey, int]) -> Tree:
    """The tree of one direction, keeping the class ids in `previous` (read from the kernel)."""
    minors = assign_minors([*wanted, ClassKey("default")], previous)
    classes = {minors[ClassKey("default")]: HtbClass(DEFAULT_RATE_BITS // 8, MIN_BURST_BYTES)}
    filters = set()
    labels = {}
    for key, want in wanted.items():
        minor = minors[key]
        classes[minor] = HtbClass(want.rate_bytes, want.burst_bytes)
        filters.add(_filter(direction, key, want.prio, minor))
        labels[minor] = want.label
    keys = {minor: key for key, minor in minors.items()}
    return Tree(classes, frozenset(filters), keys, labels)


def _filter(direction: Direction, key: ClassKey, prio: int, minor: int) -> FilterSpec:
    if key.kind == "eip":
        offset = SOURCE_OFFSET if direction == "egress" else DESTINATION_OFFSET
        # inet_aton: the address was validated with the state; 2,000 of these per resync.
        return FilterSpec(prio, offset, int.from_bytes(inet_aton(key.match), "big"), ALL_ONES, minor)
    if key.kind == "cidr":
        field_name, _, cidr = key.match.partition(" ")
        network = IPv4Network(cidr)
        offset = SOURCE_OFFSET if field_name == "src" else DESTINATION_OFFSET
        return FilterSpec(prio, offset, int(network.network_address), int(network.netmask), minor)
    return FilterSpec(prio, 0, 0, 0, minor)


def key_of(direction: Direction, spec: FilterSpec) -> ClassKey | None:
    """What a filter found in the kernel limits, judged by its class id range and its
    match (the inverse of _filter); None for a filter natgwd would not have made."""
    if spec.minor in EIP_MINORS and spec.mask == ALL_ONES:
        wanted_offset = SOURCE_OFFSET if direction == "egress" else DESTINATION_OFFSET
        return ClassKey("eip", inet_ntoa(spec.value.to_bytes(4, "big"))) if spec.offset == wanted_offset else None
    if spec.minor in GATEWAY_MINORS and spec.offset in (SOURCE_OFFSET, DESTINATION_OFFSET):
        try:
            network = IPv4Network((spec.value, bin(spec.mask).count("1")))
        except ValueError:
            return None
        if int(network.netmask) != spec.mask:
            return None
        return ClassKey("cidr", f"{'src' if spec.offset == SOURCE_OFFSET else 'dst'} {network}")
    if spec.minor == NIC_MINOR and spec.mask == 0:
        return ClassKey("nic")
    return None


# What the kernel's shell (natgwd.kernel.tc) reports back: pure values, so that
# qos.status and the runtime read them without importing the kernel.
@dataclass
class TcReport:
    changes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ClassStats:
    direction: Direction
    key: ClassKey
    rate_bytes: int  # configured, per second
    bytes: int
    packets: int
    drops: int
    overlimits: int
    backlog_bytes: int
