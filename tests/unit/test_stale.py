"""natgwd.planning.stale.changed_filters: the conntrack dumps a change needs, found by comparing
rules by value, also when most of them are the very objects of the last state."""

from __future__ import annotations

import copy
import json
from typing import Any

from natgwd.lab.topology import SEED_STATE
from natgwd.planning.stale import Filter, changed_filters
from natgwd.state.model import DesiredState
from natgwd.state.validation import load_state

DNAT_EIP = "10.115.55.200"


def seed() -> dict[str, Any]:
    document: dict[str, Any] = copy.deepcopy(SEED_STATE)
    document["dnat"].append(
        {
            "name": "web",
            "eip": "my-eip",
            "protocol": "tcp",
            "externalPort": 80,
            "internalIp": "172.20.10.5",
            "internalPort": 8080,
        }
    )
    return document


def load(document: dict[str, Any]) -> DesiredState:
    return load_state(json.dumps(document).encode())


def test_a_changed_dnat_target_needs_its_eip_dumped_and_nothing_else() -> None:
    first = load(seed())
    changed = seed()
    changed["dnat"][1]["internalIp"] = "172.20.10.6"
    assert changed_filters(first, load(changed)) == [Filter("orig", "daddr", DNAT_EIP)]


def test_equal_rules_that_are_other_objects_need_nothing() -> None:
    first = load(seed())
    respelled = seed()
    respelled["dnat"][1]["externalPort"] = "80"  # the same rule, spelled as a string
    second = load(respelled)
    assert second.dnat[1] is not first.dnat[1]
    assert second.dnat[1] == first.dnat[1]
    assert changed_filters(first, second) == []


def test_a_removed_dnat_needs_its_eip_dumped() -> None:
    first = load(seed())
    removed = seed()
    del removed["dnat"][1]
    assert changed_filters(first, load(removed)) == [Filter("orig", "daddr", DNAT_EIP)]
