"""What the gateway's interfaces must carry: addresses and routes, derived from the state."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network

from natgwd.planning.policy import FORWARDED_TABLE, PolicyRule, network_ids, policy_rules
from natgwd.state.model import DesiredState, IPAddress, IPInterface, IPNetwork

MAIN_TABLE = 254

DEFAULT_ROUTE = IPv4Network("0.0.0.0/0")
DEFAULT_ROUTE6 = IPv6Network("::/0")


@dataclass(frozen=True, order=True)
class RouteSpec:
    dst: IPNetwork
    via: IPAddress
    interface: str
    onlink: bool
    table: int = MAIN_TABLE

    def sort_key(self) -> tuple[int, int, IPNetwork]:
        return (self.table, self.dst.version, self.dst)


@dataclass(frozen=True)
class InterfaceSpec:
    name: str
    addresses: frozenset[IPInterface]


@dataclass(frozen=True)
class LinkPlan:
    interfaces: tuple[InterfaceSpec, ...]
    routes: tuple[RouteSpec, ...]
    rules: tuple[PolicyRule, ...] = ()

    @property
    def interface_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.interfaces)


def with_addresses(
    plan: LinkPlan, interface: str, removed: Iterable[IPInterface], added: Iterable[IPInterface]
) -> LinkPlan:
    """`plan` with addresses removed from and added to one interface's (a change of EIPs)."""
    interfaces = tuple(
        InterfaceSpec(spec.name, (spec.addresses - frozenset(removed)) | frozenset(added))
        if spec.name == interface
        else spec
        for spec in plan.interfaces
    )
    return replace(plan, interfaces=interfaces)


def link_plan(state: DesiredState) -> LinkPlan:
    internal = state.internal
    # In HA mode keepalived adds and removes every address natgwd would add, so that the
    # standby holds none; routes stay on both members, onlink since the standby holds no
    # address in the nexthop's subnet: a takeover then moves only addresses. Scaled out,
    # keepalived moves each EIP group to its owner, and each member's own LAN address
    # comes from its pod network.
    ha = state.ha is not None or state.scale_out is not None
    routes = [RouteSpec(r.dst, r.via, internal.interface, onlink=ha) for r in internal.routes]
    interfaces = [InterfaceSpec(internal.interface, frozenset() if ha else frozenset(internal.addresses))]
    tables = network_ids(state)
    for network in state.externals:
        eips = {a for e in state.eips if e.network == network.name for a in state.eip_interfaces(e)}
        addresses: frozenset[IPInterface] = frozenset() if ha else frozenset(set(network.addresses) | eips)
        interfaces.append(InterfaceSpec(network.interface, addresses))
        # Only `external` routes by default (in natgwd's table when only forwarded packets
        # take them); each network also has its own table when there are several.
        own_tables = []
        if network is state.external:
            own_tables.append(FORWARDED_TABLE if network.default_route == "forwarded" else MAIN_TABLE)
        if tables:
            own_tables.append(tables[network.name])
        for table in own_tables:
            for default, gateway in ((DEFAULT_ROUTE, network.gateway), (DEFAULT_ROUTE6, network.gateway6)):
                if gateway is not None:
                    # onlink: the gateway may sit outside the subnet of an EIP that shares its L2.
                    routes.append(RouteSpec(default, gateway, network.interface, onlink=True, table=table))
    return LinkPlan(
        tuple(interfaces),
        # IPv4 and IPv6 networks do not compare: sort by family first.
        tuple(sorted(routes, key=RouteSpec.sort_key)),
        policy_rules(state),
    )
