"""natgwd.qos.plan: the traffic-control tree of a desired state's QoS, without a kernel."""

from __future__ import annotations

import json
import zlib
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from natgwd.lab.topology import SEED_STATE
from natgwd.qos.plan import (
    DEFAULT_MINOR,
    EIP_MINORS,
    EIP_PRIO,
    GATEWAY_MINORS,
    GATEWAY_PRIO,
    MIN_BURST_BYTES,
    NIC_MINOR,
    NIC_PRIO,
    ClassKey,
    FilterSpec,
    HtbClass,
    assign_minors,
    ifb_name,
    key_of,
    tree,
    wants,
)
from natgwd.state.model import DesiredState
from natgwd.state.validation import load_state

EIP1, EIP2 = "10.115.55.200", "10.115.55.201"


def state(eip_rules: list[dict[str, Any]], gateway_rules: list[dict[str, Any]] | None = None) -> DesiredState:
    doc: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    doc["qosPolicies"] = [{"name": "eip", "bandwidthLimitRules": eip_rules}]
    for eip in doc["eips"]:
        eip["qosPolicy"] = "eip"
    if gateway_rules is not None:
        doc["qosPolicies"].append({"name": "gw", "bandwidthLimitRules": gateway_rules})
        doc["qosPolicy"] = "gw"
    return load_state(json.dumps(doc).encode())


def test_every_eip_of_a_shared_policy_gets_its_own_class_in_its_direction() -> None:
    planned = wants(state([{"name": "in", "direction": "ingress", "rateMax": 10, "burstMax": 2}]))
    assert planned.ifb == "ifb-net2"
    assert not planned.active("egress")
    ingress = tree("ingress", planned.by_direction["ingress"], {})
    minor1, minor2 = (m for m, k in ingress.keys.items() if k.kind == "eip")
    assert ingress.classes == {
        DEFAULT_MINOR: HtbClass(10_000_000_000 // 8, MIN_BURST_BYTES),
        minor1: HtbClass(1_250_000, 2 * 1_048_576),
        minor2: HtbClass(1_250_000, 2 * 1_048_576),
    }
    # ingress matches the EIP as destination (before DNAT), at offset 16 of the header
    assert {(f.offset, f.mask, f.prio) for f in ingress.filters} == {(16, 0xFFFFFFFF, EIP_PRIO)}
    assert {str(key_of("ingress", f)) for f in ingress.filters} == {
        str(ClassKey("eip", EIP1)),
        str(ClassKey("eip", EIP2)),
    }
    assert set(ingress.labels.values()) == {"my-eip", "my-eip2"}


def test_egress_matches_the_eip_as_source_and_gateway_rules_come_after_eip_rules() -> None:
    planned = wants(
        state(
            [{"name": "out", "direction": "egress", "rateMax": 20}],
            [
                {"name": "wide", "direction": "egress", "rateMax": 5, "matchValue": "dst 10.0.0.0/8", "priority": 7},
                {"name": "narrow", "direction": "egress", "rateMax": 1, "matchValue": "dst 10.1.0.0/16", "priority": 2},
                {"name": "nic", "direction": "egress", "rateMax": 100, "priority": 0},
            ],
        )
    )
    egress = tree("egress", planned.by_direction["egress"], {})
    by_key = {egress.keys[f.minor]: f for f in egress.filters}
    assert by_key[ClassKey("eip", EIP1)] == FilterSpec(
        EIP_PRIO, 12, 0x0A7337C8, 0xFFFFFFFF, by_key[ClassKey("eip", EIP1)].minor
    )
    narrow, wide = by_key[ClassKey("cidr", "dst 10.1.0.0/16")], by_key[ClassKey("cidr", "dst 10.0.0.0/8")]
    assert (narrow.offset, narrow.value, narrow.mask, narrow.prio) == (16, 0x0A010000, 0xFFFF0000, GATEWAY_PRIO + 2)
    assert wide.prio == GATEWAY_PRIO + 7
    nic = by_key[ClassKey("nic")]
    assert (nic.mask, nic.minor, nic.prio) == (0, NIC_MINOR, NIC_PRIO)
    # EIP before any gateway rule, whatever the numbers; the NIC-wide rule last
    assert by_key[ClassKey("eip", EIP1)].prio < narrow.prio < wide.prio < nic.prio
    assert narrow.minor in GATEWAY_MINORS and by_key[ClassKey("eip", EIP2)].minor in EIP_MINORS
    # a default burst is 10 ms at the rate, never less than one GSO packet
    assert egress.classes[by_key[ClassKey("nic")].minor] == HtbClass(
        12_500_000, MIN_BURST_BYTES
    )  # 10 ms = 125,000 bytes


def test_class_ids_are_kept_and_collisions_probed() -> None:
    a, b = ClassKey("eip", EIP1), ClassKey("eip", EIP2)
    fresh = assign_minors([a, b], {})
    assert fresh[a] == EIP_MINORS[zlib.crc32(EIP1.encode()) % len(EIP_MINORS)]
    # b's hash slot is taken by a class that existed before: b moves to the next free id
    taken = {ClassKey("eip", "10.0.0.9"): fresh[b]}
    moved = assign_minors([a, b, ClassKey("eip", "10.0.0.9")], taken)
    assert moved[ClassKey("eip", "10.0.0.9")] == fresh[b]
    assert moved[b] == fresh[b] + 1
    # an id from the kernel is kept even where the hash would say otherwise
    assert assign_minors([a], {a: 77})[a] == 77
    # an id outside the key's range is not
    assert assign_minors([a], {a: NIC_MINOR})[a] == fresh[a]


@given(st.lists(st.integers(min_value=1, max_value=2**32 - 2), min_size=1, max_size=300, unique=True))
def test_class_ids_never_collide(addresses: list[int]) -> None:
    from ipaddress import IPv4Address

    keys = [ClassKey("eip", str(IPv4Address(a))) for a in addresses]
    assigned = assign_minors(keys, {})
    assert len(set(assigned.values())) == len(keys)
    assert all(m in EIP_MINORS for m in assigned.values())


def test_key_of_refuses_filters_natgwd_would_not_make() -> None:
    assert key_of("egress", FilterSpec(EIP_PRIO, 16, 1, 0xFFFFFFFF, 5)) is None  # dst match in egress
    assert key_of("egress", FilterSpec(GATEWAY_PRIO, 16, 0x0A000001, 0xFF000000, 0x8001)) is None  # host bits
    assert key_of("egress", FilterSpec(NIC_PRIO, 0, 0, 0, 0x1234)) is None


def test_ifb_name_fits_an_interface_name() -> None:
    assert ifb_name("a-very-long-ifname") == "ifb-a-very-long"
