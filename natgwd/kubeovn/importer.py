"""`natgwd import`: the desired state of one Kube-OVN VPC NAT gateway, from its objects.

Reads what `kubectl get -o yaml` or `-o json` prints (a `List`, single objects, or a
multi-document YAML stream; several files or a directory of them) and writes a natgwd
desired-state file (version 1) for one gateway:

- VpcNatGateway `spec.subnet`, `spec.lanIp` and the internal Subnet's `cidrBlock` give the
  internal interface's address; the external Subnet (`spec.externalSubnets[0]`) gives the
  external gateway (`spec.gateway`) and the prefix of the external address.
- The gateway pod (or, without one, its StatefulSet's pod template) gives what the CNI
  configured: the `<provider>.kubernetes.io/routes` annotation of the internal provider
  (routes to the other VPC subnets and service CIDRs through the VPC router), the interface
  names and the external address from `k8s.v1.cni.cncf.io/network-status` or the external
  provider's `ip_address` annotation.
- IptablesEIP (`spec.natGwDp` = the gateway; `spec.v4ip`, else `status.ip`; `spec.v6ip`),
  then the IptablesSnatRule / IptablesDnatRule (`spec.type` exclusive or share) /
  IptablesFIPRule objects whose `spec.eip` is one of those EIPs, of either family.
- Dual-stack Subnets ("10.0.0.0/24,fd00::/64") and annotations give the IPv6 side too: the
  gateway's IPv6 VPC and external addresses, `gateway6` and IPv6 VPC routes.

Nothing is dropped silently: every object or value that does not make it into the state
(another gateway's EIP, a rule naming an unknown EIP, QoS, a route that would shadow
the external subnet, a conflict Kube-OVN's webhook would have refused, ...) is reported as a
Finding, "warning" when NAT behaviour the input asked for is not carried over or was
changed, "note" for context objects that carry nothing natgwd needs. The result is
validated with natgwd.state.validation.load_state before it is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    NetmaskValueError,
    ip_address,
    ip_network,
)
from pathlib import Path
from typing import Any, Literal, TextIO

from natgwd.kubeovn.bgp_import import carry_bgp
from natgwd.kubeovn.qos_import import carry_qos
from natgwd.planning.links import DEFAULT_ROUTE
from natgwd.runtime.files import write_atomically
from natgwd.state.model import PortRange
from natgwd.state.ports import NOT_A_PORT, kube_ovn_port_range
from natgwd.state.validation import InvalidStateError, load_state

Obj = dict[str, Any]
Severity = Literal["warning", "note"]

DEFAULT_INTERNAL_INTERFACE = "net1"
DEFAULT_EXTERNAL_INTERFACE = "net2"
DEFAULT_EXTERNAL_SUBNET = "ovn-vpc-external-network"
NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
ANNOTATION_INFIX = ".kubernetes.io/"
NAT_GW_ANNOTATION = "vpc_nat_gw"
NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# Kinds that describe the surroundings of the gateway: read for lookups, never state.
CONTEXT_KINDS = frozenset(
    {"Vpc", "Subnet", "NetworkAttachmentDefinition", "Pod", "StatefulSet", "Deployment", "QoSPolicy"}
)
UNSUPPORTED_KINDS = {
    "OvnEip": "OVN NAT (ovn-eip) is done by OVN itself, not by the iptables VPC NAT gateway",
    "OvnFip": "OVN NAT (ovn-fip) is done by OVN itself, not by the iptables VPC NAT gateway",
    "OvnSnatRule": "OVN NAT (ovn-snat) is done by OVN itself, not by the iptables VPC NAT gateway",
    "OvnDnatRule": "OVN NAT (ovn-dnat) is done by OVN itself, not by the iptables VPC NAT gateway",
    "VpcEgressGateway": "a VPC egress gateway is a different Kube-OVN feature",
}


@dataclass(frozen=True)
class Finding:
    """Something in the input that is not carried over as it was."""

    severity: Severity
    kind: str
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.kind}/{self.name}: {self.reason}"


class ImportFailedError(Exception):
    """The input cannot give a desired state at all (no gateway, no internal subnet, ...)."""


@dataclass(frozen=True)
class ImportOptions:
    gateway: str | None = None
    internal_interface: str | None = None
    external_interface: str | None = None
    external_address: str | None = None


@dataclass
class ImportResult:
    gateway: str
    state: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]


# --- reading objects ------------------------------------------------------------------


def _yaml_documents(text: str, source: str) -> list[Any]:
    """YAML documents; a key twice in one mapping is an error, not "the last one wins"
    (two `kubectl get -o yaml` outputs appended without `---` would lose the first)."""
    import yaml  # here, not at the top: `natgwd run` never needs it

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if isinstance(key, str | int | float | bool) and key in seen:
                line = key_node.start_mark.line + 1
                raise ImportFailedError(
                    f"{source}: key {key!r} twice in one mapping (line {line}); "
                    "are two kubectl outputs appended without a '---' line between them?"
                )
            if isinstance(key, str | int | float | bool):
                seen.add(key)
        return loader.construct_mapping(node)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return list(yaml.load_all(text, Loader=Loader))  # a SafeLoader
    except yaml.YAMLError as err:
        raise ImportFailedError(f"{source}: neither JSON nor YAML: {err}") from None


def parse_documents(text: str, source: str = "<input>") -> tuple[list[Obj], list[Finding]]:
    """The Kubernetes objects in one `kubectl get -o yaml|json` output, Lists expanded."""
    documents: list[Any]
    if text.lstrip().startswith(("{", "[")):
        try:
            documents = [json.loads(text)]
        except json.JSONDecodeError:
            documents = _yaml_documents(text, source)
    else:
        documents = _yaml_documents(text, source)
    objects: list[Obj] = []
    findings: list[Finding] = []
    for index, document in enumerate(documents):
        _flatten(document, f"{source}#{index}", objects, findings)
    return objects, findings


def _flatten(document: Any, where: str, objects: list[Obj], findings: list[Finding]) -> None:
    if document is None:
        return
    if isinstance(document, list):
        for item in document:
            _flatten(item, where, objects, findings)
        return
    if not isinstance(document, dict) or not isinstance(document.get("kind"), str):
        findings.append(Finding("warning", "document", where, "not a Kubernetes object (no kind); skipped"))
        return
    items = document.get("items")
    if document["kind"].endswith("List") and isinstance(items, list):
        _flatten(items, where, objects, findings)
        return
    objects.append(document)


def read_inputs(paths: Sequence[str], stdin: TextIO) -> tuple[list[Obj], list[Finding]]:
    """Objects from files, directories (their *.yaml, *.yml, *.json) and '-' (stdin)."""
    objects: list[Obj] = []
    findings: list[Finding] = []
    for path_text in paths or ["-"]:
        sources: list[tuple[str, str]]
        if path_text == "-":
            sources = [("<stdin>", stdin.read())]
        else:
            path = Path(path_text)
            files = (
                sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json")) if path.is_dir() else [path]
            )
            try:
                sources = [(str(p), p.read_text(encoding="utf-8")) for p in files]
            except (OSError, UnicodeDecodeError) as err:
                raise ImportFailedError(f"cannot read {path_text}: {err}") from None
        for source, text in sources:
            found, problems = parse_documents(text, source)
            objects.extend(found)
            findings.extend(problems)
    return objects, findings


# --- small accessors ------------------------------------------------------------------


def _meta(obj: Obj) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _name(obj: Obj) -> str:
    return str(_meta(obj).get("name") or "")


def _label(obj: Obj) -> str:
    namespace = _meta(obj).get("namespace")
    return f"{namespace}/{_name(obj)}" if namespace else _name(obj)


def _section(obj: Obj, key: str) -> dict[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _created(obj: Obj) -> tuple[str, str]:
    """Sort key: creation order (RFC 3339 timestamps sort as text), then name."""
    return (_text(_meta(obj).get("creationTimestamp")) or "~", _name(obj))


def _deleting(obj: Obj) -> bool:
    return bool(_meta(obj).get("deletionTimestamp"))


def _annotations(obj: Obj) -> dict[str, str]:
    raw = _meta(obj).get("annotations")
    return {str(k): _text(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def _v4_part(text: str) -> str:
    """The IPv4 member of a Kube-OVN dual-stack value such as "10.0.0.0/24,fd00::/64"."""
    for part in text.split(","):
        part = part.strip()
        if part and ":" not in part:
            return part
    return ""


def _v4_address(text: str) -> IPv4Address | None:
    try:
        return IPv4Address(text.split("/")[0].strip())
    except (AddressValueError, ValueError):
        return None


def _v4_network(text: str, strict: bool = True) -> IPv4Network | None:
    try:
        return IPv4Network(text.strip(), strict=strict)
    except (AddressValueError, NetmaskValueError, ValueError):
        return None


def _v6_part(text: str) -> str:
    """The IPv6 member of a Kube-OVN dual-stack value such as "10.0.0.0/24,fd00::/64"."""
    return next((part.strip() for part in text.split(",") if ":" in part), "")


def _v6_address(text: str) -> IPv6Address | None:
    try:
        return IPv6Address(text.split("/")[0].strip())
    except (AddressValueError, ValueError):
        return None


def _v6_network(text: str) -> IPv6Network | None:
    try:
        return IPv6Network(text.strip(), strict=False)
    except (AddressValueError, NetmaskValueError, ValueError):
        return None


def _is_v6(text: str) -> bool:
    try:
        return ip_network(text.strip(), strict=False).version == 6
    except ValueError:
        return False


def state_name(name: str) -> str:
    """A natgwd name (DNS-1123 label, at most 63) for a Kubernetes object name, which may
    be a DNS-1123 subdomain of up to 253 characters: kept when it already is a label."""
    if NAME_PATTERN.match(name) and len(name) <= 63:
        return name
    base = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:54].strip("-") or "x"
    return f"{base}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


# --- annotations of the gateway pod ---------------------------------------------------


def provider_annotations(annotations: dict[str, str]) -> dict[str, dict[str, str]]:
    """{provider: {attribute: value}} from keys "<provider>.kubernetes.io/<attribute>"
    (the default provider's keys "ovn.kubernetes.io/..." give provider "ovn")."""
    providers: dict[str, dict[str, str]] = defaultdict(dict)
    for key, value in annotations.items():
        provider, infix, attribute = key.partition(ANNOTATION_INFIX)
        if infix and provider and attribute and "/" not in provider:
            providers[provider][attribute] = value
    return dict(providers)


@dataclass(frozen=True)
class AnnotatedRoute:
    dst: str
    gw: str


def _json_objects(value: str) -> list[dict[str, Any]] | None:
    """The objects of an annotation holding a JSON list; None when it is not one."""
    try:
        loaded = json.loads(value)
    except json.JSONDecodeError:
        return None
    return [item for item in loaded if isinstance(item, dict)] if isinstance(loaded, list) else None


def parse_routes(value: str) -> list[AnnotatedRoute] | None:
    """The `routes` annotation ([{"dst": CIDR, "gw": IP}, ...]); None when unparsable."""
    loaded = _json_objects(value)
    if loaded is None:
        return None
    return [AnnotatedRoute(_text(item.get("dst")), _text(item.get("gw"))) for item in loaded]


@dataclass(frozen=True)
class Attachment:
    """One entry of the network-status annotation."""

    name: str
    interface: str
    ips: tuple[str, ...]
    gateways: tuple[str, ...]


def parse_network_status(value: str) -> list[Attachment] | None:
    loaded = _json_objects(value)
    if loaded is None:
        return None
    attachments = []
    for item in loaded:
        ips: list[Any] = item["ips"] if isinstance(item.get("ips"), list) else []
        gateways: list[Any] = item["gateway"] if isinstance(item.get("gateway"), list) else []
        attachments.append(
            Attachment(
                _text(item.get("name")),
                _text(item.get("interface")),
                tuple(_text(i) for i in ips),
                tuple(_text(g) for g in gateways),
            )
        )
    return attachments


# --- the import -----------------------------------------------------------------------


@dataclass
class _Rule:
    """A rule bound for the state, with the object it came from (for reports)."""

    section: str
    entry: dict[str, Any]
    source: Obj
    kind: str


@dataclass
class _Side:
    provider: str | None
    attributes: dict[str, str]


@dataclass(frozen=True)
class _Surroundings:
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
        return _name(self.gw)

    @property
    def spec(self) -> dict[str, Any]:
        return _section(self.gw, "spec")

    @property
    def internal_spec(self) -> dict[str, Any]:
        return _section(self.internal_subnet or {}, "spec")

    @property
    def external_spec(self) -> dict[str, Any]:
        return _section(self.external_subnet or {}, "spec")


@dataclass(frozen=True)
class _Internal:
    """The VPC side in IPv4: the gateway's address in its subnet, and the subnet's gateway."""

    side: _Side
    cidr: IPv4Network
    address: IPv4Address
    gateway: IPv4Address | None


@dataclass(frozen=True)
class _External:
    """The external subnet in IPv4, as far as the input gives it."""

    side: _Side
    cidr: IPv4Network | None
    gateway: IPv4Address | None


class _Importer:
    def __init__(self, objects: Sequence[Obj], options: ImportOptions) -> None:
        self.objects = list(objects)
        self.options = options
        self.findings: list[Finding] = []
        self.by_kind: dict[str, list[Obj]] = defaultdict(list)
        for obj in self.objects:
            self.by_kind[str(obj["kind"])].append(obj)

    def report(self, severity: Severity, obj: Obj | tuple[str, str], reason: str) -> None:
        kind, name = obj if isinstance(obj, tuple) else (str(obj["kind"]), _label(obj))
        self.findings.append(Finding(severity, kind, name, reason))

    # gateway and surroundings ---------------------------------------------------------

    def gateway(self) -> Obj:
        gateways = sorted(self.by_kind.get("VpcNatGateway", []), key=_name)
        wanted = self.options.gateway
        if not gateways:
            raise ImportFailedError(
                "the input holds no VpcNatGateway: give the gateway's object too "
                "(kubectl get vpc-nat-gateway NAME -o yaml), with its EIPs and rules"
            )
        if wanted is None:
            if len(gateways) != 1:
                names = ", ".join(_name(g) for g in gateways) or "none"
                raise ImportFailedError(f"choose the gateway with --gateway (VpcNatGateways in the input: {names})")
            wanted = _name(gateways[0])
        chosen = [g for g in gateways if _name(g) == wanted]
        if not chosen:
            raise ImportFailedError(f"VpcNatGateway {wanted!r} is not in the input")
        for other in gateways:
            if other is not chosen[0]:
                self.report("note", other, f"another gateway (importing {wanted})")
        return chosen[0]

    def subnet(self, name: str) -> Obj | None:
        for subnet in self.by_kind.get("Subnet", []):
            if _name(subnet) == name:
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

        pods = [p for p in self.by_kind.get("Pod", []) if belongs(_annotations(p), _meta(p).get("labels"))]
        pods.sort(key=lambda p: (_section(p, "status").get("phase") != "Running", _deleting(p), _name(p)))
        workloads = []
        for kind in ("StatefulSet", "Deployment"):
            for workload in self.by_kind.get(kind, []):
                template = _meta(_section(workload, "spec").get("template") or {})
                raw = template.get("annotations")
                annotations = {str(k): _text(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
                if belongs(annotations, template.get("labels")) or _name(workload) == f"vpc-nat-gw-{gw_name}":
                    workloads.append((workload, annotations))
        workloads.sort(key=lambda w: _name(w[0]))
        if pods:
            return pods[0], _annotations(pods[0]), pods + [w for w, _ in workloads]
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
    ) -> _Side:
        """The provider whose annotations describe one side of the gateway."""
        if subnet_provider and subnet_provider in providers:
            return _Side(subnet_provider, providers[subnet_provider])
        scored: list[tuple[int, bool, bool, str, str]] = []
        for provider, attributes in providers.items():
            score, how = 0, list[str]()
            if attributes.get("logical_switch") == subnet_name:
                score, how = score + 8, [*how, f"logical switch {subnet_name}"]
            own_cidr = _v4_network(_v4_part(attributes.get("cidr", "")))
            if cidr is not None and own_cidr == cidr:
                score, how = score + 4, [*how, f"cidr {cidr}"]
            own = _v4_address(_v4_part(attributes.get("ip_address", "")))
            if own is not None and (own == address or (address is None and cidr is not None and own in cidr)):
                score, how = score + 2, [*how, f"address {own}"]
            routes = parse_routes(attributes.get("routes", "")) or []
            if gateway is not None and any(
                _v4_network(r.dst) == DEFAULT_ROUTE and _v4_address(r.gw) == gateway for r in routes
            ):
                score, how = score + 1, [*how, f"default route via {gateway}"]
            if score:
                scored.append((score, "routes" in attributes, provider != "ovn", provider, " and ".join(how)))
        if not scored:
            return _Side(None, {})
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
        return _Side(provider, providers[provider])

    # the import -----------------------------------------------------------------------

    def run(self) -> ImportResult:
        gw = self.gateway()
        used: set[int] = {id(gw)}
        self.gateway_notes(gw)
        around = self.surroundings(gw, used)
        internal = self.internal_side(around)
        external = self.external_side(around)
        state = self.interfaces(around, internal, external, used)
        eips, eip_names = self.eips(around.name, around.external_subnet_name, used)
        state = self.validated(state, eips, self.rules(eip_names, used))
        eip_sources = {rule.entry["name"]: rule.source for rule in eips}
        used |= carry_qos(state, gw, eip_sources, self.by_kind.get("QoSPolicy", []), state_name, self.report)
        carry_bgp(state, gw, eip_sources, self.report)
        self.report_unused(used)
        return ImportResult(around.name, state, self.findings)

    def gateway_notes(self, gw: Obj) -> None:
        """What the gateway itself asks for beyond the state."""
        spec = _section(gw, "spec")
        if int(spec.get("replicas") or 1) > 1:
            self.report("note", gw, "HA gateway: give every replica the same desired state")

    def surroundings(self, gw: Obj, used: set[int]) -> _Surroundings:
        spec = _section(gw, "spec")
        internal_name = _text(spec.get("subnet"))
        external_names = [_text(s) for s in spec.get("externalSubnets") or []] or [DEFAULT_EXTERNAL_SUBNET]
        if len(external_names) > 1:
            self.report(
                "warning", gw, f"only externalSubnets[0] ({external_names[0]}) is used, as Kube-OVN does (#7134)"
            )
        internal_subnet, external_subnet = self.subnet(internal_name), self.subnet(external_names[0])
        used.update(id(s) for s in (internal_subnet, external_subnet) if s is not None)
        workload, annotations = self.chosen_workload(_name(gw), used)
        return _Surroundings(
            gw,
            internal_name,
            internal_subnet,
            external_names[0],
            external_subnet,
            workload,
            provider_annotations(annotations),
            self.attachments(annotations, workload or gw),
        )

    def chosen_workload(self, gw_name: str, used: set[int]) -> tuple[Obj | None, dict[str, str]]:
        """The gateway's pod or workload and its annotations; the other candidates are noted."""
        workload, annotations, candidates = self.workload(gw_name)
        for candidate in candidates:
            if candidate is not workload:
                self.report("note", candidate, f"{_label(workload or {})} was used instead")
        if workload is not None:
            used.add(id(workload))
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

    def internal_side(self, around: _Surroundings) -> _Internal:
        """The VPC side: its CIDR from the Subnet, else the pod; the gateway's address from
        spec.lanIp, else the pod. Without either there is no state to write."""
        subnet_spec = around.internal_spec
        cidr = _v4_network(_v4_part(_text(subnet_spec.get("cidrBlock"))), strict=False)
        address = _v4_address(_text(around.spec.get("lanIp")))
        side = self.match_side(
            around.providers,
            around.internal_subnet_name,
            _text(subnet_spec.get("provider")),
            cidr,
            address,
            None,
            around.workload,
        )
        if cidr is None:
            cidr = _v4_network(_v4_part(side.attributes.get("cidr", "")), strict=False)
            if cidr is None:
                raise ImportFailedError(
                    f"the internal subnet's CIDR is unknown: give the Subnet {around.internal_subnet_name!r} "
                    "(or a gateway pod with its cidr annotation)"
                )
            self.report(
                "note", ("Subnet", around.internal_subnet_name), f"not in the input; its CIDR {cidr} from the pod"
            )
        if address is None:
            address = _v4_address(_v4_part(side.attributes.get("ip_address", "")))
            if address is None:
                raise ImportFailedError(
                    f"VpcNatGateway {around.name} has no spec.lanIp and no pod says its VPC address"
                )
        if address not in cidr:
            self.report("warning", around.gw, f"lanIp {address} is outside its subnet {cidr}")
        gateway = _v4_address(_v4_part(_text(subnet_spec.get("gateway")))) or _v4_address(
            _v4_part(side.attributes.get("gateway", ""))
        )
        return _Internal(side, cidr, address, gateway)

    def external_side(self, around: _Surroundings) -> _External:
        """The external subnet's CIDR and gateway, from its Subnet, else the pod."""
        subnet_spec = around.external_spec
        cidr = _v4_network(_v4_part(_text(subnet_spec.get("cidrBlock"))), strict=False)
        gateway = _v4_address(_v4_part(_text(subnet_spec.get("gateway"))))
        side = self.match_side(
            around.providers,
            around.external_subnet_name,
            _text(subnet_spec.get("provider")),
            cidr,
            None,
            gateway,
            around.workload,
        )
        if cidr is None:
            cidr = _v4_network(_v4_part(side.attributes.get("cidr", "")), strict=False)
        if gateway is None:
            gateway = _v4_address(_v4_part(side.attributes.get("gateway", "")))
        if around.external_subnet is None:
            self.report(
                "warning",
                ("Subnet", around.external_subnet_name),
                "the gateway's external subnet is not in the input; "
                + (f"its CIDR {cidr} from the pod" if cidr else "its CIDR is unknown"),
            )
        return _External(side, cidr, gateway)

    def interfaces(self, around: _Surroundings, internal: _Internal, external: _External, used: set[int]) -> Obj:
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
            used,
            _v6_network(internal6) if internal6 else None,
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

    def external_gateway(
        self, around: _Surroundings, gateway: IPv4Address | None, interface: str
    ) -> IPv4Address | None:
        """The external subnet's gateway, else the one the CNI gave the external interface."""
        if gateway is None:
            for attachment in around.attachments:
                if attachment.interface == interface:
                    gateway = next(filter(None, map(_v4_address, attachment.gateways)), None)
        if gateway is None:
            self.report("warning", around.gw, "the external gateway is unknown: no default route in the state")
        return gateway

    def report_unused(self, used: set[int]) -> None:
        """Every object neither used nor reported yet gets a finding: nothing goes silently."""
        for obj in self.objects:
            if id(obj) not in used and not self.reported(obj):
                self.unused(obj)

    def reported(self, obj: Obj) -> bool:
        kind, name = str(obj["kind"]), _label(obj)
        return any(f.kind == kind and f.name == name for f in self.findings)

    def unused(self, obj: Obj) -> None:
        kind = str(obj["kind"])
        if kind in UNSUPPORTED_KINDS:
            self.report("warning", obj, UNSUPPORTED_KINDS[kind])
        elif kind in CONTEXT_KINDS:
            self.report("note", obj, "not needed for this gateway's state; ignored")
        else:
            self.report("warning", obj, f"kind {kind} is not something natgwd import knows; ignored")

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
            ips = [a for a in map(_v4_address, attachment.ips) if a is not None]
            if attachment.interface and mine(ips):
                found = attachment.interface
                break
        default = DEFAULT_INTERNAL_INTERFACE if side == "internal" else DEFAULT_EXTERNAL_INTERFACE
        if option:
            if found and found != option and source is not None:
                self.report("warning", source, f"network-status puts the {side} side on {found}; using {option}")
            return option
        return found or default

    def external_address(
        self,
        external: _Side,
        attachments: list[Attachment],
        interface: str,
        cidr: IPv4Network | None,
        source: Obj | None,
    ) -> IPv4Interface | None:
        found: IPv4Address | None = None
        for attachment in attachments:
            if attachment.interface == interface:
                found = next((a for a in map(_v4_address, attachment.ips) if a and (cidr is None or a in cidr)), None)
        if found is None:
            found = _v4_address(_v4_part(external.attributes.get("ip_address", "")))
        option = self.options.external_address
        if found is not None:
            if option and _v4_address(option) != found and source is not None:
                self.report("warning", source, f"the pod's external address is {found}; --external-address ignored")
            return IPv4Interface(f"{found}/{cidr.prefixlen if cidr else 32}")
        if option:
            try:
                given = IPv4Interface(option if "/" in option or cidr is None else f"{option}/{cidr.prefixlen}")
            except (AddressValueError, NetmaskValueError, ValueError):
                raise ImportFailedError(f"--external-address {option!r} is not an IPv4 address[/prefix]") from None
            if cidr is not None and given.network != cidr:
                self.findings.append(
                    Finding("warning", "option", "--external-address", f"{given} is not in the external subnet {cidr}")
                )
            return given
        self.findings.append(
            Finding(
                "warning",
                "option",
                "--external-address",
                "the external address is unknown (no pod network-status or ip_address annotation): "
                "EIPs get /32; pass --external-address",
            )
        )
        return None

    def internal_routes(
        self,
        gw: Obj,
        spec: dict[str, Any],
        workload: Obj | None,
        internal: _Side,
        internal_cidr: IPv4Network,
        internal_gateway: IPv4Address | None,
        external_cidr: IPv4Network | None,
        used: set[int],
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
            vpc = _text(spec.get("vpc"))
            own_subnets = {_text(spec.get("subnet")), *(_text(s) for s in spec.get("externalSubnets") or [])}
            for subnet in sorted(self.by_kind.get("Subnet", []), key=_name):
                sub_spec = _section(subnet, "spec")
                if vpc and _text(sub_spec.get("vpc")) == vpc and _name(subnet) not in own_subnets:
                    cidr = _v4_part(_text(sub_spec.get("cidrBlock")))
                    if cidr and internal_gateway is not None:
                        used.add(id(subnet))
                        candidates.append((subnet, cidr, str(internal_gateway)))
        for index, route in enumerate(spec.get("routes") or []):
            if not isinstance(route, dict):
                continue
            via = _text(route.get("nextHopIP"))
            if via == "gateway":
                if internal_gateway is None:
                    self.report("warning", gw, f"spec.routes[{index}]: the VPC subnet's gateway is unknown; skipped")
                    continue
                via = str(internal_gateway)
            candidates.append((gw, _text(route.get("cidr")), via))

        routes: dict[IPv4Network | IPv6Network, IPv4Address | IPv6Address] = {}
        for source, dst_text, via_text in candidates:
            where = f"route {dst_text} via {via_text}"
            if _is_v6(dst_text) or ":" in via_text:
                route6 = self.internal_route6(source, where, dst_text, via_text, internal_cidr6)
                if route6 is not None and route6[0] not in routes:
                    routes[route6[0]] = route6[1]
                continue
            dst, nexthop = _v4_network(dst_text, strict=False), _v4_address(via_text)
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
        dst, nexthop = _v6_network(dst_text), _v6_address(via_text)
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
        internal: _Side,
        external_spec: dict[str, Any],
        external: _Side,
        attachments: list[Attachment],
        external_if: str,
    ) -> tuple[str | None, str | None, str | None]:
        """The IPv6 VPC address, external address (with prefixes) and gateway of a
        dual-stack gateway, each None when the input does not say it."""
        cidr6 = _v6_network(_v6_part(_text(internal_spec.get("cidrBlock")) or internal.attributes.get("cidr", "")))
        lan6 = _v6_address(_v6_part(_text(spec.get("lanIp")))) or _v6_address(
            _v6_part(internal.attributes.get("ip_address", ""))
        )
        internal6 = f"{lan6}/{cidr6.prefixlen}" if lan6 is not None and cidr6 is not None and lan6 in cidr6 else None
        ext_cidr6 = _v6_network(_v6_part(_text(external_spec.get("cidrBlock")) or external.attributes.get("cidr", "")))
        found = [
            address
            for attachment in attachments
            if attachment.interface == external_if
            for address in map(_v6_address, attachment.ips)
            if address is not None and (ext_cidr6 is None or address in ext_cidr6)
        ]
        ext6 = found[0] if found else _v6_address(_v6_part(external.attributes.get("ip_address", "")))
        external6 = None if ext6 is None else f"{ext6}/{ext_cidr6.prefixlen if ext_cidr6 else 128}"
        gateway6 = _v6_address(_v6_part(_text(external_spec.get("gateway")))) or _v6_address(
            _v6_part(external.attributes.get("gateway", ""))
        )
        return internal6, external6, None if gateway6 is None else str(gateway6)

    # EIPs and rules -------------------------------------------------------------------

    def eips(self, gw_name: str, external_subnet: str, used: set[int]) -> tuple[list[_Rule], dict[str, str]]:
        """The gateway's EIPs; and {EIP object name: state name} for the rules."""
        self.other_eips: dict[str, str] = {}
        self.skipped_eips: set[str] = set()
        chosen: list[_Rule] = []
        names: dict[str, str] = {}
        by_address: dict[IPv4Address | IPv6Address, str] = {}
        for eip in sorted(self.by_kind.get("IptablesEIP", []), key=_created):
            name, spec, status = _name(eip), _section(eip, "spec"), _section(eip, "status")
            owner = _text(spec.get("natGwDp"))
            if owner != gw_name:
                self.other_eips[name] = owner
                self.report("note", eip, f"EIP of gateway {owner or '(none)'}, not {gw_name}")
                continue
            used.add(id(eip))
            self.skipped_eips.add(name)
            if _deleting(eip):
                self.report("warning", eip, "being deleted; skipped")
                continue
            text, text6 = _text(spec.get("v4ip")) or _text(status.get("ip")), _text(spec.get("v6ip"))
            if not text and not text6:
                self.report("warning", eip, "has no address yet; skipped")
                continue
            address = _v4_address(text) if text else None
            address6 = _v6_address(text6) if text6 else None
            if text and address is None:
                self.report("warning", eip, f"v4ip {text!r} is not an IPv4 address; skipped")
                continue
            if text6 and address6 is None:
                self.report("warning", eip, f"v6ip {text6!r} is not an IPv6 address; skipped")
                continue
            taken = next((a for a in (address, address6) if a is not None and a in by_address), None)
            if taken is not None:
                self.report("warning", eip, f"{taken} is already EIP {by_address[taken]}; skipped")
                continue
            subnet = _text(spec.get("externalSubnet"))
            if subnet and subnet != external_subnet:
                self.report(
                    "note",
                    eip,
                    f"in external subnet {subnet}, not the gateway's {external_subnet}: it gets the prefix of "
                    "the external address's subnet if inside it, else /32 (the default route is onlink)",
                )
            own = state_name(name)
            if own != name:
                self.report("note", eip, f"named {own} in the state (natgwd names are DNS-1123 labels)")
            self.skipped_eips.discard(name)
            names[name] = own
            entry = {"name": own}
            for field_name, value in (("v4ip", address), ("v6ip", address6)):
                if value is not None:
                    by_address[value] = name
                    entry[field_name] = str(value)
            chosen.append(_Rule("eips", entry, eip, "IptablesEIP"))
        return chosen, names

    def rule_eip(self, rule: Obj, eip_names: dict[str, str], used: set[int]) -> str | None:
        eip = _text(_section(rule, "spec").get("eip"))
        if eip in eip_names:
            used.add(id(rule))
            if _deleting(rule):
                self.report("warning", rule, "being deleted; skipped")
                return None
            return eip_names[eip]
        if eip in self.other_eips:
            self.report("note", rule, f"uses EIP {eip} of gateway {self.other_eips[eip] or '(none)'}")
        elif eip in self.skipped_eips:
            used.add(id(rule))
            self.report("warning", rule, f"its EIP {eip} was skipped; skipped too")
        else:
            self.report("warning", rule, f"names EIP {eip or '(none)'}, which is not in the input; skipped")
        return None

    def rules(self, eip_names: dict[str, str], used: set[int]) -> list[_Rule]:
        rules: list[_Rule] = []
        for kind, section, build in (
            ("IptablesSnatRule", "snat", self.snat),
            ("IptablesDnatRule", "dnat", self.dnat),
            ("IptablesFIPRule", "fip", self.fip),
        ):
            for obj in sorted(self.by_kind.get(kind, []), key=_created):
                eip = self.rule_eip(obj, eip_names, used)
                if eip is None:
                    continue
                entry = build(obj, eip)
                if entry is not None:
                    entry = {"name": self.rule_name(obj), "eip": eip, **entry}
                    rules.append(_Rule(section, entry, obj, kind))
        return self.kube_ovn_conflicts(rules)

    def rule_name(self, obj: Obj) -> str:
        own = state_name(_name(obj))
        if own != _name(obj):
            self.report("note", obj, f"named {own} in the state (natgwd names are DNS-1123 labels)")
        return own

    def internal_ip(self, obj: Obj, text: str) -> str | None:
        address = _v6_address(text) if ":" in text else _v4_address(text)
        if address is None or "/" in text:
            self.report("warning", obj, f"internalIp {text!r} is not an IPv4 or IPv6 address; skipped")
            return None
        return str(address)

    def snat(self, obj: Obj, _eip: str) -> dict[str, Any] | None:
        text = _text(_section(obj, "spec").get("internalCIDR"))
        cidr: IPv4Network | IPv6Network | None
        if ":" in text:
            cidr = _v6_network(text if "/" in text else f"{text}/128")
        else:
            cidr = _v4_network(text if "/" in text else f"{text}/32", strict=False)
        if cidr is None:
            self.report("warning", obj, f"internalCIDR {text!r} is not an IPv4 or IPv6 CIDR; skipped")
            return None
        if "/" in text and str(cidr) != text:
            self.report("warning", obj, f"internalCIDR {text} has host bits set; imported as {cidr}")
        return {"internalCIDR": str(cidr)}

    def dnat(self, obj: Obj, _eip: str) -> dict[str, Any] | None:
        spec = _section(obj, "spec")
        protocol = _text(spec.get("protocol")).lower()
        if protocol not in ("tcp", "udp"):
            self.report("warning", obj, f"protocol {protocol or '(none)'} is not tcp or udp; skipped")
            return None
        ports: list[PortRange] = []
        for key in ("externalPort", "internalPort"):
            port = kube_ovn_port_range(_text(spec.get(key)))
            if isinstance(port, str):
                why = "is not a port or range" if port == NOT_A_PORT else f"is refused: {port}"
                self.report("warning", obj, f"{key} {spec.get(key)!r} {why}; skipped")
                return None
            ports.append(port)
        internal_ip = self.internal_ip(obj, _text(spec.get("internalIp")))
        if internal_ip is None:
            return None
        kind = _text(spec.get("type")) or "exclusive"
        if kind not in ("exclusive", "share"):
            self.report("warning", obj, f"type {kind!r} is neither exclusive nor share; skipped")
            return None
        if kind == "share" and (len(ports[0]) > 1 or len(ports[1]) > 1):
            self.report("warning", obj, "a share DNAT takes single ports, not ranges; skipped")
            return None
        entry: dict[str, Any] = {
            "protocol": protocol,
            "externalPort": str(ports[0]),
            "internalIp": internal_ip,
            "internalPort": str(ports[1]),
        }
        if kind == "share":
            entry["type"] = "share"
        return entry

    def fip(self, obj: Obj, _eip: str) -> dict[str, Any] | None:
        internal_ip = self.internal_ip(obj, _text(_section(obj, "spec").get("internalIp")))
        return None if internal_ip is None else {"internalIp": internal_ip}

    def kube_ovn_conflicts(self, rules: list[_Rule]) -> list[_Rule]:
        """Apply Kube-OVN's admission rules in creation order: the later of two conflicting
        rules is the one that never became Ready there, so it is the one left out here."""
        kept: list[_Rule] = []
        snat_cidrs: dict[str, str] = {}
        dnat_identity: dict[tuple[str, str, str], tuple[str, str]] = {}
        # By EIP and family: a dual-stack EIP carries one FIP (or DNATs) per family.
        fip_eips: dict[tuple[str, int], str] = {}
        dnat_eips: dict[tuple[str, int], str] = {}
        ordered = sorted(rules, key=lambda r: _created(r.source))
        for rule in ordered:
            entry, name = rule.entry, rule.entry["name"]
            family = ip_address(entry["internalIp"]).version if "internalIp" in entry else 0
            eip_family = (entry["eip"], family)
            if rule.section == "snat":
                owner = snat_cidrs.get(entry["internalCIDR"])
                if owner is not None:
                    self.report(
                        "warning", rule.source, f"{entry['internalCIDR']} is already translated by {owner}; skipped"
                    )
                    continue
                snat_cidrs[entry["internalCIDR"]] = name
            elif rule.section == "dnat":
                identity = (f"{entry['eip']}/{family}", entry["protocol"], entry["externalPort"])
                kind = entry.get("type", "exclusive")
                if eip_family in fip_eips:
                    self.report("warning", rule.source, f"EIP {entry['eip']} has FIP {fip_eips[eip_family]}; skipped")
                    continue
                if identity in dnat_identity:
                    other, other_kind = dnat_identity[identity]
                    if not (kind == "share" and other_kind == "share"):
                        self.report(
                            "warning",
                            rule.source,
                            f"{entry['protocol']}/{entry['externalPort']} on EIP {entry['eip']} is already "
                            f"taken by {other_kind} DNAT {other}; skipped",
                        )
                        continue
                dnat_identity.setdefault(identity, (name, kind))
                dnat_eips.setdefault(eip_family, name)
            else:
                if eip_family in fip_eips:
                    self.report(
                        "warning", rule.source, f"EIP {entry['eip']} already has FIP {fip_eips[eip_family]}; skipped"
                    )
                    continue
                if eip_family in dnat_eips:
                    self.report("warning", rule.source, f"EIP {entry['eip']} has DNAT {dnat_eips[eip_family]}; skipped")
                    continue
                fip_eips[eip_family] = name
            kept.append(rule)
        return kept

    # validation -----------------------------------------------------------------------

    def validated(self, base: dict[str, Any], eips: list[_Rule], rules: list[_Rule]) -> dict[str, Any]:
        """The state, after leaving out (and reporting) every entry natgwd's validation
        refuses; a refused interface section is fatal."""
        entries = eips + rules
        while True:
            state: dict[str, Any] = json.loads(json.dumps(base))
            placed: dict[tuple[str, int], _Rule] = {}
            for section in ("eips", "snat", "dnat", "fip"):
                members = sorted((r for r in entries if r.section == section), key=lambda r: r.entry["name"])
                if members:
                    state[section] = [r.entry for r in members]
                for index, rule in enumerate(members):
                    placed[(section, index)] = rule
            try:
                load_state(json.dumps(state).encode())
            except InvalidStateError as err:
                dropped: list[_Rule] = []
                fatal: list[str] = []
                for problem in err.problems:
                    culprit = placed.get((problem.section or "", problem.index or 0))
                    if culprit is None:
                        fatal.append(str(problem))
                    elif culprit not in dropped:
                        dropped.append(culprit)
                        self.report("warning", culprit.source, f"natgwd refuses it: {problem.reason}; skipped")
                if fatal:
                    raise ImportFailedError("the gateway itself is invalid: " + "; ".join(fatal)) from None
                entries = [r for r in entries if r not in dropped]
                continue
            return state


def import_objects(objects: Sequence[Obj], options: ImportOptions | None = None) -> ImportResult:
    """The desired state of one gateway from its Kube-OVN objects (validated)."""
    return _Importer(objects, options or ImportOptions()).run()


# --- output ---------------------------------------------------------------------------


def render(state: dict[str, Any]) -> str:
    return json.dumps(state, indent=2) + "\n"


# --- command line ---------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="FILE",
        help="kubectl get -o yaml|json output: files, directories of *.yaml/*.yml/*.json, '-' for stdin (default)",
    )
    parser.add_argument("-g", "--gateway", help="the VpcNatGateway to import (needed when the input has several)")
    parser.add_argument("-o", "--output", default="-", help="the desired-state file to write ('-': stdout, default)")
    parser.add_argument("--internal-interface", help="VPC-side interface (default: from network-status, else net1)")
    parser.add_argument("--external-interface", help="external interface (default: from network-status, else net2)")
    parser.add_argument(
        "--external-address",
        metavar="IP[/PREFIX]",
        help="the external interface's own address when no gateway pod says it (prefix: the external subnet's)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="write nothing and exit 2 when anything was not carried over (warnings)"
    )


def run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    options = ImportOptions(args.gateway, args.internal_interface, args.external_interface, args.external_address)
    try:
        objects, findings = read_inputs(args.inputs, stdin)
        result = import_objects(objects, options)
    except ImportFailedError as err:
        print(f"natgwd import: {err}", file=sys.stderr)
        return 1
    result.findings[:0] = findings
    for finding in result.findings:
        print(f"natgwd import: {finding}", file=sys.stderr)
    state = result.state
    counts = ", ".join(f"{len(state.get(k, []))} {k}" for k in ("eips", "snat", "dnat", "fip"))
    summary = f"gateway {result.gateway}: {counts}; {len(result.warnings)} warnings"
    if args.strict and result.warnings:
        print(f"natgwd import: {summary}: nothing written (--strict)", file=sys.stderr)
        return 2
    text = render(state)
    if args.output == "-":
        stdout.write(text)
        stdout.flush()
    else:
        try:
            write_atomically(Path(args.output), text.encode())
        except OSError as err:
            print(f"natgwd import: cannot write {args.output}: {err}", file=sys.stderr)
            return 1
    print(f"natgwd import: {summary}; wrote {args.output if args.output != '-' else 'stdout'}", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="natgwd import",
        description="Write the natgwd desired state of one Kube-OVN VPC NAT gateway from its objects "
        "(VpcNatGateway, Subnets, IptablesEIP, Iptables{Snat,Dnat,FIP}Rule, the gateway pod).",
    )
    add_arguments(top)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(None if argv is None else list(argv))
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
