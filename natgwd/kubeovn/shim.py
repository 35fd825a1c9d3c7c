"""A drop-in `nat-gateway.sh` for natgwd: Kube-OVN's gateway script, as edits of the
desired-state file.

kube-ovn-controller execs `bash /kube-ovn/nat-gateway.sh <subcommand> <rule>...` in the
gateway pod, one rule per call. The natgwd image installs a two-line nat-gateway.sh that
execs `python -m natgwd.kubeovn.shim "$@"`; every call becomes one atomic update of the state file
that natgwd watches, and returns only once natgwd has applied it (or a later state):

1. Parse every rule (the script's formats; a malformed rule fails before anything is
   touched).
2. Take an exclusive flock on `<state>.lock`, read the state, apply the change with the
   script's semantics (the same rule again is a no-op and exits 0; the same identity with
   another target exits 1; deleting what is not there exits 0), validate the result with
   natgwd.state.validation.load_state, append the new content's sha256 to `<state>.journal`,
   write the state (temp file, fsync, rename, fsync of the directory) and unlock.
3. Wait until natgwd's applied-state record (NATGWD_APPLIED_STATE) names the sha256 of
   this content or of any content written after it.

Why the journal and the stamp: natgwd polls the file and may apply only the newest of
several quick writes, so a caller must also accept a *later* content as "applied"; the
journal lists, per generation, the sha256 every write produced. And two generations must
never share a sha256: otherwise (add X, del X) would give back the bytes natgwd applied
before both, and the `del X` caller could return while natgwd is still applying the
intermediate `add X`. So every file the shim writes ends with a generation stamp: a last
line of spaces and tabs (the generation in binary), which JSON ignores as whitespace.
Writing a journal entry before the file it describes means that a content natgwd can
have read is always already in the journal when a waiter looks.

Environment: NATGWD_STATE (default /etc/natgwd/state.json), NATGWD_APPLIED_STATE (default
/var/lib/natgwd/applied.json), NATGWD_SHIM_TIMEOUT (seconds, default 30; 0 = do not wait
for natgwd), GATEWAY_V4 (the external gateway, as the controller sets it in the pod).

Exit codes as the script's: 0 done (or nothing to do), 1 refused or failed, 2 a
`subnet-route-del` of a route that is nowhere (`ip route del`'s code). Warnings go to
stderr prefixed "Warning:", which the controller does not count as an error.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import AddressValueError, IPv4Address, IPv4Interface, IPv4Network, NetmaskValueError, ip_network
from pathlib import Path
from typing import Any, Protocol, TextIO

from natgwd.kubeovn.kernelrules import dashed as _dashed
from natgwd.planning.links import DEFAULT_ROUTE
from natgwd.runtime import applied
from natgwd.runtime.files import write_atomically
from natgwd.state.model import RULE_KINDS
from natgwd.state.validation import InvalidStateError, load_state

DEFAULT_STATE = "/etc/natgwd/state.json"
DEFAULT_APPLIED = "/var/lib/natgwd/applied.json"
DEFAULT_TIMEOUT = 30.0
# `iptables --version` of a current nft-based iptables: the controller parses it and, being
# newer than 1.6.2, adds --random-fully to SNAT rules (natgwd always randomises fully).
IPTABLES_VERSION = "iptables v1.8.9 (nf_tables)"
DEFAULT_VPC_INTERFACE = "eth0"  # the script's defaults, for `init` without arguments
DEFAULT_EXTERNAL_INTERFACE = "net1"
JOURNAL_MAX_BYTES = 256 * 1024
JOURNAL_KEEP = 1024

Doc = dict[str, Any]

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
  eip-ingress-qos-add|eip-egress-qos-add IP,PRIORITY,RATE,BURST    an EIP's limit (Mbit/s, MB)
  eip-ingress-qos-del|eip-egress-qos-del IP
  qos-add|qos-del DIRECTION,IFACE,PRIORITY,u32|matchall,ip,src|dst,CIDR,RATE,BURST   the gateway's limits
  help

Environment: NATGWD_STATE, NATGWD_APPLIED_STATE, NATGWD_SHIM_TIMEOUT, GATEWAY_V4."""


class ShimError(Exception):
    """A refused or failed call: the message goes to stderr, the code is the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Config:
    state: Path
    applied: Path
    timeout: float
    gateway_v4: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        text = env.get("NATGWD_SHIM_TIMEOUT", "") or str(DEFAULT_TIMEOUT)
        try:
            timeout = float(text)
        except ValueError:
            raise ShimError(f"natgwd: NATGWD_SHIM_TIMEOUT={text!r} is not a number of seconds") from None
        return cls(
            Path(env.get("NATGWD_STATE") or DEFAULT_STATE),
            Path(env.get("NATGWD_APPLIED_STATE") or DEFAULT_APPLIED),
            timeout,
            (env.get("GATEWAY_V4") or "").strip() or None,
        )

    @property
    def lock(self) -> Path:
        return self.state.with_name(self.state.name + ".lock")

    @property
    def journal(self) -> Path:
        return self.state.with_name(self.state.name + ".journal")


# --- the kernel's view, for `init` ----------------------------------------------------


class Links(Protocol):
    """What the shim asks of the kernel (a fake in the unit tests)."""

    def exists(self, name: str) -> bool: ...

    def addresses(self, name: str) -> list[IPv4Interface]:
        """Primary global IPv4 addresses (what the CNI configured)."""
        ...

    def routes(self, name: str) -> list[tuple[IPv4Network, IPv4Address]]:
        """IPv4 routes through a gateway out of the interface (the default one included)."""
        ...

    def delete_routes(self, name: str, dst: IPv4Network) -> int:
        """Delete the main table's routes to `dst` out of the interface, whoever added
        them; how many there were."""
        ...

    def nat_rules(self) -> Doc | None:
        """The rules natgwd's nftables table holds (natgwd.kubeovn.kernelrules); None without one."""
        ...


class KernelLinks:
    IFA_F_SECONDARY = 0x01
    MAIN_TABLE = 254

    def _index(self, ipr: Any, name: str) -> int | None:
        found = ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def exists(self, name: str) -> bool:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return self._index(ipr, name) is not None

    def addresses(self, name: str) -> list[IPv4Interface]:
        from socket import AF_INET

        from pyroute2 import IPRoute

        from natgwd.kernel.netlink import NATGWD_PROTO

        with IPRoute() as ipr:
            index = self._index(ipr, name)
            if index is None:
                return []
            found = []
            for msg in ipr.get_addr(family=AF_INET, index=index):
                if msg["scope"] != 0 or msg["flags"] & self.IFA_F_SECONDARY:
                    continue
                if msg.get("IFA_PROTO") == NATGWD_PROTO:
                    continue  # an EIP natgwd added, not the CNI's address
                local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                found.append(IPv4Interface(f"{local}/{msg['prefixlen']}"))
            return found

    def routes(self, name: str) -> list[tuple[IPv4Network, IPv4Address]]:
        from socket import AF_INET

        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            index = self._index(ipr, name)
            if index is None:
                return []
            found = []
            for msg in ipr.get_routes(family=AF_INET, table=self.MAIN_TABLE):
                gateway = msg.get_attr("RTA_GATEWAY")
                if msg.get_attr("RTA_OIF") != index or not gateway:
                    continue
                dst = msg.get_attr("RTA_DST") or "0.0.0.0"
                found.append((IPv4Network(f"{dst}/{msg['dst_len']}"), IPv4Address(gateway)))
            return found

    def delete_routes(self, name: str, dst: IPv4Network) -> int:
        import errno
        from socket import AF_INET

        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            index = self._index(ipr, name)
            if index is None:
                return 0
            found = [
                msg
                for msg in ipr.get_routes(family=AF_INET, table=self.MAIN_TABLE)
                if msg.get_attr("RTA_OIF") == index
                and msg["dst_len"] == dst.prefixlen
                and msg.get_attr("RTA_DST") == str(dst.network_address)
            ]
            deleted = 0
            for msg in found:
                try:
                    ipr.route("del", dst=str(dst), table=self.MAIN_TABLE, oif=index, proto=msg["proto"])
                    deleted += 1
                except NetlinkError as err:
                    if err.code != errno.ESRCH:  # gone meanwhile: not ours to count
                        raise ShimError(f"natgwd: ip route del {dst} dev {name}: {err}") from None
            return deleted

    def nat_rules(self) -> Doc | None:
        from natgwd.kubeovn.kernelrules import read_kernel_rules

        return read_kernel_rules()


# --- argument parsing -----------------------------------------------------------------


def _fields(rule: str, least: int, most: int, form: str) -> list[str]:
    # As the script's `arr=(${rule//,/ })`: empty fields vanish (the controller may send a
    # trailing comma when an optional field is empty).
    fields = [f.strip() for f in rule.split(",") if f.strip()]
    if not least <= len(fields) <= most:
        raise ShimError(f"natgwd: bad rule {rule!r}: expected {form}")
    return fields


def _address(text: str, what: str) -> IPv4Address:
    """An IPv4 address; as the script, an "/prefix" on an EIP field is ignored."""
    bare = text.split("/")[0]
    if ":" in bare:
        raise ShimError(
            f"natgwd: {what} {text}: IPv6 is not supported through the script interface "
            "(Kube-OVN's is IPv4-only; IPv6 goes in the state file)"
        )
    try:
        return IPv4Address(bare)
    except (AddressValueError, ValueError):
        raise ShimError(f"natgwd: {what} {text!r} is not an IPv4 address") from None


def _network(text: str, what: str, warnings: list[str]) -> IPv4Network:
    if ":" in text:
        raise ShimError(
            f"natgwd: {what} {text}: IPv6 is not supported through the script interface "
            "(Kube-OVN's is IPv4-only; IPv6 goes in the state file)"
        )
    try:
        network = IPv4Network(text if "/" in text else f"{text}/32", strict=False)
    except (AddressValueError, NetmaskValueError, ValueError):
        raise ShimError(f"natgwd: {what} {text!r} is not an IPv4 CIDR") from None
    if "/" in text and str(network) != text:
        warnings.append(f"{what} {text} has host bits set; using {network}")
    return network


def _port(text: str, what: str) -> str:
    match = re.fullmatch(r"([0-9]{1,5})(?:[-:]([0-9]{1,5}))?", text)
    if match is None:
        raise ShimError(f"natgwd: {what} {text!r} is not a port or a range first-last")
    first, last = int(match[1]), int(match[2] or match[1])
    if not (1 <= first <= 65535 and 1 <= last <= 65535) or first > last:
        raise ShimError(f"natgwd: {what} {text!r} is not a port 1-65535 or a range first-last")
    return str(first) if first == last else f"{first}-{last}"


def _protocol(text: str) -> str:
    protocol = text.lower()
    if protocol not in ("tcp", "udp"):
        raise ShimError(f"natgwd: protocol {text!r} is not tcp or udp")
    return protocol


# --- the desired state ----------------------------------------------------------------


@dataclass
class Context:
    gateway_v4: str | None
    warnings: list[str] = field(default_factory=list)
    # subnet-route-del: each destination, and whether the state had a route to it.
    route_dels: list[tuple[IPv4Network, bool]] = field(default_factory=list)
    internal_interface: str | None = None


Op = Callable[[Doc, Context], None]


def _items(doc: Doc, section: str) -> list[dict[str, Any]]:
    items = doc.get(section)
    if not isinstance(items, list):
        items = []
        doc[section] = items
    return items


def _unique(name: str, doc: Doc, section: str) -> str:
    taken = {item.get("name") for item in _items(doc, section)}
    candidate, suffix = name, 2
    while candidate in taken:
        candidate = f"{name[: 63 - len(str(suffix)) - 1]}-{suffix}"
        suffix += 1
    return candidate


def _norm_port(value: object) -> str:
    return str(value).replace(":", "-")


def _norm_cidr(value: object) -> str:
    text = str(value)
    try:
        return str(IPv4Network(text if "/" in text else f"{text}/32", strict=False))
    except ValueError:
        return text


def _eip_named(doc: Doc, address: IPv4Address) -> str | None:
    for eip in _items(doc, "eips"):
        if eip.get("v4ip") == str(address):
            return str(eip["name"])
    return None


def _eip_address(doc: Doc, name: str) -> str:
    for eip in _items(doc, "eips"):
        if eip.get("name") == name:
            return str(eip.get("v4ip"))
    return name


def _need_eip(doc: Doc, address: IPv4Address, ctx: Context) -> str:
    """The state's name of the EIP with this address; added when missing (the script does
    not need the address on the interface for a rule, and the controller may replay a rule
    before its EIP after a restart)."""
    name = _eip_named(doc, address)
    if name is None:
        name = _unique(f"eip-{_dashed(address)}", doc, "eips")
        _items(doc, "eips").append({"name": name, "v4ip": str(address)})
        ctx.warnings.append(f"EIP {address} was not added (eip-add); added it")
    return name


def _external_networks(doc: Doc) -> list[IPv4Network]:
    networks = []
    for text in (doc.get("external") or {}).get("addresses", []):
        with contextlib.suppress(ValueError):
            networks.append(IPv4Interface(text).network)
    return networks


def _set_gateway(doc: Doc, gateway: str | None, ctx: Context) -> None:
    if not gateway:
        return
    address = _address(gateway, "GATEWAY_V4")
    external = doc.setdefault("external", {})
    if external.get("gateway") != str(address):
        if external.get("gateway"):
            ctx.warnings.append(f"external gateway changed from {external['gateway']} to {address} (GATEWAY_V4)")
        external["gateway"] = str(address)


# one parser per subcommand: rule text -> the edit it makes ---------------------------


def parse_route_add(rule: str) -> Op:
    warnings: list[str] = []
    cidr_text, via_text = _fields(rule, 2, 2, "CIDR,NEXTHOP")
    dst, via = _network(cidr_text, "route", warnings), _address(via_text, "nexthop")

    def op(doc: Doc, ctx: Context) -> None:
        ctx.warnings.extend(warnings)
        for network in _external_networks(doc):
            if dst.subnet_of(network):
                ctx.warnings.append(
                    f"route {dst} via {via} ignored: it lies in the external subnet {network}, which the "
                    "external interface reaches directly"
                )
                return
        routes = _items(doc.setdefault("internal", {}), "routes")
        for route in routes:
            if _norm_cidr(route.get("dst")) == str(dst):
                route["via"] = str(via)  # `ip route replace`
                return
        routes.append({"dst": str(dst), "via": str(via)})

    return op


def parse_route_del(rule: str) -> Op:
    warnings: list[str] = []
    dst = _network(_fields(rule, 1, 2, "CIDR")[0], "route", warnings)

    def op(doc: Doc, ctx: Context) -> None:
        ctx.warnings.extend(warnings)
        internal = doc.setdefault("internal", {})
        routes = _items(internal, "routes")
        internal["routes"] = [r for r in routes if _norm_cidr(r.get("dst")) != str(dst)]
        ctx.route_dels.append((dst, len(internal["routes"]) != len(routes)))
        ctx.internal_interface = internal.get("interface")

    return op


def delete_leftover_routes(ctx: Context, links: Links) -> None:
    """After natgwd applied a `subnet-route-del`: also delete the route when someone else
    installed it. The CNI installs a route to every VPC subnet when the pod is created
    (`proto boot`); natgwd leaves routes it did not add, but in the drop-in the controller
    owns the VPC routes on the internal interface and the script runs `ip route del CIDR dev
    VPC`, which removes them whoever added them. A route that was nowhere fails as `ip route
    del` does: exit 2."""
    interface = ctx.internal_interface
    missing = []
    for dst, in_state in ctx.route_dels:
        deleted = links.delete_routes(interface, dst) if interface else 0
        if not deleted and not in_state:
            missing.append(str(dst))
    if missing:
        where = f"no route to {', '.join(missing)} on {interface}"
        raise ShimError(f"natgwd: {where} (ip route del: No such process)", code=2)


def parse_ext_route_add(rule: str) -> Op:
    """v1.12's `ext-subnet-route-add EXTERNAL_CIDR,GATEWAY`: the default route via the
    external subnet's gateway (the external subnet itself is on-link)."""
    warnings: list[str] = []
    cidr_text, via_text = _fields(rule, 2, 2, "EXTERNAL_CIDR,GATEWAY")
    _network(cidr_text, "external subnet", warnings)
    via = _address(via_text, "gateway")

    def op(doc: Doc, ctx: Context) -> None:
        ctx.warnings.extend(warnings)
        _set_gateway(doc, str(via), ctx)

    return op


def parse_eip_add(rule: str) -> Op:
    fields = _fields(rule, 1, 2, "IP/PREFIX")
    address = _address(fields[0], "EIP")
    prefix = fields[0].partition("/")[2]
    if prefix and not (prefix.isdigit() and int(prefix) <= 32):
        raise ShimError(f"natgwd: EIP {fields[0]!r} has an invalid prefix length")
    legacy_gateway = fields[1] if len(fields) == 2 else None  # v1.12: eip/prefix,gateway

    def op(doc: Doc, ctx: Context) -> None:
        if _eip_named(doc, address) is None:
            _items(doc, "eips").append({"name": _unique(f"eip-{_dashed(address)}", doc, "eips"), "v4ip": str(address)})
        if prefix:
            networks = [n for n in _external_networks(doc) if address in n]
            used = networks[0].prefixlen if networks else 32
            if int(prefix) != used:
                where = f"the external subnet {networks[0]}'s" if networks else "no external subnet contains it: the"
                ctx.warnings.append(f"EIP {address} gets {where} prefix /{used}, not /{prefix}")
        _set_gateway(doc, ctx.gateway_v4 or legacy_gateway, ctx)

    return op


def parse_eip_del(rule: str) -> Op:
    address = _address(_fields(rule, 1, 2, "IP[/PREFIX]")[0], "EIP")

    def op(doc: Doc, ctx: Context) -> None:
        name = _eip_named(doc, address)
        if name is None:
            return
        doc["eips"] = [e for e in _items(doc, "eips") if e.get("name") != name]
        for section in RULE_KINDS:
            kept = [r for r in _items(doc, section) if r.get("eip") != name]
            gone = [str(r.get("name")) for r in _items(doc, section) if r.get("eip") == name]
            if gone:
                ctx.warnings.append(f"EIP {address} was still used by {section} {', '.join(gone)}; removed them too")
            doc[section] = kept

    return op


def parse_fip_add(rule: str) -> Op:
    eip_text, ip_text = _fields(rule, 2, 2, "EIP,INTERNAL_IP")
    eip, internal_ip = _address(eip_text, "EIP"), _address(ip_text, "internal IP")

    def op(doc: Doc, ctx: Context) -> None:
        name = _need_eip(doc, eip, ctx)
        for fip in _items(doc, "fip"):
            if fip.get("eip") == name:
                if fip.get("internalIp") == str(internal_ip):
                    return
                raise ShimError(
                    f"natgwd: floating IP {eip} already maps to {fip.get('internalIp')} (rule {fip.get('name')}); "
                    "delete it first"
                )
        fips = _items(doc, "fip")
        fips.append({"name": _unique(f"fip-{_dashed(eip)}", doc, "fip"), "eip": name, "internalIp": str(internal_ip)})

    return op


def parse_fip_del(rule: str) -> Op:
    eip = _address(_fields(rule, 1, 2, "EIP[,INTERNAL_IP]")[0], "EIP")

    def op(doc: Doc, ctx: Context) -> None:
        name = _eip_named(doc, eip)
        doc["fip"] = [f for f in _items(doc, "fip") if name is None or f.get("eip") != name]

    return op


def parse_snat_add(rule: str) -> Op:
    fields = _fields(rule, 2, 3, "EIP,INTERNAL_CIDR[,--random-fully]")
    if len(fields) == 3 and fields[2] != "--random-fully":
        raise ShimError(f"natgwd: bad rule {rule!r}: the third field can only be --random-fully")
    warnings: list[str] = []
    eip, cidr = _address(fields[0], "EIP"), _network(fields[1], "internal CIDR", warnings)

    def op(doc: Doc, ctx: Context) -> None:
        ctx.warnings.extend(warnings)
        name = _need_eip(doc, eip, ctx)
        for snat in _items(doc, "snat"):
            if _norm_cidr(snat.get("internalCIDR")) == str(cidr):
                if snat.get("eip") == name:
                    return
                raise ShimError(
                    f"natgwd: {cidr} is already translated to {_eip_address(doc, str(snat.get('eip')))} "
                    f"(rule {snat.get('name')}); natgwd gives a CIDR one EIP: delete that SNAT first"
                )
        snats = _items(doc, "snat")
        snats.append(
            {
                "name": _unique(f"snat-{_dashed(eip)}-{_dashed(cidr)}", doc, "snat"),
                "eip": name,
                "internalCIDR": str(cidr),
            }
        )

    return op


def parse_snat_del(rule: str) -> Op:
    fields = _fields(rule, 2, 3, "EIP,INTERNAL_CIDR")
    warnings: list[str] = []
    eip, cidr = _address(fields[0], "EIP"), _network(fields[1], "internal CIDR", warnings)

    def op(doc: Doc, ctx: Context) -> None:
        ctx.warnings.extend(warnings)
        name = _eip_named(doc, eip)
        doc["snat"] = [
            s
            for s in _items(doc, "snat")
            if not (s.get("eip") == name and _norm_cidr(s.get("internalCIDR")) == str(cidr))
        ]

    return op


def _identity_matches(rule: dict[str, Any], name: str | None, protocol: str, port: str) -> bool:
    return rule.get("eip") == name and rule.get("protocol") == protocol and _norm_port(rule.get("externalPort")) == port


def parse_dnat_add(rule: str) -> Op:
    eip_text, port_text, protocol_text, ip_text, internal_port_text = _fields(
        rule, 5, 5, "EIP,EXTERNAL_PORT,PROTOCOL,INTERNAL_IP,INTERNAL_PORT"
    )
    eip, port = _address(eip_text, "EIP"), _port(port_text, "external port")
    protocol, internal_ip = _protocol(protocol_text), _address(ip_text, "internal IP")
    internal_port = _port(internal_port_text, "internal port")

    def op(doc: Doc, ctx: Context) -> None:
        name = _need_eip(doc, eip, ctx)
        for dnat in _items(doc, "dnat"):
            if not _identity_matches(dnat, name, protocol, port):
                continue
            if dnat.get("type") == "share":
                raise ShimError(
                    f"natgwd: {protocol}/{port} on {eip} is a share DNAT group (rule {dnat.get('name')}); "
                    "an exclusive DNAT cannot take the same identity"
                )
            if dnat.get("internalIp") == str(internal_ip) and _norm_port(dnat.get("internalPort")) == internal_port:
                return
            raise ShimError(
                f"natgwd: {protocol}/{port} on {eip} already goes to {dnat.get('internalIp')}:"
                f"{dnat.get('internalPort')} (rule {dnat.get('name')}); delete it first"
            )
        entry = {
            "name": _unique(f"dnat-{_dashed(eip)}-{protocol}-{port}", doc, "dnat"),
            "eip": name,
            "protocol": protocol,
            "externalPort": port,
            "internalIp": str(internal_ip),
            "internalPort": internal_port,
        }
        _items(doc, "dnat").append(entry)

    return op


def parse_dnat_del(rule: str) -> Op:
    fields = _fields(rule, 3, 5, "EIP,EXTERNAL_PORT,PROTOCOL")
    eip, port, protocol = _address(fields[0], "EIP"), _port(fields[1], "external port"), _protocol(fields[2])

    def op(doc: Doc, ctx: Context) -> None:
        name = _eip_named(doc, eip)
        doc["dnat"] = [
            d for d in _items(doc, "dnat") if d.get("type") == "share" or not _identity_matches(d, name, protocol, port)
        ]

    return op


def parse_share_add(rule: str) -> Op:
    eip_text, port_text, protocol_text, backends_text = _fields(rule, 4, 4, "EIP,PORT,PROTOCOL,IP1:PORT1@IP2:PORT2...")
    eip, protocol = _address(eip_text, "EIP"), _protocol(protocol_text)
    port = _port(port_text, "external port")
    if "-" in port:
        raise ShimError(f"natgwd: a share DNAT takes a single port, not {port_text!r}")
    backends: set[tuple[str, str]] = set()
    for backend in filter(None, (b.strip() for b in backends_text.split("@"))):
        ip_text, sep, backend_port = backend.rpartition(":")
        if not sep:
            raise ShimError(f"natgwd: backend {backend!r} is not IP:PORT")
        backend_port = _port(backend_port, "backend port")
        if "-" in backend_port:
            raise ShimError(f"natgwd: backend {backend!r}: a share DNAT takes single ports")
        backends.add((str(_address(ip_text, "backend")), backend_port))
    if not backends:
        raise ShimError(f"natgwd: bad rule {rule!r}: no backends")
    ordered = sorted(backends, key=lambda b: (IPv4Address(b[0]), int(b[1])))

    def op(doc: Doc, ctx: Context) -> None:
        name = _need_eip(doc, eip, ctx)
        group = [d for d in _items(doc, "dnat") if _identity_matches(d, name, protocol, port)]
        members = {id(d) for d in group}
        for dnat in group:
            if dnat.get("type") != "share":
                raise ShimError(
                    f"natgwd: {protocol}/{port} on {eip} is taken by exclusive DNAT {dnat.get('name')} "
                    f"(to {dnat.get('internalIp')}:{dnat.get('internalPort')}); delete it first"
                )
        present: set[tuple[str, str]] = set()
        kept: list[dict[str, Any]] = []
        for dnat in _items(doc, "dnat"):
            backend = (str(dnat.get("internalIp")), _norm_port(dnat.get("internalPort")))
            if id(dnat) in members:
                if backend not in backends or backend in present:
                    continue  # a backend that is no longer wanted, or a duplicate of one
                present.add(backend)
            kept.append(dnat)
        doc["dnat"] = kept
        for ip, backend_port in ordered:
            if (ip, backend_port) in present:
                continue
            base = f"dnat-{_dashed(eip)}-{protocol}-{port}-{_dashed(ip)}-{backend_port}"
            entry = {
                "name": _unique(base, doc, "dnat"),
                "eip": name,
                "protocol": protocol,
                "externalPort": port,
                "internalIp": ip,
                "internalPort": backend_port,
                "type": "share",
            }
            _items(doc, "dnat").append(entry)

    return op


def parse_share_del(rule: str) -> Op:
    fields = _fields(rule, 3, 4, "EIP,PORT,PROTOCOL")
    eip, port, protocol = _address(fields[0], "EIP"), _port(fields[1], "external port"), _protocol(fields[2])

    def op(doc: Doc, ctx: Context) -> None:
        name = _eip_named(doc, eip)
        doc["dnat"] = [
            d for d in _items(doc, "dnat") if d.get("type") != "share" or not _identity_matches(d, name, protocol, port)
        ]

    return op


EDITS: dict[str, Callable[[str], Op]] = {
    "subnet-route-add": parse_route_add,
    "subnet-route-del": parse_route_del,
    "ext-subnet-route-add": parse_ext_route_add,
    "eip-add": parse_eip_add,
    "eip-del": parse_eip_del,
    "floating-ip-add": parse_fip_add,
    "floating-ip-del": parse_fip_del,
    "snat-add": parse_snat_add,
    "snat-del": parse_snat_del,
    "dnat-add": parse_dnat_add,
    "dnat-del": parse_dnat_del,
    "nft-dnat-map-add": parse_share_add,
    "nft-dnat-map-del": parse_share_del,
}


# --- init -----------------------------------------------------------------------------


@dataclass(frozen=True)
class InitArgs:
    interfaces: tuple[str, str] | None
    routes: tuple[str, ...] = ()  # v1.12: `init CIDR,NEXTHOP`, as subnet-route-add rules
    warnings: tuple[str, ...] = ()


def _is_address(text: str) -> bool:
    try:
        ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def parse_init(rules: Sequence[str]) -> InitArgs:
    """`init [vpcIf,extIf]`; spaces around the comma tolerated (also split into words).
    Controllers up to v1.12 send `init SERVICE_CIDR,GATEWAY` instead (routes via the VPC
    gateway, interfaces eth0 and net1); dual-stack ones send both families' CIDRs and
    gateways in one comma-separated list."""
    names = [n.strip() for n in ",".join(rules).split(",") if n.strip()]
    if not names:
        return InitArgs(None)
    if any(_is_address(name) for name in names):
        v4 = [n for n in names if ":" not in n]
        cidrs, gateways = [n for n in v4 if "/" in n], [n for n in v4 if "/" not in n]
        if not cidrs or len(gateways) != 1 or len(v4) != len(cidrs) + 1:
            raise ShimError(f"Error: init {','.join(names)}: expected vpcIf,extIf or (v1.12) CIDR,NEXTHOP")
        ignored = tuple(f"init: {n} ignored (natgwd is IPv4-only)" for n in names if ":" in n)
        return InitArgs(None, tuple(f"{cidr},{gateways[0]}" for cidr in cidrs), ignored)
    if len(names) > 2:
        raise ShimError(
            f"Error: init {','.join(names)}: natgwd manages one external interface; a gateway with several "
            "externalSubnets (one external interface each) is not supported"
        )
    if len(names) != 2:
        raise ShimError("Error: Expected two interfaces separated by a comma (e.g., net1,net2)")
    return InitArgs((names[0], names[1]))


def skeleton(vpc: str, ext: str, links: Links, gateway_v4: str | None, ctx: Context) -> Doc:
    """A first desired state: the interfaces with what the CNI configured on them."""
    internal_addresses = links.addresses(vpc)
    external_addresses = links.addresses(ext)
    external_networks = [a.network for a in external_addresses]
    routes: list[dict[str, str]] = []
    for dst, via in links.routes(vpc):
        if dst == DEFAULT_ROUTE or any(dst.subnet_of(n) for n in external_networks):
            continue
        if any(via in a.network for a in internal_addresses) and not any(
            dst.subnet_of(a.network) for a in internal_addresses
        ):
            routes.append({"dst": str(dst), "via": str(via)})
    if not internal_addresses:
        ctx.warnings.append(f"{vpc} has no IPv4 address: DNAT and FIP targets need one in the state")
    doc: Doc = {
        "version": 1,
        "internal": {"interface": vpc, "addresses": [str(a) for a in internal_addresses]},
        "external": {"interface": ext, "addresses": [str(a) for a in external_addresses]},
    }
    if routes:
        doc["internal"]["routes"] = routes
    gateway = gateway_v4 or next((str(via) for dst, via in links.routes(ext) if dst == DEFAULT_ROUTE), None)
    if gateway:
        doc["external"]["gateway"] = str(_address(gateway, "GATEWAY_V4"))
    return doc


def _take_over_kernel_rules(doc: Doc, links: Links, ctx: Context) -> None:
    """No state file, but natgwd's table may be in the kernel: after a container restart in
    the same network namespace it still translates every connection. Start from its rules
    (natgwd.kubeovn.kernelrules), so that applying this state changes nothing, as the script's
    `init` changes nothing where its iptables chains exist; the controller's replay then
    finds every rule in place."""
    try:
        rules = links.nat_rules()
    except (OSError, ValueError, KeyError) as err:
        ctx.warnings.append(f"cannot read natgwd's table in the kernel, starting without its rules: {err}")
        return
    if not rules:
        return
    candidate = {**doc, **rules}
    try:
        load_state(render(candidate, 1))
    except InvalidStateError as err:
        problems = "; ".join(str(p) for p in err.problems)
        ctx.warnings.append(f"natgwd's rules in the kernel do not fit this gateway, not taken over: {problems}")
        return
    doc.update(rules)
    counts = ", ".join(f"{len(rules[s])} {s}" for s in ("eips", *RULE_KINDS) if rules.get(s))
    ctx.warnings.append(f"no state file: took over natgwd's rules from the kernel ({counts})")


def init_op(rules: Sequence[str], links: Links) -> Callable[[Doc | None, Context], Doc]:
    args = parse_init(rules)
    names = args.interfaces

    def op(doc: Doc | None, ctx: Context) -> Doc:
        ctx.warnings.extend(args.warnings)
        if doc is None:
            vpc, ext = names or (DEFAULT_VPC_INTERFACE, DEFAULT_EXTERNAL_INTERFACE)
        else:
            vpc = names[0] if names else str((doc.get("internal") or {}).get("interface"))
            ext = names[1] if names else str((doc.get("external") or {}).get("interface"))
        for side, name in (("VPC", vpc), ("External", ext)):
            if not links.exists(name):
                raise ShimError(f"Error: {side} interface '{name}' not found")
        if doc is None:
            doc = skeleton(vpc, ext, links, ctx.gateway_v4, ctx)
            _take_over_kernel_rules(doc, links, ctx)
        for section, name in (("internal", vpc), ("external", ext)):
            part = doc.setdefault(section, {})
            if part.get("interface") != name:
                ctx.warnings.append(f"{section} interface changed from {part.get('interface')} to {name}")
                part["interface"] = name
        for route in args.routes:
            parse_route_add(route)(doc, ctx)
        return doc

    return op


# --- the state file: lock, stamp, journal, atomic write --------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stamp(generation: int) -> bytes:
    return format(generation, "b").replace("0", " ").replace("1", "\t").encode() + b"\n"


def generation_of(raw: bytes) -> int | None:
    """The generation stamp the shim puts after the JSON document; None when absent."""
    tail = raw[raw.rfind(b"}") + 1 :]
    if not tail.startswith(b"\n") or not tail.endswith(b"\n"):
        return None
    bits = tail[1:-1]
    if not bits or bits.strip(b" \t") or not bits.startswith(b"\t"):
        return None
    return int(bits.replace(b" ", b"0").replace(b"\t", b"1"), 2)


def _compact(doc: Doc) -> Doc:
    """The document without empty optional lists (the shim never writes them)."""
    result = {k: v for k, v in doc.items() if not (k in ("eips", "qosPolicies", *RULE_KINDS) and v == [])}
    internal = result.get("internal")
    if isinstance(internal, dict) and internal.get("routes") == []:
        result["internal"] = {k: v for k, v in internal.items() if k != "routes"}
    return result


def render(doc: Doc, generation: int) -> bytes:
    return json.dumps(_compact(doc), indent=2).encode() + b"\n" + _stamp(generation)


@contextlib.contextmanager
def locked(path: Path, deadline: float) -> Iterator[None]:
    """An exclusive flock on `path` (never renamed or deleted, so every caller locks the
    same inode), polled until `deadline`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ShimError(f"natgwd: could not lock {path} in time (another call holds it)") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_journal(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return []
    entries = []
    for line in text.splitlines():
        generation, _, digest = line.partition(" ")
        if generation.isdigit() and re.fullmatch(r"[0-9a-f]{64}", digest):
            entries.append((int(generation), digest))
    return entries


def _journal_append(path: Path, generation: int, digest: str) -> None:
    with open(path, "ab") as file:
        file.write(f"{generation} {digest}\n".encode())
    if path.stat().st_size > JOURNAL_MAX_BYTES:
        recent = read_journal(path)[-JOURNAL_KEEP:]
        write_atomically(path, "".join(f"{g} {d}\n" for g, d in recent).encode())


def _validate(data: bytes) -> None:
    try:
        load_state(data)
    except InvalidStateError as err:
        problems = "; ".join(str(p) for p in err.problems)
        raise ShimError(f"natgwd: refused, the desired state would be invalid: {problems}") from None


@dataclass(frozen=True)
class Written:
    digest: str  # sha256 of the state file's content after this call
    generation: int
    changed: bool


def transact(config: Config, edit: Callable[[Doc | None, Context], Doc], ctx: Context, deadline: float) -> Written:
    """Apply one edit to the state file under the lock; validate; write atomically."""
    with locked(config.lock, deadline):
        try:
            raw: bytes | None = config.state.read_bytes()
        except FileNotFoundError:
            raw = None
        except OSError as err:
            raise ShimError(f"natgwd: cannot read {config.state}: {err.strerror}") from None
        doc: Doc | None = None
        if raw is not None:
            try:
                loaded = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ShimError(f"natgwd: {config.state} is not valid JSON: {err}") from None
            if not isinstance(loaded, dict):
                raise ShimError(f"natgwd: {config.state} is not a desired-state document")
            doc = loaded
        journal = read_journal(config.journal)
        last = max((g for g, _ in journal), default=0)
        stamp = generation_of(raw) if raw is not None else None
        before = None if doc is None else json.dumps(_compact(doc), sort_keys=True)
        after = edit(json.loads(json.dumps(doc)) if doc is not None else None, ctx)
        if raw is not None and json.dumps(_compact(after), sort_keys=True) == before:
            _validate(raw)
            return Written(sha256(raw), stamp if stamp is not None else last, changed=False)
        generation = max(last, stamp or 0) + 1
        data = render(after, generation)
        _validate(data)
        digest = sha256(data)
        try:
            _journal_append(config.journal, generation, digest)
            write_atomically(config.state, data)
        except OSError as err:
            raise ShimError(f"natgwd: cannot write {config.state}: {err}") from None
        return Written(digest, generation, changed=True)


# --- waiting for natgwd -----------------------------------------------------------------


def boot_time() -> float | None:
    """When this machine booted (seconds since the epoch), from /proc/stat."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def applied_digest(path: Path, not_before: float | None = None) -> str | None:
    """The sha256 natgwd's record names; None when there is no readable record, or when it
    was written before `not_before` (the boot: a record kept on disk across a node reboot
    speaks of a network namespace that no longer exists)."""
    head = applied.read_head(path)
    if head is None or (not_before is not None and head.applied_at.timestamp() < not_before):
        return None
    return head.sha256


def _file_digest(path: Path) -> str | None:
    try:
        return sha256(path.read_bytes())
    except OSError:
        return None


def wait_applied(config: Config, written: Written, deadline: float) -> bool:
    """Until `deadline`: True once natgwd's record names this content or a later one
    (journaled with a higher generation, or the file's current content)."""
    known_older: set[str] = set()
    booted = boot_time()
    delay = 0.005
    while True:
        applied = applied_digest(config.applied, booted)
        if applied is not None:
            if applied == written.digest:
                return True
            if applied not in known_older:
                # A content natgwd read was journaled before it was written: the lookup
                # cannot miss it, and "not later" stays true for this digest.
                if any(g > written.generation and d == applied for g, d in read_journal(config.journal)):
                    return True
                known_older.add(applied)
            if applied == _file_digest(config.state):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


# --- the command ------------------------------------------------------------------------


def run(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    links: Links | None = None,
) -> int:
    """One nat-gateway.sh call; returns its exit code."""
    env = os.environ if env is None else env
    out, err = stdout or sys.stdout, stderr or sys.stderr
    if not argv:
        print(USAGE, file=out)
        return 1
    command = argv[0]
    rules = [word for arg in argv[1:] for word in arg.split()]  # the script's word splitting
    if command in ("help", "-h", "--help"):
        print(USAGE, file=out)
        return 0
    if command == "get-iptables-version":
        print(f"{command} {' '.join(rules)}", file=out)
        print(IPTABLES_VERSION, file=out)
        return 0
    from natgwd.kubeovn.shim_qos import QOS_EDITS  # here: it imports this module's helpers

    edits = {**EDITS, **QOS_EDITS}
    if command != "init" and command not in edits:
        print(USAGE, file=out)
        return 1
    print(f"{command} {' '.join(rules)}", file=out)
    try:
        config = Config.from_env(env)
        started = time.monotonic()
        deadline = started + (config.timeout if config.timeout > 0 else DEFAULT_TIMEOUT)
        ctx = Context(config.gateway_v4)
        if command == "init":
            edit = init_op(rules, links or KernelLinks())
        else:
            if not rules:
                raise ShimError(f"natgwd: {command} needs a rule (see `help`)")
            ops = [edits[command](rule) for rule in rules]

            def edit(doc: Doc | None, ctx: Context) -> Doc:
                if doc is None:
                    raise ShimError("nat gateway not initialized")
                for op in ops:
                    op(doc, ctx)
                return doc

        written = transact(config, edit, ctx, deadline)
        for warning in ctx.warnings:
            print(f"Warning: natgwd: {warning}", file=err)
        if config.timeout > 0 and not wait_applied(config, written, started + config.timeout):
            raise ShimError(
                f"natgwd: not applied within {config.timeout:g}s (generation {written.generation}, "
                f"sha256 {written.digest[:12]}; is natgwd running with --applied-state {config.applied}?)"
            )
        if ctx.route_dels:
            delete_leftover_routes(ctx, links or KernelLinks())
        what = "applied" if written.changed else "nothing to change"
        print(f"natgwd: {what} (generation {written.generation}, sha256 {written.digest[:12]})", file=out)
    except ShimError as error:
        print(str(error), file=err)
        return error.code
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    # Run as natgwd.kubeovn.shim, not as __main__: natgwd.kubeovn.shim_qos raises natgwd.kubeovn.shim's ShimError.
    from natgwd.kubeovn.shim import main as shim_main

    raise SystemExit(shim_main())
