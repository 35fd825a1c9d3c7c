"""natgwd.planning.table (transactions), natgwd.kernel.fake (atomicity, references, generations) and
natgwd.kernel.nft.parse_table (the kernel's JSON read back into the same TableContents the plan
produces)."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from natgwd.kernel.fake import FakeNft
from natgwd.kernel.nft import NftError, parse_table
from natgwd.lab.topology import SEED_STATE
from natgwd.planning.layout import share_chain_name, whole_set
from natgwd.planning.plan import assign_ids, desired_table
from natgwd.planning.table import (
    ELEMENTS_PER_COMMAND,
    AddChain,
    AddElements,
    AddRule,
    AddSet,
    AddTable,
    ChainSpec,
    Counter,
    DeleteChain,
    DeleteElements,
    DeleteNamed,
    DesiredTable,
    Element,
    FlushChain,
    SetSpec,
    TableContents,
    Transaction,
    plan_transaction,
    render_element,
    rule_tag,
)
from natgwd.state.validation import load_state

DNAT_KEY = "10.115.55.200 . tcp . 8888"


def seed() -> dict[str, Any]:
    copied: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    return copied


def planned(document: dict[str, Any]) -> DesiredTable:
    state = load_state(json.dumps(document).encode())
    return desired_table(state, assign_ids(state, {}))


def seed_table() -> DesiredTable:
    return planned(seed())


def ops_of(tx: Transaction, kind: type) -> list[Any]:
    return [op for op in tx.operations if isinstance(op, kind)]


# --- rendering ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "element", "text"),
    [
        ("10.115.55.200", Element(), "10.115.55.200"),
        (DNAT_KEY, Element("172.20.10.2 . 80"), f"{DNAT_KEY} : 172.20.10.2 . 80"),
        ("7", Element(comment="dnat/d/10.115.55.200"), '7 comment "dnat/d/10.115.55.200"'),
        ("7", Element(comment="c", counter=Counter(5, 300)), '7 counter packets 5 bytes 300 comment "c"'),
        ("k", Element("v", "c", Counter(1, 2)), 'k counter packets 1 bytes 2 comment "c" : v'),
        ("original . 7", Element(counter=Counter(0, 0)), "original . 7 counter packets 0 bytes 0"),
    ],
)
def test_render_element(key: str, element: Element, text: str) -> None:
    assert render_element(key, element) == text


def test_render_operations() -> None:
    spec = SetSpec("dnat_rule", "type ipv4_addr . inet_proto . inet_service : mark;")
    assert AddTable().render() == "add table inet natgwd"
    assert spec.keyword == "map"
    assert SetSpec("eips", "type ipv4_addr;").keyword == "set"
    assert AddSet(spec).render() == (
        "add map inet natgwd dnat_rule { type ipv4_addr . inet_proto . inet_service : mark; }"
    )
    assert AddSet(SetSpec("rule_connections", "type mark; counter;")).render() == (
        "add set inet natgwd rule_connections { type mark; counter; }"
    )
    assert DeleteNamed("snat_p24_rule", "map").render() == "delete map inet natgwd snat_p24_rule"
    assert AddChain("forward", "type filter hook forward priority filter; policy accept;").render() == (
        "add chain inet natgwd forward { type filter hook forward priority filter; policy accept; }"
    )
    assert FlushChain("forward").render() == "flush chain inet natgwd forward"
    assert AddRule("forward", "ct state invalid drop", "natgwd:0123").render() == (
        'add rule inet natgwd forward ct state invalid drop comment "natgwd:0123"'
    )
    add = AddElements("dnat_rule", ((DNAT_KEY, Element("2")), ("10.115.55.200 . udp . 53", Element("3"))))
    assert add.render() == (
        "add element inet natgwd dnat_rule { 10.115.55.200 . tcp . 8888 : 2, 10.115.55.200 . udp . 53 : 3 }"
    )
    delete = DeleteElements("invalid_dropped", ('"net2"', '"net3"'))
    assert delete.render() == 'delete element inet natgwd invalid_dropped { "net2", "net3" }'


def test_rule_tag_depends_on_header_and_rule() -> None:
    tag = rule_tag("h", "r")
    assert tag.startswith("natgwd:") and len(tag) == 23
    assert tag == rule_tag("h", "r")
    assert len({tag, rule_tag("h2", "r"), rule_tag("h", "r2")}) == 3
    chain = ChainSpec("c", "h", ("r", "r2"))
    assert chain.tags == (tag, rule_tag("h", "r2"))


def test_script_is_one_line_per_operation() -> None:
    tx = Transaction()
    tx.add(AddTable())
    tx.add(FlushChain("forward"))
    assert tx.script() == "add table inet natgwd\nflush chain inet natgwd forward\n"
    assert Transaction().script() == ""
    assert not Transaction()
    assert tx


# --- plan_transaction ---------------------------------------------------------------------


def test_from_nothing_creates_the_table() -> None:
    table = seed_table()
    tx = plan_transaction(None, table)
    ops = tx.operations
    assert ops[0] == AddTable()
    assert ops[1 : 1 + len(table.sets)] == [AddSet(spec) for spec in table.sets]
    assert ops_of(tx, AddChain) == [AddChain(c.name, c.header) for c in table.chains]
    assert ops_of(tx, AddRule) == [
        AddRule(c.name, rule, tag) for c in table.chains for rule, tag in zip(c.rules, c.tags, strict=True)
    ]
    # Chains (which reference the sets) come after every set, elements after the chains.
    first_chain = ops.index(ops_of(tx, AddChain)[0])
    assert all(isinstance(op, AddSet) for op in ops[1:first_chain])
    adds = ops_of(tx, AddElements)
    assert ops.index(adds[0]) > ops.index(ops_of(tx, AddRule)[-1])
    # One command per non-empty set (the seed is far below ELEMENTS_PER_COMMAND).
    assert {a.set_name: dict(a.elements) for a in adds} == {n: dict(e) for n, e in table.elements.items() if e}
    assert len(adds) == len({n for n, e in table.elements.items() if e})
    assert ops_of(tx, DeleteElements) == ops_of(tx, DeleteNamed) == ops_of(tx, FlushChain) == []
    assert tx.changed_elements == 21  # 20 rule elements and the id high-water mark
    assert len(ops) == 1 + len(table.sets) + len(table.chains) + sum(len(c.rules) for c in table.chains) + len(adds)


def test_from_an_existing_but_empty_table_does_not_add_the_table() -> None:
    tx = plan_transaction(TableContents(), seed_table())
    assert AddTable() not in tx.operations
    assert isinstance(tx.operations[0], AddSet)


def test_equal_contents_need_no_transaction() -> None:
    table = seed_table()
    tx = plan_transaction(table.contents(), table)
    assert not tx
    assert tx.operations == []
    assert tx.changed_elements == 0
    assert tx.script() == ""


def test_counters_never_make_elements_differ() -> None:
    table = seed_table()
    current = table.contents()
    for elements in current.elements.values():
        for key, element in elements.items():
            elements[key] = Element(element.value, element.comment, Counter(9, 999))
    assert not plan_transaction(current, table)


def test_changed_map_value_is_delete_and_add_of_that_key_only() -> None:
    table = seed_table()
    doc = seed()
    doc["dnat"][0]["internalIp"] = "172.20.10.4"
    tx = plan_transaction(table.contents(), planned(doc))
    assert tx.operations == [
        DeleteElements("dnat_target", (DNAT_KEY,)),
        AddElements("dnat_target", ((DNAT_KEY, Element("172.20.10.4 . 80")),)),
    ]
    assert tx.changed_elements == 2


def test_unchanged_elements_are_left_alone() -> None:
    doc = seed()
    doc["dnat"][0].update(externalPort="9000-9009", internalPort="9000-9009")
    before = planned(doc)
    doc["dnat"][0]["internalPort"] = "9100-9109"  # every target changes...
    doc["eips"].append({"name": "my-eip3", "v4ip": "10.115.55.202"})  # ...and one EIP is added
    tx = plan_transaction(before.contents(), planned(doc))
    assert [type(op).__name__ + ":" + getattr(op, "set_name", "") for op in tx.operations] == [
        "AddElements:eips",
        "DeleteElements:dnat_target",
        "AddElements:dnat_target",
    ]
    assert tx.operations[0] == AddElements("eips", (("10.115.55.202", Element()),))
    assert len(tx.operations[1].keys) == 10
    assert tx.changed_elements == 1 + 10 + 10


def test_removed_rule_deletes_its_elements() -> None:
    table = seed_table()
    doc = seed()
    doc["fip"] = []
    state = load_state(json.dumps(doc).encode())
    # The high-water mark keeps the deleted rule's id (3) out of reach of new rules.
    tx = plan_transaction(table.contents(), desired_table(state, assign_ids(state, {}), highest_id=3))
    assert tx.operations == [
        DeleteElements("fip_in_target", ("10.115.55.201",)),
        DeleteElements("fip_in_rule", ("10.115.55.201",)),
        DeleteElements("fip_out_target", ("172.20.10.3",)),
        DeleteElements("fip_out_rule", ("172.20.10.3",)),
        DeleteElements("rule_connections_3", ("3",)),
        DeleteElements("rule_traffic_3", ("original . 3", "reply . 3")),
    ]
    assert tx.changed_elements == 7


def test_chain_whose_tags_differ_is_flushed_and_re_added() -> None:
    table = seed_table()
    current = table.contents()
    current.chains["account"] = ("natgwd:0000000000000000",)
    tx = plan_transaction(current, table)
    (account,) = [c for c in table.chains if c.name == "account"]
    assert tx.operations == [
        FlushChain("account"),
        AddRule("account", account.rules[0], account.tags[0]),
    ]
    assert tx.changed_elements == 0


def test_chain_with_a_foreign_extra_rule_is_rewritten() -> None:
    table = seed_table()
    current = table.contents()
    current.chains["forward"] = (*current.chains["forward"], "")
    tx = plan_transaction(current, table)
    assert [type(op) for op in tx.operations] == [FlushChain, AddRule]


def test_missing_chain_is_added_with_its_header() -> None:
    table = seed_table()
    current = table.contents()
    del current.chains["prerouting"]
    tx = plan_transaction(current, table)
    (pre,) = [c for c in table.chains if c.name == "prerouting"]
    assert tx.operations == [
        AddChain("prerouting", pre.header),
        *[AddRule("prerouting", r, t) for r, t in zip(pre.rules, pre.tags, strict=True)],
    ]


def test_unused_snat_map_is_deleted_after_the_chain_stops_using_it() -> None:
    before = seed_table()  # SNAT 172.20.10.0/24: snat_p24_*
    doc = seed()
    doc["snat"][0]["internalCIDR"] = "172.20.0.0/16"
    doc["internal"]["addresses"] = ["172.20.10.254/16"]
    tx = plan_transaction(before.contents(), planned(doc))
    kinds = [type(op) for op in tx.operations]
    assert tx.operations[:2] == [
        AddSet(SetSpec("snat_p16_target", "type ipv4_addr : ipv4_addr;")),
        AddSet(SetSpec("snat_p16_rule", "type ipv4_addr : mark;")),
    ]
    assert tx.operations[-2:] == [DeleteNamed("snat_p24_rule", "map"), DeleteNamed("snat_p24_target", "map")]
    flush = tx.operations.index(FlushChain("postrouting"))
    rules = [i for i, op in enumerate(tx.operations) if isinstance(op, AddRule)]
    assert rules == [flush + 1, flush + 2, flush + 3, flush + 4]
    assert "@snat_p16_rule" in tx.operations[rules[-1]].rule
    assert not any("snat_p24" in op.rule for op in ops_of(tx, AddRule))
    # The p24 maps are dropped whole: no element-by-element deletes for them.
    assert [op.set_name for op in ops_of(tx, DeleteElements)] == []
    assert {op.set_name for op in ops_of(tx, AddElements)} == {"snat_p16_target", "snat_p16_rule"}
    assert kinds.index(DeleteNamed) > max(rules)


def test_unused_snat_map_deletion_applies_on_the_fake() -> None:
    fake = FakeNft()
    before = seed_table()
    fake.apply(plan_transaction(None, before))
    doc = seed()
    doc["snat"][0]["internalCIDR"] = "172.20.10.7"
    after = planned(doc)
    fake.apply(plan_transaction(fake.read_table(), after))
    assert fake.table is not None
    assert fake.table.sets == after.contents().sets
    assert "snat_p24_rule" not in fake.table.elements
    assert set(fake.table.elements["snat_p32_rule"]) == {"172.20.10.7"}
    assert not plan_transaction(fake.read_table(), after)


class Known:
    """Last known counters, given as (set, key) -> counter."""

    def __init__(self, counters: dict[tuple[str, str], Counter]) -> None:
        self._counters = counters

    def of(self, set_name: str) -> dict[str, Counter]:
        """By logical set, as CounterMemory: "rule_connections_2" is seeded from "rule_connections"."""
        return {key: counter for (name, key), counter in self._counters.items() if name == whole_set(set_name)}


def test_recreated_counting_elements_are_seeded() -> None:
    table = seed_table()
    counters = {
        ("rule_connections", "2"): Counter(5, 300),
        ("rule_traffic", "reply . 2"): Counter(7, 900),
        ("invalid_dropped", '"net2"'): Counter(1, 40),
        ("dnat_rule", "not-a-key"): Counter(1, 1),
    }
    tx = plan_transaction(None, table, Known(counters))
    script = tx.script().splitlines()
    # Rules are planned SNAT, DNAT, FIP (ids 1, 2, 3): the elements keep that order.
    # Each rule's elements are in its shard (its id's low bits).
    assert 'add element inet natgwd rule_connections_1 { 1 comment "snat/my-snat/10.115.55.200" }' in script
    assert (
        "add element inet natgwd rule_connections_2 { "
        '2 counter packets 5 bytes 300 comment "dnat/dnat01/10.115.55.200" }'
    ) in script
    assert 'add element inet natgwd rule_connections_3 { 3 comment "fip/fip01/10.115.55.201" }' in script
    assert "add element inet natgwd rule_traffic_1 { original . 1, reply . 1 }" in script
    assert "add element inet natgwd rule_traffic_2 { original . 2, reply . 2 counter packets 7 bytes 900 }" in script
    assert "add element inet natgwd rule_traffic_3 { original . 3, reply . 3 }" in script
    assert 'add element inet natgwd invalid_dropped { "net2" counter packets 1 bytes 40 }' in script
    assert sum("counter packets" in line for line in script) == 3


def test_counters_are_not_seeded_into_elements_that_stay() -> None:
    table = seed_table()
    current = table.contents()
    del current.elements["rule_connections_1"]["1"]
    counters = {("rule_connections", "1"): Counter(3, 30), ("rule_connections", "2"): Counter(5, 300)}
    tx = plan_transaction(current, table, Known(counters))
    assert tx.operations == [
        AddElements("rule_connections_1", (("1", Element(comment="snat/my-snat/10.115.55.200")),)),
    ]
    assert tx.operations[0].elements[0][1].counter == Counter(3, 30)
    assert tx.script() == (
        "add element inet natgwd rule_connections_1 "
        '{ 1 counter packets 3 bytes 30 comment "snat/my-snat/10.115.55.200" }\n'
    )


def big_table(count: int) -> DesiredTable:
    keys = {f"10.{i // 65536}.{i // 256 % 256}.{i % 256}": Element() for i in range(count)}
    return DesiredTable((SetSpec("eips", "type ipv4_addr;"),), (), {"eips": keys})


def test_elements_are_chunked_per_command() -> None:
    count = 2 * ELEMENTS_PER_COMMAND + 904
    tx = plan_transaction(TableContents(sets={"eips": "set"}), big_table(count))
    sizes = [len(op.elements) for op in tx.operations]
    assert all(isinstance(op, AddElements) for op in tx.operations)
    assert sizes == [ELEMENTS_PER_COMMAND, ELEMENTS_PER_COMMAND, 904]
    assert tx.changed_elements == count
    assert [k for op in tx.operations for k, _ in op.elements] == list(big_table(count).elements["eips"])


def test_deletes_are_chunked_per_command() -> None:
    count = ELEMENTS_PER_COMMAND + 1
    current = big_table(count).contents()
    empty = DesiredTable((SetSpec("eips", "type ipv4_addr;"),), (), {"eips": {}})
    tx = plan_transaction(current, empty)
    assert [len(op.keys) for op in tx.operations] == [ELEMENTS_PER_COMMAND, 1]
    assert all(isinstance(op, DeleteElements) for op in tx.operations)
    assert tx.changed_elements == count


def test_exactly_one_chunk_at_the_limit() -> None:
    tx = plan_transaction(TableContents(sets={"eips": "set"}), big_table(ELEMENTS_PER_COMMAND))
    assert [len(op.elements) for op in tx.operations] == [ELEMENTS_PER_COMMAND]


# --- the fake kernel ------------------------------------------------------------------------


def applied_fake() -> FakeNft:
    fake = FakeNft()
    fake.apply(plan_transaction(None, seed_table()))
    fake.count("rule_connections", "2", 4, 60)
    return fake


def test_fake_holds_what_was_planned() -> None:
    fake = applied_fake()
    table = seed_table()
    assert fake.table == table.contents()
    assert fake.table is not None
    assert fake.table.elements["rule_connections_2"]["2"].counter == Counter(4, 240)
    assert fake.table.elements["rule_connections_1"]["1"].counter == Counter(0, 0)
    assert len(fake.transactions) == 1


def test_failing_operation_leaves_the_fake_table_unchanged() -> None:
    fake = applied_fake()
    before = copy.deepcopy(fake.table)
    tx = Transaction()
    tx.add_elements("eips", [("10.115.55.250", Element())])
    tx.add(FlushChain("prerouting"))
    tx.delete_elements("dnat_target", ["10.115.55.200 . tcp . 9999"])  # not there: fails
    with pytest.raises(NftError, match=re.escape("element 10.115.55.200 . tcp . 9999")):
        fake.apply(tx)
    assert fake.table == before
    assert fake.table is not None and before is not None
    assert fake.table.elements["rule_connections_2"]["2"].counter == Counter(4, 240)
    assert "10.115.55.250" not in fake.table.elements["eips"]
    assert fake.table.chains["prerouting"] == before.chains["prerouting"]
    assert len(fake.transactions) == 1


def test_adding_an_existing_key_with_another_value_fails_whole() -> None:
    fake = applied_fake()
    before = copy.deepcopy(fake.table)
    tx = Transaction()
    tx.delete_elements("eips", ["10.115.55.201"])
    tx.add_elements("dnat_target", [(DNAT_KEY, Element("172.20.10.9 . 80"))])
    with pytest.raises(NftError, match="File exists"):
        fake.apply(tx)
    assert fake.table == before
    assert fake.table is not None
    assert set(fake.table.elements["eips"]) == {"10.115.55.200", "10.115.55.201"}


def test_fail_next_refuses_one_transaction() -> None:
    fake = applied_fake()
    before = copy.deepcopy(fake.table)
    fake.fail_next = "boom"
    tx = Transaction()
    tx.add_elements("eips", [("10.115.55.250", Element())])
    with pytest.raises(NftError, match="boom"):
        fake.apply(tx)
    assert fake.table == before
    fake.apply(tx)
    assert fake.table is not None and "10.115.55.250" in fake.table.elements["eips"]


def test_fake_check_changes_nothing() -> None:
    fake = applied_fake()
    before = copy.deepcopy(fake.table)
    tx = Transaction()
    tx.delete_elements("eips", ["10.115.55.201"])
    fake.check(tx)
    assert fake.table == before
    tx.delete_elements("eips", ["10.115.55.201"])  # twice: the second fails
    with pytest.raises(NftError):
        fake.check(tx)


def test_operations_without_a_table_fail() -> None:
    fake = FakeNft()
    tx = Transaction()
    tx.add(FlushChain("forward"))
    with pytest.raises(NftError, match="no table"):
        fake.apply(tx)
    assert fake.table is None
    assert fake.read_table() is None
    assert fake.read_counters(("rule_connections",)) == {}


# --- parse_table (libnftables 1.0.6 JSON) ----------------------------------------------------

RULE_CONNECTIONS_JSON = {
    "set": {
        "family": "inet",
        "name": "rule_connections",
        "table": "natgwd",
        "type": "mark",
        "handle": 13,
        "elem": [
            {"elem": {"val": 7, "comment": "dnat/dnat01/10.115.55.200", "counter": {"packets": 5, "bytes": 300}}},
            {"elem": {"val": 12, "comment": "snat/s/10.115.55.200", "counter": {"packets": 0, "bytes": 0}}},
        ],
        "stmt": [{"counter": None}],
    }
}
RULE_TRAFFIC_JSON = {
    "set": {
        "family": "inet",
        "name": "rule_traffic",
        "table": "natgwd",
        "type": ["ct_dir", "mark"],
        "handle": 14,
        "elem": [
            {"elem": {"val": {"concat": ["original", 7]}, "counter": {"packets": 3, "bytes": 100}}},
            {"elem": {"val": {"concat": ["reply", 7]}, "counter": {"packets": 2, "bytes": 80}}},
        ],
        "stmt": [{"counter": None}],
    }
}
DNAT_TARGET_JSON = {
    "map": {
        "family": "inet",
        "name": "dnat_target",
        "table": "natgwd",
        "type": ["ipv4_addr", "inet_proto", "inet_service"],
        "handle": 9,
        "map": "ipv4_addr . inet_service",
        "elem": [
            [{"concat": ["10.115.55.200", "tcp", 8888]}, {"concat": ["172.20.10.2", 80]}],
            [{"concat": ["10.115.55.200", "udp", 53]}, {"concat": ["172.20.10.3", 5353]}],
        ],
    }
}
DNAT_RULE_JSON = {
    "map": {
        "family": "inet",
        "name": "dnat_rule",
        "table": "natgwd",
        "type": ["ipv4_addr", "inet_proto", "inet_service"],
        "handle": 10,
        "map": "mark",
        "elem": [[{"concat": ["10.115.55.200", "tcp", 8888]}, 7]],
    }
}
INVALID_JSON = {
    "set": {
        "family": "inet",
        "name": "invalid_dropped",
        "table": "natgwd",
        "type": "ifname",
        "handle": 15,
        "elem": ["net2"],
        "stmt": [{"counter": None}],
    }
}
INVALID_COUNTED_JSON = {
    "set": {
        **INVALID_JSON["set"],
        "elem": [{"elem": {"val": "net2", "counter": {"packets": 4, "bytes": 160}}}],
    }
}
EMPTY_MAP_JSON = {
    "map": {
        "family": "inet",
        "name": "fip_in_target",
        "table": "natgwd",
        "type": "ipv4_addr",
        "handle": 3,
        "map": "ipv4_addr",
    }
}
PREROUTING_JSON = {
    "chain": {
        "family": "inet",
        "table": "natgwd",
        "name": "prerouting",
        "handle": 1,
        "type": "nat",
        "hook": "prerouting",
        "prio": -100,
        "policy": "accept",
    }
}
FORWARD_JSON = {"chain": {"family": "inet", "table": "natgwd", "name": "forward", "handle": 2}}


def rule_json(chain: str, handle: int, comment: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "family": "inet",
        "table": "natgwd",
        "chain": chain,
        "handle": handle,
        "expr": [{"match": {"op": "==", "left": {"ct": {"key": "state"}}, "right": "invalid"}}, {"drop": None}],
    }
    if comment is not None:
        body["comment"] = comment
    return {"rule": body}


def test_parse_counting_set_with_comments_and_counters() -> None:
    contents = parse_table([RULE_CONNECTIONS_JSON])
    assert contents.sets == {"rule_connections": "set"}
    elements = contents.elements["rule_connections"]
    assert elements == {
        "7": Element(comment="dnat/dnat01/10.115.55.200"),
        "12": Element(comment="snat/s/10.115.55.200"),
    }
    assert elements["7"].counter == Counter(5, 300)
    assert elements["12"].counter == Counter(0, 0)


def test_parse_concatenated_set() -> None:
    elements = parse_table([RULE_TRAFFIC_JSON]).elements["rule_traffic"]
    assert list(elements) == ["original . 7", "reply . 7"]
    assert elements["original . 7"] == Element()
    assert elements["original . 7"].counter == Counter(3, 100)
    assert elements["reply . 7"].counter == Counter(2, 80)


def test_parse_concatenated_maps() -> None:
    contents = parse_table([DNAT_TARGET_JSON, DNAT_RULE_JSON])
    assert contents.sets == {"dnat_target": "map", "dnat_rule": "map"}
    assert contents.elements["dnat_target"] == {
        "10.115.55.200 . tcp . 8888": Element("172.20.10.2 . 80"),
        "10.115.55.200 . udp . 53": Element("172.20.10.3 . 5353"),
    }
    assert contents.elements["dnat_rule"] == {"10.115.55.200 . tcp . 8888": Element("7")}
    assert contents.elements["dnat_rule"]["10.115.55.200 . tcp . 8888"].counter is None


def test_parse_ifname_set_quotes_its_keys() -> None:
    assert parse_table([INVALID_JSON]).elements == {"invalid_dropped": {'"net2"': Element()}}
    counted = parse_table([INVALID_COUNTED_JSON]).elements["invalid_dropped"]
    assert list(counted) == ['"net2"']
    assert counted['"net2"'].counter == Counter(4, 160)


def test_parse_empty_map() -> None:
    contents = parse_table([EMPTY_MAP_JSON])
    assert contents.sets == {"fip_in_target": "map"}
    assert contents.elements == {"fip_in_target": {}}


def test_parse_chains_and_rule_tags_in_order() -> None:
    contents = parse_table(
        [
            {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "natgwd", "handle": 7}},
            PREROUTING_JSON,
            FORWARD_JSON,
            rule_json("prerouting", 4, "natgwd:abc"),
            rule_json("prerouting", 5, "natgwd:def"),
            rule_json("forward", 6, None),
        ]
    )
    assert contents.chains == {"prerouting": ("natgwd:abc", "natgwd:def"), "forward": ("",)}
    assert contents.sets == {}
    assert contents.elements == {}


def test_parse_empty_chain() -> None:
    assert parse_table([PREROUTING_JSON]).chains == {"prerouting": ()}


def _json_value(text: str) -> Any:
    parts: list[Any] = []
    for part in text.split(" . "):
        if part.isdigit():
            parts.append(int(part))
        elif part.startswith('"') and part.endswith('"'):
            parts.append(part[1:-1])
        else:
            parts.append(part)
    return parts[0] if len(parts) == 1 else {"concat": parts}


def _json_types(text: str) -> str | list[str]:
    types = text.split(" . ")
    return types[0] if len(types) == 1 else types


def as_libnftables_json(table: DesiredTable, counters: dict[tuple[str, str], Counter]) -> list[dict[str, Any]]:
    """What `nft -j list table inet natgwd` (1.0.6) prints for a table holding `table`."""
    objects: list[dict[str, Any]] = [
        {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "natgwd", "handle": 1}},
    ]
    handle = 2
    for spec in table.sets:
        definition = spec.body.split(";")[0].removeprefix("type ")
        key_type, _, value_type = definition.partition(" : ")
        body: dict[str, Any] = {
            "family": "inet",
            "name": spec.name,
            "table": "natgwd",
            "type": _json_types(key_type),
            "handle": handle,
        }
        if value_type:
            body["map"] = value_type
        counting = "counter;" in spec.body
        elems: list[Any] = []
        for key, element in table.elements[spec.name].items():
            item: Any = _json_value(key)
            if element.comment is not None or counting:
                wrapped: dict[str, Any] = {"val": item}
                if element.comment is not None:
                    wrapped["comment"] = element.comment
                if counting:
                    counter = counters.get((spec.name, key), Counter(0, 0))
                    wrapped["counter"] = {"packets": counter.packets, "bytes": counter.bytes}
                item = {"elem": wrapped}
            elems.append([item, _json_value(element.value)] if element.value is not None else item)
        if elems:
            body["elem"] = elems
        if counting:
            body["stmt"] = [{"counter": None}]
        objects.append({spec.keyword: body})
        handle += 1
    for chain in table.chains:
        objects.append({"chain": {"family": "inet", "table": "natgwd", "name": chain.name, "handle": handle}})
        handle += 1
    for chain in table.chains:
        for tag in chain.tags:
            rule = {"family": "inet", "table": "natgwd", "chain": chain.name, "handle": handle, "comment": tag}
            objects.append({"rule": {**rule, "expr": []}})
            handle += 1
    return objects


def test_parse_table_reads_back_what_the_plan_writes() -> None:
    doc = seed()
    doc["dnat"][0].update(externalPort="8000-8002", internalPort="80-82")
    table = planned(doc)
    counters = {("rule_connections_2", "2"): Counter(5, 300), ("rule_traffic_3", "reply . 3"): Counter(8, 800)}
    parsed = parse_table(json.loads(json.dumps(as_libnftables_json(table, counters))))
    expected = table.contents()
    assert parsed.sets == expected.sets
    assert parsed.chains == expected.chains
    assert {n: flat(e) for n, e in parsed.elements.items()} == {n: flat(e) for n, e in expected.elements.items()}
    assert parsed == expected
    assert not plan_transaction(parsed, table)
    assert parsed.elements["rule_connections_2"]["2"].counter == Counter(5, 300)
    assert parsed.elements["rule_traffic_3"]["reply . 3"].counter == Counter(8, 800)
    assert parsed.elements["invalid_dropped"]['"net2"'].counter == Counter(0, 0)


def flat(elements: dict[str, Element]) -> dict[str, tuple[str | None, str | None]]:
    return {key: (element.value, element.comment) for key, element in elements.items()}


# --- share DNAT groups: regular chains that come and go -------------------------------------


def share_document(*backends: tuple[str, str]) -> dict[str, Any]:
    doc = seed()
    for name, ip in backends:
        doc["dnat"].append(
            {
                "name": name,
                "eip": "my-eip",
                "protocol": "tcp",
                "externalPort": 9000,
                "internalIp": ip,
                "internalPort": 8080,
                "type": "share",
            }
        )
    return doc


SHARE_CHAIN = share_chain_name("10.115.55.200", "tcp", 9000)


def test_regular_chain_renders_without_a_header() -> None:
    assert AddChain(SHARE_CHAIN, "").render() == f"add chain inet natgwd {SHARE_CHAIN}"
    assert DeleteChain(SHARE_CHAIN).render() == f"delete chain inet natgwd {SHARE_CHAIN}"


def test_new_share_chain_is_added_before_the_elements_that_jump_to_it() -> None:
    tx = plan_transaction(seed_table().contents(), planned(share_document(("web-a", "172.20.10.2"))))
    ops = tx.operations
    add_chain = ops.index(AddChain(SHARE_CHAIN, ""))
    (vmap,) = [op for op in ops_of(tx, AddElements) if op.set_name == "dnat_share"]
    assert vmap.elements == (("10.115.55.200 . tcp . 9000", Element(f"goto {SHARE_CHAIN}")),)
    assert add_chain < ops.index(vmap)
    assert ops_of(tx, FlushChain) == []  # the base chains are unchanged


def test_adding_a_backend_rewrites_only_the_share_chain() -> None:
    one_state = load_state(json.dumps(share_document(("web-a", "172.20.10.2"))).encode())
    two_state = load_state(json.dumps(share_document(("web-a", "172.20.10.2"), ("web-b", "172.20.10.3"))).encode())
    one_ids = assign_ids(one_state, {})  # snat 1, dnat01 2, web-a 3, fip 4
    one, two = desired_table(one_state, one_ids), desired_table(two_state, assign_ids(two_state, one_ids))
    tx = plan_transaction(one.contents(), two)
    assert ops_of(tx, FlushChain) == [FlushChain(SHARE_CHAIN)]
    assert [op.rule for op in ops_of(tx, AddRule)] == [
        "ct mark set numgen random mod 2 map { 0 : 3, 1 : 5 }",
        "meta l4proto { tcp, udp } dnat ip to ct mark map @share_target",
    ]
    assert ops_of(tx, AddElements) == [
        AddElements("share_target", (("5", Element("172.20.10.3 . 8080")),)),
        AddElements("rule_connections_5", (("5", Element(comment="dnat/web-b/10.115.55.200")),)),
        AddElements("rule_traffic_5", (("original . 5", Element()), ("reply . 5", Element()))),
        AddElements("id_high_water", (("5", Element()),)),
    ]
    assert ops_of(tx, DeleteElements) == [DeleteElements("id_high_water", ("4",))]


def test_removed_share_group_empties_its_chain_and_deletes_it_in_a_later_transaction() -> None:
    fake = FakeNft()
    with_group = planned(share_document(("web-a", "172.20.10.2"), ("web-b", "172.20.10.3")))
    fake.apply(plan_transaction(None, with_group))
    tx = plan_transaction(fake.read_table(), seed_table())
    ops = tx.operations
    assert ops[-1] == FlushChain(SHARE_CHAIN)
    assert DeleteChain(SHARE_CHAIN) not in ops
    assert tx.emptied_chains == [SHARE_CHAIN]
    (unjump,) = [op for op in ops_of(tx, DeleteElements) if op.set_name == "dnat_share"]
    assert ops.index(unjump) < ops.index(FlushChain(SHARE_CHAIN))
    fake.apply(tx)
    assert kernel_chains(fake)[SHARE_CHAIN] == ()
    later = plan_transaction(fake.read_table(), seed_table())
    assert later.operations == [DeleteChain(SHARE_CHAIN)]
    assert later.finishing == 1
    fake.apply(later)
    assert fake.table == seed_table().contents()


def test_fake_refuses_to_delete_a_chain_whose_jump_is_deleted_in_the_same_transaction() -> None:
    # As kernels before 6.2 do: the reference of the deleted element is still counted.
    fake = FakeNft()
    fake.apply(plan_transaction(None, planned(share_document(("web-a", "172.20.10.2")))))
    before = copy.deepcopy(fake.table)
    assert before is not None
    tx = Transaction()
    tx.delete_elements("dnat_share", list(before.elements["dnat_share"]))
    tx.add(FlushChain(SHARE_CHAIN))
    tx.add(DeleteChain(SHARE_CHAIN))
    with pytest.raises(NftError, match="chain is referenced"):
        fake.apply(tx)
    assert fake.table == before


def test_fake_checks_references() -> None:
    fake = FakeNft()
    fake.apply(plan_transaction(None, seed_table()))
    for operation, refusal in (
        (AddRule("prerouting", "ip daddr @nowhere accept", "t1"), "No such file"),
        (AddRule("prerouting", "jump nowhere", "t2"), "No such file"),
        (AddElements("dnat_share", (("10.115.55.200 . tcp . 1", Element("goto nowhere")),)), "No such file"),
        (DeleteNamed("eips", "set"), "set is referenced"),
    ):
        tx = Transaction()
        tx.add(operation)
        with pytest.raises(NftError, match=refusal):
            fake.apply(tx)


def test_fake_generation_moves_by_one_per_commit() -> None:
    fake = FakeNft()
    first = fake.generation()
    fake.apply(plan_transaction(None, seed_table()))
    assert fake.generation() == first + 1
    fake.apply(Transaction())  # nothing to commit: the kernel is not asked
    fake.count("rule_connections", "1", 5, 100)  # traffic is no commit
    assert fake.generation() == first + 1
    fake.foreign().chains["prerouting"] = ()
    assert fake.generation() == first + 2
    fake.delete_table()
    assert fake.generation() == first + 3


def kernel_chains(fake: FakeNft) -> dict[str, tuple[str, ...]]:
    assert fake.table is not None
    return fake.table.chains


def test_fake_refuses_to_delete_a_chain_with_rules() -> None:
    fake = FakeNft()
    fake.apply(plan_transaction(None, seed_table()))
    tx = Transaction()
    tx.add(AddChain("lonely", ""))
    tx.add(AddRule("lonely", "accept", "t"))
    fake.apply(tx)
    before = copy.deepcopy(fake.table)
    tx = Transaction()
    tx.add(DeleteChain("lonely"))
    with pytest.raises(NftError, match="not empty"):
        fake.apply(tx)
    assert fake.table == before


def test_parse_verdict_map() -> None:
    objects = [
        {
            "map": {
                "family": "inet",
                "name": "dnat_share",
                "table": "natgwd",
                "type": ["ipv4_addr", "inet_proto", "inet_service"],
                "handle": 11,
                "map": "verdict",
                "elem": [[{"concat": ["10.115.55.200", "tcp", 9000]}, {"goto": {"target": SHARE_CHAIN}}]],
            }
        },
        {"chain": {"family": "inet", "table": "natgwd", "name": SHARE_CHAIN, "handle": 12}},
    ]
    contents = parse_table(objects)
    assert contents.elements == {"dnat_share": {"10.115.55.200 . tcp . 9000": Element(f"goto {SHARE_CHAIN}")}}
    assert contents.chains == {SHARE_CHAIN: ()}
