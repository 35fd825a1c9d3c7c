"""The `bgp` section: what it becomes, and every refusal names its field."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from natgwd.lab.topology import DUAL_STACK_STATE
from natgwd.state.bgp import Bfd, BgpNeighbor, announced_addresses
from natgwd.state.validation import InvalidStateError, load_state


def state_with(section_: dict[str, Any], **eip_fields: Any) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(json.dumps(DUAL_STACK_STATE))
    state["bgp"] = section_
    state["eips"][0].update(eip_fields)
    return state


def section(**fields: Any) -> dict[str, Any]:
    neighbors = [{"address": "10.115.55.254", "remoteAsn": 65000}, {"address": "fd00:115::fe", "remoteAsn": 65000}]
    return {"asn": 65001, "neighbors": neighbors} | fields


def problems(state: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidStateError) as caught:
        load_state(json.dumps(state).encode())
    return {p.path: p.reason for p in caught.value.problems}


def test_a_section_becomes_the_config_with_its_defaults() -> None:
    bgp = section(routerId="10.115.48.1", announce="marked", standbyPrepend=2)
    bgp["neighbors"][0] |= {"password": "s3cret", "holdTime": 9, "gracefulRestart": True, "bfd": {"minRx": 100}}
    state = load_state(json.dumps(state_with(bgp, bgp=True)).encode())
    assert state.bgp is not None
    assert state.bgp.asn == 65001 and state.bgp.router_id == IPv4Address("10.115.48.1")
    assert state.bgp.neighbors == (
        BgpNeighbor(IPv4Address("10.115.55.254"), 65000, "s3cret", 9, Bfd(100, 300, 3), True),
        BgpNeighbor(IPv6Address("fd00:115::fe"), 65000),
    )
    assert state.bgp.standby_prepend == 2
    # "marked": only the EIP with bgp: true is announced, both its families.
    assert [e.name for e in state.bgp.announced(state.eips)] == ["my-eip"]
    every = [e.name for e in state.eips]
    assert announced_addresses(state, every) == {IPv4Address("10.115.55.200"), IPv6Address("fd00:115::200")}


def test_all_is_the_default_and_bfd_can_be_off() -> None:
    bgp = section()
    bgp["neighbors"][0]["bfd"] = {"enabled": False, "minRx": 5}
    state = load_state(json.dumps(state_with(bgp)).encode())
    assert state.bgp is not None and state.bgp.neighbors[0].bfd is None
    assert [e.name for e in state.bgp.announced(state.eips)] == ["my-eip", "my-eip2"]


@pytest.mark.parametrize(
    ("change", "path", "reason"),
    [
        ({"asn": 0}, "$.bgp.asn", "must be between 1 and 4294967295"),
        ({"asn": 2**32}, "$.bgp.asn", "must be between 1 and 4294967295"),
        ({"routerId": "300.1.1.1"}, "$.bgp.routerId", "is not an IPv4 address"),
        ({"routerId": "fd00::1"}, "$.bgp.routerId", "is not an IPv4 address"),
        ({"neighbors": [{"address": "10.115.55.254", "remoteAsn": 0}]}, "$.bgp.neighbors[0].remoteAsn", "between 1"),
        (
            {"neighbors": [{"address": "10.9.9.9", "remoteAsn": 65000}]},
            "$.bgp.neighbors[0].address",
            "in no external IPv4 subnet (10.115.48.0/21): sessions are single-hop",
        ),
        (
            {"neighbors": [{"address": "10.115.55.200", "remoteAsn": 65000}]},
            "$.bgp.neighbors[0].address",
            "one of this gateway's own addresses",
        ),
        (
            {"neighbors": [{"address": "10.115.55.254", "remoteAsn": 65000, "password": "a b"}]},
            "$.bgp.neighbors[0].password",
            "must not contain spaces",
        ),
        (
            {"neighbors": [{"address": "10.115.55.254", "remoteAsn": 65000, "password": "a\u0007b"}]},
            "$.bgp.neighbors[0].password",
            "contains a control character",
        ),
        (
            {"neighbors": [{"address": "10.115.55.254", "remoteAsn": 65000, "holdTime": 2}]},
            "$.bgp.neighbors[0].holdTime",
            "must be 0 (no keepalives) or 3 to 65535",
        ),
        (
            {"neighbors": [{"address": "10.115.55.254", "remoteAsn": 65000, "bfd": {"multiplier": 1}}]},
            "$.bgp.neighbors[0].bfd.multiplier",
            "must be 2 to 255",
        ),
        (
            {"neighbors": [{"address": "10.115.55.254", "remoteAsn": 65000, "bfd": {"minTx": 5}}]},
            "$.bgp.neighbors[0].bfd.minTx",
            "must be 10 to 60000 milliseconds",
        ),
        (
            {"neighbors": [{"address": "10.115.55.254", "remoteAsn": 1}, {"address": "10.115.55.254", "remoteAsn": 2}]},
            "$.bgp.neighbors[1].address",
            "duplicates neighbors[0]",
        ),
        ({"announce": "some"}, "$.bgp.announce", "must be one of"),
        ({"neighbors": []}, "$.bgp.neighbors", "should be non-empty"),
    ],
)
def test_bad_input_is_refused_with_the_field_named(change: dict[str, Any], path: str, reason: str) -> None:
    found = problems(state_with(section(**change)))
    assert path in found, found
    assert reason in found[path]


def test_a_neighbour_of_a_family_the_gateway_has_no_address_of_is_refused() -> None:
    state = state_with(section())
    state["external"]["addresses"] = ["10.115.48.1/21"]
    del state["external"]["gateway6"]
    for key in ("snat", "dnat", "fip"):
        state[key] = [r for r in state[key] if ":" not in r.get("internalIp", r.get("internalCIDR", ""))]
    found = problems(state)
    assert found["$.bgp.neighbors[1].address"] == (
        "an IPv6 neighbour needs an IPv6 session, but no external network has an IPv6 address"
    )


def test_an_eip_flag_must_be_a_boolean() -> None:
    found = problems(state_with(section(), bgp="true"))
    assert found["$.eips[0].bgp"] == "must be a boolean"


def test_graceful_restart_is_refused_in_an_ha_pair() -> None:
    state = state_with(section())
    state["external"]["addresses"] = ["10.115.48.1/21"]
    del state["external"]["gateway6"]
    state["eips"] = [{"name": e["name"], "v4ip": e["v4ip"]} for e in state["eips"]]
    for key in ("snat", "dnat", "fip"):
        state[key] = [r for r in state[key] if ":" not in r.get("internalIp", r.get("internalCIDR", ""))]
    state["internal"] = {"interface": "net1", "addresses": ["172.20.10.254/24"]}
    state["ha"] = {
        "interface": "sync0",
        "virtualRouterId": 51,
        "members": [{"address": "169.254.64.1", "priority": 150}, {"address": "169.254.64.2", "priority": 100}],
    }
    state["bgp"]["neighbors"] = [{"address": "10.115.55.254", "remoteAsn": 65000, "gracefulRestart": True}]
    found = problems(state)
    assert found == {"$.bgp.neighbors[0].gracefulRestart": "must be off in an HA pair (ha section)"}
    state["bgp"]["neighbors"][0]["gracefulRestart"] = False
    loaded = load_state(json.dumps(state).encode())
    assert loaded.bgp is not None and loaded.ha is not None
