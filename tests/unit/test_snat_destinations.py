"""SNAT rules by destination (`destinations`): the checks (family, duplicates, overlapping
rules of equal precedence), their place before the rules by source alone in the table,
the table read back, scale-out's hand-over and several networks' steering, and which
conntrack entries stay."""

from __future__ import annotations

import json
from typing import Any

import pytest

from natgwd.kernel.fake import FakeNft
from natgwd.kubeovn.kernelrules import rules_from_table
from natgwd.planning.plan import TablePlan, assign_ids, decode_rules
from natgwd.planning.stale import Flow, Translations
from natgwd.planning.table import plan_transaction
from natgwd.state.validation import InvalidStateError, load_state

GENERAL, PARTNER, PARTNER2 = "10.115.55.200", "10.115.55.202", "10.115.55.203"


def state(*rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 1,
        "internal": {"interface": "net1", "addresses": ["172.20.10.254/24", "fd00:10::fe/64"]},
        "external": {"interface": "net2", "addresses": ["10.115.48.1/21"], "gateway": "10.115.55.254"},
        "eips": [
            {"name": "general", "v4ip": GENERAL},
            {"name": "partner", "v4ip": PARTNER},
            {"name": "partner2", "v4ip": PARTNER2},
        ],
        "snat": [{"name": "general", "eip": "general", "internalCIDR": "172.20.10.0/24"}, *rules],
    }


def to(name: str, cidr: str, *destinations: str, eip: str = "partner") -> dict[str, Any]:
    return {"name": name, "eip": eip, "internalCIDR": cidr, "destinations": list(destinations)}


def problems(document: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidStateError) as caught:
        load_state(json.dumps(document).encode())
    return [(p.path, p.reason) for p in caught.value.problems]


def test_a_destination_rule_may_share_its_cidr_with_the_rule_by_source() -> None:
    loaded = load_state(json.dumps(state(to("partner", "172.20.10.0/24", "198.51.100.0/24"))).encode())
    assert [str(d) for d in loaded.snat[1].destinations] == ["198.51.100.0/24"]


def test_destinations_are_networks_of_the_rules_family_each_once() -> None:
    found = problems(state(to("partner", "172.20.10.0/24", "fd00:99::/64", "198.51.100.0/24", "198.51.100.0/24")))
    assert found == [
        ("$.snat[1].destinations[0]", "fd00:99::/64 is IPv6 but internalCIDR 172.20.10.0/24 is IPv4"),
        ("$.snat[1].destinations[2]", "duplicates destinations[1] (198.51.100.0/24)"),
    ]
    assert [path for path, _ in problems(state(to("partner", "172.20.10.0/24", "198.51.100.1/24")))] == [
        "$.snat[1].destinations[0]"
    ]


def test_destination_rules_that_could_match_one_connection_are_refused() -> None:
    found = problems(
        state(
            to("partner", "172.20.10.0/24", "198.51.100.0/24"),
            to("partner2", "172.20.10.0/26", "203.0.113.0/24", "198.51.100.128/25", eip="partner2"),
        )
    )
    assert found == [
        (
            "$.snat[2].destinations",
            "172.20.10.0/26 to 198.51.100.128/25 overlaps snat[1] (172.20.10.0/24 to 198.51.100.0/24): "
            "destination rules have equal precedence, so one connection could match both",
        )
    ]
    # Other sources, or other destinations: no connection matches both.
    load_state(
        json.dumps(
            state(
                to("partner", "172.20.10.0/25", "198.51.100.0/24"),
                to("partner2", "172.20.10.128/25", "198.51.100.0/24", eip="partner2"),
                to("partner3", "172.20.10.0/24", "203.0.113.0/24", eip="partner2"),
            )
        ).encode()
    )


def plan_of(document: dict[str, Any]) -> TablePlan:
    loaded = load_state(json.dumps(document).encode())
    return TablePlan(loaded, assign_ids(loaded, {}))


def test_destination_rules_come_after_fip_and_before_the_rules_by_source() -> None:
    plan = plan_of(state(to("partner", "172.20.10.0/24", "198.51.100.0/24", "192.0.2.7")))
    (postrouting,) = [c for c in plan.table.chains if c.name == "postrouting"]
    assert postrouting.rules[2:6] == (
        'oifname "net2" ct mark set ip saddr map @fip_out_rule snat ip to ip saddr map @fip_out_target',
        'oifname "net2" ct mark set ip saddr . ip daddr map @snat_dst_rule '
        "snat ip to ip saddr . ip daddr map @snat_dst_target fully-random",
        'oifname "net2" ip saddr . ip daddr vmap @snat_dst_pool',
        'oifname "net2" ct mark set ip saddr & 255.255.255.0 map @snat_p24_rule '
        "snat ip to ip saddr & 255.255.255.0 map @snat_p24_target fully-random",
    )
    mark = str(plan.ids["snat", "partner", PARTNER])
    keys = ["172.20.10.0/24 . 198.51.100.0/24", "172.20.10.0/24 . 192.0.2.7"]
    assert {k: e.value for k, e in plan.table.elements["snat_dst_target"].items()} == dict.fromkeys(keys, PARTNER)
    assert {k: e.value for k, e in plan.table.elements["snat_dst_rule"].items()} == dict.fromkeys(keys, mark)
    # The rule by source keeps its own map; no IPv6 maps of destination rules.
    assert plan.table.elements["snat_p24_target"]["172.20.10.0"].value == GENERAL
    assert "snat_dst_rule6" not in plan.table.elements


def test_a_table_without_destination_rules_has_none_of_their_maps() -> None:
    assert not [spec.name for spec in plan_of(state()).table.sets if "dst" in spec.name]


def test_destination_rules_and_pools_read_back_from_the_table() -> None:
    pool = to("pool", "172.20.10.0/24", "203.0.113.0/24") | {"eips": ["partner", "partner2"]}
    del pool["eip"]
    plan = plan_of(state(to("partner", "172.20.10.0/24", "198.51.100.0/24", "192.0.2.7"), pool))
    nft = FakeNft()
    nft.apply(plan_transaction(None, plan.table))
    assert nft.table is not None
    found = sorted(
        (r.labels.name if r.labels else "", r.rule.eip, tuple(map(str, r.rule.destinations)))  # type: ignore[union-attr]
        for r in decode_rules(nft.table)
        if r.rule.kind == "snat"
    )
    assert found == [
        ("general", GENERAL, ()),
        ("partner", PARTNER, ("198.51.100.0/24", "192.0.2.7/32")),
        ("pool", PARTNER, ("203.0.113.0/24",)),
        ("pool", PARTNER2, ("203.0.113.0/24",)),
    ]
    rebuilt = rules_from_table(nft.table)
    by_name = {item["name"]: item for item in rebuilt["snat"]}
    assert by_name["partner"]["destinations"] == ["198.51.100.0/24", "192.0.2.7/32"]
    assert by_name["pool"]["eips"] == ["eip-10-115-55-202", "eip-10-115-55-203"]
    assert load_state(json.dumps({**state(), **rebuilt}).encode())


def test_scale_out_hands_a_destination_rules_packets_to_its_eips_owner() -> None:
    document = state(to("partner", "172.20.10.0/24", "198.51.100.0/24"))
    document["internal"]["addresses"] = ["172.20.10.254/24"]
    document["scaleOut"] = {
        "interface": "net1",
        "virtualRouterIdBase": 60,
        "members": [{"address": "172.20.10.11"}, {"address": "172.20.10.12"}],
        "groups": [{"eips": ["general"]}, {"eips": ["partner", "partner2"]}],
    }
    plan = plan_of(document)
    (handover,) = [c for c in plan.table.chains if c.name == "handover"]
    marking = [rule for rule in handover.rules if "meta mark set" in rule]
    # After the rules by source (it takes precedence), before the FIP (which takes it).
    assert marking[1:3] == [
        'iifname "net1" meta mark set ip saddr . ip daddr map @snat_dst_group',
        'iifname "net1" meta mark set ip saddr map @fip_out_group',
    ]
    assert plan.table.elements["snat_dst_group"]["172.20.10.0/24 . 198.51.100.0/24"].value == "4301"


def test_with_several_networks_a_destination_rule_steers_to_its_eips_network() -> None:
    document = state(to("partner", "172.20.10.0/24", "198.51.100.0/24"))
    document["externals"] = [{"name": "ext2", "interface": "net3", "addresses": ["10.116.0.1/24"]}]
    document["eips"][1] = {"name": "partner", "v4ip": "10.116.0.202"}
    plan = plan_of(document)
    (steer,) = [c for c in plan.table.chains if c.name == "steer"]
    assert steer.rules[1] == (
        'iifname "net1" ct direction original meta mark 0 meta mark set ip saddr . ip daddr map @snat_dst_network'
    )
    assert plan.table.elements["snat_dst_network"]["172.20.10.0/24 . 198.51.100.0/24"].value == "4241"


def flow(destination: str, eip: str) -> Flow:
    return Flow(6, "172.20.10.5", destination, 443, destination, 443, eip, 1)


def test_a_connection_is_judged_by_the_destination_rule_that_covers_it() -> None:
    loaded = load_state(json.dumps(state(to("partner", "172.20.10.0/24", "198.51.100.0/24"))).encode())
    translations = Translations(loaded, [1, 2])
    assert translations.stale(flow("198.51.100.9", PARTNER)) is None
    assert translations.stale(flow("198.51.100.9", GENERAL)) == "snat"
    assert translations.stale(flow("203.0.113.9", GENERAL)) is None
    assert translations.stale(flow("203.0.113.9", PARTNER)) == "snat"
