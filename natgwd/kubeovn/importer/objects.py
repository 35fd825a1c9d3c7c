"""The input of `natgwd import`: Kubernetes objects as kubectl prints them, read and
accounted for (the Inventory), what the import reports about them (Findings), and the
small readers of their fields and address values."""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    NetmaskValueError,
    ip_network,
)
from pathlib import Path
from typing import Any, Literal, TextIO

Obj = dict[str, Any]
Severity = Literal["warning", "note"]

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

# A Service that kube-ovn-controller serves from a pod of its own (lb-svc.sh): never a NAT
# gateway's state, and nothing to import for its pod either (docs/kubeovn.md).
LB_SVC_ANNOTATION = "ovn.kubernetes.io/attachmentprovider"
LB_SVC_NOTE = (
    "a LoadBalancer Service served by its own lb-svc pod, which kube-ovn-controller sets up through "
    "lb-svc.sh whenever the pod starts; not part of a NAT gateway's state"
)


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


def metadata_of(obj: Obj) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def name_of(obj: Obj) -> str:
    return str(metadata_of(obj).get("name") or "")


def label_of(obj: Obj) -> str:
    namespace = metadata_of(obj).get("namespace")
    return f"{namespace}/{name_of(obj)}" if namespace else name_of(obj)


def section_of(obj: Obj, key: str) -> dict[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def text_of(value: Any) -> str:
    return "" if value is None else str(value).strip()


def creation_order(obj: Obj) -> tuple[str, str]:
    """Sort key: creation order (RFC 3339 timestamps sort as text), then name."""
    return (text_of(metadata_of(obj).get("creationTimestamp")) or "~", name_of(obj))


def is_deleting(obj: Obj) -> bool:
    return bool(metadata_of(obj).get("deletionTimestamp"))


def annotations_of(obj: Obj) -> dict[str, str]:
    raw = metadata_of(obj).get("annotations")
    return {str(k): text_of(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def v4_part(text: str) -> str:
    """The IPv4 member of a Kube-OVN dual-stack value such as "10.0.0.0/24,fd00::/64"."""
    for part in text.split(","):
        part = part.strip()
        if part and ":" not in part:
            return part
    return ""


def v4_address(text: str) -> IPv4Address | None:
    try:
        return IPv4Address(text.split("/")[0].strip())
    except (AddressValueError, ValueError):
        return None


def v4_network(text: str, strict: bool = True) -> IPv4Network | None:
    try:
        return IPv4Network(text.strip(), strict=strict)
    except (AddressValueError, NetmaskValueError, ValueError):
        return None


def v6_part(text: str) -> str:
    """The IPv6 member of a Kube-OVN dual-stack value such as "10.0.0.0/24,fd00::/64"."""
    return next((part.strip() for part in text.split(",") if ":" in part), "")


def v6_address(text: str) -> IPv6Address | None:
    try:
        return IPv6Address(text.split("/")[0].strip())
    except (AddressValueError, ValueError):
        return None


def v6_network(text: str) -> IPv6Network | None:
    try:
        return IPv6Network(text.strip(), strict=False)
    except (AddressValueError, NetmaskValueError, ValueError):
        return None


def is_v6(text: str) -> bool:
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


# --- what became of each object ------------------------------------------------------


class Inventory:
    """The input's objects by kind, and what became of them: each one is used for the state
    or reported (a Finding) by the end, so nothing is dropped silently."""

    def __init__(self, objects: Sequence[Obj]) -> None:
        self.objects = list(objects)
        self.findings: list[Finding] = []
        self._by_kind: dict[str, list[Obj]] = defaultdict(list)
        for obj in self.objects:
            self._by_kind[str(obj["kind"])].append(obj)
        # By identity: the objects are dicts (unhashable), kept alive by self.objects.
        self._used: set[int] = set()

    def of_kind(self, kind: str) -> list[Obj]:
        return self._by_kind.get(kind, [])

    def use(self, *objects: Obj | None) -> None:
        """These objects give (part of) the state."""
        self._used.update(id(obj) for obj in objects if obj is not None)

    def report(self, severity: Severity, obj: Obj | tuple[str, str], reason: str) -> None:
        kind, name = obj if isinstance(obj, tuple) else (str(obj["kind"]), label_of(obj))
        self.findings.append(Finding(severity, kind, name, reason))

    def report_unused(self) -> None:
        """Every object neither used nor reported yet gets a finding."""
        for obj in self.objects:
            if id(obj) not in self._used and not self._reported(obj):
                self._unused(obj)

    def _reported(self, obj: Obj) -> bool:
        kind, name = str(obj["kind"]), label_of(obj)
        return any(f.kind == kind and f.name == name for f in self.findings)

    def _unused(self, obj: Obj) -> None:
        kind = str(obj["kind"])
        if kind in UNSUPPORTED_KINDS:
            self.report("warning", obj, UNSUPPORTED_KINDS[kind])
        elif kind in CONTEXT_KINDS:
            self.report("note", obj, "not needed for this gateway's state; ignored")
        elif kind == "Service" and _is_lb_svc(obj):
            self.report("note", obj, LB_SVC_NOTE)
        else:
            self.report("warning", obj, f"kind {kind} is not something natgwd import knows; ignored")


def _is_lb_svc(obj: Obj) -> bool:
    return section_of(obj, "spec").get("type") == "LoadBalancer" and LB_SVC_ANNOTATION in annotations_of(obj)
