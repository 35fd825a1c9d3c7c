"""natgwd.state.validation: every way a desired-state file can be wrong is reported as an
InvalidStateError carrying the JSON path and a reason, and nothing else ever escapes."""

from __future__ import annotations

import copy
import json
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from natgwd.lab.topology import SEED_STATE
from natgwd.state.decode import MAX_FILE_BYTES
from natgwd.state.model import (
    DesiredState,
    DnatRule,
    Eip,
    ExternalSide,
    FipRule,
    InternalSide,
    PortRange,
    Route,
    SnatRule,
)
from natgwd.state.validation import InvalidStateError, Problem, load_state

EXAMPLE_SEED = Path(__file__).parents[2] / "examples" / "seed.json"

SEED_MODEL = DesiredState(
    internal=InternalSide(
        "net1",
        (IPv4Interface("172.20.10.254/24"),),
        (Route(IPv4Network("10.55.0.0/16"), IPv4Address("172.20.10.1")),),
    ),
    external=ExternalSide("net2", (IPv4Interface("10.115.48.1/21"),), IPv4Address("10.115.55.254")),
    eips=(Eip("my-eip", IPv4Address("10.115.55.200")), Eip("my-eip2", IPv4Address("10.115.55.201"))),
    snat=(SnatRule("my-snat", "my-eip", IPv4Network("172.20.10.0/24")),),
    dnat=(DnatRule("dnat01", "my-eip", "tcp", PortRange(8888, 8888), IPv4Address("172.20.10.2"), PortRange(80, 80)),),
    fip=(FipRule("fip01", "my-eip2", IPv4Address("172.20.10.3")),),
)


def seed() -> dict[str, Any]:
    copied: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    return copied


def encode(document: Any) -> bytes:
    return json.dumps(document).encode()


def problems_of(raw: bytes | dict[str, Any]) -> list[Problem]:
    """The problems load_state reports; any exception but InvalidStateError fails the test."""
    data = raw if isinstance(raw, bytes) else encode(raw)
    with pytest.raises(InvalidStateError) as caught:
        load_state(data)
    assert caught.value.problems, "InvalidStateError without problems"
    assert all(isinstance(p, Problem) for p in caught.value.problems)
    return caught.value.problems


def only_problem(raw: bytes | dict[str, Any]) -> Problem:
    problems = problems_of(raw)
    assert len(problems) == 1, problems
    return problems[0]


def assert_only(raw: bytes | dict[str, Any], path: str, *reasons: str) -> Problem:
    problem = only_problem(raw)
    assert problem.path == path, problem
    for reason in reasons:
        assert reason in problem.reason, problem
    return problem


def dnat(name: str, eip: str, protocol: str, external: int | str, ip: str, internal: int | str) -> dict[str, Any]:
    return {
        "name": name,
        "eip": eip,
        "protocol": protocol,
        "externalPort": external,
        "internalIp": ip,
        "internalPort": internal,
    }


def with_third_eip(doc: dict[str, Any]) -> dict[str, Any]:
    doc["eips"].append({"name": "my-eip3", "v4ip": "10.115.55.202"})
    return doc


# --- the valid seed -----------------------------------------------------------------


def test_seed_state_builds_the_expected_model() -> None:
    assert load_state(encode(SEED_STATE)) == SEED_MODEL


def test_example_seed_file_is_the_lab_seed() -> None:
    raw = EXAMPLE_SEED.read_bytes()
    assert json.loads(raw) == SEED_STATE
    assert load_state(raw) == SEED_MODEL


def test_optional_sections_default_to_empty() -> None:
    doc = seed()
    for key in ("eips", "snat", "dnat", "fip"):
        del doc[key]
    del doc["internal"]["routes"]
    del doc["external"]["gateway"]
    state = load_state(encode(doc))
    assert (state.eips, state.snat, state.dnat, state.fip) == ((), (), (), ())
    assert state.internal.routes == ()
    assert state.external.gateway is None


def test_ports_as_integers_and_strings_build_the_same_rule() -> None:
    as_strings = seed()
    as_ints = seed()
    as_ints["dnat"][0]["externalPort"] = 8888
    as_ints["dnat"][0]["internalPort"] = 80
    assert load_state(encode(as_ints)) == load_state(encode(as_strings)) == SEED_MODEL


def test_port_range_string_builds_a_range() -> None:
    doc = seed()
    doc["dnat"][0]["externalPort"] = "8000-8002"
    doc["dnat"][0]["internalPort"] = "80-82"
    rule = load_state(encode(doc)).dnat[0]
    assert (rule.external_port, rule.internal_port) == (PortRange(8000, 8002), PortRange(80, 82))


def test_bare_address_internal_cidr_means_slash_32() -> None:
    doc = seed()
    doc["snat"][0]["internalCIDR"] = "172.20.10.7"
    assert load_state(encode(doc)).snat[0].internal_cidr == IPv4Network("172.20.10.7/32")


def test_bare_address_route_dst_means_slash_32() -> None:
    doc = seed()
    doc["internal"]["routes"][0]["dst"] = "10.55.0.9"
    assert load_state(encode(doc)).internal.routes[0].dst == IPv4Network("10.55.0.9/32")


def test_problem_and_error_text() -> None:
    doc = seed()
    doc["version"] = 2
    with pytest.raises(InvalidStateError) as caught:
        load_state(encode(doc))
    assert str(caught.value) == (
        "$.version: must be 1 (the only supported version); the checks of addresses, EIP references, "
        "duplicates, conflicts and reachability were skipped: they need $.version fixed first"
    )
    assert str(Problem("$.a", "b")) == "$.a: b"


# --- shape: unknown fields, types, required ------------------------------------------


def test_unknown_top_level_field() -> None:
    doc = seed()
    doc["eipz"] = []
    allowed = (
        "allowed here: bgp, dnat, eips, external, externals, fip, ha, internal, qosPolicies, qosPolicy, scaleOut, "
        "snat, timeouts, version"
    )
    assert_only(doc, "$.eipz", "unknown field", allowed)


@pytest.mark.parametrize(
    ("where", "path", "allowed"),
    [
        (("internal",), "$.internal.mtu", "addresses, interface, masquerade, routes"),
        (("internal", "routes", 0), "$.internal.routes[0].mtu", "dst, via"),
        (("external",), "$.external.mtu", "addresses, defaultRoute, gateway, gateway6, interface, name"),
        (("eips", 0), "$.eips[0].mtu", "bgp, draining, externalSubnet, name, qosPolicy, v4ip, v6ip"),
        (("snat", 0), "$.snat[0].mtu", "destinations, eip, eips, internalCIDR, name, portBlock, timeouts"),
        (("dnat", 0), "$.dnat[0].mtu", "eip, externalPort, internalIp, internalPort, name, protocol, timeouts, type"),
        (("fip", 0), "$.fip[0].mtu", "eip, internalIp, name, timeouts"),
    ],
)
def test_unknown_nested_field(where: tuple[str | int, ...], path: str, allowed: str) -> None:
    doc = seed()
    target: Any = doc
    for part in where:
        target = target[part]
    target["mtu"] = 1500
    assert_only(doc, path, "unknown field", f"(allowed here: {allowed})")


def test_internal_masquerade_is_a_boolean() -> None:
    doc = seed()
    doc["internal"]["masquerade"] = True
    assert load_state(encode(doc)).internal.masquerade is True
    assert load_state(encode(seed())).internal.masquerade is False
    doc["internal"]["masquerade"] = "yes"
    assert_only(doc, "$.internal.masquerade", "boolean")


def test_external_default_route_is_main_or_forwarded() -> None:
    doc = seed()
    assert load_state(encode(doc)).external.default_route == "main"
    doc["external"]["defaultRoute"] = "forwarded"
    assert load_state(encode(doc)).external.default_route == "forwarded"
    doc["external"]["defaultRoute"] = "table100"
    assert_only(doc, "$.external.defaultRoute", "main", "forwarded")


def test_misspelled_field_reports_unknown_and_missing() -> None:
    doc = seed()
    doc["snat"][0]["internalCidr"] = doc["snat"][0].pop("internalCIDR")
    assert [(p.path, p.reason) for p in problems_of(doc)] == [
        ("$.snat[0].internalCIDR", "required field is missing"),
        (
            "$.snat[0].internalCidr",
            "unknown field (allowed here: destinations, eip, eips, internalCIDR, name, portBlock, timeouts)",
        ),
    ]


@pytest.mark.parametrize(
    ("where", "value", "path", "reason"),
    [
        (("internal",), ["net1"], "$.internal", "must be an object"),
        (("internal", "addresses"), "172.20.10.254/24", "$.internal.addresses", "must be an array"),
        (("internal", "interface"), 1, "$.internal.interface", "must be a string"),
        (("external", "gateway"), None, "$.external.gateway", "must be a string"),
        (("eips",), {"name": "x"}, "$.eips", "must be an array"),
        (("eips", 0, "name"), 7, "$.eips[0].name", "must be a string"),
        (("snat", 0), "my-snat", "$.snat[0]", "must be an object"),
        (("dnat", 0, "protocol"), "sctp", "$.dnat[0].protocol", 'must be one of "tcp", "udp"'),
        (("dnat", 0, "externalPort"), True, "$.dnat[0].externalPort", "must be a port 1-65535"),
        (("dnat", 0, "internalPort"), [80], "$.dnat[0].internalPort", "must be a port 1-65535"),
        (("fip", 0, "internalIp"), 2886994435, "$.fip[0].internalIp", "must be a string"),
    ],
)
def test_wrong_type(where: tuple[str | int, ...], value: Any, path: str, reason: str) -> None:
    doc = seed()
    target: Any = doc
    for part in where[:-1]:
        target = target[part]
    target[where[-1]] = value
    assert_only(doc, path, reason)


@pytest.mark.parametrize("document", [[], "state", 1, None, True])
def test_top_level_must_be_an_object(document: Any) -> None:
    assert_only(encode(document), "$", "must be an object")


@pytest.mark.parametrize(
    ("where", "path"),
    [
        (("version",), "$.version"),
        (("internal",), "$.internal"),
        (("external", "interface"), "$.external.interface"),
        (("eips", 0, "v4ip"), "$.eips[0].v4ip"),
        (("dnat", 0, "internalPort"), "$.dnat[0].internalPort"),
    ],
)
def test_required_field_missing(where: tuple[str | int, ...], path: str) -> None:
    doc = seed()
    target: Any = doc
    for part in where[:-1]:
        target = target[part]
    del target[where[-1]]
    assert_only(doc, path, "required field is missing")


@pytest.mark.parametrize("version", [2, 0, "1", 10**100])
def test_version_other_than_1(version: Any) -> None:
    doc = seed()
    doc["version"] = version
    assert_only(doc, "$.version", "must be 1 (the only supported version)")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("My-Eip", "DNS-1123 label"),
        ("-eip", "DNS-1123 label"),
        ("eip_1", "DNS-1123 label"),
        ("a" * 64, "at most 63 characters"),
    ],
)
def test_invalid_name(name: str, reason: str) -> None:
    doc = seed()
    doc["snat"][0]["name"] = name
    assert_only(doc, "$.snat[0].name", reason)


@pytest.mark.parametrize("interface", ["net 1", "a" * 16, "", "-net1", "net1/0"])
def test_invalid_interface_name(interface: str) -> None:
    doc = seed()
    doc["external"]["interface"] = interface
    assert_only(doc, "$.external.interface", "must be an interface name")


# --- addresses and networks ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("10.115.55.300", "not a valid IPv4 address"),
        ("010.115.55.20", "not a valid IPv4 address"),
        ("10.115.55", "must be an IPv4 address such as 10.115.55.200"),
        ("eip.example.com", "must be an IPv4 address such as 10.115.55.200"),
        ("224.0.0.1", "224.0.0.1 is not a usable unicast address"),
        ("0.0.0.0", "0.0.0.0 is not a usable unicast address"),
        ("127.0.0.1", "127.0.0.1 is not a usable unicast address"),
        ("240.0.0.1", "240.0.0.1 is not a usable unicast address"),
        ("255.255.255.255", "is not a usable unicast address"),
    ],
)
def test_invalid_eip_address(value: str, reason: str) -> None:
    doc = with_third_eip(seed())  # an EIP no rule names, so nothing else depends on it
    doc["eips"][2]["v4ip"] = value
    assert_only(doc, "$.eips[2].v4ip", reason)


def test_invalid_eip_address_also_leaves_its_rules_without_eip() -> None:
    doc = seed()
    doc["eips"][1]["v4ip"] = "224.0.0.1"
    assert [(p.path, p.reason) for p in problems_of(doc)] == [
        ("$.eips[1].v4ip", "224.0.0.1 is not a usable unicast address"),
        ("$.fip[0].eip", "names EIP 'my-eip2', which is not in eips"),
    ]


def test_overlong_address_reports_length_and_format() -> None:
    doc = seed()
    doc["external"]["gateway"] = "10.115.55.2541234"
    problems = problems_of(doc)
    assert {p.path for p in problems} == {"$.external.gateway"}
    assert any("at most 15 characters" in p.reason for p in problems)
    assert any("must be an IPv4 address" in p.reason for p in problems)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("172.20.10.254", "must be an IPv4 or IPv6 address with prefix length"),
        ("172.20.10.254/33", "not a valid IPv4 address/prefix"),
        ("172.20.10.0/24", "172.20.10.0 is the network or broadcast address of 172.20.10.0/24"),
        ("172.20.10.255/24", "172.20.10.255 is the network or broadcast address of 172.20.10.0/24"),
        ("224.0.0.5/24", "224.0.0.5 is not a usable unicast address"),
    ],
)
def test_invalid_external_interface_address(value: str, reason: str) -> None:
    doc = seed()
    doc["external"]["addresses"] = [value]
    assert_only(doc, "$.external.addresses[0]", reason)


def test_point_to_point_prefixes_accept_every_address() -> None:
    doc = seed()
    doc["external"]["addresses"] = ["10.115.48.0/31", "10.115.49.7/32"]
    state = load_state(encode(doc))
    assert state.external.addresses == (IPv4Interface("10.115.48.0/31"), IPv4Interface("10.115.49.7/32"))


@pytest.mark.parametrize(
    ("value", "suggestion"),
    [("172.20.10.1/24", "172.20.10.0/24"), ("172.20.10.130/25", "172.20.10.128/25"), ("10.1.2.3/8", "10.0.0.0/8")],
)
def test_cidr_with_host_bits_suggests_the_network(value: str, suggestion: str) -> None:
    doc = seed()
    doc["snat"][0]["internalCIDR"] = value
    assert_only(doc, "$.snat[0].internalCIDR", f"has host bits set (did you mean {suggestion}?)")


def test_route_dst_with_host_bits_suggests_the_network() -> None:
    doc = seed()
    doc["internal"]["routes"][0]["dst"] = "10.55.1.0/16"
    assert_only(doc, "$.internal.routes[0].dst", "has host bits set (did you mean 10.55.0.0/16?)")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("172.20.10.0/40", "not a valid IPv4 network"),
        ("172.20.300.0/24", "not a valid IPv4 network"),
        ("172.20.10.0/", "must be an IPv4 or IPv6 network such as 172.20.10.0/24"),
        ("172.20.10.0/24 ", "must be an IPv4 or IPv6 network such as 172.20.10.0/24"),
    ],
)
def test_invalid_cidr(value: str, reason: str) -> None:
    doc = seed()
    doc["snat"][0]["internalCIDR"] = value
    assert_only(doc, "$.snat[0].internalCIDR", reason)


# --- ports ---------------------------------------------------------------------------


@pytest.mark.parametrize("port", [0, 65536, -1, 10**30])
def test_integer_port_out_of_range(port: int) -> None:
    doc = seed()
    doc["dnat"][0]["externalPort"] = port
    assert_only(doc, "$.dnat[0].externalPort", 'must be a port 1-65535 (integer or string) or a range "first-last"')


@pytest.mark.parametrize("port", ["0", "65536", "99999", "0-10", "65000-65536"])
def test_string_port_out_of_range(port: str) -> None:
    doc = seed()
    doc["dnat"][0]["internalPort"] = port
    doc["dnat"][0]["externalPort"] = port  # same length, so only the range is wrong
    problems = problems_of(doc)
    assert [(p.path, p.reason) for p in problems] == [
        ("$.dnat[0].externalPort", "ports must be between 1 and 65535"),
        ("$.dnat[0].internalPort", "ports must be between 1 and 65535"),
    ]


@pytest.mark.parametrize("port", ["80-", "-80", "80-90-100", "eighty", "80 ", "123456"])
def test_malformed_port_string(port: str) -> None:
    doc = seed()
    doc["dnat"][0]["externalPort"] = port
    assert_only(doc, "$.dnat[0].externalPort", "must be a port 1-65535")


def test_reversed_port_range() -> None:
    doc = seed()
    doc["dnat"][0]["externalPort"] = "8010-8000"
    assert_only(doc, "$.dnat[0].externalPort", "range 8010-8000 is reversed")


def test_port_ranges_of_unequal_length() -> None:
    doc = seed()
    doc["dnat"][0]["externalPort"] = "8000-8002"
    doc["dnat"][0]["internalPort"] = "80-81"
    assert_only(
        doc,
        "$.dnat[0].internalPort",
        "range 80-81 has 2 ports but externalPort 8000-8002 has 3; they must be the same length",
    )


def test_single_port_to_range_is_unequal_length() -> None:
    doc = seed()
    doc["dnat"][0]["internalPort"] = "80-81"
    assert_only(doc, "$.dnat[0].internalPort", "has 2 ports but externalPort 8888 has 1")


@pytest.mark.parametrize("port", [8888.0, 8e3])
def test_integral_float_port_is_rejected_or_accepted_but_never_crashes(port: float) -> None:
    raw = encode(seed()).replace(b'"externalPort": "8888"', b'"externalPort": ' + json.dumps(port).encode())
    assert raw != encode(seed())
    try:
        state = load_state(raw)
    except InvalidStateError as err:
        assert [p.path for p in err.problems] == ["$.dnat[0].externalPort"]
    else:
        assert state.dnat[0].external_port == PortRange(int(port), int(port))


def test_non_integral_float_port_is_rejected() -> None:
    doc = seed()
    doc["dnat"][0]["externalPort"] = 80.5
    assert_only(doc, "$.dnat[0].externalPort", "must be a port 1-65535")


# --- duplicates ----------------------------------------------------------------------


def test_duplicate_eip_name() -> None:
    doc = seed()
    doc["eips"].append({"name": "my-eip", "v4ip": "10.115.55.202"})
    assert_only(doc, "$.eips[2].name", "duplicates eips[0] ('my-eip')")


def test_duplicate_eip_address() -> None:
    doc = seed()
    doc["eips"].append({"name": "my-eip3", "v4ip": "10.115.55.200"})
    assert_only(doc, "$.eips[2].v4ip", "duplicates eips[0] ('10.115.55.200')")


def test_duplicate_snat_name() -> None:
    doc = seed()
    doc["snat"].append({"name": "my-snat", "eip": "my-eip", "internalCIDR": "10.55.0.0/16"})
    assert_only(doc, "$.snat[1].name", "duplicates snat[0] ('my-snat')")


def test_duplicate_snat_cidr() -> None:
    doc = seed()
    doc["snat"].append({"name": "other", "eip": "my-eip2", "internalCIDR": "172.20.10.0/24"})
    assert_only(doc, "$.snat[1].internalCIDR", "172.20.10.0/24 is already translated by snat[0]")


def test_duplicate_dnat_name() -> None:
    doc = seed()
    doc["dnat"].append(dnat("dnat01", "my-eip", "tcp", 2222, "172.20.10.4", 22))
    assert_only(doc, "$.dnat[1].name", "duplicates dnat[0] ('dnat01')")


def test_duplicate_fip_name() -> None:
    doc = with_third_eip(seed())
    doc["fip"].append({"name": "fip01", "eip": "my-eip3", "internalIp": "172.20.10.4"})
    assert_only(doc, "$.fip[1].name", "duplicates fip[0] ('fip01')")


def test_duplicate_route_dst() -> None:
    doc = seed()
    doc["internal"]["routes"].append({"dst": "10.55.0.0/16", "via": "172.20.10.2"})
    assert_only(doc, "$.internal.routes[1].dst", "duplicates internal.routes[0] (10.55.0.0/16)")


def test_two_fips_for_one_internal_ip() -> None:
    doc = with_third_eip(seed())
    doc["fip"].append({"name": "fip02", "eip": "my-eip3", "internalIp": "172.20.10.3"})
    assert_only(doc, "$.fip[1].internalIp", "duplicates fip[0] ('172.20.10.3')")


# --- references and conflicts ----------------------------------------------------------


@pytest.mark.parametrize("section", ["snat", "dnat", "fip"])
def test_rule_names_unknown_eip(section: str) -> None:
    doc = seed()
    doc[section][0]["eip"] = "no-such-eip"
    assert_only(doc, f"$.{section}[0].eip", "names EIP 'no-such-eip', which is not in eips")


def test_two_dnats_with_the_same_eip_protocol_and_port() -> None:
    doc = seed()
    doc["dnat"].append(dnat("dnat02", "my-eip", "tcp", "8888", "172.20.10.4", "8080"))
    assert_only(doc, "$.dnat[1].externalPort", "tcp port 8888 on EIP 'my-eip' overlaps dnat[0] (8888)")


def test_port_range_overlapping_a_later_single_port() -> None:
    doc = seed()
    doc["dnat"].append(dnat("dnat02", "my-eip", "tcp", "8880-8890", "172.20.10.4", "80-90"))
    # Reported on the rule that comes later in the document.
    assert_only(doc, "$.dnat[1].externalPort", "tcp port 8880-8890 on EIP 'my-eip' overlaps dnat[0] (8888)")


def test_overlap_with_a_wide_range_is_found_past_a_narrower_one() -> None:
    doc = seed()
    doc["dnat"] = [
        dnat("wide", "my-eip", "udp", "1000-2000", "172.20.10.2", "1000-2000"),
        dnat("inner", "my-eip", "udp", "1100-1200", "172.20.10.3", "1100-1200"),
        dnat("late", "my-eip", "udp", "1900", "172.20.10.4", "53"),
        dnat("clear", "my-eip", "udp", "2001", "172.20.10.4", "53"),
    ]
    assert [(p.path, p.reason) for p in problems_of(doc)] == [
        ("$.dnat[1].externalPort", "udp port 1100-1200 on EIP 'my-eip' overlaps dnat[0] (1000-2000)"),
        ("$.dnat[2].externalPort", "udp port 1900 on EIP 'my-eip' overlaps dnat[0] (1000-2000)"),
    ]


def test_adjacent_port_ranges_do_not_overlap() -> None:
    doc = seed()
    doc["dnat"].append(dnat("dnat02", "my-eip", "tcp", "8889-8890", "172.20.10.4", "89-90"))
    doc["dnat"].append(dnat("dnat03", "my-eip", "tcp", "8887", "172.20.10.4", "87"))
    assert [r.name for r in load_state(encode(doc)).dnat] == ["dnat01", "dnat02", "dnat03"]


def test_same_port_on_another_protocol_or_eip_is_fine() -> None:
    doc = with_third_eip(seed())
    doc["dnat"].append(dnat("dnat-udp", "my-eip", "udp", "8888", "172.20.10.4", "80"))
    doc["dnat"].append(dnat("dnat-eip3", "my-eip3", "tcp", "8888", "172.20.10.4", "80"))
    state = load_state(encode(doc))
    assert [(r.name, r.eip, r.protocol, r.external_port) for r in state.dnat] == [
        ("dnat01", "my-eip", "tcp", PortRange(8888, 8888)),
        ("dnat-udp", "my-eip", "udp", PortRange(8888, 8888)),
        ("dnat-eip3", "my-eip3", "tcp", PortRange(8888, 8888)),
    ]


def test_two_fips_on_one_eip() -> None:
    doc = seed()
    doc["fip"].append({"name": "fip02", "eip": "my-eip2", "internalIp": "172.20.10.4"})
    assert_only(doc, "$.fip[1].eip", "duplicates fip[0] ('my-eip2')")


def test_fip_and_dnat_on_the_same_eip() -> None:
    doc = seed()
    doc["fip"][0]["eip"] = "my-eip"
    assert_only(doc, "$.fip[0].eip", "EIP 'my-eip' is also used by a dnat rule; a FIP needs the EIP alone")


def test_snat_may_share_an_eip_with_dnat_and_fip() -> None:
    doc = seed()
    doc["snat"].append({"name": "snat2", "eip": "my-eip2", "internalCIDR": "10.55.0.0/16"})
    assert [r.eip for r in load_state(encode(doc)).snat] == ["my-eip", "my-eip2"]


# --- reachability ----------------------------------------------------------------------


@pytest.mark.parametrize("section", ["dnat", "fip"])
def test_internal_ip_not_reachable_from_the_internal_side(section: str) -> None:
    doc = seed()
    doc[section][0]["internalIp"] = "192.168.7.7"
    assert_only(
        doc, f"$.{section}[0].internalIp", "192.168.7.7 is in no internal address's subnet and no internal route"
    )


def test_internal_ip_in_the_external_subnet_is_not_reachable() -> None:
    doc = seed()
    doc["dnat"][0]["internalIp"] = "10.115.50.1"
    assert_only(doc, "$.dnat[0].internalIp", "10.115.50.1 is in no internal address's subnet")


def test_internal_ip_reachable_only_through_an_internal_route_is_accepted() -> None:
    doc = seed()
    doc["dnat"][0]["internalIp"] = "10.55.3.4"
    doc["fip"][0]["internalIp"] = "10.55.200.1"
    state = load_state(encode(doc))
    assert state.dnat[0].internal_ip == IPv4Address("10.55.3.4")
    assert state.fip[0].internal_ip == IPv4Address("10.55.200.1")


def test_route_is_what_makes_it_reachable() -> None:
    doc = seed()
    doc["dnat"][0]["internalIp"] = "10.55.3.4"
    del doc["internal"]["routes"]
    assert_only(doc, "$.dnat[0].internalIp", "10.55.3.4 is in no internal address's subnet and no internal route")


def test_route_nexthop_outside_internal_subnets() -> None:
    doc = seed()
    doc["internal"]["routes"][0]["via"] = "172.20.11.1"
    assert_only(doc, "$.internal.routes[0].via", "nexthop 172.20.11.1 is not in the subnet of any internal address")


def test_same_interface_for_internal_and_external() -> None:
    doc = seed()
    doc["external"]["interface"] = "net1"
    assert_only(doc, "$.external.interface", "must differ from internal.interface")


# --- several problems at once ------------------------------------------------------------


def test_every_semantic_problem_is_listed() -> None:
    doc = seed()
    doc["snat"][0]["eip"] = "ghost"
    doc["snat"].append({"name": "snat2", "eip": "my-eip", "internalCIDR": "10.55.0.1/16"})
    doc["dnat"][0]["externalPort"] = "90-80"
    doc["fip"][0]["internalIp"] = "192.168.0.9"
    doc["external"]["interface"] = "net1"
    problems = problems_of(doc)
    assert len(problems) == 5
    assert [p.path for p in problems] == [
        "$.dnat[0].externalPort",
        "$.external.interface",
        "$.fip[0].internalIp",
        "$.snat[0].eip",
        "$.snat[1].internalCIDR",
    ]


def test_every_shape_problem_is_listed() -> None:
    doc = seed()
    doc["extra"] = 1
    doc["eips"][0]["v4ip"] = "nope"
    doc["dnat"][0]["protocol"] = "icmp"
    del doc["fip"][0]["name"]
    problems = problems_of(doc)
    assert len(problems) == 4
    assert [p.path for p in problems] == ["$.dnat[0].protocol", "$.eips[0].v4ip", "$.extra", "$.fip[0].name"]


# --- bytes that are not a document -------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"   \n\t", b"\n"])
def test_empty_file(raw: bytes) -> None:
    assert_only(raw, "$", "file is empty")


def test_nul_byte() -> None:
    raw = encode(seed())
    at = raw.index(b"net1")
    assert_only(raw[:at] + b"\x00" + raw[at:], "$", f"file contains a NUL byte at offset {at}")


def test_invalid_utf8() -> None:
    raw = encode(seed())
    at = raw.index(b"my-snat")
    assert_only(raw[:at] + b"\xff" + raw[at:], "$", "file is not UTF-8", f"at byte {at}")


def test_latin1_file_is_not_utf8() -> None:
    doc = seed()
    doc["snat"][0]["name"] = "caf\u00e9"
    raw = json.dumps(doc, ensure_ascii=False).encode("latin-1")
    assert_only(raw, "$", "file is not UTF-8: invalid continuation byte", f"at byte {raw.index(0xE9)}")


def test_utf16_file_is_refused_for_its_nul_bytes() -> None:
    assert_only(json.dumps(seed()).encode("utf-16"), "$", "file contains a NUL byte at offset 3")


def test_duplicate_top_level_key() -> None:
    raw = b'{"version": 1, "version": 1, "internal": {}, "external": {}}'
    assert_only(raw, "$", "duplicate key 'version' in one object")


def test_duplicate_nested_key() -> None:
    raw = encode(seed()).replace(b'"name": "fip01"', b'"name": "fip01", "name": "fip02"')
    assert_only(raw, "$", "duplicate key 'name' in one object")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers(constant: str) -> None:
    raw = encode(seed()).replace(b'"externalPort": "8888"', f'"externalPort": {constant}'.encode())
    assert_only(raw, "$", f"not valid JSON: {constant} is not a JSON number")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_file(fraction: float) -> None:
    raw = json.dumps(seed(), indent=1).encode()
    assert_only(raw[: int(len(raw) * fraction)], "$", "not valid JSON:", "at line")


def test_trailing_garbage() -> None:
    assert_only(encode(seed()) + b"}", "$", "not valid JSON: Extra data")


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deep_nesting(opener: bytes) -> None:
    assert_only(opener * 100000, "$", "not valid JSON: nested too deeply")


def test_deep_nesting_inside_a_valid_document() -> None:
    raw = encode(seed()).replace(b'"fip": [', b'"fip": ' + b"[" * 100000, 1)
    assert_only(raw, "$", "nested too deeply")


def test_nesting_deeper_than_the_format_allows_names_the_place() -> None:
    document = seed()
    document["dnat"][0]["externalPort"] = json.loads("[" * 14 + "1" + "]" * 14)
    assert_only(document, "$.dnat[0].externalPort" + "[0]" * 14, "nested deeper than 16 levels")


def test_a_raw_delete_character_is_a_control_character() -> None:
    raw = encode(seed()).replace(b'"name": "dnat01"', b'"name": "dnat\x7f01"')
    problems = {(p.path, p.reason) for p in problems_of(raw)}
    assert ("$.dnat[0].name", "contains a control character") in problems


def test_an_escaped_control_character_is_found() -> None:
    raw = encode(seed()).replace(b'"name": "dnat01"', b'"name": "dnat\\u000101"')
    problems = {(p.path, p.reason) for p in problems_of(raw)}
    assert ("$.dnat[0].name", "contains a control character") in problems


@pytest.mark.parametrize("lookalike", [True, 1.0])
def test_a_port_equal_to_a_valid_one_in_python_is_still_checked(lookalike: Any) -> None:
    """Prevents: the schema check skipping a rule that equals, in Python, one that passed
    before (True == 1 == 1.0), and so accepting a boolean as a port."""
    document = seed()
    document["dnat"][0]["externalPort"] = 1
    load_state(encode(document))
    document["dnat"][0]["externalPort"] = lookalike
    with pytest.raises(InvalidStateError) as caught:
        load_state(encode(document))
    assert "$.dnat[0].externalPort" in {p.path for p in caught.value.problems}


def test_huge_integer_literal() -> None:
    raw = encode(seed()).replace(b'"version": 1', b'"version": 1' + b"0" * 10000)
    assert_only(raw, "$", "not valid JSON:", "digits")


def test_huge_exponent_is_not_the_version() -> None:
    raw = encode(seed()).replace(b'"version": 1', b'"version": 1e400')
    assert_only(raw, "$.version", "must be 1")


def test_file_over_the_size_limit() -> None:
    raw = encode(seed())
    raw += b" " * (MAX_FILE_BYTES + 1 - len(raw))
    assert len(raw) == MAX_FILE_BYTES + 1
    assert_only(raw, "$", f"file is larger than {MAX_FILE_BYTES} bytes")


def test_file_at_the_size_limit_is_read() -> None:
    raw = encode(seed())
    raw += b" " * (MAX_FILE_BYTES - len(raw))
    assert len(raw) == MAX_FILE_BYTES
    assert load_state(raw) == SEED_MODEL


# --- property: random damage never escapes as anything but InvalidStateError ---------


def _paths(node: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


SEED_PATHS = _paths(SEED_STATE)[1:]  # every key and item, not the root

# Values a hurried editor might put anywhere: near-miss strings, edge ports, any JSON.
_near_misses = st.sampled_from(
    [
        "", "0", "1", "65535", "65536", "80-79", "1-65535", "0.0.0.0", "255.255.255.255", "172.20.10.0",
        "172.20.10.255/24", "1.2.3.4/0", "999.1.1.1", "01.2.3.4", "1.2.3.4/33", "net1", "net2", "my-eip",
        "my-eip2", "10.55.1.1", "224.0.0.1", "tcp", "udp", "172.20.10.2", "10.115.55.200",
    ]
)  # fmt: skip
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | _near_misses
)
json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)

mutation = st.tuples(
    st.sampled_from(SEED_PATHS),
    st.sampled_from(["drop", "replace", "duplicate"]),
    json_values,
)


def _has(container: Any, part: str | int) -> bool:
    if isinstance(container, dict):
        return part in container
    return isinstance(container, list) and isinstance(part, int) and part < len(container)


def _mutate(document: dict[str, Any], path: tuple[str | int, ...], how: str, value: Any) -> None:
    parent: Any = document
    for part in path[:-1]:
        if not _has(parent, part):
            return  # an earlier mutation removed the way there
        parent = parent[part]
    last = path[-1]
    if not _has(parent, last):
        return
    if how == "drop":
        del parent[last]
    elif how == "replace":
        parent[last] = value
    elif isinstance(parent, list):
        parent.append(copy.deepcopy(parent[last]))
    else:
        parent[f"{last}2"] = copy.deepcopy(parent[last])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation, min_size=1, max_size=4))
@example([(("dnat", 0, "externalPort"), "replace", 0)])
@example([(("eips", 1), "duplicate", None)])
@example([(("internal", "routes"), "drop", None)])
def test_mutated_seed_is_a_state_or_an_invalid_state_error(mutations: list[tuple[Any, str, Any]]) -> None:
    document = seed()
    for path, how, value in mutations:
        _mutate(document, path, how, value)
    try:
        state = load_state(encode(document))
    except InvalidStateError as err:
        assert err.problems
        assert all(isinstance(p, Problem) and p.path.startswith("$") and p.reason for p in err.problems)
    else:
        assert isinstance(state, DesiredState)


# --- share DNAT groups ---------------------------------------------------------------------


def share(name: str, ip: str, port: int = 8080, external: int | str = 9000, kind: str = "share") -> dict[str, Any]:
    return {**dnat(name, "my-eip", "tcp", external, ip, port), "type": kind}


def test_type_defaults_to_exclusive() -> None:
    assert load_state(encode(seed())).dnat[0].type == "exclusive"


def test_share_group_with_the_same_identity_is_accepted() -> None:
    doc = seed()
    doc["dnat"] += [share("web-a", "172.20.10.2"), share("web-b", "172.20.10.3", 8081)]
    rules = load_state(encode(doc)).dnat[1:]
    assert [(r.name, r.type, r.external_port, r.internal_ip, r.internal_port) for r in rules] == [
        ("web-a", "share", PortRange(9000, 9000), IPv4Address("172.20.10.2"), PortRange(8080, 8080)),
        ("web-b", "share", PortRange(9000, 9000), IPv4Address("172.20.10.3"), PortRange(8081, 8081)),
    ]


def test_share_and_exclusive_rules_cannot_share_an_identity() -> None:
    doc = seed()
    doc["dnat"] += [share("web-a", "172.20.10.2"), share("web-b", "172.20.10.3", kind="exclusive")]
    assert_only(
        doc,
        "$.dnat[2].externalPort",
        "tcp port 9000 on EIP 'my-eip' overlaps dnat[1] (9000) (share and exclusive rules cannot share an identity)",
    )


def test_share_rule_takes_a_single_port() -> None:
    doc = seed()
    doc["dnat"].append({**share("web-a", "172.20.10.2"), "externalPort": "9000-9001", "internalPort": "80-81"})
    assert_only(doc, "$.dnat[1].externalPort", "a share rule takes a single port, not a range")


def test_share_group_backend_listed_twice() -> None:
    doc = seed()
    doc["dnat"] += [share("web-a", "172.20.10.2"), share("web-b", "172.20.10.3"), share("web-c", "172.20.10.2")]
    assert_only(doc, "$.dnat[3].internalIp", "backend 172.20.10.2:8080 is already in the share group through dnat[1]")


def test_share_type_must_be_known() -> None:
    doc = seed()
    doc["dnat"][0]["type"] = "round-robin"
    assert_only(doc, "$.dnat[0].type", 'must be one of "exclusive", "share"')
