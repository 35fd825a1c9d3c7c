"""The optional `scaleOut` section: N members that all forward, each group of EIPs owned by
one of them at a time (see docs/scaling-out.md).

Every member reads the very same file. A member finds itself in `members` by the address
it holds on `interface`; the groups, their virtual router ids and every member's priority
follow from the file alone, so all members agree on them without talking.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from ipaddress import AddressValueError, IPv4Address
from typing import Any

from natgwd.state.ha import advert_interval
from natgwd.state.problems import Problems

DEFAULT_PREEMPT_DELAY = 5
DEFAULT_MULTICAST_GROUP = IPv4Address("225.0.0.50")
# Group i hands its packets over with firewall mark HANDOVER_BASE + i, routed by the
# table of the same number (beside natgwd.planning.policy's NETWORK_BASE range).
HANDOVER_BASE = 4300
# The first choice of a group has this priority, the next member 10 less, and so on:
# with at most 16 members the last choice still has 50.
TOP_PRIORITY = 200
PRIORITY_STEP = 10


@dataclass(frozen=True)
class EipGroup:
    index: int
    virtual_router_id: int
    priorities: tuple[int, ...]  # one per member, in members' order; 0: never owns it
    listed: tuple[str, ...]  # EIP names the file puts here (others come by hash)

    @property
    def mark(self) -> int:
        return HANDOVER_BASE + self.index

    def first_choice(self) -> int:
        return max(range(len(self.priorities)), key=lambda m: self.priorities[m])


@dataclass(frozen=True)
class ScaleOutConfig:
    interface: str
    advert_interval: Decimal
    preempt_delay: int
    conntrack_sync: bool
    multicast_group: IPv4Address
    members: tuple[IPv4Address, ...]
    groups: tuple[EipGroup, ...]
    # Set when the members found each other (natgwd.ha.autoscale), not in the file: the
    # Deployment's name, and whether the discovery window has passed.
    discovery_scope: str | None = None
    settled: bool = True

    def member_on(self, addresses: Iterable[IPv4Address]) -> int | None:
        """This member's index given the addresses on `interface`, or None."""
        present = set(addresses)
        found = [i for i, address in enumerate(self.members) if address in present]
        return found[0] if len(found) == 1 else None

    def group_of(self, eip: str) -> EipGroup:
        for group in self.groups:
            if eip in group.listed:
                return group
        return self.groups[hashed_group(eip, len(self.groups))]

    def eips_of(self, group: EipGroup, eips: Iterable[str]) -> tuple[str, ...]:
        return tuple(name for name in eips if self.group_of(name).index == group.index)


def hashed_group(eip: str, groups: int) -> int:
    """The group an EIP no group lists goes to. Stable across processes and releases (unlike
    hash()): every member computes the same."""
    digest = hashlib.sha256(eip.encode()).digest()
    return int.from_bytes(digest[:8], "big") % groups


def rotated_priorities(group: int, members: int) -> tuple[int, ...]:
    """Group `group`'s first choice is member `group` mod N, then the next members in turn."""
    return tuple(TOP_PRIORITY - PRIORITY_STEP * ((m - group) % members) for m in range(members))


def parse_scale_out(
    section: dict[str, Any], eips: Mapping[str, object], external_interfaces: Iterable[str], problems: Problems
) -> ScaleOutConfig | None:
    """The section (already shaped by the JSON Schema) as a ScaleOutConfig, or None with
    the problems found added to `problems`. `eips`: the state's EIPs by name."""
    known = len(problems)
    interface = section["interface"]
    if interface in set(external_interfaces):
        problems.add("$.scaleOut.interface", "must differ from every external interface")
    advert = problems.parsed("$.scaleOut.advertInterval", advert_interval, section.get("advertInterval", 1))
    members = _members(section["members"], problems)
    groups = _groups(section, len(section["members"]), eips, problems)
    base = section["virtualRouterIdBase"]
    if base + len(groups) - 1 > 255:
        problems.add(
            "$.scaleOut.virtualRouterIdBase", f"{base} + {len(groups)} groups would pass 255, the last VRRP id"
        )
    multicast = IPv4Address(section.get("multicastGroup", str(DEFAULT_MULTICAST_GROUP)))
    if not multicast.is_multicast:
        problems.add("$.scaleOut.multicastGroup", f"{multicast} is not a multicast address")
    if len(problems) > known or advert is None:
        return None
    return ScaleOutConfig(
        interface=interface,
        advert_interval=advert,
        preempt_delay=section.get("preemptDelay", DEFAULT_PREEMPT_DELAY),
        conntrack_sync=section.get("conntrackSync", True),
        multicast_group=multicast,
        members=tuple(members),
        groups=tuple(
            EipGroup(index, base + index, priorities, listed) for index, (priorities, listed) in enumerate(groups)
        ),
    )


def _members(items: list[dict[str, Any]], problems: Problems) -> list[IPv4Address]:
    members: list[IPv4Address] = []
    seen: dict[IPv4Address, int] = {}
    for index, item in enumerate(items):
        path = f"$.scaleOut.members[{index}].address"
        try:
            address = IPv4Address(item["address"])
        except AddressValueError as err:
            problems.add(path, f"not a valid IPv4 address: {err}")
            continue
        if address.is_multicast or address.is_unspecified or address.is_loopback or address.is_reserved:
            problems.add(path, f"{address} is not a usable unicast address")
            continue
        if address in seen:
            problems.add(path, f"{address} is members[{seen[address]}] already")
            continue
        seen[address] = index
        members.append(address)
    return members


def _groups(
    section: dict[str, Any], members: int, eips: Mapping[str, object], problems: Problems
) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
    items = section.get("groups")
    if items is None:
        return [(rotated_priorities(g, members), ()) for g in range(members)]
    groups: list[tuple[tuple[int, ...], tuple[str, ...]]] = []
    placed: dict[str, int] = {}
    for index, item in enumerate(items):
        path = f"$.scaleOut.groups[{index}]"
        priorities = tuple(item.get("priorities", rotated_priorities(index, members)))
        if len(priorities) != members:
            problems.add(f"{path}.priorities", f"must list one priority per member ({members}), not {len(priorities)}")
        elif not any(priorities):
            problems.add(f"{path}.priorities", "no member can own this group: every priority is 0")
        else:
            first: dict[int, int] = {}
            for member, priority in enumerate(priorities):
                if priority and priority in first:
                    # Equal priorities elect by the higher address: legal VRRP, but it hides
                    # which member is meant to own the group.
                    problems.add(f"{path}.priorities[{member}]", f"equal to priorities[{first[priority]}]")
                first.setdefault(priority, member)
        listed: list[str] = []
        for position, name in enumerate(item.get("eips", [])):
            where = f"{path}.eips[{position}]"
            if name not in eips:
                problems.add(where, f"no EIP is named {name!r}")
            elif name in placed:
                problems.add(where, f"{name!r} is in groups[{placed[name]}] already")
            else:
                placed[name] = index
                listed.append(name)
        groups.append((priorities, tuple(listed)))
    return groups
