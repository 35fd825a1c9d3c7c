"""QoS policies in the desired state: Kube-OVN's fields parsed to kernel units, and every
wrong policy refused with the path of the field and the reason."""

from __future__ import annotations

import json
from ipaddress import IPv4Network
from typing import Any

import pytest

from natgwd.lab.topology import SEED_STATE
from natgwd.state.qos import BandwidthLimitRule, Match, QosPolicy
from natgwd.state.validation import InvalidStateError, load_state


def seed_with(policies: list[dict[str, Any]], eip_policy: str | None = None, gateway: str | None = None) -> bytes:
    state: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    state["qosPolicies"] = policies
    if eip_policy:
        state["eips"][0]["qosPolicy"] = eip_policy
    if gateway:
        state["qosPolicy"] = gateway
    return json.dumps(state).encode()


def rule(name: str, direction: str, rate: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "direction": direction, "rateMax": rate, **extra}


def problems(raw: bytes) -> dict[str, str]:
    with pytest.raises(InvalidStateError) as caught:
        load_state(raw)
    return {p.path: p.reason for p in caught.value.problems}


def test_eip_and_gateway_policies_parsed_to_kernel_units() -> None:
    raw = seed_with(
        [
            {"name": "eip-limit", "bandwidthLimitRules": [rule("in", "ingress", "10", burstMax="0.5", priority=1)]},
            {
                "name": "gw",
                "bindingType": "NATGW",
                "bandwidthLimitRules": [
                    rule("cidr", "egress", 2.5, matchType="ip", matchValue="dst 10.0.0.0/24", priority=2),
                    rule("nic", "egress", "100", interface="net2", priority=3),
                ],
            },
        ],
        eip_policy="eip-limit",
        gateway="gw",
    )
    state = load_state(raw)
    assert state.eips[0].qos_policy == "eip-limit"
    assert state.eips[1].qos_policy is None
    assert state.qos_policy == "gw"
    assert state.qos_policies == (
        QosPolicy("eip-limit", (BandwidthLimitRule("in", "ingress", 10_000_000, 524_288, 1),)),
        QosPolicy(
            "gw",
            (
                BandwidthLimitRule("cidr", "egress", 2_500_000, 0, 2, None, Match("dst", IPv4Network("10.0.0.0/24"))),
                BandwidthLimitRule("nic", "egress", 100_000_000, 0, 3, "net2"),
            ),
            "NATGW",
        ),
    )


def test_state_without_qos_has_none() -> None:
    state = load_state(json.dumps(SEED_STATE).encode())
    assert state.qos_policies == () and state.qos_policy is None


@pytest.mark.parametrize(
    ("rate", "reason"),
    [
        (0, "is 0: a limit of nothing stops all traffic (unbind the policy to remove a limit)"),
        ("0.0", "is 0: a limit of nothing stops all traffic (unbind the policy to remove a limit)"),
        ("0.001", "0.001 Mbit/s is below the smallest rate, 0.01 Mbit/s"),
        (10001, "10001 Mbit/s is above the largest rate, 10000 Mbit/s (10 Gbit/s)"),
        (-1, 'must be a number of at least 0, as a number or a string such as "2.5"'),
        ("fast", 'must be a number of at least 0, as a number or a string such as "2.5"'),
    ],
)
def test_zero_and_absurd_rates_refused(rate: Any, reason: str) -> None:
    found = problems(seed_with([{"name": "p", "bandwidthLimitRules": [rule("r", "ingress", rate)]}], "p"))
    assert found == {"$.qosPolicies[0].bandwidthLimitRules[0].rateMax": reason}


def test_burst_longer_than_htb_holds_refused() -> None:
    policy = {"name": "p", "bandwidthLimitRules": [rule("r", "egress", "0.1", burstMax=10)]}
    found = problems(seed_with([policy], "p"))
    assert found == {
        "$.qosPolicies[0].bandwidthLimitRules[0].burstMax": "10 MB takes 839 s to send at rateMax; at most 250 s "
        "(HTB's buffer holds no more)"
    }


def test_unknown_policy_and_wrong_binding_type() -> None:
    raw = seed_with(
        [{"name": "gw-only", "bindingType": "NATGW", "bandwidthLimitRules": [rule("r", "egress", 1)]}],
        eip_policy="gw-only",
        gateway="missing",
    )
    assert problems(raw) == {
        "$.eips[0].qosPolicy": "binds an EIP to QoS policy 'gw-only', whose bindingType is NATGW",
        "$.qosPolicy": "names QoS policy 'missing', which is not in qosPolicies",
    }


def test_conflicting_eip_rules() -> None:
    policy = {
        "name": "p",
        "bandwidthLimitRules": [
            rule("a", "ingress", 1),
            rule("b", "ingress", 2),
            rule("c", "egress", 3, matchValue="dst 10.0.0.0/8"),
        ],
    }
    assert problems(seed_with([policy], "p")) == {
        "$.qosPolicies[0].bandwidthLimitRules[1].direction": "conflicts with rule 'a': an EIP has one ingress limit",
        "$.qosPolicies[0].bandwidthLimitRules[2].matchValue": "an EIP's rules match the EIP's address; matchValue "
        "is for the gateway's policy",
    }


def test_conflicting_gateway_rules() -> None:
    policy = {
        "name": "gw",
        "bandwidthLimitRules": [
            rule("nic1", "egress", 1),
            rule("nic2", "egress", 2),
            rule("a", "ingress", 1, matchValue="src 10.0.0.0/16", priority=1),
            rule("b", "ingress", 1, matchValue="src 10.0.5.0/24", priority=1),
            rule("c", "ingress", 1, matchValue="src 10.0.0.0/16", priority=5),
            rule("d", "ingress", 1, matchValue="src 10.1.0.0/16", priority=1),
        ],
    }
    prefix = "$.qosPolicies[0].bandwidthLimitRules"
    assert problems(seed_with([policy], gateway="gw")) == {
        f"{prefix}[1].direction": "conflicts with rule 'nic1': one egress limit per NIC",
        f"{prefix}[3].priority": "src 10.0.5.0/24 can match the packets of rule 'a' (src 10.0.0.0/16) at the "
        "same priority 1: give one a lower number to say which limit applies",
        f"{prefix}[4].matchValue": "conflicts with rule 'a': the same match",
    }


def test_interface_other_than_external_refused() -> None:
    policy = {"name": "gw", "bandwidthLimitRules": [rule("r", "egress", 1, interface="net1")]}
    assert problems(seed_with([policy], gateway="gw")) == {
        "$.qosPolicies[0].bandwidthLimitRules[0].interface": "natgwd shapes the external interface only (net2), "
        "not net1"
    }


def test_unshared_policy_used_twice_and_duplicates() -> None:
    state: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    state["qosPolicies"] = [
        {"name": "p", "shared": False, "bandwidthLimitRules": [rule("r", "egress", 1), rule("r", "ingress", 1)]},
        {"name": "p", "bandwidthLimitRules": []},
    ]
    for eip in state["eips"]:
        eip["qosPolicy"] = "p"
    assert problems(json.dumps(state).encode()) == {
        "$.qosPolicies[0].bandwidthLimitRules[1].name": "duplicates bandwidthLimitRules[0]",
        "$.qosPolicies[0].shared": "is false but EIPs my-eip, my-eip2 use the policy; one EIP at most",
        "$.qosPolicies[1].name": "duplicates qosPolicies[0] ('p')",
    }


def test_shape_errors_name_the_field() -> None:
    policy = {
        "name": "p",
        "bandwidthLimitRules": [
            {"name": "r", "direction": "sideways", "rateMax": 1, "matchType": "mac", "matchValue": "dst 10.0.0.1/24"}
        ],
    }
    found = problems(seed_with([policy], "p"))
    assert found == {
        "$.qosPolicies[0].bandwidthLimitRules[0].direction": 'must be one of "ingress", "egress"',
        "$.qosPolicies[0].bandwidthLimitRules[0].matchType": 'must be one of "ip"',
    }


def test_host_bits_in_match_value() -> None:
    policy = {"name": "gw", "bandwidthLimitRules": [rule("r", "egress", 1, matchValue="dst 10.0.0.1/24")]}
    assert problems(seed_with([policy], gateway="gw")) == {
        "$.qosPolicies[0].bandwidthLimitRules[0].matchValue": "has host bits set (did you mean dst 10.0.0.0/24?)"
    }


def test_paths_stay_right_after_a_refused_rule_and_unbound_policies_are_checked_by_type() -> None:
    eip_policy = {
        "name": "p",
        "bindingType": "EIP",
        "bandwidthLimitRules": [rule("bad", "ingress", 0), rule("a", "ingress", 1), rule("b", "ingress", 2)],
    }
    gateway_policy = {
        "name": "g",
        "bindingType": "NATGW",
        "bandwidthLimitRules": [rule("x", "egress", 1), rule("y", "egress", 2)],
    }
    # neither is bound: each is still checked as what its bindingType says
    assert problems(seed_with([eip_policy, gateway_policy])) == {
        "$.qosPolicies[0].bandwidthLimitRules[0].rateMax": "is 0: a limit of nothing stops all traffic (unbind the "
        "policy to remove a limit)",
        "$.qosPolicies[0].bandwidthLimitRules[2].direction": "conflicts with rule 'a': an EIP has one ingress limit",
        "$.qosPolicies[1].bandwidthLimitRules[1].direction": "conflicts with rule 'x': one egress limit per NIC",
    }
