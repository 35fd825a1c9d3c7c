"""The desired state of one NAT gateway, as validated, immutable values."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from natgwd.ha.config import HaConfig

from natgwd.qos.model import QosPolicy

Protocol = Literal["tcp", "udp"]
RuleKind = Literal["snat", "dnat", "fip"]
DnatType = Literal["exclusive", "share"]


@dataclass(frozen=True, order=True)
class PortRange:
    first: int
    last: int

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    def overlaps(self, other: PortRange) -> bool:
        return self.first <= other.last and other.first <= self.last


@dataclass(frozen=True)
class Route:
    dst: IPv4Network
    via: IPv4Address


@dataclass(frozen=True)
class InternalSide:
    interface: str
    addresses: tuple[IPv4Interface, ...]
    routes: tuple[Route, ...]

    def reaches(self, address: IPv4Address) -> bool:
        """True when the gateway has a path to `address` through the internal side."""
        value = int(address)
        return any(value & mask == network for network, mask in self._reached)

    @cached_property
    def _reached(self) -> tuple[tuple[int, int], ...]:
        # As integers: `address in network` costs a microsecond, and validation asks this
        # for every DNAT and FIP rule.
        networks = [a.network for a in self.addresses] + [r.dst for r in self.routes]
        return tuple((int(n.network_address), int(n.netmask)) for n in networks)


@dataclass(frozen=True)
class ExternalSide:
    interface: str
    addresses: tuple[IPv4Interface, ...]
    gateway: IPv4Address | None


@dataclass(frozen=True)
class Eip:
    name: str
    v4ip: IPv4Address
    qos_policy: str | None = None


@dataclass(frozen=True)
class SnatRule:
    name: str
    eip: str
    internal_cidr: IPv4Network


@dataclass(frozen=True)
class DnatRule:
    name: str
    eip: str
    protocol: Protocol
    external_port: PortRange
    internal_ip: IPv4Address
    internal_port: PortRange
    # "share": one backend of a group that spreads (eip, protocol, port) over its members
    type: DnatType = "exclusive"

    @property
    def identity(self) -> tuple[str, str, PortRange]:
        return (self.eip, self.protocol, self.external_port)


@dataclass(frozen=True)
class FipRule:
    name: str
    eip: str
    internal_ip: IPv4Address


@dataclass(frozen=True)
class DesiredState:
    internal: InternalSide
    external: ExternalSide
    eips: tuple[Eip, ...] = ()
    snat: tuple[SnatRule, ...] = ()
    dnat: tuple[DnatRule, ...] = ()
    fip: tuple[FipRule, ...] = ()
    qos_policies: tuple[QosPolicy, ...] = ()
    qos_policy: str | None = None  # the gateway's own (VpcNatGateway.spec.qosPolicy)
    ha: HaConfig | None = None  # an active/standby pair: keepalived owns the addresses

    def eip_interface(self, eip: Eip) -> IPv4Interface:
        """The EIP as an address of the external interface: the prefix of the external
        subnet that contains it (so the kernel answers ARP for it on that subnet), else /32."""
        for address in self.external.addresses:
            if eip.v4ip in address.network:
                return IPv4Interface(f"{eip.v4ip}/{address.network.prefixlen}")
        return IPv4Interface(f"{eip.v4ip}/32")
