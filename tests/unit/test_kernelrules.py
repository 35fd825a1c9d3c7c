"""natgwd.kubeovn.kernelrules: the rules natgwd's table holds, read back as desired-state sections
(the drop-in's `init` after a container restart starts from them). Round trip: a state,
planned into a table, read back, gives the same rules with the same names, so natgwd's
next transaction is empty."""

from __future__ import annotations

import json
from typing import Any

from natgwd.kubeovn.kernelrules import rules_from_table
from natgwd.kubeovn.shim.edits import EDITS, Context
from natgwd.lab.topology import SEED_STATE
from natgwd.planning.layout import RULE_CONNECTIONS, shards
from natgwd.planning.plan import assign_ids, desired_table
from natgwd.planning.table import Element
from natgwd.state.validation import load_state

EIP1, EIP2, EIP3 = "10.115.55.200", "10.115.55.201", "10.115.55.202"


def drop_in_state() -> dict[str, Any]:
    """The seed, with the names the drop-in gives EIPs, a port range, a share group, a /32 SNAT."""
    doc: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    doc["eips"] = [{"name": f"eip-{a.replace('.', '-')}", "v4ip": a} for a in (EIP1, EIP2, EIP3)]
    names = {"my-eip": "eip-10-115-55-200", "my-eip2": "eip-10-115-55-201"}
    for section in ("snat", "dnat", "fip"):
        for rule in doc[section]:
            rule["eip"] = names[rule["eip"]]
    doc["snat"].append({"name": "snat-host", "eip": "eip-10-115-55-202", "internalCIDR": "172.20.10.4/32"})
    doc["dnat"] += [
        {"name": "range", "eip": "eip-10-115-55-200", "protocol": "udp", "externalPort": "5000-5002"}
        | {"internalIp": "172.20.10.4", "internalPort": "6000-6002"},
        *(
            {"name": f"share-{i}", "eip": "eip-10-115-55-202", "protocol": "tcp", "externalPort": "80"}
            | {"internalIp": ip, "internalPort": "8080", "type": "share"}
            for i, ip in enumerate(("172.20.10.2", "172.20.10.4"))
        ),
    ]
    return doc


def test_the_rules_of_a_planned_table_come_back_with_their_names() -> None:
    doc = drop_in_state()
    state = load_state(json.dumps(doc).encode())
    table = desired_table(state, assign_ids(state, {}))
    rules = rules_from_table(table.contents())
    assert rules["eips"] == doc["eips"]
    for section in ("snat", "fip"):
        assert sorted(rules[section], key=lambda r: r["name"]) == sorted(doc[section], key=lambda r: r["name"])
    expected_dnat = [{"type": "exclusive", **d} if "type" not in d else d for d in doc["dnat"]]
    got_dnat = [{"type": "exclusive", **d} if "type" not in d else d for d in rules["dnat"]]
    assert sorted(got_dnat, key=lambda r: r["name"]) == sorted(expected_dnat, key=lambda r: r["name"])
    # The rebuilt state plans the very same table (same rule ids, so no change at all).
    rebuilt = load_state(json.dumps({**doc, **rules}).encode())
    again = desired_table(rebuilt, assign_ids(rebuilt, {}))
    assert again.contents() == table.contents()


def test_an_empty_table_has_no_rules() -> None:
    state = load_state(json.dumps({k: SEED_STATE[k] for k in ("version", "internal", "external")}).encode())
    table = desired_table(state, assign_ids(state, {}))
    assert rules_from_table(table.contents()) == {}


def test_rules_that_lost_their_labels_get_the_names_the_calls_gave_them() -> None:
    """natgwd.kubeovn.naming names both: the rules the drop-in's calls add, and the rules
    read from a table whose `rule_connections` comments are gone."""
    doc: dict[str, Any] = {k: json.loads(json.dumps(SEED_STATE[k])) for k in ("version", "internal", "external")}
    ctx = Context(gateway_v4=None)
    calls = [
        ("eip-add", f"{EIP1}/24"),
        ("floating-ip-add", f"{EIP2},172.20.10.3"),
        ("snat-add", f"{EIP1},172.20.10.0/24"),
        ("dnat-add", f"{EIP1},8888,tcp,172.20.10.2,80"),
        ("nft-dnat-map-add", f"{EIP3},80,tcp,172.20.10.2:8080@172.20.10.4:8080"),
    ]
    for command, rule in calls:
        EDITS[command](rule)(doc, ctx)
    state = load_state(json.dumps(doc).encode())
    contents = desired_table(state, assign_ids(state, {})).contents()
    for name in shards(RULE_CONNECTIONS):
        contents.elements[name] = {mark: Element() for mark in contents.elements[name]}
    rules = rules_from_table(contents)
    for section in ("eips", "snat", "dnat", "fip"):
        assert sorted(r["name"] for r in rules[section]) == sorted(r["name"] for r in doc[section]), section
