"""natgwd.runtime.reconciler against the in-memory FakeNft: minimal transactions, counters that
survive, adoption after a restart, drift repair, and failure handling."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from natgwd.kernel.fake import FakeNft
from natgwd.kernel.nft import NftError
from natgwd.lab.topology import SEED_STATE
from natgwd.planning.counters import counted_elements
from natgwd.planning.layout import key_shard, whole_elements
from natgwd.planning.links import link_plan
from natgwd.planning.plan import assign_ids, desired_table
from natgwd.planning.table import (
    AddElements,
    AddTable,
    Counter,
    DeleteElements,
    Element,
    TableContents,
    plan_transaction,
)
from natgwd.runtime.reconciler import FULL_READ_EVERY, Outcome, Reconciler
from natgwd.state.model import DesiredState
from natgwd.state.validation import load_state
from tests.unit.fakes import FakeLinks

DNAT_KEY = "10.115.55.200 . tcp . 8888"
# Rule ids the seed gets on a fresh table, and their rule_connections comments.
SEED_IDS = {"1": "snat/my-snat/10.115.55.200", "2": "dnat/dnat01/10.115.55.200", "3": "fip/fip01/10.115.55.201"}


class Forwarding:
    """ensure_forwarding stand-in: reports 'was off' once after `turn_off()`."""

    def __init__(self) -> None:
        self.calls = 0
        self.off = False

    def turn_off(self) -> None:
        self.off = True

    def __call__(self) -> bool:
        self.calls += 1
        was_off, self.off = self.off, False
        return was_off


def seed() -> dict[str, Any]:
    copied: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    return copied


def state_of(document: dict[str, Any]) -> DesiredState:
    return load_state(json.dumps(document).encode())


SEED = state_of(SEED_STATE)


def moved_dnat() -> DesiredState:
    doc = seed()
    doc["dnat"][0]["internalIp"] = "172.20.10.4"
    return state_of(doc)


def reconciler(fake: FakeNft, links: FakeLinks | None = None) -> Reconciler:
    return Reconciler(fake, links or FakeLinks(), ensure_forwarding=lambda: False)


def kernel(fake: FakeNft) -> TableContents:
    assert fake.table is not None
    return fake.table


def connections(fake: FakeNft) -> dict[str, tuple[str | None, Counter | None]]:
    return {k: (e.comment, e.counter) for k, e in whole_elements(kernel(fake).elements, "rule_connections")}


def expected_contents(state: DesiredState) -> TableContents:
    return desired_table(state, assign_ids(state, {})).contents()


def add_traffic(fake: FakeNft) -> None:
    """Some traffic on every seed rule: rule id n gets n*10 connections of 100 bytes."""
    for mark in ("1", "2", "3"):
        fake.count("rule_connections", mark, int(mark) * 10, 100)
        fake.count("rule_traffic", f"original . {mark}", int(mark) * 20, 1000)
        fake.count("rule_traffic", f"reply . {mark}", int(mark) * 30, 50)


def counters(fake: FakeNft) -> dict[tuple[str, str], Counter | None]:
    table = kernel(fake)
    return {
        (name, key): element.counter
        for name in ("rule_connections", "rule_traffic", "invalid_dropped")
        for key, element in whole_elements(table.elements, name)
    }


# --- applying ---------------------------------------------------------------------------


def test_first_apply_creates_everything() -> None:
    fake, links = FakeNft(), FakeLinks()
    outcome = reconciler(fake, links).apply(SEED)
    assert len(fake.transactions) == 1
    tx = fake.transactions[0]
    assert tx.operations[0] == AddTable()
    assert kernel(fake) == expected_contents(SEED)
    assert connections(fake) == {mark: (comment, Counter(0, 0)) for mark, comment in SEED_IDS.items()}
    assert outcome.nft_operations == len(tx.operations)
    assert outcome.changed_elements == tx.changed_elements == 21  # with the id high-water mark
    assert outcome.complete
    assert links.plans == [link_plan(SEED)]


def test_applying_the_same_state_again_makes_no_transaction() -> None:
    fake, links = FakeNft(), FakeLinks()
    rec = reconciler(fake, links)
    rec.apply(SEED)
    before = copy.deepcopy(fake.table)
    outcome = rec.apply(state_of(seed()))
    assert len(fake.transactions) == 1
    assert (outcome.nft_operations, outcome.changed_elements) == (0, 0)
    assert fake.table == before
    # Unchanged links were verified by the first apply; resync checks them again.
    assert len(links.plans) == 1
    assert rec.state == SEED
    rec.resync()
    assert len(links.plans) == 2


def test_changing_one_dnat_target_touches_only_that_element() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    outcome = rec.apply(moved_dnat())
    assert len(fake.transactions) == 2
    tx = fake.transactions[-1]
    assert tx.operations == [
        DeleteElements("dnat_target", (DNAT_KEY,)),
        AddElements("dnat_target", ((DNAT_KEY, Element("172.20.10.4 . 80")),)),
    ]
    assert tx.changed_elements == 2
    assert (outcome.nft_operations, outcome.changed_elements) == (2, 2)
    assert kernel(fake).elements["dnat_target"][DNAT_KEY].value == "172.20.10.4 . 80"
    assert kernel(fake).elements["dnat_rule"][DNAT_KEY].value == "2"
    assert kernel(fake) == expected_contents(moved_dnat())


def test_counters_of_unchanged_rules_survive_a_change() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    add_traffic(fake)
    fake.count("invalid_dropped", '"net2"', 2, 60)
    before = counters(fake)
    doc = seed()
    doc["fip"][0]["internalIp"] = "172.20.10.9"  # moves the FIP: every fip_* map changes
    doc["dnat"].append(
        {
            "name": "dnat02",
            "eip": "my-eip",
            "protocol": "udp",
            "externalPort": 53,
            "internalIp": "172.20.10.4",
            "internalPort": 53,
        }
    )
    rec.apply(state_of(doc))
    after = counters(fake)
    assert {k: after[k] for k in before} == before
    assert before[("rule_connections", "2")] == Counter(20, 2000)
    assert before[("rule_traffic", "reply . 3")] == Counter(90, 4500)
    assert before[("invalid_dropped", '"net2"')] == Counter(2, 120)
    # The new rule got the next id and starts at zero.
    assert after[("rule_connections", "4")] == Counter(0, 0)
    assert set(after) - set(before) == {
        ("rule_connections", "4"),
        ("rule_traffic", "original . 4"),
        ("rule_traffic", "reply . 4"),
    }


def test_removed_rule_loses_its_elements_and_others_keep_counting() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    add_traffic(fake)
    doc = seed()
    doc["dnat"] = []
    rec.apply(state_of(doc))
    assert connections(fake) == {
        "1": (SEED_IDS["1"], Counter(10, 1000)),
        "3": (SEED_IDS["3"], Counter(30, 3000)),
    }
    assert kernel(fake).elements["dnat_target"] == {}
    assert kernel(fake).elements["dnat_rule"] == {}


def test_ids_are_not_reused_after_a_rule_is_deleted() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    doc = seed()
    doc["fip"] = []
    rec.apply(state_of(doc))  # id 3 is gone
    doc["fip"] = [{"name": "fip02", "eip": "my-eip2", "internalIp": "172.20.10.4"}]
    rec.apply(state_of(doc))
    assert connections(fake)["4"] == ("fip/fip02/10.115.55.201", Counter(0, 0))
    assert "3" not in connections(fake)
    assert kernel(fake).elements["fip_in_rule"] == {"10.115.55.201": Element("4")}


def test_readding_a_deleted_rule_gives_it_a_new_id() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    doc = seed()
    doc["snat"] = []
    rec.apply(state_of(doc))
    rec.apply(SEED)
    assert connections(fake) == {
        "2": (SEED_IDS["2"], Counter(0, 0)),
        "3": (SEED_IDS["3"], Counter(0, 0)),
        "4": (SEED_IDS["1"], Counter(0, 0)),
    }


def test_missing_interfaces_make_the_outcome_incomplete() -> None:
    fake, links = FakeNft(), FakeLinks(missing=("net2",))
    outcome = reconciler(fake, links).apply(SEED)
    assert outcome.missing_interfaces == ["net2"]
    assert not outcome.complete
    # nftables does not wait for the interface.
    assert kernel(fake) == expected_contents(SEED)


def test_link_errors_make_the_outcome_incomplete() -> None:
    links = FakeLinks(errors=("add 10.115.55.200/21 to net2: File exists",))
    outcome = reconciler(FakeNft(), links).apply(SEED)
    assert outcome.link_errors == ["add 10.115.55.200/21 to net2: File exists"]
    assert outcome.missing_interfaces == []
    assert not outcome.complete


def test_outcome_complete_only_without_missing_or_errors() -> None:
    assert Outcome().complete
    assert not Outcome(missing_interfaces=["net1"]).complete
    assert not Outcome(link_errors=["x"]).complete
    assert Outcome(link_changes=["set net1 up"]).complete


def test_forwarding_is_ensured_on_every_apply() -> None:
    forwarding = Forwarding()
    rec = Reconciler(FakeNft(), FakeLinks(), ensure_forwarding=forwarding)
    rec.apply(SEED)
    rec.apply(SEED)
    assert forwarding.calls == 2


# --- restart: adopting the kernel's table -------------------------------------------------


def test_restarted_reconciler_adopts_the_table() -> None:
    fake = FakeNft()
    reconciler(fake).apply(moved_dnat())
    add_traffic(fake)
    before = copy.deepcopy(fake.table)
    outcome = reconciler(fake).apply(moved_dnat())
    assert len(fake.transactions) == 1
    assert (outcome.nft_operations, outcome.changed_elements) == (0, 0)
    assert fake.table == before
    assert counters(fake) == {k: e.counter for k, e in _counting(before).items()}


def _counting(table: TableContents | None) -> dict[tuple[str, str], Element]:
    assert table is not None
    return {
        (name, key): element
        for name in ("rule_connections", "rule_traffic", "invalid_dropped")
        for key, element in whole_elements(table.elements, name)
    }


def test_restarted_reconciler_keeps_ids_and_gives_new_rules_new_ones() -> None:
    fake = FakeNft()
    reconciler(fake).apply(SEED)
    add_traffic(fake)
    doc = seed()
    doc["snat"].append({"name": "snat2", "eip": "my-eip2", "internalCIDR": "10.55.0.0/16"})
    reconciler(fake).apply(state_of(doc))
    assert connections(fake) == {
        "1": (SEED_IDS["1"], Counter(10, 1000)),
        "2": (SEED_IDS["2"], Counter(20, 2000)),
        "3": (SEED_IDS["3"], Counter(30, 3000)),
        "4": ("snat/snat2/10.115.55.201", Counter(0, 0)),
    }
    tx = fake.transactions[-1]
    changed = {getattr(op, "set_name", None) for op in tx.operations}
    assert changed >= {"snat_p16_rule", key_shard("rule_connections", "4")}
    # Only the id high-water mark moves (3 -> 4); no rule element is deleted.
    assert [op for op in tx.operations if isinstance(op, DeleteElements)] == [DeleteElements("id_high_water", ("3",))]


def test_restart_with_a_changed_state_applies_only_the_difference() -> None:
    fake = FakeNft()
    reconciler(fake).apply(SEED)
    reconciler(fake).apply(moved_dnat())
    assert fake.transactions[-1].operations == [
        DeleteElements("dnat_target", (DNAT_KEY,)),
        AddElements("dnat_target", ((DNAT_KEY, Element("172.20.10.4 . 80")),)),
    ]


def test_restart_does_not_reuse_the_id_of_a_rule_deleted_before_it() -> None:
    fake = FakeNft()
    first = reconciler(fake)
    first.apply(SEED)
    doc = seed()
    doc["fip"] = []
    first.apply(state_of(doc))  # id 3 deleted; its conntrack entries may still carry mark 3
    doc["fip"] = [{"name": "fip02", "eip": "my-eip2", "internalIp": "172.20.10.4"}]
    reconciler(fake).apply(state_of(doc))  # the daemon restarted in between
    assert "3" not in connections(fake)


# --- resync: drift repair ----------------------------------------------------------------------


def test_resync_before_any_apply_does_nothing() -> None:
    fake = FakeNft()
    outcome = reconciler(fake).resync()
    repairs = outcome.repairs
    assert (outcome, repairs) == (Outcome(), {})
    assert fake.table is None


def test_resync_without_drift_repairs_nothing() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    outcome = rec.resync()
    repairs = outcome.repairs
    assert repairs == {}
    assert outcome.nft_operations == 0
    assert len(fake.transactions) == 1


def test_resync_recreates_a_deleted_table_with_ids_and_counters() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(moved_dnat())
    add_traffic(fake)
    read = rec.counting_sets()
    assert counted_elements(read["rule_connections"])["2"].counter == Counter(20, 2000)
    fake.count("rule_connections", "2", 5, 100)  # after the last read: lost with the table
    fake.delete_table()
    outcome = rec.resync()
    repairs = outcome.repairs
    assert fake.transactions[-1].operations[0] == AddTable()
    assert repairs == {"nftables": len(fake.transactions[-1].operations)}
    assert outcome.nft_operations == repairs["nftables"]
    assert kernel(fake) == expected_contents(moved_dnat())
    assert connections(fake) == {
        "1": (SEED_IDS["1"], Counter(10, 1000)),
        "2": (SEED_IDS["2"], Counter(20, 2000)),
        "3": (SEED_IDS["3"], Counter(30, 3000)),
    }
    assert kernel(fake).elements[key_shard("rule_traffic", "reply . 3")]["reply . 3"].counter == Counter(90, 4500)
    assert kernel(fake).elements["dnat_target"][DNAT_KEY].value == "172.20.10.4 . 80"


def test_resync_seeds_from_its_own_last_read() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    fake.count("rule_connections", "1", 3, 100)
    for _ in range(FULL_READ_EVERY):  # no one committed, but every few resyncs read the kernel
        assert rec.resync().repairs == {}  # no drift, but the kernel's counters were read
    fake.delete_table()
    rec.resync()
    assert connections(fake)["1"] == (SEED_IDS["1"], Counter(3, 300))


def test_resync_repairs_an_element_deleted_by_hand() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    del fake.foreign().elements["dnat_target"][DNAT_KEY]
    outcome = rec.resync()
    repairs = outcome.repairs
    assert repairs == {"nftables": 1}
    assert fake.transactions[-1].operations == [
        AddElements("dnat_target", ((DNAT_KEY, Element("172.20.10.2 . 80")),)),
    ]
    assert outcome.changed_elements == 1
    assert kernel(fake) == expected_contents(SEED)


def test_resync_restores_a_counting_element_with_its_last_known_counter() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    fake.count("rule_connections", "2", 4, 100)
    rec.counting_sets()
    del fake.foreign().elements[key_shard("rule_connections", "2")]["2"]
    repairs = rec.resync().repairs
    assert repairs == {"nftables": 1}
    assert connections(fake)["2"] == (SEED_IDS["2"], Counter(4, 400))


def test_resync_repairs_a_changed_map_value() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    fake.foreign().elements["dnat_target"][DNAT_KEY] = Element("6.6.6.6 . 22")
    repairs = rec.resync().repairs
    assert repairs == {"nftables": 2}
    assert kernel(fake).elements["dnat_target"][DNAT_KEY] == Element("172.20.10.2 . 80")


def test_resync_repairs_a_flushed_chain() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    fake.foreign().chains["prerouting"] = ()
    repairs = rec.resync().repairs
    assert kernel(fake) == expected_contents(SEED)
    assert repairs == {"nftables": 1 + len(expected_contents(SEED).chains["prerouting"])}


def test_resync_reports_forwarding_and_link_repairs() -> None:
    forwarding, links = Forwarding(), FakeLinks()
    rec = Reconciler(FakeNft(), links, ensure_forwarding=forwarding)
    rec.apply(SEED)
    forwarding.turn_off()
    links.changes = ["add 10.115.55.200/21 to net2", "add route 10.55.0.0/16 via 172.20.10.1"]
    outcome = rec.resync()
    repairs = outcome.repairs
    assert repairs == {"forwarding": 1, "addresses_routes": 2}
    assert outcome.link_changes == ["add 10.115.55.200/21 to net2", "add route 10.55.0.0/16 via 172.20.10.1"]


def test_apply_sees_drift_when_the_ruleset_generation_moved() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    del fake.foreign().elements["eips"]["10.115.55.201"]
    # Someone else changed the ruleset: the apply diffs against the kernel, not memory.
    assert rec.apply(SEED).nft_operations == 1
    assert "10.115.55.201" in kernel(fake).elements["eips"]
    assert rec.resync().repairs == {}


# --- failures ---------------------------------------------------------------------------------


def refuse_moving_dnat(fake: FakeNft, rec: Reconciler) -> None:
    """The transaction that moves dnat01 is refused before it reaches the kernel."""
    fake.fail_next = "boom"
    with pytest.raises(NftError, match=r"^boom$"):
        rec.apply(moved_dnat())


def test_failed_transaction_raises_and_leaves_the_previous_state() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    add_traffic(fake)
    before = copy.deepcopy(fake.table)
    refuse_moving_dnat(fake, rec)
    assert fake.table == before
    assert counters(fake) == {k: e.counter for k, e in _counting(before).items()}
    assert rec.state == SEED
    assert len(fake.transactions) == 1


def test_after_a_failure_the_next_apply_reads_the_kernel() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    refuse_moving_dnat(fake, rec)
    # Someone else changes the kernel meanwhile: the next plan must start from it.
    del fake.foreign().elements["eips"]["10.115.55.201"]
    outcome = rec.apply(moved_dnat())
    assert fake.transactions[-1].operations == [
        AddElements("eips", (("10.115.55.201", Element()),)),
        DeleteElements("dnat_target", (DNAT_KEY,)),
        AddElements("dnat_target", ((DNAT_KEY, Element("172.20.10.4 . 80")),)),
    ]
    assert outcome.changed_elements == 3
    assert kernel(fake) == expected_contents(moved_dnat())
    assert rec.state == moved_dnat()


def test_apply_after_the_table_vanished_recreates_it_with_its_counters() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    add_traffic(fake)
    rec.counting_sets()
    fake.delete_table()
    rec.apply(moved_dnat())  # the generation moved: read the kernel (no table), create it whole
    assert fake.transactions[-1].operations[0] == AddTable()
    assert kernel(fake) == expected_contents(moved_dnat())
    assert connections(fake) == {
        "1": (SEED_IDS["1"], Counter(10, 1000)),
        "2": (SEED_IDS["2"], Counter(20, 2000)),
        "3": (SEED_IDS["3"], Counter(30, 3000)),
    }


def test_resync_after_a_refused_apply_leaves_the_table_as_planned() -> None:
    # The refused transaction never reached the kernel, so the generation did not move;
    # the resync must still read the kernel, not re-create the table on top of it.
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    add_traffic(fake)
    before = counters(fake)
    refuse_moving_dnat(fake, rec)
    outcome = rec.resync()
    assert kernel(fake) == expected_contents(SEED)
    assert {name: len(tags) for name, tags in kernel(fake).chains.items()} == {
        name: len(tags) for name, tags in expected_contents(SEED).chains.items()
    }
    assert outcome.nft_operations == 0 and outcome.repairs == {}
    assert counters(fake) == before
    rec.apply(moved_dnat())
    assert kernel(fake) == expected_contents(moved_dnat())


def test_sighup_after_a_refused_apply_reapplies_without_duplicates() -> None:
    # SIGHUP: the file is applied again, then a resync; both after the refusal.
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    refuse_moving_dnat(fake, rec)
    rec.apply(moved_dnat())
    assert rec.resync().repairs == {}
    assert kernel(fake) == expected_contents(moved_dnat())


def test_memory_is_trusted_while_no_one_else_commits() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    reads = 0
    read_table = fake.read_table

    def counting_read() -> TableContents | None:
        nonlocal reads
        reads += 1
        return read_table()

    fake.read_table = counting_read  # type: ignore[method-assign]
    rec.apply(moved_dnat())
    for _ in range(FULL_READ_EVERY - 1):
        rec.resync()
    assert reads == 0
    rec.resync()
    assert reads == 1, "every few resyncs the kernel is read even without a foreign commit"
    fake.foreign()
    rec.apply(SEED)
    assert reads == 2, "a foreign commit makes the next sync read the kernel"


def test_failed_resync_repair_is_retried() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(SEED)
    fake.delete_table()
    fake.fail_next = "boom"
    with pytest.raises(NftError, match="boom"):
        rec.resync()
    assert fake.table is None
    repairs = rec.resync().repairs
    assert repairs == {"nftables": len(fake.transactions[-1].operations)}
    assert kernel(fake) == expected_contents(SEED)


def test_first_transaction_on_an_empty_kernel_is_the_plan_from_nothing() -> None:
    # The reconciler's first transaction on an empty kernel is exactly the plan from nothing.
    fake = FakeNft()
    reconciler(fake).apply(SEED)
    table = desired_table(SEED, assign_ids(SEED, {}))
    assert fake.transactions[0].operations == plan_transaction(None, table).operations


# --- share DNAT groups ---------------------------------------------------------------------------


def with_share_group(*backends: str) -> DesiredState:
    doc = seed()
    for index, ip in enumerate(backends):
        doc["dnat"].append(
            {
                "name": f"web-{index}",
                "eip": "my-eip",
                "protocol": "tcp",
                "externalPort": 9000,
                "internalIp": ip,
                "internalPort": 8080,
                "type": "share",
            }
        )
    return state_of(doc)


def test_share_group_grows_and_goes_keeping_counters() -> None:
    fake = FakeNft()
    rec = reconciler(fake)
    rec.apply(with_share_group("172.20.10.2"))
    web0 = next(k for k, (comment, _) in connections(fake).items() if comment == "dnat/web-0/10.115.55.200")
    fake.count("rule_connections", web0, 7, 100)
    rec.apply(with_share_group("172.20.10.2", "172.20.10.3"))
    assert connections(fake)[web0] == ("dnat/web-0/10.115.55.200", Counter(7, 700))
    assert len(kernel(fake).elements["share_target"]) == 2
    share_chains = [name for name in kernel(fake).chains if name.startswith("share_")]
    assert len(share_chains) == 1
    assert len(kernel(fake).chains[share_chains[0]]) == 2
    rec.apply(SEED)
    # Emptied now, deleted by the next transaction (kernels before 6.2 would refuse both at once).
    assert kernel(fake).chains[share_chains[0]] == ()
    assert kernel(fake).elements["share_target"] == {}
    assert kernel(fake).elements["dnat_share"] == {}
    assert rec.resync().repairs == {}, "deleting the emptied chain is no drift"
    assert kernel(fake).chains == expected_contents(SEED).chains
    assert rec.resync().nft_operations == 0
