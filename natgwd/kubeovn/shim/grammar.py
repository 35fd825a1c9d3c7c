"""The words of Kube-OVN's nat-gateway.sh calls: the fields of a rule, addresses, CIDRs,
ports and protocols in the script's formats, the usage text, and the error a refused call
raises."""

from __future__ import annotations

import re
from collections.abc import Sequence
from ipaddress import AddressValueError, IPv4Address, IPv4Network, NetmaskValueError

# `iptables --version` of a current nft-based iptables: the controller parses it and, being
# newer than 1.6.2, adds --random-fully to SNAT rules (natgwd always randomises fully).
IPTABLES_VERSION = "iptables v1.8.9 (nf_tables)"

USAGE = """\
Usage: nat-gateway.sh COMMAND [RULE...]   (natgwd: each call edits the desired state)

  init [vpcIf,extIf]                                  interfaces (default eth0,net1)
  init CIDR,NEXTHOP                                   (v1.12) default interfaces and a route to a VPC network
  subnet-route-add CIDR,NEXTHOP                       route to a VPC network
  subnet-route-del CIDR                               also the route the CNI installed
  ext-subnet-route-add EXTERNAL_CIDR,GATEWAY          (v1.12) the default route
  eip-add IP/PREFIX[,GATEWAY]                         EIP (natgwd takes the prefix of the external subnet)
  eip-del IP[/PREFIX]                                 EIP and the rules that still use it
  floating-ip-add EIP,INTERNAL_IP                     1:1 NAT
  floating-ip-del EIP
  snat-add EIP,INTERNAL_CIDR[,--random-fully]         SNAT (always fully random in natgwd)
  snat-del EIP,INTERNAL_CIDR
  dnat-add EIP,EXTERNAL_PORT,PROTOCOL,INTERNAL_IP,INTERNAL_PORT
  dnat-del EIP,EXTERNAL_PORT,PROTOCOL
  nft-dnat-map-add EIP,PORT,PROTOCOL,IP1:PORT1@IP2:PORT2...   share DNAT: exactly these backends
  nft-dnat-map-del EIP,PORT,PROTOCOL
  get-iptables-version
  lb-svc COMMAND RULE...                              a call of lb-svc.sh (`lb-svc help`)
  eip-ingress-qos-add|eip-egress-qos-add IP,PRIORITY,RATE,BURST    an EIP's limit (Mbit/s, MB)
  eip-ingress-qos-del|eip-egress-qos-del IP
  qos-add|qos-del DIRECTION,IFACE,PRIORITY,u32|matchall,ip,src|dst,CIDR,RATE,BURST   the gateway's limits
  help

Environment: NATGWD_STATE, NATGWD_APPLIED_STATE, NATGWD_EDIT_TOKEN, NATGWD_SHIM_TIMEOUT, GATEWAY_V4,
NATGWD_PYTHON (nat-gateway.sh without an endpoint: the Python with natgwd, default /opt/natgwd/bin/python)."""


class ShimError(Exception):
    """A refused or failed call: the message goes to stderr, the code is the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def words(argv: Sequence[str]) -> list[str]:
    """The rules of a call: its arguments split into words, as the script's unquoted `$@`."""
    return [word for arg in argv for word in arg.split()]


def fields(rule: str, least: int, most: int, form: str) -> list[str]:
    # As the script's `arr=(${rule//,/ })`: empty fields vanish (the controller may send a
    # trailing comma when an optional field is empty).
    found = [f.strip() for f in rule.split(",") if f.strip()]
    if not least <= len(found) <= most:
        raise ShimError(f"natgwd: bad rule {rule!r}: expected {form}")
    return found


def _no_ipv6(text: str, what: str) -> None:
    if ":" in text:
        raise ShimError(
            f"natgwd: {what} {text}: IPv6 is not supported through the script interface "
            "(Kube-OVN's is IPv4-only; IPv6 goes in the state file)"
        )


def address(text: str, what: str) -> IPv4Address:
    """An IPv4 address; as the script, an "/prefix" on an EIP field is ignored."""
    bare = text.split("/")[0]
    _no_ipv6(bare, what)
    try:
        return IPv4Address(bare)
    except (AddressValueError, ValueError):
        raise ShimError(f"natgwd: {what} {text!r} is not an IPv4 address") from None


def network(text: str, what: str, warnings: list[str]) -> IPv4Network:
    _no_ipv6(text, what)
    try:
        found = IPv4Network(text if "/" in text else f"{text}/32", strict=False)
    except (AddressValueError, NetmaskValueError, ValueError):
        raise ShimError(f"natgwd: {what} {text!r} is not an IPv4 CIDR") from None
    if "/" in text and str(found) != text:
        warnings.append(f"{what} {text} has host bits set; using {found}")
    return found


def port(text: str, what: str) -> str:
    match = re.fullmatch(r"([0-9]{1,5})(?:[-:]([0-9]{1,5}))?", text)
    if match is None:
        raise ShimError(f"natgwd: {what} {text!r} is not a port or a range first-last")
    first, last = int(match[1]), int(match[2] or match[1])
    if not (1 <= first <= 65535 and 1 <= last <= 65535) or first > last:
        raise ShimError(f"natgwd: {what} {text!r} is not a port 1-65535 or a range first-last")
    return str(first) if first == last else f"{first}-{last}"


def protocol(text: str) -> str:
    lowered = text.lower()
    if lowered not in ("tcp", "udp"):
        raise ShimError(f"natgwd: protocol {text!r} is not tcp or udp")
    return lowered
