"""What the gateway's interfaces must carry: addresses and routes, derived from the state."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from natgwd.state.model import DesiredState

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
    if state.ha is not None:
        # keepalived adds and removes every one of these addresses: natgwd adding them too
        # would put them on the standby as well. Routes stay on both members, onlink since
        # the standby holds no address in the nexthop's subnet; a takeover then moves only
        # addresses.
        return LinkPlan(
            (InterfaceSpec(internal.interface, frozenset()), InterfaceSpec(external.interface, frozenset())),
            tuple(sorted(_routes(state, onlink=True))),
        )
    external_addresses = set(external.addresses) | {state.eip_interface(e) for e in state.eips}
    return LinkPlan(
        (
            InterfaceSpec(internal.interface, frozenset(internal.addresses)),
            InterfaceSpec(external.interface, frozenset(external_addresses)),
        ),
        tuple(sorted(_routes(state, onlink=False))),
    )


def _routes(state: DesiredState, onlink: bool) -> list[RouteSpec]:
    internal, external = state.internal, state.external
    routes = [RouteSpec(r.dst, r.via, internal.interface, onlink=onlink) for r in internal.routes]
    if external.gateway is not None:
        # onlink: the gateway may sit outside the subnet of an EIP that shares its L2.
        routes.append(RouteSpec(DEFAULT_ROUTE, external.gateway, external.interface, onlink=True))
    return routes
