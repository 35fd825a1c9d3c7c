"""Schema and semantic problems of one file are reported together (issue 17, item 3): the
semantic pass runs without the rules and EIPs the schema refused, or says why it did not run."""

from __future__ import annotations

import json
from typing import Any

import pytest

from natgwd.lab.topology import SEED_STATE
from natgwd.state.validation import InvalidStateError, load_state

SKIPPED = "the checks of addresses, EIP references, duplicates, conflicts and reachability were skipped"
DNS_LABEL = "must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit"


def seed() -> dict[str, Any]:
    copied: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    return copied


def rejected(document: Any) -> InvalidStateError:
    with pytest.raises(InvalidStateError) as caught:
        load_state(json.dumps(document).encode())
    return caught.value


def listed(error: InvalidStateError) -> list[tuple[str, str]]:
    return [(p.path, p.reason) for p in error.problems]


def test_schema_and_semantic_problems_are_listed_together() -> None:
    doc = seed()
    doc["eips"].append({"name": "Upper-EIP", "v4ip": "10.115.55.202"})  # schema
    doc["dnat"][0]["externalPort"] = 70000  # schema
    doc["snat"][0]["internalCIDR"] = "172.20.10.1/24"  # semantics: host bits
    doc["fip"].append({"name": "fip02", "eip": "nope", "internalIp": "172.20.10.4"})  # semantics: unknown EIP
    doc["fip"].append({"name": "fip01", "eip": "my-eip2", "internalIp": "172.20.10.5"})  # semantics: duplicates
    error = rejected(doc)
    assert error.skipped is None
    assert listed(error) == [
        ("$.dnat[0].externalPort", 'must be a port 1-65535 (integer or string) or a range "first-last"'),
        ("$.eips[2].name", DNS_LABEL),
        ("$.fip[1].eip", "names EIP 'nope', which is not in eips"),
        ("$.fip[2].eip", "duplicates fip[0] ('my-eip2')"),
        ("$.fip[2].name", "duplicates fip[0] ('fip01')"),
        ("$.snat[0].internalCIDR", "has host bits set (did you mean 172.20.10.0/24?)"),
    ]


def test_a_rule_naming_a_refused_eip_is_not_called_unknown() -> None:
    doc = seed()
    doc["eips"][1]["v4ip"] = "10.115.55.x"  # refused by the schema, name kept
    doc["snat"].append({"name": "lan2", "eip": "missing", "internalCIDR": "172.20.11.0/24"})
    assert listed(rejected(doc)) == [
        ("$.eips[1].v4ip", "must be an IPv4 address such as 10.115.55.200"),
        ("$.snat[1].eip", "names EIP 'missing', which is not in eips"),
    ]  # fip[0] names my-eip2, the refused EIP: not reported again


def test_an_eip_without_a_usable_name_silences_unknown_eip_reports() -> None:
    doc = seed()
    doc["eips"][0]["name"] = 7
    error = rejected(doc)
    assert listed(error) == [("$.eips[0].name", "must be a string")]
    assert error.skipped is None


def test_duplicates_are_found_among_the_items_the_schema_accepted() -> None:
    doc = seed()
    rule = doc["dnat"][0]
    doc["dnat"] = [
        {**rule, "protocol": "sctp"},
        {**rule, "name": "web"},
        {**rule, "name": "web", "externalPort": "8889"},
    ]
    assert listed(rejected(doc)) == [
        ("$.dnat[0].protocol", 'must be one of "tcp", "udp"'),
        ("$.dnat[2].name", "duplicates dnat[1] ('web')"),
    ]


@pytest.mark.parametrize(
    ("change", "needs"),
    [
        (lambda doc: doc.update(version=2), "$.version"),
        (lambda doc: doc["internal"].pop("interface"), "$.internal.interface"),
        (lambda doc: doc.update(snat={"name": "x"}), "$.snat"),
        (
            lambda doc: doc["external"].update(addresses=["10.115.48.1"], colour="red"),
            "$.external.addresses[0] and 1 more",
        ),
    ],
)
def test_semantic_checks_are_skipped_with_the_reason_when_the_frame_is_wrong(change: Any, needs: str) -> None:
    doc = seed()
    doc["dnat"][0]["internalIp"] = "172.20.99.2"  # unreachable: found only by the semantic pass
    change(doc)
    error = rejected(doc)
    assert error.skipped == f"{SKIPPED}: they need {needs} fixed first"
    assert all(p.path != "$.dnat[0].internalIp" for p in error.problems)
    assert str(error).endswith(f"; {error.skipped}")


def test_semantic_checks_are_skipped_when_there_are_too_many_problems() -> None:
    doc = seed()
    doc["snat"] = [{"name": f"S{i}", "eip": "my-eip", "internalCIDR": f"10.{i}.0.0/16"} for i in range(150)]
    error = rejected(doc)
    assert len(error.problems) == 101
    assert ("$", "more problems not listed (stopped at 100)") in listed(error)
    assert error.skipped == f"{SKIPPED}: too many problems"


def test_a_single_semantic_problem_is_unchanged() -> None:
    doc = seed()
    doc["snat"][0]["eip"] = "nope"
    error = rejected(doc)
    assert listed(error) == [("$.snat[0].eip", "names EIP 'nope', which is not in eips")]
    assert error.skipped is None
