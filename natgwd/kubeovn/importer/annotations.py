"""The gateway pod's annotations: per-provider attributes, the `routes` annotation and
Multus' network-status."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from natgwd.kubeovn.importer.objects import text_of

NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
ANNOTATION_INFIX = ".kubernetes.io/"
NAT_GW_ANNOTATION = "vpc_nat_gw"


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
    return [AnnotatedRoute(text_of(item.get("dst")), text_of(item.get("gw"))) for item in loaded]


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
                text_of(item.get("name")),
                text_of(item.get("interface")),
                tuple(text_of(i) for i in ips),
                tuple(text_of(g) for g in gateways),
            )
        )
    return attachments
