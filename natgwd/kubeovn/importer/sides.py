"""The gateway's two sides: interfaces, addresses, gateways and VPC routes (IPv4 and, where
the input gives it, IPv6), from its Subnets and its pod's (or workload's) annotations."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    NetmaskValueError,
)
from typing import Any

from natgwd.kubeovn.importer.annotations import (
    ANNOTATION_INFIX,
    NAT_GW_ANNOTATION,
    NETWORK_STATUS,
    Attachment,
    parse_network_status,
    parse_routes,
    provider_annotations,
)
from natgwd.kubeovn.importer.objects import (
    ImportFailedError,
    ImportOptions,
    Inventory,
    Obj,
    annotations_of,
    is_deleting,
    is_v6,
    label_of,
    metadata_of,
    name_of,
    section_of,
    text_of,
    v4_address,
    v4_network,
    v4_part,
    v6_address,
    v6_network,
    v6_part,
)
from natgwd.planning.links import DEFAULT_ROUTE

# A side's interface when the pod's network-status does not name it: those of a gateway
# where Kube-OVN is not the primary CNI, whose controller calls `init net1,net2` (VPC side
# net1, external net2). With Kube-OVN as the primary CNI the sides are eth0 and net1
# (natgwd.kubeovn.shim.init), and network-status names them.
NON_PRIMARY_CNI_INTERNAL_INTERFACE = "net1"
NON_PRIMARY_CNI_EXTERNAL_INTERFACE = "net2"
DEFAULT_EXTERNAL_SUBNET = "ovn-vpc-external-network"


@dataclass
class Side:
    provider: str | None
    attributes: dict[str, str]


@dataclass(frozen=True)
class Surroundings:
    """The gateway and what describes its two sides: its Subnets (None when not in the
    input) and the CNI's view from its pod or workload."""

    gw: Obj
    internal_subnet_name: str
    internal_subnet: Obj | None
    external_subnet_name: str
    external_subnet: Obj | None
    workload: Obj | None
    providers: dict[str, dict[str, str]]
    attachments: list[Attachment]

    @property
    def name(self) -> str:
        return name_of(self.gw)

    @property
    def spec(self) -> dict[str, Any]:
        return section_of(self.gw, "spec")

    @property
    def internal_spec(self) -> dict[str, Any]:
        return section_of(self.internal_subnet or {}, "spec")

    @property
    def external_spec(self) -> dict[str, Any]:
        return section_of(self.external_subnet or {}, "spec")


@dataclass(frozen=True)
class Internal:
    """The VPC side in IPv4: the gateway's address in its subnet, and the subnet's gateway."""

    side: Side
    cidr: IPv4Network
    address: IPv4Address
    gateway: IPv4Address | None


@dataclass(frozen=True)
class External:
    """The external subnet in IPv4, as far as the input gives it."""

    side: Side
    cidr: IPv4Network | None
    gateway: IPv4Address | None


class Sides:
    """Reads the gateway's sides; what it cannot carry over is reported to the inventory."""

    def __init__(self, inventory: Inventory, options: ImportOptions) -> None:
        self.inventory = inventory
        self.options = options
        self.report = inventory.report

    def state(self, gw: Obj) -> tuple[Surroundings, Obj]:
        """The state without its EIPs and rules, and the surroundings it was read from."""
        around = self.surroundings(gw)
        internal = self.internal_side(around)
        external = self.external_side(around)
        return around, self.interfaces(around, internal, external)

    def subnet(self, name: str) -> Obj | None:
        for subnet in self.inventory.of_kind("Subnet"):
            if name_of(subnet) == name:
                return subnet
        return None

    def workload(self, gw_name: str) -> tuple[Obj | None, dict[str, str], list[Obj]]:
        """The gateway's pod (preferred: it carries what the CNI did) or workload; its
        annotations; and every candidate looked at."""

        def belongs(annotations: dict[str, str], labels: Any) -> bool:
            marked = any(
                key.endswith(ANNOTATION_INFIX + NAT_GW_ANNOTATION) and value == gw_name
                for key, value in annotations.items()
            )
            labelled = isinstance(labels, dict) and labels.get("app") == f"vpc-nat-gw-{gw_name}"
            return marked or labelled

        pods = [p for p in self.inventory.of_kind("Pod") if belongs(annotations_of(p), metadata_of(p).get("labels"))]
        pods.sort(key=lambda p: (section_of(p, "status").get("phase") != "Running", is_deleting(p), name_of(p)))
        workloads = []
        for kind in ("StatefulSet", "Deployment"):
            for workload in self.inventory.of_kind(kind):
                template = metadata_of(section_of(workload, "spec").get("template") or {})
                raw = template.get("annotations")
                annotations = {str(k): text_of(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
                if belongs(annotations, template.get("labels")) or name_of(workload) == f"vpc-nat-gw-{gw_name}":
                    workloads.append((workload, annotations))
        workloads.sort(key=lambda w: name_of(w[0]))
        if pods:
            return pods[0], annotations_of(pods[0]), pods + [w for w, _ in workloads]
        if workloads:
            return workloads[0][0], workloads[0][1], [w for w, _ in workloads]
        return None, {}, []

    def match_side(
        self,
        providers: dict[str, dict[str, str]],
        subnet_name: str,
        subnet_provider: str,
        cidr: IPv4Network | None,
        address: IPv4Address | None,
        gateway: IPv4Address | None,
        source: Obj | None,
    ) -> Side:
        """The provider whose annotations describe one side of the gateway."""
        if subnet_provider and subnet_provider in providers:
            return Side(subnet_provider, providers[subnet_provider])
        scored: list[tuple[int, bool, bool, str, str]] = []
        for provider, attributes in providers.items():
            score, how = 0, list[str]()
            if attributes.get("logical_switch") == subnet_name:
                score, how = score + 8, [*how, f"logical switch {subnet_name}"]
            own_cidr = v4_network(v4_part(attributes.get("cidr", "")))
            if cidr is not None and own_cidr == cidr:
                score, how = score + 4, [*how, f"cidr {cidr}"]
            own = v4_address(v4_part(attributes.get("ip_address", "")))
            if own is not None and (own == address or (address is None and cidr is not None and own in cidr)):
                score, how = score + 2, [*how, f"address {own}"]
            routes = parse_routes(attributes.get("routes", "")) or []
            if gateway is not None and any(
                v4_network(r.dst) == DEFAULT_ROUTE and v4_address(r.gw) == gateway for r in routes
            ):
                score, how = score + 1, [*how, f"default route via {gateway}"]
            if score:
                scored.append((score, "routes" in attributes, provider != "ovn", provider, " and ".join(how)))
        if not scored:
            return Side(None, {})
        scored.sort(reverse=True)
        _, _, _, provider, matched = scored[0]
        if source is not None:
            wanted = (
                f"Subnet {subnet_name}'s provider {subnet_provider}" if subnet_provider else f"Subnet {subnet_name}"
            )
            self.report(
                "note",
                source,
                f"no annotations for {wanted}; used those of provider {provider}, which match its {matched}",
            )
        return Side(provider, providers[provider])

    def surroundings(self, gw: Obj) -> Surroundings:
        spec = section_of(gw, "spec")
        internal_name = text_of(spec.get("subnet"))
        external_names = [text_of(s) for s in spec.get("externalSubnets") or []] or [DEFAULT_EXTERNAL_SUBNET]
        if len(external_names) > 1:
            self.report(
                "warning", gw, f"only externalSubnets[0] ({external_names[0]}) is used, as Kube-OVN does (#7134)"
            )
        internal_subnet, external_subnet = self.subnet(internal_name), self.subnet(external_names[0])
        self.inventory.use(internal_subnet, external_subnet)
        workload, annotations = self.chosen_workload(name_of(gw))
        return Surroundings(
            gw,
            internal_name,
            internal_subnet,
            external_names[0],
            external_subnet,
            workload,
            provider_annotations(annotations),
            self.attachments(annotations, workload or gw),
        )

    def chosen_workload(self, gw_name: str) -> tuple[Obj | None, dict[str, str]]:
        """The gateway's pod or workload and its annotations; the other candidates are noted."""
        workload, annotations, candidates = self.workload(gw_name)
        for candidate in candidates:
            if candidate is not workload:
                self.report("note", candidate, f"{label_of(workload or {})} was used instead")
        if workload is not None:
            self.inventory.use(workload)
        else:
            self.report(
                "note",
                ("VpcNatGateway", gw_name),
                "no gateway pod or StatefulSet in the input: routes come from the VPC's Subnets and "
                "spec.routes, the external address from --external-address",
            )
        return workload, annotations

    def attachments(self, annotations: dict[str, str], holder: Obj) -> list[Attachment]:
        if NETWORK_STATUS not in annotations:
            return []
        attachments = parse_network_status(annotations[NETWORK_STATUS])
        if attachments is None:
            self.report("warning", holder, f"unparsable {NETWORK_STATUS} annotation; ignored")
            return []
        return attachments

    def internal_side(self, around: Surroundings) -> Internal:
        """The VPC side: its CIDR from the Subnet, else the pod; the gateway's address from
        spec.lanIp, else the pod. Without either there is no state to write."""
        subnet_spec = around.internal_spec
        cidr = v4_network(v4_part(text_of(subnet_spec.get("cidrBlock"))), strict=False)
        address = v4_address(text_of(around.spec.get("lanIp")))
        side = self.match_side(
            around.providers,
            around.internal_subnet_name,
            text_of(subnet_spec.get("provider")),
            cidr,
            address,
            None,
            around.workload,
        )
        if cidr is None:
            cidr = v4_network(v4_part(side.attributes.get("cidr", "")), strict=False)
            if cidr is None:
                raise ImportFailedError(
                    f"the internal subnet's CIDR is unknown: give the Subnet {around.internal_subnet_name!r} "
                    "(or a gateway pod with its cidr annotation)"
                )
            self.report(
                "note", ("Subnet", around.internal_subnet_name), f"not in the input; its CIDR {cidr} from the pod"
            )
        if address is None:
            address = v4_address(v4_part(side.attributes.get("ip_address", "")))
            if address is None:
                raise ImportFailedError(
                    f"VpcNatGateway {around.name} has no spec.lanIp and no pod says its VPC address"
                )
        if address not in cidr:
            self.report("warning", around.gw, f"lanIp {address} is outside its subnet {cidr}")
        gateway = v4_address(v4_part(text_of(subnet_spec.get("gateway")))) or v4_address(
            v4_part(side.attributes.get("gateway", ""))
        )
        return Internal(side, cidr, address, gateway)

    def external_side(self, around: Surroundings) -> External:
        """The external subnet's CIDR and gateway, from its Subnet, else the pod."""
        subnet_spec = around.external_spec
        cidr = v4_network(v4_part(text_of(subnet_spec.get("cidrBlock"))), strict=False)
        gateway = v4_address(v4_part(text_of(subnet_spec.get("gateway"))))
        side = self.match_side(
            around.providers,
            around.external_subnet_name,
            text_of(subnet_spec.get("provider")),
            cidr,
            None,
            gateway,
            around.workload,
        )
        if cidr is None:
            cidr = v4_network(v4_part(side.attributes.get("cidr", "")), strict=False)
        if gateway is None:
            gateway = v4_address(v4_part(side.attributes.get("gateway", "")))
        if around.external_subnet is None:
            self.report(
                "warning",
                ("Subnet", around.external_subnet_name),
                "the gateway's external subnet is not in the input; "
                + (f"its CIDR {cidr} from the pod" if cidr else "its CIDR is unknown"),
            )
        return External(side, cidr, gateway)

    def interfaces(self, around: Surroundings, internal: Internal, external: External) -> Obj:
        """The state without its EIPs and rules: both interfaces, their addresses, the VPC
        routes and the gateways, IPv6 included where the input gives it."""
        internal_if = self.interface(
            "internal",
            self.options.internal_interface,
            around.attachments,
            lambda ips: internal.address in ips,
            around.workload,
        )
        external_if = self.interface(
            "external",
            self.options.external_interface,
            around.attachments,
            lambda ips: external.cidr is not None and any(ip in external.cidr for ip in ips),
            around.workload,
        )
        gateway = self.external_gateway(around, external.gateway, external_if)
        address = self.external_address(external.side, around.attachments, external_if, external.cidr, around.workload)
        internal6, external6, gateway6 = self.ipv6_sides(
            around.spec,
            around.internal_spec,
            internal.side,
            around.external_spec,
            external.side,
            around.attachments,
            external_if,
        )
        routes = self.internal_routes(
            around.gw,
            around.spec,
            around.workload,
            internal.side,
            internal.cidr,
            internal.gateway,
            external.cidr,
            v6_network(internal6) if internal6 else None,
        )
        state: dict[str, Any] = {
            "version": 1,
            "internal": {"interface": internal_if, "addresses": [f"{internal.address}/{internal.cidr.prefixlen}"]},
            "external": {"interface": external_if, "addresses": [str(address)] if address else []},
        }
        if routes:
            state["internal"]["routes"] = routes
        if gateway is not None:
            state["external"]["gateway"] = str(gateway)
        if internal6 is not None:
            state["internal"]["addresses"].append(internal6)
        if external6 is not None:
            state["external"]["addresses"].append(external6)
        if gateway6 is not None:
            state["external"]["gateway6"] = gateway6
        return state

    def external_gateway(self, around: Surroundings, gateway: IPv4Address | None, interface: str) -> IPv4Address | None:
        """The external subnet's gateway, else the one the CNI gave the external interface."""
        if gateway is None:
            for attachment in around.attachments:
                if attachment.interface == interface:
                    gateway = next(filter(None, map(v4_address, attachment.gateways)), None)
        if gateway is None:
            self.report("warning", around.gw, "the external gateway is unknown: no default route in the state")
        return gateway

    def interface(
        self,
        side: str,
        option: str | None,
        attachments: list[Attachment],
        mine: Any,
        source: Obj | None,
    ) -> str:
        found = None
        for attachment in attachments:
            ips = [a for a in map(v4_address, attachment.ips) if a is not None]
            if attachment.interface and mine(ips):
                found = attachment.interface
                break
        default = NON_PRIMARY_CNI_INTERNAL_INTERFACE if side == "internal" else NON_PRIMARY_CNI_EXTERNAL_INTERFACE
        if option:
            if found and found != option and source is not None:
                self.report("warning", source, f"network-status puts the {side} side on {found}; using {option}")
            return option
        return found or default

    def external_address(
        self,
        external: Side,
        attachments: list[Attachment],
        interface: str,
        cidr: IPv4Network | None,
        source: Obj | None,
    ) -> IPv4Interface | None:
        found: IPv4Address | None = None
        for attachment in attachments:
            if attachment.interface == interface:
                found = next((a for a in map(v4_address, attachment.ips) if a and (cidr is None or a in cidr)), None)
        if found is None:
            found = v4_address(v4_part(external.attributes.get("ip_address", "")))
        option, the_option = self.options.external_address, ("option", "--external-address")
        if found is not None:
            if option and v4_address(option) != found and source is not None:
                self.report("warning", source, f"the pod's external address is {found}; --external-address ignored")
            return IPv4Interface(f"{found}/{cidr.prefixlen if cidr else 32}")
        if option:
            try:
                given = IPv4Interface(option if "/" in option or cidr is None else f"{option}/{cidr.prefixlen}")
            except (AddressValueError, NetmaskValueError, ValueError):
                raise ImportFailedError(f"--external-address {option!r} is not an IPv4 address[/prefix]") from None
            if cidr is not None and given.network != cidr:
                self.report("warning", the_option, f"{given} is not in the external subnet {cidr}")
            return given
        self.report(
            "warning",
            the_option,
            "the external address is unknown (no pod network-status or ip_address annotation): "
            "EIPs get /32; pass --external-address",
        )
        return None

    def internal_routes(
        self,
        gw: Obj,
        spec: dict[str, Any],
        workload: Obj | None,
        internal: Side,
        internal_cidr: IPv4Network,
        internal_gateway: IPv4Address | None,
        external_cidr: IPv4Network | None,
        internal_cidr6: IPv6Network | None = None,
    ) -> list[dict[str, str]]:
        candidates: list[tuple[Obj | tuple[str, str], str, str]] = []
        if workload is not None and internal.provider is not None:
            value = internal.attributes.get("routes")
            if value is not None:
                parsed = parse_routes(value)
                if parsed is None:
                    self.report("warning", workload, f"unparsable {internal.provider}.kubernetes.io/routes; ignored")
                for route in parsed or []:
                    candidates.append((workload, route.dst, route.gw))
        elif workload is None:
            # What the controller puts in the routes annotation: the VPC's other subnets.
            vpc = text_of(spec.get("vpc"))
            own_subnets = {text_of(spec.get("subnet")), *(text_of(s) for s in spec.get("externalSubnets") or [])}
            for subnet in sorted(self.inventory.of_kind("Subnet"), key=name_of):
                sub_spec = section_of(subnet, "spec")
                if vpc and text_of(sub_spec.get("vpc")) == vpc and name_of(subnet) not in own_subnets:
                    cidr = v4_part(text_of(sub_spec.get("cidrBlock")))
                    if cidr and internal_gateway is not None:
                        self.inventory.use(subnet)
                        candidates.append((subnet, cidr, str(internal_gateway)))
        for index, route in enumerate(spec.get("routes") or []):
            if not isinstance(route, dict):
                continue
            via = text_of(route.get("nextHopIP"))
            if via == "gateway":
                if internal_gateway is None:
                    self.report("warning", gw, f"spec.routes[{index}]: the VPC subnet's gateway is unknown; skipped")
                    continue
                via = str(internal_gateway)
            candidates.append((gw, text_of(route.get("cidr")), via))

        routes: dict[IPv4Network | IPv6Network, IPv4Address | IPv6Address] = {}
        for source, dst_text, via_text in candidates:
            where = f"route {dst_text} via {via_text}"
            if is_v6(dst_text) or ":" in via_text:
                route6 = self.internal_route6(source, where, dst_text, via_text, internal_cidr6)
                if route6 is not None and route6[0] not in routes:
                    routes[route6[0]] = route6[1]
                continue
            dst, nexthop = v4_network(dst_text, strict=False), v4_address(via_text)
            if dst is None or nexthop is None:
                self.report("warning", source, f"{where}: not an IPv4 CIDR and nexthop; skipped")
                continue
            if dst == DEFAULT_ROUTE:
                self.report("warning", source, f"{where}: a default route on the VPC side; skipped")
            elif external_cidr is not None and dst.subnet_of(external_cidr):
                self.report(
                    "warning",
                    source,
                    f"{where}: inside the external subnet {external_cidr}, which the external interface "
                    "reaches directly; skipped (the kernel keeps the connected route there)",
                )
            elif dst.subnet_of(internal_cidr):
                self.report("note", source, f"{where}: inside the connected subnet {internal_cidr}; skipped")
            elif nexthop not in internal_cidr:
                self.report("warning", source, f"{where}: nexthop outside the VPC subnet {internal_cidr}; skipped")
            elif dst in routes and routes[dst] != nexthop:
                self.report("warning", source, f"{where}: {dst} already goes via {routes[dst]}; skipped")
            else:
                routes.setdefault(dst, nexthop)
        return [{"dst": str(network), "via": str(address)} for network, address in routes.items()]

    def internal_route6(
        self, source: Obj | tuple[str, str], where: str, dst_text: str, via_text: str, cidr6: IPv6Network | None
    ) -> tuple[IPv6Network, IPv6Address] | None:
        if cidr6 is None:
            self.report("note", source, f"{where}: IPv6, and the gateway has no IPv6 VPC address; skipped")
            return None
        dst, nexthop = v6_network(dst_text), v6_address(via_text)
        if dst is None or nexthop is None:
            self.report("warning", source, f"{where}: not an IPv6 CIDR and nexthop; skipped")
        elif dst.prefixlen == 0:
            self.report("warning", source, f"{where}: a default route on the VPC side; skipped")
        elif dst.subnet_of(cidr6):
            self.report("note", source, f"{where}: inside the connected subnet {cidr6}; skipped")
        elif nexthop not in cidr6:
            self.report("warning", source, f"{where}: nexthop outside the VPC subnet {cidr6}; skipped")
        else:
            return dst, nexthop
        return None

    def ipv6_sides(
        self,
        spec: dict[str, Any],
        internal_spec: dict[str, Any],
        internal: Side,
        external_spec: dict[str, Any],
        external: Side,
        attachments: list[Attachment],
        external_if: str,
    ) -> tuple[str | None, str | None, str | None]:
        """The IPv6 VPC address, external address (with prefixes) and gateway of a
        dual-stack gateway, each None when the input does not say it."""
        cidr6 = v6_network(v6_part(text_of(internal_spec.get("cidrBlock")) or internal.attributes.get("cidr", "")))
        lan6 = v6_address(v6_part(text_of(spec.get("lanIp")))) or v6_address(
            v6_part(internal.attributes.get("ip_address", ""))
        )
        internal6 = f"{lan6}/{cidr6.prefixlen}" if lan6 is not None and cidr6 is not None and lan6 in cidr6 else None
        ext_cidr6 = v6_network(v6_part(text_of(external_spec.get("cidrBlock")) or external.attributes.get("cidr", "")))
        found = [
            address
            for attachment in attachments
            if attachment.interface == external_if
            for address in map(v6_address, attachment.ips)
            if address is not None and (ext_cidr6 is None or address in ext_cidr6)
        ]
        ext6 = found[0] if found else v6_address(v6_part(external.attributes.get("ip_address", "")))
        external6 = None if ext6 is None else f"{ext6}/{ext_cidr6.prefixlen if ext_cidr6 else 128}"
        gateway6 = v6_address(v6_part(text_of(external_spec.get("gateway")))) or v6_address(
            v6_part(external.attributes.get("gateway", ""))
        )
        return internal6, external6, None if gateway6 is None else str(gateway6)
