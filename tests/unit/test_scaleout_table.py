"""The hand-over in natgwd's table (rendering, the delta path, the FakeNft) and its
policy rules."""

from __future__ import annotations

import json
from typing import Any

from natgwd.kernel.fake import FakeNft
from natgwd.planning.handover import DNAT_REPLY_GROUP, FIP_OUT_GROUP, HANDED_OVER, HANDOVER_CHAIN
from natgwd.planning.links import link_plan
from natgwd.planning.plan import TablePlan, assign_ids, desired_table
from natgwd.planning.policy import PolicyRule
from natgwd.planning.table import plan_transaction
from natgwd.state.model import DesiredState
from natgwd.state.validation import load_state
from tests.unit.test_scaleout_state import doc


def scaled(**changes: Any) -> dict[str, Any]:
    document = doc(groups=[{"eips": ["my-eip"]}, {"eips": ["my-eip2", "my-eip3"]}], **changes)
    document["eips"].append({"name": "my-eip3", "v4ip": "10.115.55.202"})
    document["snat"].append({"name": "host-snat", "eip": "my-eip2", "internalCIDR": "172.20.10.9"})
    document["dnat"].append(
        {
            "name": "share-a",
            "eip": "my-eip3",
            "protocol": "udp",
            "externalPort": "53",
            "internalIp": "172.20.10.4",
            "internalPort": "5353",
            "type": "share",
        }
    )
    return document


def state_of(document: dict[str, Any]) -> DesiredState:
    return load_state(json.dumps(document).encode())


def full(document: dict[str, Any]) -> Any:
    state = state_of(document)
    return desired_table(state, assign_ids(state, {}))


def values(table: Any, name: str) -> dict[str, str | None]:
    return {key: element.value for key, element in table.elements[name].items()}


def test_every_translation_has_its_group_mark() -> None:
    table = full(scaled())
    # Groups: my-eip in group 0 (mark 4300), my-eip2 in group 1 (4301).
    assert values(table, "snat_p24_group") == {"172.20.10.0": "4300"}
    assert values(table, "snat_p32_group") == {"172.20.10.9": "4301"}
    assert values(table, FIP_OUT_GROUP) == {"172.20.10.3": "4301"}
    assert values(table, DNAT_REPLY_GROUP) == {"172.20.10.2 . tcp . 80": "4300", "172.20.10.4 . udp . 5353": "4301"}
    # One counting element per group: the packets handed to its owner.
    assert values(table, HANDED_OVER) == {"4300": None, "4301": None}


def test_the_handover_chain_marks_longest_prefix_last_and_leaves_handed_packets_untracked() -> None:
    table = full(scaled())
    chain = next(c for c in table.chains if c.name == HANDOVER_CHAIN)
    assert chain.header == "type filter hook prerouting priority raw; policy accept;"
    assert chain.rules == (
        'iifname "net1" fib daddr type local return',
        'iifname "net1" meta mark set ip saddr & 255.255.255.0 map @snat_p24_group',
        'iifname "net1" meta mark set ip saddr map @snat_p32_group',
        'iifname "net1" meta mark set ip saddr map @fip_out_group',
        'iifname "net1" meta l4proto { tcp, udp } meta mark set ip saddr . meta l4proto . th sport '
        "map @dnat_reply_group",
        'meta mark != 0 fib daddr . mark oifname "net1" meta mark @handed_over notrack',
    )


def test_without_scale_out_nothing_changes() -> None:
    document = scaled()
    del document["scaleOut"]
    table = full(document)
    assert HANDOVER_CHAIN not in {c.name for c in table.chains}
    assert not {FIP_OUT_GROUP, DNAT_REPLY_GROUP} & set(table.elements)


def test_a_backend_two_rules_share_keeps_its_element_until_both_are_gone() -> None:
    document = scaled()
    second = dict(document["dnat"][0], name="dnat02", externalPort="8889")
    document["dnat"].append(second)
    state = state_of(document)
    plan = TablePlan(state, assign_ids(state, {}))
    key = "172.20.10.2 . tcp . 80"
    assert plan.elements[DNAT_REPLY_GROUP][key].value == "4300"
    first_rule = state.dnat[0]
    fewer = state_of({**document, "dnat": document["dnat"][1:]})
    change = plan.change(fewer, [first_rule], [])
    assert key not in change.elements.get(DNAT_REPLY_GROUP, {}) or change.elements[DNAT_REPLY_GROUP][key] is not None
    plan.commit(change)
    assert plan.elements[DNAT_REPLY_GROUP][key].value == "4300"
    last = fewer.dnat[-1]
    none = state_of({**document, "dnat": document["dnat"][1:-1]})
    plan.commit(plan.change(none, [last], []))
    assert key not in plan.elements[DNAT_REPLY_GROUP]
    # The delta path ends where a full plan of the same state starts.
    assert plan.table.contents() == desired_table(none, plan.ids, plan.highest_id).contents()


def test_the_fake_kernel_takes_the_table() -> None:
    """Every set the chain references exists in the same transaction."""
    nft = FakeNft()
    table = full(scaled())
    nft.apply(plan_transaction(None, table))
    assert nft.read_table() == table.contents()


def test_each_group_is_routed_by_its_own_table() -> None:
    plan = link_plan(state_of(scaled()))
    assert plan.rules == (PolicyRule(4, 4300, 4300, fwmark=4300), PolicyRule(4, 4300, 4301, fwmark=4301))
    # keepalived moves the EIPs and the external address; each member's LAN address is its own.
    assert all(not spec.addresses for spec in plan.interfaces)
    assert all(route.onlink for route in plan.routes)


def test_packets_handed_over_are_exported_per_group_only_when_scaled_out() -> None:
    from natgwd.runtime.metrics import RuleCounters

    listings = {HANDED_OVER: [("0x000010cc", "7", "700", ""), ("0x000010cd", "0", "0", "")]}
    text = RuleCounters(dict).exposition(listings).decode()
    assert 'natgwd_scale_handed_over_packets_total{group="g0"} 7\n' in text
    assert 'natgwd_scale_handed_over_packets_total{group="g1"} 0\n' in text
    assert "natgwd_scale_handed_over" not in RuleCounters(dict).exposition({}).decode()
