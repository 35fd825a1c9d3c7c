"""natgwd.planning.plan: the table (sets, maps, chains) a desired state becomes, and rule ids."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from natgwd.lab.topology import SEED_STATE
from natgwd.planning.layout import (
    DIRECTIONS,
    ID_HIGH_WATER,
    INVALID_DROPS,
    RULE_CONNECTIONS,
    RULE_TRAFFIC,
    shards,
    share_chain_name,
    whole_elements,
)
from natgwd.planning.plan import RuleLabels, assign_ids, desired_table, rule_labels
from natgwd.planning.table import DesiredTable, Element
from natgwd.runtime.daemon import own_endpoints
from natgwd.state.model import DesiredState
from natgwd.state.validation import load_state

STATIC_SETS = {
    "eips": "set",
    "fip_in_target": "map",
    "fip_in_rule": "map",
    "fip_out_target": "map",
    "fip_out_rule": "map",
    "dnat_target": "map",
    "dnat_rule": "map",
    "dnat_share": "map",
    "share_target": "map",
    **dict.fromkeys((*shards(RULE_CONNECTIONS), *shards(RULE_TRAFFIC)), "set"),
    INVALID_DROPS: "set",
    ID_HIGH_WATER: "set",
}

SNAT = RuleLabels("snat", "my-snat", "10.115.55.200")
DNAT = RuleLabels("dnat", "dnat01", "10.115.55.200")
FIP = RuleLabels("fip", "fip01", "10.115.55.201")


def seed() -> dict[str, Any]:
    copied: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    return copied


def state_of(document: dict[str, Any]) -> DesiredState:
    return load_state(json.dumps(document).encode())


def planned(document: dict[str, Any]) -> DesiredTable:
    state = state_of(document)
    return desired_table(state, assign_ids(state, {}))


def flat(elements: dict[str, Element] | Any) -> dict[str, tuple[str | None, str | None]]:
    return {key: (element.value, element.comment) for key, element in elements.items()}


def whole(elements: dict[str, dict[str, Element]], name: str) -> dict[str, Element]:
    """A logical counting set's elements, from its shards."""
    return dict(whole_elements(elements, name))


def chain_rules(table: DesiredTable, name: str) -> tuple[str, ...]:
    (chain,) = [c for c in table.chains if c.name == name]
    return chain.rules


# --- ids and labels --------------------------------------------------------------------


def test_seed_rules_get_ids_in_snat_dnat_fip_order() -> None:
    state = state_of(seed())
    assert rule_labels(state) == [SNAT, DNAT, FIP]
    assert assign_ids(state, {}) == {SNAT: 1, DNAT: 2, FIP: 3}


def test_assign_ids_keeps_existing_ids() -> None:
    state = state_of(seed())
    assert assign_ids(state, {DNAT: 41, FIP: 7}) == {SNAT: 42, DNAT: 41, FIP: 7}


def test_assign_ids_never_reuses_an_id_up_to_highest_used() -> None:
    state = state_of(seed())
    # Ids 1..9 were used by rules since deleted: new rules start above them.
    assert assign_ids(state, {DNAT: 3}, highest_used=9) == {SNAT: 10, DNAT: 3, FIP: 11}
    assert assign_ids(state, {}, highest_used=100) == {SNAT: 101, DNAT: 102, FIP: 103}


def test_assign_ids_ignores_existing_ids_of_rules_no_longer_wanted() -> None:
    state = state_of(seed())
    gone = RuleLabels("dnat", "deleted", "10.115.55.200")
    ids = assign_ids(state, {gone: 50, SNAT: 1})
    assert ids == {SNAT: 1, DNAT: 51, FIP: 52}
    assert gone not in ids


def test_rule_moved_to_another_eip_is_a_new_rule() -> None:
    doc = seed()
    doc["snat"][0]["eip"] = "my-eip2"
    state = state_of(doc)
    ids = assign_ids(state, {SNAT: 1, DNAT: 2, FIP: 3})
    assert ids == {RuleLabels("snat", "my-snat", "10.115.55.201"): 4, DNAT: 2, FIP: 3}


@pytest.mark.parametrize("labels", [SNAT, DNAT, FIP, RuleLabels("dnat", "a-b-c", "1.2.3.4")])
def test_rule_labels_comment_round_trip(labels: RuleLabels) -> None:
    assert labels.comment == f"{labels.kind}/{labels.name}/{labels.eip}"
    assert RuleLabels.from_comment(labels.comment) == labels


@pytest.mark.parametrize("comment", ["", "dnat/x", "dnat/x/1.2.3.4/extra", "nat/x/1.2.3.4", "natgwd:abc"])
def test_foreign_comments_are_not_labels(comment: str) -> None:
    assert RuleLabels.from_comment(comment) is None


# --- the seed table ----------------------------------------------------------------------


def test_seed_table_sets() -> None:
    table = planned(seed())
    assert {s.name: s.keyword for s in table.sets} == {
        **STATIC_SETS,
        "snat_p24_target": "map",
        "snat_p24_rule": "map",
    }
    bodies = {s.name: s.body for s in table.sets}
    assert bodies["dnat_target"] == "type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service;"
    assert all(bodies[name] == "type mark; counter;" for name in shards(RULE_CONNECTIONS))
    assert all(bodies[name] == "type ct_dir . mark; counter;" for name in shards(RULE_TRAFFIC))
    assert bodies[INVALID_DROPS] == "type ifname; counter;"
    assert bodies["snat_p24_rule"] == "type ipv4_addr : mark;"


def test_seed_table_elements() -> None:
    elements = planned(seed()).elements
    counting = {*shards(RULE_CONNECTIONS), *shards(RULE_TRAFFIC)}
    assert {name: flat(e) for name, e in elements.items() if name not in counting} | {
        RULE_CONNECTIONS: flat(whole(elements, RULE_CONNECTIONS)),
        RULE_TRAFFIC: flat(whole(elements, RULE_TRAFFIC)),
    } == {
        "eips": {"10.115.55.200": (None, None), "10.115.55.201": (None, None)},
        "fip_in_target": {"10.115.55.201": ("172.20.10.3", None)},
        "fip_in_rule": {"10.115.55.201": ("3", None)},
        "fip_out_target": {"172.20.10.3": ("10.115.55.201", None)},
        "fip_out_rule": {"172.20.10.3": ("3", None)},
        "dnat_target": {"10.115.55.200 . tcp . 8888": ("172.20.10.2 . 80", None)},
        "dnat_rule": {"10.115.55.200 . tcp . 8888": ("2", None)},
        "dnat_share": {},
        "share_target": {},
        RULE_CONNECTIONS: {
            "1": (None, "snat/my-snat/10.115.55.200"),
            "2": (None, "dnat/dnat01/10.115.55.200"),
            "3": (None, "fip/fip01/10.115.55.201"),
        },
        RULE_TRAFFIC: {f"{d} . {mark}": (None, None) for d in ("original", "reply") for mark in "123"},
        INVALID_DROPS: {'"net2"': (None, None)},
        ID_HIGH_WATER: {"3": (None, None)},
        "snat_p24_target": {"172.20.10.0": ("10.115.55.200", None)},
        "snat_p24_rule": {"172.20.10.0": ("1", None)},
    }
    assert all(e.counter is None for elems in elements.values() for e in elems.values())


def test_seed_table_uses_the_given_ids() -> None:
    state = state_of(seed())
    table = desired_table(state, {SNAT: 17, DNAT: 5, FIP: 900})
    assert flat(whole(table.elements, RULE_CONNECTIONS)) == {
        "17": (None, SNAT.comment),
        "5": (None, DNAT.comment),
        "900": (None, FIP.comment),
    }
    assert set(whole(table.elements, RULE_TRAFFIC)) == {f"{d} . {m}" for d in DIRECTIONS for m in ("17", "5", "900")}
    assert flat(table.elements["dnat_rule"]) == {"10.115.55.200 . tcp . 8888": ("5", None)}
    assert flat(table.elements["fip_in_rule"]) == {"10.115.55.201": ("900", None)}
    assert flat(table.elements["fip_out_rule"]) == {"172.20.10.3": ("900", None)}
    assert flat(table.elements["snat_p24_rule"]) == {"172.20.10.0": ("17", None)}


def test_seed_table_chains() -> None:
    table = planned(seed())
    assert [(c.name, c.header) for c in table.chains] == [
        ("prerouting", "type nat hook prerouting priority dstnat; policy accept;"),
        ("postrouting", "type nat hook postrouting priority srcnat; policy accept;"),
        *((f"account_{index}", "") for index in range(16)),
        ("account", "type filter hook postrouting priority 300; policy accept;"),
        ("forward", "type filter hook forward priority filter; policy accept;"),
    ]
    dnat_key = "ip daddr . meta l4proto . th dport"
    assert chain_rules(table, "prerouting") == (
        "ct mark set ip daddr map @fip_in_rule dnat ip to ip daddr map @fip_in_target",
        f"meta l4proto {{ tcp, udp }} ct mark set {dnat_key} map @dnat_rule dnat ip to {dnat_key} map @dnat_target",
        f"meta l4proto {{ tcp, udp }} {dnat_key} vmap @dnat_share",
    )
    assert chain_rules(table, "postrouting") == (
        'iifname "net1" oifname "net1" ct status dnat ct original ip daddr @eips '
        "snat ip to ip saddr map @fip_out_target",
        'iifname "net1" oifname "net1" ct status dnat ct original ip daddr @eips snat ip to ct original ip daddr',
        'oifname "net2" ct mark set ip saddr map @fip_out_rule snat ip to ip saddr map @fip_out_target',
        'oifname "net2" ct mark set ip saddr & 255.255.255.0 map @snat_p24_rule '
        "snat ip to ip saddr & 255.255.255.0 map @snat_p24_target fully-random",
    )
    # One lookup on the rule id's low bits to the chain of its shard, which counts it.
    jumps = ", ".join(f"{index} : jump account_{index}" for index in range(16))
    assert chain_rules(table, "account") == (f"ct mark & 15 vmap {{ {jumps} }}",)
    assert chain_rules(table, "account_3") == (
        "ct status & confirmed == 0 ct mark @rule_connections_3",
        "ct direction . ct mark @rule_traffic_3",
    )
    assert chain_rules(table, "forward") == ("ct state invalid oifname @invalid_dropped drop",)


def test_interface_names_come_from_the_state() -> None:
    doc = seed()
    doc["internal"]["interface"] = "eth1"
    doc["external"]["interface"] = "eth2"
    table = planned(doc)
    assert set(table.elements[INVALID_DROPS]) == {'"eth2"'}
    assert chain_rules(table, "postrouting")[0].startswith('iifname "eth1" oifname "eth1" ')
    assert chain_rules(table, "postrouting")[1].startswith('iifname "eth1" oifname "eth1" ')
    assert chain_rules(table, "postrouting")[2].startswith('oifname "eth2" ')


def test_masquerade_is_the_last_source_nat_rule() -> None:
    """internal.masquerade (a Kube-OVN lb-svc pod): connections translated into the VPC
    take the internal address, after the hairpin rules (VPC clients keep getting the EIP)."""
    plain = chain_rules(planned(seed()), "postrouting")
    doc = seed()
    doc["internal"]["masquerade"] = True
    assert chain_rules(planned(doc), "postrouting") == (*plain, 'oifname "net1" ct status dnat masquerade')
    doc["internal"]["masquerade"] = False
    assert chain_rules(planned(doc), "postrouting") == plain


def test_contents_of_the_seed_table() -> None:
    table = planned(seed())
    contents = table.contents()
    assert contents.sets == {s.name: s.keyword for s in table.sets}
    assert contents.chains == {c.name: c.tags for c in table.chains}
    assert contents.elements == {name: dict(e) for name, e in table.elements.items()}
    assert contents.element_count() == 21  # with the id high-water mark


# --- DNAT port ranges ------------------------------------------------------------------------


def test_port_range_maps_port_to_port() -> None:
    doc = seed()
    doc["dnat"][0].update(externalPort="8000-8002", internalPort="80-82", protocol="udp")
    elements = planned(doc).elements
    assert flat(elements["dnat_target"]) == {
        "10.115.55.200 . udp . 8000": ("172.20.10.2 . 80", None),
        "10.115.55.200 . udp . 8001": ("172.20.10.2 . 81", None),
        "10.115.55.200 . udp . 8002": ("172.20.10.2 . 82", None),
    }
    assert flat(elements["dnat_rule"]) == {f"10.115.55.200 . udp . {p}": ("2", None) for p in (8000, 8001, 8002)}
    # One rule, one id, however many ports.
    assert set(whole(elements, RULE_CONNECTIONS)) == {"1", "2", "3"}


def test_port_range_shifted_downwards() -> None:
    doc = seed()
    doc["dnat"][0].update(externalPort="100-101", internalPort="65534-65535")
    assert flat(planned(doc).elements["dnat_target"]) == {
        "10.115.55.200 . tcp . 100": ("172.20.10.2 . 65534", None),
        "10.115.55.200 . tcp . 101": ("172.20.10.2 . 65535", None),
    }


# --- SNAT longest prefix -------------------------------------------------------------------


def snat_document(*cidrs: str) -> dict[str, Any]:
    doc = seed()
    doc["internal"]["routes"] = [{"dst": "10.0.0.0/8", "via": "172.20.10.1"}]
    doc["snat"] = [{"name": f"s{i}", "eip": "my-eip", "internalCIDR": cidr} for i, cidr in enumerate(cidrs)]
    return doc


def test_snat_rules_are_ordered_longest_prefix_first() -> None:
    table = planned(snat_document("10.1.0.0/16", "10.1.2.3", "10.1.2.0/24", "10.9.0.0/16"))
    rules = chain_rules(table, "postrouting")
    assert len(rules) == 6
    snat_rules = rules[3:]
    assert snat_rules == (
        'oifname "net2" ct mark set ip saddr map @snat_p32_rule snat ip to ip saddr map @snat_p32_target fully-random',
        'oifname "net2" ct mark set ip saddr & 255.255.255.0 map @snat_p24_rule '
        "snat ip to ip saddr & 255.255.255.0 map @snat_p24_target fully-random",
        'oifname "net2" ct mark set ip saddr & 255.255.0.0 map @snat_p16_rule '
        "snat ip to ip saddr & 255.255.0.0 map @snat_p16_target fully-random",
    )
    # Every SNAT rule comes after the FIP rule, so a FIP's address wins over SNAT.
    assert "@fip_out_rule" in rules[2]


def test_snat_maps_exist_only_for_prefix_lengths_in_use() -> None:
    table = planned(snat_document("10.1.0.0/16", "10.1.2.3", "10.1.2.0/24", "10.9.0.0/16"))
    snat_sets = [s.name for s in table.sets if s.name.startswith("snat_")]
    assert snat_sets == [
        "snat_p32_target",
        "snat_p32_rule",
        "snat_p24_target",
        "snat_p24_rule",
        "snat_p16_target",
        "snat_p16_rule",
    ]
    assert {s.name for s in table.sets} - set(snat_sets) == set(STATIC_SETS)
    ids = {"s0": "1", "s1": "2", "s2": "3", "s3": "4"}
    assert flat(table.elements["snat_p16_rule"]) == {"10.1.0.0": (ids["s0"], None), "10.9.0.0": (ids["s3"], None)}
    assert flat(table.elements["snat_p16_target"]) == {
        "10.1.0.0": ("10.115.55.200", None),
        "10.9.0.0": ("10.115.55.200", None),
    }
    assert flat(table.elements["snat_p32_rule"]) == {"10.1.2.3": (ids["s1"], None)}
    assert flat(table.elements["snat_p24_rule"]) == {"10.1.2.0": (ids["s2"], None)}


def test_no_snat_means_no_snat_maps_and_no_snat_rules() -> None:
    doc = seed()
    doc["snat"] = []
    table = planned(doc)
    assert {s.name: s.keyword for s in table.sets} == STATIC_SETS
    assert not any("snat_p" in rule for rule in chain_rules(table, "postrouting"))
    assert len(chain_rules(table, "postrouting")) == 3
    assert not any(name.startswith("snat_p") for name in table.elements)


def test_zero_prefix_snat_masks_everything() -> None:
    table = planned(snat_document("0.0.0.0/0"))
    assert chain_rules(table, "postrouting")[3] == (
        'oifname "net2" ct mark set ip saddr & 0.0.0.0 map @snat_p0_rule '
        "snat ip to ip saddr & 0.0.0.0 map @snat_p0_target fully-random"
    )
    assert flat(table.elements["snat_p0_rule"]) == {"0.0.0.0": ("1", None)}


def test_chain_tags_change_only_with_rule_text() -> None:
    one = planned(snat_document("10.1.0.0/16"))
    same_prefix = planned(snat_document("10.2.0.0/16"))
    other_prefix = planned(snat_document("10.2.0.0/24"))
    tags = {c.name: c.tags for c in one.chains}
    # Changing data (elements) leaves every chain alone...
    assert {c.name: c.tags for c in same_prefix.chains} == tags
    # ...a new prefix length changes postrouting only.
    changed = {c.name for c in other_prefix.chains if c.tags != tags[c.name]}
    assert changed == {"postrouting"}
    assert all(tag.startswith("natgwd:") and len(tag) == len("natgwd:") + 16 for tag in tags["postrouting"])


# --- share DNAT groups -------------------------------------------------------------------------


def share_document(*backends: tuple[str, str, int]) -> dict[str, Any]:
    doc = seed()
    for name, ip, port in backends:
        doc["dnat"].append(
            {
                "name": name,
                "eip": "my-eip",
                "protocol": "tcp",
                "externalPort": 9000,
                "internalIp": ip,
                "internalPort": port,
                "type": "share",
            }
        )
    return doc


def test_share_group_elements_and_chain() -> None:
    table = planned(share_document(("web-a", "172.20.10.2", 8080), ("web-b", "172.20.10.3", 8081)))
    chain_name = share_chain_name("10.115.55.200", "tcp", 9000)
    assert chain_name.startswith("share_") and len(chain_name) == len("share_") + 16
    # ids: snat 1, dnat01 2, web-a 3, web-b 4, fip 5
    assert flat(table.elements["dnat_share"]) == {"10.115.55.200 . tcp . 9000": (f"goto {chain_name}", None)}
    assert flat(table.elements["share_target"]) == {
        "3": ("172.20.10.2 . 8080", None),
        "4": ("172.20.10.3 . 8081", None),
    }
    # Share rules stay out of the exclusive maps, but are counted like every rule.
    assert set(table.elements["dnat_target"]) == {"10.115.55.200 . tcp . 8888"}
    assert flat(whole(table.elements, RULE_CONNECTIONS))["4"] == (None, "dnat/web-b/10.115.55.200")
    assert table.chains[0].name == chain_name
    assert table.chains[0].header == ""
    assert table.chains[0].rules == (
        "ct mark set numgen random mod 2 map { 0 : 3, 1 : 4 }",
        "meta l4proto { tcp, udp } dnat ip to ct mark map @share_target",
    )
    assert [c.name for c in table.chains[1:]] == [
        "prerouting",
        "postrouting",
        *(f"account_{index}" for index in range(16)),
        "account",
        "forward",
    ]


def test_share_chain_name_depends_on_the_identity_only() -> None:
    name = share_chain_name("10.115.55.200", "tcp", 9000)
    assert name == share_chain_name("10.115.55.200", "tcp", 9000)
    others = {
        share_chain_name("10.115.55.201", "tcp", 9000),
        share_chain_name("10.115.55.200", "udp", 9000),
        share_chain_name("10.115.55.200", "tcp", 9001),
    }
    assert name not in others and len(others) == 3


def test_natgwd_own_endpoints_are_kept_out_of_conntrack_and_nothing_else() -> None:
    """Guards against natgwd's probes, scrapes and edit calls needing a conntrack entry (a
    full table silences them), and against untracking anything but natgwd's own endpoints
    (NAT needs its traffic tracked). On every address, /metrics is untracked on loopback
    only: an EIP's traffic stays tracked."""
    state = load_state(json.dumps(SEED_STATE).encode())
    ids = assign_ids(state, {})
    assert {c.name for c in desired_table(state, ids).chains}.isdisjoint({"untracked_in", "untracked_out"})
    endpoints = own_endpoints([("10.244.7.5", 9469)], edits=True)
    assert endpoints == ((IPv4Address("10.244.7.5"), 9469), (IPv4Address("127.94.69.1"), None))
    # The default: loopback and the pod's addresses, every one.
    assert own_endpoints([("127.0.0.1", 9469), ("10.244.7.5", 9469), ("fd00:244::5", 9469)], edits=False) == (
        (IPv4Address("127.0.0.1"), 9469),
        (IPv4Address("10.244.7.5"), 9469),
        (IPv6Address("fd00:244::5"), 9469),
    )
    assert own_endpoints([("0.0.0.0", 9469)], edits=False) == (
        (IPv4Address("127.0.0.1"), 9469),
        (IPv6Address("::1"), 9469),
    )
    chains = {c.name: c for c in desired_table(state, ids, untracked=endpoints).chains}
    assert chains["untracked_in"].header == "type filter hook prerouting priority raw; policy accept;"
    assert chains["untracked_in"].rules == (
        "ip daddr 10.244.7.5 tcp dport 9469 notrack",
        "ip daddr 127.94.69.1 notrack",
    )
    assert chains["untracked_out"].header == "type filter hook output priority raw; policy accept;"
    assert chains["untracked_out"].rules == (
        "ip daddr 10.244.7.5 tcp dport 9469 notrack",
        "ip saddr 10.244.7.5 tcp sport 9469 notrack",
        "ip daddr 127.94.69.1 notrack",
        "ip saddr 127.94.69.1 notrack",
    )
