"""The `scaleOut` section: groups, priorities and every refusal with its field named."""

from __future__ import annotations

import json
from decimal import Decimal
from ipaddress import IPv4Address
from typing import Any

import pytest

from natgwd.lab.topology import SEED_STATE
from natgwd.state.scaleout import HANDOVER_BASE, rotated_priorities
from natgwd.state.validation import InvalidStateError, load_state

SECTION: dict[str, Any] = {
    "interface": "net1",
    "virtualRouterIdBase": 60,
    "advertInterval": 0.2,
    "members": [{"address": "172.20.10.11"}, {"address": "172.20.10.12"}, {"address": "172.20.10.13"}],
}


def doc(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    document["scaleOut"] = {**json.loads(json.dumps(SECTION)), **changes}
    return document


def refused(document: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidStateError) as caught:
        load_state(json.dumps(document).encode())
    return {p.path: p.reason for p in caught.value.problems}


def test_defaults_one_group_per_member_with_rotated_priorities() -> None:
    config = load_state(json.dumps(doc()).encode()).scale_out
    assert config is not None
    assert config.members == tuple(IPv4Address(f"172.20.10.1{i}") for i in (1, 2, 3))
    assert config.advert_interval == Decimal("0.2")
    assert (config.preempt_delay, config.conntrack_sync) == (5, True)
    assert [g.virtual_router_id for g in config.groups] == [60, 61, 62]
    assert [g.priorities for g in config.groups] == [(200, 190, 180), (180, 200, 190), (190, 180, 200)]
    assert [g.first_choice() for g in config.groups] == [0, 1, 2]
    assert [g.mark for g in config.groups] == [HANDOVER_BASE, HANDOVER_BASE + 1, HANDOVER_BASE + 2]


def test_an_eip_listed_in_a_group_belongs_to_it_and_others_hash_stably() -> None:
    config = load_state(json.dumps(doc(groups=[{"eips": ["my-eip2"]}, {}])).encode()).scale_out
    assert config is not None
    assert config.group_of("my-eip2").index == 0
    # The same name always lands in the same group, in every process.
    assert config.group_of("my-eip").index == config.group_of("my-eip").index
    spread = {config.group_of(f"eip-{i}").index for i in range(40)}
    assert spread == {0, 1}
    assert config.eips_of(config.groups[0], ["my-eip2"]) == ("my-eip2",)


def test_rotated_priorities_never_repeat() -> None:
    for members in range(2, 17):
        for group in range(members):
            priorities = rotated_priorities(group, members)
            assert len(set(priorities)) == members and min(priorities) > 0


def test_member_on_finds_this_member_by_its_address() -> None:
    config = load_state(json.dumps(doc()).encode()).scale_out
    assert config is not None
    assert config.member_on([IPv4Address("10.0.0.1"), IPv4Address("172.20.10.12")]) == 1
    assert config.member_on([IPv4Address("10.0.0.1")]) is None


@pytest.mark.parametrize(
    ("changes", "path", "reason"),
    [
        ({"groups": [{"priorities": [100, 100, 50]}]}, "$.scaleOut.groups[0].priorities[1]", "equal to priorities[0]"),
        ({"groups": [{"priorities": [0, 0, 0]}]}, "$.scaleOut.groups[0].priorities", "no member can own"),
        ({"groups": [{"priorities": [100, 50]}]}, "$.scaleOut.groups[0].priorities", "one priority per member (3)"),
        ({"groups": [{"eips": ["nope"]}]}, "$.scaleOut.groups[0].eips[0]", "no EIP is named 'nope'"),
        ({"groups": [{"eips": ["my-eip"]}, {"eips": ["my-eip"]}]}, "$.scaleOut.groups[1].eips[0]", "in groups[0]"),
        (
            {"members": [{"address": "172.20.10.11"}, {"address": "172.20.10.11"}]},
            "$.scaleOut.members[1].address",
            "members[0] already",
        ),
        (
            {"members": [{"address": "172.20.10.11"}, {"address": "224.0.0.1"}]},
            "$.scaleOut.members[1].address",
            "usable",
        ),
        ({"virtualRouterIdBase": 254}, "$.scaleOut.virtualRouterIdBase", "pass 255"),
        ({"interface": "net2"}, "$.scaleOut.interface", "external interface"),
        ({"multicastGroup": "10.1.1.1"}, "$.scaleOut.multicastGroup", "not a multicast"),
        ({"advertInterval": 0.005}, "$.scaleOut.advertInterval", "between"),
    ],
)
def test_bad_configuration_is_refused_with_the_field_named(changes: dict[str, Any], path: str, reason: str) -> None:
    problems = refused(doc(**changes))
    assert path in problems, problems
    assert reason in problems[path]


def test_shape_problems_name_the_field() -> None:
    assert "$.scaleOut.members" in refused(doc(members=[{"address": "172.20.10.11"}]))
    assert "$.scaleOut.members[0].priority" in refused(doc(members=[{"address": "172.20.10.11", "priority": 1}] * 2))


def test_not_with_an_ha_pair_nor_ipv6_eips() -> None:
    document = doc()
    document["ha"] = {
        "interface": "sync0",
        "virtualRouterId": 51,
        "members": [{"address": "169.254.64.1", "priority": 150}, {"address": "169.254.64.2", "priority": 100}],
    }
    assert "ha" in refused(document)["$.scaleOut"]
    document = doc()
    document["eips"][0]["v6ip"] = "2001:db8::1"
    assert "IPv6" in refused(document)["$.scaleOut"]


def test_a_backend_behind_eips_of_two_groups_is_refused_and_one_group_is_fine() -> None:
    def two_backends(groups: list[dict[str, Any]], port: str = "80") -> dict[str, Any]:
        document = doc(groups=groups)
        document["fip"] = []  # my-eip2 serves the second DNAT rule instead
        second = {"name": "dnat02", "eip": "my-eip2", "protocol": "tcp", "externalPort": "9999"}
        document["dnat"].append(second | {"internalIp": "172.20.10.2", "internalPort": port})
        return document

    apart = [{"eips": ["my-eip"]}, {"eips": ["my-eip2"]}]
    assert refused(two_backends(apart))["$.dnat[1].eip"] == (
        "backend 172.20.10.2 tcp/80 is also behind 'dnat01', whose EIP 'my-eip' is in scaleOut group 0, not 1: "
        "its replies cannot go to both owners; put both EIPs in one group (scaleOut.groups)"
    )
    assert len(load_state(json.dumps(two_backends([{"eips": ["my-eip", "my-eip2"]}, {}])).encode()).dnat) == 2
    assert len(load_state(json.dumps(two_backends(apart, port="81")).encode()).dnat) == 2
