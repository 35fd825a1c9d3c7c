"""The names natgwd gives what Kube-OVN's nat-gateway.sh calls add: the calls name rules
by addresses and ports, never by a name, and the desired state needs one. Given here only,
so that the rules `init` takes over from natgwd's table after a restart
(natgwd.kubeovn.kernelrules) are named as the calls that added them named them."""

from __future__ import annotations

import re


def dashed(text: object) -> str:
    """A text as a name part: lower case, runs of anything else than [0-9a-z] as one "-"."""
    return re.sub(r"[^0-9a-z]+", "-", str(text).lower()).strip("-")


def eip_name(address: object) -> str:
    return f"eip-{dashed(address)}"


def fip_name(eip: object) -> str:
    return f"fip-{dashed(eip)}"


def snat_name(eip: object, cidr: object) -> str:
    return f"snat-{dashed(eip)}-{dashed(cidr)}"


def dnat_name(eip: object, protocol: str, port: object) -> str:
    """An exclusive DNAT rule's name, by its identity (`port`: the external port or range)."""
    return f"dnat-{dashed(eip)}-{protocol}-{port}"


def share_name(eip: object, protocol: str, port: object, backend: object, backend_port: object) -> str:
    """The name of one backend of a share DNAT group."""
    return f"dnat-{dashed(eip)}-{protocol}-{port}-{dashed(backend)}-{backend_port}"
