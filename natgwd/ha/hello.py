"""The members of a gateway that kube-ovn-controller runs as a Deployment find each other
by a hello on the LAN (pure: the pod name's scope, the hello's bytes; docs/scaling-out.md).

A Deployment's pod is named `<deployment>-<pod-template-hash>-<5 characters>`; a
StatefulSet's, `<statefulset>-<ordinal>`. The Deployment's name (`vpc-nat-gw-<gateway>`)
is the scope of the hellos: two gateways on one LAN never take each other for a member.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import AddressValueError, IPv4Address

# Kubernetes' generated name parts use this alphabet (apimachinery's rand.String and
# SafeEncodeString: no vowels, no 0, 1 or 3, so that no word is spelled).
_SAFE = "bcdfghjklmnpqrstvwxz2456789"
_DEPLOYMENT_POD = re.compile(rf"(?P<deployment>vpc-nat-gw-[a-z0-9.-]+)-[{_SAFE}]{{1,10}}-[{_SAFE}]{{5}}")
MAX_HELLO_BYTES = 256
# Site-local scope (RFC 2365), never routed off the LAN; TTL 1 keeps it there anyway.
HELLO_GROUP = IPv4Address("239.255.94.69")
DISCOVERY_PORT = 3782  # beside conntrackd's 3780 and the HA pair's peer check, 3781
VERSION = 1


class Refusal(StrEnum):
    """Why a hello was ignored (the label of natgwd_scale_hellos_refused_total)."""

    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    FOREIGN_SCOPE = "foreign_scope"
    ADDRESS_MISMATCH = "address_mismatch"  # it names another address than the one it came from
    TOO_MANY_MEMBERS = "too_many_members"


@dataclass(frozen=True)
class Hello:
    scope: str
    address: IPv4Address


def deployment_scope(pod_name: str) -> str | None:
    """The Deployment of a kube-ovn-controller gateway replica named `pod_name`, else None
    (a StatefulSet's single gateway `vpc-nat-gw-<gateway>-0`, anything else)."""
    found = _DEPLOYMENT_POD.fullmatch(pod_name)
    return found.group("deployment") if found else None


def encode_hello(hello: Hello) -> bytes:
    return json.dumps({"natgwd": VERSION, "scope": hello.scope, "address": str(hello.address)}).encode()


def decode_hello(data: bytes, scope: str, source: IPv4Address) -> Hello | Refusal:
    """The hello in `data`, received from `source`, or why it is ignored."""
    if len(data) > MAX_HELLO_BYTES:
        return Refusal.OVERSIZED
    try:
        message = json.loads(data)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
        return Refusal.MALFORMED
    if not isinstance(message, dict) or type(message.get("natgwd")) is not int or message["natgwd"] != VERSION:
        return Refusal.MALFORMED
    claimed, address = message.get("scope"), message.get("address")
    if not isinstance(claimed, str) or not isinstance(address, str):
        return Refusal.MALFORMED
    try:
        named = IPv4Address(address)
    except AddressValueError:
        return Refusal.MALFORMED
    if claimed != scope:
        return Refusal.FOREIGN_SCOPE
    if named != source:
        return Refusal.ADDRESS_MISMATCH
    return Hello(claimed, named)
