"""Scaling out under kube-ovn-controller's Deployment: the pod name's scope, the hello on
the LAN, and the settings every member derives alike from the members it heard and the
state (groups that keep the controller's calls valid, rendezvous priorities)."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from natgwd.ha.autoscale import GROUPS, auto_scale_out, multicast_group, priorities, tied_groups
from natgwd.ha.controller import HaController
from natgwd.ha.discovery import Discovered, MemberDiscovery
from natgwd.ha.hello import MAX_HELLO_BYTES, Hello, Refusal, decode_hello, deployment_scope, encode_hello
from natgwd.ha.render import HaPaths
from natgwd.ha.scale import ScaleController, group_addresses
from natgwd.ha.scale_metrics import ScaleMetrics
from natgwd.ha.scale_render import conntrackd_conf, keepalived_conf
from natgwd.lab.topology import SEED_STATE
from natgwd.process.supervisor import Supervisor
from natgwd.state.model import DesiredState
from natgwd.state.scaleout import ScaleOutConfig
from natgwd.state.validation import InvalidStateError, load_state
from tests.unit.fakes import quiet_ha_kernel, scale_controller

SCOPE = "vpc-nat-gw-gw1"
M = [IPv4Address(f"172.20.10.{11 + i}") for i in range(16)]


def test_a_deployment_replica_is_recognised_by_its_name_and_a_statefulset_gateway_is_not() -> None:
    assert deployment_scope("vpc-nat-gw-gw1-7d4b9c8f6d-x2b5k") == "vpc-nat-gw-gw1"
    assert deployment_scope("vpc-nat-gw-my-gw-2-5c7f9b6d48-q9wzt") == "vpc-nat-gw-my-gw-2"
    for other in (
        "vpc-nat-gw-gw1-0",  # the StatefulSet's single gateway
        "vpc-nat-gw-gw1-7d4b9c8f6d-x2b5",  # four characters
        "vpc-nat-gw-gw1-7d4b9c8f6d-x2a5k",  # a vowel: not a generated suffix
        "gw1-7d4b9c8f6d-x2b5k",  # not the controller's gateway
        "",
    ):
        assert deployment_scope(other) is None, other


def test_a_hello_round_trips_and_everything_else_is_refused_with_its_reason() -> None:
    me = IPv4Address("172.20.10.11")
    hello = Hello(SCOPE, me)
    assert decode_hello(encode_hello(hello), SCOPE, me) == hello
    assert decode_hello(encode_hello(hello), "vpc-nat-gw-gw2", me) is Refusal.FOREIGN_SCOPE
    assert decode_hello(encode_hello(hello), SCOPE, IPv4Address("172.20.10.99")) is Refusal.ADDRESS_MISMATCH
    assert decode_hello(b" " * (MAX_HELLO_BYTES + 1), SCOPE, me) is Refusal.OVERSIZED
    for malformed in (
        b"",
        b"\xff\xfe",
        b"[1]",
        b'{"natgwd": 2, "scope": "vpc-nat-gw-gw1", "address": "172.20.10.11"}',
        b'{"natgwd": true, "scope": "vpc-nat-gw-gw1", "address": "172.20.10.11"}',
        b'{"natgwd": 1, "scope": 7, "address": "172.20.10.11"}',
        b'{"natgwd": 1, "scope": "vpc-nat-gw-gw1", "address": "172.20.10.256"}',
        b'{"natgwd": 1, "scope": "vpc-nat-gw-gw1", "address": "fe80::1"}',
        b'{"natgwd": 1, "scope": "vpc-nat-gw-gw1"}',
    ):
        assert decode_hello(malformed, SCOPE, me) is Refusal.MALFORMED, malformed


def test_no_hello_raises_and_every_one_ignored_is_counted(tmp_path: Path) -> None:
    """Prevents: a packet on the LAN taking discovery (and with it the daemon) down."""
    registry = CollectorRegistry()
    discovery = MemberDiscovery(SCOPE, ScaleMetrics(registry, lambda: True), tmp_path)
    me, other = M[0], M[1]
    generator = random.Random(7)
    for size in range(300):
        data = bytes(generator.randrange(256) for _ in range(size))
        assert discovery._heard_from(other, data, me) is False
    assert discovery._heard_from(other, encode_hello(Hello("vpc-nat-gw-gw2", other)), me) is False
    assert discovery._heard_from(other, encode_hello(Hello(SCOPE, other)), me) is True
    refused = sum(
        registry.get_sample_value("natgwd_scale_hellos_refused_total", {"reason": str(reason)}) or 0
        for reason in Refusal
    )
    assert refused == 301
    assert registry.get_sample_value("natgwd_scale_hellos_refused_total", {"reason": "foreign_scope"}) == 1
    assert registry.get_sample_value("natgwd_scale_hellos_received_total") == 1


def test_more_members_than_a_group_can_rank_are_refused(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    discovery = MemberDiscovery(SCOPE, ScaleMetrics(registry, lambda: True), tmp_path)
    more = [IPv4Address(f"172.20.11.{i}") for i in range(1, 20)]
    for address in more:
        discovery._heard_from(address, encode_hello(Hello(SCOPE, address)), M[0])
    assert len(discovery._heard) == 15  # and this member: 16
    assert registry.get_sample_value("natgwd_scale_hellos_refused_total", {"reason": "too_many_members"}) == 4


def controller_state(*names: str, shared_backend: bool = True) -> DesiredState:
    """The seed state with more EIPs; with `shared_backend`, my-eip's DNAT backend
    (172.20.10.2 tcp/80) also behind a share DNAT of the last EIP, as the controller's
    `nft-dnat-map-add` makes it."""
    document: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    document["eips"] += [{"name": name, "v4ip": f"10.115.55.{210 + i}"} for i, name in enumerate(names)]
    if shared_backend and names:
        document["dnat"].append(
            {"name": "share", "eip": names[-1], "protocol": "tcp", "externalPort": "9090"}
            | {"internalIp": "172.20.10.2", "internalPort": "80", "type": "share"}
        )
    return load_state(json.dumps(document).encode())


def as_section(config: ScaleOutConfig, state: DesiredState) -> dict[str, Any]:
    """The derived settings written as a scaleOut section, to be checked as a user's would be."""
    names = [e.name for e in state.eips]
    return {
        "interface": config.interface,
        "virtualRouterIdBase": config.groups[0].virtual_router_id,
        "members": [{"address": str(m)} for m in config.members],
        "groups": [{"eips": list(config.eips_of(g, names)), "priorities": list(g.priorities)} for g in config.groups],
    }


def test_eips_tied_by_a_backend_or_a_pool_share_a_group_so_every_call_stays_valid() -> None:
    """Prevents: automatic groups that split two EIPs the validation of a scaleOut section
    refuses to split, so that the controller's `nft-dnat-map-add` of a backend already
    behind another EIP failed on a scaled-out replica."""
    names = [f"eip-10-115-55-{210 + i}" for i in range(12)]
    state = controller_state(*names)
    config = auto_scale_out(state, M[:3], SCOPE)
    assert config.group_of("my-eip") == config.group_of(names[-1])
    assert len({config.group_of(e.name).index for e in state.eips}) > 2  # the others spread
    document: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    document["eips"] = [{"name": e.name, "v4ip": str(e.v4ip)} for e in state.eips]
    document["dnat"] = [
        *document["dnat"],
        {"name": "share", "eip": names[-1], "protocol": "tcp", "externalPort": "9090"}
        | {"internalIp": "172.20.10.2", "internalPort": "80", "type": "share"},
    ]
    # Written as a scaleOut section, the same groups pass the checks of the section.
    load_state(json.dumps(document | {"scaleOut": as_section(config, state)}).encode())
    # Split, they would not (the check the ties keep the controller's calls away from).
    split = as_section(config, state)
    tied = next(g for g in split["groups"] if "my-eip" in g["eips"])
    tied["eips"].remove(names[-1])
    next(g for g in split["groups"] if g is not tied)["eips"].append(names[-1])
    with pytest.raises(InvalidStateError, match=re.escape("backend 172.20.10.2 tcp/80")):
        load_state(json.dumps(document | {"scaleOut": split}).encode())


def test_a_snat_pools_eips_share_a_group() -> None:
    document: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    document["eips"] += [{"name": f"p{i}", "v4ip": f"10.115.55.{220 + i}"} for i in range(6)]
    document["snat"].append({"name": "pool", "eips": [f"p{i}" for i in range(6)], "internalCIDR": "10.60.0.0/16"})
    state = load_state(json.dumps(document).encode())
    config = auto_scale_out(state, M[:2], SCOPE)
    assert len({config.group_of(f"p{i}").index for i in range(6)}) == 1
    assert tied_groups(state) == {config.group_of("p0").index: [f"p{i}" for i in range(6)]}


def test_every_member_derives_the_same_settings_from_the_same_members() -> None:
    state = controller_state("e1", "e2")
    one = auto_scale_out(state, [M[2], M[0], M[1]], SCOPE)
    other = auto_scale_out(state, [M[1], M[2], M[0]], SCOPE)
    assert one == other and one.members == (M[0], M[1], M[2])
    assert len(one.groups) == GROUPS and one.interface == "net1" and one.discovery_scope == SCOPE
    assert [g.virtual_router_id for g in one.groups] == list(range(one.groups[0].virtual_router_id, 256))[:GROUPS]
    assert one.multicast_group == multicast_group(SCOPE) and one.multicast_group.is_multicast
    assert auto_scale_out(state, M[:3], "vpc-nat-gw-gw2").multicast_group != one.multicast_group
    # Priorities are distinct in every group, and the masters spread over the members.
    for members in range(1, 17):
        config = auto_scale_out(state, M[:members], SCOPE)
        assert all(len(set(g.priorities)) == members for g in config.groups)
    firsts = [g.first_choice() for g in auto_scale_out(state, M[:2], SCOPE).groups]
    assert set(firsts) == {0, 1}


def test_a_lone_member_owns_every_group() -> None:
    config = auto_scale_out(controller_state(), [M[0]], SCOPE)
    assert all(g.priorities == (200,) for g in config.groups)


def owners(members: list[IPv4Address]) -> dict[int, IPv4Address]:
    return {g: members[max(range(len(members)), key=priorities(SCOPE, g, members).__getitem__)] for g in range(GROUPS)}


def test_a_member_joining_or_leaving_moves_only_its_share() -> None:
    """Prevents: a member's arrival or death reshuffling groups between the others (each
    move is a takeover: conntrackd must have the connections, gratuitous ARP...)."""
    for count in range(2, 8):
        before, after = owners(M[:count]), owners(M[: count + 1])
        moved = {g for g in before if before[g] != after[g]}
        assert all(after[g] == M[count] for g in moved), count  # only to the new member
        left = owners([m for m in M[:count] if m != M[0]])
        assert {g for g in before if before[g] != left[g]} == {g for g in before if before[g] == M[0]}
        # The others keep their order: the next choice of a group is the same on every member.
        assert all(left[g] != M[0] for g in left)


def test_conntrackd_of_discovered_members_names_no_other_member(tmp_path: Path) -> None:
    """Prevents: conntrackd restarted (its connections lost) whenever a member comes or goes."""
    state = controller_state()
    paths = HaPaths(tmp_path)
    two = conntrackd_conf(auto_scale_out(state, M[:2], SCOPE), 0, paths)
    three = conntrackd_conf(auto_scale_out(state, M[:3], SCOPE), 0, paths)
    alone = conntrackd_conf(auto_scale_out(state, M[:1], SCOPE), 0, paths)
    assert two == three == alone
    assert "Multicast {" in two and f"IPv4_address {multicast_group(SCOPE)}" in two
    assert str(M[1]) not in two and "IPv4_interface 172.20.10.11" in two


def test_a_lone_member_advertises_to_no_one_and_keeps_its_own_external_address(tmp_path: Path) -> None:
    state = controller_state()
    config = auto_scale_out(state, M[:1], SCOPE)
    text = keepalived_conf(config, 0, group_addresses(state, config), "net2", HaPaths(tmp_path))
    # Without a peer keepalived would advertise by multicast, to other gateways' members too.
    assert text.count("unicast_peer {\n        127.0.0.1\n    }") == GROUPS
    assert "10.115.48.1" not in text  # the pod's own external address stays its own
    assert "10.115.55.200/21 dev net2" in text


@pytest.fixture
def scale(tmp_path: Path) -> Iterator[tuple[ScaleController, list[str]]]:
    events: list[str] = []
    controller = scale_controller(tmp_path, M[0])
    supervisor = Supervisor()
    controller.start(supervisor, lambda _path, _text: events.append("written") is None, lambda: None)
    yield controller, events
    controller.leave()
    supervisor.stop()


def test_keepalived_waits_for_the_window_and_members_coming_do_not_restart_it(
    scale: tuple[ScaleController, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    controller, _ = scale
    state = controller_state()
    controller.applied(replace(state, scale_out=auto_scale_out(state, [M[0]], SCOPE, settled=False)), complete=True)
    reason, detail = controller.readiness()
    assert reason is not None and "discovering the other members on net1" in reason
    assert detail == {"scale_out": {"members": [str(M[0])], "members_from": "discovery"}}
    assert not controller._keepalived_started
    controller.applied(replace(state, scale_out=auto_scale_out(state, [M[0]], SCOPE)), complete=True)
    assert controller._keepalived_started
    left: list[bool] = []
    monkeypatch.setattr(controller, "leave", lambda: left.append(True))
    controller.applied(replace(state, scale_out=auto_scale_out(state, M[:2], SCOPE)), complete=True)
    assert left == [] and controller._keepalived_started
    _, detail = controller.readiness()
    assert detail["scale_out"]["members"] == [str(M[0]), str(M[1])]
    assert detail["scale_out"]["members_from"] == "discovery"


class FakeDiscovery(MemberDiscovery):
    def follow(self, interface: str, address: IPv4Address) -> None:
        self.followed = (interface, address)

    def view(self) -> Discovered:
        return Discovered((M[0], M[1]), True)


def test_an_explicit_scale_out_or_ha_section_wins_over_discovery(tmp_path: Path) -> None:
    kernel = quiet_ha_kernel(lambda _interface: [IPv4Address("172.20.10.254")])
    ha = HaController(tmp_path, lambda _i, _n: None, CollectorRegistry(), kernel, discovery_scope=SCOPE)
    discovery = FakeDiscovery(SCOPE, ha.scale.metrics, tmp_path)
    ha.discovery = discovery
    state = controller_state()
    document = json.loads(json.dumps(SEED_STATE))
    derived = ha.effective(state, document)
    assert discovery.followed == ("net1", IPv4Address("172.20.10.254"))
    assert derived.scale_out == auto_scale_out(state, [M[0], M[1]], SCOPE)
    assert ha.effective(derived, document) is derived  # unchanged: the same object (the delta path)
    for section in ("scaleOut", "ha"):
        assert ha.effective(state, document | {section: {}}) is state
    without = HaController(tmp_path, lambda _i, _n: None, CollectorRegistry(), kernel)
    assert without.effective(state, document) is state
