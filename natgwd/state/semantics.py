"""What a schema cannot say about a document of the right shape: addresses, the interfaces
and networks, EIP references, duplicates, conflicts and reachability; the rules folded into
their indexes, QoS and HA checked by their own packages, every problem collected."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
    NetmaskValueError,
)
from typing import Any

from natgwd.state.bgp import BgpConfig, parse_bgp
from natgwd.state.ha import HaConfig, parse_ha
from natgwd.state.model import (
    PRIMARY_NETWORK,
    RULE_KINDS,
    DesiredState,
    DnatRule,
    Eip,
    ExternalSide,
    InternalSide,
    IPAddress,
    IPInterface,
    IPNetwork,
    Route,
    RuleKind,
)
from natgwd.state.problems import InvalidStateError, Problems
from natgwd.state.qos_validation import qos_policies
from natgwd.state.rules import (
    RULE_CHECKS,
    Rule,
    RuleContext,
    RuleIndex,
    family_name,
    port_block_conflicts,
    usable_address,
)
from natgwd.state.rules import network as parse_network
from natgwd.state.scaleout import ScaleOutConfig, parse_scale_out
from natgwd.state.timeouts import parse_timeouts


@dataclass(frozen=True)
class Validated:
    """A valid document, the state it describes and the indexes of its rules."""

    document: dict[str, Any]
    state: DesiredState
    index: RuleIndex


class Semantics:
    """Checks that need the whole document; collects every problem before raising."""

    def __init__(self, document: dict[str, Any], set_aside: dict[str, set[int]] | None = None) -> None:
        self.doc = document
        self.problems = Problems()
        self.eips: dict[str, Eip] = {}
        self.networks: tuple[ExternalSide, ...] = ()
        # Items the schema refused (already reported): skipped here, and an EIP's name among
        # them is not reported again as unknown by the rules that name it.
        self.set_aside = set_aside or {}
        aside_eips = [item for i, item in enumerate(document.get("eips", [])) if i in self.set_aside.get("eips", ())]
        names = [item.get("name") if isinstance(item, dict) else None for item in aside_eips]
        self.set_aside_eips = {name for name in names if isinstance(name, str)}
        # One without a name could be any EIP: no rule's EIP can be called unknown then.
        self.any_eip_set_aside = any(not isinstance(name, str) for name in names)

    def items(self, section: str) -> list[tuple[int, dict[str, Any]]]:
        aside = self.set_aside.get(section, set())
        return [(i, item) for i, item in enumerate(self.doc.get(section, [])) if i not in aside]

    def build(self) -> Validated:
        external = self._external("$.external", self.doc["external"])
        more = self._more_externals()
        internal = self._internal((external, *more))
        if internal.interface == external.interface:
            self.problems.add("$.external.interface", "must differ from internal.interface")
        for gateway, field, default in (
            (external.gateway, "gateway", "0.0.0.0/0"),
            (external.gateway6, "gateway6", "::/0"),
        ):
            if gateway is not None and any(str(r.dst) == default for r in internal.routes):
                self.problems.add("$.internal.routes", f"a default route ({default}) conflicts with external.{field}")
        self.networks = (external, *more)
        if external.default_route == "forwarded":
            for section, what in (("externals", "several external networks"), ("scaleOut", "scaleOut")):
                if section in self.doc:
                    self.problems.add(
                        "$.external.defaultRoute", f'"forwarded" cannot be combined with {what} (their own tables)'
                    )
        eips = self._eips()
        self.eips.update((e.name, e) for e in eips)
        # Before the rules: a SNAT pool's EIPs must be in one of its groups.
        scale_out = self._scale_out(external)
        context = RuleContext(
            self.eips, internal, frozenset(self.set_aside_eips), self.any_eip_set_aside, scale_out=scale_out
        )
        index, rules = self._rules(context)
        policies, gateway_policy = qos_policies(self.doc, eips, external, self.problems)
        ha = self._ha(internal, external)
        bgp = self._bgp(internal, eips)
        if scale_out is not None:
            self._one_group_per_backend(scale_out, rules["dnat"])  # type: ignore[arg-type]
        if self.problems:
            raise InvalidStateError(sorted(self.problems.found, key=lambda p: p.path))
        state = DesiredState(
            internal,
            external,
            eips,
            rules["snat"],  # type: ignore[arg-type]
            rules["dnat"],  # type: ignore[arg-type]
            rules["fip"],  # type: ignore[arg-type]
            qos_policies=policies,
            qos_policy=gateway_policy,
            ha=ha,
            more_externals=more,
            bgp=bgp,
            scale_out=scale_out,
            timeouts=parse_timeouts(self.doc.get("timeouts")),
        )
        return Validated(self.doc, state, index)

    def _rules(self, context: RuleContext) -> tuple[RuleIndex, dict[RuleKind, tuple[Rule, ...]]]:
        """Every rule folded into empty indexes, in document order, section by section
        (FIPs after DNAT rules: a FIP needs its EIP alone)."""
        index = RuleIndex()
        accepted: dict[RuleKind, tuple[Rule, ...]] = {}
        for kind in RULE_KINDS:
            rules = []
            for i, item in self.items(kind):
                # A rule with a taken name or address is still checked (every problem is
                # listed); the state is refused anyway.
                index.claim_name(kind, item["name"], i, self.problems)
                if kind == "fip":
                    index.claim_fip_address(item, i, self.problems)
                rule = RULE_CHECKS[kind](item, i, context, self.problems)
                if rule is not None and index.add(rule, i, self.problems):
                    rules.append(rule)
            accepted[kind] = tuple(rules)
        port_block_conflicts(index, self.problems)
        return index, accepted

    def _ha(self, internal: InternalSide, external: ExternalSide) -> HaConfig | None:
        if "ha" not in self.doc:
            return None
        ha = parse_ha(self.doc["ha"], (internal.interface, external.interface), self.problems)
        ipv6 = [str(a) for a in (*internal.addresses, *external.addresses) if a.version == 6]
        ipv6 += [str(e.v6ip) for e in self.eips.values() if e.v6ip is not None]
        if ipv6 or self.networks[1:]:
            # keepalived's instance moves the IPv4 addresses of one external network.
            what = f"IPv6 addresses ({', '.join(ipv6[:3])})" if ipv6 else "several external networks"
            self.problems.add("$.ha", f"an HA pair moves IPv4 addresses on one external network; this state has {what}")
        return ha

    def _bgp(self, internal: InternalSide, eips: tuple[Eip, ...]) -> BgpConfig | None:
        if "bgp" not in self.doc:
            return None
        own = [a.ip for n in self.networks for a in n.addresses] + [a.ip for a in internal.addresses]
        own += [a for e in eips for a in e.addresses]
        return parse_bgp(self.doc["bgp"], self.networks, own, self.problems, paired="ha" in self.doc)

    def _scale_out(self, external: ExternalSide) -> ScaleOutConfig | None:
        if "scaleOut" not in self.doc:
            return None
        if "ha" in self.doc:
            self.problems.add("$.scaleOut", "cannot be combined with ha (an active/standby pair)")
        config = parse_scale_out(self.doc["scaleOut"], self.eips, [n.interface for n in self.networks], self.problems)
        ipv6 = [str(a) for a in external.addresses if a.version == 6]
        ipv6 += [str(e.v6ip) for e in self.eips.values() if e.v6ip is not None]
        if ipv6 or self.networks[1:]:
            what = f"IPv6 addresses ({', '.join(ipv6[:3])})" if ipv6 else "several external networks"
            self.problems.add(
                "$.scaleOut", f"scaling out moves IPv4 EIPs on one external network; this state has {what}"
            )
        return config

    def _one_group_per_backend(self, config: ScaleOutConfig, dnat: tuple[DnatRule, ...]) -> None:
        """A backend's replies are handed to its EIP's group by (address, protocol, port)
        alone: behind EIPs of two groups, half its connections would be answered by a
        member that holds no state for them."""
        positions = {item.get("name"): i for i, item in self.items("dnat")}
        first: dict[tuple[IPAddress, str, int], DnatRule] = {}
        for rule in dnat:
            group = config.group_of(rule.eip).index
            for port in rule.backend_ports():
                other = first.setdefault((rule.internal_ip, rule.protocol, port), rule)
                other_group = config.group_of(other.eip).index
                if other_group != group:
                    self.problems.add(
                        f"$.dnat[{positions[rule.name]}].eip",
                        f"backend {rule.internal_ip} {rule.protocol}/{port} is also behind {other.name!r}, whose "
                        f"EIP {other.eip!r} is in scaleOut group {other_group}, not {group}: its replies cannot "
                        "go to both owners; put both EIPs in one group (scaleOut.groups)",
                    )
                    break

    # addresses -------------------------------------------------------------------------

    def address(self, path: str | tuple[str | int, ...], text: str) -> IPAddress | None:
        return self.problems.parsed(path, usable_address, text)

    def interface_address(self, path: str, text: str) -> IPInterface | None:
        try:
            interface: IPInterface = IPv6Interface(text) if ":" in text else IPv4Interface(text)
        except (AddressValueError, NetmaskValueError) as err:
            self.problems.add(path, f"not a valid {family_name(text)} address/prefix: {err}")
            return None
        if self.address(path, str(interface.ip)) is None:
            return None
        # IPv6 has no broadcast address, and its subnet-router anycast address is a host's.
        if (
            interface.version == 4
            and interface.network.prefixlen < 31
            and interface.ip
            in (
                interface.network.network_address,
                interface.network.broadcast_address,
            )
        ):
            self.problems.add(path, f"{interface.ip} is the network or broadcast address of {interface.network}")
            return None
        return interface

    def network(self, path: str, text: str) -> IPNetwork | None:
        return self.problems.parsed(path, parse_network, text)

    def duplicates(self, section: str, items: list[tuple[int, dict[str, Any]]], field: str) -> None:
        seen: dict[Any, int] = {}
        for index, item in items:
            if field not in item:
                continue
            key = item[field]
            if key in seen:
                self.problems.item(section, index, field, f"duplicates {section}[{seen[key]}] ({key!r})")
            else:
                seen[key] = index

    # sections --------------------------------------------------------------------------

    def _internal(self, externals: tuple[ExternalSide, ...]) -> InternalSide:
        section = self.doc["internal"]
        addresses = tuple(
            a
            for i, text in enumerate(section["addresses"])
            if (a := self.interface_address(f"$.internal.addresses[{i}]", text)) is not None
        )
        routes: list[Route] = []
        seen: dict[IPNetwork, int] = {}
        for i, route in enumerate(section.get("routes", ())):
            path = f"$.internal.routes[{i}]"
            dst = self.network(f"{path}.dst", route["dst"])
            via = self.address(f"{path}.via", route["via"])
            if dst is None or via is None:
                continue
            if dst in seen:
                self.problems.add(f"{path}.dst", f"duplicates internal.routes[{seen[dst]}] ({dst})")
                continue
            seen[dst] = i
            if not any(via in a.network for a in addresses):
                self.problems.add(f"{path}.via", f"nexthop {via} is not in the subnet of any internal address")
                continue
            # A wider route is harmless (the connected route is more specific); an equal one
            # would replace it and a narrower one would take part of the external subnet.
            clash = next(
                (
                    a.network
                    for external in externals
                    for a in external.addresses
                    if a.version == dst.version and dst.subnet_of(a.network)  # type: ignore[arg-type]
                ),
                None,
            )
            if clash is not None:
                self.problems.add(f"{path}.dst", f"{dst} lies inside the external subnet {clash}")
                continue
            routes.append(Route(dst, via))
        return InternalSide(section["interface"], addresses, tuple(routes), section.get("masquerade", False))

    def _external(self, path: str, section: dict[str, Any]) -> ExternalSide:
        addresses = tuple(
            a
            for i, text in enumerate(section["addresses"])
            if (a := self.interface_address(f"{path}.addresses[{i}]", text)) is not None
        )
        gateway = None
        if "gateway" in section:
            gateway = self.address(f"{path}.gateway", section["gateway"])
        gateway6 = None
        if "gateway6" in section:
            gateway6 = self._gateway6(f"{path}.gateway6", section["gateway6"])
        assert gateway is None or isinstance(gateway, IPv4Address)
        name = section.get("name", PRIMARY_NETWORK)
        return ExternalSide(
            section["interface"], addresses, gateway, gateway6, name, section.get("defaultRoute", "main")
        )

    def _more_externals(self) -> tuple[ExternalSide, ...]:
        """`externals`: more external networks, each with a name and an interface of its own."""
        networks = [self._external(f"$.externals[{i}]", item) for i, item in enumerate(self.doc.get("externals", []))]
        names = {self.doc["external"].get("name", PRIMARY_NETWORK): "external"}
        interfaces = {self.doc["external"]["interface"]: "external", self.doc["internal"]["interface"]: "internal"}
        for i, network in enumerate(networks):
            path = f"$.externals[{i}]"
            if network.name in names:
                self.problems.add(f"{path}.name", f"{network.name!r} is already the name of {names[network.name]}")
            if network.interface in interfaces:
                self.problems.add(
                    f"{path}.interface", f"{network.interface} is already {interfaces[network.interface]}'s"
                )
            names.setdefault(network.name, f"externals[{i}]")
            interfaces.setdefault(network.interface, f"externals[{i}]")
        return tuple(networks)

    def _eip_network(self, index: int, item: dict[str, Any], addresses: tuple[IPAddress, ...]) -> str | None:
        """The network an EIP lives on: the one it names, else the first whose subnet
        contains one of its addresses, else `external`."""
        if "externalSubnet" in item:
            if not any(n.name == item["externalSubnet"] for n in self.networks):
                known = ", ".join(repr(n.name) for n in self.networks)
                self.problems.add(("eips", index, "externalSubnet"), f"names no external network (known: {known})")
                return None
            return str(item["externalSubnet"])
        return next((n.name for n in self.networks if any(n.contains(a) for a in addresses)), self.networks[0].name)

    def _gateway6(self, path: str, text: str) -> IPv6Address | None:
        # A router's link-local address is the usual IPv6 nexthop; the route names the interface.
        try:
            if IPv6Address(text).is_link_local:
                return IPv6Address(text)
        except AddressValueError:
            pass
        address = self.address(path, text)
        assert address is None or isinstance(address, IPv6Address)
        return address

    def _eips(self) -> tuple[Eip, ...]:
        items = self.items("eips")
        self.duplicates("eips", items, "name")
        # Parsed, not as text: FD00:115:0::200 is fd00:115::200, and two EIPs on one address
        # would put their rules under one map key.
        holders: dict[IPAddress, int] = {}
        eips = []
        for i, item in items:
            if "v4ip" not in item and "v6ip" not in item:
                self.problems.add(("eips", i, "v4ip"), "required field is missing (an EIP needs v4ip, v6ip or both)")
                # Still an EIP by name: its rules are not reported again for naming no EIP.
                self.eips[item["name"]] = Eip(item["name"], None)
                continue
            v4 = self.address(("eips", i, "v4ip"), item["v4ip"]) if "v4ip" in item else None
            v6 = self.address(("eips", i, "v6ip"), item["v6ip"]) if "v6ip" in item else None
            for field, address in (("v4ip", v4), ("v6ip", v6)):
                if address is not None and holders.setdefault(address, i) != i:
                    spelled = "" if item[field] == str(address) else f", that is {address}"
                    self.problems.item(
                        "eips", i, field, f"duplicates eips[{holders[address]}] ({item[field]!r}{spelled})"
                    )
            if ("v4ip" in item and v4 is None) or ("v6ip" in item and v6 is None):
                continue
            assert (v4 is None or isinstance(v4, IPv4Address)) and (v6 is None or isinstance(v6, IPv6Address))
            network = self._eip_network(i, item, tuple(a for a in (v4, v6) if a is not None))
            if network is not None:
                eips.append(
                    Eip(
                        item["name"],
                        v4,
                        v6,
                        network,
                        item.get("qosPolicy"),
                        item.get("bgp", False),
                        item.get("draining", False),
                    )
                )
        return tuple(eips)
