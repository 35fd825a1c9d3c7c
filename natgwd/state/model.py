"""The desired state of one NAT gateway, as validated, immutable values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network, ip_interface
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, overload

if TYPE_CHECKING:
    from natgwd.state.bgp import BgpConfig
    from natgwd.state.ha import HaConfig
    from natgwd.state.scaleout import ScaleOutConfig

from natgwd.state.portblocks import PortBlock
from natgwd.state.qos import QosPolicy
from natgwd.state.timeouts import TimeoutPolicy

T = TypeVar("T")


class computed_once(Generic[T]):  # noqa: N801 (a decorator, named as cached_property is)
    """functools.cached_property without the lock Python 3.11 takes at every first use
    (1.5 us: a full apply asks each of 50,000 rules its family). For pure values of
    immutable objects, where two threads computing one at once is harmless."""

    def __init__(self, func: Callable[[Any], T]) -> None:
        self.func = func
        self.name = func.__name__

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> computed_once[T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> T | computed_once[T]:
        if instance is None:
            return self
        value = self.func(instance)
        instance.__dict__[self.name] = value  # found before this (non-data) descriptor from now on
        return value


# Either family: a rule translates within the family of its internal address or CIDR.
IPAddress = IPv4Address | IPv6Address
IPInterface = IPv4Interface | IPv6Interface
IPNetwork = IPv4Network | IPv6Network
Family = Literal[4, 6]

Protocol = Literal["tcp", "udp"]
RuleKind = Literal["snat", "dnat", "fip"]
RULE_KINDS: tuple[RuleKind, ...] = ("snat", "dnat", "fip")  # also the rule sections of a state file
DnatType = Literal["exclusive", "share"]
DefaultRoute = Literal["main", "forwarded"]


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
    dst: IPNetwork
    via: IPAddress


@dataclass(frozen=True)
class InternalSide:
    interface: str
    addresses: tuple[IPInterface, ...]
    routes: tuple[Route, ...]
    # Translated connections to the internal side get the interface's address as source:
    # the backends (a Service's cluster IP) answer the gateway, not the client.
    masquerade: bool = False

    def reaches(self, address: IPAddress) -> bool:
        """True when the gateway has a path to `address` through the internal side."""
        value = int(address)
        for network, mask in self._reached[address.version]:  # noqa: SIM110 (no generator per rule)
            if value & mask == network:
                return True
        return False

    @cached_property
    def _reached(self) -> dict[int, tuple[tuple[int, int], ...]]:
        # As integers: `address in network` costs a microsecond, and validation asks this
        # for every DNAT and FIP rule.
        networks = [a.network for a in self.addresses] + [r.dst for r in self.routes]
        return {
            version: tuple((int(n.network_address), int(n.netmask)) for n in networks if n.version == version)
            for version in (4, 6)
        }


PRIMARY_NETWORK = "external"  # the name of `external` unless it names itself


@dataclass(frozen=True)
class ExternalSide:
    """One external network: `external`, or one of `externals` (each with a name)."""

    interface: str
    addresses: tuple[IPInterface, ...]
    gateway: IPv4Address | None
    gateway6: IPv6Address | None = None
    name: str = PRIMARY_NETWORK
    # "forwarded": the default routes serve forwarded packets only (natgwd.planning.policy).
    default_route: DefaultRoute = "main"

    def contains(self, address: IPAddress) -> bool:
        return any(a.version == address.version and address in a.network for a in self.addresses)


@dataclass(frozen=True)
class Eip:
    """An EIP has an IPv4 address, an IPv6 address or both (Kube-OVN's v4ip and v6ip)."""

    name: str
    v4ip: IPv4Address | None
    v6ip: IPv6Address | None = None
    network: str = PRIMARY_NETWORK  # the external network the EIP lives on
    qos_policy: str | None = None
    bgp: bool = False  # announced when the bgp section announces "marked" EIPs (ovn.kubernetes.io/bgp)
    draining: bool = False  # takes no new SNAT connections; open ones continue (natgwd.planning.pools)

    def address(self, family: int) -> IPAddress | None:
        return self.v4ip if family == 4 else self.v6ip

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        return tuple(a for a in (self.v4ip, self.v6ip) if a is not None)


@dataclass(frozen=True)
class SnatRule:
    kind: ClassVar[RuleKind] = "snat"
    name: str
    eip: str  # with a pool: its first EIP, or the EIP of one member (natgwd.planning.pools)
    internal_cidr: IPNetwork
    timeouts: TimeoutPolicy | None = None  # its own, over the gateway's (natgwd.state.timeouts)
    # `eips`: every EIP of the rule's pool, in the file's order; empty for a rule with one `eip`.
    pool: tuple[str, ...] = ()
    # Only connections to these networks, before the rules by source alone (natgwd.state.destinations).
    destinations: tuple[IPNetwork, ...] = ()
    port_block: PortBlock | None = None  # a fixed block of ports per internal address

    @computed_once
    def family(self) -> Family:
        return self.internal_cidr.version


@dataclass(frozen=True)
class DnatRule:
    kind: ClassVar[RuleKind] = "dnat"
    name: str
    eip: str
    protocol: Protocol
    external_port: PortRange
    internal_ip: IPAddress
    internal_port: PortRange
    # "share": one backend of a group that spreads (eip, protocol, port) over its members
    type: DnatType = "exclusive"
    timeouts: TimeoutPolicy | None = None

    @computed_once
    def family(self) -> Family:
        # Cached (outside the fields, so equality and hashing ignore it): planning asks
        # this several times per rule.
        return self.internal_ip.version

    @property
    def identity(self) -> tuple[str, int, str, PortRange]:
        return (self.eip, self.family, self.protocol, self.external_port)

    def backend_ports(self) -> range:
        """The backend's ports its replies leave from (a share rule's backend has one)."""
        last = self.internal_port.first if self.type == "share" else self.internal_port.last
        return range(self.internal_port.first, last + 1)


@dataclass(frozen=True)
class FipRule:
    kind: ClassVar[RuleKind] = "fip"
    name: str
    eip: str
    internal_ip: IPAddress
    timeouts: TimeoutPolicy | None = None

    @computed_once
    def family(self) -> Family:
        return self.internal_ip.version


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
    more_externals: tuple[ExternalSide, ...] = ()
    bgp: BgpConfig | None = None  # EIPs announced as routes to upstream routers
    scale_out: ScaleOutConfig | None = None  # N members forwarding, each EIP group one owner
    timeouts: TimeoutPolicy | None = None  # the gateway's idle timeouts; None: the kernel's

    @property
    def externals(self) -> tuple[ExternalSide, ...]:
        """Every external network, `external` first."""
        return (self.external, *self.more_externals)

    def network_of(self, eip: Eip) -> ExternalSide:
        return next(n for n in self.externals if n.name == eip.network)

    def eip_interfaces(self, eip: Eip) -> tuple[IPInterface, ...]:
        """The EIP's addresses as addresses of the external interface: the prefix of the
        external subnet that contains each (so the kernel answers ARP or neighbour
        solicitations for it on that subnet), else a host prefix."""
        return tuple(self._external_interface(self.network_of(eip), address) for address in eip.addresses)

    def _external_interface(self, network: ExternalSide, address: IPAddress) -> IPInterface:
        # (address, prefix length) pairs: parsing "address/prefix" text again costs
        # more, and link planning asks this for every EIP.
        for external in network.addresses:
            if address.version == external.version and address in external.network:
                return _interface(address, external.network.prefixlen)
        return _interface(address, address.max_prefixlen)


@lru_cache(maxsize=1 << 14)
def _interface(address: IPAddress, prefixlen: int) -> IPInterface:
    # Link planning asks for every EIP's at every change of the EIPs: building an
    # IPv4Interface costs tens of microseconds, a thousand EIPs milliseconds per call.
    return ip_interface((address, prefixlen))
