"""The optional `ha` section: an active/standby pair of gateways (keepalived VRRP moves
the addresses, conntrackd FTFW replicates the connections).

Both members read the very same desired-state file. Each finds itself among `members`
by the address it holds on the sync interface (HaConfig.member_on); the other member is
its peer: the unicast VRRP peer and conntrackd's sync destination. One file for both is
what makes the peers comparable: equal applied sha256 on both sides means equal rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from ipaddress import AddressValueError, IPv4Address, IPv4Interface
from typing import TYPE_CHECKING, Any

from natgwd.state.problems import InvalidValueError, Problems
from natgwd.state.rules import require_unicast

if TYPE_CHECKING:
    from natgwd.state.model import DesiredState, IPInterface

# VRRPv3 (RFC 5798) carries the interval in centiseconds in 12 bits.
ADVERT_MIN = Decimal("0.01")
ADVERT_MAX = Decimal("40.95")
CONNTRACKD_PORT = 3780  # VyOS's and conntrackd's examples' port
HELLO_PORT = 3781  # natgwd's peer check (natgwd.ha.peer)


@dataclass(frozen=True)
class HaMember:
    address: IPv4Address
    priority: int


@dataclass(frozen=True)
class HaConfig:
    interface: str
    virtual_router_id: int
    advert_interval: Decimal
    preempt: bool
    conntrack_sync: bool
    members: tuple[HaMember, HaMember]

    def member_on(self, addresses: Iterable[IPv4Address]) -> tuple[HaMember, HaMember] | None:
        """(self, peer) given the addresses on the sync interface, or None if neither
        member's address is there."""
        present = set(addresses)
        first, second = self.members
        if first.address in present:
            return first, second
        if second.address in present:
            return second, first
        return None


def virtual_addresses(state: DesiredState) -> dict[str, tuple[IPv4Interface, ...]]:
    """Per interface, the addresses keepalived moves to the active member: every address
    of the internal and external side (the VMs' gateway, the gateway's own external
    address) and every EIP. natgwd does not configure these itself in HA mode."""
    internal, external = state.internal, state.external
    eips = [a for e in state.eips for a in state.eip_interfaces(e)]
    # Validation refuses IPv6 addresses beside an ha section: the pair moves IPv4 only.
    return {
        internal.interface: tuple(dict.fromkeys(_ipv4(internal.addresses))),
        external.interface: tuple(dict.fromkeys(_ipv4([*external.addresses, *eips]))),
    }


def _ipv4(addresses: Iterable[IPInterface]) -> list[IPv4Interface]:
    return [a for a in addresses if isinstance(a, IPv4Interface)]


def parse_ha(section: dict[str, Any], other_interfaces: tuple[str, str], problems: Problems) -> HaConfig | None:
    """The section (already shaped by the JSON Schema) as an HaConfig, or None with the
    problems found added to `problems`."""
    known = len(problems)
    interface = section["interface"]
    if interface in other_interfaces:
        problems.add("$.ha.interface", "must differ from internal.interface and external.interface")
    advert = problems.parsed("$.ha.advertInterval", advert_interval, section.get("advertInterval", 1))
    members: list[HaMember] = []
    for index, item in enumerate(section["members"]):
        address = problems.parsed(f"$.ha.members[{index}].address", _member_address, item["address"])
        if address is not None:
            members.append(HaMember(address, item["priority"]))
    if len(members) == 2:
        if members[0].address == members[1].address:
            problems.add("$.ha.members[1].address", "must differ from members[0].address")
        if members[0].priority == members[1].priority:
            # Equal priorities elect by the higher address: legal VRRP, but it hides which
            # member is meant to be active.
            problems.add("$.ha.members[1].priority", "must differ from members[0].priority")
    if len(problems) > known or advert is None:
        return None
    return HaConfig(
        interface=interface,
        virtual_router_id=section["virtualRouterId"],
        advert_interval=advert,
        preempt=section.get("preempt", False),
        conntrack_sync=section.get("conntrackSync", True),
        members=(members[0], members[1]),
    )


def _member_address(text: str) -> IPv4Address:
    try:
        address = IPv4Address(text)
    except AddressValueError as err:
        raise InvalidValueError(f"not a valid IPv4 address: {err}") from None
    require_unicast(address)
    return address


def advert_interval(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValueError("must be a number of seconds")
    try:
        seconds = Decimal(str(value))
    except InvalidOperation:
        raise InvalidValueError("must be a number of seconds") from None
    if not ADVERT_MIN <= seconds <= ADVERT_MAX:
        raise InvalidValueError(f"must be between {ADVERT_MIN} and {ADVERT_MAX} seconds (VRRPv3)")
    if seconds != seconds.quantize(ADVERT_MIN):
        raise InvalidValueError("must be a multiple of 0.01 seconds (VRRPv3 counts centiseconds)")
    # 10, not 1E+1: the value is written into keepalived.conf as it prints.
    return seconds.quantize(Decimal(1)) if seconds == seconds.to_integral() else seconds.normalize()
