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

from ipaddress import IPv4Address
from typing import Any

from natgwd.kubeovn.naming import dnat_name, eip_name, fip_name, share_name, snat_name
from natgwd.planning.layout import EIPS, V4
from natgwd.planning.plan import TableRule, address_text, decode_rules
from natgwd.planning.table import FAMILY, TABLE, TableContents
from natgwd.state.model import RULE_KINDS, FipRule, RuleKind, SnatRule

Doc = dict[str, Any]


def _drop_in_item(found: TableRule) -> tuple[RuleKind, Doc]:
    """A rule of the table as a desired-state item, named by its labels, else as the
    drop-in would name it."""
    rule, named = found.rule, found.labels is not None
    if isinstance(rule, FipRule):
        name = rule.name if named else fip_name(rule.eip)
        return "fip", {"name": name, "eip": rule.eip, "internalIp": address_text(rule.internal_ip)}
    if isinstance(rule, SnatRule):
        cidr = f"{address_text(rule.internal_cidr.network_address)}/{rule.internal_cidr.prefixlen}"
        name = rule.name if named else snat_name(rule.eip, cidr)
        item: Doc = {"name": name, "eip": rule.eip, "internalCIDR": cidr}
        if rule.destinations:
            item["destinations"] = [str(d) for d in rule.destinations]
        if rule.port_block is not None:
            item["portBlock"] = {"size": rule.port_block.size, "firstPort": rule.port_block.first_port}
        return "snat", item
    internal_ip, port = address_text(rule.internal_ip), rule.external_port.first
    if rule.type == "share":
        fallback = share_name(rule.eip, rule.protocol, port, internal_ip, rule.internal_port)
    else:
        fallback = dnat_name(rule.eip, rule.protocol, port)
    item = {
        "name": rule.name if named else fallback,
        "eip": rule.eip,
        "protocol": rule.protocol,
        "externalPort": str(rule.external_port),
        "internalIp": internal_ip,
        "internalPort": str(rule.internal_port),
    }
    if rule.type == "share":
        item["type"] = "share"
    return "dnat", item


def _order(found: TableRule) -> tuple[Any, ...]:
    # The order the rules were listed in before they were decoded by planning: FIPs by
    # EIP, SNAT rules by map name then network (as text).
    rule = found.rule
    if isinstance(rule, SnatRule):
        return (V4.snat_target(rule.internal_cidr.prefixlen), address_text(rule.internal_cidr.network_address))
    return (rule.eip,) if isinstance(rule, FipRule) else ()


def rules_from_table(contents: TableContents) -> Doc:
    """The `eips`, `snat`, `dnat` and `fip` sections the table implements: its IPv4 rules
    (the drop-in's, as Kube-OVN's script, are IPv4)."""
    doc: Doc = {"eips": [], "snat": [], "dnat": [], "fip": []}
    for found in sorted((r for r in decode_rules(contents) if r.rule.family == 4), key=_order):
        kind, item = _drop_in_item(found)
        doc[kind].append(item)
    # Rules name their EIP by address here; EIPs get the drop-in's names.
    addresses = set(contents.elements.get(V4.name(EIPS), {}))
    for section in RULE_KINDS:
        for rule in doc[section]:
            addresses.add(rule["eip"])
            rule["eip"] = eip_name(rule["eip"])
    doc["snat"] = _pools_joined(doc["snat"])
    doc["eips"] = [{"name": eip_name(a), "v4ip": a} for a in sorted(addresses, key=IPv4Address)]
    doc["dnat"].sort(key=lambda d: d["name"])
    return {section: items for section, items in doc.items() if items}


def _pools_joined(items: list[Doc]) -> list[Doc]:
    """A SNAT pool's members (one per EIP, natgwd.planning.pools) as the one rule they are."""
    joined: dict[str, Doc] = {}
    for item in items:
        first = joined.setdefault(item["name"], item)
        if first is not item:
            first["eips"] = [*first.pop("eips", [first.pop("eip")]), item["eip"]]
    return list(joined.values())


def read_kernel_rules() -> Doc | None:
    """The rules of natgwd's table in this network namespace; None when there is no table.
    OSError when it cannot be listed; ValueError or KeyError when it is not natgwd's layout."""
    from natgwd.kernel.nft import KernelNft, NftError  # libnftables: only where installed

    try:
        contents = KernelNft().read_table()
    except NftError as err:
        raise OSError(f"nft list table {FAMILY} {TABLE}: {err}") from err
    return rules_from_table(contents) if contents is not None else None
