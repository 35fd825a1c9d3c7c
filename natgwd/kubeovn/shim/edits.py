"""The document edits of Kube-OVN's nat-gateway.sh subcommands, with the script's
semantics: one parser per subcommand turns a rule into an edit of the desired-state
document (a dict as the state file holds it). The same rule again is a no-op; the same
identity with another target is refused (exit 1); deleting what is not there is fine.

Edits never change a rule of the snat, dnat and fip lists, nor an EIP, in place (they
filter the lists and append new items; an edit of an EIP's fields replaces it by a copy,
`own_eip`), and change those lists only by appending to them (or replace them by new
lists): `working_copy` relies on it to copy a 12,000-rule document with 1,000 EIPs in well
under a millisecond, `natgwd.kubeovn.shim.lookup` to index a copy's list by what was
appended to it, and `natgwd.kubeovn.shim.editlog` and natgwd's change tracker to find what
an edit removed and added by identity.
"""

from __future__ import annotations

import contextlib
import json
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from natgwd.kubeovn.naming import dnat_name, eip_name, fip_name, share_name, snat_name
from natgwd.kubeovn.shim import grammar
from natgwd.kubeovn.shim.grammar import ShimError
from natgwd.kubeovn.shim.lookup import Lookup
from natgwd.state.model import RULE_KINDS

Doc = dict[str, Any]
OPTIONAL_LISTS = ("eips", "qosPolicies", *RULE_KINDS)


@dataclass
class Context:
    gateway_v4: str | None
    warnings: list[str] = field(default_factory=list)
    # subnet-route-del: each destination, and whether the state had a route to it.
    route_dels: list[tuple[IPv4Network, bool]] = field(default_factory=list)
    internal_interface: str | None = None
    lookup: Lookup = field(default_factory=Lookup)


Op = Callable[[Doc, Context], None]


def section_items(doc: Doc, section: str) -> list[dict[str, Any]]:
    items = doc.get(section)
    if not isinstance(items, list):
        items = []
        doc[section] = items
    return items


_NAME_OF = operator.methodcaller("get", "name")
# The key each shared list is looked up by (natgwd.kubeovn.shim.lookup).
_KEYS: dict[str, str] = {"eips": "v4ip", **dict.fromkeys(RULE_KINDS, "eip")}


def unique_name(name: str, doc: Doc, section: str, ctx: Context) -> str:
    items = section_items(doc, section)
    taken: Callable[[str], bool]
    if section in _KEYS:
        taken = ctx.lookup.index(items, _KEYS[section]).taken
    else:  # a short list (the QoS policies): scanned
        taken = set(map(_NAME_OF, items)).__contains__
    candidate, suffix = name, 2
    while taken(candidate):
        candidate = f"{name[: 63 - len(str(suffix)) - 1]}-{suffix}"
        suffix += 1
    return candidate


def norm_port(value: object) -> str:
    return str(value).replace(":", "-")


def _norm_cidr(value: object) -> str:
    return _norm_cidr_text(value) if isinstance(value, str) else _norm_cidr_text(str(value))


@lru_cache(maxsize=1 << 14)
def _norm_cidr_text(text: str) -> str:
    # Asked for every SNAT rule's CIDR at each snat-add: each text is parsed once.
    try:
        return str(IPv4Network(text if "/" in text else f"{text}/32", strict=False))
    except ValueError:
        return text


def eip_named(doc: Doc, address: IPv4Address, ctx: Context) -> str | None:
    for eip in ctx.lookup.index(section_items(doc, "eips"), "v4ip").having(str(address)):
        return str(eip["name"])
    return None


def _eip_address(doc: Doc, name: str) -> str:
    for eip in section_items(doc, "eips"):
        if eip.get("name") == name:
            return str(eip.get("v4ip"))
    return name


def need_eip(doc: Doc, address: IPv4Address, ctx: Context) -> str:
    """The state's name of the EIP with this address; added when missing (the script does
    not need the address on the interface for a rule, and the controller may replay a rule
    before its EIP after a restart)."""
    name = eip_named(doc, address, ctx)
    if name is None:
        name = unique_name(eip_name(address), doc, "eips", ctx)
        section_items(doc, "eips").append({"name": name, "v4ip": str(address)})
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
    address = grammar.address(gateway, "GATEWAY_V4")
    external = doc.setdefault("external", {})
    if external.get("gateway") != str(address):
        if external.get("gateway"):
            ctx.warnings.append(f"external gateway changed from {external['gateway']} to {address} (GATEWAY_V4)")
        external["gateway"] = str(address)


# one parser per subcommand: rule text -> the edit it makes ---------------------------


def parse_route_add(rule: str) -> Op:
    warnings: list[str] = []
    cidr_text, via_text = grammar.fields(rule, 2, 2, "CIDR,NEXTHOP")
    dst, via = grammar.network(cidr_text, "route", warnings), grammar.address(via_text, "nexthop")

    def op(doc: Doc, ctx: Context) -> None:
        ctx.warnings.extend(warnings)
        for network in _external_networks(doc):
            if dst.subnet_of(network):
                ctx.warnings.append(
                    f"route {dst} via {via} ignored: it lies in the external subnet {network}, which the "
                    "external interface reaches directly"
                )
                return
        routes = section_items(doc.setdefault("internal", {}), "routes")
        for route in routes:
            if _norm_cidr(route.get("dst")) == str(dst):
                route["via"] = str(via)  # `ip route replace`
                return
        routes.append({"dst": str(dst), "via": str(via)})

    return op


def parse_route_del(rule: str) -> Op:
    warnings: list[str] = []
    dst = grammar.network(grammar.fields(rule, 1, 2, "CIDR")[0], "route", warnings)

    def op(doc: Doc, ctx: Context) -> None:
        ctx.warnings.extend(warnings)
        internal = doc.setdefault("internal", {})
        routes = section_items(internal, "routes")
        internal["routes"] = [r for r in routes if _norm_cidr(r.get("dst")) != str(dst)]
        ctx.route_dels.append((dst, len(internal["routes"]) != len(routes)))
        ctx.internal_interface = internal.get("interface")

    return op


def parse_ext_route_add(rule: str) -> Op:
    """v1.12's `ext-subnet-route-add EXTERNAL_CIDR,GATEWAY`: the default route via the
    external subnet's gateway (the external subnet itself is on-link)."""
    warnings: list[str] = []
    cidr_text, via_text = grammar.fields(rule, 2, 2, "EXTERNAL_CIDR,GATEWAY")
    grammar.network(cidr_text, "external subnet", warnings)
    via = grammar.address(via_text, "gateway")

    def op(doc: Doc, ctx: Context) -> None:
        ctx.warnings.extend(warnings)
        _set_gateway(doc, str(via), ctx)

    return op


def parse_eip_add(rule: str) -> Op:
    fields = grammar.fields(rule, 1, 2, "IP/PREFIX")
    address = grammar.address(fields[0], "EIP")
    prefix = fields[0].partition("/")[2]
    if prefix and not (prefix.isdigit() and int(prefix) <= 32):
        raise ShimError(f"natgwd: EIP {fields[0]!r} has an invalid prefix length")
    legacy_gateway = fields[1] if len(fields) == 2 else None  # v1.12: eip/prefix,gateway

    def op(doc: Doc, ctx: Context) -> None:
        if eip_named(doc, address, ctx) is None:
            section_items(doc, "eips").append(
                {"name": unique_name(eip_name(address), doc, "eips", ctx), "v4ip": str(address)}
            )
        if prefix:
            networks = [n for n in _external_networks(doc) if address in n]
            used = networks[0].prefixlen if networks else 32
            if int(prefix) != used:
                where = f"the external subnet {networks[0]}'s" if networks else "no external subnet contains it: the"
                ctx.warnings.append(f"EIP {address} gets {where} prefix /{used}, not /{prefix}")
        _set_gateway(doc, ctx.gateway_v4 or legacy_gateway, ctx)

    return op


def parse_eip_del(rule: str) -> Op:
    address = grammar.address(grammar.fields(rule, 1, 2, "IP[/PREFIX]")[0], "EIP")

    def op(doc: Doc, ctx: Context) -> None:
        name = eip_named(doc, address, ctx)
        if name is None:
            return
        doc["eips"] = [e for e in section_items(doc, "eips") if e.get("name") != name]
        for section in RULE_KINDS:
            kept = [r for r in section_items(doc, section) if r.get("eip") != name]
            gone = [str(r.get("name")) for r in section_items(doc, section) if r.get("eip") == name]
            if gone:
                ctx.warnings.append(f"EIP {address} was still used by {section} {', '.join(gone)}; removed them too")
            doc[section] = kept

    return op


def parse_fip_add(rule: str) -> Op:
    eip_text, ip_text = grammar.fields(rule, 2, 2, "EIP,INTERNAL_IP")
    eip, internal_ip = grammar.address(eip_text, "EIP"), grammar.address(ip_text, "internal IP")

    def op(doc: Doc, ctx: Context) -> None:
        name = need_eip(doc, eip, ctx)
        for fip in on_eip(doc, "fip", name, ctx):
            if fip.get("eip") == name:
                if fip.get("internalIp") == str(internal_ip):
                    return
                raise ShimError(
                    f"natgwd: floating IP {eip} already maps to {fip.get('internalIp')} (rule {fip.get('name')}); "
                    "delete it first"
                )
        fips = section_items(doc, "fip")
        fips.append({"name": unique_name(fip_name(eip), doc, "fip", ctx), "eip": name, "internalIp": str(internal_ip)})

    return op


def parse_fip_del(rule: str) -> Op:
    eip = grammar.address(grammar.fields(rule, 1, 2, "EIP[,INTERNAL_IP]")[0], "EIP")

    def op(doc: Doc, ctx: Context) -> None:
        name = eip_named(doc, eip, ctx)
        doc["fip"] = [f for f in section_items(doc, "fip") if name is None or f.get("eip") != name]

    return op


def parse_snat_add(rule: str) -> Op:
    fields = grammar.fields(rule, 2, 3, "EIP,INTERNAL_CIDR[,--random-fully]")
    if len(fields) == 3 and fields[2] != "--random-fully":
        raise ShimError(f"natgwd: bad rule {rule!r}: the third field can only be --random-fully")
    warnings: list[str] = []
    eip, cidr = grammar.address(fields[0], "EIP"), grammar.network(fields[1], "internal CIDR", warnings)

    def op(doc: Doc, ctx: Context) -> None:
        ctx.warnings.extend(warnings)
        name = need_eip(doc, eip, ctx)
        for snat in section_items(doc, "snat"):
            if _norm_cidr(snat.get("internalCIDR")) == str(cidr):
                if snat.get("eip") == name:
                    return
                raise ShimError(
                    f"natgwd: {cidr} is already translated to {_eip_address(doc, str(snat.get('eip')))} "
                    f"(rule {snat.get('name')}); natgwd gives a CIDR one EIP: delete that SNAT first"
                )
        snats = section_items(doc, "snat")
        snats.append(
            {
                "name": unique_name(snat_name(eip, cidr), doc, "snat", ctx),
                "eip": name,
                "internalCIDR": str(cidr),
            }
        )

    return op


def parse_snat_del(rule: str) -> Op:
    fields = grammar.fields(rule, 2, 3, "EIP,INTERNAL_CIDR")
    warnings: list[str] = []
    eip, cidr = grammar.address(fields[0], "EIP"), grammar.network(fields[1], "internal CIDR", warnings)

    def op(doc: Doc, ctx: Context) -> None:
        ctx.warnings.extend(warnings)
        name = eip_named(doc, eip, ctx)
        doc["snat"] = [
            s
            for s in section_items(doc, "snat")
            if not (s.get("eip") == name and _norm_cidr(s.get("internalCIDR")) == str(cidr))
        ]

    return op


def identity_matches(rule: dict[str, Any], name: str | None, protocol: str, port: str) -> bool:
    return rule.get("eip") == name and rule.get("protocol") == protocol and norm_port(rule.get("externalPort")) == port


def on_eip(doc: Doc, section: str, name: str, ctx: Context) -> Iterator[dict[str, Any]]:
    """The rules of `section` whose `eip` is `name`, in order."""
    return ctx.lookup.index(section_items(doc, section), "eip").having(name)


def parse_dnat_add(rule: str) -> Op:
    eip_text, port_text, protocol_text, ip_text, internal_port_text = grammar.fields(
        rule, 5, 5, "EIP,EXTERNAL_PORT,PROTOCOL,INTERNAL_IP,INTERNAL_PORT"
    )
    eip, port = grammar.address(eip_text, "EIP"), grammar.port(port_text, "external port")
    protocol, internal_ip = grammar.protocol(protocol_text), grammar.address(ip_text, "internal IP")
    internal_port = grammar.port(internal_port_text, "internal port")

    def op(doc: Doc, ctx: Context) -> None:
        name = need_eip(doc, eip, ctx)
        for dnat in on_eip(doc, "dnat", name, ctx):
            if not identity_matches(dnat, name, protocol, port):
                continue
            if dnat.get("type") == "share":
                raise ShimError(
                    f"natgwd: {protocol}/{port} on {eip} is a share DNAT group (rule {dnat.get('name')}); "
                    "an exclusive DNAT cannot take the same identity"
                )
            if dnat.get("internalIp") == str(internal_ip) and norm_port(dnat.get("internalPort")) == internal_port:
                return
            raise ShimError(
                f"natgwd: {protocol}/{port} on {eip} already goes to {dnat.get('internalIp')}:"
                f"{dnat.get('internalPort')} (rule {dnat.get('name')}); delete it first"
            )
        entry = {
            "name": unique_name(dnat_name(eip, protocol, port), doc, "dnat", ctx),
            "eip": name,
            "protocol": protocol,
            "externalPort": port,
            "internalIp": str(internal_ip),
            "internalPort": internal_port,
        }
        section_items(doc, "dnat").append(entry)

    return op


def parse_dnat_del(rule: str) -> Op:
    return _identity_del(rule, "EIP,EXTERNAL_PORT,PROTOCOL", most=5, share=False)


def parse_share_add(rule: str) -> Op:
    eip_text, port_text, protocol_text, backends_text = grammar.fields(
        rule, 4, 4, "EIP,PORT,PROTOCOL,IP1:PORT1@IP2:PORT2..."
    )
    eip, protocol = grammar.address(eip_text, "EIP"), grammar.protocol(protocol_text)
    port = grammar.port(port_text, "external port")
    if "-" in port:
        raise ShimError(f"natgwd: a share DNAT takes a single port, not {port_text!r}")
    backends: set[tuple[str, str]] = set()
    for backend in filter(None, (b.strip() for b in backends_text.split("@"))):
        ip_text, sep, backend_port = backend.rpartition(":")
        if not sep:
            raise ShimError(f"natgwd: backend {backend!r} is not IP:PORT")
        backend_port = grammar.port(backend_port, "backend port")
        if "-" in backend_port:
            raise ShimError(f"natgwd: backend {backend!r}: a share DNAT takes single ports")
        backends.add((str(grammar.address(ip_text, "backend")), backend_port))
    if not backends:
        raise ShimError(f"natgwd: bad rule {rule!r}: no backends")
    ordered = sorted(backends, key=lambda b: (IPv4Address(b[0]), int(b[1])))

    def op(doc: Doc, ctx: Context) -> None:
        name = need_eip(doc, eip, ctx)
        group = [d for d in section_items(doc, "dnat") if identity_matches(d, name, protocol, port)]
        members = {id(d) for d in group}
        for dnat in group:
            if dnat.get("type") != "share":
                raise ShimError(
                    f"natgwd: {protocol}/{port} on {eip} is taken by exclusive DNAT {dnat.get('name')} "
                    f"(to {dnat.get('internalIp')}:{dnat.get('internalPort')}); delete it first"
                )
        present: set[tuple[str, str]] = set()
        kept: list[dict[str, Any]] = []
        for dnat in section_items(doc, "dnat"):
            backend = (str(dnat.get("internalIp")), norm_port(dnat.get("internalPort")))
            if id(dnat) in members:
                if backend not in backends or backend in present:
                    continue  # a backend that is no longer wanted, or a duplicate of one
                present.add(backend)
            kept.append(dnat)
        doc["dnat"] = kept
        for ip, backend_port in ordered:
            if (ip, backend_port) in present:
                continue
            base = share_name(eip, protocol, port, ip, backend_port)
            entry = {
                "name": unique_name(base, doc, "dnat", ctx),
                "eip": name,
                "protocol": protocol,
                "externalPort": port,
                "internalIp": ip,
                "internalPort": backend_port,
                "type": "share",
            }
            section_items(doc, "dnat").append(entry)

    return op


def parse_share_del(rule: str) -> Op:
    return _identity_del(rule, "EIP,PORT,PROTOCOL", most=4, share=True)


def _identity_del(rule: str, form: str, most: int, share: bool) -> Op:
    """Delete the exclusive DNAT rule (or, `share`, every backend of the share group) of
    one (EIP, port, protocol); the other kind at that identity stays."""
    fields = grammar.fields(rule, 3, most, form)
    eip, port, protocol = (
        grammar.address(fields[0], "EIP"),
        grammar.port(fields[1], "external port"),
        grammar.protocol(fields[2]),
    )

    def op(doc: Doc, ctx: Context) -> None:
        name = eip_named(doc, eip, ctx)
        doc["dnat"] = [
            d
            for d in section_items(doc, "dnat")
            if (d.get("type") == "share") != share or not identity_matches(d, name, protocol, port)
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


def compact(doc: Doc) -> Doc:
    """The document without empty optional lists (edits create them while looking up)."""
    result = {k: v for k, v in doc.items() if not (k in OPTIONAL_LISTS and v == [])}
    internal = result.get("internal")
    if isinstance(internal, dict) and internal.get("routes") == []:
        result["internal"] = {k: v for k, v in internal.items() if k != "routes"}
    return result


SHARED_ITEMS = ("eips", *RULE_KINDS)  # lists whose items no edit changes in place


def working_copy(doc: Doc, lookup: Lookup) -> Doc:
    """A copy that an edit may change without touching `doc`: the lists of rules and EIPs
    are new lists of the same items (never changed in place: copied on write), indexed from
    the lists they copy; the rest is copied deeply."""
    copy = {}
    for key, value in doc.items():
        if key in SHARED_ITEMS and isinstance(value, list):
            copy[key] = list(value)
            lookup.copied(value, copy[key], _KEYS[key])
        else:
            copy[key] = json.loads(json.dumps(value))
    return copy


def shared_lists(doc: Doc) -> list[list[dict[str, Any]]]:
    """The document's lists that `working_copy` shares the items of."""
    return [value for key in SHARED_ITEMS if isinstance(value := doc.get(key), list)]


def own_eip(doc: Doc, name: str) -> dict[str, Any]:
    """The EIP `name` of a working copy, made the copy's own to change: replaced in its
    list by a copy (the item is shared with the document the copy was made from)."""
    eips = section_items(doc, "eips")
    index = next(i for i, eip in enumerate(eips) if eip.get("name") == name)
    eips[index] = dict(eips[index])
    return eips[index]
