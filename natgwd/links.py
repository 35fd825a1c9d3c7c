"""What the gateway's interfaces must carry: addresses and routes, derived from the state."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from natgwd.model import DesiredState

DEFAULT_ROUTE = IPv4Network("0.0.0.0/0")


@dataclass(frozen=True, order=True)
class RouteSpec:
    dst: IPv4Network
    via: IPv4Address
    interface: str
    onlink: bool


@dataclass(frozen=True)
class InterfaceSpec:
    name: str
    addresses: frozenset[IPv4Interface]


@dataclass(frozen=True)
class LinkPlan:
    interfaces: tuple[InterfaceSpec, ...]
    routes: tuple[RouteSpec, ...]

    @property
    def interface_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.interfaces)


def link_plan(state: DesiredState) -> LinkPlan:
    internal, external = state.internal, state.external
    external_addresses = set(external.addresses) | {state.eip_interface(e) for e in state.eips}
    routes = [RouteSpec(r.dst, r.via, internal.interface, onlink=False) for r in internal.routes]
    if external.gateway is not None:
        # onlink: the gateway may sit outside the subnet of an EIP that shares its L2.
        routes.append(RouteSpec(DEFAULT_ROUTE, external.gateway, external.interface, onlink=True))
    return LinkPlan(
        (
            InterfaceSpec(internal.interface, frozenset(internal.addresses)),
            InterfaceSpec(external.interface, frozenset(external_addresses)),
        ),
        tuple(sorted(routes)),
    )
