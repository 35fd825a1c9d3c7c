"""SNAT rules with a pool of EIPs (`eips`): the checks, the table planned (one member per
EIP, each with its own rule id; a chain that hashes the source address onto them), changes
of a pool on the delta path, the table read back, and which conntrack entries stay."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from natgwd.kernel.fake import FakeNft
from natgwd.kubeovn.kernelrules import rules_from_table
from natgwd.planning.layout import pool_chain_name, whole_elements
from natgwd.planning.plan import TablePlan, assign_ids, decode_rules, rule_labels
from natgwd.planning.pools import BUCKETS, SEED
from natgwd.planning.stale import Flow, Translations
from natgwd.planning.table import plan_transaction
from natgwd.runtime.reconciler import Reconciler
from natgwd.state.scaleout import HANDOVER_BASE
from natgwd.state.tracker import StateTracker
from natgwd.state.validation import InvalidStateError, load_state
from tests.unit.fakes import FakeLinks

EIP_A, EIP_B, EIP_C = "10.115.55.200", "10.115.55.202", "10.115.55.203"


def pool_state(*eips: str) -> dict[str, Any]:
    return {
        "version": 1,
        "internal": {"interface": "net1", "addresses": ["172.20.10.254/24", "fd00:10::fe/64"]},
        "external": {"interface": "net2", "addresses": ["10.115.48.1/21"], "gateway": "10.115.55.254"},
        "eips": [
            {"name": "a", "v4ip": EIP_A},
            {"name": "b", "v4ip": EIP_B},
            {"name": "c", "v4ip": EIP_C},
            {"name": "six", "v6ip": "fd00:115::206"},
        ],
        "snat": [{"name": "pool", "eips": list(eips), "internalCIDR": "172.20.10.0/24"}],
    }


def problems(document: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidStateError) as caught:
        load_state(json.dumps(document).encode())
    return [(p.path, p.reason) for p in caught.value.problems]


def test_a_pool_names_known_eips_each_once() -> None:
    assert problems(pool_state("a", "nope", "a")) == [
        ("$.snat[0].eips[1]", "names EIP 'nope', which is not in eips"),
        ("$.snat[0].eips[2]", "duplicates eips[0] ('a')"),
    ]


def test_a_rule_names_eip_or_eips() -> None:
    both = pool_state("a", "b")
    both["snat"][0]["eip"] = "a"
    assert problems(both) == [("$.snat[0].eip", "a rule names eip or eips (a pool), not both")]
    neither = pool_state("a")
    del neither["snat"][0]["eips"]
    assert problems(neither) == [
        ("$.snat[0].eip", "required field is missing (a SNAT rule names eip, or eips for a pool)")
    ]
    empty = pool_state()
    assert [path for path, _ in problems(empty)] == ["$.snat[0].eips"]


def test_every_eip_of_a_pool_has_the_rules_family() -> None:
    assert problems(pool_state("a", "six")) == [
        (
            "$.snat[0].internalCIDR",
            "172.20.10.0/24 is IPv4 but EIP 'six' has no v4ip; a rule translates within one family "
            "(give the EIP a v4ip or use an IPv6 address)",
        )
    ]


def test_a_pools_eips_share_one_external_network() -> None:
    document = pool_state("a", "b")
    document["externals"] = [{"name": "ext2", "interface": "net3", "addresses": ["10.116.0.1/24"]}]
    document["eips"][1] = {"name": "b", "v4ip": "10.116.0.202"}
    assert problems(document) == [
        (
            "$.snat[0].eips[1]",
            "EIP 'b' is on external network 'ext2' but 'a' on 'external'; a pool's EIPs share one external network",
        )
    ]


def test_with_scale_out_a_pools_eips_are_in_one_group() -> None:
    document = pool_state("a", "b")
    document["eips"] = document["eips"][:3]  # scaling out moves IPv4 EIPs only
    document["internal"]["addresses"] = ["172.20.10.254/24"]
    document["scaleOut"] = {
        "interface": "net1",
        "virtualRouterIdBase": 60,
        "members": [{"address": "172.20.10.11"}, {"address": "172.20.10.12"}],
        "groups": [{"eips": ["a"]}, {"eips": ["b", "c"]}],
    }
    assert problems(document) == [
        (
            "$.snat[0].eips[1]",
            "EIP 'b' is in scaleOut group 1 but 'a' in group 0; a pool's EIPs must be owned by one member "
            "(list them in one of scaleOut.groups)",
        )
    ]
    document["snat"][0]["eips"] = ["b", "c"]
    # The hand-over sends the pool's sources to the owner of its one group.
    table = plan_of(document).table
    assert table.elements["snat_p24_group"]["172.20.10.0"].value == str(HANDOVER_BASE + 1)


def plan_of(document: dict[str, Any]) -> TablePlan:
    state = load_state(json.dumps(document).encode())
    return TablePlan(state, assign_ids(state, {}))


def test_each_eip_of_a_pool_is_a_member_with_its_own_id_and_the_chain_hashes_the_source() -> None:
    plan = plan_of(pool_state("a", "b"))
    assert rule_labels(plan.state) == [("snat", "pool", EIP_A), ("snat", "pool", EIP_B)]
    ids = {labels.eip: mark for labels, mark in plan.ids.items()}
    table = plan.table
    assert table.elements["snat_pool_target"] == {
        str(ids[EIP_A]): table.elements["snat_pool_target"][str(ids[EIP_A])],
        str(ids[EIP_B]): table.elements["snat_pool_target"][str(ids[EIP_B])],
    }
    assert {k: e.value for k, e in table.elements["snat_pool_target"].items()} == {
        str(ids[EIP_A]): EIP_A,
        str(ids[EIP_B]): EIP_B,
    }
    chain = pool_chain_name(4, "pool")
    assert table.elements["snat_p24_pool"]["172.20.10.0"].value == f"goto {chain}"
    assert table.elements["snat_p24_target"] == {}  # the plain map has no element of a pool
    (spec,) = [c for c in table.chains if c.name == chain]
    buckets = ", ".join(f"{b} : {ids[EIP_A] if b % 2 == 0 else ids[EIP_B]}" for b in range(BUCKETS))
    assert spec.rules == (
        f"ct mark set jhash ip saddr mod {BUCKETS} seed {SEED:#x} map {{ {buckets} }} "
        "snat ip to ct mark map @snat_pool_target fully-random",
    )
    (postrouting,) = [c for c in table.chains if c.name == "postrouting"]
    assert 'oifname "net2" ip saddr & 255.255.255.0 vmap @snat_p24_pool' in postrouting.rules
    # The connections of each member are counted under its own id and labels.
    comments = {k: e.comment for k, e in whole_elements(table.elements, "rule_connections")}
    assert comments == {str(ids[EIP_A]): f"snat/pool/{EIP_A}", str(ids[EIP_B]): f"snat/pool/{EIP_B}"}


def test_a_table_without_pools_has_none_of_their_maps() -> None:
    document = pool_state("a")
    document["snat"][0] = {"name": "plain", "eip": "a", "internalCIDR": "172.20.10.0/24"}
    names = {spec.name for spec in plan_of(document).table.sets}
    assert not {name for name in names if "pool" in name}


def test_an_eip_added_to_a_pool_on_the_delta_path_keeps_the_others_ids_in_one_transaction() -> None:
    tracker = StateTracker()
    first = tracker.check(json.dumps(pool_state("a", "b")).encode())
    tracker.accept(first)
    reconciler = Reconciler(FakeNft(), FakeLinks(), ensure_forwarding=lambda: False)
    reconciler.apply(first.state)
    before = dict(reconciler.rule_ids)
    change = tracker.check(json.dumps(pool_state("a", "b", "c")).encode())
    assert change.delta is not None
    nft: FakeNft = reconciler.nft  # type: ignore[assignment]
    transactions = len(nft.transactions)
    assert reconciler.apply(change.state, change.delta, change.base).by_delta
    assert len(nft.transactions) == transactions + 1
    after = reconciler.rule_ids
    assert {labels: after[labels] for labels in before} == before
    assert ("snat", "pool", EIP_C) in after
    assert reconciler.verify_plan(change.state)
    # The kernel holds what a full plan of the new state holds.
    full = plan_of(pool_state("a", "b", "c"))
    assert nft.table is not None and sorted(nft.table.chains) == sorted(c.name for c in full.table.chains)
    assert nft.table.shares[pool_chain_name(4, "pool")] == tuple(
        after[("snat", "pool", eip)] for _, eip in zip(range(BUCKETS), [EIP_A, EIP_B, EIP_C] * BUCKETS, strict=False)
    )


def test_the_members_read_back_from_the_table_and_as_one_rule_by_the_drop_in() -> None:
    plan = plan_of(pool_state("b", "a"))
    nft = FakeNft()
    nft.apply(plan_transaction(None, plan.table))
    assert nft.table is not None
    found = sorted((r.mark, r.labels, str(r.rule.internal_cidr), r.rule.eip) for r in decode_rules(nft.table))
    assert found == sorted(
        (plan.ids[labels], labels, "172.20.10.0/24", labels.eip) for labels in rule_labels(plan.state)
    )
    doc = rules_from_table(copy.deepcopy(nft.table))
    assert [(s["name"], s["eips"]) for s in doc["snat"]] == [("pool", ["eip-10-115-55-202", "eip-10-115-55-200"])]


def flow(source: str, eip: str) -> Flow:
    return Flow(6, source, "198.51.100.1", 443, "198.51.100.1", 443, eip, 1)


def test_a_connection_through_any_eip_of_its_pool_is_kept() -> None:
    state = load_state(json.dumps(pool_state("a", "b")).encode())
    translations = Translations(state, [1, 2])
    assert translations.stale(flow("172.20.10.5", EIP_A)) is None
    assert translations.stale(flow("172.20.10.5", EIP_B)) is None
    assert translations.stale(flow("172.20.10.5", EIP_C)) == "snat"


# --- draining --------------------------------------------------------------------------


def draining(document: dict[str, Any], *names: str) -> dict[str, Any]:
    document = copy.deepcopy(document)
    for eip in document["eips"]:
        if eip["name"] in names:
            eip["draining"] = True
    return document


def test_dnat_and_fip_rules_cannot_use_a_draining_eip() -> None:
    document = draining(pool_state("a", "b"), "c")
    document["dnat"] = [
        {"name": "web", "eip": "c", "protocol": "tcp", "externalPort": 80, "internalIp": "172.20.10.5"}
        | {"internalPort": 80}
    ]
    document["fip"] = [{"name": "vm", "eip": "c", "internalIp": "172.20.10.6"}]
    reason = "EIP 'c' is draining: it takes no new connections, and a {} rule takes them from outside"
    found = problems(document)
    assert [path for path, _ in found] == ["$.dnat[0].eip", "$.fip[0].eip"]
    assert found[0][1].startswith(reason.format("dnat")) and found[1][1].startswith(reason.format("fip"))


def test_a_draining_eips_buckets_go_to_the_others_and_theirs_stay() -> None:
    before = plan_of(pool_state("a", "b", "c"))
    after = plan_of(draining(pool_state("a", "b", "c"), "b"))
    chain = pool_chain_name(4, "pool")
    ids = {labels.eip: mark for labels, mark in before.ids.items()}
    old, new = before.table.shares[chain], after.table.shares[chain]
    assert after.ids == before.ids
    for bucket, (was, now) in enumerate(zip(old, new, strict=True)):
        assert now == was if was != ids[EIP_B] else now in (ids[EIP_A], ids[EIP_C]), bucket
    assert ids[EIP_B] not in new
    assert new.count(ids[EIP_A]) - new.count(ids[EIP_C]) in (-1, 0, 1)


def test_a_rule_on_a_draining_eip_alone_refuses_new_connections() -> None:
    document = pool_state("a")
    document["snat"][0] = {"name": "plain", "eip": "a", "internalCIDR": "172.20.10.0/24"}
    plan = plan_of(draining(document, "a"))
    chain = pool_chain_name(4, "plain")
    (spec,) = [c for c in plan.table.chains if c.name == chain]
    assert spec.rules == ("drop",)
    assert plan.table.elements["snat_p24_pool"]["172.20.10.0"].value == f"goto {chain}"
    assert plan.table.elements["snat_p24_target"] == {}


def test_draining_and_undraining_each_change_the_kernel_in_one_transaction_keeping_ids() -> None:
    reconciler = Reconciler(FakeNft(), FakeLinks(), ensure_forwarding=lambda: False)
    nft: FakeNft = reconciler.nft  # type: ignore[assignment]
    document = pool_state("a")
    document["snat"] = [
        {"name": "plain", "eip": "a", "internalCIDR": "172.20.10.0/24"},
        {"name": "pool", "eips": ["a", "b"], "internalCIDR": "172.20.11.0/24"},
    ]
    document["internal"]["routes"] = [{"dst": "172.20.11.0/24", "via": "172.20.10.1"}]
    reconciler.apply(load_state(json.dumps(document).encode()))
    ids = dict(reconciler.rule_ids)
    for step in (draining(document, "a"), document):
        transactions = len(nft.transactions)
        state = load_state(json.dumps(step).encode())
        reconciler.apply(state)
        assert len(nft.transactions) == transactions + 1
        assert reconciler.rule_ids == ids
        full = plan_of(step).table.contents()
        assert nft.table is not None
        # A chain no longer used is emptied now and deleted by the next transaction.
        chains = {name: tags for name, tags in nft.table.chains.items() if tags}
        assert (chains, nft.table.shares, nft.table.elements) == (full.chains, full.shares, full.elements)


def test_a_connection_through_a_draining_eip_is_kept() -> None:
    state = load_state(json.dumps(draining(pool_state("a", "b"), "a")).encode())
    assert Translations(state, [1, 2]).stale(flow("172.20.10.5", EIP_A)) is None
