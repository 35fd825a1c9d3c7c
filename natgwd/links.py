"""What the gateway's interfaces must carry: addresses and routes, derived from the state."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from natgwd.model import DesiredState, IPAddress, IPInterface, IPNetwork

DEFAULT_ROUTE = IPv4Network("0.0.0.0/0")
DEFAULT_ROUTE6 = IPv6Network("::/0")


@dataclass(frozen=True, order=True)
class RouteSpec:
    dst: IPNetwork
    via: IPAddress
    interface: str
    onlink: bool

    def sort_key(self) -> tuple[int, IPNetwork]:
        return (self.dst.version, self.dst)


@dataclass(frozen=True)
class InterfaceSpec:
    name: str
    addresses: frozenset[IPInterface]


@dataclass(frozen=True)
class LinkPlan:
    interfaces: tuple[InterfaceSpec, ...]
    routes: tuple[RouteSpec, ...]

    @property
    def interface_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.interfaces)


def link_plan(state: DesiredState) -> LinkPlan:
    internal, external = state.internal, state.external
    external_addresses = set(external.addresses) | {a for e in state.eips for a in state.eip_interfaces(e)}
    routes = [RouteSpec(r.dst, r.via, internal.interface, onlink=False) for r in internal.routes]
    if external.gateway is not None:
        # onlink: the gateway may sit outside the subnet of an EIP that shares its L2.
        routes.append(RouteSpec(DEFAULT_ROUTE, external.gateway, external.interface, onlink=True))
    if external.gateway6 is not None:
        routes.append(RouteSpec(DEFAULT_ROUTE6, external.gateway6, external.interface, onlink=True))
    return LinkPlan(
        (
            InterfaceSpec(internal.interface, frozenset(internal.addresses)),
            InterfaceSpec(external.interface, frozenset(external_addresses)),
        ),
        # IPv4 and IPv6 networks do not compare: sort by family first.
        tuple(sorted(routes, key=RouteSpec.sort_key)),
    )
