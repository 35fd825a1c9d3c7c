"""natgwd.state.validation for IPv6: dual-stack EIPs (v6ip), IPv6 addresses, routes and rules in
a version 1 file, rules that mix families refused naming the field, and the hints a
version 1 file with an IPv6 address in an IPv4 field gets."""

from __future__ import annotations

import copy
import json
from ipaddress import IPv4Address, IPv6Address, IPv6Interface, IPv6Network
from typing import Any

import pytest

from natgwd.lab.topology import DUAL_STACK_STATE, SEED_STATE
from natgwd.state.validation import InvalidStateError, Problem, load_state


def dual() -> dict[str, Any]:
    return copy.deepcopy(DUAL_STACK_STATE)


def problems_of(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidStateError) as caught:
        load_state(json.dumps(doc).encode())
    return [(p.path, p.reason) for p in caught.value.problems]


def test_the_dual_stack_seed_loads_with_both_families() -> None:
    state = load_state(json.dumps(DUAL_STACK_STATE).encode())
    assert state.eips[0].v4ip == IPv4Address("10.115.55.200")
    assert state.eips[0].v6ip == IPv6Address("fd00:115::200")
    assert state.external.gateway6 == IPv6Address("fd00:115::fe")
    assert IPv6Interface("fd00:10::fe/64") in state.internal.addresses
    assert state.internal.routes[1].dst == IPv6Network("fd00:55::/64")
    assert [s.family for s in state.snat] == [4, 6]
    eips = {e.name: e for e in state.eips}
    assert [(d.family, str(eips[d.eip].address(d.family))) for d in state.dnat] == [
        (4, "10.115.55.200"),
        (6, "fd00:115::200"),
    ]
    assert [(f.family, str(eips[f.eip].address(f.family))) for f in state.fip] == [
        (4, "10.115.55.201"),
        (6, "fd00:115::201"),
    ]


def test_a_version_1_file_without_ipv6_is_unchanged() -> None:
    state = load_state(json.dumps(SEED_STATE).encode())
    assert all(e.v6ip is None for e in state.eips)
    assert state.external.gateway6 is None


def test_an_ipv6_only_eip() -> None:
    doc = dual()
    doc["eips"].append({"name": "only6", "v6ip": "fd00:115::300"})
    doc["snat"].append({"name": "s6", "eip": "only6", "internalCIDR": "fd00:10::40/124"})
    state = load_state(json.dumps(doc).encode())
    assert state.eips[2].v4ip is None
    assert state.eip_interfaces(state.eips[2]) == (IPv6Interface("fd00:115::300/64"),)


def test_an_eip_needs_an_address() -> None:
    doc = dual()
    doc["eips"].append({"name": "empty"})
    doc["snat"].append({"name": "s6", "eip": "empty", "internalCIDR": "fd00:10::40/124"})
    assert problems_of(doc) == [("$.eips[2].v4ip", "required field is missing (an EIP needs v4ip, v6ip or both)")]


@pytest.mark.parametrize(
    ("section", "field", "value", "family", "missing"),
    [
        ("snat", "internalCIDR", "fd00:10::/64", "IPv6", "v6ip"),
        ("dnat", "internalIp", "fd00:10::2", "IPv6", "v6ip"),
        ("fip", "internalIp", "fd00:10::3", "IPv6", "v6ip"),
    ],
)
def test_a_rule_mixing_families_is_refused_naming_the_field(
    section: str, field: str, value: str, family: str, missing: str
) -> None:
    doc = copy.deepcopy(SEED_STATE)  # IPv4-only EIPs
    doc["internal"]["addresses"].append("fd00:10::fe/64")
    doc[section][0][field] = value
    [(path, reason)] = problems_of(doc)
    assert path == f"$.{section}[0].{field}"
    assert f"is {family} but EIP" in reason and f"has no {missing}" in reason
    assert "a rule translates within one family" in reason


def test_an_ipv4_rule_on_an_ipv6_only_eip_is_refused() -> None:
    doc = dual()
    doc["eips"][0] = {"name": "my-eip", "v6ip": "fd00:115::200"}
    why = (
        "but EIP 'my-eip' has no v4ip; a rule translates within one family (give the EIP a v4ip or use an IPv6 address)"
    )
    assert problems_of(doc) == [
        ("$.dnat[0].internalIp", f"172.20.10.2 is IPv4 {why}"),
        ("$.snat[0].internalCIDR", f"172.20.10.0/24 is IPv4 {why}"),
    ]


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        (("eips", 0, "v4ip"), "fd00:115::200", "an IPv6 address goes in v6ip, beside v4ip"),
        (("external", "gateway"), "fd00:115::fe", "an IPv6 address goes in gateway6, beside gateway"),
    ],
)
def test_an_ipv6_address_in_an_ipv4_field_names_the_new_field(field: tuple[Any, ...], value: str, hint: str) -> None:
    doc = copy.deepcopy(SEED_STATE)
    target: Any = doc
    for part in field[:-1]:
        target = target[part]
    target[field[-1]] = value
    problems = problems_of(doc)
    assert any(hint in reason for _, reason in problems), problems


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("fd00:115:::1", "not a valid IPv6 address"),
        ("ff02::1", "ff02::1 is not a usable unicast address"),
        ("::1", "::1 is not a usable unicast address"),
        ("::", ":: is not a usable unicast address"),
        ("fe80::1", "link-local or IPv4-mapped"),
        ("::ffff:10.0.0.1", "is not a usable unicast address"),
    ],
)
def test_invalid_v6ip(value: str, reason: str) -> None:
    doc = dual()
    doc["eips"].append({"name": "third", "v6ip": value})
    [(path, got)] = problems_of(doc)
    assert path == "$.eips[2].v6ip" and reason in got


def test_duplicate_v6ip() -> None:
    doc = dual()
    doc["eips"].append({"name": "third", "v6ip": "fd00:115::200"})
    assert ("$.eips[2].v6ip", "duplicates eips[0] ('fd00:115::200')") in problems_of(doc)


def test_duplicate_v6ip_spelled_differently() -> None:
    # Two names for one address would put their DNAT rules under one map key: one would win.
    doc = dual()
    doc["eips"].append({"name": "third", "v6ip": "FD00:115:0::200"})
    doc["dnat"].append({**doc["dnat"][1], "name": "d-third", "eip": "third"})
    assert problems_of(doc) == [("$.eips[2].v6ip", "duplicates eips[0] ('FD00:115:0::200', that is fd00:115::200)")]


def test_ipv6_cidr_with_host_bits_suggests_the_network() -> None:
    doc = dual()
    doc["snat"][1]["internalCIDR"] = "fd00:10::5/64"
    assert problems_of(doc) == [("$.snat[1].internalCIDR", "has host bits set (did you mean fd00:10::/64?)")]


def test_unreachable_ipv6_internal_ip() -> None:
    doc = dual()
    doc["fip"][1]["internalIp"] = "fd00:99::3"
    assert problems_of(doc) == [
        ("$.fip[1].internalIp", "fd00:99::3 is in no internal address's subnet and no internal route")
    ]


def test_ipv6_route_nexthop_must_be_on_an_internal_ipv6_subnet() -> None:
    doc = dual()
    doc["internal"]["routes"][1]["via"] = "fd00:11::1"
    assert problems_of(doc)[0] == (
        "$.internal.routes[1].via",
        "nexthop fd00:11::1 is not in the subnet of any internal address",
    )


def test_an_ipv6_default_route_inside_conflicts_with_gateway6_only() -> None:
    doc = dual()
    doc["internal"]["routes"].append({"dst": "::/0", "via": "fd00:10::1"})
    assert ("$.internal.routes", "a default route (::/0) conflicts with external.gateway6") in problems_of(doc)
    del doc["external"]["gateway6"]
    load_state(json.dumps(doc).encode())


def test_gateway6_may_be_link_local_but_an_eip_may_not() -> None:
    doc = dual()
    doc["external"]["gateway6"] = "fe80::1"
    assert load_state(json.dumps(doc).encode()).external.gateway6 == IPv6Address("fe80::1")


def test_dual_stack_eip_takes_one_fip_per_family_and_the_same_port_in_both() -> None:
    doc = dual()
    doc["fip"].append({"name": "fip02-6", "eip": "my-eip2", "internalIp": "fd00:10::4"})
    assert problems_of(doc) == [("$.fip[2].eip", "duplicates fip[1] ('my-eip2')")]
    # dnat01 and dnat01-6 share eip, protocol and port: different families, no overlap.
    state = load_state(json.dumps(dual()).encode())
    assert [d.external_port for d in state.dnat] == [state.dnat[0].external_port] * 2


def test_dnat_overlap_within_ipv6_is_found() -> None:
    doc = dual()
    doc["dnat"].append({**doc["dnat"][1], "name": "again", "internalIp": "fd00:10::4"})
    [(path, reason)] = problems_of(doc)
    assert path == "$.dnat[2].externalPort" and "overlaps dnat[1]" in reason


def test_problem_type() -> None:
    assert str(Problem("$.a", "b")) == "$.a: b"
