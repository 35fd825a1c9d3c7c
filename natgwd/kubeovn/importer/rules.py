"""The gateway's EIPs and its SNAT, DNAT and FIP rules, as Kube-OVN would have admitted them."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

from natgwd.kubeovn.importer.objects import (
    Inventory,
    Obj,
    creation_order,
    is_deleting,
    name_of,
    section_of,
    state_name,
    text_of,
    v4_address,
    v4_network,
    v6_address,
    v6_network,
)
from natgwd.state.model import PortRange
from natgwd.state.ports import NOT_A_PORT, kube_ovn_port_range


@dataclass
class Rule:
    """A rule bound for the state, with the object it came from (for reports)."""

    section: str
    entry: dict[str, Any]
    source: Obj
    kind: str


class Rules:
    """Reads the gateway's EIPs, then the rules that name them."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self.report = inventory.report
        # EIP object names of other gateways (-> their gateway), and of this one's skipped.
        self.other_eips: dict[str, str] = {}
        self.skipped_eips: set[str] = set()

    def eips(self, gw_name: str, external_subnet: str) -> tuple[list[Rule], dict[str, str]]:
        """The gateway's EIPs; and {EIP object name: state name} for the rules."""
        chosen: list[Rule] = []
        names: dict[str, str] = {}
        by_address: dict[IPv4Address | IPv6Address, str] = {}
        for eip in sorted(self.inventory.of_kind("IptablesEIP"), key=creation_order):
            name, spec, status = name_of(eip), section_of(eip, "spec"), section_of(eip, "status")
            owner = text_of(spec.get("natGwDp"))
            if owner != gw_name:
                self.other_eips[name] = owner
                self.report("note", eip, f"EIP of gateway {owner or '(none)'}, not {gw_name}")
                continue
            self.inventory.use(eip)
            self.skipped_eips.add(name)
            if is_deleting(eip):
                self.report("warning", eip, "being deleted; skipped")
                continue
            text, text6 = text_of(spec.get("v4ip")) or text_of(status.get("ip")), text_of(spec.get("v6ip"))
            if not text and not text6:
                self.report("warning", eip, "has no address yet; skipped")
                continue
            address = v4_address(text) if text else None
            address6 = v6_address(text6) if text6 else None
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
            subnet = text_of(spec.get("externalSubnet"))
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
            chosen.append(Rule("eips", entry, eip, "IptablesEIP"))
        return chosen, names

    def rule_eip(self, rule: Obj, eip_names: dict[str, str]) -> str | None:
        eip = text_of(section_of(rule, "spec").get("eip"))
        if eip in eip_names:
            self.inventory.use(rule)
            if is_deleting(rule):
                self.report("warning", rule, "being deleted; skipped")
                return None
            return eip_names[eip]
        if eip in self.other_eips:
            self.report("note", rule, f"uses EIP {eip} of gateway {self.other_eips[eip] or '(none)'}")
        elif eip in self.skipped_eips:
            self.inventory.use(rule)
            self.report("warning", rule, f"its EIP {eip} was skipped; skipped too")
        else:
            self.report("warning", rule, f"names EIP {eip or '(none)'}, which is not in the input; skipped")
        return None

    def rules(self, eip_names: dict[str, str]) -> list[Rule]:
        rules: list[Rule] = []
        for kind, section, build in (
            ("IptablesSnatRule", "snat", self.snat),
            ("IptablesDnatRule", "dnat", self.dnat),
            ("IptablesFIPRule", "fip", self.fip),
        ):
            for obj in sorted(self.inventory.of_kind(kind), key=creation_order):
                eip = self.rule_eip(obj, eip_names)
                if eip is None:
                    continue
                entry = build(obj, eip)
                if entry is not None:
                    entry = {"name": self.rule_name(obj), "eip": eip, **entry}
                    rules.append(Rule(section, entry, obj, kind))
        return self.kube_ovn_conflicts(rules)

    def rule_name(self, obj: Obj) -> str:
        own = state_name(name_of(obj))
        if own != name_of(obj):
            self.report("note", obj, f"named {own} in the state (natgwd names are DNS-1123 labels)")
        return own

    def internal_ip(self, obj: Obj, text: str) -> str | None:
        address = v6_address(text) if ":" in text else v4_address(text)
        if address is None or "/" in text:
            self.report("warning", obj, f"internalIp {text!r} is not an IPv4 or IPv6 address; skipped")
            return None
        return str(address)

    def snat(self, obj: Obj, _eip: str) -> dict[str, Any] | None:
        text = text_of(section_of(obj, "spec").get("internalCIDR"))
        cidr: IPv4Network | IPv6Network | None
        if ":" in text:
            cidr = v6_network(text if "/" in text else f"{text}/128")
        else:
            cidr = v4_network(text if "/" in text else f"{text}/32", strict=False)
        if cidr is None:
            self.report("warning", obj, f"internalCIDR {text!r} is not an IPv4 or IPv6 CIDR; skipped")
            return None
        if "/" in text and str(cidr) != text:
            self.report("warning", obj, f"internalCIDR {text} has host bits set; imported as {cidr}")
        return {"internalCIDR": str(cidr)}

    def dnat(self, obj: Obj, _eip: str) -> dict[str, Any] | None:
        spec = section_of(obj, "spec")
        protocol = text_of(spec.get("protocol")).lower()
        if protocol not in ("tcp", "udp"):
            self.report("warning", obj, f"protocol {protocol or '(none)'} is not tcp or udp; skipped")
            return None
        ports: list[PortRange] = []
        for key in ("externalPort", "internalPort"):
            port = kube_ovn_port_range(text_of(spec.get(key)))
            if isinstance(port, str):
                why = "is not a port or range" if port == NOT_A_PORT else f"is refused: {port}"
                self.report("warning", obj, f"{key} {spec.get(key)!r} {why}; skipped")
                return None
            ports.append(port)
        internal_ip = self.internal_ip(obj, text_of(spec.get("internalIp")))
        if internal_ip is None:
            return None
        kind = text_of(spec.get("type")) or "exclusive"
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
        internal_ip = self.internal_ip(obj, text_of(section_of(obj, "spec").get("internalIp")))
        return None if internal_ip is None else {"internalIp": internal_ip}

    def kube_ovn_conflicts(self, rules: list[Rule]) -> list[Rule]:
        """Apply Kube-OVN's admission rules in creation order: the later of two conflicting
        rules is the one that never became Ready there, so it is the one left out here."""
        kept: list[Rule] = []
        snat_cidrs: dict[str, str] = {}
        dnat_identity: dict[tuple[str, str, str], tuple[str, str]] = {}
        # By EIP and family: a dual-stack EIP carries one FIP (or DNATs) per family.
        fip_eips: dict[tuple[str, int], str] = {}
        dnat_eips: dict[tuple[str, int], str] = {}
        ordered = sorted(rules, key=lambda r: creation_order(r.source))
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
