"""natgwd.planning.plan.decode_rules: the rules a table holds, read back from its elements,
are exactly the rules planned into it, with their ids and labels (the table names EIPs by
address). Kube-OVN's take-over (natgwd.kubeovn.kernelrules) and `natgwd status` read the
table through it, so this round trip is what keeps them true to the layout planning writes."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natgwd.kernel.fake import FakeNft
from natgwd.lab.topology import SEED_STATE
from natgwd.planning.layout import RULE_CONNECTIONS, shards
from natgwd.planning.plan import TablePlan, TableRule, assign_ids, decode_rules, eip_texts, labels_of
from natgwd.planning.table import TableContents, plan_transaction
from natgwd.state.model import DesiredState
from natgwd.state.validation import load_state
from tests.unit.test_properties import valid_documents


def planned_rules(state: DesiredState, ids: dict[Any, int]) -> list[TableRule]:
    """The rules of a state as the table holds them: EIPs by address, with their ids."""
    eip_text = eip_texts(state)
    found = []
    for rule in (*state.snat, *state.dnat, *state.fip):
        labels = labels_of(rule, eip_text)
        found.append(TableRule(ids[labels], labels, replace(rule, eip=eip_text[rule.eip, rule.family])))
    return sorted(found, key=lambda r: r.mark)


def decoded(contents: TableContents | None) -> list[TableRule]:
    assert contents is not None
    return sorted(decode_rules(contents), key=lambda r: r.mark)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_documents(), st.integers(0, 2**31))
def test_the_rules_planned_into_a_table_are_the_rules_read_back(document: dict[str, Any], highest_used: int) -> None:
    state = load_state(json.dumps(document).encode())
    plan = TablePlan(state, assign_ids(state, {}, highest_used), highest_used)
    assert decoded(plan.table.contents()) == planned_rules(state, plan.ids)
    # As the kernel holds it (the fake lists a share chain's members as the kernel does).
    nft = FakeNft()
    nft.apply(plan_transaction(None, plan.table))
    assert decoded(nft.read_table()) == planned_rules(state, plan.ids)


def some_rules(document: dict[str, Any], keep: list[bool]) -> dict[str, Any]:
    """The document with some of its rules (a valid document stays valid without any)."""
    flags = iter(keep * 1000)
    return document | {k: [r for r in document.get(k, []) if next(flags)] for k in ("snat", "dnat", "fip")}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_documents(), st.lists(st.booleans(), min_size=1), st.lists(st.booleans(), min_size=1))
def test_a_table_changed_rule_by_rule_reads_back_as_the_new_rules(
    document: dict[str, Any], first: list[bool], second: list[bool]
) -> None:
    """The delta path's table (rules removed and added) reads back as the new state's rules."""
    before = load_state(json.dumps(some_rules(document, first)).encode())
    after = load_state(json.dumps(some_rules(document, second)).encode())
    rules_before = {*before.snat, *before.dnat, *before.fip}
    rules_after = {*after.snat, *after.dnat, *after.fip}
    plan = TablePlan(before, assign_ids(before, {}))
    plan.commit(plan.change(after, tuple(rules_before - rules_after), tuple(rules_after - rules_before)))
    assert decoded(plan.table.contents()) == planned_rules(after, plan.ids)


def test_a_rule_without_its_labels_is_read_back_unnamed() -> None:
    state = load_state(json.dumps(SEED_STATE).encode())
    contents = TablePlan(state, assign_ids(state, {})).table.contents()
    for name in shards(RULE_CONNECTIONS):
        contents.elements[name] = {mark: replace(e, comment=None) for mark, e in contents.elements[name].items()}
    rules = decode_rules(contents)
    assert rules and all(r.labels is None and r.rule.name == "" for r in rules)
