"""The NAT rules natgwd's nftables table holds, as desired-state sections.

For the drop-in's `init` after a container restart in the same network namespace: the
container's files (the state file among them) are gone, natgwd's table is still in the
kernel and still translating. Starting the new state from an empty rule set would make
natgwd delete every rule until the controller's replay brings them back (an outage that
Kube-OVN's script does not have: its iptables rules simply stay). The table has all it
takes to rebuild the rules: the maps hold the translations, and each rule's
`rule_connections` element carries "kind/name/eip" as its comment, so the rebuilt rules
keep their names, hence their ids and counters, and natgwd's next transaction is empty.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from ipaddress import IPv4Address
from typing import Any

from natgwd.planning.layout import RULE_CONNECTIONS
from natgwd.planning.plan import RuleLabels
from natgwd.planning.table import FAMILY, TABLE, TableContents
from natgwd.state.model import RULE_KINDS

Doc = dict[str, Any]
_SNAT_TARGET = re.compile(r"snat_p([0-9]+)_target")


def dashed(text: object) -> str:
    """A text as a name part: lower case, runs of anything else than [0-9a-z] as one "-"."""
    return re.sub(r"[^0-9a-z]+", "-", str(text).lower()).strip("-")


def eip_name(address: str) -> str:
    """The name the drop-in gives the EIP with this address."""
    return f"eip-{dashed(address)}"


def share_members(objects: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Rule ids (marks) of each share chain, from `nft -j list table` output: the chain's
    first rule sets the ct mark from `numgen random mod N map { i : id, ... }`."""
    members: dict[str, list[str]] = {}
    for obj in objects:
        rule = obj.get("rule")
        if not isinstance(rule, dict) or not str(rule.get("chain", "")).startswith("share_"):
            continue
        for expr in rule.get("expr", ()):
            mapping = (expr.get("mangle") or {}).get("value", {}).get("map", {}) if isinstance(expr, dict) else {}
            pairs = (mapping.get("data") or {}).get("set") if isinstance(mapping, dict) else None
            if isinstance(pairs, list):
                members[str(rule["chain"])] = [str(mark) for _, mark in pairs]
    return members


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(" . ")]


def _port_range(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def rules_from_table(contents: TableContents, shares: Mapping[str, list[str]]) -> Doc:
    """The `eips`, `snat`, `dnat` and `fip` sections the table implements."""
    elements = contents.elements
    labels: dict[str, RuleLabels] = {}
    for mark, element in elements.get(RULE_CONNECTIONS, {}).items():
        found = RuleLabels.from_comment(element.comment or "")
        if found is not None:
            labels[mark] = found

    def name_of(mark: str | None, kind: str, fallback: str) -> str:
        found = labels.get(mark or "")
        return found.name if found is not None and found.kind == kind else fallback

    doc: Doc = {"eips": [], "snat": [], "dnat": [], "fip": []}
    fip_rule = elements.get("fip_in_rule", {})
    for eip, target in sorted(elements.get("fip_in_target", {}).items()):
        fip_mark = fip_rule[eip].value if eip in fip_rule else None
        name = name_of(fip_mark, "fip", f"fip-{dashed(eip)}")
        doc["fip"].append({"name": name, "eip": eip, "internalIp": target.value})

    ports: dict[str, list[tuple[str, str, int, str, int]]] = defaultdict(list)
    targets = elements.get("dnat_target", {})
    for key, marked in elements.get("dnat_rule", {}).items():
        eip, protocol, port = _split(key)
        internal_ip, internal_port = _split(targets[key].value if key in targets else None)
        ports[marked.value or ""].append((eip, protocol, int(port), internal_ip, int(internal_port)))
    for mark, entries in ports.items():
        # A port range is one element per port, all with the rule's id.
        entries.sort(key=lambda e: e[2])
        eip, protocol, first, internal_ip, internal_first = entries[0]
        last = entries[-1][2]
        doc["dnat"].append(
            {
                "name": name_of(mark, "dnat", f"dnat-{dashed(eip)}-{protocol}-{first}"),
                "eip": eip,
                "protocol": protocol,
                "externalPort": _port_range(first, last),
                "internalIp": internal_ip,
                "internalPort": _port_range(internal_first, internal_first + last - first),
            }
        )
    share_targets = elements.get("share_target", {})
    for key, verdict in elements.get("dnat_share", {}).items():
        eip, protocol, port = _split(key)
        for mark in shares.get((verdict.value or "").split()[-1], []):
            internal_ip, internal_port = _split(share_targets[mark].value if mark in share_targets else None)
            fallback = f"dnat-{dashed(eip)}-{protocol}-{port}-{dashed(internal_ip)}-{internal_port}"
            doc["dnat"].append(
                {
                    "name": name_of(mark, "dnat", fallback),
                    "eip": eip,
                    "protocol": protocol,
                    "externalPort": port,
                    "internalIp": internal_ip,
                    "internalPort": internal_port,
                    "type": "share",
                }
            )

    for set_name, mapped in sorted(elements.items()):
        match = _SNAT_TARGET.fullmatch(set_name)
        if match is None:
            continue
        snat_rule = elements.get(f"snat_p{match[1]}_rule", {})
        for network, translated in sorted(mapped.items()):
            cidr = f"{network}/{match[1]}"
            snat_mark = snat_rule[network].value if network in snat_rule else None
            name = name_of(snat_mark, "snat", f"snat-{dashed(translated.value)}-{dashed(cidr)}")
            doc["snat"].append({"name": name, "eip": translated.value, "internalCIDR": cidr})

    # Rules name their EIP by address here; EIPs get the drop-in's names.
    addresses = set(elements.get("eips", {}))
    for section in RULE_KINDS:
        for rule in doc[section]:
            addresses.add(rule["eip"])
            rule["eip"] = eip_name(rule["eip"])
    doc["eips"] = [{"name": eip_name(a), "v4ip": a} for a in sorted(addresses, key=IPv4Address)]
    doc["dnat"].sort(key=lambda d: d["name"])
    return {section: items for section, items in doc.items() if items}


def read_kernel_rules() -> Doc | None:
    """The rules of natgwd's table in this network namespace; None when there is no table.
    OSError when it cannot be listed; ValueError or KeyError when it is not natgwd's layout."""
    from natgwd.kernel.nft import KernelNft, NftError, parse_table  # libnftables: only where installed

    try:
        objects = KernelNft().list_table()
    except NftError as err:
        raise OSError(f"nft list table {FAMILY} {TABLE}: {err}") from err
    if objects is None:
        return None
    return rules_from_table(parse_table(objects), share_members(objects))
